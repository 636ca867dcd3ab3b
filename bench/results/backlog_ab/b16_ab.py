"""B=16, where drafting is about break-even on the 2-core AMD EPYC: the gate's rules of ``3b2160c`` against the rules
before ``9748b1d``, in one process (run from the repository root)::

    RAY_AUTH_MODE=disabled PYTHONPATH=. python bench/results/backlog_ab/b16_ab.py <B> <dataset> <groups> [tokens]

Arms: ``vanilla``; ``now``, the engine; ``before``, the engine with the two rules replaced as they were: a drafted
step's ``C`` is its whole wall time, its backlog's catch-up included (``DraftedStep.judge``), and the closing test and
thinning's chance read a normal (``DraftGate._margin`` = ``z S``; ``draft_chance`` = ``Phi((T - K) / S)``). Each arm
keeps one policy across groups, as ``cast bench run`` does, after a 32-token warm-up on the first group; the groups
are the reported prompts in order, each run by all three arms, the order reversed every group. Prints each run's
wall, batch steps and drafted row steps, and each CAST arm's speed over vanilla's.
"""

import math
import sys

from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core.gate import DraftGate
from cast_core.policy import DraftedStep


def main(batch_size: int, dataset: str, n_groups: int, tokens: int) -> None:
    arm = {"name": "now"}
    judge, margin, chance = DraftedStep.judge, DraftGate._margin, DraftGate.draft_chance

    def judged(self, now, scale):
        cost, full, on_profile = judge(self, now, scale)
        return (full if arm["name"] == "before" else cost), full, on_profile

    def normal_margin(self, gate):
        return self.close_confidence * gate.tokens_spread() if arm["name"] == "before" else margin(self, gate)

    def normal_chance(self, b):
        gate = self._at(b)
        if arm["name"] != "before" or chance(self, b) == 1.0 or gate.tokens_spread() <= 0:
            return chance(self, b)
        return 0.5 * (1.0 + math.erf((gate.tokens - self.min_speedup * gate.cost) / (gate.tokens_spread() * math.sqrt(2.0))))

    DraftedStep.judge, DraftGate._margin, DraftGate.draft_chance = judged, normal_margin, normal_chance
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
    groups = make_groups(load_prompts(dataset, pair.tokenizer, "reported"), batch_size, batch_size * n_groups)
    methods = {name: EngineMethod(pair, name, "none" if name == "vanilla" else "cast") for name in ("vanilla", "now", "before")}
    for name, method in methods.items():
        arm["name"] = name
        method.run([pair.encode(p.text) for p in groups[0]], 32)
    for g, group in enumerate(groups):
        prompts = [pair.encode(p.text) for p in group]
        speed = {}
        for name in ("vanilla", "now", "before") if g % 2 == 0 else ("before", "now", "vanilla"):
            arm["name"] = name
            run = methods[name].run(prompts, tokens)
            speed[name] = sum(map(len, run.token_ids)) / run.wall_s
            s = run.stats
            print(f"group {g} {name:7s} wall {run.wall_s:6.2f} steps {s.batch_steps} drafted row steps {s.drafted_row_steps} of {s.row_steps}", flush=True)
        print(f"group {g}: now {speed['now'] / speed['vanilla']:.3f}x vanilla, before {speed['before'] / speed['vanilla']:.3f}x", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 128)
