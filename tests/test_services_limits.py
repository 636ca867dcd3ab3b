"""Declared overload and idle eviction through a running app (tiny limits, one replica per deployment).

* a verifier replica at ``max_sessions_per_replica``: the next request gets
  HTTP 503 + Retry-After (OpenAI-style body) / gRPC UNAVAILABLE, the replica stays
  up and the request already running on it finishes with the engine's tokens;
* more concurrent requests than admission runs and queues: the excess gets
  HTTP 429 + Retry-After / gRPC RESOURCE_EXHAUSTED, the admitted ones finish
  with the engine's output, and the app serves normally afterwards;
* a session opened on the drafter and the verifier and never stepped is
  evicted from both after ``session_idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import grpc
import httpx
import pytest

from cast_core.engine import Engine
from cast_core.sampling import SamplingParams
from conftest import random_prompts
from serve_utils import reference_engine, save_tiny_models, served_app, tiny_config

pytestmark = [pytest.mark.serve, pytest.mark.timeout(300)]

NEW = 32
MAX_ACTIVE, MAX_QUEUED, RETRY_AFTER_S = 2, 1, 2
MAX_SESSIONS = 3
IDLE_TIMEOUT_S = 4.0


@dataclass
class Served:
    http: str
    grpc_target: str
    engine: Engine


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    target, drafter = save_tiny_models(tmp_path_factory.mktemp("models"))
    config = tiny_config(
        target,
        drafter,
        default_max_tokens=NEW,
        max_sessions_per_replica=MAX_SESSIONS,
        session_idle_timeout_s=IDLE_TIMEOUT_S,
        admission={"max_active_requests": MAX_ACTIVE, "max_queued_requests": MAX_QUEUED, "retry_after_s": RETRY_AFTER_S},
    )
    with served_app(config) as (http_port, grpc_port):
        yield Served(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", reference_engine(target, drafter))


@pytest.fixture(scope="module")
def stub(served: Served):
    from services.grpc_api import cast_pb2_grpc

    with grpc.insecure_channel(served.grpc_target) as channel:
        yield cast_pb2_grpc.CastStub(channel)


def handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, app_name="cast")


def live_sessions(name: str) -> list[str]:
    return [sid for state in handle(name).broadcast("debug_state").results() for sid in state["sessions"]]


def wait_no_sessions(timeout_s: float = 30.0) -> float:
    """Seconds until neither pool holds a session (fails after ``timeout_s``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if not live_sessions("Verifier") and not live_sessions("Drafter"):
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"sessions still open: verifier {live_sessions('Verifier')}, drafter {live_sessions('Drafter')}")


