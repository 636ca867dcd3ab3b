"""Plots and the README table, generated from committed result JSON (never typed by hand).

``cast bench report`` reads ``bench/results/<name>.json`` (and ``sweep.json``,
``floor.json``, ``b1_check.json`` and ``serving.json`` if present) and writes

* ``<name>_speedup.png`` — speedup over vanilla vs batch size, one line per
  method, one panel per dataset (median over groups, bars = min..max);
* ``<name>_acceptance.png`` — mean accepted length per step vs tokens verified
  per step, one marker per (method, batch size), one panel per dataset;
* the Markdown section between ``<!-- bench:start -->`` and ``<!-- bench:end -->``
  in README.md: machine, the issue's targets with measured values, one table per
  dataset, the floor check, the batch-1 check, the speedup ceilings, the threshold
  sweep and the serving overhead.

The floor check (``floor.json``, :data:`FLOOR_NAME`) is a run of vanilla and
CAST alone with many groups at the batch sizes where CAST works near break-even:
with two methods, a group's two runs are back to back, where the full run puts
three others between them; on a shared 2-core VM the same vanilla batch drifts
by several percent over those minutes, more than the floor's 3 % margin. Where
its runs recorded their target pace (``RunStats.target_pace``), its table also
gives each pair at one pace (:func:`pace_adjusted`): how much of a pair's
reading the machine's drift between its two runs may explain.

The batch-1 check (``b1_check.json``, :data:`B1_CHECK_NAME`) is a run of vanilla,
assisted generation and CAST at batch 1 alone, on more prompts than the full run
gives batch 1: its targets are medians over prompts, and a handful of prompts
that each run 1.1x to 2x decide them by chance.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.bound import (  # noqa: E402
    batch_confidence_chain_bound,
    confidence_chain_bound,
    fixed_chain_bound,
    oracle_tree_bound,
    profiled_drafter_cost,
    speedup_bound,
    static_batch_oracle_bound,
    whole_run_ceiling,
)
from bench.datasets import DATASET_NAMES  # noqa: E402
from bench.harness import RESULTS_DIR, BenchResult, CellResult, GroupResult, Spread, load_result  # noqa: E402
from bench.methods import METHOD_NAMES  # noqa: E402
from bench.serving import ServingResult, load_serving, serving_table  # noqa: E402
from bench.sweep import PARAMS, SWEEP_FILE, SweepResult, load_sweep  # noqa: E402
from cast_core import CastConfig  # noqa: E402
from cast_core.cost import CostProfile, default_search_dirs  # noqa: E402
from cast_core.quantize import MIXED_DENSE_ROWS  # noqa: E402

README: Path = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
BOUND_CONTEXT = 256  # context length the bounds read the cost profile at (prompt + half the output, roughly)
SECTION = "## Benchmarks"
FLOOR_NAME = "floor"  # result name of the vanilla-and-CAST floor check
FLOOR = 0.97  # issue 3: CAST never below this share of vanilla's throughput
B1_CHECK_NAME = "b1_check"  # result name of the batch-1 check: vanilla, assisted generation and CAST on more prompts
CAST_FLAGS = (*PARAMS, "min_speedup", "lookup_tokens", "lookup_only")  # CastConfig fields `cast bench run` takes as flags (--min-speedup for min_speedup)
METHOD_STYLE = {
    "vanilla": ("tab:gray", "o"),
    "hf_generate": ("tab:brown", "v"),
    "hf_assisted": ("tab:green", "D"),
    "static": ("tab:blue", "s"),
    "cast": ("tab:red", "^"),
}


def _datasets(result: BenchResult) -> list[str]:
    return list(dict.fromkeys(c.dataset for c in result.cells))


def _methods(result: BenchResult) -> list[str]:
    return list(dict.fromkeys(c.method for c in result.cells))


def plot_speedup(result: BenchResult, path: Path) -> Path:
    """Speedup vs batch size: one panel per dataset, one line per method, min..max bars."""
    datasets = _datasets(result)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method in _methods(result):
            cells = sorted((c for c in result.cells if c.dataset == dataset and c.method == method), key=lambda c: c.batch_size)
            if not cells:
                continue
            color, marker = METHOD_STYLE.get(method, ("black", "x"))
            x = [c.batch_size for c in cells]
            y = [c.speedup_vs_vanilla.median for c in cells]
            err = [[m - c.speedup_vs_vanilla.min for m, c in zip(y, cells)], [c.speedup_vs_vanilla.max - m for m, c in zip(y, cells)]]
            ax.errorbar(x, y, yerr=err, label=method, color=color, marker=marker, capsize=3)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(result.config.batch_sizes, [str(b) for b in result.config.batch_sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup over vanilla (tokens/s ratio)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_subtitle(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_acceptance(result: BenchResult, path: Path) -> Path:
    """Mean accepted length vs tokens verified per step, labelled by batch size."""
    datasets = _datasets(result)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method in _methods(result):
            cells = [c for c in result.cells if c.dataset == dataset and c.method == method]
            if not cells:
                continue
            color, marker = METHOD_STYLE.get(method, ("black", "x"))
            x = [c.verified_tokens_per_step for c in cells]
            y = [c.mean_accepted_length for c in cells]
            ax.scatter(x, y, color=color, marker=marker, label=method)
            for c, xi, yi in zip(cells, x, y):
                ax.annotate(f"B{c.batch_size}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ticks = [t for t in (1, 2, 4, 8, 16, 32, 64, 128) if t <= 2 * max(c.verified_tokens_per_step for c in result.cells)]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("tokens verified per step (per sequence, root included)")
        ax.set_ylabel("mean accepted length (tokens per step)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_subtitle(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def drafter_weights(result: BenchResult) -> str:
    """The drafter's linear layers as the run loaded them: ``int8``, ``mixed`` or ``none`` (results before the field: ``none``)."""
    return str(result.machine.get("drafter_quantization", "none"))


