"""Configuration of the CAST Serve application: pydantic models, one description per field.

``AppConfig`` is the single input of ``services.app.build_app``. It is built from
KubeRay/``serve run`` arguments (``AppConfig.from_args``), from a YAML file
(``AppConfig.from_yaml``) or in code (tests). Per-deployment options
(``DeploymentOptions``) carry replica counts and ``ray_actor_options`` so the
drafter and verifier pools can be placed and scaled independently; the pool
names (``drafter_pool`` / ``verifier_pool``) add a custom-resource requirement
or a label selector on top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from cast_core.cost import resolve_drafter_quantization, resolve_dtype_name
from cast_core.engine import DEFAULT_DRAFTER, DEFAULT_TARGET
from cast_core.models import AUTO_DTYPE, DTYPES, check_dtype_name
from cast_core.policy import CastConfig, StaticConfig
from cast_core.quantize import MIXED_DENSE_ROWS, Quantization, drafter_profile_name, resolve_quantization
from cast_core.vocab import DEFAULT_CORE_SIZE

PolicyName = Literal["none", "static", "cast"]


class ActorOptions(BaseModel):
    """Ray actor options of one deployment's replicas (the subset Serve accepts)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float | None = Field(None, ge=0, description="Logical CPUs each replica reserves; None = Serve's default.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs each replica reserves (fractions allowed); None = 0.")
    memory: float | None = Field(None, ge=0, description="Heap memory each replica reserves, in bytes; None = no reservation.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each replica requires, e.g. {'verifier_pool': 1}."
    )
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type the replica must run on, e.g. 'H100' or 'L4'; None = any."
    )
    label_selector: dict[str, str] | None = Field(
        None, description="Ray node labels the replica's node must carry, e.g. {'cast.io/pool': 'verifier_pool'}."
    )

    def to_ray(self) -> dict[str, Any]:
        """The ``ray_actor_options`` dict (unset options left out)."""
        options = self.model_dump(exclude_none=True)
        if not options.get("resources"):
            options.pop("resources", None)
        return options


class DeploymentOptions(BaseModel):
    """Scaling and placement of one deployment."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="Number of replicas.")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests a replica runs concurrently (Serve's default of 5 is far too low); None = a per-deployment default."
    )
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions, description="Ray actor options of each replica.")
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between Serve health checks of a replica.")


class BatchingConfig(BaseModel):
    """Dynamic batching of a model deployment's per-step calls (``services.batcher.StepBatcher``).

    A batch is formed once the replica's previous one is done, from every step
    waiting then; it runs as soon as every live session of the replica has sent
    its step (capped at ``max_batch_size``), or after waiting for the rest as
    long as a recent batch took, at most ``batch_wait_timeout_s``.
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, description="Most sessions stepped in one model forward.")
    batch_wait_timeout_s: float = Field(
        1.0, ge=0, description="Longest wait for the other live sessions' steps once the worker is free and a step waits, in seconds; the wait is the mean duration of the replica's recent batches (a step left out costs a batch of its own), at most this."
    )


