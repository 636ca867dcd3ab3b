"""OpenAI-compatible request and response bodies (``/v1/completions``, ``/v1/chat/completions``).

Supported: one prompt (text or token ids) or one conversation per request,
``max_tokens`` (chat: also ``max_completion_tokens``), ``temperature``, ``top_p``,
``seed``, ``stop``, ``stream`` (+ ``stream_options.include_usage``), ``n = 1``.
Extensions: ``top_k`` and ``policy`` in requests; every response (the last
chunk when streaming) carries ``cast``, the request's speculative decoding
statistics::

    "cast": {"steps": 12,                  # draft -> verify steps
             "mean_accepted_length": 2.67, # tokens committed per step (accepted drafts + bonus)
             "draft_tokens": 240,          # tree nodes drafted, all steps
             "accepted_tokens": 20,        # drafted tokens accepted, all steps
             "mean_tree_nodes": 20.0,      # drafted nodes per step (before reranking)
             "mean_verified_tokens": 9.5,  # tree nodes verified per step (root included)
             "reopens": 0}                 # sessions re-opened after a replica lost them

Requests are checked strictly: an unknown field is a 400 "Unrecognized request
argument supplied: <name>" (OpenAI's convention); OpenAI fields this server
does not implement (``n``, ``echo``, ``logprobs``, ``best_of``, ``suffix``,
penalties, ``logit_bias``, ``top_logprobs``) pass only at their neutral value.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with status 400
(invalid field, named in ``param``), 401 (API key), 413 (body too large), 415
(not JSON), 429 (overloaded, with ``Retry-After``), 503 (no replica) or 500.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from services.config import PolicyName
from services.errors import RequestError
from services.generation import GenerationParams

SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def _utf8(value: str) -> str:
    """Reject strings that cannot be encoded as UTF-8 (JSON escapes of lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]


def only(*neutral: Any) -> AfterValidator:
    """Validator of an OpenAI field this server does not implement: only its neutral values pass."""

    def check(value: Any) -> Any:
        if value not in neutral:
            raise ValueError(f"not supported by this server; use {' or '.join(json.dumps(n) for n in neutral)} or leave it out")
        return value

    return AfterValidator(check)


