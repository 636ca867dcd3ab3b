"""Gate held open: CAST trees by max_depth at B=4 and B=8 vs vanilla, interleaved (diagnostic)."""
import sys, time, json
import torch
sys.path.insert(0, '/work/main')
from bench.methods import ModelPair
from bench.datasets import load_prompts
from cast_core.engine import Engine
from cast_core import decoder as dec
from cast_core.policy import CastConfig

subset, dataset = sys.argv[1], sys.argv[2]
variants = json.loads(sys.argv[3])  # name -> CastConfig overrides
torch.set_num_threads(2)
pair = ModelPair.load('qwen2.5-coder-1.5b-instruct', 'qwen2.5-coder-0.5b-instruct', drafter_quantization='int8')
prompts = load_prompts(dataset, pair.tokenizer, subset)
ids = [pair.encode(p.text) for p in prompts]
acc = {'steps': 0, 'drafted': 0, 'fw': 0, 'ver': 0, 'draft_s': 0.0, 'verify_s': 0.0, 'windowed': 0}
from cast_core.gate import DraftGate
orig_catch_up = DraftGate.catch_up
def catch_up(self, *args, **kwargs):
    chains, gaps = orig_catch_up(self, *args, **kwargs)
    acc['windowed'] += sum(skipped for _, skipped in gaps) if gaps else 0  # catch-up tokens left out of the drafter's cache
    return chains, gaps
DraftGate.catch_up = catch_up
orig = dec.SpecDecoder.step
def step(self):
    out, st = orig(self)
    acc['steps'] += 1; acc['drafted'] += st.drafter_forwards > 0; acc['fw'] += st.drafter_forwards
    acc['ver'] += max(st.tokens_verified); acc['draft_s'] += st.draft_s; acc['verify_s'] += st.verify_s
    return out, st
dec.SpecDecoder.step = step
engines = {'vanilla': Engine(pair.target, pair.tokenizer, None, policy='none', cost_profile=pair.cost_profile, max_batch_size=8)}
import types, numpy as np
def vchain_grow(self, layer, kept, ctx, histories, covered=0.0):
    if layer >= self.config.max_depth:
        return False
    alpha = float(np.mean([h.alpha() for h in histories])) if histories else 1.0
    utility = float(kept.sum(axis=1).mean())
    n = min(layer + 2, len(ctx.target) - 1)
    cost = float(ctx.drafter[kept.shape[1]]) + float(ctx.target[n] - ctx.target[n - 1])
    return alpha * utility - covered >= self._threshold(self.config.c2, ctx) * cost
def tree_priced_grow(mode):
    """Depth price with verification read at the tree's size so far (N_i nodes kept through layer i):
    'layer' prices the n_i new nodes, C_D(n_i) + C_T(1 + N_i + n_i) - C_T(1 + N_i); 'node' one node, C_D(n_i) + C_T(N_i + 2) - C_T(N_i + 1)."""
    def grow(self, layer, kept, ctx, histories, covered=0.0):
        if layer == 1:
            self._tree_nodes = 0
        self._tree_nodes += kept.shape[1]
        if layer >= self.config.max_depth:
            return False
        alpha = float(np.mean([h.alpha() for h in histories])) if histories else 1.0
        utility = float(kept.sum(axis=1).mean())
        n = kept.shape[1] if mode == 'layer' else 1
        cost = ctx.drafter_cost(kept.shape[1]) + ctx.target_cost(1 + self._tree_nodes + n) - ctx.target_cost(1 + self._tree_nodes)
        return alpha * utility - covered >= self._threshold(self.config.c2, ctx) * cost
    return grow
def retry16_use_lookup(self, chain_width, fed_width, ctx):
    """The lookup rule until the probes: a lookup not fed moves g towards 1 by 1/16 a step."""
    if self.lookup_tokens == 0:
        return False
    extra = ctx.drafter_cost(fed_width) - ctx.drafter_cost(chain_width)
    if extra <= 0 or self._lookup_gain > self._threshold(self.config.c1, ctx) * extra:
        return True
    self._lookup_gain += (1.0 - self._lookup_gain) / 16
    return False
