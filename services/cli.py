"""The ``cast`` console script: core commands plus ``serve`` and ``bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench.cli import register_cli as register_bench
from cast_core.cli import register_core
from services.serve_main import register_cli as register_serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cast", description="Cost-aware speculative tree decoding (CAST)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register_core(subparsers)
    register_serve(subparsers)
    register_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
