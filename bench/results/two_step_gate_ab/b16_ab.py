"""B=16, where one drafted step judges ``min_judged`` (16) rows: the gate of ``eda4e22``, which closes or thins only
on two judged steps or more, against the rule before it, which closed on the first step's point estimate, in one
process (run from the repository root)::

    RAY_AUTH_MODE=disabled PYTHONPATH=. python bench/results/two_step_gate_ab/b16_ab.py <B> <dataset> <groups> [tokens [--rotate]]

Arms: ``vanilla``; ``now``, the engine; ``before``, the engine with ``DraftGate._judged_enough`` as it was
(``judged >= min_judged`` rows, however few steps). Each arm keeps one policy across groups, as ``cast bench run``
does, after a 32-token warm-up on the first group (where the gate's first steps at ``B`` fall); the groups are the
reported prompts in order, each run by all three arms, the order reversed every group (``--rotate``: rotated by one
every group, so that in three groups each arm runs once in each position). Prints each run's wall,
batch steps and drafted row steps, each CAST arm's speed over vanilla's, and the gate's record at ``B`` after the
warm-up.
"""

import sys

from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core.gate import DraftGate

ARMS = ("vanilla", "now", "before")


def main(batch_size: int, dataset: str, n_groups: int, tokens: int, rotate: bool) -> None:
    def order(g: int) -> tuple[str, ...]:
        """The arms' order in group ``g``: rotated by ``g`` (each arm in each position once in three groups), else
        reversed every other group."""
        if rotate:
            return ARMS[g % 3 :] + ARMS[: g % 3]
        return ARMS if g % 2 == 0 else tuple(reversed(ARMS))

    arm = {"name": "now"}
    judged_enough = DraftGate._judged_enough

    def either(self: DraftGate, gate) -> bool:
        return gate.judged >= self.min_judged if arm["name"] == "before" else judged_enough(self, gate)

    DraftGate._judged_enough = either
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
    groups = make_groups(load_prompts(dataset, pair.tokenizer, "reported"), batch_size, batch_size * n_groups)
    methods = {name: EngineMethod(pair, name, "none" if name == "vanilla" else "cast") for name in ARMS}
    for name, method in methods.items():
        arm["name"] = name
        method.run([pair.encode(p.text) for p in groups[0]], 32)
        if name != "vanilla":
            gate = method.policy.gate
            print(
                f"warm-up {name}: rho {gate.speedup(batch_size)} closed {gate.is_closed(batch_size)} "
                f"chance {gate.draft_chance(batch_size):.3f}",
                flush=True,
            )
    for g, group in enumerate(groups):
        prompts = [pair.encode(p.text) for p in group]
        speed = {}
        for name in order(g):
            arm["name"] = name
            run = methods[name].run(prompts, tokens)
            speed[name] = sum(map(len, run.token_ids)) / run.wall_s
            s = run.stats
            print(f"group {g} {name:7s} wall {run.wall_s:6.2f} steps {s.batch_steps} drafted row steps {s.drafted_row_steps} of {s.row_steps}", flush=True)
        print(f"group {g}: now {speed['now'] / speed['vanilla']:.3f}x vanilla, before {speed['before'] / speed['vanilla']:.3f}x", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 128, "--rotate" in sys.argv[5:])
