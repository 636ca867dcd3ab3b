"""Registration of the ``cast.v1.Cast`` servicer whose request parsing never fails the call.

Ray Serve's gRPC proxy keeps the request deserializer of the registered handlers.
The generated ``cast_pb2_grpc.add_CastServicer_to_server`` parses with
``FromString``: bytes that are no protobuf message raise ``DecodeError`` inside
the grpc server, which answers ``UNKNOWN`` before the app sees the call.
``add_cast_servicer`` registers the same methods (read from the proto's service
descriptor) with a deserializer that hands such bytes through unparsed, so the
Router answers them ``INVALID_ARGUMENT`` like any other bad request. Serve's
``grpc_servicer_functions`` names it:
``services.grpc_api.lenient.add_cast_servicer``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from services.grpc_api import cast_pb2

SERVICE = "cast.v1.Cast"


def lenient_parser(message_type: type[Message]) -> Callable[[bytes], Message | bytes]:
    """``message_type.FromString``, returning the raw bytes when they do not decode."""

    def parse(raw: bytes) -> Message | bytes:
        try:
            return message_type.FromString(raw)
        except DecodeError:
            return raw

    return parse


def add_cast_servicer(servicer: Any, server: Any) -> None:
    """Register ``servicer``'s methods of ``cast.v1.Cast`` on ``server`` with lenient request parsing."""
    service = cast_pb2.DESCRIPTOR.services_by_name[SERVICE.rsplit(".", 1)[1]]
    handlers = {}
    for method in service.methods:
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=lenient_parser(getattr(cast_pb2, method.input_type.name)),
            response_serializer=getattr(cast_pb2, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
