"""A gRPC client of ``cast.v1.Cast`` (the server: ``cast serve``, gRPC on 127.0.0.1:9000).

    python examples/grpc_client.py --prompt "def fibonacci(n):" --max-tokens 64 --stream
    python examples/grpc_client.py --chat --prompt "Reverse a string in Python." --max-tokens 128
    python examples/grpc_client.py --health
    python examples/grpc_client.py --models

Errors come back as gRPC status codes: INVALID_ARGUMENT (bad request, the
details name the field), RESOURCE_EXHAUSTED (server busy, retry later),
UNAVAILABLE, INTERNAL.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

from services.grpc_api import cast_pb2, cast_pb2_grpc  # noqa: E402

FINISH = {cast_pb2.FINISH_REASON_STOP: "stop", cast_pb2.FINISH_REASON_LENGTH: "length"}


def request_from(args: argparse.Namespace) -> cast_pb2.GenerateRequest:
    request = cast_pb2.GenerateRequest(max_tokens=args.max_tokens, temperature=args.temperature, stop=args.stop or [])
    if args.seed is not None:
        request.seed = args.seed
    if args.chat:
        request.messages.messages.append(cast_pb2.ChatMessage(role="user", content=args.prompt))
    else:
        request.prompt = args.prompt
    return request


def print_summary(finish: int, usage: cast_pb2.Usage, spec: cast_pb2.SpecStats) -> None:
    print(
        f"\n[finish={FINISH.get(finish, 'unspecified')} prompt_tokens={usage.prompt_tokens} "
        f"completion_tokens={usage.completion_tokens} steps={spec.steps} "
        f"mean_accepted_length={spec.mean_accepted_length:.2f} mean_verified_tokens={spec.mean_verified_tokens:.1f}]",
        file=sys.stderr,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="127.0.0.1:9000", help="gRPC address (default 127.0.0.1:9000)")
    parser.add_argument("--prompt", default="def fibonacci(n):", help="prompt text (the user turn with --chat)")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a chat conversation")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--stream", action="store_true", help="use GenerateStream and print text as it arrives")
    parser.add_argument("--health", action="store_true", help="call Health and exit")
    parser.add_argument("--models", action="store_true", help="call ListModels and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    args = parser.parse_args()

    with grpc.insecure_channel(args.server) as channel:
        stub = cast_pb2_grpc.CastStub(channel)
        try:
            if args.health:
                reply = stub.Health(cast_pb2.HealthRequest(), timeout=args.timeout)
                print(cast_pb2.HealthResponse.ServingStatus.Name(reply.status), reply.message)
                return 0 if reply.status == cast_pb2.HealthResponse.SERVING_STATUS_SERVING else 1
            if args.models:
                for model in stub.ListModels(cast_pb2.ListModelsRequest(), timeout=args.timeout).models:
                    print(f"{model.id} (drafter {model.drafter}, context {model.max_context_tokens} tokens)")
                return 0
            request = request_from(args)
            if args.stream:
                for chunk in stub.GenerateStream(request, timeout=args.timeout):
                    print(chunk.text, end="", flush=True)
                    if chunk.finish_reason:
                        print_summary(chunk.finish_reason, chunk.usage, chunk.spec)
            else:
                reply = stub.Generate(request, timeout=args.timeout)
                print(reply.text)
                print_summary(reply.finish_reason, reply.usage, reply.spec)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
