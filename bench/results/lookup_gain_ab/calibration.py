"""Calibration of drafter path confidence v against acceptance, by depth, at B=8 and B=1 (gate open)."""
import sys, collections
import torch
sys.path.insert(0, '/work/main')
from bench.methods import ModelPair
from bench.datasets import load_prompts
from cast_core.engine import Engine
from cast_core.policy import CastConfig
from cast_core import verifier as ver

torch.set_num_threads(2)
pair = ModelPair.load('qwen2.5-coder-1.5b-instruct', 'qwen2.5-coder-0.5b-instruct', drafter_quantization='int8')
ds = sys.argv[1]
prompts = load_prompts(ds, pair.tokenizer, 'tuning')
ids = [pair.encode(p.text) for p in prompts]
rec = []
orig = ver.Verifier.verify
def verify(self, state, tree, *a, **k):
    paths = orig(self, state, tree, *a, **k)
    if tree.num_nodes > 1:
        rec.append((tree.depth.numpy().copy(), tree.confidence.float().numpy().copy(), tree.valid.numpy().copy(), [list(p.nodes) for p in paths]))
    return paths
ver.Verifier.verify = verify
for b, over in [(8, {}), (8, {'max_depth': 3}), (1, {})]:
    e = Engine(pair.target, pair.tokenizer, pair.drafter, policy='cast', cost_profile=pair.cost_profile, max_batch_size=b, cast_config=CastConfig(min_speedup=1e-6, **over))
    rec.clear()
    e.generate(ids[:b], max_new_tokens=128)
    exp = collections.Counter(); act = collections.Counter(); n = collections.Counter()
    bins = collections.defaultdict(lambda: [0.0, 0, 0])
    for depth, conf, valid, paths in rec:
        for r, nodes in enumerate(paths):
            if not nodes: continue
            acc = set(nodes)
            for j in range(1, depth.shape[1]):
                if not valid[r, j]: continue
                d = int(depth[r, j]); v = float(conf[r, j])
                exp[d] += v; act[d] += j in acc; n[d] += 1
                bb = bins[min(int(v * 10), 9)]; bb[0] += v; bb[1] += j in acc; bb[2] += 1
    rows = sum(sum(1 for p in paths if p) for *_, paths in rec)
    print(f"{ds} B={b} {over} row-steps {rows}")
    for d in sorted(n):
        print(f"  depth {d}: nodes/row-step {n[d]/rows:.2f} sum v {exp[d]/rows:.3f} accepted {act[d]/rows:.3f} ratio {act[d]/max(exp[d],1e-9):.2f}")
    for k in sorted(bins):
        s, a, c = bins[k]
        print(f"  v in [{k/10:.1f},{(k+1)/10:.1f}): nodes {c} mean v {s/c:.3f} accepted {a/c:.3f}")
