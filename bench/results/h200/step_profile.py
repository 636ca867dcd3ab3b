"""Diagnostic: where a decoding step's time goes on the GPU (vanilla vs CAST), random-weight models."""
import cProfile, io, os, pstats, sys, time
import torch
from cast_core import CastConfig, Engine
from cast_core.cost import CostProfile
from cast_core.models import load_model, load_tokenizer

dev = sys.argv[1]; prof_path = sys.argv[2]; os.chdir(sys.argv[3]); t_name, d_name = sys.argv[4], sys.argv[5]
B = int(sys.argv[6]) if len(sys.argv) > 6 else 8

if os.environ.get("NO_CUDNN"):  # runs 3-4 only (see README.md); run 5 had this line removed
    torch.backends.cuda.enable_cudnn_sdp(False)
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
target = load_model(t_name, "bfloat16", dev, random_weights=True)
drafter = load_model(d_name, "bfloat16", dev, random_weights=True)
tok = load_tokenizer(t_name)
profile = CostProfile.load(prof_path)
gen = torch.Generator().manual_seed(B)
prompts = [torch.randint(1000, target.config.vocab_size, (128,), generator=gen).tolist() for _ in range(B)]
for label, policy, prof in (("none", "none", profile), ("none-noprofile", "none", None), ("cast", "cast", profile), ("none-again", "none", profile)):
    eng = Engine(target, tok, drafter, policy=policy, cost_profile=prof, max_batch_size=B, cast_config=CastConfig())
    eng.generate(prompts, max_new_tokens=8)
    sync()
    pr = cProfile.Profile()
    t0 = time.perf_counter(); pr.enable()
    out = eng.generate(prompts, max_new_tokens=32)
    sync(); pr.disable(); wall = time.perf_counter() - t0
    st = out[0].stats
    print(f"== {label} B={B}: {wall*1000/st.steps:.1f} ms/step; verify {st.verify_s*1000/st.steps:.1f} draft {st.draft_s*1000/st.steps:.1f} plan {st.plan_s*1000/st.steps:.2f} ms/step", flush=True)
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14); print(s.getvalue()[-700:] if not os.environ.get("NO_CUDNN") else "", flush=True)
# a bare forward for reference
from cast_core.profiler import batch_state, forward_block
state = batch_state(target, prompts[0], B, torch.device(dev))
ids = torch.randint(1000, 2000, (B, 1)).to(dev)
for _ in range(3):
    forward_block(target, state, ids); state.discard_tail()
sync(); t0 = time.perf_counter()
for _ in range(10):
    forward_block(target, state, ids); state.discard_tail()
sync(); print(f"bare target forward B={B} n=1: {(time.perf_counter()-t0)*100:.1f} ms", flush=True)
