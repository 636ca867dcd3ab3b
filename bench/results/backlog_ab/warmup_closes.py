"""How often the benchmark's warm-up leaves CAST's speedup gate closed, with a drafted step judged without the
backlog of plain steps it feeds (``fresh``, the engine) or with it (``charged``, the rule before; run from the
repository root)::

    RAY_AUTH_MODE=disabled PYTHONPATH=. python bench/results/backlog_ab/warmup_closes.py <B> <dataset> <reps> [tokens]

Each repetition runs, as ``cast bench run`` does before its first group, vanilla's warm-up and then a fresh CAST
policy's on the first group of ``B`` reported prompts (``tokens`` new tokens, the harness's 32 by default), once per
arm, the arms' order alternating. ``charged`` replaces ``DraftedStep.judge`` so that ``C`` is the step's whole wall
time. Prints the gate's record at ``B`` after each warm-up (the judged steps are in its DEBUG log, printed too).
"""

import logging
import sys

from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core.policy import DraftedStep


def main(batch_size: int, dataset: str, reps: int, tokens: int) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("cast_core.gate").setLevel(logging.DEBUG)
    judge = DraftedStep.judge
    arm = {"name": "fresh"}

    def judged(self: DraftedStep, now: float, scale: float | None) -> tuple[float, float, bool]:
        cost, full, on_profile = judge(self, now, scale)
        return (full if arm["name"] == "charged" else cost), full, on_profile

    DraftedStep.judge = judged
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
    group = make_groups(load_prompts(dataset, pair.tokenizer, "reported"), batch_size, batch_size)[0]
    prompts = [pair.encode(p.text) for p in group]
    vanilla = EngineMethod(pair, "vanilla", "none")
    closed = {"fresh": 0, "charged": 0}
    for rep in range(reps):
        for name in ("fresh", "charged") if rep % 2 == 0 else ("charged", "fresh"):
            arm["name"] = name
            vanilla.run(prompts, tokens)
            cast = EngineMethod(pair, "cast", "cast")
            run = cast.run(prompts, tokens)
            gate = cast.policy.gate
            shut = gate.is_closed(batch_size)
            closed[name] += shut
            print(
                f"rep {rep} {name:7s} wall {run.wall_s:5.1f} rho {gate.speedup(batch_size):.3f} "
                f"se {gate.speedup_error(batch_size):.3f} closed {shut} skip {gate._at(batch_size).skip_left}",
                flush=True,
            )
    print(f"closed after the warm-up: fresh {closed['fresh']}/{reps}, charged {closed['charged']}/{reps}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 32)