def window_rule(gate, rule):
    """The catch-up's whole-or-window choice with the gate open: 'point' reads rho^B itself rather than rho_low,
    'open' always feeds whole (a closed gate's probes stay windowed, as landed); 'prompt' feeds a new row's prompt whole
    while the gate is open (rows with an empty drafter cache), backlogs as landed."""
    if rule == 'prompt':
        landed = gate.catch_up
        def catch_up(batch_size, chains, cached, tokens_left, catch_up_cost):
            g = gate._at(batch_size)
            fed, gaps = gate.probe_window(chains, cached)
            prompts = [n == 0 for n, (_, skipped) in zip(cached, gaps) if skipped]
            if prompts and all(prompts) and not gate._closed(g):
                return chains, None
            return landed(batch_size, chains, cached, tokens_left, catch_up_cost)
        gate.catch_up = catch_up
        return
    def windows(batch_size, tokens_left, extra_cost):
        g = gate._at(batch_size)
        if not g.has_record:
            return False
        if gate._closed(g):
            return True
        if rule == 'open':
            return False
        rho = g.tokens / g.cost
        return ((1.0 - 1.0 / rho) * tokens_left if rho > 1.0 else 0.0) < extra_cost
    gate.windows_catch_up = windows
loaded = {}
for name, over in variants.items():
    over = dict(over); vchain = over.pop('_vchain', False); always_lookup = over.pop('_always_lookup', False); price = over.pop('_price', None); retry16 = over.pop('_retry16', False); window = over.pop('_window', None); dense_rows = over.pop('_dense_rows', None); quant = over.pop('_quant', None)
    drafter, profile = pair.drafter, pair.cost_profile
    if dense_rows:  # int8 linears that run the bf16 weights for inputs of dense_rows rows or more, priced by the int8 profile
        from cast_core.models import load_model, resolve_model
        from cast_core.quantize import quantize_linears
        drafter = load_model(resolve_model('qwen2.5-coder-0.5b-instruct'), 'bfloat16', 'cpu')
        quantize_linears(drafter, dense_rows)
    if quant:  # the drafter loaded with this quantization, priced by its own profile
        if quant not in loaded:
            loaded[quant] = ModelPair.load('qwen2.5-coder-1.5b-instruct', 'qwen2.5-coder-0.5b-instruct', drafter_quantization=quant)
        drafter, profile = loaded[quant].drafter, loaded[quant].cost_profile
    engines[name] = Engine(pair.target, pair.tokenizer, drafter, policy='cast', cost_profile=profile, max_batch_size=8, cast_config=CastConfig(**over))
    if vchain:
        engines[name].policy.grow = types.MethodType(vchain_grow, engines[name].policy)
    if price:
        engines[name].policy.grow = types.MethodType(tree_priced_grow(price), engines[name].policy)
    if retry16:
        engines[name].policy.use_lookup = types.MethodType(retry16_use_lookup, engines[name].policy)
    if window:
        window_rule(engines[name].policy.gate, window)
    if always_lookup:  # feed every lookup found, whatever its price (the policy's rule bypassed)
        engines[name].policy.use_lookup = lambda chain_width, fed_width, ctx, p=engines[name].policy: p.lookup_tokens > 0
def run(name, group, n):
    e = engines[name]; e.max_batch_size = len(group)
    for k in acc: acc[k] = 0
    t = time.perf_counter(); gens = e.generate(group, max_new_tokens=n)
    return time.perf_counter() - t, [g.token_ids for g in gens], dict(acc)
plan = [(int(b), ids[int(s):int(s) + int(b)]) for b, s in (x.split(':') for x in sys.argv[4].split(','))]
warmed = set(); tot = {}
for gi, (b, group) in enumerate(plan):
    if b not in warmed:
        for name in engines: run(name, group, 8)
        warmed.add(b)
    order = list(engines) if gi % 2 == 0 else list(engines)[::-1]
    res = {name: run(name, group, 128) for name in order}
    wv = res['vanilla'][0]
    line = f"{dataset} B={b} g{gi}: vanilla {wv:.1f}s"
    for n in variants:
        w, out, a = res[n]
        d = max(a['drafted'], 1)
        line += f" | {n} {wv/w:.3f}x steps {a['steps']} drafted {a['drafted']} fw/d {a['fw']/d:.1f} ver/d {a['ver']/d:.1f} draft {a['draft_s']:.1f}s verify {a['verify_s']:.1f}s match {sum(x==y for x,y in zip(res['vanilla'][1],out))} windowed {a['windowed']}"
        tot.setdefault((b, n), [0.0, 0.0]); tot[(b, n)][0] += wv; tot[(b, n)][1] += w
    print(line, flush=True)
for (b, n), (v, w) in sorted(tot.items()):
    print(f"{dataset} B={b} {n} pooled {v/w:.3f}x", flush=True)