def _drafter_label(result: BenchResult) -> str:
    """The drafter's name, with how its linear layers ran where they were quantized."""
    labels = {"int8": " (int8 linears)", "mixed": f" (int8 linears, {MIXED_DENSE_ROWS}+ tokens in bf16)"}
    return result.config.drafter + labels.get(drafter_weights(result), "")


def _subtitle(result: BenchResult) -> str:
    m, c = result.machine, result.config
    return (
        f"{c.target} / {_drafter_label(result)}, {c.dtype}, greedy, {c.max_new_tokens} new tokens, "
        f"{m.get('cpu_model')} ({m.get('torch_threads')} threads), {str(m.get('date'))[:10]}"
    )


def paired_ratio(result: BenchResult, dataset: str, batch_size: int, a: str, b: str) -> float | None:
    """Median over groups of ``tokens/s(a) / tokens/s(b)`` (same groups, same run); None if missing."""
    ca, cb = result.cell(dataset, a, batch_size), result.cell(dataset, b, batch_size)
    if ca is None or cb is None:
        return None
    return statistics.median(ga.tokens_per_s / gb.tokens_per_s for ga, gb in zip(ca.groups, cb.groups))


def reproduce_command(result: BenchResult, name: str) -> str:
    """The ``cast bench run`` command line that repeats ``result`` (flags at their defaults left out; the drafter's
    quantization always given, as ``auto`` resolves by machine)."""
    c = result.config
    datasets = "" if c.datasets == list(DATASET_NAMES) else " --datasets " + " ".join(c.datasets)
    methods = "" if c.methods == list(METHOD_NAMES) else " --methods " + " ".join(c.methods)
    return (
        f"cast bench run --name {name}{datasets}{methods} --prompts {c.prompts}{_prompts_at_flag(c.prompts_at)} "
        f"--batch-sizes {' '.join(map(str, c.batch_sizes))} --max-new-tokens {c.max_new_tokens} --drafter-quantization {drafter_weights(result)}{_threshold_flags(c.cast)}"
    )


def _fmt(x: float | None, digits: int = 2, suffix: str = "x") -> str:
    return "n/a" if x is None else f"{x:.{digits}f}{suffix}"


def _machine_kind(result: BenchResult) -> str:
    """``cpu_model (flag, flag, ...)``: the CPU a result was measured on, with the matmul flags it recorded."""
    m = result.machine
    return f"{m.get('cpu_model')} ({', '.join(m.get('cpu_flags') or []) or 'no flags recorded'})"


def _same_machine(a: BenchResult, b: BenchResult) -> bool:
    """Whether two results ran on the same kind of CPU (model name and recorded matmul flags alike)."""
    return _machine_kind(a) == _machine_kind(b)


def targets_table(result: BenchResult, floor: BenchResult | None = None, b1: BenchResult | None = None) -> str:
    """Issue 3's targets, each with the measured value and whether it is met (the floor also on ``floor``'s cells,
    the batch-1 targets also on the batch-1 check ``b1``)."""
    rows: list[tuple[str, float | None, float, str]] = []  # (target, measured, bound, sense)
    goals = {"humaneval": 1.75, "mtbench": 1.45}
    for dataset in _datasets(result):
        runs = [(result, "")]
        b1_cast = b1.cell(dataset, "cast", 1) if b1 is not None else None
        if b1_cast is not None:
            runs.append((b1, f" (batch-1 check, {len(b1_cast.groups)} prompts)"))
        for run, label in runs:
            rows.append((f"{dataset}, B=1{label}: cast / hf_assisted", paired_ratio(run, dataset, 1, "cast", "hf_assisted"), 1.15, ">="))
            if dataset in goals:
                rows.append((f"{dataset}, B=1{label}: cast / vanilla", paired_ratio(run, dataset, 1, "cast", "vanilla"), goals[dataset], ">="))
        rows.append((f"{dataset}, B=8: cast / vanilla", paired_ratio(result, dataset, 8, "cast", "vanilla"), 1.2, ">="))
        rows.append((f"{dataset}, B=8: cast / static", paired_ratio(result, dataset, 8, "cast", "static"), 1.3, ">="))
    cast_cells = [c for c in result.cells if c.method == "cast"]
    if cast_cells:
        worst = min(cast_cells, key=lambda c: c.speedup_vs_vanilla.median)
        rows.append(
            (f"cast / vanilla, worst cell ({worst.dataset}, B={worst.batch_size})", worst.speedup_vs_vanilla.median, FLOOR, ">=")
        )
        floor_cells = [c for c in floor.cells if c.method == "cast"] if floor is not None else []
        if floor_cells:
            low = min(floor_cells, key=lambda c: c.speedup_vs_vanilla.median)
            elsewhere = "" if _same_machine(result, floor) else f"; on {_machine_kind(floor)}, commit `{str(floor.machine.get('git_commit') or 'n/a')[:7]}`"
            rows.append(
                (
                    f"cast / vanilla, worst cell of the floor check ({low.dataset}, B={low.batch_size}; "
                    f"{len(low.groups)} back-to-back pairs{elsewhere})",
                    low.speedup_vs_vanilla.median,
                    FLOOR,
                    ">=",
                )
            )
        top = max(cast_cells, key=lambda c: c.plan_share)
        rows.append((f"cast planning share of step time, worst cell ({top.dataset}, B={top.batch_size})", top.plan_share, 0.05, "<"))
    lines = ["| target | bound | measured | met |", "|---|---|---|---|"]
    for name, value, bound, sense in rows:
        is_share = sense == "<"
        shown = "n/a" if value is None else (f"{100 * value:.1f}%" if is_share else f"{value:.2f}x")
        bound_s = f"{sense} {100 * bound:.0f}%" if is_share else f"{sense} {bound:.2f}x"
        met = "not measured" if value is None else ("yes" if (value < bound if is_share else value >= bound) else "**no**")
        lines.append(f"| {name} | {bound_s} | {shown} | {met} |")
    return "\n".join(lines)


