"""The public gRPC API: code generation, messages, stubs and a real in-process server.

Covers ``protos/cast/v1/cast.proto`` through ``services.grpc_api`` (codegen + generate-on-import)
and a ``grpc.server`` on 127.0.0.1 answering over a real channel. No Ray here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from services.grpc_api import cast_pb2, cast_pb2_grpc, codegen

REPO = Path(__file__).resolve().parents[1]
PROTO = REPO / "protos" / "cast" / "v1" / "cast.proto"

pytestmark = pytest.mark.timeout(60)


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter whose first import root is ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(cwd)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


# --- code generation ---------------------------------------------------------------------------


def test_codegen_from_scratch_into_tmp(tmp_path: Path) -> None:
    package_dir = tmp_path / "services" / "grpc_api"
    written = codegen.generate(PROTO, package_dir)

    assert sorted(p.name for p in written) == sorted(codegen.GENERATED_FILES)
    grpc_module = (package_dir / "cast_pb2_grpc.py").read_text()
    assert "from services.grpc_api import cast_pb2 as " in grpc_module
    assert "\nimport cast_pb2" not in grpc_module
    assert not [p for p in package_dir.iterdir() if p.name.startswith(".codegen-")], "temp dir left behind"
    # Deterministic: the same bytes as the package's own modules.
    for name in ("cast_pb2.py", "cast_pb2_grpc.py"):
        assert (package_dir / name).read_bytes() == (codegen.PACKAGE_DIR / name).read_bytes()

    # The generated tree imports on its own, as `services.grpc_api.*`.
    (tmp_path / "services" / "__init__.py").write_text("")
    (package_dir / "__init__.py").write_text("")
    result = _run_python(
        "import services.grpc_api.cast_pb2_grpc as m; print(m.__file__); print(m.CastStub.__name__)", tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(package_dir / "cast_pb2_grpc.py"), "CastStub"]


def test_codegen_command_line(tmp_path: Path) -> None:
    out = tmp_path / "services" / "grpc_api"
    result = subprocess.run(
        [sys.executable, "-m", "services.grpc_api.codegen", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr
    assert {p.name for p in out.iterdir()} == set(codegen.GENERATED_FILES)


def test_codegen_reports_protoc_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.proto"
    bad.write_text('syntax = "proto3";\nmessage Broken { string x = ; }\n')
    with pytest.raises(codegen.CodegenError):
        codegen.generate(bad, tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        codegen.generate(tmp_path / "absent.proto", tmp_path / "out")


def _checkout_copy(root: Path) -> Path:
    """A source checkout with only what the gRPC package needs (no generated modules)."""
    shutil.copytree(REPO / "protos", root / "protos")
    package = root / "services" / "grpc_api"
    package.mkdir(parents=True)
    (root / "services" / "__init__.py").write_text("")
    for name in ("__init__.py", "codegen.py"):
        shutil.copy2(codegen.PACKAGE_DIR / name, package / name)
    return package


def test_import_generates_on_fresh_checkout_and_when_proto_changes(tmp_path: Path) -> None:
    package = _checkout_copy(tmp_path)
    assert codegen.missing(package)

    probe = "from services.grpc_api import cast_pb2, cast_pb2_grpc; print(cast_pb2.__file__)"
    result = _run_python(probe, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(package / "cast_pb2.py")
    assert not codegen.missing(package)
    assert not codegen.is_stale(tmp_path / "protos/cast/v1/cast.proto", package)

    # Edit the proto: the next import regenerates, and the new message is there.
    proto = tmp_path / "protos/cast/v1/cast.proto"
    proto.write_text(proto.read_text() + "\n// Added in a test.\nmessage Extra {\n  // A field.\n  string x = 1;\n}\n")
    future = time.time() + 5
    os.utime(proto, (future, future))
    assert codegen.is_stale(proto, package)
    result = _run_python("from services.grpc_api import cast_pb2; print(cast_pb2.Extra(x='y').x)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "y"


def test_import_works_from_an_installed_layout_without_proto(tmp_path: Path) -> None:
    """A wheel ships the generated modules (maybe without the .pyi) and no protos/: nothing to do."""
    package = tmp_path / "site" / "services" / "grpc_api"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    for name in ("__init__.py", "codegen.py", *codegen.RUNTIME_MODULES):
        shutil.copy2(codegen.PACKAGE_DIR / name, package / name)
    probe = "from services.grpc_api import cast_pb2_grpc; print(cast_pb2_grpc.__file__)"
    result = _run_python(probe, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(package / "cast_pb2_grpc.py")
    assert sorted(p.name for p in package.iterdir() if p.is_file()) == sorted(
        ["__init__.py", "codegen.py", *codegen.RUNTIME_MODULES]
    ), "nothing regenerated"


def test_package_import_stays_light() -> None:
    result = _run_python(
        "import sys; import services.grpc_api; print(sorted(m for m in ('ray', 'torch') if m in sys.modules))", REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the API's shape ---------------------------------------------------------------------------


def test_service_and_stubs() -> None:
    service = cast_pb2.DESCRIPTOR.services_by_name["Cast"]
    assert service.full_name == "cast.v1.Cast"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "GenerateStream", "Health", "ListModels"}
    assert methods["GenerateStream"].server_streaming and not methods["Generate"].server_streaming
    assert methods["Generate"].output_type.name == "GenerateResponse"
    assert methods["GenerateStream"].output_type.name == "GenerateChunk"
    for name in ("CastStub", "CastServicer", "add_CastServicer_to_server"):
        assert callable(getattr(cast_pb2_grpc, name))


# Descriptor paths (descriptor.proto field numbers) of commentable elements.
_MESSAGE, _FIELD, _NESTED, _ENUM, _VALUE, _ONEOF, _SERVICE, _METHOD = 4, 2, 3, 5, 2, 8, 6, 2


def _commentable_paths(fd: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Every message, field, oneof, enum, enum value, service and rpc, keyed by its source path."""
    paths: dict[tuple[int, ...], str] = {}

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto, prefix: str) -> None:
        paths[path] = f"{prefix}{e.name}"
        for i, v in enumerate(e.value):
            paths[(*path, _VALUE, i)] = f"{prefix}{e.name}.{v.name}"

    def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        name = f"{prefix}{m.name}"
        paths[path] = name
        for i, f in enumerate(m.field):
            paths[(*path, _FIELD, i)] = f"{name}.{f.name}"
        for i, o in enumerate(m.oneof_decl):
            if not o.name.startswith("_"):  # synthetic oneofs of proto3 `optional`
                paths[(*path, _ONEOF, i)] = f"{name}.{o.name}"
        for i, n in enumerate(m.nested_type):
            message((*path, _NESTED, i), n, f"{name}.")
        for i, e in enumerate(m.enum_type):
            enum((*path, 4, i), e, f"{name}.")

    for i, m in enumerate(fd.message_type):
        message((_MESSAGE, i), m, "")
    for i, e in enumerate(fd.enum_type):
        enum((_ENUM, i), e, "")
    for i, s in enumerate(fd.service):
        paths[(_SERVICE, i)] = s.name
        for j, rpc in enumerate(s.method):
            paths[(_SERVICE, i, _METHOD, j)] = f"{s.name}.{rpc.name}"
    return paths