class AdmissionConfig(BaseModel):
    """Back-pressure at the ingress: a bounded queue in front of a bounded set of running requests."""

    model_config = ConfigDict(extra="forbid")

    max_active_requests: int = Field(32, ge=1, description="Requests one router replica runs concurrently.")
    max_queued_requests: int = Field(
        64, ge=0, description="Requests one router replica holds waiting; beyond that it answers 429 / RESOURCE_EXHAUSTED."
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After (seconds) sent with an overload answer.")


class TelemetryConfig(BaseModel):
    """OpenTelemetry tracing of the router (Prometheus metrics are always on, through Ray)."""

    model_config = ConfigDict(extra="forbid")

    tracing_exporter: Literal["none", "console", "otlp", "memory"] = Field(
        "none",
        description="Span exporter: none, console (stdout of the router replica), otlp (needs "
        "opentelemetry-exporter-otlp) or memory (kept in the replica; read back by tests).",
    )
    otlp_endpoint: str | None = Field(None, description="OTLP/gRPC collector endpoint, e.g. http://otel:4317; None = the exporter's default.")
    service_name: str = Field("cast-serving", description="service.name resource attribute of the spans.")


class LimitsConfig(BaseModel):
    """Request-level limits checked at the ingress (HTTP and gRPC); beyond them a 400 / 413 / INVALID_ARGUMENT."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest HTTP request body in bytes; beyond it 413.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Most prompt tokens (after the chat template); None = the target's context window."
    )
    max_tokens: int | None = Field(None, ge=1, description="Largest max_tokens a request may ask for; None = the context window.")
    max_stop_sequences: int = Field(4, ge=0, description="Most stop strings in one request.")
    max_stop_length: int = Field(256, ge=1, description="Longest stop string, in characters.")
    max_messages: int = Field(256, ge=1, description="Most chat messages in one request.")


class SecurityConfig(BaseModel):
    """API keys, CORS and request ids of the ingress (see README "Security and limits")."""

    model_config = ConfigDict(extra="forbid")

    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Accepted API keys (HTTP 'Authorization: Bearer <key>', gRPC metadata 'authorization'); "
        "with the keys of api_keys_env; none at all = no authentication.",
    )
    api_keys_env: str = Field(
        "CAST_API_KEYS", description="Environment variable (read by the router replica) holding more API keys, comma-separated."
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS (e.g. https://app.example.com or '*'); empty = CORS off."
    )


class AppConfig(BaseModel):
    """Everything ``build_app`` needs: models, policy, pools, batching, admission, telemetry."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(DEFAULT_TARGET, description="Target (verifier) model: known name (fetched on first use) or local path.")
    drafter: str = Field(DEFAULT_DRAFTER, description="Drafter model: known name or local path; must share the target's tokenizer.")
    model_id: str | None = Field(None, description="Model id clients see in /v1/models and responses; None = the target's name.")
    policy: PolicyName = Field("cast", description="Tree policy: cast (cost-aware), static (EAGLE-2) or none (plain decoding).")
    dtype: str = Field(
        AUTO_DTYPE,
        description=f"Model dtype, one of {', '.join(DTYPES)}, or {AUTO_DTYPE}: each replica's native one, bfloat16 on GPUs "
        "and on CPUs with AVX-512 bf16 or AMX, else float32 (cast_core.cost.native_dtype).",
    )
    draft_vocab: int | None = Field(
        DEFAULT_CORE_SIZE,
        ge=1,
        description="Leading token ids the drafter scores, besides each session's own rarer context tokens "
        "(cast_core.vocab); None = the whole vocabulary. Fewer ids make drafted layers cheaper, never the output different.",
    )
    device: str = Field(
        "cpu",
        description="Torch device of the model replicas: cpu, or cuda (each GPU replica sees its own GPU as cuda:0; "
        "drafter and verifier replicas then reserve num_gpus=1 unless their ray_actor_options say otherwise).",
    )
    drafter_quantization: Quantization = Field(
        "auto",
        description="The drafter's linear layers: int8 (CPU only; cheaper drafts, the same output), mixed (int8, but "
        f"inputs of {MIXED_DENSE_ROWS}+ tokens through the layers' own weights: for CPUs with bf16 matrix units), none, or auto = on a "
        "CPU the first of mixed, int8, none whose cost profile was measured there, int8 where none was "
        "(cast_core.quantize). A quantized drafter's cost profile is named <drafter>+int8 / <drafter>+mixed.",
    )
    cast: CastConfig = Field(default_factory=CastConfig, description="CAST thresholds and bounds.")
    static: StaticConfig = Field(default_factory=StaticConfig, description="Fixed tree shape of the static policy.")
    cost_profile: str | None = Field(
        None,
        description="Cost profile JSON used for every device kind; None = look one up per device kind "
        "(find_profile), synthetic fallback with a warning.",
    )
    drafter_pool: str | None = Field(
        None, description="Ray custom resource (or label value) that marks the drafter GPU pool's nodes; None = anywhere."
    )
    verifier_pool: str | None = Field(
        None, description="Ray custom resource (or label value) that marks the verifier GPU pool's nodes; None = anywhere."
    )
    pool_selector: Literal["resources", "labels"] = Field(
        "resources",
        description="How a pool pins replicas: 'resources' requires pool_resource_per_replica of the pool's custom "
        "resource; 'labels' adds a label selector {pool_label_key: pool}.",
    )
    pool_resource_per_replica: float = Field(
        0.01, gt=0, description="Amount of the pool resource a replica requires (small: the pool is a placement constraint, num_gpus limits packing)."
    )
    pool_label_key: str = Field("cast.io/pool", description="Node label key used when pool_selector is 'labels'.")
    router: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(ray_actor_options=ActorOptions(num_cpus=0)),
        description="Router (ingress) deployment options.",
    )
    planner: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(ray_actor_options=ActorOptions(num_cpus=0)),
        description="Planner deployment options (keep one replica: it is the cluster view).",
    )
    drafter_deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(ray_actor_options=ActorOptions(num_cpus=1)),
        description="Drafter deployment options (the drafter GPU pool).",
    )
    verifier_deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(ray_actor_options=ActorOptions(num_cpus=1)),
        description="Verifier deployment options (the verifier GPU pool).",
    )
    drafter_batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Batching of draft steps.")
    verifier_batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Batching of verify steps.")
    max_sessions_per_replica: int = Field(64, ge=1, description="Live sessions (KV rows) a drafter or verifier replica holds at most.")
    session_idle_timeout_s: float = Field(
        300.0, gt=0, description="A session with no step for this long is evicted (its KV freed); the router re-opens it if it comes back."
    )
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig, description="Ingress back-pressure.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that sets none (clamped to the context window).")
    default_temperature: float = Field(0.0, ge=0, description="Temperature of a request that sets none (0 = greedy).")
    torch_threads: int | None = Field(
        None, ge=1, description="torch.set_num_threads in the model replicas; None = Ray's default (the replica's num_cpus)."
    )
    plan_refresh_s: float = Field(
        0.1, gt=0, description="A drafter reuses a planner answer this long, refreshing it in the background (no per-step round trip)."
    )
    occupancy_report_s: float = Field(0.05, gt=0, description="How often a verifier reports its occupancy to the planner, in seconds.")
    max_reopens: int = Field(3, ge=0, description="Times in a row (no step in between) a request may re-open its sessions after a replica lost them.")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Tracing exporter.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request-level limits.")
    security: SecurityConfig = Field(default_factory=SecurityConfig, description="API keys and CORS.")

    @model_validator(mode="after")
    def _check(self) -> "AppConfig":
        check_dtype_name(self.dtype)
        resolve_quantization(self.drafter_quantization, self.device)
        if self.planner.num_replicas != 1:
            raise ValueError("planner.num_replicas: the planner is the single cluster view; use 1")
        return self

    @property
    def served_model_id(self) -> str:
        """Model id shown to clients."""
        return self.model_id or Path(self.target).name

    def dtype_on(self, device: str) -> str:
        """The models' dtype on ``device``, a device kind: ``dtype``, with ``auto`` resolved (``cast_core.cost.resolve_dtype_name``)."""
        return resolve_dtype_name(self.dtype, device)

    def drafter_quantization_on(self, device: str) -> str:
        """The drafter's quantization on ``device``, a device kind (``cast_core.cost.resolve_drafter_quantization``)."""
        target, drafter = Path(self.target).name, Path(self.drafter).name
        return resolve_drafter_quantization(self.drafter_quantization, device, target, drafter, self.dtype_on(device))

    def drafter_profile_key(self, device: str) -> str:
        """The drafter's name in the cost profiles of ``device``, a device kind: with its quantization there."""
        return drafter_profile_name(Path(self.drafter).name, self.drafter_quantization_on(device))

    def pool_options(self, role: Literal["drafter", "verifier"]) -> dict[str, Any]:
        """``ray_actor_options`` of the drafter or verifier deployment, pool placement included."""
        deployment = self.drafter_deployment if role == "drafter" else self.verifier_deployment
        options = deployment.ray_actor_options.model_copy(deep=True)
        if self.device.startswith("cuda") and options.num_gpus is None:
            options.num_gpus = 1
        pool = self.drafter_pool if role == "drafter" else self.verifier_pool
        if pool:
            if self.pool_selector == "resources":
                options.resources = {**options.resources, pool: self.pool_resource_per_replica}
            else:
                options.label_selector = {**(options.label_selector or {}), self.pool_label_key: pool}
        return options.to_ray()

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "AppConfig":
        """Config from builder arguments (``serve run`` / KubeRay ``args``).

        ``config`` (optional) names a YAML file loaded first; the other keys override it.
        """
        args = dict(args or {})
        path = args.pop("config", None)
        base = cls.from_yaml(path).model_dump(exclude_unset=True) if path else {}
        return cls.model_validate({**base, **args})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "AppConfig":
        """Config from a YAML file with ``AppConfig``'s keys."""
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return cls.model_validate(data)