def measured_profile(result: BenchResult) -> CostProfile | None:
    """The measured cost profile the run planned with (None for a synthetic fallback or a missing file)."""
    if result.cost_profile.get("synthetic"):
        return None
    for directory in default_search_dirs():
        path = Path(directory) / f"{result.cost_profile.get('slug')}.json"
        if path.is_file():
            return CostProfile.load(path)
    return None


def measured_drafter_cost(result: BenchResult, cast: CellResult) -> float | None:
    """``c_D`` as CAST paid it in this run: its drafting ms per drafter forward over vanilla's ms per step.

    None unless the drafter ran for at least half the steps: a gate's probes alone are
    mostly catch-up forwards over skipped tokens, not a drafting step's layers.
    """
    vanilla = result.cell(cast.dataset, "vanilla", cast.batch_size)
    if cast.draft_ms_per_drafter_forward is None or cast.drafted_step_share < 0.5 or vanilla is None or vanilla.verify_ms_per_step <= 0:
        return None
    return cast.draft_ms_per_drafter_forward / vanilla.verify_ms_per_step


def outside_steps_share(vanilla: CellResult) -> float | None:
    """``p``: the share of vanilla's wall time outside its decode steps (prefill, admission), over all its groups:
    ``sum (wall - draft_s - verify_s) / sum wall`` (None without groups or their step seconds)."""
    walls = [(g.wall_s, g.stats.get("draft_s"), g.stats.get("verify_s")) for g in vanilla.groups]
    total = sum(w for w, _, _ in walls)
    if not walls or total <= 0 or any(d is None or v is None for _, d, v in walls):
        return None
    return max(0.0, sum(w - d - v for w, d, v in walls)) / total


def _whole_run(ceilings: list[float | None], outside: float | None) -> str:
    """``p`` and the ``ceilings`` over the whole run (``whole_run_ceiling``), as a table cell."""
    if outside is None or any(c is None for c in ceilings):
        return "n/a"
    return f"{100 * outside:.0f}%: " + " / ".join(f"{whole_run_ceiling(c, outside):.2f}x" for c in ceilings)


