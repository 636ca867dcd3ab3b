"""The target's weights packed for oneDNN (``cast_core.packing``) against unpacked, in one process (run from the
repository root)::

    RAY_AUTH_MODE=disabled PYTHONPATH=. python bench/results/weight_packing/packed_ab.py <unpacked profile.json> <B> <dataset> <groups> [tokens]

Arms: ``vanilla/unpacked`` and ``cast/unpacked`` on a target loaded with ``pack_weights=False`` and priced by the
profile given (measured unpacked); ``vanilla/packed`` and ``cast/packed`` on the target as the engine loads it,
priced by the packaged profile (measured packed). Both share the drafter (int8: never packed). Each CAST arm keeps
one policy across groups, after a 32-token warm-up on the first group; the groups are the reported prompts in order,
the arms' order reversed every group. Prints each run's wall, batch steps and target pace, each arm's tokens/s over
``vanilla/unpacked``'s, and whether the two vanilla arms' outputs are identical (packing changes no bit).
"""

import sys
from dataclasses import replace

from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core.cost import CostProfile
from cast_core.models import load_model, resolve_model
from cast_core.packing import is_packed

ARMS = ("vanilla/unpacked", "vanilla/packed", "cast/unpacked", "cast/packed")


def main(unpacked_profile: str, batch_size: int, dataset: str, n_groups: int, tokens: int) -> None:
    packed = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
    assert is_packed(packed.target) and packed.cost_profile.notes.get("weight_packing", {}).get("target")
    unpacked = replace(
        packed,
        target=load_model(resolve_model("qwen2.5-coder-1.5b-instruct"), "bfloat16", "cpu", pack_weights=False),
        cost_profile=CostProfile.load(unpacked_profile),
    )
    assert not is_packed(unpacked.target)
    pairs = {"unpacked": unpacked, "packed": packed}
    methods = {
        arm: EngineMethod(pairs[arm.split("/")[1]], arm, "none" if arm.startswith("vanilla") else "cast") for arm in ARMS
    }
    groups = make_groups(load_prompts(dataset, packed.tokenizer, "reported"), batch_size, batch_size * n_groups)
    for arm, method in methods.items():
        method.run([packed.encode(p.text) for p in groups[0]], 32)
    totals = {arm: [0, 0.0] for arm in ARMS}
    for g, group in enumerate(groups):
        prompts = [packed.encode(p.text) for p in group]
        speed, outputs = {}, {}
        for arm in ARMS if g % 2 == 0 else tuple(reversed(ARMS)):
            run = methods[arm].run(prompts, tokens)
            n = sum(map(len, run.token_ids))
            speed[arm], outputs[arm] = n / run.wall_s, run.token_ids
            totals[arm][0] += n
            totals[arm][1] += run.wall_s
            s = run.stats
            print(f"group {g} {arm:16s} wall {run.wall_s:6.2f} steps {s.batch_steps:3d} drafted row steps {s.drafted_row_steps:4d} pace {s.target_pace:.3f}", flush=True)
        base = speed["vanilla/unpacked"]
        ratios = ", ".join(f"{arm} {speed[arm] / base:.3f}x" for arm in ARMS[1:])
        same = outputs["vanilla/unpacked"] == outputs["vanilla/packed"]
        print(f"group {g}: over vanilla/unpacked: {ratios}; vanilla outputs identical: {same}", flush=True)
    base = totals["vanilla/unpacked"][0] / totals["vanilla/unpacked"][1]
    print("pooled over vanilla/unpacked: " + ", ".join(f"{arm} {n / s / base:.3f}x" for arm, (n, s) in totals.items()))
    print(f"pooled cast/packed over vanilla/packed: {(totals['cast/packed'][0] / totals['cast/packed'][1]) / (totals['vanilla/packed'][0] / totals['vanilla/packed'][1]):.3f}x")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 128)
