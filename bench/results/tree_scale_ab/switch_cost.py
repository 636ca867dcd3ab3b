"""Does the first plain step after a drafted one cost more than later plain steps? (run from the repository root)::

    RAY_AUTH_MODE=disabled PYTHONPATH=. python bench/results/tree_scale_ab/switch_cost.py <dataset>

The speedup gate does not time the first plain step after a drafted one (``PlainStep.timed``): on the 2-core Intel
Xeon it ran 0.31-0.49 s against 0.26-0.36 s for later plain steps. Here CAST runs the first group of 8 tuning prompts
(16-token warm-up, then 128 new tokens) with ``DraftGate.should_draft`` replaced by a fixed cycle, one drafted step
then three plain ones, and prints the wall time of plain steps right after a drafted step and of later ones (from
one drafting call to the next), with the time their drafting call spent committing the drafter's stashed path
(``_reuse_stashed_path``).
"""

import sys
import time

import numpy as np

import cast_core.drafter as drafter_module
from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core.gate import DraftGate

CYCLE = (True, False, False, False)


def main(dataset: str) -> None:
    calls = {"n": 0}

    def cycled(self, batch_size):
        self._at(batch_size)
        calls["n"] += 1
        return CYCLE[(calls["n"] - 1) % len(CYCLE)]

    DraftGate.should_draft = cycled
    steps: list[tuple[float, bool, float]] = []  # (call start, drafted, seconds committing the stashed path)
    reuse_s = {"s": 0.0}
    reuse = drafter_module._reuse_stashed_path

    def timed_reuse(*args):
        t = time.perf_counter()
        out = reuse(*args)
        reuse_s["s"] = time.perf_counter() - t
        return out

    drafter_module._reuse_stashed_path = timed_reuse
    draft = drafter_module.Drafter.draft

    def traced_draft(self, state, pending, policy, ctx, plans):
        t = time.perf_counter()
        result = draft(self, state, pending, policy, ctx, plans)
        steps.append((t, result.nodes_drafted > 0, reuse_s["s"]))
        return result

    drafter_module.Drafter.draft = traced_draft
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")  # the native dtype, drafter "auto"
    group = make_groups(load_prompts(dataset, pair.tokenizer, "tuning"), 8, 8)[0]
    prompts = [pair.encode(p.text) for p in group]
    cast = EngineMethod(pair, "cast", "cast")
    cast.run(prompts, 16)
    steps.clear()
    calls["n"] = 0
    cast.run(prompts, 128)
    kinds: dict[str, list[tuple[float, float]]] = {"first plain step after a drafted one": [], "later plain steps": []}
    for k in range(1, len(steps) - 1):
        start, drafted, reused = steps[k]
        if not drafted:
            kind = "first plain step after a drafted one" if steps[k - 1][1] else "later plain steps"
            kinds[kind].append((steps[k + 1][0] - start, reused))
    for kind, timings in kinds.items():
        walls, reused = np.array(timings).T
        print(f"{kind}: {len(walls)}, wall median {1000 * np.median(walls):.0f} ms (mean {1000 * walls.mean():.0f}), "
              f"committing the stashed path {1000 * reused.mean():.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1])
