"""The CAST Serve application: ``build_app(config)`` and the ``app_builder(args)`` import path.

Deployment graph (one application, four deployments)::

    HTTP :8000 (OpenAI-compatible, SSE)  ─┐
    gRPC :9000 (cast.v1.Cast, streaming) ─┴─> Router (ingress, FastAPI + gRPC methods)
                                               │  per request: open, then per step
                                               │  draft = Drafter.draft(...)   ─┐ DeploymentResponse,
                                               │  Verifier.verify(sid, draft) <─┘ the tree moves as an
                                               v                                  object ref
                           Drafter (pool A) ───────────────────────────> Verifier (pool B)
                           batched draft, per-session KV    ObjectRef    batched verify (one
                               │  plan (cached 100 ms)                   target forward), per-session KV
                               v                                             │ occupancy + device kind
                           Planner (one replica: cluster view, cost profiles) <┘

* Router -> Drafter / Verifier calls carry ``session_id`` and go through
  ``SessionAffinityRouter``: every step of a session reaches the replica
  holding its KV state.
* Drafter and Verifier have their own replica counts and ``ray_actor_options``;
  ``drafter_pool`` / ``verifier_pool`` pin them to their GPU pools (custom
  resource or node label), so the pools scale independently.
* The Planner answers the drafter's ``plan(...)`` with the cost context of the
  verifier replica that will verify the step.

Used by ``cast serve``, the tests, ``serve run services.app:app_builder`` and
KubeRay's ``serveConfigV2`` (``import_path: services.app:app_builder``).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import LoggingConfig

from services.affinity import SessionAffinityRouter
from services.config import AppConfig, DeploymentOptions
from services.drafter import DrafterReplica
from services.planner import PlannerReplica
from services.router import RouterReplica
from services.verifier import VerifierReplica

ROUTING_STATS_PERIOD_S = 1.0


def _options(
    options: DeploymentOptions, default_max_ongoing: int, ray_actor_options: dict[str, Any], access_log: bool = False
) -> dict[str, Any]:
    """Serve deployment options; per-step internal calls are not access-logged (a line per step)."""
    return {
        "num_replicas": options.num_replicas,
        "max_ongoing_requests": options.max_ongoing_requests or default_max_ongoing,
        "ray_actor_options": ray_actor_options,
        "health_check_period_s": options.health_check_period_s,
        "logging_config": LoggingConfig(enable_access_log=access_log),
    }


def _affinity() -> RequestRouterConfig:
    return RequestRouterConfig(
        request_router_class=SessionAffinityRouter,
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
    )


def build_app(config: AppConfig) -> Application:
    """The bound application for ``config`` (see the module docstring for the graph)."""
    sessions_cap = config.max_sessions_per_replica
    planner = serve.deployment(PlannerReplica, name="Planner").options(
        **_options(config.planner, 1024, config.planner.ray_actor_options.to_ray())
    ).bind(config)
    verifier = serve.deployment(VerifierReplica, name="Verifier").options(
        **_options(config.verifier_deployment, 4 * sessions_cap, config.pool_options("verifier")),
        request_router_config=_affinity(),
    ).bind(config, planner)
    drafter = serve.deployment(DrafterReplica, name="Drafter").options(
        **_options(config.drafter_deployment, 4 * sessions_cap, config.pool_options("drafter")),
        request_router_config=_affinity(),
    ).bind(config, planner)
    admission = config.admission
    router_max = admission.max_active_requests + admission.max_queued_requests + 16
    router = serve.deployment(RouterReplica, name="Router").options(
        **_options(config.router, router_max, config.router.ray_actor_options.to_ray(), access_log=True)
    )
    return router.bind(config, drafter, verifier, planner)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application-builder entry point: ``args`` are ``AppConfig`` keys (``config``: a YAML file)."""
    return build_app(AppConfig.from_args(args))
