"""Profiler: the timed forward is the real masked forward, the grid comes out right, the CLI wires up."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from cast_core import profiler
from cast_core.attention import GROUPED_SDPA
from cast_core.cost import CostProfile, device_name, profile_slug
from cast_core.quantize import drafter_profile_name, resolve_quantization
from cast_core.profiler import batch_state, causal_block, forward_block, measure_profile, register_cli


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def model() -> PreTrainedModel:
    return tiny_llama()


def test_causal_block_layout() -> None:
    block = causal_block(2, 4, torch.device("cpu"))
    assert block.shape == (2, 4, 4)
    assert torch.equal(block[0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(block[0], block[1])


@pytest.mark.parametrize("attn", ["sdpa", "eager", GROUPED_SDPA])
def test_profiled_forward_equals_plain_causal_forward(model: PreTrainedModel, attn: str) -> None:
    """batch_state(ctx) + forward_block(n new tokens) gives the logits of one plain causal forward
    over ctx + n tokens; after discard_tail() the same forward gives them again."""
    model.set_attn_implementation(attn)
    try:
        batch, ctx, n = 3, 11, 5
        ids = torch.randint(model.config.vocab_size, (1, ctx + n), generator=torch.Generator().manual_seed(1))
        ids = ids.expand(batch, -1)
        with torch.inference_mode():
            plain = model(input_ids=ids).logits[:, ctx:]
            state = batch_state(model, ids[0, :ctx].tolist(), batch, ids.device)
            assert state.batch_size == batch and state.base == ctx
            first = forward_block(model, state, ids[:, ctx:])
            assert state.length == ctx + n
            state.discard_tail()
            assert state.length == ctx
            second = forward_block(model, state, ids[:, ctx:])
        torch.testing.assert_close(first, plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second, first, atol=0, rtol=0)
    finally:
        model.set_attn_implementation("sdpa")


def test_measure_profile_tiny_grid(model: PreTrainedModel) -> None:
    drafter = tiny_llama(seed=1)
    profile = measure_profile(
        model,
        drafter,
        "tiny/target",
        "tiny/drafter",
        "cpu",
        torch.float32,
        batch_sizes=(2, 1),
        context_buckets=(16, 8, 16),
        token_counts=(1, 4, 2),
        repeats=2,
        warmup=1,
        progress=False,
    )
    assert profile.device == device_name("cpu")
    assert profile.dtype == "float32"
    assert profile.torch_threads == torch.get_num_threads()
    assert profile.slug == profile_slug(device_name("cpu"), "target", "drafter", "float32")
    for table, name in ((profile.target, "tiny/target"), (profile.drafter, "tiny/drafter")):
        assert table.model == name
        assert (table.batch_sizes, table.context_buckets, table.token_counts) == ([1, 2], [8, 16], [1, 2, 4])
        assert len(table.seconds) == 2
        for plane in table.seconds:
            assert len(plane) == 2
            for row in plane:
                assert len(row) == 3
                assert all(x > 0 for x in row)
        curve = table.latency_curve(1, 8, 8)
        assert all(curve[1:] >= curve[:-1])  # priced with padding: never decreasing in n
    assert profile.notes["cache"].startswith("cast_core.kv.KVState")
    assert profile.latency("target", 1, 8, 1) == min(profile.target.seconds[0][0])  # padded to the cheapest count


def test_measure_profile_checks_dtype_and_repeats(model: PreTrainedModel) -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        measure_profile(model, model, "t", "d", "cpu", "bfloat16", progress=False)
    with pytest.raises(ValueError, match="repeats"):
        measure_profile(model, model, "t", "d", "cpu", "float32", repeats=0, progress=False)


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cast")
    register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_defaults_and_grid_parsing() -> None:
    args = _cli().parse_args(["profile", "--target", "a", "--drafter", "b", "--tokens", "1,2,8", "--contexts", "64"])
    assert args.func is profiler.run_profile_command
    assert (args.dtype, args.batch_sizes, args.contexts, args.tokens) == ("auto", [1, 2, 4, 8], [64], [1, 2, 8])
    assert (args.repeats, args.warmup, args.out) == (5, 2, None)
    with pytest.raises(SystemExit):
        _cli().parse_args(["profile", "--target", "a", "--drafter", "b", "--tokens", "1,x"])


@pytest.mark.parametrize(("out", "quantization"), [("default", "auto"), ("dir", "none"), ("file", "int8")])
def test_cli_writes_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: PreTrainedModel, out: str, quantization: str
) -> None:
    """Real saved models; an int8 drafter (``auto`` on this CPU) gets a profile of its own, ``<drafter>+int8``."""
    for name in ("tiny-t", "tiny-d"):
        model.save_pretrained(tmp_path / name)
    monkeypatch.setenv("CAST_CACHE_DIR", str(tmp_path / "cache"))
    drafter_key = drafter_profile_name("tiny-d", resolve_quantization(quantization, "cpu"))
    slug = profile_slug(device_name("cpu"), "tiny-t", drafter_key, "float32")
    argv = (
        f"profile --target {tmp_path / 'tiny-t'} --drafter {tmp_path / 'tiny-d'} --dtype float32 --device cpu "
        f"--batch-sizes 1 --contexts 8 --tokens 1,2 --repeats 1 --warmup 0 --drafter-quantization {quantization}"
    ).split()
    expected = {
        "default": tmp_path / "cache" / "profiles" / f"{slug}.json",
        "dir": tmp_path / f"{slug}.json",
        "file": tmp_path / "mine.json",
    }[out]
    if out != "default":
        argv += ["--out", str(tmp_path if out == "dir" else expected)]
    args = _cli().parse_args(argv)
    assert args.func(args) == 0
    profile = CostProfile.load(expected)
    assert profile.slug == slug
    assert (Path(profile.target.model).name, Path(profile.drafter.model).name) == ("tiny-t", drafter_key)
    assert profile.target.token_counts == [1, 2]


def test_cli_reports_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    args = _cli().parse_args(["profile", "--target", "no-such-model-xyz", "--drafter", "b", "--device", "cpu"])
    assert args.func(args) == 2
    assert "no-such-model-xyz" in capsys.readouterr().err


def test_cli_random_weights_profiles_from_config_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: PreTrainedModel
) -> None:
    """A folder with config.json and no weights: refused with a clear error, profiled with ``--random-weights``."""
    for name in ("cfg-t", "cfg-d"):
        model.config.save_pretrained(tmp_path / name)
    argv = (
        f"profile --target {tmp_path / 'cfg-t'} --drafter {tmp_path / 'cfg-d'} --dtype float32 --device cpu "
        f"--batch-sizes 1,2 --contexts 8 --tokens 1,4 --repeats 1 --warmup 0 --drafter-quantization none "
        f"--out {tmp_path / 'p.json'}"
    ).split()
    args = _cli().parse_args(argv)
    assert args.func(args) == 2
    assert "cfg-t" in capsys.readouterr().err
    args = _cli().parse_args(argv + ["--random-weights"])
    assert args.func(args) == 0
    profile = CostProfile.load(tmp_path / "p.json")
    assert profile.notes["weights"] == "random, built from config.json"
    assert (profile.target.batch_sizes, profile.target.token_counts) == ([1, 2], [1, 4])
    assert all(s > 0 for rows in profile.drafter.seconds for row in rows for s in row)
