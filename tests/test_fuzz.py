"""Property-based fuzzing (hypothesis) of the served app's HTTP and gRPC request paths.

One app for the module (tiny fp32 models, one replica per deployment,
``limits.max_tokens`` small so valid requests finish fast). Generated inputs:
JSON bodies with every known field at random types and values (plausible and
arbitrary: nested containers, huge and empty strings, NaN / inf, out-of-range
integers), unknown fields, raw bytes and invalid UTF-8, wrong content types;
gRPC requests with random field values and raw undecodable bytes.

Properties: never a 5xx, every 4xx body is an OpenAI-style JSON error, every
200 a complete response; never gRPC INTERNAL / UNKNOWN. Afterwards: no replica
restarted (same replica actors, all RUNNING), no session left on a drafter or
verifier, and a normal request still returns the in-process engine's output.
The number of inputs tried is printed (``-s``) at the end of the module.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cast_core.engine import Engine
from serve_utils import reference_engine, save_tiny_models, served_app, tiny_config

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

MAX_TOKENS = 6
EXAMPLES = int(os.environ.get("CAST_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
TRIED: Counter[str] = Counter()  # inputs per endpoint
OUTCOMES: Counter[str] = Counter()  # answers per status


@dataclass
class Served:
    http: httpx.Client
    grpc_target: str
    engine: Engine
    replicas: set[str]


def serve_replicas() -> set[str]:
    """Names of the live Serve replica actors (a restarted replica comes back under a new name)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA")}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    target, drafter = save_tiny_models(tmp_path_factory.mktemp("models"))
    config = tiny_config(target, drafter, default_max_tokens=MAX_TOKENS, limits={"max_tokens": MAX_TOKENS, "max_body_bytes": 16384})
    with served_app(config) as (http_port, grpc_port):
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=120) as client:
            yield Served(client, f"127.0.0.1:{grpc_port}", reference_engine(target, drafter), serve_replicas())


@pytest.fixture(scope="module")
def stub(served: Served) -> Iterator[Any]:
    from services.grpc_api import cast_pb2_grpc

    with grpc.insecure_channel(served.grpc_target) as channel:
        yield cast_pb2_grpc.CastStub(channel)


