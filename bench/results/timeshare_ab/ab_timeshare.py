"""A/B: gate thinning by step chance (current) vs by time share, HumanEval B=8 then MT-bench B=8 in one process (tuning prompts)."""
import sys, time
import torch
sys.path.insert(0, '/work/main')
from bench.methods import ModelPair
from bench.datasets import load_prompts
from cast_core.engine import Engine
from cast_core import decoder as dec
torch.set_num_threads(2)
pair = ModelPair.load('qwen2.5-coder-1.5b-instruct', 'qwen2.5-coder-0.5b-instruct', drafter_quantization='int8')
data = {d: [pair.encode(p.text) for p in load_prompts(d, pair.tokenizer, 'tuning')] for d in ('humaneval', 'mtbench')}

def timeshare_should_draft(self, batch_size):
    gate = self._at(batch_size)
    if gate.skip_left > 0:
        gate.skip_left -= 1
        return False
    if self._needs_timing(gate):
        return False
    chance = 1.0 if self._closed(gate) else self.draft_chance(batch_size)
    if chance >= 1.0:
        gate.draft_credit = 0.0
        return True
    mean_cost = max(1.0, gate.cost / gate.weight) if gate.weight > 0 else 1.0
    gate.draft_credit += chance / (mean_cost - (mean_cost - 1.0) * chance)
    if gate.draft_credit < 1.0:
        return False
    gate.draft_credit -= 1.0
    return True

drafted = {}
orig = dec.SpecDecoder.step
def step(self):
    out, st = orig(self)
    if st.drafter_forwards: drafted[self.tag] = drafted.get(self.tag, 0) + 1
    return out, st
dec.SpecDecoder.step = step
engines = {'vanilla': Engine(pair.target, pair.tokenizer, None, policy='none', cost_profile=pair.cost_profile, max_batch_size=8),
           'steps': Engine(pair.target, pair.tokenizer, pair.drafter, policy='cast', cost_profile=pair.cost_profile, max_batch_size=8),
           'time': Engine(pair.target, pair.tokenizer, pair.drafter, policy='cast', cost_profile=pair.cost_profile, max_batch_size=8)}
import types
engines['time'].policy.gate.should_draft = types.MethodType(timeshare_should_draft, engines['time'].policy.gate)
orig_init = dec.SpecDecoder.__init__
def run(name, group, n):
    e = engines[name]
    dec.SpecDecoder.tag = name; drafted[name] = 0
    t = time.perf_counter(); gens = e.generate(group, max_new_tokens=n)
    return time.perf_counter() - t, [g.token_ids for g in gens], drafted[name]
for name in engines: run(name, data['humaneval'][:8], 8)
tot = {}
gi = 0
for ds in ('humaneval', 'mtbench'):
    for start in (0, 8):
        group = data[ds][start:start + 8]
        order = list(engines) if gi % 2 == 0 else list(engines)[::-1]
        res = {name: run(name, group, 128) for name in order}
        wv = res['vanilla'][0]
        line = f"{ds} B=8 g{start}: vanilla {wv:.1f}s"
        for n in ('steps', 'time'):
            w, out, d = res[n]
            line += f" | {n} {wv / w:.3f}x drafted {d} match {sum(x == y for x, y in zip(res['vanilla'][1], out))}"
            tot.setdefault((ds, n), [0.0, 0.0]); tot[(ds, n)][0] += wv; tot[(ds, n)][1] += w
        print(line, flush=True); gi += 1
for (ds, n), (v, w) in sorted(tot.items()):
    print(f"{ds} B=8 {n} pooled {v / w:.3f}x", flush=True)