def test_every_element_of_the_proto_is_commented(tmp_path: Path) -> None:
    from grpc_tools import protoc

    out = tmp_path / "cast.pb"
    argv = ["protoc", f"-I{PROTO.parent}", "--include_source_info", f"--descriptor_set_out={out}", str(PROTO)]
    assert protoc.main(argv) == 0
    fd = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    assert fd.package == "cast.v1"
    comments = {
        tuple(loc.path): (loc.leading_comments + loc.trailing_comments).strip() for loc in fd.source_code_info.location
    }
    elements = _commentable_paths(fd)
    assert len(elements) > 60
    uncommented = sorted(name for path, name in elements.items() if not comments.get(path))
    assert uncommented == []


# --- messages ----------------------------------------------------------------------------------


def test_request_round_trip_and_oneof() -> None:
    chat = cast_pb2.GenerateRequest(
        messages=cast_pb2.ChatMessages(
            messages=[
                cast_pb2.ChatMessage(role="system", content="Be brief."),
                cast_pb2.ChatMessage(role="user", content="Hi"),
            ]
        ),
        max_tokens=32, temperature=0.0, top_p=0.9, top_k=40, seed=7, stop=["\n\n", "END"], policy="static",
        request_id="req-1", model="tiny",
    )
    decoded = cast_pb2.GenerateRequest.FromString(chat.SerializeToString())
    assert decoded == chat
    assert decoded.WhichOneof("input") == "messages"
    assert [m.role for m in decoded.messages.messages] == ["system", "user"]
    assert list(decoded.stop) == ["\n\n", "END"]
    # Presence: temperature=0 (greedy) is distinguishable from "unset".
    assert decoded.HasField("temperature") and decoded.temperature == 0.0
    assert decoded.HasField("seed") and decoded.seed == 7

    plain = cast_pb2.GenerateRequest(prompt="Once upon a time")
    decoded = cast_pb2.GenerateRequest.FromString(plain.SerializeToString())
    assert decoded.WhichOneof("input") == "prompt"
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "policy"):
        assert not decoded.HasField(name), name

    plain.messages.messages.add(role="user", content="switch")  # setting the other member clears prompt
    assert plain.WhichOneof("input") == "messages" and plain.prompt == ""
    assert cast_pb2.GenerateRequest().WhichOneof("input") is None


