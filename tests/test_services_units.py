"""Service pieces in process, without a Ray cluster: config, admission, planner math, request models, tracing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from cast_core.cost import CostProfile
from cast_core.policy import CastPolicy
from cast_core.sampling import SamplingParams
from services.admission import Admission
from services.config import AdmissionConfig, AppConfig, BatchingConfig, DeploymentOptions, TelemetryConfig
from services.drafter import context_bucket
from services.errors import Overloaded
from services.generation import GenerationParams, SpecStats, validation_error
from services.messages import StepOutput
from services.openai_api import ChatCompletionRequest, CompletionRequest
from services.planner import PlannerReplica
from services.telemetry import Tracing


def _described(model: type) -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        if not field.description:
            missing.append(f"{model.__name__}.{name}")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, AppConfig.__mro__[1]) and annotation is not model:
            missing += _described(annotation)
    return missing


def test_every_config_field_is_described() -> None:
    for model in (AppConfig, DeploymentOptions, BatchingConfig, AdmissionConfig, TelemetryConfig):
        assert _described(model) == []


def test_pool_options_pin_replicas() -> None:
    config = AppConfig(drafter_pool="drafter_pool", verifier_pool="verifier_pool")
    assert config.pool_options("drafter") == {"num_cpus": 1, "resources": {"drafter_pool": 0.01}}
    assert config.pool_options("verifier")["resources"] == {"verifier_pool": 0.01}
    labels = AppConfig(verifier_pool="verifier_pool", pool_selector="labels")
    assert labels.pool_options("verifier") == {"num_cpus": 1, "label_selector": {"cast.io/pool": "verifier_pool"}}
    assert AppConfig().pool_options("drafter") == {"num_cpus": 1}
    gpu = AppConfig.model_validate({"verifier_deployment": {"ray_actor_options": {"num_gpus": 0.5, "accelerator_type": "H100"}}})
    assert gpu.pool_options("verifier") == {"num_gpus": 0.5, "accelerator_type": "H100"}
    cuda = AppConfig(device="cuda", verifier_pool="vp")
    assert cuda.pool_options("verifier") == {"num_cpus": 1, "num_gpus": 1, "resources": {"vp": 0.01}}


def test_config_from_yaml_and_args(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump({"policy": "static", "verifier_deployment": {"num_replicas": 3}, "static": {"depth": 4}}))
    config = AppConfig.from_yaml(path)
    assert config.policy == "static" and config.verifier_deployment.num_replicas == 3 and config.static.depth == 4
    merged = AppConfig.from_args({"config": str(path), "target": "t", "drafter": "d"})
    assert merged.policy == "static" and merged.target == "t" and merged.served_model_id == "t"
    k8s = AppConfig.from_args({"target": "a", "drafter": "b", "policy": "cast", "drafter_pool": "dp", "verifier_pool": "vp"})
    assert k8s.drafter_pool == "dp"
    with pytest.raises(ValidationError, match="policy"):
        AppConfig(policy="greedy")
    with pytest.raises(ValidationError, match="dtype"):
        AppConfig(dtype="int3")
    auto = AppConfig()
    assert auto.dtype == "auto" and auto.dtype_on("cpu-2core-Xeon-avx512") == "float32" and auto.dtype_on("cpu-2core-Xeon-amx") == "bfloat16"
    assert AppConfig(dtype="float16").dtype_on("cpu-2core-Xeon-amx") == "float16"
    assert AppConfig.from_args({"draft_vocab": "16384"}).draft_vocab == 16384
    with pytest.raises(ValidationError, match="draft_vocab"):
        AppConfig(draft_vocab=0)
    with pytest.raises(ValidationError, match="planner.num_replicas"):
        AppConfig.model_validate({"planner": {"num_replicas": 2}})


def test_app_builder_binds_four_deployments() -> None:
    from services.app import app_builder

    app = app_builder({"target": "t", "drafter": "d", "policy": "cast", "drafter_pool": "dp", "verifier_pool": "vp"})
    deployments, stack = {}, [app._bound_deployment]
    while stack:
        deployment = stack.pop()
        deployments[deployment.name] = deployment
        stack += [a._bound_deployment for a in deployment.init_args if hasattr(a, "_bound_deployment")]
    assert set(deployments) == {"Router", "Drafter", "Verifier", "Planner"}
    assert deployments["Drafter"].ray_actor_options["resources"] == {"dp": 0.01}
    assert deployments["Verifier"].ray_actor_options["resources"] == {"vp": 0.01}
    assert deployments["Verifier"].max_ongoing_requests >= deployments["Verifier"].num_replicas


def test_admission_bounds_running_and_queued() -> None:
    async def main() -> None:
        admission = Admission(AdmissionConfig(max_active_requests=2, max_queued_requests=1, retry_after_s=3))
        await admission.acquire()
        await admission.acquire()
        waiter = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        assert admission.active == 2 and admission.waiting == 1
        with pytest.raises(Overloaded) as err:
            await admission.acquire()
        assert err.value.retry_after_s == 3 and err.value.http_status == 429 and err.value.grpc_code == "RESOURCE_EXHAUSTED"
        admission.release()
        await waiter
        assert admission.active == 2 and admission.waiting == 0
        admission.release()
        admission.release()
        assert admission.active == 0

    asyncio.run(main())


def _planner(tmp_path: Path) -> PlannerReplica:
    profile = CostProfile.synthetic(0.01, 0.002, 0.003, 0.0002).save(tmp_path / "p.json")
    return PlannerReplica(AppConfig(cost_profile=str(profile)))


def test_planner_reads_target_costs_at_the_replicas_occupancy(tmp_path: Path) -> None:
    planner = _planner(tmp_path)
    planner.report("v1", "cpu", 1, 1)
    planner.report("v2", "cpu", 6, 6)
    lone, busy = planner.plan("v1", "cpu", 1, 128), planner.plan("v2", "cpu", 1, 128)
    assert lone.batch_size == 1 and busy.batch_size == 6
    assert lone.target[1] == pytest.approx(1.0) and busy.target[1] == pytest.approx(1.0)
    # f = base + p * B * n: the marginal node costs more, relative to a decode step, at larger B
    assert busy.target[10] > lone.target[10]
    np.testing.assert_allclose(lone.target[5], (0.01 + 0.002 * 5) / (0.01 + 0.002))
    policy = CastPolicy()
    confidences = np.linspace(0.9, 0.05, 40)[None, :]
    assert policy.verify_count(confidences, busy) < policy.verify_count(confidences, lone)
    # an unknown replica is planned as the busiest live one; with none live, at B = 1
    assert planner.plan("gone", "cpu", 1, 128).batch_size == 6
    assert set(planner.cluster()) == {"v1", "v2"}
    assert _planner(tmp_path).plan(None, "cpu", 1, 128).batch_size == 1


def test_generation_params_and_stats() -> None:
    with pytest.raises(ValidationError) as err:
        GenerationParams(top_p=0)
    assert validation_error(err.value).param == "top_p"
    stats = SpecStats()
    stats.add(StepOutput([1, 2, 3], 2, 6, 12, 0.01, 0.02, 2, 2, 2))
    stats.add(StepOutput([4], 0, 4, 8, 0.01, 0.02, 2, 2, 2))
    assert stats.as_dict() == {
        "steps": 2, "mean_accepted_length": 2.0, "draft_tokens": 20, "accepted_tokens": 2,
        "mean_tree_nodes": 10.0, "mean_verified_tokens": 5.0, "reopens": 0,
    }  # fmt: skip


def test_openai_request_models() -> None:
    request = CompletionRequest(prompt="hi", stop="x", stream=True, stream_options={"include_usage": True}, presence_penalty=0)
    params = request.generation_params()
    assert params.stop == ["x"] and request.include_usage
    with pytest.raises(ValidationError, match="n"):
        CompletionRequest(prompt="hi", n=2)
    with pytest.raises(ValidationError, match="echo"):
        CompletionRequest(prompt="hi", echo=True)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_completion_tokens=7)
    assert chat.chat_params().max_tokens == 7
    with pytest.raises(ValidationError, match="role"):
        ChatCompletionRequest(messages=[{"role": "robot", "content": "x"}])


def test_context_bucket() -> None:
    assert [context_bucket(n) for n in (1, 64, 65, 500, 513)] == [64, 64, 128, 512, 1024]


def test_memory_tracing_keeps_spans_and_otlp_needs_its_package() -> None:
    tracing = Tracing(TelemetryConfig(tracing_exporter="memory"))
    span = tracing.tracer.start_span("cast.request")
    span.end()
    assert [s.name for s in tracing.finished_spans()] == ["cast.request"]
    assert Tracing(TelemetryConfig()).finished_spans() == []
    try:
        import opentelemetry.exporter.otlp  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="opentelemetry-exporter-otlp"):
            Tracing(TelemetryConfig(tracing_exporter="otlp"))


def test_error_bodies_and_status_codes() -> None:
    from services.errors import InvalidRequest, Unavailable
    from services.router import error_response

    overloaded = error_response(Overloaded(3))
    assert overloaded.status_code == 429 and overloaded.headers["retry-after"] == "3"
    assert json.loads(overloaded.body)["error"]["type"] == "rate_limit_error"
    invalid = error_response(InvalidRequest("max_tokens: must be >= 1", "max_tokens"))
    assert invalid.status_code == 400 and json.loads(invalid.body)["error"]["param"] == "max_tokens"
    assert error_response(Unavailable("no replica")).status_code == 503


@pytest.fixture
def outside_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a replica class be constructed in this process (no Serve replica context, no Ray)."""
    from types import SimpleNamespace

    import services.replica as replica

    monkeypatch.setattr(replica.serve, "get_replica_context", lambda: SimpleNamespace(replica_id=SimpleNamespace(unique_id="r0")))
    monkeypatch.setattr(replica.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "n0"))


