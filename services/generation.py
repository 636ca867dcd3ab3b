"""One request's life in the router: validate, encode, then the draft -> verify step loop.

``SessionRunner.run`` opens the request's session on a drafter and a verifier
replica (routed by ``SessionAffinityRouter``), then per step::

    draft = drafter.draft.remote(sid, pending, verifier_replica)   # DeploymentResponse
    step  = await verifier.verify.remote(sid, draft)                # tree travels as an object ref
    committed += step.tokens; pending = step.tokens

until ``OutputTracker`` says the output is finished, yielding one
``StepEvent`` per step (tokens kept, text delta). The router holds every
committed token, so when a replica lost the session (``SessionNotFound``:
restarted, evicted; or the actor died -- a verifier or a drafter replica; a
drafter dying mid-draft fails the verify call, whose argument the draft is: see
``is_lost_session``) it re-opens both sessions with the prompt plus the output so far,
on live replicas, and carries on: nothing is lost or repeated. Re-opens back off
(``reopen_backoff_s``) and give up after ``max_reopens`` losses in a row with no
step in between.
Both sessions are closed when the request ends, however it ends (finish,
error, client disconnect -> cancellation).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase

from cast_core.output import OutputTracker
from cast_core.sampling import SamplingParams
from cast_core.sessions import SessionNotFound
from services.config import AppConfig, PolicyName
from services.errors import InvalidRequest, Unavailable
from services.messages import DraftOutput, SessionInfo, StepOutput
from services.telemetry import RouterMetrics

logger = logging.getLogger(__name__)

LOST_SESSION = (SessionNotFound, RayActorError, ActorUnavailableError)
REOPEN_BACKOFF_S = 0.05
REOPEN_BACKOFF_MAX_S = 2.0


def is_lost_session(err: BaseException) -> bool:
    """Whether ``err`` means a replica lost the request's session.

    It raised ``SessionNotFound``, or it died; or -- wrapped by Serve in a
    ``RayServeException`` caused by ``ActorDiedError`` -- the drafter replica
    whose draft the verify call was waiting for (its argument) died.
    """
    return isinstance(err, LOST_SESSION) or (isinstance(err, RayServeException) and isinstance(err.__cause__, LOST_SESSION))


def reopen_backoff_s(lost_in_a_row: int) -> float:
    """Wait before the ``lost_in_a_row``-th re-open in a row: 0.05 s doubling, at most 2 s.

    A replica that just died stays a routing candidate until its caller's request
    router or the Serve controller notices; re-opening at once could spend the
    request's whole re-open budget on it within milliseconds.
    """
    return min(REOPEN_BACKOFF_S * 2 ** (lost_in_a_row - 1), REOPEN_BACKOFF_MAX_S)


class GenerationParams(BaseModel):
    """Protocol-independent generation parameters (HTTP and gRPC both validate into this)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most; None = server default (clamped to the context window).")
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False, description="Sampling temperature; 0 = greedy; None = server default.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass in (0, 1].")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens; 0 = all.")
    seed: int | None = Field(None, description="Seed of the request's sampler.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (not returned).")
    policy: PolicyName | None = Field(None, description="Tree policy for this request: the server's policy or 'none'.")


def validation_error(err: ValidationError, prefix: tuple[str | int, ...] = ()) -> InvalidRequest:
    """The first pydantic error as an ``InvalidRequest`` naming the field."""
    first = err.errors()[0]
    loc = [str(x) for x in first["loc"] if x not in prefix]
    param = ".".join(loc) or None
    return InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"], param)


