"""Prompts fed to the drafter apart (each row alone) against one padded forward, the gate held open (run from the
repository root)::

    RAY_AUTH_MODE=disabled PYTHONPATH=. python bench/results/feed_apart_ab/feed_apart_ab.py <B> <dataset> <groups> <new tokens>

CAST's speedup gate is made to draft every step and to feed every catch-up whole (``DraftGate.should_draft`` and
``DraftGate.windows_catch_up`` replaced), so the two CAST arms differ only in how the prompts reach the drafter:
``apart`` as the engine decides (``cast_core.drafter._rows_fed_apart``), ``padded`` with that decision replaced by
"none apart". Vanilla and both arms run each group of ``B`` tuning prompts in one process, the order reversed every
group, after a 16-token warm-up each. Prints each run's wall, steps, tokens per row step and drafting seconds, and
each arm's speed over vanilla's (tokens per second; outputs may differ at bf16 near-ties).
"""

import sys

import cast_core.drafter as drafter_module
from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core.gate import DraftGate


def main(batch_size: int, dataset: str, n_groups: int, new_tokens: int) -> None:
    DraftGate.should_draft = lambda self, b: (self._at(b), True)[1]
    DraftGate.windows_catch_up = lambda self, b, left, extra: False
    engine_choice = drafter_module._rows_fed_apart
    arm = {"name": "apart"}

    def rows_fed_apart(chains, gaps, cached, ctx):
        rows, cost = engine_choice(chains, gaps, cached, ctx)
        return (rows, cost) if arm["name"] == "apart" else ([], engine_choice(chains, [(0, 1)] * len(chains), cached, ctx)[1])

    drafter_module._rows_fed_apart = rows_fed_apart
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")  # the native dtype, drafter "auto"
    groups = make_groups(load_prompts(dataset, pair.tokenizer, "tuning"), batch_size, batch_size * n_groups)
    methods = {
        "vanilla": EngineMethod(pair, "vanilla", "none"),
        "apart": EngineMethod(pair, "cast", "cast"),
        "padded": EngineMethod(pair, "cast", "cast"),
    }
    for name, method in methods.items():
        arm["name"] = name
        method.run([pair.encode(p.text) for p in groups[0]], 16)
    for g, group in enumerate(groups):
        prompts = [pair.encode(p.text) for p in group]
        speed = {}
        for name in ("vanilla", "apart", "padded") if g % 2 == 0 else ("padded", "apart", "vanilla"):
            arm["name"] = name
            run = methods[name].run(prompts, new_tokens)
            s, tokens = run.stats, sum(map(len, run.token_ids))
            speed[name] = tokens / run.wall_s
            print(
                f"group {g} {name:7s} wall {run.wall_s:6.2f} tokens {tokens} steps {s.batch_steps} "
                f"tokens/row step {s.gained_tokens / max(1, s.row_steps):.3f} draft {s.draft_s:5.2f}",
                flush=True,
            )
        print(f"group {g}: apart {speed['apart'] / speed['vanilla']:.3f}x vanilla, padded {speed['padded'] / speed['vanilla']:.3f}x", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
