"""The Router (ingress) deployment: OpenAI-compatible HTTP and the cast.v1.Cast gRPC service.

Both protocols share one path: validate into ``GenerationParams`` (errors name
the field), encode the prompt, admit (``Admission``: 429 + Retry-After /
RESOURCE_EXHAUSTED when the queue is full), run ``SessionRunner`` (the
draft -> verify step loop over the drafter and verifier pools), and stream or
collect its ``StepEvent`` objects.

HTTP (``@serve.ingress`` FastAPI app, behind Serve's HTTP proxy):
``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` true =
server-sent events ``data: {...}`` ending with ``data: [DONE]``),
``GET /v1/models``, ``GET /health``. Bodies: ``services.openai_api``.

gRPC (Serve's gRPC proxy calls the methods named like the RPCs):
``Generate``, ``GenerateStream``, ``Health``, ``ListModels`` of
``protos/cast/v1/cast.proto``; errors are status codes (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL) with the message as details.

(No ``from __future__ import annotations`` here: FastAPI must see the real body
types of the class-based routes that ``serve.ingress`` rewrites.)
"""

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cast_core.models import load_tokenizer, resolve_model
from services.admission import Admission
from services.config import AppConfig
from services.errors import InvalidRequest, RequestError
from services.generation import GenerationParams, PreparedRequest, PromptEncoder, SessionRunner, SpecStats, StepEvent, validation_error
from services.grpc_api import cast_pb2
from services.messages import tree_unpickle_count
from services.openai_api import (
    AssistantMessage,
    CastStats,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    error_response,
)
from services.security import REQUEST_ID_HEADER, GuardSettings, HttpGuard, check_request_id, install
from services.telemetry import RouterMetrics, Tracing

# A child of Serve's logger: records land in the replica's Serve log with the request id Serve tracks.
logger = logging.getLogger(f"ray.serve.{__name__}")

HEALTH_TIMEOUT_S = 5.0
GRPC_DETAILS_MAX_CHARS = 1024

app = FastAPI(title="CAST serving", description="Cost-aware speculative tree decoding, OpenAI-compatible API.")
app.add_middleware(HttpGuard)


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc)
    if first.get("type") == "extra_forbidden":
        return error_response(InvalidRequest(f"Unrecognized request argument supplied: {where}", param))
    if first.get("type") == "json_invalid":
        return error_response(InvalidRequest(f"body: invalid JSON ({first.get('msg')})", "body"))
    return error_response(InvalidRequest(f"{where}: {first.get('msg')}" if where else str(first.get("msg")), param))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (404, 405, unparsable body) in the OpenAI error shape."""
    body = ErrorResponse(error=ErrorDetail(message=str(exc.detail), type="invalid_request_error"))
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("request failed: %s: %s", type(exc).__name__, exc)
    return error_response(RequestError(f"internal error: {type(exc).__name__}: {exc}"))


def _sse(model: BaseModel) -> str:
    """One server-sent event; unset optional top-level fields (usage, cast) are left out."""
    data = model.model_dump()
    for key in ("usage", "cast"):
        if data.get(key) is None:
            data.pop(key, None)
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _sse_error(err: RequestError) -> str:
    """An error met after a stream started, as a last ``data:`` event."""
    body = ErrorResponse(error=ErrorDetail(message=err.message, type=err.error_type, param=err.param, code=err.code))
    return f"data: {json.dumps(body.model_dump())}\n\n"


def _usage(event: StepEvent) -> Usage:
    return Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.prompt_tokens + event.completion_tokens,
    )


def _cast_stats(stats: SpecStats) -> CastStats:
    return CastStats(**stats.as_dict())


_GRPC_FINISH = {None: cast_pb2.FINISH_REASON_UNSPECIFIED, "stop": cast_pb2.FINISH_REASON_STOP, "length": cast_pb2.FINISH_REASON_LENGTH}


def _spec_pb(stats: SpecStats) -> cast_pb2.SpecStats:
    return cast_pb2.SpecStats(
        steps=stats.steps,
        mean_accepted_length=stats.mean_accepted_length,
        draft_tokens=stats.draft_tokens,
        accepted_tokens=stats.accepted_tokens,
        mean_tree_nodes=stats.mean_tree_nodes,
        mean_verified_tokens=stats.mean_verified_tokens,
    )


async def _started(events: AsyncIterator[StepEvent]) -> AsyncIterator[StepEvent]:
    """``events`` run up to its first step, then all of it: an error before that (a full replica's 503,
    lost replicas) is still the response's HTTP status instead of an event in a 200 stream."""
    first = await anext(events)

    async def replay() -> AsyncIterator[StepEvent]:
        yield first
        async for event in events:
            yield event

    return replay()


