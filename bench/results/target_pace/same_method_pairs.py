"""Two runs of the same method back to back differ only by the machine: how much of that the target pace explains
(run from the repository root)::

    RAY_AUTH_MODE=disabled PYTHONPATH=. python bench/results/target_pace/same_method_pairs.py <B> <dataset> <pairs> [tokens]

Runs vanilla decoding twice on each group of the reported prompts (``first`` then ``second``, one group after the
other, as many pairs as asked, groups reused in turn) and prints each pair's raw ratio (second's tokens/s over
first's), the two runs' target paces (``bench.methods.ForwardTimer.pace``) and the ratio at one pace
(``bench.report.pace_adjusted``); then the spread of both ratios over the pairs. Identical runs read 1.0 at one pace
exactly where the pace accounts for the machine's drift.
"""

import statistics
import sys

from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair


def main(batch_size: int, dataset: str, pairs: int, tokens: int) -> None:
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
    groups = make_groups(load_prompts(dataset, pair.tokenizer, "reported"), batch_size, batch_size * pairs)
    method = EngineMethod(pair, "vanilla", "none")
    method.run([pair.encode(p.text) for p in groups[0]], 16)  # warm-up
    raw, adjusted = [], []
    for i in range(pairs):
        prompts = [pair.encode(p.text) for p in groups[i % len(groups)]]
        first, second = method.run(prompts, tokens), method.run(prompts, tokens)
        ratio = first.wall_s / second.wall_s  # same tokens: tokens/s of the second over the first's
        at_one_pace = ratio * second.stats.target_pace / first.stats.target_pace
        raw.append(ratio)
        adjusted.append(at_one_pace)
        print(
            f"pair {i}: walls {first.wall_s:6.2f} / {second.wall_s:6.2f} s, paces {first.stats.target_pace:.3f} / "
            f"{second.stats.target_pace:.3f}, raw {ratio:.3f}, at one pace {at_one_pace:.3f}",
            flush=True,
        )
    for name, values in (("raw", raw), ("at one pace", adjusted)):
        spread = statistics.pstdev(values)
        print(f"{name}: median {statistics.median(values):.3f}, range {min(values):.3f}-{max(values):.3f}, sd {spread:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 128)
