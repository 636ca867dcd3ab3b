"""The public gRPC API, ``cast.v1.Cast``, as Python modules generated from ``protos/cast/v1/cast.proto``.

    from services.grpc_api import cast_pb2, cast_pb2_grpc

    stub = cast_pb2_grpc.CastStub(channel)
    reply = stub.Generate(cast_pb2.GenerateRequest(prompt="Hello", max_tokens=16))

The modules are build outputs (``make protos`` / ``python -m services.grpc_api.codegen``). When they
are missing or older than the proto -- a fresh clone, or the proto just edited -- importing this
package regenerates them first, so the import above always works in a source checkout. Ray Serve's
gRPC proxy imports ``services.grpc_api.lenient.add_cast_servicer`` (the servicer registration with
lenient request parsing) through here.

This package stays light: protobuf and grpc only, never ray or torch.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from types import ModuleType


def _load_codegen() -> ModuleType:
    """Load ``codegen.py`` under a private name.

    Importing it as ``services.grpc_api.codegen`` from here would make
    ``python -m services.grpc_api.codegen`` run a module that is already imported (runpy warns).
    """
    spec = importlib.util.spec_from_file_location("_cast_grpc_api_codegen", Path(__file__).with_name("codegen.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ensure_generated() -> None:
    """Regenerate the modules when missing or stale; keep stale ones (with a warning) if that fails."""
    codegen = _load_codegen()
    if not codegen.is_stale():
        return
    try:
        codegen.generate()
    except (OSError, codegen.CodegenError) as exc:
        if codegen.missing():
            raise ImportError(
                f"services.grpc_api: generated modules are missing and generation failed ({exc}); "
                "run `python -m services.grpc_api.codegen`"
            ) from exc
        warnings.warn(
            f"services.grpc_api: generated modules are older than the proto and were not regenerated: {exc}",
            stacklevel=2,
        )


_ensure_generated()

from services.grpc_api import cast_pb2, cast_pb2_grpc  # noqa: E402  (generated just above if needed)

__all__ = ["cast_pb2", "cast_pb2_grpc"]
