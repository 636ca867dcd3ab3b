"""Int8 drafter linears: close to the float layer, only the decoder's, lossless decoding, profile naming."""

from __future__ import annotations

import pytest
import torch

from cast_core.cost import CostProfile, device_name
from cast_core.engine import Engine
from cast_core.models import load_drafter
from cast_core.quantize import MIXED_DENSE_ROWS, Int8Linear, SharedInputInt8, drafter_profile_name, int8_supported, quantization_of, quantize_linears, resolve_quantization
from services.config import AppConfig
from tests.conftest import TINY_EOS, random_prompts, reference_greedy, tiny_pair, tiny_tokenizer

needs_int8 = pytest.mark.skipif(not int8_supported(), reason="torch build without x86/fbgemm int8 kernels")


@needs_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_close_to_the_float_layer(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=bias).to(dtype)
    x = torch.randn(3, 5, 96, dtype=dtype)
    expected = linear(x).float()
    got = Int8Linear(linear)(x)
    assert got.dtype == dtype and got.shape == (3, 5, 40)
    error = (got.float() - expected).norm() / expected.norm()
    assert error < 0.03


@needs_int8
def test_mixed_linear_runs_wide_inputs_through_the_dense_weights() -> None:
    """Inputs of ``dense_rows`` tokens or more: the layer's own output exactly; narrower ones: the int8 kernel's."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40).to(torch.bfloat16)
    mixed, int8 = Int8Linear(linear, dense_rows=8), Int8Linear(linear)
    wide, narrow = torch.randn(2, 4, 96, dtype=torch.bfloat16), torch.randn(1, 7, 96, dtype=torch.bfloat16)
    assert torch.equal(mixed(wide), linear(wide))
    assert not torch.equal(int8(wide), linear(wide))
    assert torch.equal(mixed(narrow), int8(narrow))


@needs_int8
def test_quantize_linears_keeps_the_output_head_and_the_logits_close() -> None:
    _, drafter = tiny_pair("qwen2", torch.float32, noise=0.0)
    ids = torch.tensor([random_prompts(1, max_len=16, seed=3)[0]])
    before = drafter(ids).logits
    head = drafter.get_output_embeddings()
    replaced = quantize_linears(drafter)
    assert replaced == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert drafter.get_output_embeddings() is head and isinstance(head, torch.nn.Linear)
    after = drafter(ids).logits
    assert ((after - before).norm() / before.norm()).item() < 0.05



@needs_int8
def test_shared_input_members_return_exactly_their_own_layers_output_in_any_order() -> None:
    """One int8 matmul for siblings reading one input: each member's slice equals its own Int8Linear's output."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(96, 40).to(torch.bfloat16), torch.nn.Linear(96, 8, bias=False).to(torch.bfloat16)]
    linears.append(torch.nn.Linear(96, 8).to(torch.bfloat16))
    group = SharedInputInt8(linears)
    shared = [Int8Linear(linear, shared=(group, i)) for i, linear in enumerate(linears)]
    own = [Int8Linear(linear) for linear in linears]
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        x = torch.randn(3, 5, 96, dtype=torch.bfloat16)
        for i in order:
            assert torch.equal(shared[i](x), own[i](x))
        assert group._pending is None  # every member took its slice: the input is not held
    x, y = torch.randn(2, 96, dtype=torch.bfloat16), torch.randn(2, 96, dtype=torch.bfloat16)
    assert torch.equal(shared[0](x), own[0](x)) and torch.equal(shared[1](y), own[1](y))  # another input: computed anew
    assert torch.equal(shared[0](x), own[0](x))  # taken once already: computed anew, not a stale slice


@needs_int8
def test_quantize_linears_shares_qkv_and_gate_up_and_changes_no_logit(monkeypatch) -> None:
    _, drafter = tiny_pair("qwen2", torch.float32, noise=0.0)
    _, unshared = tiny_pair("qwen2", torch.float32, noise=0.0)
    ids = torch.tensor([random_prompts(1, max_len=16, seed=3)[0]])
    quantize_linears(drafter)
    monkeypatch.setattr("cast_core.quantize.SHARED_INPUT_SIBLINGS", ())
    quantize_linears(unshared)
    for layer in drafter.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared is not None
        assert mlp.gate_proj.shared is mlp.up_proj.shared is not None
        assert attn.o_proj.shared is None and mlp.down_proj.shared is None
    assert all(layer.self_attn.q_proj.shared is None for layer in unshared.model.layers)
    assert torch.equal(drafter(ids).logits, unshared(ids).logits)

def test_resolve_quantization() -> None:
    auto_cpu = "int8" if int8_supported() else "none"
    assert resolve_quantization("auto", "cpu") == auto_cpu
    assert resolve_quantization("auto", "cpu-2core-AMD EPYC-avx512bf16") == auto_cpu  # a profile's device kind
    assert resolve_quantization("auto", "cuda:0") == "none"
    assert resolve_quantization("auto", "NVIDIA H100 80GB HBM3") == "none"
    assert resolve_quantization("none", "cpu") == "none"
    # auto keeps a plain drafter whose profile was measured where the int8 one's was not
    assert resolve_quantization("auto", "cpu", lambda q: q == "none") == "none"
    assert resolve_quantization("auto", "cpu", lambda q: q in ("none", "int8")) == auto_cpu
    assert resolve_quantization("auto", "cpu", lambda q: False) == auto_cpu
    # auto prefers a mixed drafter where its profile was measured
    assert resolve_quantization("auto", "cpu", lambda q: True) == ("mixed" if int8_supported() else "none")
    assert resolve_quantization("auto", "cuda:0", lambda q: True) == "none"
    with pytest.raises(ValueError, match="drafter_quantization"):
        resolve_quantization("int8", "cuda:0")
    with pytest.raises(ValueError, match="drafter_quantization: mixed"):
        resolve_quantization("mixed", "cuda:0")
    with pytest.raises(ValueError, match="drafter_quantization"):
        resolve_quantization("int4", "cpu")
    assert drafter_profile_name("qwen2.5-coder-0.5b-instruct", "int8") == "qwen2.5-coder-0.5b-instruct+int8"
    assert drafter_profile_name("qwen2.5-coder-0.5b-instruct", "none") == "qwen2.5-coder-0.5b-instruct"
    assert drafter_profile_name("qwen2.5-coder-0.5b-instruct", "mixed") == "qwen2.5-coder-0.5b-instruct+mixed"


