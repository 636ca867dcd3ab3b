"""A new row's prompt fed to the drafter whole against only its last ``W`` tokens (plus the first 4), the gate held
open (run from the repository root)::

    RAY_AUTH_MODE=disabled PYTHONPATH=. python bench/results/prompt_window_ab/prompt_window_ab.py <B> <dataset> <groups> <new tokens> <W> [<W> ...]

CAST's speedup gate is made to draft every step (``DraftGate.should_draft`` replaced), and to window every long
catch-up exactly where the arm's ``probe_context`` is under 4096 (``DraftGate.windows_catch_up`` replaced): the arm
``W = 4096`` feeds prompts whole, the others through a window of ``W`` tokens. With the gate open every step drafts,
so the only long catch-up is each row's prompt. Vanilla and every arm run each group of ``B`` tuning prompts in one
process, the order reversed every group, after a 16-token warm-up each. Prints each run's wall, batch steps, tokens
per row step, drafting and verifying seconds, and each arm's speed over vanilla's (tokens per second).
"""

import sys

from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core.gate import DraftGate
from cast_core.policy import CastConfig

WHOLE = 4096


def main(batch_size: int, dataset: str, n_groups: int, new_tokens: int, windows: list[int]) -> None:
    DraftGate.should_draft = lambda self, b: (self._at(b), True)[1]
    DraftGate.windows_catch_up = lambda self, b, left, extra: self.probe_context < WHOLE
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")  # the native dtype, drafter "auto"
    groups = make_groups(load_prompts(dataset, pair.tokenizer, "tuning"), batch_size, batch_size * n_groups)
    methods = {"vanilla": EngineMethod(pair, "vanilla", "none")}
    for w in windows:
        methods[f"w{w}"] = EngineMethod(pair, "cast", "cast", cast_config=CastConfig(probe_context=w))
    for method in methods.values():
        method.run([pair.encode(p.text) for p in groups[0]], 16)
    names = list(methods)
    for g, group in enumerate(groups):
        prompts = [pair.encode(p.text) for p in group]
        print(f"group {g} prompt lengths {[len(p) for p in prompts]}", flush=True)
        speed = {}
        for name in names if g % 2 == 0 else names[::-1]:
            run = methods[name].run(prompts, new_tokens)
            s, tokens = run.stats, sum(map(len, run.token_ids))
            speed[name] = tokens / run.wall_s
            print(
                f"group {g} {name:8s} wall {run.wall_s:6.2f} steps {s.batch_steps} tok/rowstep {s.gained_tokens / max(1, s.row_steps):.3f} "
                f"draft {s.draft_s:5.2f} verify {s.verify_s:5.2f}",
                flush=True,
            )
        print(f"group {g}: " + " ".join(f"{n} {speed[n] / speed['vanilla']:.3f}x" for n in names[1:]), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), [int(w) for w in sys.argv[5:]])