@dataclass
class PreparedRequest:
    """A validated request, ready for the step loop."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]
    speculate: bool


class PromptEncoder:
    """Tokenises prompts and checks them against the target's vocabulary and context window."""

    def __init__(self, config: AppConfig, tokenizer: PreTrainedTokenizerBase, target_path: Path) -> None:
        self.config = config
        self.tokenizer = tokenizer
        model_config = AutoConfig.from_pretrained(target_path)
        self.vocab_size = int(model_config.vocab_size)
        self.context_window = int(getattr(model_config, "max_position_embeddings", 1 << 30))
        try:
            eos = GenerationConfig.from_pretrained(target_path).eos_token_id
        except OSError:
            eos = None
        eos = eos if eos is not None else getattr(model_config, "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def encode(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a text prompt (with the tokenizer's special tokens) or checked token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest(f"{param}: must not be empty", param)
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
            if any(t < 0 or t >= self.vocab_size for t in ids):
                raise InvalidRequest(f"{param}: token ids must be in [0, {self.vocab_size})", param)
        if not ids:
            raise InvalidRequest(f"{param}: encodes to no tokens", param)
        return ids

    def render_chat(self, messages: list[dict[str, str]], param: str = "messages") -> str:
        """Render a conversation with the target's chat template, ready for the assistant's turn."""
        if not messages:
            raise InvalidRequest(f"{param}: must hold at least one message", param)
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(f"{param}: the served model has no chat template; use the completions API", param)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prepare(self, prompt_ids: list[int], params: GenerationParams, request_id: str = "") -> PreparedRequest:
        """Apply server defaults and check the context window and policy."""
        if len(prompt_ids) >= self.context_window:
            raise InvalidRequest(
                f"prompt: {len(prompt_ids)} tokens exceed the context window of {self.context_window}", "prompt"
            )
        room = self.context_window - len(prompt_ids)
        if params.max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, room)
        elif params.max_tokens > room:
            raise InvalidRequest(
                f"max_tokens: the prompt has {len(prompt_ids)} tokens; with max_tokens={params.max_tokens} "
                f"it exceeds the context window of {self.context_window}",
                "max_tokens",
            )
        else:
            max_tokens = params.max_tokens
        if params.policy not in (None, "none", self.config.policy):
            raise InvalidRequest(
                f"policy: this server runs policy {self.config.policy!r}; a request may ask for it or 'none'", "policy"
            )
        temperature = self.config.default_temperature if params.temperature is None else params.temperature
        sampling = SamplingParams(temperature=temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed)
        return PreparedRequest(
            request_id=request_id or f"cast-{uuid.uuid4().hex}",
            prompt_ids=prompt_ids,
            sampling=sampling,
            max_tokens=max_tokens,
            stop=tuple(s for s in params.stop if s),
            speculate=self.config.policy != "none" and params.policy != "none",
        )


