"""The benchmark run: every method on the same prompt groups, interleaved, in one process.

For each dataset and batch size ``B``:

1. The first ``ceil(N / B) * B`` reported prompts (``N`` = ``prompts``) form
   ``ceil(N / B)`` groups of ``B`` distinct prompts; a group is one batch.
2. Warm-up: each method runs once on the first group with ``warmup_tokens``
   new tokens, the first time it meets batch size ``B`` (excluded from results;
   what a policy learns there it keeps, as a server would).
3. Measurement: group by group, every method runs on the group — in the listed
   order on even groups, reversed on odd ones (A B C, C B A, ...) — so drift of
   the machine hits all methods alike and paired ratios cancel it.
4. Per group and method: generated tokens / wall time (prefill included) is the
   throughput; its ratio to ``vanilla`` on the same group is the speedup.
   Reported per cell: the median over groups with min and max.
5. Greedy outputs are compared with ``vanilla``'s on the same group. For each
   mismatch, one plain target forward on prompt + common prefix gives the
   target's top-2 logit gap at the first differing token (a small gap means a
   near-tie that bf16 rounding in a differently shaped forward can flip).

Everything lands in one :class:`BenchResult` JSON with the machine's metadata.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from pydantic import BaseModel, Field, field_validator, model_validator
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from bench.datasets import DATASET_NAMES, Prompt
from bench.methods import METHOD_NAMES, MethodRun, ModelPair, ModelPairConfig, RunStats, add_counts, build_methods
from bench.ranks import DrafterGuesses, teacher_forced_guesses
from cast_core import CastConfig, StaticConfig
from cast_core.cost import cpu_info
from cast_core.vocab import DraftVocab

RESULTS_DIR: Path = Path(__file__).with_name("results")
SCHEMA_VERSION = 1


class BenchConfig(ModelPairConfig):
    """What a benchmark run measures."""

    name: str = Field("benchmark", description="Result name: written to <results_dir>/<name>.json.")
    datasets: list[str] = Field(list(DATASET_NAMES), min_length=1, description="Datasets to run, in order.")
    methods: list[str] = Field(
        list(METHOD_NAMES), min_length=1, description="Methods to compare; must include 'vanilla' (the reference)."
    )
    batch_sizes: list[int] = Field([1, 2, 4, 8], min_length=1, description="Batch sizes (prompts decoded together).")
    prompts: int = Field(4, ge=1, description="Prompts per dataset and batch size, rounded up to whole batches.")
    prompts_at: dict[int, int] = Field(
        default_factory=dict,
        description="Per batch size, prompts to use instead of `prompts` (e.g. {8: 16}: two groups of 8), rounded up to whole batches.",
    )
    max_new_tokens: int = Field(128, ge=1, description="New tokens per prompt (greedy; EOS may end a prompt early).")
    warmup_tokens: int = Field(
        32,
        ge=1,
        description="New tokens of each method's untimed warm-up run per batch size. CAST's policy (its speedup gate "
        "included) lives on from the warm-up, as in a server, so the warm-up must not end before its rows' second "
        "drafted step: with 8 tokens, that step reached most rows' budget, was judged by the rows with the most left "
        "and closed the gate at B=8 for 256 steps (MT-bench, floor prompts, 2-core Intel Xeon with AMX: 1.03x vanilla "
        "with the gate closed, 1.17-1.18x after a 32-token warm-up; bench/results/warmup_gate/).",
    )
    cast: CastConfig = Field(default_factory=CastConfig, description="CAST policy thresholds and bounds.")
    static: StaticConfig = Field(default_factory=StaticConfig, description="Static (EAGLE-2) tree shape.")

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHOD_NAMES]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHOD_NAMES)}")
        if "vanilla" not in v:
            raise ValueError("must include 'vanilla': speedups and match rates are relative to it")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _check_batches(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("batch sizes must be >= 1")
        return v

    @model_validator(mode="after")
    def _check_prompts_at(self) -> BenchConfig:
        unknown = sorted(set(self.prompts_at) - set(self.batch_sizes))
        if unknown:
            raise ValueError(f"prompts_at: batch sizes {unknown} are not in batch_sizes {self.batch_sizes}")
        if any(n < 1 for n in self.prompts_at.values()):
            raise ValueError("prompts_at: prompt counts must be >= 1")
        return self

    def prompts_for(self, batch_size: int) -> int:
        """Prompts to run at ``batch_size``: ``prompts_at[batch_size]`` if given, else ``prompts``."""
        return self.prompts_at.get(batch_size, self.prompts)


class Spread(BaseModel):
    """Median of per-group values with their range."""

    median: float = Field(description="Median over groups.")
    min: float = Field(description="Smallest group value.")
    max: float = Field(description="Largest group value.")

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(median=statistics.median(values), min=min(values), max=max(values))


class GroupResult(BaseModel):
    """One method on one group of prompts (one batch)."""

    prompt_ids: list[str] = Field(description="Dataset ids of the group's prompts.")
    tokens: int = Field(description="Generated tokens, all prompts together.")
    wall_s: float = Field(description="Wall time of the whole call, prefill included.")
    tokens_per_s: float = Field(description="tokens / wall_s.")
    speedup_vs_vanilla: float = Field(description="tokens_per_s / vanilla's tokens_per_s on the same group.")
    matched: int = Field(description="Prompts whose token ids equal vanilla's on the same group.")
    stats: dict[str, float | list[int] | None] = Field(description="RunStats of the call (see bench.methods.RunStats).")


class Mismatch(BaseModel):
    """First differing token of a greedy output against vanilla's."""

    prompt_id: str = Field(description="Dataset id of the prompt.")
    position: int = Field(description="Index of the first differing generated token.")
    vanilla_token: int | None = Field(description="Vanilla's token there (None: vanilla ended first).")
    method_token: int | None = Field(description="The method's token there (None: the method ended first).")
    plain_top1: int = Field(description="Argmax of a plain target forward on prompt + common prefix.")
    plain_top2: int = Field(description="Second-best token of that forward.")
    logit_gap: float = Field(description="Top-1 minus top-2 logit of that forward.")