def test_response_and_chunk_round_trip() -> None:
    usage = cast_pb2.Usage(prompt_tokens=5, completion_tokens=3)
    spec = cast_pb2.SpecStats(
        steps=2, mean_accepted_length=1.5, draft_tokens=12, accepted_tokens=1,
        mean_tree_nodes=6.0, mean_verified_tokens=4.0,
    )
    response = cast_pb2.GenerateResponse(
        text="abc", token_ids=[1, 2, 3], finish_reason=cast_pb2.FINISH_REASON_LENGTH, usage=usage, spec=spec,
        request_id="r", model="tiny",
    )
    assert cast_pb2.GenerateResponse.FromString(response.SerializeToString()) == response

    first = cast_pb2.GenerateChunk(text="a", token_ids=[1])
    last = cast_pb2.GenerateChunk(
        text="bc", token_ids=[2, 3], finish_reason=cast_pb2.FINISH_REASON_STOP, usage=usage, spec=spec
    )
    for chunk in (first, last):
        assert cast_pb2.GenerateChunk.FromString(chunk.SerializeToString()) == chunk
    assert first.finish_reason == cast_pb2.FINISH_REASON_UNSPECIFIED
    assert not first.HasField("usage") and not first.HasField("spec")
    assert last.HasField("usage") and last.spec.accepted_tokens == 1
    assert cast_pb2.FinishReason.Name(last.finish_reason) == "FINISH_REASON_STOP"

    health = cast_pb2.HealthResponse(status=cast_pb2.HealthResponse.SERVING_STATUS_SERVING, message="ok")
    assert cast_pb2.HealthResponse.FromString(health.SerializeToString()) == health
    models = cast_pb2.ListModelsResponse(models=[cast_pb2.ModelInfo(id="t", drafter="d", max_context_tokens=2048)])
    assert cast_pb2.ListModelsResponse.FromString(models.SerializeToString()) == models


# --- a real server over a real channel ---------------------------------------------------------


