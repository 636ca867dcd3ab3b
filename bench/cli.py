"""``cast bench`` (also ``python -m bench``): run, report, sweep and overhead.

* ``cast bench`` / ``cast bench run``: the benchmark (:mod:`bench.harness`), JSON into bench/results/.
* ``cast bench report``: plots + README table from the committed JSON (:mod:`bench.report`).
* ``cast bench sweep``: CAST threshold sweep on the tuning prompts (:mod:`bench.sweep`).
* ``cast bench overhead``: where a step's time goes beyond the model forwards (:mod:`bench.overhead`).
* ``cast bench serving``: HTTP end-to-end throughput vs the in-process engine (:mod:`bench.serving`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from bench.datasets import DATASET_NAMES, Prompt, Subset, load_prompts
from bench.harness import RESULTS_DIR, BenchConfig, make_groups, run_benchmark, save_result
from bench.methods import METHOD_NAMES, ModelPair, add_model_pair_args
from bench.overhead import profile_overhead
from bench.report import B1_CHECK_NAME, CAST_FLAGS, FLOOR_NAME, README, cells_table, generate_report, targets_table
from bench.serving import register as register_serving
from bench.sweep import SweepConfig, run_sweep, save_sweep
from cast_core import CastConfig
from cast_core.policy import POLICY_NAMES


def _cast_overrides(args: argparse.Namespace) -> dict[str, float | bool]:
    return {k: getattr(args, k) for k in CAST_FLAGS if getattr(args, k) is not None}


def _add_cast_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--c1", type=float, default=None, help="CAST C1 (default: CastConfig's)")
    p.add_argument("--c2", type=float, default=None, help="CAST C2 (default: CastConfig's)")
    p.add_argument("--c3", type=float, default=None, help="CAST C3 (default: CastConfig's)")
    p.add_argument("--r", type=int, default=None, help="CAST R (default: CastConfig's)")
    p.add_argument(
        "--min-speedup", type=float, default=None, help="CAST speedup gate's min_speedup (default: CastConfig's)"
    )
    p.add_argument(
        "--lookup-tokens", type=int, default=None, help="CAST context lookup's lookup_tokens, 0: off (default: CastConfig's)"
    )
    p.add_argument(
        "--lookup-only",
        action="store_true",
        default=None,
        help="let CAST verify the context lookups alone, without a drafter forward, where that pays (CastConfig.lookup_only)",
    )


def _load_prompts(pair: ModelPair, datasets: list[str], subset: Subset) -> dict[str, list[Prompt]]:
    return {d: load_prompts(d, pair.tokenizer, subset) for d in datasets}


def trace_gate(handler: logging.Handler | None = None) -> None:
    """Send the speedup gate's DEBUG log (``cast_core.gate``) to ``handler``; by default print it to stderr, each
    line stamped with the seconds since start: every step it lets draft (``draft``: the batch size's ``rho``, judged
    row steps, thinned, closed) and every judged drafted step (``judged``: tokens ``n`` from the rows with the most
    tokens left, cost ``C`` in plain steps, on the profile's basis or not, a closed gate's probe or not, thinned or
    not, the record's ``rho`` and standard error, judged rows, closed, skip countdown and backoff, the thinning loss
    ``L`` against the time ``E``, the recent plain-step scales ``t / t_ref``)."""
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_SecondsFormatter("%(seconds)7.1f %(message)s"))
    gate_logger = logging.getLogger("cast_core.gate")
    gate_logger.addHandler(handler)
    gate_logger.setLevel(logging.DEBUG)


class _SecondsFormatter(logging.Formatter):
    """Adds ``seconds``: a record's time since logging started, in seconds."""

    def format(self, record: logging.LogRecord) -> str:
        record.seconds = record.relativeCreated / 1000.0
        return super().format(record)