@serve.ingress(app)
class RouterReplica:
    """The ingress replica (deployed as ``Router``)."""

    def __init__(self, config: AppConfig, drafter: DeploymentHandle, verifier: DeploymentHandle, planner: DeploymentHandle) -> None:
        self.config = config
        self._planner = planner
        target_path = resolve_model(config.target)
        self.encoder = PromptEncoder(config, load_tokenizer(target_path), target_path)
        self.tracing = Tracing(config.telemetry)
        self.metrics = RouterMetrics()
        self.runner = SessionRunner(drafter, verifier, self.encoder, self.metrics, self.tracing.tracer, config.max_reopens)
        self.admission = Admission(config.admission)
        self.started = int(time.time())
        guard = GuardSettings.from_config(config)
        install(guard)
        self.api_keys = guard.keys

    # --- shared -----------------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model and model != self.config.served_model_id:
            raise InvalidRequest(f"model: unknown model {model[:64]!r}; this server serves {self.config.served_model_id!r}", "model")

    def _check_messages(self, count: int) -> None:
        if count > self.config.limits.max_messages:
            raise InvalidRequest(f"messages: {count} messages exceed the limit of {self.config.limits.max_messages}", "messages")

    def _check_limits(self, prompt_ids: list[int], params: GenerationParams, prompt_param: str) -> None:
        """The request-level limits of ``config.limits`` (the context window is checked when preparing)."""
        limits = self.config.limits
        if limits.max_prompt_tokens is not None and len(prompt_ids) > limits.max_prompt_tokens:
            raise InvalidRequest(f"{prompt_param}: {len(prompt_ids)} prompt tokens exceed the limit of {limits.max_prompt_tokens}", prompt_param)
        if limits.max_tokens is not None and params.max_tokens is not None and params.max_tokens > limits.max_tokens:
            raise InvalidRequest(f"max_tokens: {params.max_tokens} exceeds the limit of {limits.max_tokens}", "max_tokens")
        if len(params.stop) > limits.max_stop_sequences:
            raise InvalidRequest(f"stop: at most {limits.max_stop_sequences} stop strings", "stop")
        if any(len(stop) > limits.max_stop_length for stop in params.stop):
            raise InvalidRequest(f"stop: a stop string is longer than {limits.max_stop_length} characters", "stop")

    async def _generate(self, request: PreparedRequest, protocol: str, release: Callable[[], None]) -> AsyncIterator[StepEvent]:
        """Admission already acquired: run the step loop, release the slot at the end."""
        status = "error"
        try:
            async for event in self.runner.run(request, protocol):
                yield event
            status = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            release()
            self.metrics.record_request(protocol, status)
            logger.info("request %s (%s) finished: %s", request.request_id, protocol, status)

    async def _admit(
        self, prompt_ids: list[int], params: GenerationParams, request_id: str, protocol: str, prompt_param: str
    ) -> AsyncIterator[StepEvent]:
        """Validate against the limits and the model, then wait for a slot (``Overloaded`` when the queue is full)."""
        self._check_limits(prompt_ids, params, prompt_param)
        prepared = self.encoder.prepare(prompt_ids, params, request_id)
        try:
            await self.admission.acquire()
        except RequestError:
            self.metrics.record_request(protocol, "overloaded")
            raise
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admission.release()

        events = self._generate(prepared, protocol, release)
        # A response cancelled before it started iterating never runs the generator's finally.
        weakref.finalize(events, release)
        return events

    async def _healthy(self) -> tuple[bool, str]:
        try:
            cluster = await asyncio.wait_for(self._planner.cluster.remote(), HEALTH_TIMEOUT_S)
        except Exception as err:
            return False, f"planner unreachable: {type(err).__name__}: {err}"
        if not cluster:
            return False, "no verifier replica has reported to the planner"
        return True, f"{len(cluster)} verifier replica(s); {self.admission.active} running, {self.admission.waiting} queued"

    # --- HTTP -------------------------------------------------------------------------------

    @app.post("/v1/completions", response_model=CompletionResponse, responses={400: {"model": ErrorResponse}, 429: {"model": ErrorResponse}})
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        """OpenAI-compatible text completion (streamed as SSE when ``stream`` is true)."""
        self._check_model(body.model)
        ids = self.encoder.encode(body.prompt, "prompt")
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        request_id = request.headers.get(REQUEST_ID_HEADER) or completion_id
        events = await self._admit(ids, body.generation_params(), request_id, "http", "prompt")
        model, created = self.config.served_model_id, int(time.time())
        if body.stream:
            events = await _started(events)
            return StreamingResponse(self._completion_stream(events, completion_id, model, created, body.include_usage), media_type="text/event-stream")
        text, last = await self._collect(events)
        return JSONResponse(
            CompletionResponse(
                id=completion_id,
                created=created,
                model=model,
                choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)],
                usage=_usage(last),
                cast=_cast_stats(last.stats),
            ).model_dump()
        )

    async def _completion_stream(self, events: AsyncIterator[StepEvent], request_id: str, model: str, created: int, include_usage: bool) -> AsyncIterator[str]:
        try:
            last = None
            async for event in events:
                last = event
                if event.text or event.finish_reason:
                    yield _sse(
                        CompletionResponse(
                            id=request_id,
                            created=created,
                            model=model,
                            choices=[CompletionChoice(text=event.text, finish_reason=event.finish_reason)],
                            cast=_cast_stats(event.stats) if event.finish_reason else None,
                        )
                    )
            if include_usage and last is not None:
                yield _sse(CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=_usage(last)))
            yield "data: [DONE]\n\n"
        except RequestError as err:
            yield _sse_error(err)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={400: {"model": ErrorResponse}, 429: {"model": ErrorResponse}})
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI-compatible chat completion (streamed as SSE when ``stream`` is true)."""
        self._check_model(body.model)
        self._check_messages(len(body.messages))
        prompt = self.encoder.render_chat([{"role": m.role, "content": m.content} for m in body.messages])
        ids = self.encoder.encode(prompt, "messages")
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        request_id = request.headers.get(REQUEST_ID_HEADER) or completion_id
        events = await self._admit(ids, body.chat_params(), request_id, "http", "messages")
        model, created = self.config.served_model_id, int(time.time())
        if body.stream:
            events = await _started(events)
            return StreamingResponse(self._chat_stream(events, completion_id, model, created, body.include_usage), media_type="text/event-stream")
        text, last = await self._collect(events)
        return JSONResponse(
            ChatCompletionResponse(
                id=completion_id,
                created=created,
                model=model,
                choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=last.finish_reason)],
                usage=_usage(last),
                cast=_cast_stats(last.stats),
            ).model_dump()
        )

    async def _chat_stream(self, events: AsyncIterator[StepEvent], request_id: str, model: str, created: int, include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: AssistantMessage, finish: str | None = None, **extra: Any) -> str:
            return _sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[ChatChunkChoice(delta=delta, finish_reason=finish)], **extra))

        try:
            yield chunk(AssistantMessage(role="assistant", content=""))
            last = None
            async for event in events:
                last = event
                if event.text or event.finish_reason:
                    stats = _cast_stats(event.stats) if event.finish_reason else None
                    yield chunk(AssistantMessage(role=None, content=event.text), event.finish_reason, cast=stats)
            if include_usage and last is not None:
                yield _sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[], usage=_usage(last)))
            yield "data: [DONE]\n\n"
        except RequestError as err:
            yield _sse_error(err)

    @staticmethod
    async def _collect(events: AsyncIterator[StepEvent]) -> tuple[str, StepEvent]:
        parts: list[str] = []
        last: StepEvent | None = None
        async for event in events:
            parts.append(event.text)
            last = event
        assert last is not None
        return "".join(parts), last

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        """The served model."""
        return ModelList(data=[self._model_card()])

    def _model_card(self) -> ModelCard:
        return ModelCard(
            id=self.config.served_model_id,
            created=self.started,
            drafter=self.config.drafter,
            max_context_tokens=self.encoder.context_window,
        )

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 when the planner answers and at least one verifier replica reports; 503 otherwise."""
        ok, detail = await self._healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable", "detail": detail}, status_code=200 if ok else 503)

    # --- gRPC (cast.v1.Cast) ----------------------------------------------------------------

    def _grpc_authenticate(self, context: RayServegRPCContext) -> dict[str, str]:
        """The call's metadata, once its ``authorization`` entry passed the API key check."""
        metadata = {key.lower(): value for key, value in context.invocation_metadata() if isinstance(value, str)}
        self.api_keys.verify(metadata.get("authorization"))
        return metadata

    def _grpc_request(self, request: cast_pb2.GenerateRequest | bytes, context: RayServegRPCContext) -> tuple[list[int], GenerationParams, str, str]:
        """Authenticate and validate; the prompt ids, parameters, request id and the prompt's field name."""
        metadata = self._grpc_authenticate(context)
        if not isinstance(request, cast_pb2.GenerateRequest):  # bytes the lenient parser could not decode
            raise InvalidRequest("request: not a valid cast.v1.GenerateRequest protobuf message", "request")
        request_id = (
            check_request_id(request.request_id, "request_id")
            or check_request_id(metadata.get(REQUEST_ID_HEADER), REQUEST_ID_HEADER)
            or f"grpc-{uuid.uuid4().hex}"
        )
        context.set_trailing_metadata([(REQUEST_ID_HEADER, request_id)])
        self._check_model(request.model)
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidRequest("input: set prompt or messages", "input")
        if which == "prompt":
            ids = self.encoder.encode(request.prompt, "prompt")
        else:
            self._check_messages(len(request.messages.messages))
            messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            for i, m in enumerate(messages):
                if m["role"] not in ("system", "user", "assistant"):
                    raise InvalidRequest(f"messages[{i}].role: must be system, user or assistant; got {m['role'][:32]!r}", "messages")
            ids = self.encoder.encode(self.encoder.render_chat(messages), "messages")
        fields: dict[str, Any] = {"stop": list(request.stop)}
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "policy"):
            if request.HasField(name):
                fields[name] = getattr(request, name)
        try:
            params = GenerationParams(**fields)
        except ValidationError as err:
            raise validation_error(err) from None
        return ids, params, request_id, which

    @staticmethod
    def _grpc_error(context: RayServegRPCContext, err: Exception) -> None:
        """Set the status code and details; the caller re-raises (Serve keeps the code set here)."""
        if isinstance(err, RequestError):
            context.set_code(getattr(grpc.StatusCode, err.grpc_code))
            context.set_details(err.message[:GRPC_DETAILS_MAX_CHARS])
        else:
            logger.exception("gRPC request failed")
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(f"{type(err).__name__}: {err}"[:GRPC_DETAILS_MAX_CHARS])

    async def Generate(self, request: cast_pb2.GenerateRequest, grpc_context: RayServegRPCContext) -> cast_pb2.GenerateResponse:
        """Unary generation."""
        try:
            ids, params, request_id, prompt_param = self._grpc_request(request, grpc_context)
            events = await self._admit(ids, params, request_id, "grpc", prompt_param)
            token_ids: list[int] = []
            text, last = "", None
            async for event in events:
                token_ids.extend(event.token_ids)
                text += event.text
                last = event
            assert last is not None
            return cast_pb2.GenerateResponse(
                text=text,
                token_ids=token_ids,
                finish_reason=_GRPC_FINISH[last.finish_reason],
                usage=cast_pb2.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens),
                spec=_spec_pb(last.stats),
                request_id=request_id,
                model=self.config.served_model_id,
            )
        except Exception as err:
            self._grpc_error(grpc_context, err)
            raise

    async def GenerateStream(self, request: cast_pb2.GenerateRequest, grpc_context: RayServegRPCContext) -> AsyncIterator[cast_pb2.GenerateChunk]:
        """Server-streaming generation: one chunk per step that commits tokens."""
        try:
            ids, params, request_id, prompt_param = self._grpc_request(request, grpc_context)
            events = await self._admit(ids, params, request_id, "grpc", prompt_param)
            async for event in events:
                chunk = cast_pb2.GenerateChunk(text=event.text, token_ids=event.token_ids, request_id=request_id)
                if event.finish_reason:
                    chunk.finish_reason = _GRPC_FINISH[event.finish_reason]
                    chunk.usage.CopyFrom(cast_pb2.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens))
                    chunk.spec.CopyFrom(_spec_pb(event.stats))
                if event.token_ids or event.text or event.finish_reason:
                    yield chunk
        except Exception as err:
            self._grpc_error(grpc_context, err)
            raise

    async def Health(self, request: cast_pb2.HealthRequest) -> cast_pb2.HealthResponse:
        """SERVING when the planner answers and a verifier replica reports."""
        ok, detail = await self._healthy()
        status = cast_pb2.HealthResponse.SERVING_STATUS_SERVING if ok else cast_pb2.HealthResponse.SERVING_STATUS_NOT_SERVING
        return cast_pb2.HealthResponse(status=status, message=detail)

    async def ListModels(self, request: cast_pb2.ListModelsRequest, grpc_context: RayServegRPCContext) -> cast_pb2.ListModelsResponse:
        """The served model (API key checked; ``Health`` stays open)."""
        try:
            self._grpc_authenticate(grpc_context)
        except RequestError as err:
            self._grpc_error(grpc_context, err)
            raise
        card = self._model_card()
        return cast_pb2.ListModelsResponse(models=[cast_pb2.ModelInfo(id=card.id, drafter=card.drafter, max_context_tokens=card.max_context_tokens)])

    # --- introspection (tests, debugging) ---------------------------------------------------

    async def debug_state(self) -> dict[str, Any]:
        """DraftTree deserialisations in this process, admission counters, finished spans."""
        await self.runner.drain()
        return {
            "tree_unpickles": tree_unpickle_count(),
            "active": self.admission.active,
            "waiting": self.admission.waiting,
            "spans": [
                {"name": s.name, "attributes": dict(s.attributes or {}), "parent": s.parent.span_id if s.parent else None, "span_id": s.context.span_id}
                for s in self.tracing.finished_spans()
            ],
        }
