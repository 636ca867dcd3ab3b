"""A/B of the engine overhead cut of `4c9c637` in one process (run from the repository root):

    RAY_AUTH_MODE=disabled python bench/results/overhead_cut_ab/ab_code.py <humaneval|mtbench> <B>

`old` restores, by patching, what the commit replaced: greedy acceptance by `argmax`, the grouped-attention
mask repeated by every layer, and a drafter whose q/k/v and gate/up linears run as separate int8 matmuls;
`new` is the engine as committed. One group of B tuning prompts, 128 new tokens, CAST with its gate held
open (`min_speedup` 0.01, so both arms draft every step), each arm warmed up with 8 tokens, then
old-new, new-old.
"""

import sys

import cast_core.attention as attention
import cast_core.quantize as quantize
import cast_core.verifier as verifier
from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core import CastConfig
from cast_core.models import load_drafter, resolve_model

DRAFTER = "qwen2.5-coder-0.5b-instruct"
ACCEPT = verifier.accept_greedy  # the engine's greedy acceptance, as committed


class _ArgmaxLogits:
    """Logits whose ``max(dim).indices`` is computed by ``argmax`` (greedy acceptance as before the commit)."""

    def __init__(self, logits):
        self.logits = logits

    def max(self, dim):
        return type("Max", (), {"indices": self.logits.argmax(dim=dim)})()


def main(dataset: str, batch_size: int) -> None:
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", DRAFTER, "bfloat16", "cpu", "mixed")
    siblings, quantize.SHARED_INPUT_SIBLINGS = quantize.SHARED_INPUT_SIBLINGS, ()
    separate, _ = load_drafter(resolve_model(DRAFTER), "bfloat16", "cpu", "mixed")
    quantize.SHARED_INPUT_SIBLINGS = siblings
    arms = {
        "old": (separate, lambda mask, groups: mask.repeat(1, 1, groups, 1), lambda t, l, b: ACCEPT(t, _ArgmaxLogits(l), b)),
        "new": (pair.drafter, attention._folded_mask, ACCEPT),
    }

    def use(arm: str) -> None:
        pair.drafter, attention._folded_mask, verifier.accept_greedy = arms[arm]

    group = make_groups(load_prompts(dataset, pair.tokenizer, "tuning"), batch_size, batch_size)[0]
    prompts = [pair.encode(p.text) for p in group]
    config = CastConfig(min_speedup=0.01)
    for arm in arms:
        use(arm)
        EngineMethod(pair, "cast", "cast", cast_config=config).run(prompts, 8)
    totals = {arm: [0.0, 0] for arm in arms}
    for order in (("old", "new"), ("new", "old")):
        for arm in order:
            use(arm)
            run = EngineMethod(pair, "cast", "cast", cast_config=config).run(prompts, 128)
            tokens = sum(len(t) for t in run.token_ids)
            totals[arm][0] += run.wall_s
            totals[arm][1] += tokens
            print(f"{arm}: {tokens} tokens {run.wall_s:.2f} s  {tokens / run.wall_s:.2f} tok/s", flush=True)
    rates = {arm: tokens / wall for arm, (wall, tokens) in totals.items()}
    print(f"pooled: old {rates['old']:.2f} tok/s, new {rates['new']:.2f} tok/s, new/old {rates['new'] / rates['old']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