class CellResult(BaseModel):
    """One (dataset, method, batch size) cell, aggregated over its groups."""

    dataset: str
    method: str
    batch_size: int
    groups: list[GroupResult]
    tokens_per_s: Spread = Field(description="Output tokens per second over groups.")
    speedup_vs_vanilla: Spread = Field(description="Paired per-group ratio to vanilla.")
    mean_accepted_length: float = Field(description="Tokens gained per row-step (accepted drafts + bonus).")
    drafted_nodes_per_step: float = Field(description="Drafted nodes per row-step (before reranking).")
    verified_tokens_per_step: float = Field(description="Tokens scored by the target per row-step (root included).")
    drafted_step_share: float = Field(0.0, description="Share of row-steps the drafter ran for (CAST's speedup gate skips the rest).")
    acceptance_by_depth: list[float] = Field(default_factory=list, description="[i] = share of drafted row-steps that accepted more than i drafted tokens.")
    batch_steps: int = Field(description="Target forwards of all groups together.")
    draft_ms_per_step: float = Field(description="Drafting (planning included) per batch step.")
    draft_ms_per_drafter_forward: float | None = Field(None, description="Drafting time per drafter forward (the engine's methods; None when the drafter never ran).")
    verify_ms_per_step: float = Field(description="Verifying per batch step.")
    plan_ms_per_step: float = Field(description="Policy decisions per batch step.")
    plan_share: float = Field(description="plan / (draft + verify) time: planning's share of step time.")
    model_forward_share: float = Field(description="Time inside the two models' forwards / wall time.")
    match_rate: float = Field(description="Share of prompts whose output equals vanilla's (token-identical).")
    mismatches: list[Mismatch] = Field(default_factory=list, description="First differences against vanilla.")
    drafter_ranks: list[list[int]] = Field(
        default_factory=list,
        description="Vanilla cells: per output, the drafter's teacher-forced rank of each token (capped at top_k + 1; bench.ranks).",
    )
    drafter_confidences: list[list[float]] = Field(
        default_factory=list,
        description="Vanilla cells: per output, the drafter's teacher-forced top-1 probability at each position (bench.ranks).",
    )


class BenchResult(BaseModel):
    """A whole benchmark run: config, machine, and every cell."""

    schema_version: int = SCHEMA_VERSION
    config: BenchConfig
    machine: dict[str, object] = Field(description="Where and with what it ran (see machine_info).")
    cost_profile: dict[str, object] = Field(description="Slug, device and provenance of the cost profile used.")
    prompts: dict[str, list[str]] = Field(description="Per dataset, the prompt ids used, in order.")
    started_at: str
    finished_at: str
    elapsed_s: float
    complete: bool = Field(True, description="False while a run is still going (or was interrupted).")
    cells: list[CellResult]

    def cell(self, dataset: str, method: str, batch_size: int) -> CellResult | None:
        """The cell for ``(dataset, method, batch_size)``, if it was measured."""
        for c in self.cells:
            if (c.dataset, c.method, c.batch_size) == (dataset, method, batch_size):
                return c
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(dtype: str, device: str, drafter_quantization: str = "none") -> dict[str, object]:
    """CPU model and flags, cores, torch threads, dtype, the drafter's quantization as loaded (``none``, ``int8`` or ``mixed``),
    library versions, date, load and git commit."""
    cpu_model, cpu_flags = cpu_info()
    return {
        "cpu_model": cpu_model,
        "cpu_flags": cpu_flags,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_model,
        "dtype": dtype,
        "drafter_quantization": drafter_quantization,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()),
        "git_commit": _git_commit(),
    }


