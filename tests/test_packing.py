"""Packed bfloat16 linear weights (cast_core.packing): bit-identical outputs, what gets packed, profile warnings."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from cast_core import Engine
from cast_core.cost import CostProfile, find_profile
from cast_core.packing import PackedLinear, is_packed, pack_linears, packing_supported

from conftest import random_prompts, tiny_pair, tiny_tokenizer

pytestmark = pytest.mark.skipif(not packing_supported(), reason="this torch build or CPU has no packed bf16 linear")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 7, 48)])
def test_packed_linear_gives_linears_output_bit_for_bit(bias: bool, shape: tuple[int, ...]) -> None:
    linear = torch.nn.Linear(48, 80, bias=bias).to(torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(PackedLinear(linear)(x), linear(x))


def test_pack_linears_packs_the_bf16_decoder_and_leaves_the_head() -> None:
    target, _ = tiny_pair("qwen2", torch.bfloat16)
    packed = copy.deepcopy(target)
    layers = target.config.num_hidden_layers
    assert pack_linears(packed) == 7 * layers  # q, k, v, o, gate, up, down
    assert is_packed(packed) and not is_packed(target)
    assert type(packed.lm_head) is torch.nn.Linear and isinstance(packed.model.layers[0].mlp.up_proj, PackedLinear)
    ids = torch.tensor([random_prompts(1, max_len=12, seed=4)[0]])
    with torch.inference_mode():
        assert torch.equal(packed(ids).logits, target(ids).logits)
    fp32, _ = tiny_pair("qwen2", torch.float32)
    assert pack_linears(fp32) == 0 and not is_packed(fp32)  # float32 rounds differently packed: left alone


@pytest.mark.parametrize("policy", ["none", "cast"])
def test_engine_output_is_the_same_with_packed_weights(policy: str) -> None:
    target, drafter = tiny_pair("qwen2", torch.bfloat16)
    packed_target, packed_drafter = copy.deepcopy(target), copy.deepcopy(drafter)
    pack_linears(packed_target)
    pack_linears(packed_drafter)
    prompts = random_prompts(3, seed=9)
    outputs = []
    for t, d in ((target, drafter), (packed_target, packed_drafter)):
        profile = CostProfile.synthetic(0.01, 0.0002, 0.003, 0.0001)
        engine = Engine(t, tiny_tokenizer(), d, policy=policy, cost_profile=profile, max_batch_size=3)
        outputs.append([g.token_ids for g in engine.generate(prompts, max_new_tokens=12)])
    assert outputs[0] == outputs[1]


def _bf16_cpu_profile(tmp_path, notes: dict) -> CostProfile:
    synthetic = CostProfile.synthetic(0.1, 0.001, 0.03, 0.0003, device="cpu-2core-Test CPU", dtype="bfloat16", target="t", drafter="d")
    profile = synthetic.model_copy(update={"notes": notes})
    profile.save(tmp_path / f"{profile.slug}.json")
    return profile


def test_find_profile_warns_where_the_profile_ran_another_packing(tmp_path, caplog) -> None:
    stale = _bf16_cpu_profile(tmp_path, {})  # measured before packing: no record of it
    with caplog.at_level(logging.WARNING, logger="cast_core.cost"):
        assert find_profile(stale.device, "t", "d", "bfloat16", [tmp_path]) is not None
    assert "measured with the target's weights unpacked, the engine runs them packed" in caplog.text
    caplog.clear()
    _bf16_cpu_profile(tmp_path, {"weight_packing": {"target": True, "drafter": False}})
    with caplog.at_level(logging.WARNING, logger="cast_core.cost"):
        assert find_profile(stale.device, "t", "d", "bfloat16", [tmp_path]) is not None
    assert "packed" not in caplog.text
