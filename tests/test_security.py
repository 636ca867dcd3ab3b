"""Security and request limits of the served app (real Ray Serve on loopback, real HTTP and gRPC clients).

One app for the module with two API keys (one from the config, one from the
``CAST_API_KEYS`` environment variable of the Ray cluster) and small limits.
Checked: 401 / UNAUTHENTICATED without the right key (health stays open), keys
never in any Ray log file nor in config dumps, request ids round-trip (HTTP
header, gRPC field / metadata) into spans and router logs, request-level limits
(413, 415, prompt tokens, max_tokens, stop, unknown fields), CORS off by
default (and on when configured, checked on the guard in process).
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from starlette.testclient import TestClient

from cast_core.engine import Engine
from conftest import random_prompts
from serve_utils import reference_engine, save_tiny_models, served_app, tiny_config
from services.config import AppConfig, SecurityConfig
from services.errors import Unauthenticated
from services.security import ApiKeys, GuardSettings, HttpGuard

pytestmark = [pytest.mark.serve, pytest.mark.timeout(420)]

NEW = 8
CONFIG_KEY = f"sk-config-{secrets.token_hex(16)}"
ENV_KEY = f"sk-env-{secrets.token_hex(16)}"
WRONG_KEY = f"sk-wrong-{secrets.token_hex(16)}"
LIMITS = {"max_body_bytes": 4096, "max_prompt_tokens": 64, "max_tokens": 32, "max_stop_sequences": 2, "max_stop_length": 16, "max_messages": 4}


@dataclass
class Served:
    http: str
    grpc_target: str
    engine: Engine
    logs: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    import ray

    target, drafter = save_tiny_models(tmp_path_factory.mktemp("models"))
    os.environ["CAST_API_KEYS"] = f" {ENV_KEY} ,"
    config = tiny_config(target, drafter, default_max_tokens=NEW, limits=LIMITS, security={"api_keys": [CONFIG_KEY]})
    try:
        with served_app(config) as (http_port, grpc_port):
            logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
            yield Served(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", reference_engine(target, drafter), logs)
    finally:
        os.environ.pop("CAST_API_KEYS", None)


@pytest.fixture(scope="module")
def stub(served: Served) -> Iterator[Any]:
    from services.grpc_api import cast_pb2_grpc

    with grpc.insecure_channel(served.grpc_target) as channel:
        yield cast_pb2_grpc.CastStub(channel)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(served: Served, body: dict[str, Any], key: str | None = CONFIG_KEY, path: str = "/v1/completions", **kw: Any) -> httpx.Response:
    headers = {**(bearer(key) if key else {}), **kw.pop("headers", {})}
    return httpx.post(served.http + path, json=body, headers=headers, timeout=120, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None, error_type: str = "invalid_request_error") -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type and error["param"] == param, error
    return error


# --- API keys ---------------------------------------------------------------------------------


def test_http_needs_a_valid_key_but_health_is_open(served: Served) -> None:
    prompt = random_prompts(1, seed=31)[0]
    expected = served.engine.generate([prompt], max_new_tokens=NEW)[0].text
    for key in (CONFIG_KEY, ENV_KEY):
        r = post(served, {"prompt": prompt, "max_tokens": NEW}, key=key)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
    for headers in ({}, bearer(WRONG_KEY), {"Authorization": "Bearer"}, {"Authorization": CONFIG_KEY}, {"Authorization": f"Basic {CONFIG_KEY}"}):
        r = httpx.post(served.http + "/v1/completions", json={"prompt": prompt}, headers=headers, timeout=30)
        error = assert_error(r, 401, "authorization", "authentication_error")
        assert error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert WRONG_KEY not in r.text and CONFIG_KEY not in r.text
    # the key is checked before the body: a bad body without a key is a 401, not a 400
    assert_error(httpx.post(served.http + "/v1/chat/completions", content=b"{bad", timeout=30), 401, "authorization", "authentication_error")
    assert_error(httpx.get(served.http + "/v1/models", timeout=30), 401, "authorization", "authentication_error")
    assert httpx.get(served.http + "/v1/models", headers=bearer(ENV_KEY), timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while (r := httpx.get(served.http + "/health", timeout=30)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_grpc_needs_a_valid_key_but_health_is_open(served: Served, stub: Any) -> None:
    from services.grpc_api import cast_pb2

    prompt = "t5 t7 t9"
    expected = served.engine.generate([prompt], max_new_tokens=NEW)[0].text
    request = cast_pb2.GenerateRequest(prompt=prompt, max_tokens=NEW)
    for metadata in ((), (("authorization", f"Bearer {WRONG_KEY}"),), (("authorization", ENV_KEY),)):
        for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
            with pytest.raises(grpc.RpcError) as err:
                call(request, metadata=metadata, timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and WRONG_KEY not in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        stub.ListModels(cast_pb2.ListModelsRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for key in (CONFIG_KEY, ENV_KEY):
        reply = stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
        assert reply.text == expected
    chunks = list(stub.GenerateStream(request, metadata=(("authorization", f"Bearer {CONFIG_KEY}"),), timeout=60))
    assert "".join(c.text for c in chunks) == expected
    health = stub.Health(cast_pb2.HealthRequest(), timeout=30)
    assert health.status == cast_pb2.HealthResponse.SERVING_STATUS_SERVING


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = ApiKeys.from_config(SecurityConfig(api_keys=["k1", "k2"]), {"CAST_API_KEYS": "k3, ,k4"})
    keys.verify("Bearer k1")  # the first key matches; the other three are still compared
    assert calls == [(b"k1", b"k1"), (b"k1", b"k2"), (b"k1", b"k3"), (b"k1", b"k4")]
    with pytest.raises(Unauthenticated):
        keys.verify("Bearer k5")
    with pytest.raises(Unauthenticated):
        keys.verify(None)
    ApiKeys([]).verify(None)  # no keys: authentication off
    assert "k1" not in repr(keys)


def test_keys_never_reach_logs_or_config_dumps(served: Served) -> None:
    config = AppConfig(security=SecurityConfig(api_keys=[SecretStr(CONFIG_KEY)]))
    for dump in (repr(config), str(config), config.model_dump_json(), str(config.model_dump())):
        assert CONFIG_KEY not in dump
    post(served, {"prompt": [5, 6], "max_tokens": 2})
    post(served, {"prompt": [5, 6], "max_tokens": 2}, key=WRONG_KEY)
    time.sleep(1.0)  # let the replicas flush their log lines
    files = [p for p in served.logs.rglob("*") if p.is_file()]
    assert files
    for path in files:
        text = path.read_bytes()
        for key in (CONFIG_KEY, ENV_KEY, WRONG_KEY):
            assert key.encode() not in text, f"{key[:10]}... found in {path}"


# --- request ids ------------------------------------------------------------------------------


def router_spans(served: Served) -> list[dict[str, Any]]:
    from ray import serve

    return serve.get_deployment_handle("Router", app_name="cast").debug_state.remote().result()["spans"]


def spans_of(served: Served, request_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spans = [s for s in router_spans(served) if s["attributes"].get("cast.request_id") == request_id]
    return [s for s in spans if s["name"] == "cast.request"], [s for s in spans if s["name"] == "cast.step"]


def wait_for_log(served: Served, needle: str, timeout_s: float = 15.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in served.logs.rglob("*"):
            if path.is_file() and needle.encode() in path.read_bytes():
                return path
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} in no log file under {served.logs}")


def test_http_request_id_round_trips_into_spans_and_logs(served: Served) -> None:
    request_id = f"client-{secrets.token_hex(6)}"
    r = post(served, {"prompt": [7, 8, 9], "max_tokens": 6}, headers={"X-Request-Id": request_id})
    assert r.status_code == 200 and r.headers["x-request-id"] == request_id
    requests, steps = spans_of(served, request_id)
    assert len(requests) == 1 and steps and all(s["parent"] == requests[0]["span_id"] for s in steps)
    wait_for_log(served, f"request {request_id} (http) finished: ok")
    r = post(served, {"prompt": [7, 8, 9], "max_tokens": 2})
    generated = r.headers["x-request-id"]
    assert r.status_code == 200 and generated and spans_of(served, generated)[0]
    for bad in ("has space", "x" * 129, "-leading-dash", "semi;colon"):
        assert_error(post(served, {"prompt": [7]}, headers={"X-Request-Id": bad}), 400, "x-request-id")


def test_grpc_request_id_round_trips_into_spans(served: Served, stub: Any) -> None:
    from services.grpc_api import cast_pb2

    auth = ("authorization", f"Bearer {CONFIG_KEY}")
    request_id = f"grpc-client-{secrets.token_hex(6)}"
    reply, call = stub.Generate.with_call(cast_pb2.GenerateRequest(prompt="t5 t6", max_tokens=4, request_id=request_id), metadata=(auth,), timeout=60)
    assert reply.request_id == request_id and ("x-request-id", request_id) in tuple(call.trailing_metadata())
    assert spans_of(served, request_id)[1]
    from_metadata = f"meta-{secrets.token_hex(6)}"
    reply = stub.Generate(cast_pb2.GenerateRequest(prompt="t5 t6", max_tokens=2), metadata=(auth, ("x-request-id", from_metadata)), timeout=60)
    assert reply.request_id == from_metadata
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(cast_pb2.GenerateRequest(prompt="t5", request_id="bad id"), metadata=(auth,), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("request_id:")


# --- limits and validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": list(range(5, 70))}, "prompt"),  # 65 tokens > max_prompt_tokens
        ({"prompt": [5], "max_tokens": 33}, "max_tokens"),
        ({"prompt": [5], "stop": ["a", "b", "c"]}, "stop"),
        ({"prompt": [5], "stop": "x" * 17}, "stop"),
        ({"prompt": [5], "seed": 1 << 64}, "seed"),
        ({"prompt": [5], "presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_request_limits_are_400(served: Served, body: dict[str, Any], param: str) -> None:
    error = assert_error(post(served, body), 400, param)
    assert param in error["message"]


def test_chat_limits_and_unknown_fields(served: Served) -> None:
    messages = [{"role": "user", "content": "t5"}] * 5
    assert_error(post(served, {"messages": messages}, path="/v1/chat/completions"), 400, "messages")
    error = assert_error(post(served, {"prompt": [5], "frobnicate": 1}), 400, "frobnicate")
    assert error["message"] == "Unrecognized request argument supplied: frobnicate"
    error = assert_error(post(served, {"messages": [{"role": "user", "content": "t5", "extra": 1}]}, path="/v1/chat/completions"), 400, "messages")
    assert error["message"].startswith("Unrecognized request argument supplied: messages.0.extra")


def test_body_size_type_and_encoding_are_4xx_json(served: Served) -> None:
    auth = bearer(CONFIG_KEY)
    big = {"prompt": "t5 " * 2000}
    error = assert_error(post(served, big), 413, "body")
    assert error["code"] == "request_too_large"
    r = httpx.post(served.http + "/v1/completions", content=b'{"prompt": "t5"}', headers={**auth, "content-type": "text/plain"}, timeout=30)
    assert_error(r, 415, "content-type")
    r = httpx.post(served.http + "/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers={**auth, "content-type": "application/json"}, timeout=30)
    assert_error(r, 400, "body")
    r = httpx.post(served.http + "/v1/completions", content=b"{bad", headers={**auth, "content-type": "application/json"}, timeout=30)
    assert_error(r, 400, "body")
    r = httpx.post(served.http + "/v1/completions", content=b'{"prompt": "\\ud800"}', headers={**auth, "content-type": "application/json"}, timeout=30)
    assert "UTF-8" in assert_error(r, 400, "prompt")["message"]
    assert_error(httpx.get(served.http + "/v1/nowhere", headers=auth, timeout=30), 404, None)
    assert_error(httpx.get(served.http + "/v1/completions", headers=auth, timeout=30), 405, None)


def test_grpc_limits_are_invalid_argument(served: Served, stub: Any) -> None:
    from services.grpc_api import cast_pb2

    auth = (("authorization", f"Bearer {ENV_KEY}"),)
    cases = {
        "prompt": cast_pb2.GenerateRequest(prompt=" ".join(f"t{i}" for i in range(5, 70))),
        "max_tokens": cast_pb2.GenerateRequest(prompt="t5", max_tokens=33),
        "stop": cast_pb2.GenerateRequest(prompt="t5", stop=["a", "b", "c"]),
        "messages": cast_pb2.GenerateRequest(messages=cast_pb2.ChatMessages(messages=[cast_pb2.ChatMessage(role="user", content="t5")] * 5)),
        "temperature": cast_pb2.GenerateRequest(prompt="t5", temperature=float("nan")),
    }
    for field, request in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(request, metadata=auth, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(f"{field}:"), err.value.details()


# --- CORS -------------------------------------------------------------------------------------


def test_cors_is_off_by_default(served: Served) -> None:
    origin = {"Origin": "https://evil.example"}
    r = httpx.get(served.http + "/health", headers=origin, timeout=30)
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]
    r = httpx.options(served.http + "/v1/completions", headers={**origin, "Access-Control-Request-Method": "POST"}, timeout=30)
    assert "access-control-allow-origin" not in r.headers


def test_cors_when_configured() -> None:
    inner = FastAPI()

    @inner.get("/v1/models")
    async def models() -> dict[str, str]:
        return {"object": "list"}

    settings = GuardSettings(ApiKeys([SecretStr("k")]), 1024, ("https://app.example",))
    client = TestClient(HttpGuard(inner, settings))
    allowed, other = {"Origin": "https://app.example"}, {"Origin": "https://evil.example"}
    preflight = client.options("/v1/models", headers={**allowed, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"
    r = client.get("/v1/models", headers={**allowed, "Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = client.get("/v1/models", headers=allowed)  # a 401 still carries CORS headers, so the browser can read it
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = client.get("/v1/models", headers={**other, "Authorization": "Bearer k"})
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in TestClient(HttpGuard(inner, GuardSettings(ApiKeys([]), 1024, ()))).get("/v1/models", headers=allowed).headers