# --- strategies -------------------------------------------------------------------------------

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["", "t5 t6", "x" * 5000, "\u00e9\u4e2d\U0001f600", "null", "{}"])
)
anything = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def field(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values of a field, sometimes anything at all."""
    return st.one_of(plausible, plausible, anything)


SAMPLING = {
    "model": field(st.sampled_from(["tiny-target", "gpt-4", ""])),
    "max_tokens": field(st.integers(-2, MAX_TOKENS + 2)),
    "temperature": field(st.floats(-1, 3) | st.sampled_from([0, math.nan, math.inf])),
    "top_p": field(st.floats(-0.5, 1.5)),
    "top_k": field(st.integers(-1, 600)),
    "seed": field(st.integers(-(2**65), 2**65)),
    "stop": field(st.text(max_size=5) | st.lists(st.text(max_size=300), max_size=6)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "n": field(st.integers(0, 3)),
    "policy": field(st.sampled_from(["cast", "none", "static", "greedy"])),
    "user": field(st.text(max_size=300)),
    "presence_penalty": field(st.sampled_from([0, 0.5])),
    "logit_bias": field(st.sampled_from([{}, {"5": 1.0}])),
}
PROMPT = field(st.text(max_size=40) | st.lists(st.integers(-5, 600), max_size=24) | st.sampled_from(["t5 t6 t7", [5, 6, 7]]))
MESSAGE = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["system", "user", "assistant", "robot"])), "content": field(st.text(max_size=40))},
    optional={"name": field(st.text(max_size=80)), "junk": anything},
)
EXTRA = st.dictionaries(st.text(min_size=1, max_size=10), anything, max_size=2)


VALID_OPTIONS = {
    "max_tokens": st.integers(1, MAX_TOKENS),
    "temperature": st.sampled_from([0, 0.7, 1.5]),
    "top_p": st.floats(0.1, 1),
    "top_k": st.integers(0, 50),
    "seed": st.integers(0, 2**32),
    "stop": st.lists(st.sampled_from(["t5", "t9", "\n"]), max_size=2),
    "stream": st.booleans(),
    "stream_options": st.just({"include_usage": True}),
    "policy": st.just("none"),
}
VALID_PROMPT = st.lists(st.integers(5, 200), min_size=1, max_size=16) | st.sampled_from(["t5 t6 t7", "t40 t41"])
VALID_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]), "content": st.sampled_from(["t5 t6", "t9"])}), min_size=1, max_size=3)


def bodies(required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]], valid: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    """Request bodies: valid ones, JSON objects of the endpoint's fields at random values (plus unknown ones), arbitrary bytes."""
    objects = st.builds(lambda known, extra: {**extra, **known}, st.fixed_dictionaries({}, optional={**required, **optional}), st.one_of(st.just({}), st.just({}), EXTRA))
    as_json = objects.map(lambda body: json.dumps(body).encode())
    valid_json = st.fixed_dictionaries(valid, optional=VALID_OPTIONS).map(lambda body: json.dumps(body).encode())
    broken_utf8 = objects.map(lambda body: json.dumps(body).encode().replace(b'"', b'"\xff', 1))
    return st.one_of(valid_json, as_json, as_json, anything.map(lambda v: json.dumps(v).encode()), broken_utf8, st.binary(max_size=64))


COMPLETION = bodies({"prompt": PROMPT}, {**SAMPLING, "echo": field(st.booleans()), "logprobs": field(st.none() | st.integers(0, 2))}, {"prompt": VALID_PROMPT})
CHAT = bodies(
    {"messages": field(st.lists(MESSAGE, max_size=4))},
    {**SAMPLING, "max_completion_tokens": field(st.integers(-1, MAX_TOKENS + 2))},
    {"messages": VALID_MESSAGES},
)
CONTENT_TYPES = st.sampled_from(["application/json", "application/json", "application/json; charset=utf-8", "text/plain", ""])


def check_http(served: Served, path: str, body: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = served.http.post(path, content=body, headers=headers)
    TRIED[f"http {path}"] += 1
    OUTCOMES[f"http {r.status_code}"] += 1
    assert r.status_code < 500, (r.status_code, r.text, body[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], r.text
        return
    assert r.status_code == 200
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]), r.text
    else:
        assert r.json()["usage"]["completion_tokens"] <= MAX_TOKENS


@FUZZ
@given(body=COMPLETION, content_type=CONTENT_TYPES)
def test_fuzz_http_completions(served: Served, body: bytes, content_type: str) -> None:
    check_http(served, "/v1/completions", body, content_type)


@FUZZ
@given(body=CHAT, content_type=CONTENT_TYPES)
def test_fuzz_http_chat_completions(served: Served, body: bytes, content_type: str) -> None:
    check_http(served, "/v1/chat/completions", body, content_type)


# --- gRPC -------------------------------------------------------------------------------------

utf8_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
uint32 = st.integers(0, MAX_TOKENS + 2) | st.integers(0, 2**32 - 1)
float32 = st.floats(width=32) | st.floats(-1, 3, width=32)


@st.composite
def grpc_requests(draw: st.DrawFn) -> Any:
    from services.grpc_api import cast_pb2

    request = cast_pb2.GenerateRequest()
    kind = draw(st.sampled_from(["prompt", "prompt", "messages", "none"]))
    if kind == "prompt":
        request.prompt = draw(st.sampled_from(["t5 t6 t7", "t9 t10", "x" * 5000]) | utf8_text)
    elif kind == "messages":
        for _ in range(draw(st.integers(0, 4))):
            request.messages.messages.add(role=draw(st.sampled_from(["system", "user", "assistant", "robot", ""]) | utf8_text), content=draw(utf8_text))
        if not request.messages.messages:
            request.messages.SetInParent()
    optional = {
        "max_tokens": st.integers(1, MAX_TOKENS) | uint32,
        "temperature": float32,
        "top_p": float32,
        "top_k": uint32,
        "seed": st.integers(0, 2**64 - 1),
        "policy": st.sampled_from(["cast", "none", "static", ""]) | utf8_text,
    }
    for name, strategy in optional.items():
        if draw(st.integers(0, 2)) == 0:
            setattr(request, name, draw(strategy))
    request.stop.extend(draw(st.lists(st.sampled_from(["t5", "\n"]), max_size=2) | st.lists(utf8_text, max_size=6)))
    request.request_id = draw(st.one_of(st.just(""), st.just("req-1"), st.just(""), utf8_text))
    request.model = draw(st.one_of(st.just(""), st.just("tiny-target"), st.just(""), utf8_text))
    return request


OK_CODES = {grpc.StatusCode.INVALID_ARGUMENT}


@FUZZ
@given(request=grpc_requests(), streaming=st.booleans())
def test_fuzz_grpc_generate(served: Served, stub: Any, request: Any, streaming: bool) -> None:
    TRIED["grpc Generate" + ("Stream" if streaming else "")] += 1
    try:
        if streaming:
            chunks = list(stub.GenerateStream(request, timeout=120))
            assert chunks and chunks[-1].finish_reason != 0
        else:
            reply = stub.Generate(request, timeout=120)
            assert reply.usage.completion_tokens <= MAX_TOKENS
        OUTCOMES["grpc OK"] += 1
    except grpc.RpcError as err:
        assert err.code() in OK_CODES, (err.code(), err.details(), request)
        OUTCOMES[f"grpc {err.code().name}"] += 1


@FUZZ
@given(raw=st.binary(max_size=96))
def test_fuzz_grpc_raw_bytes(served: Served, raw: bytes) -> None:
    """Arbitrary bytes as a Generate request (most are no protobuf message): INVALID_ARGUMENT, never UNKNOWN."""
    with grpc.insecure_channel(served.grpc_target) as channel:
        call = channel.unary_unary("/cast.v1.Cast/Generate", request_serializer=None, response_deserializer=None)
        TRIED["grpc raw bytes"] += 1
        try:
            call(raw, timeout=120)
            OUTCOMES["grpc OK"] += 1
        except grpc.RpcError as err:
            assert err.code() in OK_CODES, (err.code(), err.details(), raw)
            OUTCOMES[f"grpc {err.code().name}"] += 1


# --- afterwards -------------------------------------------------------------------------------


def test_no_replica_restarted_and_output_still_exact(served: Served, stub: Any) -> None:
    from ray import serve

    from services.grpc_api import cast_pb2

    assert serve_replicas() == served.replicas
    deployments = serve.status().applications["cast"].deployments
    assert all(d.replica_states == {"RUNNING": 1} for d in deployments.values()), deployments
    prompt = "t5 t7 t9 t11"
    expected = served.engine.generate([prompt], max_new_tokens=MAX_TOKENS)[0].text
    r = served.http.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    assert stub.Generate(cast_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS), timeout=60).text == expected
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        states = [s for name in ("Drafter", "Verifier") for s in serve.get_deployment_handle(name, app_name="cast").broadcast("debug_state").results()]
        if not any(s["sessions"] for s in states):
            break
        time.sleep(0.2)
    assert not any(s["sessions"] for s in states), states
    print(f"\nfuzz inputs tried: {dict(TRIED)} (total {sum(TRIED.values())}); answers: {dict(OUTCOMES)}")