def bounds_table(result: BenchResult, profile: CostProfile) -> str:
    """Per (dataset, B): the speedup ceilings of ``bench.bound`` next to what CAST measured."""
    cast = result.config.cast
    lines = [
        "| dataset | B | drafter forward / target step (profile; this run) | ceiling, every draft accepted (depth) "
        "| ceiling, any best-first tree of this drafter, sized with hindsight "
        "| the same, batches waiting for their slowest row | one chain depth for the whole run (depth) "
        "| chain stopped by the drafter's confidence (θ, cap) "
        "| ceiling, CAST's measured acceptance (depth) "
        "| vanilla's wall outside its steps `p`: over the whole run, the batches' hindsight tree; the confidence chain, "
        "rows alone; the same, batches waiting for their slowest row "
        "| CAST measured | CAST accepted / step | CAST steps drafted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dataset in _datasets(result):
        for c in sorted((c for c in result.cells if c.dataset == dataset and c.method == "cast"), key=lambda c: c.batch_size):
            measured = measured_drafter_cost(result, c)
            b = speedup_bound(profile, c.batch_size, BOUND_CONTEXT, c.acceptance_by_depth or None, measured)
            profiled = profiled_drafter_cost(profile, c.batch_size, BOUND_CONTEXT)
            vanilla = result.cell(dataset, "vanilla", c.batch_size)
            ranks = vanilla.drafter_ranks if vanilla else []
            oracle = oracle_tree_bound(ranks, profile, c.batch_size, BOUND_CONTEXT, cast.top_k, cast.max_depth, measured)
            static = static_batch_oracle_bound(
                _by_group(ranks, vanilla.groups) if vanilla else [], profile, c.batch_size, BOUND_CONTEXT, cast.top_k, cast.max_depth, measured
            )
            fixed = fixed_chain_bound(ranks, profile, c.batch_size, BOUND_CONTEXT, cast.max_depth, measured)
            confident = confidence_chain_bound(
                ranks, vanilla.drafter_confidences if vanilla else [], profile, c.batch_size, BOUND_CONTEXT, cast.max_depth, measured
            )
            batch_confident = (
                batch_confidence_chain_bound(
                    _by_group(ranks, vanilla.groups), _by_group(vanilla.drafter_confidences, vanilla.groups),
                    profile, c.batch_size, BOUND_CONTEXT, cast.max_depth, measured,
                )
                if vanilla
                else None
            )
            chain = "n/a" if b.chain is None else f"{b.chain:.2f}x ({b.chain_depth})"
            whole_run = _whole_run(
                [static, None if confident is None else confident[0], None if batch_confident is None else batch_confident[0]],
                outside_steps_share(vanilla) if vanilla else None,
            )
            lines.append(
                f"| {dataset} | {c.batch_size} | {profiled:.2f}; {'n/a' if measured is None else f'{measured:.2f}'} "
                f"| {b.perfect:.2f}x ({b.perfect_depth}) | {'n/a' if oracle is None else f'{oracle:.2f}x'} "
                f"| {'n/a' if static is None else f'{static:.2f}x'} "
                f"| {'n/a' if fixed is None else f'{fixed[0]:.2f}x ({fixed[1]})'} "
                f"| {'n/a' if confident is None else f'{confident[0]:.2f}x ({confident[1]:g}, {confident[2]})'} | {chain} "
                f"| {whole_run} "
                f"| {c.speedup_vs_vanilla.median:.2f}x | {c.mean_accepted_length:.2f} | {100 * c.drafted_step_share:.0f}% |"
            )
    return "\n".join(lines)


def _by_group(per_output: list[list], groups: list[GroupResult]) -> list[list[list]]:
    """``per_output`` (one entry per output, group after group, as the harness stores them) split by ``groups``."""
    split, start = [], 0
    for group in groups:
        split.append(per_output[start : start + len(group.prompt_ids)])
        start += len(group.prompt_ids)
    return split


def pooled_ratio(cast: CellResult, vanilla: CellResult) -> float:
    """``(sum tokens / sum wall)`` of ``cast`` over the same of ``vanilla``: throughput over all groups together."""
    return (sum(g.tokens for g in cast.groups) / sum(g.wall_s for g in cast.groups)) / (
        sum(g.tokens for g in vanilla.groups) / sum(g.wall_s for g in vanilla.groups)
    )


def pace_ratio(cast: GroupResult, vanilla: GroupResult) -> float | None:
    """CAST's target pace over vanilla's in one pair (``RunStats.target_pace``): above 1 where CAST's run met the
    machine slower than vanilla's did. None where either run has no pace (no measured profile; results before it)."""
    mine, theirs = cast.stats.get("target_pace"), vanilla.stats.get("target_pace")
    return mine / theirs if isinstance(mine, float) and isinstance(theirs, float) and theirs > 0 else None


def pace_adjusted(cast: GroupResult, vanilla: GroupResult) -> float | None:
    """The pair's speedup at one pace: ``speedup * pace_cast / pace_vanilla``, what the pair would read had both runs
    met the machine at the same speed. Approximate: the pace is the target's alone (the drafter's is taken to drift
    with it) and carries the profile's error for each run's shapes (CAST's forwards verify more tokens a row)."""
    ratio = pace_ratio(cast, vanilla)
    return cast.speedup_vs_vanilla * ratio if ratio is not None else None


def _spread_text(s: Spread, suffix: str = "x") -> str:
    """``median (min–max)`` of a floor-table column."""
    return f"{s.median:.3f}{suffix} ({s.min:.2f}–{s.max:.2f})"


def floor_table(floor: BenchResult) -> str:
    """Per (dataset, B) of the floor check: CAST over vanilla in each back-to-back pair, summarised; where the runs
    recorded their pace, also the pairs' pace ratios and their speedups at one pace (:func:`pace_adjusted`)."""
    rows = []
    for dataset in _datasets(floor):
        for c in sorted((c for c in floor.cells if c.dataset == dataset and c.method == "cast"), key=lambda c: c.batch_size):
            vanilla = floor.cell(dataset, "vanilla", c.batch_size)
            if vanilla is not None:
                rows.append((c, vanilla))
    paced = _paced(floor)
    head = (
        f"| dataset | B | pairs | CAST / vanilla, median (min–max) | pairs below {FLOOR:.2f}x "
        "| pooled (all groups' tokens over all their wall time) | vanilla tokens/s | CAST steps drafted | match vs vanilla |"
    )
    rule = "|---|---:|---:|---|---:|---:|---:|---:|---:|"
    if paced:
        head += f" target pace, CAST / vanilla | CAST / vanilla at one pace | at one pace below {FLOOR:.2f}x |"
        rule += "---|---|---:|"
    lines = [head, rule]
    for c, vanilla in rows:
        below = sum(g.speedup_vs_vanilla < FLOOR for g in c.groups)
        line = (
            f"| {c.dataset} | {c.batch_size} | {len(c.groups)} | {_spread_text(c.speedup_vs_vanilla)} | {below} "
            f"| {pooled_ratio(c, vanilla):.3f}x | {vanilla.tokens_per_s.median:.1f} | {100 * c.drafted_step_share:.0f}% "
            f"| {100 * c.match_rate:.0f}% |"
        )
        if paced:
            pairs = list(zip(c.groups, vanilla.groups))
            ratios = [r for r in (pace_ratio(*pair) for pair in pairs) if r is not None]
            adjusted = [a for a in (pace_adjusted(*pair) for pair in pairs) if a is not None]
            line += (
                f" {_spread_text(Spread.of(ratios), '')} | {_spread_text(Spread.of(adjusted))} | {sum(a < FLOOR for a in adjusted)} |"
                if adjusted
                else " n/a | n/a | n/a |"
            )
        lines.append(line)
    return "\n".join(lines)


_PACE_NOTE = (
    " Target pace = the target's decoding forwards' seconds over the cost profile's for the same shapes (1.0: as fast as"
    " profiled); at one pace = a pair's ratio times CAST's pace over vanilla's, what it would read had both runs met"
    " the machine at the same speed (approximate: the drafter is taken to drift with the target, and the profile"
    " errs differently for CAST's wider forwards)."
)


def _paced(result: BenchResult) -> bool:
    """Whether any group of ``result`` recorded its target pace."""
    return any(isinstance(g.stats.get("target_pace"), float) for c in result.cells for g in c.groups)


def floor_section(floor: BenchResult) -> str:
    """The README's floor-check subsection: how it ran, on what, and its table."""
    m = floor.machine
    groups = {c.batch_size: len(c.groups) for c in floor.cells if c.method == "cast"}
    gaps = [x.logit_gap for c in floor.cells for x in c.mismatches]
    match = (
        f" Every output that differs from vanilla's first differs at a bf16 near-tie (top-2 logit gap at most {max(gaps):.2f})."
        if gaps
        else ""
    )
    return "\n".join(
        [
            f"`bench/results/{FLOOR_NAME}.json`, from `{reproduce_command(floor, FLOOR_NAME)}`: vanilla and CAST alone, "
            "so a group's two runs are back to back (in turn vanilla first, then CAST first), where the full run puts "
            f"three other methods between them; {', '.join(f'{n} groups at B={b}' for b, n in sorted(groups.items()))}, "
            "of the reported prompts in order, as in the full run. Pooled = all groups' tokens over all their wall time, a mean that "
            f"weights long groups more.{_PACE_NOTE if _paced(floor) else ''} {m.get('cpu_model')}, {m.get('usable_cpus')} usable cores, {floor.config.dtype}, "
            f"{str(m.get('date'))[:10]}, commit `{str(m.get('git_commit') or 'n/a')[:7]}`; run took {floor.elapsed_s / 60:.1f} min.{match}",
            "",
            floor_table(floor),
        ]
    )


def b1_check_section(b1: BenchResult) -> str:
    """The README's batch-1-check subsection: how it ran, on what, and per dataset the paired ratios."""
    m = b1.machine
    lines = [
        f"`bench/results/{B1_CHECK_NAME}.json`, from `{reproduce_command(b1, B1_CHECK_NAME)}`: the batch-1 targets on more "
        "prompts (the first of them are the full run's), the three methods interleaved prompt by prompt. "
        f"{m.get('cpu_model')}, {m.get('usable_cpus')} usable cores, {b1.config.dtype}, {str(m.get('date'))[:10]}, "
        f"commit `{str(m.get('git_commit') or 'n/a')[:7]}`; run took {b1.elapsed_s / 60:.1f} min.",
        "",
        "| dataset | prompts | CAST / vanilla, median (min–max) | CAST / assisted | assisted / vanilla | vanilla tokens/s | CAST accepted / step | match vs vanilla |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for dataset in _datasets(b1):
        cast, vanilla = b1.cell(dataset, "cast", 1), b1.cell(dataset, "vanilla", 1)
        if cast is None or vanilla is None:
            continue
        s = cast.speedup_vs_vanilla
        lines.append(
            f"| {dataset} | {len(cast.groups)} | {s.median:.2f}x ({s.min:.2f}–{s.max:.2f}) "
            f"| {_fmt(paired_ratio(b1, dataset, 1, 'cast', 'hf_assisted'))} | {_fmt(paired_ratio(b1, dataset, 1, 'hf_assisted', 'vanilla'))} "
            f"| {vanilla.tokens_per_s.median:.1f} | {cast.mean_accepted_length:.2f} | {100 * cast.match_rate:.0f}% |"
        )
    return "\n".join(lines)


def cells_table(result: BenchResult, dataset: str) -> str:
    """One row per (method, batch size) of ``dataset``."""
    lines = [
        "| method | B | tokens/s (min–max) | speedup vs vanilla (min–max) | accepted / step | drafted / step "
        "| verified / step | draft / verify / plan ms per step | plan share | in model forwards | match vs vanilla |",
        "|---|---:|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    cells = sorted(
        (c for c in result.cells if c.dataset == dataset),
        key=lambda c: (c.batch_size, list(METHOD_STYLE).index(c.method) if c.method in METHOD_STYLE else 99),
    )
    for c in cells:
        t, s = c.tokens_per_s, c.speedup_vs_vanilla
        gaps = sorted(m.logit_gap for m in c.mismatches)
        match = f"{100 * c.match_rate:.0f}%" + (f" (top-2 gaps {', '.join(f'{g:.2f}' for g in gaps)})" if gaps else "")
        lines.append(
            f"| {c.method} | {c.batch_size} | {t.median:.1f} ({t.min:.1f}–{t.max:.1f}) "
            f"| {s.median:.2f}x ({s.min:.2f}–{s.max:.2f}) | {c.mean_accepted_length:.2f} "
            f"| {c.drafted_nodes_per_step:.1f} | {c.verified_tokens_per_step:.1f} "
            f"| {c.draft_ms_per_step:.0f} / {c.verify_ms_per_step:.0f} / {c.plan_ms_per_step:.1f} "
            f"| {100 * c.plan_share:.1f}% | {100 * c.model_forward_share:.0f}% | {match} |"
        )
    return "\n".join(lines)


def sweep_section(sweep: SweepResult) -> str:
    """How CAST's thresholds were chosen: every trial of the sweep, best first."""
    defaults = CastConfig()
    sc = sweep.config
    grids = "".join(f" --{k}-grid {' '.join(f'{v:g}' for v in getattr(sc, k))}" for k in sc.order)
    cell_names = [f"{c.dataset} B={c.batch_size}" for c in sweep.trials[0].cells] if sweep.trials else []
    lines = [
        f"Coordinate sweep on the *tuning* prompts (disjoint from the reported ones): "
        f"{sweep.config.prompts} prompt(s) per dataset and batch size (rounded up to whole batches), "
        f"{sweep.config.max_new_tokens} new tokens, batch sizes {', '.join(map(str, sweep.config.batch_sizes))}; "
        f"each parameter in turn ({' → '.join(sweep.config.order)}) takes the grid value with the best score "
        f"(geometric mean over cells of the speedup over vanilla, vanilla measured once per cell), the others held. "
        f"Best: {', '.join(f'{k}={getattr(sweep.best, k)}' for k in PARAMS)}; "
        f"`CastConfig` defaults now: {', '.join(f'{k}={getattr(defaults, k)}' for k in PARAMS)}"
        f"{' (the sweep winner)' if all(getattr(sweep.best, k) == getattr(defaults, k) for k in PARAMS) else ' (differ from the sweep winner)'}. "
        f"Measured {str(sweep.machine.get('date'))[:10]} on {sweep.machine.get('cpu_model')}, "
        f"{sweep.elapsed_s / 60:.0f} min; from `bench/results/{SWEEP_FILE}`. Reproduce: `cast bench sweep "
        f"--batch-sizes {' '.join(map(str, sc.batch_sizes))} --prompts {sc.prompts} --max-new-tokens {sc.max_new_tokens} "
        f"--order {' '.join(sc.order)}{grids}{_threshold_flags(sc.start)}`.",
        "",
        "| C1 | C2 | C3 | R | score | " + " | ".join(f"{n}: speedup (acc. len, verified)" for n in cell_names) + " |",
        "|---:|---:|---:|---:|---:|" + "---|" * len(cell_names),
    ]
    for trial in sorted(sweep.trials, key=lambda t: -t.score):
        mark = "**" if trial.cast == sweep.best else ""
        cells = " | ".join(
            f"{c.speedup_vs_vanilla:.2f}x ({c.mean_accepted_length:.2f}, {c.verified_tokens_per_step:.1f})" for c in trial.cells
        )
        lines.append(
            f"| {mark}{trial.cast.c1:g}{mark} | {mark}{trial.cast.c2:g}{mark} | {mark}{trial.cast.c3:g}{mark} "
            f"| {mark}{trial.cast.r}{mark} | {trial.score:.3f} | {cells} |"
        )
    return "\n".join(lines)


def markdown(
    result: BenchResult,
    name: str,
    sweep: SweepResult | None,
    image_prefix: str,
    serving: ServingResult | None = None,
    floor: BenchResult | None = None,
    b1: BenchResult | None = None,
) -> str:
    """The README section body for ``result`` (and the floor check, the batch-1 check, the sweep and the serving
    benchmark, if any)."""
    m, c, p = result.machine, result.config, result.cost_profile
    profile_note = " — **synthetic fallback, not measured**" if p.get("synthetic") else ""
    parts = [f"**Incomplete run** (interrupted after {len(result.cells)} cells).", ""] if not result.complete else []
    parts += [
        f"Generated by `cast bench report` from `bench/results/{name}.json` — do not edit by hand. "
        f"Reproduce: `{reproduce_command(result, name)}` then `cast bench report`.",
        "",
        f"Machine: {m.get('cpu_model')} (flags: {', '.join(m.get('cpu_flags') or []) or 'none recorded'}), "
        f"{m.get('usable_cpus')} usable cores, {m.get('torch_threads')} torch threads; torch {m.get('torch')}, "
        f"transformers {m.get('transformers')}; {str(m.get('date'))[:10]}; load average at start/end "
        f"{_load(m.get('load_average_start'))} / {_load(m.get('load_average_end'))}; run took {result.elapsed_s / 60:.1f} min.",
        f"Setup: target {c.target}, drafter {_drafter_label(result)}, {c.dtype}, greedy, {c.max_new_tokens} new tokens; "
        f"{c.prompts} reported prompts per dataset and batch size{_prompts_at_note(c.prompts_at)} (rounded up to whole batches); methods interleaved "
        f"group by group in one process, warm-up excluded; tokens/s = generated tokens / wall time (prefill included), "
        f"median over groups; speedups are paired per group. Static = EAGLE-2 (top-k {c.static.top_k}, depth "
        f"{c.static.depth}, {c.static.total_tokens} verified); CAST C1={c.cast.c1:g}, C2={c.cast.c2:g}, C3={c.cast.c3:g}, "
        f"R={c.cast.r}, top-k {c.cast.top_k}, max depth {c.cast.max_depth}, max verify {c.cast.max_verify}, context lookup {c.cast.lookup_tokens} tokens{' (drafter-free steps on)' if c.cast.lookup_only else ''}. "
        f"Cost profile: `{p.get('slug')}`{profile_note}.",
        "",
        f"![speedup vs batch size]({image_prefix}{name}_speedup.png)",
        f"![acceptance vs tree size]({image_prefix}{name}_acceptance.png)",
        "",
        "### Targets",
        "",
        targets_table(result, floor, b1),
    ]
    for dataset in _datasets(result):
        parts += ["", f"### {dataset}", "", cells_table(result, dataset)]
    parts += [
        "",
        "Columns: *accepted / step* = tokens gained per sequence per target forward (bonus included); "
        "*drafted* / *verified* per sequence per step; ms per batch step (for hf_* methods: drafter / target "
        "forward time); *in model forwards* = share of wall time inside the two models' forwards (the rest is "
        "framework and engine overhead); *match* = outputs token-identical to vanilla's, with the target's "
        "top-1/top-2 logit gap at each first differing token (bf16 near-ties).",
    ]
    if floor is not None:
        parts += ["", f"### The {FLOOR:.2f}x floor, in back-to-back pairs", "", floor_section(floor)]
    if b1 is not None:
        parts += ["", "### Batch 1 on more prompts", "", b1_check_section(b1)]
    profile = measured_profile(result)
    if profile is not None:
        parts += [
            "",
            "### How fast can it be here? Speedup ceilings",
            "",
            f"From the cost profile's verify costs (context {BOUND_CONTEXT}), the drafter forward's cost as CAST paid it "
            "in this run (drafting ms per drafter forward over vanilla's ms per step; the profile's isolated figure "
            "beside it, used where the drafter ran for fewer than half the steps) and CAST's acceptance by depth in this run "
            "(`bench/bound.py`): a step drafting `d` layers runs at least `d` drafter forwards and verifies `d + 1` "
            "tokens per row, and gains at most `1 + d` tokens. A target above the first ceiling cannot be met by any "
            "drafter as costly as this one, however accurate. The second is strict for this drafter: from the rank of each "
            "of vanilla's output tokens among the drafter's guesses (teacher-forced, `bench/ranks.py`), a best-first tree "
            f"(at most top_k = {result.config.cast.top_k} children a node, depth {result.config.cast.max_depth}) that accepts "
            "`d` drafts holds at least the sum of their ranks in nodes; a dynamic program over each output picks, with "
            "hindsight, the cheapest tree at every step, priced like the first ceiling. No tree policy of this drafter "
            "whose forwards cost that much beats it (with the profile's single-token forward, none at all). It prices "
            "each row as if it chose its tree alone; the third prices batches as they ran: a batch step costs at least "
            "the tree holding any one row's accepted path, and a batch is done when its slowest row is, so each batch "
            "takes at least its slowest row's least time, priced like the second, where vanilla takes "
            "its longest output's length. Strict where every row stays to the end of its batch (HumanEval's do; "
            "MT-bench's rows end early, and a batch that sheds them steps more cheaply than these prices). The fourth "
            "replays, on the same ranks and at the same prices, a greedy chain of one depth for every step (the best depth "
            "for the whole run, in hindsight): what knowing how often the drafter is right buys, without knowing when; a "
            "policy must read the drafter's confidences to beat it. The fifth reads them: a chain that stops once its path "
            "confidence (the product of the drafter's top-1 probabilities, teacher-forced) falls below `θ`, at most `cap` "
            "deep, the token that fell below included; `θ` and `cap` are the best pair in hindsight, so it is what a chain "
            "policy reading confidences reaches at best, not a ceiling for trees. The sixth uses CAST's acceptance by depth in this run (measured on CAST's trees, "
            "which accept more per depth than a chain of that cost could), so it is an estimate. "
            "None counts prefill or framework time; the column after them does, for the third, the fifth, and the "
            "fifth priced like the third (each batch taking at least its slowest row's chain time, `θ` and `cap` "
            "chosen again for that; strict for chains where rows stay to the end, not where batches shed rows): "
            "where vanilla spends a share `p` of its wall time outside its decode steps (the "
            "target's prefill above all), a step speedup `S` makes the whole run at most `1 / (p + (1 - p) / S)` "
            "faster (Amdahl's law; less again by the drafter's own prompt feed, which vanilla does not pay). All six price every drafted depth as a drafter forward: "
            "context lookup (`lookup_tokens`) drafts repeated spans whose tokens the catch-up forward prices without "
            "forwards of their own, so a CAST run with it is not bound by them; they bound the drafter's own trees.",
            "",
            bounds_table(result, profile),
        ]
    if sweep is not None:
        parts += ["", "### Threshold sweep", "", sweep_section(sweep)]
    if serving is not None:
        sc = serving.config
        parts += [
            "",
            "### Serving overhead: HTTP against the in-process engine",
            "",
            f"`bench/results/serving.json` (`cast bench serving --prompts {sc.prompts} --max-new-tokens {sc.max_new_tokens} "
            f"--concurrency {' '.join(map(str, sc.concurrency))}`): {sc.dataset} prompts, policy {sc.policy}, the same "
            "token ids through `/v1/completions` and through `Engine.generate`, interleaved group by group.",
            "",
            serving_table(serving),
        ]
    return "\n".join(parts)


def _load(values: object) -> str:
    return "n/a" if not isinstance(values, list) else "/".join(f"{v:.1f}" for v in values)


def _prompts_at_flag(prompts_at: dict[int, int]) -> str:
    """``--prompts-at`` as ``cast bench run`` takes it ('' when no batch size overrides ``--prompts``)."""
    return (" --prompts-at " + " ".join(f"{b}={n}" for b, n in sorted(prompts_at.items()))) if prompts_at else ""


def _threshold_flags(cast: CastConfig) -> str:
    """``--c1/--c2/--c3/--r/--min-speedup/--lookup-tokens/--lookup-only`` for the values a run used where they differ from today's ``CastConfig``
    defaults ('' when none do), so a run stays reproducible after a default changes."""
    defaults = CastConfig()
    flags = []
    for k in CAST_FLAGS:
        value = getattr(cast, k)
        if value != getattr(defaults, k) and value is not False:  # a switch is a bare flag, given only when on
            flags.append(f" --{k.replace('_', '-')}" + ("" if value is True else f" {value:g}"))
    return "".join(flags)


def _prompts_at_note(prompts_at: dict[int, int]) -> str:
    """``" (16 at B=8)"`` for the setup line ('' when no batch size overrides ``prompts``)."""
    return (" (" + ", ".join(f"{n} at B={b}" for b, n in sorted(prompts_at.items())) + ")") if prompts_at else ""


def write_readme_section(readme: Path, body: str) -> None:
    """Replace the text between the bench markers (adding a ``## Benchmarks`` section with them if missing)."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    block = f"{START}\n{body}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    elif SECTION in text:
        head, rest = text.split(SECTION, 1)
        text = f"{head}{SECTION}\n\n{block}\n{rest}"
    else:
        text = f"{text.rstrip()}\n\n{SECTION}\n\n{block}\n".lstrip()
    readme.write_text(text, encoding="utf-8")


def _check_result(results_dir: Path, check: str, name: str) -> BenchResult | None:
    """The check run ``<results_dir>/<check>.json`` (floor, batch 1) beside the run ``name``; None where there is
    none, or where ``name`` is that check itself."""
    path = results_dir / f"{check}.json"
    return load_result(path) if path.exists() and name != check else None


def generate_report(name: str = "benchmark", results_dir: Path = RESULTS_DIR, readme: Path | None = README) -> str:
    """Plots into ``results_dir`` and the README section from ``<results_dir>/<name>.json``; returns the Markdown.

    ``readme=None`` leaves README.md untouched. Image links are relative to the README's folder.
    """
    result = load_result(results_dir / f"{name}.json")
    plot_speedup(result, results_dir / f"{name}_speedup.png")
    plot_acceptance(result, results_dir / f"{name}_acceptance.png")
    sweep_path = results_dir / SWEEP_FILE
    sweep = load_sweep(sweep_path) if sweep_path.exists() else None
    serving_path = results_dir / "serving.json"
    serving = load_serving(serving_path) if serving_path.exists() else None
    floor, b1 = (_check_result(results_dir, check, name) for check in (FLOOR_NAME, B1_CHECK_NAME))
    prefix = ""
    if readme is not None:
        try:
            prefix = results_dir.resolve().relative_to(readme.resolve().parent).as_posix() + "/"
        except ValueError:
            prefix = results_dir.resolve().as_posix() + "/"
    body = markdown(result, name, sweep, prefix, serving, floor, b1)
    if readme is not None:
        write_readme_section(readme, body)
    return body