def assert_serves_normally(served: Served) -> None:
    assert httpx.get(served.http + "/health", timeout=30).status_code == 200
    prompt = random_prompts(1, seed=99)[0]
    reply = httpx.post(served.http + "/v1/completions", json={"prompt": prompt, "max_tokens": NEW}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == served.engine.generate([prompt], max_new_tokens=NEW)[0].text


def assert_error_body(reply: httpx.Response, status: int, error_type: str, needle: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["retry-after"] == str(RETRY_AFTER_S)
    error = reply.json()["error"]
    assert error["type"] == error_type and needle in error["message"], error


def long_prompt(engine: Engine, tokens: int) -> tuple[list[int], str]:
    """A prompt whose greedy output runs to ``tokens`` tokens (no early EOS), with that output."""
    for seed in range(300, 330):
        prompt = random_prompts(1, seed=seed)[0]
        gen = engine.generate([prompt], max_new_tokens=tokens)[0]
        if len(gen.token_ids) == tokens:
            return prompt, gen.text
    pytest.skip(f"no prompt runs to {tokens} tokens")


class FullVerifier:
    """Keeps the one verifier replica at ``MAX_SESSIONS`` with ``fill-*`` sessions opened directly.

    A fill is never stepped, so the replica evicts it ``IDLE_TIMEOUT_S`` after it opened:
    ``top_up`` therefore replaces the fills with fresh ones before each check. The streaming
    request under test holds one slot and may finish at any moment, freeing it. ``rejects``
    retries a check that was served only when a slot was free during it (that request's session
    or a fill gone); a check served while every slot was held is a real failure.
    """

    def __init__(self) -> None:
        self.verifier = handle("Verifier")
        self.fills: list[str] = []
        self.opened = 0

    def top_up(self) -> None:
        self.close()
        for _ in range(MAX_SESSIONS - len(live_sessions("Verifier"))):
            sid = f"fill-{self.opened}"
            self.opened += 1
            self.verifier.options(session_id=sid).open.remote(sid, [5, 6, 7], SamplingParams()).result(timeout_s=60)
            self.fills.append(sid)
        assert len(live_sessions("Verifier")) == MAX_SESSIONS

    def rejects(self, check: Callable[[], None]) -> None:
        """Run ``check`` (which asserts the overload answer) against a full replica."""
        for attempt in range(2):
            self.top_up()
            try:
                return check()
            except AssertionError:
                live = live_sessions("Verifier")
                running = [sid for sid in live if not sid.startswith("fill-")]
                evicted = set(self.fills) - set(live)
                if attempt or (running and not evicted):
                    raise

    def close(self) -> None:
        for sid in self.fills:
            self.verifier.options(session_id=sid).close.remote(sid).result(timeout_s=60)
        self.fills = []


def test_full_replica_is_a_declared_overload(served: Served, stub) -> None:
    from services.grpc_api import cast_pb2

    def http_503() -> None:
        reply = httpx.post(served.http + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 4}, timeout=60)
        assert_error_body(reply, 503, "server_error", f"maximum of {MAX_SESSIONS} sessions")

    def grpc_unavailable(call: Callable[[], object]) -> None:
        try:
            call()
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "maximum" in err.details(), err
        else:
            raise AssertionError("served while the verifier was full")

    def streamed_503(path: str, body: dict) -> None:
        with httpx.stream("POST", served.http + path, json={**body, "max_tokens": 4, "stream": True}, timeout=60) as s:
            s.read()
            assert_error_body(s, 503, "server_error", f"maximum of {MAX_SESSIONS} sessions")

    wait_no_sessions()
    prompt, expected = long_prompt(served.engine, 400)
    request = cast_pb2.GenerateRequest(prompt="t5 t6", max_tokens=4)
    full = FullVerifier()
    text = ""
    with httpx.stream("POST", served.http + "/v1/completions", json={"prompt": prompt, "max_tokens": 400, "stream": True}, timeout=180) as r:
        lines = r.iter_lines()
        for line in lines:  # up to the first chunk: the running request holds one session
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
                break
        full.rejects(http_503)
        full.rejects(lambda: grpc_unavailable(lambda: stub.Generate(request, timeout=60)))
        full.rejects(lambda: grpc_unavailable(lambda: list(stub.GenerateStream(request, timeout=60))))
        full.rejects(lambda: streamed_503("/v1/completions", {"prompt": [5, 6]}))
        full.rejects(lambda: streamed_503("/v1/chat/completions", {"messages": [{"role": "user", "content": "t5"}]}))
        for line in lines:
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text == expected  # the running request lost nothing
    full.close()
    wait_no_sessions()
    assert_serves_normally(served)


async def _post_all(base: str, prompts: list[list[int]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=180) as client:
        return await asyncio.gather(*(client.post(base + "/v1/completions", json={"prompt": p, "max_tokens": NEW}) for p in prompts))


def test_admission_overflow_gets_429_and_admitted_requests_are_exact(served: Served) -> None:
    wait_no_sessions()
    prompts = random_prompts(6, seed=31)
    expected = [g.text for g in served.engine.generate(prompts, max_new_tokens=NEW)]
    replies = asyncio.run(_post_all(served.http, prompts))
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 429}, [r.text for r in replies]
    assert statuses.count(429) >= 1 and statuses.count(200) >= MAX_ACTIVE + MAX_QUEUED, statuses
    for reply, text in zip(replies, expected):
        if reply.status_code == 429:
            assert_error_body(reply, 429, "rate_limit_error", "retry after")
        else:
            assert reply.json()["choices"][0]["text"] == text
    wait_no_sessions()
    assert_serves_normally(served)


def test_grpc_admission_overflow_is_resource_exhausted(served: Served, stub) -> None:
    from services.grpc_api import cast_pb2

    wait_no_sessions()
    prompts = [" ".join(f"t{t}" for t in p) for p in random_prompts(6, seed=32)]
    expected = served.engine.generate(prompts, max_new_tokens=NEW)
    calls: list[Future] = [stub.Generate.future(cast_pb2.GenerateRequest(prompt=p, max_tokens=NEW), timeout=180) for p in prompts]
    ok, exhausted = 0, 0
    for call, gen in zip(calls, expected):
        try:
            reply = call.result()
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert "retry after" in err.details()
            exhausted += 1
            continue
        assert reply.text == gen.text and list(reply.token_ids) == gen.token_ids
        ok += 1
    assert exhausted >= 1 and ok >= MAX_ACTIVE + MAX_QUEUED, (ok, exhausted)
    wait_no_sessions()
    assert_serves_normally(served)


def test_idle_sessions_are_evicted_from_both_pools(served: Served) -> None:
    wait_no_sessions()
    sid = "idle-session"
    opened = time.monotonic()  # before the opens: a row's idle clock starts when it is added
    handle("Verifier").options(session_id=sid).open.remote(sid, [5, 6, 7], SamplingParams()).result(timeout_s=60)
    handle("Drafter").options(session_id=sid).open.remote(sid, [5, 6, 7]).result(timeout_s=60)
    assert live_sessions("Verifier") == [sid] and live_sessions("Drafter") == [sid]
    wait_no_sessions(timeout_s=IDLE_TIMEOUT_S + 20)
    assert time.monotonic() - opened > IDLE_TIMEOUT_S  # evicted for idling, not at once
    assert_serves_normally(served)
