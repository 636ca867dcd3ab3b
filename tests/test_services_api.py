"""The whole app on real Ray Serve (loopback): HTTP and gRPC outputs equal the in-process engine.

One Ray instance and one Serve app for the module (tiny fp32 models on disk,
one replica per deployment). Besides output equality: concurrent streams,
errors, freed session state, the object-ref path of the draft tree, re-opening
a lost session, spans and Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from cast_core.engine import Engine
from conftest import random_prompts
from serve_utils import free_port, reference_engine, save_tiny_models, served_app, tiny_config

pytestmark = [pytest.mark.serve, pytest.mark.timeout(420)]

NEW = 24


@dataclass
class Served:
    http: str
    grpc_target: str
    metrics_port: int
    engine: Engine
    target: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    target, drafter = save_tiny_models(tmp_path_factory.mktemp("models"))
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    metrics_port = free_port()
    with served_app(tiny_config(target, drafter, default_max_tokens=NEW), _metrics_export_port=metrics_port) as (http_port, grpc_port):
        yield Served(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", metrics_port, reference_engine(target, drafter), target)


def handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, app_name="cast")


def replica_states(name: str) -> list[dict[str, Any]]:
    return handle(name).broadcast("debug_state").results()


def live_sessions(name: str) -> list[str]:
    return [sid for state in replica_states(name) for sid in state["sessions"]]


def wait_no_sessions(timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not live_sessions("Verifier") and not live_sessions("Drafter"):
            return
        time.sleep(0.2)
    raise AssertionError(f"sessions still open: verifier {live_sessions('Verifier')}, drafter {live_sessions('Drafter')}")


def sse_events(lines: list[str]) -> list[Any]:
    """Parse ``data:`` lines; ``[DONE]`` stays a string."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream_completion(base: str, body: dict[str, Any], path: str = "/v1/completions") -> list[Any]:
    with httpx.stream("POST", base + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(list(r.iter_lines()))


# --- HTTP -----------------------------------------------------------------------------------


def test_completions_match_engine(served: Served) -> None:
    prompts = random_prompts(3, seed=11)
    expected = served.engine.generate(prompts, max_new_tokens=NEW)
    for prompt, gen in zip(prompts, expected):
        r = httpx.post(served.http + "/v1/completions", json={"prompt": prompt, "max_tokens": NEW}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == "tiny-target"
        assert body["choices"][0]["text"] == gen.text
        assert body["choices"][0]["finish_reason"] == gen.finish_reason
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(gen.token_ids), "total_tokens": len(prompt) + len(gen.token_ids)}
        stats = body["cast"]
        assert stats["steps"] >= 1 and stats["mean_accepted_length"] >= 1.0 and stats["draft_tokens"] > 0
        assert stats["mean_verified_tokens"] >= 1.0 and stats["reopens"] == 0


def test_text_prompt_and_stop_string(served: Served) -> None:
    prompt = "t5 t7 t9 t11 t13"
    gen = served.engine.generate([prompt], max_new_tokens=NEW)[0]
    r = httpx.post(served.http + "/v1/completions", json={"prompt": prompt, "max_tokens": NEW}, timeout=120)
    assert r.json()["choices"][0]["text"] == gen.text
    stop = gen.text.split()[3]
    cut = served.engine.generate([prompt], max_new_tokens=NEW, stop=[stop])[0]
    r = httpx.post(served.http + "/v1/completions", json={"prompt": prompt, "max_tokens": NEW, "stop": stop}, timeout=120)
    assert r.json()["choices"][0]["text"] == cut.text and r.json()["choices"][0]["finish_reason"] == "stop"


def test_streaming_completions_match_engine(served: Served) -> None:
    prompts = random_prompts(2, seed=12)
    expected = served.engine.generate(prompts, max_new_tokens=NEW)
    for prompt, gen in zip(prompts, expected):
        events = stream_completion(served.http, {"prompt": prompt, "max_tokens": NEW, "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == gen.text
        finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == gen.finish_reason
        assert finals[0]["cast"]["steps"] >= 1
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(gen.token_ids)


def test_chat_completions_match_engine(served: Served) -> None:
    messages = [{"role": "system", "content": "t9 t10"}, {"role": "user", "content": "t40 t41 t42"}]
    gen = served.engine.generate([served.engine.chat_prompt(messages)], max_new_tokens=NEW)[0]
    r = httpx.post(served.http + "/v1/chat/completions", json={"messages": messages, "max_completion_tokens": NEW}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": gen.text}
    events = stream_completion(served.http, {"messages": messages, "max_tokens": NEW}, "/v1/chat/completions")
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks) == gen.text
    assert chunks[-1]["choices"][0]["finish_reason"] == gen.finish_reason and "cast" in chunks[-1]


def test_eight_concurrent_streams(served: Served) -> None:
    prompts = random_prompts(8, seed=13)
    expected = [g.text for g in served.engine.generate(prompts, max_new_tokens=NEW)]

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> str:
        text = ""
        async with client.stream("POST", served.http + "/v1/completions", json={"prompt": prompt, "max_tokens": NEW, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    text += chunk["choices"][0]["text"] if chunk["choices"] else ""
        return text

    async def main() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    before = replica_states("Verifier")[0]["timings"]
    assert asyncio.run(main()) == expected
    wait_no_sessions()
    after = replica_states("Verifier")[0]["timings"]
    per_forward = (after["calls"] - before["calls"]) / (after["forwards"] - before["forwards"])
    print(f"sessions per verifier forward: {per_forward:.2f}")
    assert per_forward >= 2, "concurrent sessions' steps share the verifier's forwards"


def test_models_and_health(served: Served) -> None:
    models = httpx.get(served.http + "/v1/models", timeout=30).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-target"
    assert models["data"][0]["max_context_tokens"] == 512
    deadline = time.monotonic() + 10
    while (r := httpx.get(served.http + "/health", timeout=30)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": "t5", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "t5", "temperature": -1}, "temperature"),
        ({"prompt": "t5", "top_p": 1.5}, "top_p"),
        ({"prompt": "t5", "n": 2}, "n"),
        ({"prompt": "", "max_tokens": 4}, "prompt"),
        ({"prompt": [5, 999]}, "prompt"),
        ({"prompt": [5], "max_tokens": 600}, "max_tokens"),
        ({"prompt": "t5", "model": "gpt-4"}, "model"),
        ({"prompt": "t5", "policy": "static"}, "policy"),
    ],
)
def test_bad_completion_requests_are_400(served: Served, body: dict[str, Any], param: str) -> None:
    r = httpx.post(served.http + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]


def test_bad_json_and_chat_then_still_serving(served: Served) -> None:
    r = httpx.post(served.http + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(served.http + "/v1/chat/completions", json={"messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(served.http + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(served.http + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_policy_none_per_request(served: Served) -> None:
    prompt = random_prompts(1, seed=14)[0]
    gen = served.engine.generate([prompt], max_new_tokens=NEW)[0]
    r = httpx.post(served.http + "/v1/completions", json={"prompt": prompt, "max_tokens": NEW, "policy": "none"}, timeout=120)
    body = r.json()
    assert body["choices"][0]["text"] == gen.text
    assert body["cast"]["draft_tokens"] == 0 and body["cast"]["mean_verified_tokens"] == 1.0


# --- gRPC -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(served: Served):
    from services.grpc_api import cast_pb2_grpc

    with grpc.insecure_channel(served.grpc_target) as channel:
        yield cast_pb2_grpc.CastStub(channel)


def test_grpc_generate_and_stream_match_engine(served: Served, stub) -> None:
    from services.grpc_api import cast_pb2

    prompts = ["t5 t7 t9 t11", "t20 t21 t60 t33 t8"]
    expected = served.engine.generate(prompts, max_new_tokens=NEW)
    for prompt, gen in zip(prompts, expected):
        reply = stub.Generate(cast_pb2.GenerateRequest(prompt=prompt, max_tokens=NEW, request_id="r1"), timeout=120)
        assert reply.text == gen.text and list(reply.token_ids) == gen.token_ids
        assert reply.request_id == "r1" and reply.model == "tiny-target"
        assert reply.usage.completion_tokens == len(gen.token_ids) and reply.spec.steps >= 1
        finish = {"stop": cast_pb2.FINISH_REASON_STOP, "length": cast_pb2.FINISH_REASON_LENGTH}[gen.finish_reason]
        assert reply.finish_reason == finish
        chunks = list(stub.GenerateStream(cast_pb2.GenerateRequest(prompt=prompt, max_tokens=NEW), timeout=120))
        assert "".join(c.text for c in chunks) == gen.text
        assert [t for c in chunks for t in c.token_ids] == gen.token_ids
        assert chunks[-1].finish_reason == finish and chunks[-1].spec.steps >= len(chunks)
        assert all(c.finish_reason == cast_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


def test_grpc_chat_health_models(served: Served, stub) -> None:
    from services.grpc_api import cast_pb2

    messages = [{"role": "user", "content": "t40 t41 t42"}]
    gen = served.engine.generate([served.engine.chat_prompt(messages)], max_new_tokens=NEW)[0]
    request = cast_pb2.GenerateRequest(messages=cast_pb2.ChatMessages(messages=[cast_pb2.ChatMessage(**m) for m in messages]), max_tokens=NEW)
    assert stub.Generate(request, timeout=120).text == gen.text
    assert stub.Health(cast_pb2.HealthRequest(), timeout=30).status == cast_pb2.HealthResponse.SERVING_STATUS_SERVING
    (model,) = stub.ListModels(cast_pb2.ListModelsRequest(), timeout=30).models
    assert model.id == "tiny-target" and model.max_context_tokens == 512


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({}, "input"),
        ({"prompt": "t5", "temperature": -1.0}, "temperature"),
        ({"prompt": "t5", "top_p": 2.0}, "top_p"),
        ({"prompt": "t5", "model": "other"}, "model"),
        ({"prompt": "t5", "policy": "bogus"}, "policy"),
        ({"prompt": "t5", "max_tokens": 100000}, "max_tokens"),
    ],
)
def test_grpc_invalid_argument(served: Served, stub, fields: dict[str, Any], needle: str) -> None:
    from services.grpc_api import cast_pb2

    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(cast_pb2.GenerateRequest(**fields), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details()
    assert stub.Generate(cast_pb2.GenerateRequest(prompt="t5 t6", max_tokens=3), timeout=60).usage.completion_tokens >= 1


# --- state, object refs, re-open, telemetry ---------------------------------------------------


def test_draft_tree_never_deserialised_in_router(served: Served) -> None:
    httpx.post(served.http + "/v1/completions", json={"prompt": [5, 6, 7, 8], "max_tokens": 8}, timeout=60)
    router = handle("Router").debug_state.remote().result()
    (verifier,) = replica_states("Verifier")
    (drafter,) = replica_states("Drafter")
    assert router["tree_unpickles"] == 0
    assert drafter["tree_unpickles"] == 0
    assert verifier["tree_unpickles"] > 0


def request_status(request_id: str) -> str:
    """``cast.status`` of the finished ``cast.request`` span with this request id."""
    spans = handle("Router").debug_state.remote().result()["spans"]
    (request,) = [s for s in spans if s["name"] == "cast.request" and s["attributes"]["cast.request_id"] == request_id]
    return request["attributes"]["cast.status"]


def test_sessions_freed_after_finish_and_cancel(served: Served) -> None:
    httpx.post(served.http + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 8}, timeout=60)
    wait_no_sessions()
    prompt = random_prompts(1, seed=15)[0]
    body = {"prompt": prompt, "max_tokens": 400, "stream": True}
    statuses = []
    # A loaded machine can deliver the first chunk after the whole generation ran: try until
    # the disconnect lands mid-generation (a few seconds of decoding on the tiny pair).
    for attempt in range(3):
        request_id = f"disconnect-after-first-chunk-{attempt}"
        with httpx.stream("POST", served.http + "/v1/completions", json=body, headers={"x-request-id": request_id}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        wait_no_sessions()
        statuses.append(request_status(request_id))
        if statuses[-1] == "cancelled":
            break
    assert statuses[-1] == "cancelled", statuses


def test_grpc_cancel_frees_sessions(served: Served, stub) -> None:
    from services.grpc_api import cast_pb2

    statuses = []
    for attempt in range(3):  # until the cancel lands mid-generation (see the HTTP test above)
        request_id = f"grpc-cancel-after-first-chunk-{attempt}"
        call = stub.GenerateStream(cast_pb2.GenerateRequest(prompt="t5 t7 t9 t11", max_tokens=400, request_id=request_id), timeout=120)
        next(call)
        call.cancel()
        wait_no_sessions()
        statuses.append(request_status(request_id))
        if statuses[-1] == "cancelled":
            break
    assert statuses[-1] == "cancelled", statuses


def long_prompt(engine: Engine, min_tokens: int) -> tuple[list[int], str]:
    for seed in range(100, 120):
        prompt = random_prompts(1, seed=seed)[0]
        gen = engine.generate([prompt], max_new_tokens=min_tokens)[0]
        if len(gen.token_ids) == min_tokens:
            return prompt, gen.text
    raise AssertionError("no prompt runs to max tokens")


def test_lost_session_is_reopened_without_losing_tokens(served: Served) -> None:
    prompt, expected = long_prompt(served.engine, 300)
    text, dropped, final = "", [], None
    with httpx.stream("POST", served.http + "/v1/completions", json={"prompt": prompt, "max_tokens": 300, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            text += chunk["choices"][0]["text"]
            if not dropped:
                dropped = [sid for sids in handle("Verifier").broadcast("debug_drop_sessions").results() for sid in sids]
            if chunk["choices"][0]["finish_reason"]:
                final = chunk
    assert dropped, "the request finished before its session could be dropped"
    assert text == expected
    assert final is not None and final["cast"]["reopens"] >= 1
    wait_no_sessions()


def test_spans_per_request_and_step(served: Served) -> None:
    httpx.post(served.http + "/v1/completions", json={"prompt": [9, 10, 11], "max_tokens": 6}, timeout=60)
    spans = handle("Router").debug_state.remote().result()["spans"]
    requests = [s for s in spans if s["name"] == "cast.request"]
    steps = [s for s in spans if s["name"] == "cast.step"]
    assert requests and steps
    last = requests[-1]
    assert last["attributes"]["cast.status"] == "ok" and last["attributes"]["cast.completion_tokens"] >= 1
    children = [s for s in steps if s["parent"] == last["span_id"]]
    assert len(children) == last["attributes"]["cast.steps"]


def test_prometheus_metrics(served: Served) -> None:
    httpx.post(served.http + "/v1/completions", json={"prompt": [9, 10, 12], "max_tokens": 6}, timeout=60)
    wanted = [
        "ray_cast_spec_num_drafts_total",
        "ray_cast_spec_num_draft_tokens_total",
        "ray_cast_spec_num_accepted_tokens_total",
        "ray_cast_spec_acceptance_length_bucket",
        "ray_cast_spec_tree_nodes_bucket",
        'ray_cast_step_latency_seconds_bucket{phase="transfer"',
        "ray_cast_verifier_occupancy",
        "ray_cast_requests_total",
    ]
    deadline, missing = time.monotonic() + 30, wanted
    while missing and time.monotonic() < deadline:
        time.sleep(1)
        text = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10).text
        missing = [w for w in wanted if w.split("{")[0] not in text or ("{" in w and 'phase="transfer"' not in text)]
    assert not missing, missing
