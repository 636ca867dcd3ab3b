"""Ingress security: API keys compared in constant time, client request ids, the HTTP guard middleware.

* API keys (``SecurityConfig.api_keys`` plus the comma-separated environment
  variable ``SecurityConfig.api_keys_env``, default ``CAST_API_KEYS``, read in
  the router replica): HTTP ``Authorization: Bearer <key>``, gRPC metadata
  ``authorization: Bearer <key>``. The presented key is compared with
  ``hmac.compare_digest`` against every configured key, without stopping at a
  match. Keys live as ``SecretStr`` (``**********`` in reprs and dumps) and
  are never logged nor echoed. No key configured = no authentication.
  ``/health`` (and gRPC ``Health``) stay open for load balancers and probes.
* Request ids: a client ``X-Request-Id`` (gRPC: the ``request_id`` field, or
  ``x-request-id`` metadata) of 1-128 characters ``[A-Za-z0-9._:-]`` starting
  alphanumeric; anything else is a 400 naming the header.
* ``HttpGuard`` (ASGI middleware of the router's FastAPI app) checks, before
  any body parsing: request id, API key, body size (413), content type (415)
  and UTF-8 validity of the body (400); with ``cors_allow_origins`` set it
  wraps the whole app in Starlette's ``CORSMiddleware`` (off by default).
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.config import AppConfig, SecurityConfig
from services.errors import InvalidRequest, PayloadTooLarge, RequestError, Unauthenticated, UnsupportedMediaType
from services.openai_api import error_response

REQUEST_ID_HEADER = "x-request-id"
OPEN_PATHS = frozenset({"/health"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def check_request_id(value: str | None, param: str) -> str | None:
    """``value`` when it is a valid request id, None when absent or empty; ``InvalidRequest`` otherwise."""
    if not value:
        return None
    if not _REQUEST_ID.fullmatch(value):
        raise InvalidRequest(f"{param}: must be 1-128 characters of [A-Za-z0-9._:-], starting with a letter or digit", param)
    return value


class ApiKeys:
    """The accepted API keys; ``verify`` raises ``Unauthenticated`` unless the bearer token is one of them."""

    def __init__(self, keys: Iterable[SecretStr]) -> None:
        self._keys = [k.get_secret_value().encode() for k in keys if k.get_secret_value()]

    @classmethod
    def from_config(cls, config: SecurityConfig, environ: Mapping[str, str] = os.environ) -> "ApiKeys":
        """Keys of the config plus those of the ``api_keys_env`` variable (comma-separated)."""
        from_env = [SecretStr(k.strip()) for k in environ.get(config.api_keys_env, "").split(",") if k.strip()]
        return cls([*config.api_keys, *from_env])

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} keys)"

    def verify(self, authorization: str | None) -> None:
        """Check an ``Authorization`` value (``Bearer <key>``) in constant time against every key."""
        if not self._keys:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        presented = token.strip().encode() if scheme.lower() == "bearer" else b""
        matched = False
        for key in self._keys:  # no early exit: the time does not depend on which key matched
            matched |= hmac.compare_digest(presented, key)
        if not (matched and presented):
            raise Unauthenticated()


@dataclass(frozen=True)
class GuardSettings:
    """What ``HttpGuard`` enforces."""

    keys: ApiKeys
    max_body_bytes: int
    cors_allow_origins: tuple[str, ...]

    @classmethod
    def from_config(cls, config: AppConfig) -> "GuardSettings":
        return cls(ApiKeys.from_config(config.security), config.limits.max_body_bytes, tuple(config.security.cors_allow_origins))


_installed: GuardSettings | None = None


def install(settings: GuardSettings) -> None:
    """Settings of the ``HttpGuard`` of this process (the router replica calls it in its constructor).

    Serve freezes a copy of the FastAPI app, middleware included, when the
    deployment class is defined; the replica's config only exists later, so the
    guard reads it from here (one router replica per process).
    """
    global _installed
    _installed = settings


class HttpGuard:
    """ASGI middleware: request id, API key, body size, content type and UTF-8 checks; CORS when configured."""

    def __init__(self, app: ASGIApp, settings: GuardSettings | None = None) -> None:
        self.app = app
        self._settings = settings
        self._cors: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self._settings or _installed
        if scope["type"] != "http" or settings is None:
            await self.app(scope, receive, send)
        elif settings.cors_allow_origins:
            if self._cors is None:

                async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
                    await self._guard(settings, scope, receive, send)

                self._cors = CORSMiddleware(
                    guarded,
                    allow_origins=list(settings.cors_allow_origins),
                    allow_methods=["GET", "POST", "OPTIONS"],
                    allow_headers=["authorization", "content-type", REQUEST_ID_HEADER],
                    expose_headers=[REQUEST_ID_HEADER],
                )
            await self._cors(scope, receive, send)
        else:
            await self._guard(settings, scope, receive, send)

    async def _guard(self, settings: GuardSettings, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        try:
            check_request_id(headers.get(REQUEST_ID_HEADER), REQUEST_ID_HEADER)
            if scope["path"] not in OPEN_PATHS:
                settings.keys.verify(headers.get("authorization"))
            if scope["method"] in _BODY_METHODS:
                replay = await _read_body(headers, receive, settings.max_body_bytes)
                if replay is None:
                    return  # the client left before sending its body
                receive = replay
        except RequestError as err:
            await error_response(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _read_body(headers: Headers, receive: Receive, max_bytes: int) -> Receive | None:
    """Read the whole body (at most ``max_bytes``), check it is UTF-8 JSON; a ``receive`` that replays it."""
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise PayloadTooLarge(f"body: {length} bytes exceed the limit of {max_bytes}", "body")
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(f"content-type: must be application/json; got {media_type or 'none'!r}", "content-type")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"body: more than {max_bytes} bytes", "body")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidRequest(f"body: not valid UTF-8 (byte {err.start})", "body") from None
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