class EchoServicer(cast_pb2_grpc.CastServicer):
    """Trivial servicer: "generates" the prompt's words back, one chunk per word."""

    def _words(self, request: cast_pb2.GenerateRequest, context: grpc.ServicerContext) -> list[str]:
        which = request.WhichOneof("input")
        if which is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "set prompt or messages")
        text = request.prompt if which == "prompt" else " ".join(m.content for m in request.messages.messages)
        words = text.split()
        return words[: request.max_tokens] if request.HasField("max_tokens") else words

    def _stats(self, request: cast_pb2.GenerateRequest, n: int) -> tuple[cast_pb2.Usage, cast_pb2.SpecStats]:
        prompt_tokens = len(request.prompt.split())
        return (
            cast_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=n),
            cast_pb2.SpecStats(steps=n, mean_accepted_length=1.0, mean_tree_nodes=1.0, mean_verified_tokens=1.0),
        )

    def _finish(self, request: cast_pb2.GenerateRequest, n: int) -> int:
        limited = request.HasField("max_tokens") and n >= request.max_tokens
        return cast_pb2.FINISH_REASON_LENGTH if limited else cast_pb2.FINISH_REASON_STOP

    def Generate(self, request: cast_pb2.GenerateRequest, context: grpc.ServicerContext) -> cast_pb2.GenerateResponse:
        words = self._words(request, context)
        usage, spec = self._stats(request, len(words))
        return cast_pb2.GenerateResponse(
            text=" ".join(words), token_ids=range(len(words)), finish_reason=self._finish(request, len(words)),
            usage=usage, spec=spec, request_id=request.request_id or "server-id", model="echo",
        )

    def GenerateStream(
        self, request: cast_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[cast_pb2.GenerateChunk]:
        words = self._words(request, context)
        for i, word in enumerate(words):
            text = word if i == 0 else " " + word
            chunk = cast_pb2.GenerateChunk(text=text, token_ids=[i], request_id=request.request_id)
            if i == len(words) - 1:
                usage, spec = self._stats(request, len(words))
                chunk.finish_reason = self._finish(request, len(words))
                chunk.usage.CopyFrom(usage)
                chunk.spec.CopyFrom(spec)
            yield chunk

    def Health(self, request: cast_pb2.HealthRequest, context: grpc.ServicerContext) -> cast_pb2.HealthResponse:
        return cast_pb2.HealthResponse(status=cast_pb2.HealthResponse.SERVING_STATUS_SERVING)

    def ListModels(
        self, request: cast_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> cast_pb2.ListModelsResponse:
        return cast_pb2.ListModelsResponse(models=[cast_pb2.ModelInfo(id="echo", drafter="echo-small")])


@pytest.fixture(scope="module")
def stub() -> Iterator[cast_pb2_grpc.CastStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    cast_pb2_grpc.add_CastServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    try:
        yield cast_pb2_grpc.CastStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


def test_server_generate(stub: cast_pb2_grpc.CastStub) -> None:
    reply = stub.Generate(cast_pb2.GenerateRequest(prompt="the quick brown fox", request_id="abc"), timeout=10)
    assert reply.text == "the quick brown fox"
    assert list(reply.token_ids) == [0, 1, 2, 3]
    assert reply.finish_reason == cast_pb2.FINISH_REASON_STOP
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 4)
    assert reply.spec.steps == 4 and reply.request_id == "abc" and reply.model == "echo"

    limited = stub.Generate(cast_pb2.GenerateRequest(prompt="a b c d", max_tokens=2), timeout=10)
    assert limited.text == "a b" and limited.finish_reason == cast_pb2.FINISH_REASON_LENGTH


def test_server_generate_stream(stub: cast_pb2_grpc.CastStub) -> None:
    request = cast_pb2.GenerateRequest(
        messages=cast_pb2.ChatMessages(messages=[cast_pb2.ChatMessage(role="user", content="hello streaming world")]),
        request_id="s1",
    )
    chunks = list(stub.GenerateStream(request, timeout=10))
    assert "".join(c.text for c in chunks) == "hello streaming world"
    assert [t for c in chunks for t in c.token_ids] == [0, 1, 2]
    assert all(c.finish_reason == cast_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert all(not c.HasField("usage") and not c.HasField("spec") for c in chunks[:-1])
    assert chunks[-1].finish_reason == cast_pb2.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].spec.steps == 3
    assert {c.request_id for c in chunks} == {"s1"}


def test_server_errors_are_status_codes(stub: cast_pb2_grpc.CastStub) -> None:
    with pytest.raises(grpc.RpcError) as unary:
        stub.Generate(cast_pb2.GenerateRequest(), timeout=10)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as streamed:
        list(stub.GenerateStream(cast_pb2.GenerateRequest(), timeout=10))
    assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_server_health_and_models(stub: cast_pb2_grpc.CastStub) -> None:
    assert stub.Health(cast_pb2.HealthRequest(), timeout=10).status == cast_pb2.HealthResponse.SERVING_STATUS_SERVING
    models = stub.ListModels(cast_pb2.ListModelsRequest(), timeout=10).models
    assert [(m.id, m.drafter) for m in models] == [("echo", "echo-small")]