@needs_int8
def test_int8_drafter_decodes_losslessly_and_finds_its_own_profile(tmp_path, monkeypatch) -> None:
    """``from_pretrained`` on a CPU: int8 drafter by default, the target's greedy output, the ``+int8`` profile."""
    target, drafter = tiny_pair("qwen2", torch.float32)
    for name, model in (("target", target), ("drafter", drafter)):
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    model, applied = load_drafter(tmp_path / "drafter", "float32", "cpu", "none")
    assert applied == "none" and not any(isinstance(m, Int8Linear) for m in model.modules())
    monkeypatch.setenv("CAST_CACHE_DIR", str(tmp_path / "cache"))
    profile = CostProfile.synthetic(
        0.01, 0.002, 0.003, 0.0002, device=device_name("cpu"), dtype="float32", target="target", drafter="drafter+int8"
    )
    profile.save(tmp_path / "cache" / "profiles" / f"{profile.slug}.json")
    engine = Engine.from_pretrained(target=tmp_path / "target", drafter=tmp_path / "drafter", dtype="float32")
    assert any(isinstance(m, Int8Linear) for m in engine.drafter_model.modules())
    assert engine.cost_profile == profile
    for prompt in random_prompts(3, seed=5):
        assert engine.generate([prompt], max_new_tokens=12)[0].token_ids == reference_greedy(target, prompt, 12, TINY_EOS)


@needs_int8
def test_mixed_drafter_decodes_losslessly_at_every_width(tmp_path) -> None:
    """A ``mixed`` drafter (wide catch-ups and layers dense, narrow ones int8) leaves the output the target's greedy one."""
    target, drafter = tiny_pair("qwen2", torch.float32)
    drafter.save_pretrained(tmp_path / "drafter")
    model, applied = load_drafter(tmp_path / "drafter", "float32", "cpu", "mixed")
    assert applied == "mixed" and quantization_of(model) == "mixed"
    assert quantization_of(load_drafter(tmp_path / "drafter", "float32", "cpu", "int8")[0]) == "int8"
    assert quantization_of(drafter) == "none"
    rows: list[int] = []
    first = next(m for m in model.modules() if isinstance(m, Int8Linear))
    first.register_forward_hook(lambda module, args, out: rows.append(args[0].numel() // module.in_features))
    prompts = random_prompts(4, max_len=MIXED_DENSE_ROWS, seed=7)
    profile = CostProfile.synthetic(0.01, 0.0002, 0.003, 0.0001)
    engine = Engine(target, tiny_tokenizer(), model, policy="cast", cost_profile=profile, max_batch_size=4)
    outs = engine.generate(prompts, max_new_tokens=16)
    assert [g.token_ids for g in outs] == [reference_greedy(target, p, 16, TINY_EOS) for p in prompts]
    assert max(rows) >= MIXED_DENSE_ROWS > min(rows)  # the prompts' feed ran dense, the layers int8


def test_app_config_picks_the_drafter_its_packaged_profiles_price(tmp_path, monkeypatch) -> None:
    """auto: mixed where the mixed drafter's profile is packaged (Intel Xeon with AMX), int8 where the int8 drafter's is (AMD EPYC), the plain drafter where only its is (Intel Xeon with AVX-512 bf16)."""
    monkeypatch.setenv("CAST_CACHE_DIR", str(tmp_path))  # the packaged profiles alone
    with pytest.raises(ValueError, match="drafter_quantization"):
        AppConfig(device="cuda", drafter_quantization="int8")
    config = AppConfig(drafter="/models/qwen2.5-coder-0.5b-instruct", drafter_quantization="auto")
    assert config.drafter_profile_key("NVIDIA L4") == "qwen2.5-coder-0.5b-instruct"
    expected = "qwen2.5-coder-0.5b-instruct+int8" if int8_supported() else "qwen2.5-coder-0.5b-instruct"
    assert config.drafter_profile_key("cpu-2core-AMD EPYC-avx512bf16") == expected
    mixed = "qwen2.5-coder-0.5b-instruct+mixed" if int8_supported() else "qwen2.5-coder-0.5b-instruct"
    assert config.drafter_profile_key("cpu-2core-Intel(R) Xeon(R) Processor-amx") == mixed
    assert config.drafter_profile_key("cpu-2core-Intel(R) Xeon(R) Processor-avx512bf16") == "qwen2.5-coder-0.5b-instruct"
    forced = AppConfig(drafter_quantization="int8") if int8_supported() else None
    if forced is not None:
        assert forced.drafter_profile_key("cpu-2core-Intel(R) Xeon(R) Processor-avx512bf16") == "qwen2.5-coder-0.5b-instruct+int8"