@dataclass
class SpecStats:
    """Speculative decoding statistics of one request (the ``cast`` extension field).

    Attributes:
        steps: draft -> verify steps.
        draft_tokens: tree nodes the drafter built, over all steps.
        accepted_tokens: drafted tokens accepted, over all steps (bonus tokens excluded).
        verified_tokens: tree nodes sent to the target over all steps, roots included.
        reopens: times the sessions were re-opened after a replica lost them.
    """

    steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verified_tokens: int = 0
    reopens: int = 0

    def add(self, step: StepOutput) -> None:
        self.steps += 1
        self.draft_tokens += step.nodes_drafted
        self.accepted_tokens += step.accepted
        self.verified_tokens += step.verified_nodes

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per step: ``(accepted + steps) / steps``."""
        return (self.accepted_tokens + self.steps) / self.steps if self.steps else 0.0

    @property
    def mean_tree_nodes(self) -> float:
        """Drafted nodes per step (before reranking)."""
        return self.draft_tokens / self.steps if self.steps else 0.0

    @property
    def mean_verified_tokens(self) -> float:
        """Tree nodes verified per step, root included."""
        return self.verified_tokens / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "steps": self.steps,
            "mean_accepted_length": self.mean_accepted_length,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "mean_tree_nodes": self.mean_tree_nodes,
            "mean_verified_tokens": self.mean_verified_tokens,
            "reopens": self.reopens,
        }


@dataclass
class StepEvent:
    """What one step added to a request's output.

    ``finish_reason`` is set on the last event ("stop" or "length").
    """

    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    stats: SpecStats = field(default_factory=SpecStats)


class SessionRunner:
    """Runs requests' step loops over the drafter and verifier deployments (see module docstring)."""

    def __init__(
        self,
        drafter: DeploymentHandle,
        verifier: DeploymentHandle,
        encoder: PromptEncoder,
        metrics: RouterMetrics,
        tracer: trace.Tracer,
        max_reopens: int,
    ) -> None:
        self._drafter, self._verifier = drafter, verifier
        self._encoder = encoder
        self._metrics = metrics
        self._tracer = tracer
        self._max_reopens = max_reopens
        self._closing: set[asyncio.Task[None]] = set()

    async def run(self, request: PreparedRequest, protocol: str) -> AsyncIterator[StepEvent]:
        """The request's step loop; yields a ``StepEvent`` per step, the last one finished."""
        sid = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        drafter = self._drafter.options(session_id=sid)
        verifier = self._verifier.options(session_id=sid)
        tracker = OutputTracker(self._encoder.tokenizer, self._encoder.eos_token_ids, request.max_tokens, request.stop)
        stats = SpecStats()
        committed = list(request.prompt_ids)
        span = self._tracer.start_span(
            "cast.request",
            attributes={"cast.request_id": request.request_id, "cast.protocol": protocol, "cast.prompt_tokens": len(committed)},
        )
        parent = trace.set_span_in_context(span)
        status = "error"
        try:
            info: SessionInfo | None = None
            pending: list[int] = []
            last_step_s: float | None = None  # the last step's own forwards, which the drafter's gate judges it by
            lost_in_a_row = 0
            while not tracker.finished:
                started = time.perf_counter()
                try:
                    if info is None:
                        info = await self._open(drafter, verifier, sid, committed, request, request.max_tokens - len(tracker.token_ids))
                        pending, last_step_s = [committed[-1]], None
                    step = await self._step(drafter, verifier, sid, pending, info, request.speculate, last_step_s)
                except (*LOST_SESSION, RayServeException) as err:
                    if not is_lost_session(err):
                        raise
                    stats.reopens += 1
                    lost_in_a_row += 1
                    if lost_in_a_row > self._max_reopens:
                        raise Unavailable(f"session lost {lost_in_a_row} times in a row; giving up ({err})") from err
                    logger.warning("request %s: session lost (%s); re-opening with %d tokens", request.request_id, type(err).__name__, len(committed))
                    info = None
                    await asyncio.sleep(reopen_backoff_s(lost_in_a_row))
                    continue
                lost_in_a_row = 0
                wall_s = time.perf_counter() - started
                self._trace_step(parent, stats.steps, step, wall_s)
                committed.extend(step.tokens)
                pending, last_step_s = step.tokens, step.draft_s + step.verify_s
                stats.add(step)
                self._metrics.record_step(step, wall_s)
                kept, delta = tracker.extend(step.tokens)
                yield StepEvent(kept, delta, tracker.finish_reason, len(request.prompt_ids), len(tracker.token_ids), stats)
            status = "ok"
            span.set_attributes({"cast.completion_tokens": len(tracker.token_ids), "cast.finish_reason": tracker.finish_reason or "", **{f"cast.{k}": v for k, v in stats.as_dict().items()}})
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            span.set_attribute("cast.status", status)
            span.end()
            self._close(drafter, verifier, sid, request.speculate)

    async def _open(
        self, drafter: DeploymentHandle, verifier: DeploymentHandle, sid: str, tokens: list[int], request: PreparedRequest, tokens_left: int
    ) -> SessionInfo:
        calls = [verifier.open.remote(sid, tokens, request.sampling)]
        if request.speculate:
            calls.append(drafter.open.remote(sid, tokens, tokens_left))
        infos = await asyncio.gather(*calls)
        return infos[0]

    async def _step(
        self,
        drafter: DeploymentHandle,
        verifier: DeploymentHandle,
        sid: str,
        pending: list[int],
        info: SessionInfo,
        speculate: bool,
        last_step_s: float | None,
    ) -> StepOutput:
        draft = drafter.draft.remote(sid, pending, info.replica_id, last_step_s) if speculate else DraftOutput.root_only(pending[-1])
        return await verifier.verify.remote(sid, draft)

    def _trace_step(self, parent: trace.Context, index: int, step: StepOutput, wall_s: float) -> None:
        end = time.time_ns()
        span = self._tracer.start_span(
            "cast.step",
            context=parent,
            start_time=end - int(wall_s * 1e9),
            attributes={
                "cast.step": index,
                "cast.accepted": step.accepted,
                "cast.committed": len(step.tokens),
                "cast.verified_nodes": step.verified_nodes,
                "cast.nodes_drafted": step.nodes_drafted,
                "cast.draft_s": step.draft_s,
                "cast.verify_s": step.verify_s,
                "cast.batch_sessions": step.batch_sessions,
                "cast.occupancy": step.occupancy,
            },
        )
        span.end(end_time=end)

    def _close(self, drafter: DeploymentHandle, verifier: DeploymentHandle, sid: str, speculate: bool) -> None:
        """Free the session on both pools in the background (also after cancellation)."""

        async def close() -> None:
            calls = [verifier.close.remote(sid)] + ([drafter.close.remote(sid)] if speculate else [])
            for result in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(result, Exception):
                    logger.warning("session %s: close failed: %s", sid, result)

        # A fresh context: created inside the cancelled request's context, these calls would count as
        # its children, and Serve cancels a cancelled request's children (the close could be lost).
        task = asyncio.get_running_loop().create_task(close(), context=contextvars.Context())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def drain(self) -> None:
        """Wait for pending closes (tests, shutdown)."""
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