def make_groups(prompts: list[Prompt], batch_size: int, count: int) -> list[list[Prompt]]:
    """``ceil(count / batch_size)`` groups of ``batch_size`` distinct prompts, in order.

    Raises:
        ValueError: fewer prompts than the groups need.
    """
    n_groups = math.ceil(count / batch_size)
    need = n_groups * batch_size
    if len(prompts) < need:
        raise ValueError(f"batch size {batch_size} needs {need} prompts; only {len(prompts)} available")
    return [prompts[i * batch_size : (i + 1) * batch_size] for i in range(n_groups)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ (length counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def plain_top2(target: PreTrainedModel, context: list[int]) -> tuple[int, int, float]:
    """``(top1, top2, gap)`` of a plain target forward on ``context``: its two best next tokens and their logit gap."""
    ids = torch.tensor([context], device=target.device)
    top = torch.topk(target(input_ids=ids).logits[0, -1].float(), 2)
    return int(top.indices[0]), int(top.indices[1]), float(top.values[0] - top.values[1])


def explain_mismatch(pair: ModelPair, prompt: Prompt, prompt_ids: list[int], vanilla: list[int], other: list[int]) -> Mismatch:
    """Top-2 logits of a plain target forward at the first token where ``other`` leaves ``vanilla``."""
    pos = first_difference(vanilla, other)
    assert pos is not None, "outputs are equal"
    top1, top2, gap = plain_top2(pair.target, prompt_ids + vanilla[:pos])
    return Mismatch(
        prompt_id=prompt.id,
        position=pos,
        vanilla_token=vanilla[pos] if pos < len(vanilla) else None,
        method_token=other[pos] if pos < len(other) else None,
        plain_top1=top1,
        plain_top2=top2,
        logit_gap=gap,
    )


def _stats_dict(stats: RunStats) -> dict[str, float | list[int] | None]:
    return {k: v if v is None or isinstance(v, list) else float(v) for k, v in vars(stats).items()}


def summarize_cell(
    dataset: str,
    method: str,
    batch_size: int,
    groups: list[list[Prompt]],
    runs: list[MethodRun],
    vanilla: list[MethodRun],
    mismatches: list[Mismatch],
    guesses: list[DrafterGuesses] | None = None,
) -> CellResult:
    """Aggregate one method's runs over the groups of one (dataset, batch size)."""
    group_results: list[GroupResult] = []
    for group, run, ref in zip(groups, runs, vanilla):
        tokens = sum(len(t) for t in run.token_ids)
        rate = tokens / run.wall_s
        ref_rate = sum(len(t) for t in ref.token_ids) / ref.wall_s
        group_results.append(
            GroupResult(
                prompt_ids=[p.id for p in group],
                tokens=tokens,
                wall_s=run.wall_s,
                tokens_per_s=rate,
                speedup_vs_vanilla=rate / ref_rate,
                matched=sum(a == b for a, b in zip(run.token_ids, ref.token_ids)),
                stats=_stats_dict(run.stats),
            )
        )
    total = RunStats()
    for run in runs:
        for key, value in vars(run.stats).items():
            if key == "target_pace":  # a ratio, kept per group
                continue
            mine = getattr(total, key)
            setattr(total, key, add_counts(mine, value) if isinstance(value, list) else mine + value)
    wall = sum(r.wall_s for r in runs)
    row_steps, batch_steps = max(total.row_steps, 1), max(total.batch_steps, 1)
    step_s = total.draft_s + total.verify_s
    return CellResult(
        dataset=dataset,
        method=method,
        batch_size=batch_size,
        groups=group_results,
        tokens_per_s=Spread.of([g.tokens_per_s for g in group_results]),
        speedup_vs_vanilla=Spread.of([g.speedup_vs_vanilla for g in group_results]),
        mean_accepted_length=total.gained_tokens / row_steps,
        drafted_nodes_per_step=total.drafted_nodes / row_steps,
        verified_tokens_per_step=total.verified_tokens / row_steps,
        drafted_step_share=total.drafted_row_steps / row_steps,
        acceptance_by_depth=[n / max(total.drafted_row_steps, 1) for n in total.accepted_at_least],
        batch_steps=total.batch_steps,
        draft_ms_per_step=1e3 * total.draft_s / batch_steps,
        draft_ms_per_drafter_forward=1e3 * total.draft_s / total.drafter_forwards if total.drafter_forwards else None,
        verify_ms_per_step=1e3 * total.verify_s / batch_steps,
        plan_ms_per_step=1e3 * total.plan_s / batch_steps,
        plan_share=total.plan_s / step_s if step_s > 0 else 0.0,
        model_forward_share=(total.target_forward_s + total.drafter_forward_s) / wall,
        match_rate=sum(g.matched for g in group_results) / sum(len(g) for g in groups),
        mismatches=mismatches,
        drafter_ranks=[g.ranks for g in guesses or []],
        drafter_confidences=[g.confidences for g in guesses or []],
    )


def profile_info(pair: ModelPair) -> dict[str, object]:
    """What the cost profile is and where it came from (synthetic fallbacks are flagged)."""
    p = pair.cost_profile
    return {
        "slug": p.slug,
        "device": p.device,
        "dtype": p.dtype,
        "measured_at": p.measured_at,
        "synthetic": bool(p.notes.get("synthetic", False)),
    }


def run_benchmark(
    config: BenchConfig,
    pair: ModelPair,
    prompts: dict[str, list[Prompt]],
    progress: bool = True,
    on_block: Callable[[BenchResult], None] | None = None,
) -> BenchResult:
    """Run every (dataset, batch size, group, method) of ``config`` on ``pair``.

    ``prompts`` maps each dataset of ``config.datasets`` to its reported prompts in order.
    ``on_block`` receives the partial result (``complete=False``) after each
    (dataset, batch size), e.g. to save it, so an interrupted run keeps what it measured.
    """
    started = datetime.now(timezone.utc)
    machine = machine_info(config.dtype, config.device, pair.drafter_quantization)
    methods = build_methods(pair, config.methods, config.static, config.cast)
    draft_vocab = DraftVocab(pair.drafter, int(pair.target.config.vocab_size))  # the engine's default, as CAST drafts
    encode = {p.id: pair.encode(p.text) for ps in prompts.values() for p in ps}
    plan = [
        (dataset, b, make_groups(prompts[dataset], b, config.prompts_for(b)), [m for m in methods if m.supports(b)])
        for dataset in config.datasets
        for b in config.batch_sizes
    ]
    bar = tqdm(total=sum(len(g) * len(ms) for _, _, g, ms in plan), disable=not progress, unit="run")
    warmed: set[tuple[str, int]] = set()
    cells: list[CellResult] = []
    used: dict[str, list[str]] = {d: [] for d in config.datasets}

    def snapshot(complete: bool) -> BenchResult:
        now = datetime.now(timezone.utc)
        return BenchResult(
            config=config,
            machine={**machine, "load_average_end": list(os.getloadavg())},
            cost_profile=profile_info(pair),
            prompts=used,
            started_at=started.isoformat(timespec="seconds"),
            finished_at=now.isoformat(timespec="seconds"),
            elapsed_s=(now - started).total_seconds(),
            complete=complete,
            cells=list(cells),
        )

    for dataset, b, groups, active in plan:
        for m in active:
            if (m.name, b) not in warmed:
                bar.set_description(f"{dataset} B={b} warm-up {m.name}")
                m.run([encode[p.id] for p in groups[0]], config.warmup_tokens)
                warmed.add((m.name, b))
        runs: dict[str, list[MethodRun]] = {m.name: [] for m in active}
        for g, group in enumerate(groups):
            ids = [encode[p.id] for p in group]
            for m in active if g % 2 == 0 else active[::-1]:
                bar.set_description(f"{dataset} B={b} group {g + 1}/{len(groups)} {m.name}")
                runs[m.name].append(m.run(ids, config.max_new_tokens))
                bar.update()
        for p in (p for group in groups for p in group):
            if p.id not in used[dataset]:
                used[dataset].append(p.id)
        for m in active:
            mismatches = [
                explain_mismatch(pair, p, encode[p.id], ref, out)
                for group, run, ref_run in zip(groups, runs[m.name], runs["vanilla"])
                for p, out, ref in zip(group, run.token_ids, ref_run.token_ids)
                if out != ref
            ]
            guesses = None
            if m.name == "vanilla":
                bar.set_description(f"{dataset} B={b} drafter guesses at vanilla's outputs")
                guesses = [
                    teacher_forced_guesses(pair.drafter, encode[p.id], out, config.cast.top_k, draft_vocab)
                    for group, run in zip(groups, runs["vanilla"])
                    for p, out in zip(group, run.token_ids)
                ]
            cells.append(summarize_cell(dataset, m.name, b, groups, runs[m.name], runs["vanilla"], mismatches, guesses))
        if on_block is not None:
            on_block(snapshot(complete=False))
    bar.close()
    return snapshot(complete=True)


def save_result(result: BenchResult, results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<results_dir>/<name>.json``; returns the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result.config.name}.json"
    path.write_text(result.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return path


def load_result(path: Path) -> BenchResult:
    """Read a result JSON written by :func:`save_result` (schema-checked)."""
    return BenchResult.model_validate_json(path.read_text(encoding="utf-8"))