class StreamOptions(BaseModel):
    """Streaming options."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk with usage (and empty choices).")


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints; unknown fields are refused (OpenAI: "Unrecognized request argument")."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = Field(None, description="Model id from /v1/models; None = the served model.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most; None = server default.")
    temperature: float | None = Field(None, ge=0, le=100, allow_inf_nan=False, description="Sampling temperature; 0 = greedy; None = server default.")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass in (0, 1].")
    top_k: int = Field(0, ge=0, le=1 << 31, description="Extension: sample from the k most likely tokens; 0 = all.")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="Seed of the sampler (reproducible sampled output).")
    stop: Text | list[Text] | None = Field(None, description="Stop string(s); generation ends before the first one.")
    stream: bool = Field(False, description="Stream the completion as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (include_usage).")
    n: int = Field(1, ge=1, le=1, description="Number of completions; only 1 is supported.")
    policy: PolicyName | None = Field(None, description="Extension: tree policy for this request: the server's, or 'none'.")
    user: Text | None = Field(None, max_length=256, description="End-user id (not used).")
    presence_penalty: Annotated[float | None, only(None, 0)] = Field(
        None, description="Not supported: only 0 or null."
    )
    frequency_penalty: Annotated[float | None, only(None, 0)] = Field(
        None, description="Not supported: only 0 or null."
    )
    logit_bias: Annotated[dict[str, float] | None, only(None, {})] = Field(
        None, description="Not supported: only null or {}."
    )

    def generation_params(self, max_tokens: int | None = None) -> GenerationParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationParams(
            max_tokens=max_tokens if max_tokens is not None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stop,
            policy=self.policy,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: Text | list[int] = Field(description="The prompt: text, or token ids.")
    echo: Literal[False] = Field(False, description="Echo the prompt; not supported (must be false).")
    logprobs: None = Field(None, description="Log probabilities; not supported (must be null).")
    best_of: Literal[1] | None = Field(None, description="Not supported: only 1 or null.")
    suffix: None = Field(None, description="Not supported: must be null.")


class ChatMessage(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"] = Field(description="Speaker of the turn.")
    content: Text = Field(description="Text of the turn.")
    name: Text | None = Field(None, max_length=64, description="Name of the speaker (accepted, not used).")


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, oldest turn first.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (newer clients).")
    logprobs: Literal[False] | None = Field(None, description="Log probabilities; not supported (false or null).")
    top_logprobs: None = Field(None, description="Not supported: must be null.")

    def chat_params(self) -> GenerationParams:
        return self.generation_params(self.max_completion_tokens)


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int = Field(description="Tokens in the (rendered) prompt.")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class CastStats(BaseModel):
    """The ``cast`` extension field: speculative decoding statistics (see module docstring)."""

    steps: int = Field(description="Draft -> verify steps.")
    mean_accepted_length: float = Field(description="Tokens committed per step (accepted drafts + bonus).")
    draft_tokens: int = Field(description="Tree nodes drafted over all steps.")
    accepted_tokens: int = Field(description="Drafted tokens accepted over all steps.")
    mean_tree_nodes: float = Field(description="Drafted nodes per step (before reranking).")
    mean_verified_tokens: float = Field(description="Tree nodes verified per step, root included.")
    reopens: int = Field(description="Sessions re-opened after a replica lost them.")


class CompletionChoice(BaseModel):
    """One completion choice (also a streamed chunk's choice)."""

    index: int = Field(0, description="Choice index (always 0).")
    text: str = Field(description="Generated text (a chunk: the text since the previous chunk).")
    finish_reason: Literal["stop", "length"] | None = Field(None, description="Why generation ended; null until the end.")
    logprobs: None = Field(None, description="Not supported; always null.")


class CompletionResponse(BaseModel):
    """Body of a non-streamed completion, and of each streamed chunk."""

    id: str = Field(description="Request id.")
    object: Literal["text_completion"] = Field("text_completion", description="Object type.")
    created: int = Field(description="Unix time the request was created.")
    model: str = Field(description="Model id.")
    choices: list[CompletionChoice] = Field(description="One choice (empty in a usage-only chunk).")
    usage: Usage | None = Field(None, description="Token usage (streaming: last chunk, if asked for).")
    cast: CastStats | None = Field(None, description="Speculative decoding statistics (streaming: last chunk).")


class AssistantMessage(BaseModel):
    """The assistant's reply (a streamed chunk's ``delta`` has the same fields, both optional)."""

    role: Literal["assistant"] | None = Field("assistant", description="Always 'assistant' (first chunk only when streaming).")
    content: str | None = Field(None, description="Text (a chunk: the text since the previous chunk).")


class ChatChoice(BaseModel):
    """One chat choice."""

    index: int = Field(0, description="Choice index (always 0).")
    message: AssistantMessage = Field(description="The reply.")
    finish_reason: Literal["stop", "length"] | None = Field(None, description="Why generation ended.")


class ChatChunkChoice(BaseModel):
    """One streamed chat choice."""

    index: int = Field(0, description="Choice index (always 0).")
    delta: AssistantMessage = Field(description="What this chunk adds.")
    finish_reason: Literal["stop", "length"] | None = Field(None, description="Why generation ended; null until the end.")


class ChatCompletionResponse(BaseModel):
    """Body of a non-streamed chat completion."""

    id: str = Field(description="Request id.")
    object: Literal["chat.completion"] = Field("chat.completion", description="Object type.")
    created: int = Field(description="Unix time the request was created.")
    model: str = Field(description="Model id.")
    choices: list[ChatChoice] = Field(description="One choice.")
    usage: Usage = Field(description="Token usage.")
    cast: CastStats = Field(description="Speculative decoding statistics.")


class ChatCompletionChunk(BaseModel):
    """One streamed chat chunk."""

    id: str = Field(description="Request id.")
    object: Literal["chat.completion.chunk"] = Field("chat.completion.chunk", description="Object type.")
    created: int = Field(description="Unix time the request was created.")
    model: str = Field(description="Model id.")
    choices: list[ChatChunkChoice] = Field(description="One choice (empty in a usage-only chunk).")
    usage: Usage | None = Field(None, description="Token usage (last chunk, if asked for).")
    cast: CastStats | None = Field(None, description="Speculative decoding statistics (last chunk).")


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str = Field(description="Model id.")
    object: Literal["model"] = Field("model", description="Object type.")
    created: int = Field(description="Unix time the server started.")
    owned_by: str = Field("cast", description="Owner.")
    drafter: str = Field(description="Extension: the drafter model paired with it.")
    max_context_tokens: int = Field(description="Extension: context window in tokens.")


class ModelList(BaseModel):
    """Body of ``GET /v1/models``."""

    object: Literal["list"] = Field("list", description="Object type.")
    data: list[ModelCard] = Field(description="Served models.")


class ErrorDetail(BaseModel):
    """OpenAI-style error."""

    message: str = Field(description="What went wrong.")
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error.")
    param: str | None = Field(None, description="The offending request field, if any.")
    code: str | None = Field(None, description="Machine-readable code, if any.")


class ErrorResponse(BaseModel):
    """Body of every error response."""

    error: ErrorDetail = Field(description="The error.")


def error_response(err: RequestError) -> JSONResponse:
    """OpenAI-style JSON error body with the error's HTTP status and headers (Retry-After, WWW-Authenticate)."""
    body = ErrorResponse(error=ErrorDetail(message=err.message, type=err.error_type, param=err.param, code=err.code))
    return JSONResponse(body.model_dump(), status_code=err.http_status, headers=err.headers() or None)