def test_replicas_fail_health_checks_with_the_load_error(tmp_path: Path, outside_serve: None) -> None:
    import torch

    from conftest import tiny_tokenizer
    from serve_utils import save_tiny_models
    from services.drafter import DrafterReplica
    from services.verifier import VerifierReplica

    target, drafter = save_tiny_models(tmp_path)
    tiny_tokenizer(vocab_size=100).save_pretrained(drafter)  # the drafter no longer shares the target's tokenizer

    async def construct(cls, config: AppConfig):  # as Ray does for an ``async def __init__``
        replica = cls.__new__(cls)
        await replica.__init__(config, planner=None)
        return replica

    async def main() -> None:
        replica = await construct(VerifierReplica, AppConfig(target=str(target), drafter=str(drafter), dtype="float32"))
        with pytest.raises(RuntimeError, match="verifier replica failed to load its model: ValueError: drafter tokenizer does not match"):
            await replica.check_health()
        with pytest.raises(RuntimeError, match="tokenizer"):
            await replica.open("s", [5, 6], SamplingParams())
        # a drafter replica needs only its own model: no target files at all
        alone = await construct(DrafterReplica, AppConfig(target=str(tmp_path / "nowhere"), drafter=str(drafter), dtype="float32"))
        await alone.check_health()
        await alone.open("s", [5, 6])
        assert alone.occupancy == 1
        missing = await construct(VerifierReplica, AppConfig(target=str(tmp_path / "nowhere"), dtype="float32"))
        with pytest.raises(RuntimeError, match="verifier replica failed to load its model"):
            await missing.check_health()

    threads = torch.get_num_threads()
    asyncio.run(main())
    torch.set_num_threads(threads)
