"""Trace CAST's speedup gate through a warm-up and groups of reported prompts (run from the repository root):

    RAY_AUTH_MODE=disabled python bench/results/warmup_gate/gate_trace.py <groups> <warm-up tokens> [<B, 8> [<datasets, mtbench>]]

Per dataset (comma-separated, in order, one policy throughout as in `cast bench run`), vanilla and CAST
(default config, mixed drafter) warm up on the first group of B reported prompts with the given number of new
tokens (`cast bench run` warms each method up once per B, on its first dataset only), then run each group with
128 new tokens, vanilla first. Every gate decision (`sd B -> drafts?`) and every judged drafted step (`obs`: its
tokens n from the rows with the most tokens left, its cost C in plain steps, whether C is on the profile's
basis, whether it was a thinned step, the record's rho and standard error, closed or not, and the thinning
loss L against the time E) is printed, then the group's tokens/s and CAST / vanilla.
"""

import sys

from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core.gate import DraftGate

LOG: list[str] = []
_observe, _should_draft = DraftGate.observe, DraftGate.should_draft


def _traced_observe(self: DraftGate, b: int, tokens: float, cost: float, on_profile: bool = False) -> None:
    thinned = b in self._by_batch and self._by_batch[b].thinned
    _observe(self, b, tokens, cost, on_profile)
    g = self._by_batch[b]
    LOG.append(
        f"  obs B={b} n={tokens:.2f} C={cost:.2f} prof={on_profile} thinned={thinned} rho={g.tokens / g.cost:.3f} "
        f"se={g.tokens_spread() / g.cost:.3f} closed={self._closed(g)} L={self._thin_loss:.2f} E={self._elapsed:.1f}"
    )


def _traced_should_draft(self: DraftGate, b: int) -> bool:
    drafts = _should_draft(self, b)
    LOG.append(f"sd B={b} -> {drafts}")
    return drafts


def _flush() -> None:
    print("\n".join(LOG))
    LOG.clear()


def main(n_groups: int, warmup_tokens: int, batch_size: int = 8, datasets: str = "mtbench") -> None:
    DraftGate.observe, DraftGate.should_draft = _traced_observe, _traced_should_draft
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
