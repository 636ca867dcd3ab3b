"""Where a CAST run's time goes at one batch size, step by step, against what the planner predicted (run from the
repository root)::

    RAY_AUTH_MODE=disabled PYTHONPATH=. python bench/results/tree_scale_ab/step_anatomy.py <dataset> <B> <group> [<CastConfig JSON>]

One group of ``B`` tuning prompts: vanilla (8-token warm-up, then 128 new tokens), then CAST with the speedup gate
held open (``DraftGate.should_draft`` drafts every step; 32-token warm-up, then 128). Per CAST step it prints the
drafter's catch-up forward (widest row, ms), each further layer's forward (kept nodes, ms), the tokens a row
verified, the verify call's ms, the step's cost as planned (``DraftedStep.predicted_cost``, plain steps) and as
measured: ``(draft + verify) / plain``, ``plain`` being vanilla's mean verify seconds a step in the same process.
Then, per verified width, the mean planned and measured cost, and each run's wall time split into its steps and the
time outside them (the target's prefill, admission).
"""

import json
import sys
import time
from collections import defaultdict

import cast_core.drafter as drafter_module
import cast_core.verifier as verifier_module
from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core import CastConfig
from cast_core.gate import DraftGate


def _timed(record: dict, key: str, fn):
    """``fn`` wrapped to append ``(widest input, seconds)`` of each call to ``record[key]``."""

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - t
        if key == "catch_up":
            width = max(len(c) + len(a) for c, a in zip(args[2], args[3]))
        elif key == "layers":
            width = args[2].shape[1]
        else:
            width = args[2].tokens.shape[1]  # Verifier.verify(self, state, tree, ...)
        record.setdefault(key, []).append((width, seconds))
        return out

    return wrapper


def main(dataset: str, batch_size: int, group_index: int, config: dict) -> None:
    DraftGate.should_draft = lambda self, b: (self._at(b), True)[1]
    steps: list[dict] = []
    current: dict = {}
    drafter_module.feed_chain_ahead = _timed(current, "catch_up", drafter_module.feed_chain_ahead)
    drafter_module.forward_logits = _timed(current, "layers", drafter_module.forward_logits)
    verifier_module.Verifier.verify = _timed(current, "verify", verifier_module.Verifier.verify)
    draft = drafter_module.Drafter.draft

    def traced_draft(self, state, pending, policy, ctx, plans):
        if current:
            steps.append(dict(current))
        current.clear()
        t = time.perf_counter()
        result = draft(self, state, pending, policy, ctx, plans)
        current["draft_s"] = time.perf_counter() - t
        current["predicted"] = next(p.last_step for p, q in zip(plans, pending) if q).predicted_cost
        return result

    drafter_module.Drafter.draft = traced_draft
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")  # the native dtype, drafter "auto"
    group = make_groups(load_prompts(dataset, pair.tokenizer, "tuning"), batch_size, batch_size * (group_index + 1))[group_index]
    prompts = [pair.encode(p.text) for p in group]
    vanilla = EngineMethod(pair, "vanilla", "none")
    vanilla.run(prompts, 8)
    plain_run = vanilla.run(prompts, 128)
    plain = plain_run.stats.verify_s / plain_run.stats.batch_steps
    cast = EngineMethod(pair, "cast", "cast", cast_config=CastConfig(**config))
    cast.run(prompts, 32)
    steps.clear()
    current.clear()
    run = cast.run(prompts, 128)
    steps.append(dict(current))
    by_width: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for i, s in enumerate(steps):
        width, verify_s = s["verify"][-1]
        measured = (s["draft_s"] + verify_s) / plain
        catch = s.get("catch_up", [(0, 0.0)])[-1]
        layers = [(w, round(1000 * t)) for w, t in s.get("layers", [])]
        print(
            f"{i} catch-up w={catch[0]} {1000 * catch[1]:.0f} ms, layers {layers}, draft {1000 * s['draft_s']:.0f} ms, "
            f"verify w={width} {1000 * verify_s:.0f} ms, cost planned {s['predicted']:.2f} measured {measured:.2f}"
        )
        if i > 0:  # the first step feeds the prompts to the drafter: a one-off the planner leaves out of its cost
            by_width[width].append((s["predicted"], measured))
    print(f"plain step {1000 * plain:.0f} ms (vanilla's verify seconds a step)")
    for width in sorted(by_width):
        pairs = by_width[width]
        planned, measured = (sum(p[j] for p in pairs) / len(pairs) for j in (0, 1))
        print(f"verified {width}: {len(pairs)} steps, cost planned {planned:.2f}, measured {measured:.2f}")
    planned = sum(p for v in by_width.values() for p, _ in v)
    measured = sum(m for v in by_width.values() for _, m in v)
    print(f"all steps but the first: planned {planned:.1f}, measured {measured:.1f} plain steps ({measured / planned:.3f})")
    for name, r in (("vanilla", plain_run), ("cast", run)):
        inside = r.stats.draft_s + r.stats.verify_s
        print(f"{name}: wall {r.wall_s:.2f} s, {r.stats.batch_steps} steps {inside:.2f} s, outside them {r.wall_s - inside:.2f} s")
    print(f"cast over vanilla: {plain_run.wall_s / run.wall_s:.3f}x")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
