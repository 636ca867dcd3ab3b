"""Where a step's milliseconds go beyond the two models' forwards (``cast bench overhead``).

Runs one policy on one group of prompts twice after a warm-up (as long as the
measured run: CAST's speedup gate lives on from it, and a warm-up ending at its
rows' budget can close the gate, see ``bench.harness.BenchConfig.warmup_tokens``):

1. plain, for real times: wall, the engine's draft / verify / plan split, and
   the time inside each model's forwards (:class:`~bench.methods.ForwardTimer`);
   everything else is engine and framework overhead;
2. under ``cProfile``, for attribution: cumulative time of every ``cast_core``
   function and the functions with the most own time. cProfile slows
   Python-heavy code down, so read its numbers as shares, not as times.
"""

from __future__ import annotations

import cProfile
import io
import pstats

from bench.methods import EngineMethod, ModelPair
from cast_core import CastConfig, StaticConfig


def _cast_core_rows(stats: pstats.Stats, steps: int, limit: int) -> list[str]:
    rows = []
    for (filename, _, func), (_, calls, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "cast_core" in filename:
            module = filename.rsplit("cast_core", 1)[1].strip("/").removesuffix(".py").replace("/", ".")
            name = f"{module}.{func}"
            rows.append((cumulative, f"  {name:<36} {1e3 * cumulative / steps:9.1f} ms/step  {calls:7d} calls"))
    return [r for _, r in sorted(rows, reverse=True)[:limit]]


def profile_overhead(
    pair: ModelPair,
    prompts: list[list[int]],
    policy: str = "cast",
    max_new_tokens: int = 32,
    cast_config: CastConfig | None = None,
    static_config: StaticConfig | None = None,
    top: int = 20,
) -> str:
    """Run ``policy`` on ``prompts`` (one batch) and return a printable breakdown."""
    method = EngineMethod(pair, policy, policy, static_config=static_config, cast_config=cast_config)
    method.run(prompts, max_new_tokens)  # warm-up
    run = method.run(prompts, max_new_tokens)
    s, steps = run.stats, max(run.stats.batch_steps, 1)
    in_steps = s.draft_s + s.verify_s
    forwards = s.target_forward_s + s.drafter_forward_s

    def ms(x: float) -> str:
        return f"{1e3 * x / steps:8.1f} ms/step"

    lines = [
        f"{policy}, batch {len(prompts)}, {sum(len(t) for t in run.token_ids)} tokens in {steps} steps, "
        f"wall {run.wall_s:.2f} s, mean accepted length {s.gained_tokens / max(s.row_steps, 1):.2f}",
        f"  wall                         {ms(run.wall_s)}",
        f"  target forwards (all)        {ms(s.target_forward_s)}",
        f"  drafter forwards (all)       {ms(s.drafter_forward_s)}",
        f"  outside model forwards       {ms(run.wall_s - forwards)}  ({100 * (1 - forwards / run.wall_s):.1f}% of wall)",
        f"  engine draft (incl. plan)    {ms(s.draft_s)}",
        f"  engine verify                {ms(s.verify_s)}",
        f"  engine plan                  {ms(s.plan_s)}  ({100 * s.plan_s / max(in_steps, 1e-12):.2f}% of step time)",
        f"  outside steps (prefill, admission, output) {1e3 * (run.wall_s - in_steps):.0f} ms total",
    ]
    profiler = cProfile.Profile()
    profiler.enable()
    method.run(prompts, max_new_tokens)
    profiler.disable()
    stats = pstats.Stats(profiler)
    lines += ["", "cast_core functions by cumulative time (under cProfile):"] + _cast_core_rows(stats, steps, top)
    buf = io.StringIO()
    stats.stream = buf  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    lines += ["", f"top {top} functions by own time (under cProfile):", buf.getvalue().split("\n\n", 2)[-1].rstrip()]
    return "\n".join(lines)
