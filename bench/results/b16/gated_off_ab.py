"""Does a gated-off CAST step cost more than a vanilla step? (run from the repository root)

    RAY_AUTH_MODE=disabled PYTHONPATH=. python bench/results/b16/gated_off_ab.py <B> <pairs> <new tokens> <dataset>

CAST's speedup gate is made to decode every step plainly (``DraftGate.should_draft`` returns a plain step,
as a closed gate's skipped steps do), so CAST's step runs its whole engine path (lookup guesses, row plans,
backlogs, the gate's bookkeeping, the verifier's tree path with one root a row) and no drafter forward.
Vanilla (policy ``none``) and this CAST run the first group of ``B`` tuning prompts alternately in one
process, the order swapped every pair (A B, B A, ...), after a 16-token warm-up each. Prints each run's
wall, verify, draft, plan and target-forward (tfw) seconds and each pair's CAST / vanilla speed (vanilla's
wall over CAST's: above 1, CAST faster).
"""

import statistics
import sys

from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core.gate import DraftGate


def main(batch_size: int, pairs: int, new_tokens: int, dataset: str) -> None:
    DraftGate.should_draft = lambda self, b: self._plain()
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")  # the native dtype, drafter "auto"
    group = make_groups(load_prompts(dataset, pair.tokenizer, "tuning"), batch_size, batch_size)[0]
    prompts = [pair.encode(p.text) for p in group]
    methods = {"vanilla": EngineMethod(pair, "vanilla", "none"), "cast": EngineMethod(pair, "cast", "cast")}
    for method in methods.values():
        method.run(prompts, 16)
    ratios = []
    for i in range(pairs):
        wall = {}
        for name in ("vanilla", "cast") if i % 2 == 0 else ("cast", "vanilla"):
            run = methods[name].run(prompts, new_tokens)
            s, wall[name] = run.stats, run.wall_s
            print(
                f"{i} {name:8s} wall {run.wall_s:6.2f} verify {s.verify_s:6.2f} draft {s.draft_s:5.2f} plan {s.plan_s:5.2f} "
                f"tfw {s.target_forward_s:6.2f} steps {s.batch_steps} verified {s.verified_tokens}",
                flush=True,
            )
        ratios.append(wall["vanilla"] / wall["cast"])
        print(f"  pair {i}: cast/vanilla speed {ratios[-1]:.3f}", flush=True)
    print(f"median {statistics.median(ratios):.3f} mean {statistics.mean(ratios):.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
