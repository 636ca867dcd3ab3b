"""Request errors the ingress maps to HTTP status codes and gRPC status codes."""

from __future__ import annotations


class RequestError(Exception):
    """Base of the errors a client sees; ``param`` names the offending request field."""

    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        """Extra HTTP response headers: ``Retry-After`` when the error carries ``retry_after_s``."""
        retry_after_s = getattr(self, "retry_after_s", None)
        return {"Retry-After": str(retry_after_s)} if retry_after_s is not None else {}


class InvalidRequest(RequestError):
    """Malformed request: HTTP 400, gRPC INVALID_ARGUMENT."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    """Request body over ``limits.max_body_bytes``: HTTP 413."""

    http_status = 413
    code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    """A body that is not ``application/json``: HTTP 415."""

    http_status = 415
    code = "unsupported_media_type"


class Unauthenticated(RequestError):
    """Missing or wrong API key: HTTP 401 with ``WWW-Authenticate: Bearer``, gRPC UNAUTHENTICATED.

    The message never repeats what the client presented.
    """

    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    error_type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self) -> None:
        super().__init__("missing or invalid API key: send 'Authorization: Bearer <key>'", "authorization")

    def __reduce__(self) -> tuple[type, tuple[()]]:
        # crosses the replica -> proxy boundary pickled (gRPC): rebuild without arguments
        return type(self), ()

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Overloaded(RequestError):
    """Admission queue full: HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "rate_limit_error"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"server overloaded: admission queue is full; retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return type(self), (self.retry_after_s,)


class Unavailable(RequestError):
    """No replica could serve the request: HTTP 503, gRPC UNAVAILABLE."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "server_error"