def run_bench(args: argparse.Namespace) -> int:
    """``cast bench run``: measure, write ``<results-dir>/<name>.json``, print the tables."""
    try:
        config = BenchConfig(
            name=args.name,
            target=args.target,
            drafter=args.drafter,
            dtype=args.dtype,
            device=args.device,
            drafter_quantization=args.drafter_quantization,
            datasets=args.datasets,
            methods=args.methods,
            batch_sizes=args.batch_sizes,
            prompts=args.prompts,
            prompts_at=dict(args.prompts_at),
            max_new_tokens=args.max_new_tokens,
            warmup_tokens=args.warmup_tokens,
            cast=CastConfig(**_cast_overrides(args)),
        )
    except ValidationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.trace_gate:
        trace_gate()
    pair = ModelPair.load(config.target, config.drafter, config.dtype, config.device, config.drafter_quantization)
    results_dir = Path(args.results_dir)
    result = run_benchmark(
        config,
        pair,
        _load_prompts(pair, config.datasets, "reported"),
        progress=not args.quiet,
        on_block=lambda partial: save_result(partial, results_dir),
    )
    path = save_result(result, results_dir)
    print(targets_table(result))
    for dataset in config.datasets:
        print(f"\n{dataset}\n{cells_table(result, dataset)}")
    checks = {FLOOR_NAME: "the floor check", B1_CHECK_NAME: "the batch-1 check"}
    report = f"`cast bench report` adds it to the README as {checks[config.name]}" if config.name in checks else (
        f"`cast bench report --name {config.name}` updates plots + README"
    )
    print(f"\nwrote {path} ({result.elapsed_s / 60:.1f} min); {report}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """``cast bench report``: plots + README section from the committed JSON."""

    results_dir = Path(args.results_dir)
    if not (results_dir / f"{args.name}.json").exists():
        print(f"error: no result {results_dir / (args.name + '.json')}; run `cast bench run` first", file=sys.stderr)
        return 2
    body = generate_report(args.name, results_dir, None if args.no_readme else Path(args.readme or README))
    print(body)
    return 0


def run_sweep_cmd(args: argparse.Namespace) -> int:
    """``cast bench sweep``: threshold sweep on the tuning prompts, ``<results-dir>/sweep.json``."""

    grids = {k: getattr(args, f"{k}_grid") for k in ("c1", "c2", "c3", "r") if getattr(args, f"{k}_grid")}
    try:
        config = SweepConfig(
            target=args.target,
            drafter=args.drafter,
            dtype=args.dtype,
            device=args.device,
            drafter_quantization=args.drafter_quantization,
            datasets=args.datasets,
            batch_sizes=args.batch_sizes,
            prompts=args.prompts,
            max_new_tokens=args.max_new_tokens,
            start=CastConfig(**_cast_overrides(args)),
            **({"order": args.order} if args.order else {}),
            **grids,
        )
    except ValidationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pair = ModelPair.load(config.target, config.drafter, config.dtype, config.device, config.drafter_quantization)
    result = run_sweep(config, pair, _load_prompts(pair, config.datasets, "tuning"), progress=not args.quiet)
    path = save_sweep(result, Path(args.results_dir))
    for trial in sorted(result.trials, key=lambda t: -t.score):
        print(f"score {trial.score:.3f}  c1={trial.cast.c1:g} c2={trial.cast.c2:g} c3={trial.cast.c3:g} r={trial.cast.r}")
    b = result.best
    print(f"\nbest: c1={b.c1:g} c2={b.c2:g} c3={b.c3:g} r={b.r}; wrote {path} ({result.elapsed_s / 60:.1f} min)")
    return 0


def run_overhead(args: argparse.Namespace) -> int:
    """``cast bench overhead``: profile one policy on one group of tuning prompts."""

    pair = ModelPair.load(args.target, args.drafter, args.dtype, args.device, args.drafter_quantization)
    group = make_groups(load_prompts(args.dataset, pair.tokenizer, "tuning"), args.batch_size, args.batch_size)[0]
    print(
        profile_overhead(
            pair,
            [pair.encode(p.text) for p in group],
            policy=args.policy,
            max_new_tokens=args.max_new_tokens,
            cast_config=CastConfig(**_cast_overrides(args)),
            top=args.top,
        )
    )
    return 0


def _batch_prompts(text: str) -> tuple[int, int]:
    """``"B=N"`` -> ``(B, N)`` for ``--prompts-at``."""
    try:
        b, n = (int(x) for x in text.split("="))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B=N (batch size = prompts), got {text!r}") from None
    return b, n


def _configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``run`` / ``report`` / ``sweep`` / ``overhead`` / ``serving`` subcommands; no subcommand means ``run``."""
    sub = parser.add_subparsers(dest="bench_command")

    run = sub.add_parser("run", help="run the benchmark (the default subcommand)")
    add_model_pair_args(run)
    run.add_argument("--name", default="benchmark", help="result name: <results-dir>/<name>.json")
    run.add_argument("--datasets", nargs="+", default=list(DATASET_NAMES), choices=DATASET_NAMES)
    run.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES)
    run.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    run.add_argument("--prompts", type=int, default=4, help="prompts per dataset and batch size (whole batches)")
    run.add_argument(
        "--prompts-at",
        nargs="+",
        default=[],
        type=_batch_prompts,
        metavar="B=N",
        help="prompts at batch size B instead of --prompts, e.g. 8=16 for two groups of 8",
    )
    run.add_argument("--max-new-tokens", type=int, default=128)
    run.add_argument(
        "--warmup-tokens",
        type=int,
        default=BenchConfig.model_fields["warmup_tokens"].default,
        help="untimed warm-up tokens per method and batch size",
    )
    _add_cast_args(run)
    run.add_argument("--results-dir", default=str(RESULTS_DIR))
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--trace-gate", action="store_true", help="log the speedup gate's decisions to stderr")
    run.set_defaults(func=run_bench)

    report = sub.add_parser("report", help="regenerate plots + README table from result JSON")
    report.add_argument("--name", default="benchmark", help="result name: <results-dir>/<name>.json")
    report.add_argument("--results-dir", default=str(RESULTS_DIR))
    report.add_argument("--readme", default=None, help="README to update (default: the repository's)")
    report.add_argument("--no-readme", action="store_true", help="print the section, leave README.md alone")
    report.set_defaults(func=run_report)

    sweep = sub.add_parser("sweep", help="sweep CAST's C1, C2, C3, R on the tuning prompts")
    add_model_pair_args(sweep)
    sweep.add_argument("--datasets", nargs="+", default=list(DATASET_NAMES), choices=DATASET_NAMES)
    sweep.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    sweep.add_argument("--prompts", type=int, default=2, help="tuning prompts per dataset and batch size")
    sweep.add_argument("--max-new-tokens", type=int, default=48)
    _add_cast_args(sweep)
    for k, kind in (("c1", float), ("c2", float), ("c3", float), ("r", int)):
        sweep.add_argument(f"--{k}-grid", nargs="+", type=kind, default=None, help=f"values of {k.upper()} to try")
    sweep.add_argument("--order", nargs="+", default=None, help="parameters to search, in this order (default: c1 c2 c3 r)")
    sweep.add_argument("--results-dir", default=str(RESULTS_DIR))
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(func=run_sweep_cmd)

    overhead = sub.add_parser("overhead", help="profile one engine step beyond the model forwards")
    add_model_pair_args(overhead)
    overhead.add_argument("--policy", default="cast", choices=POLICY_NAMES)
    overhead.add_argument("--dataset", default="humaneval", choices=DATASET_NAMES)
    overhead.add_argument("--batch-size", type=int, default=1)
    overhead.add_argument("--max-new-tokens", type=int, default=32)
    overhead.add_argument("--top", type=int, default=20, help="rows per listing")
    _add_cast_args(overhead)
    overhead.set_defaults(func=run_overhead)

    register_serving(sub)

    parser.set_defaults(func=lambda _: run_bench(run.parse_args([])))


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``cast`` console script."""
    _configure(subparsers.add_parser("bench", help="benchmarks: run, report, sweep, overhead, serving"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench``."""
    parser = argparse.ArgumentParser(prog="python -m bench", description="CAST benchmarks")
    _configure(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))
