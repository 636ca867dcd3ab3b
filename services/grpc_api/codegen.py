"""Generate the Python gRPC modules of the public API from ``protos/cast/v1/cast.proto``.

Run ``python -m services.grpc_api.codegen`` (``make protos`` does) to write, next to this file:

- ``cast_pb2.py``      messages (``cast.v1.GenerateRequest`` ...),
- ``cast_pb2.pyi``     type stubs for them,
- ``cast_pb2_grpc.py`` ``CastStub``, ``CastServicer``, ``add_CastServicer_to_server``.

The command it runs is, from any working directory::

    python -m grpc_tools.protoc \\
        -Iservices/grpc_api=<repo>/protos/cast/v1 -I<grpc_tools>/_proto \\
        --python_out=<out> --pyi_out=<out> --grpc_python_out=<out> \\
        <repo>/protos/cast/v1/cast.proto

The ``-I<virtual>=<real>`` mapping makes protoc see the proto as ``services/grpc_api/cast.proto``,
so the generated gRPC module imports ``from services.grpc_api import cast_pb2`` (an absolute,
installable import) instead of a bare ``import cast_pb2``; the files land in
``<out>/services/grpc_api/``. Generation goes through a temporary directory and each file is
moved into place with ``os.replace``, so concurrent importers never see a half-written module.

The generated files are git-ignored build outputs: never edit them, change the proto and rerun.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

PACKAGE = "services.grpc_api"
"""Python package the generated modules belong to (their import path)."""

PACKAGE_DIR = Path(__file__).resolve().parent
"""Where the generated modules are written by default (this package)."""

REPO_ROOT = PACKAGE_DIR.parents[1]
"""Repository root in a source checkout (meaningless once installed as a wheel)."""

PROTO_FILE = REPO_ROOT / "protos" / "cast" / "v1" / "cast.proto"
"""The API definition, the single source of truth."""

GENERATED_FILES = ("cast_pb2.py", "cast_pb2.pyi", "cast_pb2_grpc.py")
"""Files one generation produces, relative to the package directory."""

RUNTIME_MODULES = ("cast_pb2.py", "cast_pb2_grpc.py")
"""The generated files imports need (a wheel may ship the modules without the ``.pyi`` stub)."""


class CodegenError(RuntimeError):
    """protoc failed (its diagnostics went to stderr)."""


def protoc_args(proto_file: Path, out_root: Path) -> list[str]:
    """Return the ``grpc_tools.protoc`` argv that generates ``proto_file`` under ``out_root``.

    Output lands in ``out_root/services/grpc_api/`` because the proto's directory is mapped
    to the virtual path ``services/grpc_api``.
    """
    virtual_dir = PACKAGE.replace(".", "/")
    well_known_types = resources.files("grpc_tools") / "_proto"
    return [
        "grpc_tools.protoc",
        f"-I{virtual_dir}={proto_file.resolve().parent}",
        f"-I{well_known_types}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(proto_file.resolve()),
    ]


def generate(proto_file: Path = PROTO_FILE, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Generate the modules of ``proto_file`` into ``package_dir`` and return their paths.

    Raises ``FileNotFoundError`` when the proto is missing and ``CodegenError`` when protoc fails;
    existing modules are left untouched in both cases.
    """
    from grpc_tools import protoc  # deferred: only generation needs the compiler

    if not proto_file.is_file():
        raise FileNotFoundError(f"proto not found: {proto_file}")
    package_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".codegen-", dir=package_dir) as tmp:
        status = protoc.main(protoc_args(proto_file, Path(tmp)))
        if status != 0:
            raise CodegenError(f"protoc exited with status {status} for {proto_file}")
        produced = Path(tmp, *PACKAGE.split("."))
        written = []
        for name in GENERATED_FILES:
            target = package_dir / name
            os.replace(produced / name, target)
            written.append(target)
    return written


def missing(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Return the generated runtime modules absent from ``package_dir``."""
    return [package_dir / name for name in RUNTIME_MODULES if not (package_dir / name).is_file()]


def is_stale(proto_file: Path = PROTO_FILE, package_dir: Path = PACKAGE_DIR) -> bool:
    """True when a generated module is missing or older than the proto.

    Without the proto (an installed wheel ships only the generated modules) only missing
    modules count.
    """
    if missing(package_dir):
        return True
    if not proto_file.is_file():
        return False
    oldest = min((package_dir / name).stat().st_mtime_ns for name in RUNTIME_MODULES)
    return oldest < proto_file.stat().st_mtime_ns


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: generate the modules and list the files written."""
    parser = argparse.ArgumentParser(prog="python -m services.grpc_api.codegen", description=__doc__.splitlines()[0])
    parser.add_argument("--proto", type=Path, default=PROTO_FILE, help="proto file to compile")
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help="package directory to write into")
    args = parser.parse_args(argv)
    try:
        written = generate(args.proto, args.out)
    except (FileNotFoundError, CodegenError) as exc:
        print(f"codegen: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
