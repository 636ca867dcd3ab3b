"""Trace CAST's speedup gate through a warm-up and groups of reported prompts (run from the repository root):

    RAY_AUTH_MODE=disabled python bench/results/warmup_gate/gate_trace.py <groups> <warm-up tokens> [<B, 8> [<datasets, mtbench>]]

Per dataset (comma-separated, in order, one policy throughout as in `cast bench run`), vanilla and CAST
(default config, mixed drafter) warm up on the first group of B reported prompts with the given number of new
tokens (`cast bench run` warms each method up once per B, on its first dataset only), then run each group with
128 new tokens, vanilla first. The gate's DEBUG log (`cast_core.gate`: every step it lets draft and every judged
drafted step, as `cast bench run --trace-gate` prints it, `bench.cli.trace_gate`) is printed after each group, then
the group's tokens/s and CAST / vanilla. The logs beside this script were written before the gate logged: it then
hooked the gate's methods and printed every decision (`sd B -> drafts?`, plain steps included) and every judged step
(`obs`).
"""

import logging
import sys

from bench.cli import trace_gate
from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair

LOG: list[str] = []


class _ListHandler(logging.Handler):
    """Keeps the gate's DEBUG records (``cast_core.gate``) in ``LOG`` until the group is done."""

    def emit(self, record: logging.LogRecord) -> None:
        LOG.append(record.getMessage())


def _flush() -> None:
    print("\n".join(LOG))
    LOG.clear()


def main(n_groups: int, warmup_tokens: int, batch_size: int = 8, datasets: str = "mtbench") -> None:
    trace_gate(_ListHandler())
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "bfloat16", "cpu", "mixed")
    cast, vanilla = EngineMethod(pair, "cast", "cast"), EngineMethod(pair, "vanilla", "none")
    for dataset in datasets.split(","):
        print(f"=== {dataset}")
        _trace_dataset(pair, cast, vanilla, dataset, n_groups, warmup_tokens, batch_size)


def _trace_dataset(
    pair: ModelPair, cast: EngineMethod, vanilla: EngineMethod, dataset: str, n_groups: int, warmup_tokens: int, batch_size: int
) -> None:
    groups = make_groups(load_prompts(dataset, pair.tokenizer, "reported"), batch_size, batch_size * n_groups)
    first = [pair.encode(p.text) for p in groups[0]]
    vanilla.run(first, warmup_tokens)
    cast.run(first, warmup_tokens)
    _flush()
    print("=== warm-up done")
    for i, group in enumerate(groups):
        prompts = [pair.encode(p.text) for p in group]
        rv, rc = vanilla.run(prompts, 128), cast.run(prompts, 128)
        tv, tc = sum(map(len, rv.token_ids)), sum(map(len, rc.token_ids))
        _flush()
        print(
            f"=== group {i}: vanilla {tv / rv.wall_s:.2f} tok/s ({rv.stats.batch_steps} steps, {rv.wall_s:.1f}s) "
            f"cast {tc / rc.wall_s:.2f} tok/s ({rc.stats.batch_steps} steps, {rc.wall_s:.1f}s, draft {rc.stats.draft_s:.1f}s "
            f"verify {rc.stats.verify_s:.1f}s) ratio {(tc / rc.wall_s) / (tv / rv.wall_s):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main(*map(int, sys.argv[1:4]), *sys.argv[4:5])
