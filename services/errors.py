"""Request errors the ingress maps to HTTP status codes and gRPC status codes."""

from __future__ import annotations


class RequestError(Exception):
    """Base of the errors a client sees; ``param`` names the offending request field."""

    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "server_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(RequestError):
    """Malformed request: HTTP 400, gRPC INVALID_ARGUMENT."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"


class Overloaded(RequestError):
    """Admission queue full: HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "rate_limit_error"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"server overloaded: admission queue is full; retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s


class Unavailable(RequestError):
    """No replica could serve the request: HTTP 503, gRPC UNAVAILABLE."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "server_error"
