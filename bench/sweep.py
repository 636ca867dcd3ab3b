"""Threshold sweep for CAST's C1, C2, C3 and R on the *tuning* prompts (``cast bench sweep``).

Coordinate search: starting from ``start`` (default: the current ``CastConfig``
defaults), each parameter in ``order`` in turn is set to every value of its
grid with the others held, and keeps the value with the best score; a trial
already run is reused. One trial runs CAST on every (dataset, batch size) cell
of the tuning subset — disjoint from the prompts ``cast bench`` reports.

Score of a trial: the geometric mean over cells of its speedup over vanilla,
where vanilla is measured once per cell before the trials (a geometric mean
of speedups weighs batch 1 and batch 8 alike, whatever their absolute speeds).
Trials run one after another, so slow drift of the machine is not cancelled
as in the interleaved benchmark; the chosen thresholds are then checked on the
reported prompts by ``cast bench``.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field, field_validator
from tqdm.auto import tqdm

from bench.datasets import DATASET_NAMES, Prompt
from bench.harness import RESULTS_DIR, machine_info, make_groups, profile_info
from bench.methods import EngineMethod, Method, ModelPair, ModelPairConfig
from cast_core import CastConfig

SWEEP_FILE = "sweep.json"
PARAMS = ("c1", "c2", "c3", "r")


class SweepConfig(ModelPairConfig):
    """What the threshold sweep runs."""

    datasets: list[str] = Field(list(DATASET_NAMES), min_length=1, description="Datasets (tuning subsets) to run.")
    batch_sizes: list[int] = Field([1, 8], min_length=1, description="Batch sizes every trial runs.")
    prompts: int = Field(2, ge=1, description="Tuning prompts per dataset and batch size, rounded up to whole batches.")
    max_new_tokens: int = Field(48, ge=1, description="New tokens per prompt (fewer than the benchmark's, for speed).")
    warmup_tokens: int = Field(8, ge=1, description="New tokens of the untimed warm-up per batch size.")
    start: CastConfig = Field(default_factory=CastConfig, description="Thresholds the search starts from.")
    order: list[str] = Field(list(PARAMS), min_length=1, description="Parameters to search, in this order.")
    c1: list[float] = Field([0.25, 0.5, 1.0, 2.0, 4.0], min_length=1, description="Grid of C1 (breadth threshold).")
    c2: list[float] = Field([0.25, 0.5, 1.0, 2.0, 4.0], min_length=1, description="Grid of C2 (depth threshold).")
    c3: list[float] = Field([0.25, 0.5, 1.0, 2.0, 4.0], min_length=1, description="Grid of C3 (reranking threshold).")
    r: list[int] = Field([1, 4, 8], min_length=1, description="Grid of R (depth gain ratios averaged).")

    @field_validator("order")
    @classmethod
    def _check_order(cls, v: list[str]) -> list[str]:
        unknown = [p for p in v if p not in PARAMS]
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; known: {', '.join(PARAMS)}")
        return v


class SweepCell(BaseModel):
    """One trial on one (dataset, batch size): totals over its groups."""

    dataset: str
    batch_size: int
    tokens_per_s: float = Field(description="Generated tokens / wall time, all groups together.")
    speedup_vs_vanilla: float = Field(description="tokens_per_s / vanilla's on the same groups.")
    mean_accepted_length: float = Field(description="Tokens gained per row-step.")
    verified_tokens_per_step: float = Field(description="Tokens verified per row-step.")


class Trial(BaseModel):
    """One threshold setting and how it did."""

    cast: CastConfig
    score: float = Field(description="Geometric mean over cells of speedup_vs_vanilla.")
    cells: list[SweepCell]


class SweepResult(BaseModel):
    """The whole sweep: config, machine, vanilla references, trials in run order, and the winner."""

    config: SweepConfig
    machine: dict[str, object]
    cost_profile: dict[str, object]
    prompts: dict[str, list[str]] = Field(description="Per dataset, the tuning prompt ids used.")
    vanilla_tokens_per_s: dict[str, float] = Field(description="Vanilla per cell, keyed '<dataset>/B<batch>'.")
    trials: list[Trial]
    best: CastConfig
    elapsed_s: float


def _cell_rate(method: Method, groups: list[list[list[int]]], max_new_tokens: int) -> tuple[float, float, float]:
    """``(tokens/s, accepted length, verified per step)`` of ``method`` over all ``groups``."""
    tokens, wall, gained, verified, row_steps = 0, 0.0, 0, 0, 0
    for ids in groups:
        run = method.run(ids, max_new_tokens)
        tokens += sum(len(t) for t in run.token_ids)
        wall += run.wall_s
        gained += run.stats.gained_tokens
        verified += run.stats.verified_tokens
        row_steps += run.stats.row_steps
    return tokens / wall, gained / max(row_steps, 1), verified / max(row_steps, 1)


def run_sweep(config: SweepConfig, pair: ModelPair, prompts: dict[str, list[Prompt]], progress: bool = True) -> SweepResult:
    """Coordinate search over ``config.order``; ``prompts`` maps each dataset to its tuning prompts."""
    started = datetime.now(timezone.utc)
    machine = machine_info(config.dtype, config.device, pair.drafter_quantization)
    cells = [
        (d, b, [[pair.encode(p.text) for p in g] for g in make_groups(prompts[d], b, config.prompts)])
        for d in config.datasets
        for b in config.batch_sizes
    ]
    used = {
        d: list(dict.fromkeys(p.id for b in config.batch_sizes for g in make_groups(prompts[d], b, config.prompts) for p in g))
        for d in config.datasets
    }
    total = 2 + sum(len(getattr(config, p)) for p in config.order)  # vanilla, start, grid values
    bar = tqdm(total=total, disable=not progress, unit="trial")
    bar.set_description("vanilla + warm-up")
    vanilla = EngineMethod(pair, "vanilla", "none")
    warm = EngineMethod(pair, "cast", "cast", cast_config=config.start)
    for b in config.batch_sizes:
        first = next(groups[0] for _, cb, groups in cells if cb == b)
        vanilla.run(first, config.warmup_tokens)
        warm.run(first, config.warmup_tokens)
    reference = {f"{d}/B{b}": _cell_rate(vanilla, groups, config.max_new_tokens)[0] for d, b, groups in cells}
    bar.update()

    trials: dict[tuple, Trial] = {}

    def evaluate(cast: CastConfig) -> Trial:
        key = tuple(getattr(cast, p) for p in PARAMS)
        if key not in trials:
            bar.set_description(" ".join(f"{p}={getattr(cast, p):g}" for p in PARAMS))
            method = EngineMethod(pair, "cast", "cast", cast_config=cast)
            results = []
            for d, b, groups in cells:
                rate, accepted, verified = _cell_rate(method, groups, config.max_new_tokens)
                results.append(SweepCell(
                    dataset=d,
                    batch_size=b,
                    tokens_per_s=rate,
                    speedup_vs_vanilla=rate / reference[f"{d}/B{b}"],
                    mean_accepted_length=accepted,
                    verified_tokens_per_step=verified,
                ))
            score = math.exp(sum(math.log(c.speedup_vs_vanilla) for c in results) / len(results))
            trials[key] = Trial(cast=cast, score=score, cells=results)
        bar.update()
        return trials[key]

    best = evaluate(config.start)
    for param in config.order:
        for value in getattr(config, param):
            trial = evaluate(best.cast.model_copy(update={param: value}))
            if trial.score > best.score:
                best = trial
    bar.close()
    return SweepResult(
        config=config,
        machine=machine,
        cost_profile=profile_info(pair),
        prompts=used,
        vanilla_tokens_per_s=reference,
        trials=list(trials.values()),
        best=best.cast,
        elapsed_s=(datetime.now(timezone.utc) - started).total_seconds(),
    )


def save_sweep(result: SweepResult, results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<results_dir>/sweep.json``; returns the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / SWEEP_FILE
    path.write_text(result.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return path


def load_sweep(path: Path) -> SweepResult:
    """Read a sweep JSON written by :func:`save_sweep` (schema-checked)."""
    return SweepResult.model_validate_json(path.read_text(encoding="utf-8"))
