"""Engine: greedy equality with transformers' generate, streaming, stops and bad input."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cast_core import CastConfig, Engine, StaticConfig
from cast_core.cost import CostProfile, CostTable, device_name, native_dtype
from cast_core.models import DTYPES

from conftest import TINY_EOS, TINY_VOCAB, random_prompts, reference_greedy, tiny_pair, tiny_tokenizer

PROFILE = CostProfile.synthetic(0.01, 0.0002, 0.003, 0.0001)
CAST = CastConfig(c1=0.5, c2=0.5, c3=0.5, min_speedup=1e-3)  # trees on every step (the gate has its own tests)
STATIC = StaticConfig()  # EAGLE-2's defaults: top-10 per layer, depth 6, 60 verified nodes
NEW_TOKENS = 20


def make_engine(models, tokenizer, policy: str, batch: int, cast_config: CastConfig = CAST) -> Engine:
    target, drafter = models
    return Engine(
        target,
        tokenizer,
        drafter,
        policy=policy,
        cost_profile=PROFILE,
        max_batch_size=batch,
        static_config=STATIC,
        cast_config=cast_config,
    )


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_case(request):
    models = tiny_pair(request.param, torch.float32)
    prompts = random_prompts(24, max_len=24, seed=3)
    refs = [reference_greedy(models[0], p, NEW_TOKENS, TINY_EOS) for p in prompts]
    return models, prompts, refs


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
@pytest.mark.parametrize("policy", ["none", "static", "cast"])
def test_greedy_equals_transformers_generate(family_case, tokenizer, policy: str, batch: int) -> None:
    models, prompts, refs = family_case
    engine = make_engine(models, tokenizer, policy, batch)
    generations = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
    assert [g.token_ids for g in generations] == refs
    if policy != "none":
        assert sum(g.stats.accepted_tokens for g in generations) > 0


def test_stats_and_finish_reasons(tiny_models_fp32, tokenizer) -> None:
    engine = make_engine(tiny_models_fp32, tokenizer, "static", 4)
    gens = engine.generate(random_prompts(4, seed=5), max_new_tokens=12)
    for g in gens:
        assert g.finish_reason in {"stop", "length"}
        assert len(g.token_ids) <= 12
        assert g.stats.steps >= 1
        assert g.stats.verified_tokens >= g.stats.steps
        assert g.stats.mean_accepted_length >= 1.0
        assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=True)


def test_stream_concatenates_to_generate(tiny_models_fp32, tokenizer) -> None:
    engine = make_engine(tiny_models_fp32, tokenizer, "cast", 3)
    prompts = random_prompts(5, seed=9)
    expected = engine.generate(prompts, max_new_tokens=15)
    tokens: dict[int, list[int]] = {i: [] for i in range(5)}
    texts: dict[int, str] = {i: "" for i in range(5)}
    finals = {}
    for event in engine.stream(prompts, max_new_tokens=15):
        tokens[event.index] += event.token_ids
        texts[event.index] += event.text
        if event.finished:
            finals[event.index] = event.generation
    for g in expected:
        assert tokens[g.index] == g.token_ids
        assert texts[g.index] == g.text
        assert finals[g.index].token_ids == g.token_ids


def test_async_stream(tiny_models_fp32, tokenizer) -> None:
    engine = make_engine(tiny_models_fp32, tokenizer, "static", 2)
    prompts = random_prompts(3, seed=11)
    expected = [g.token_ids for g in engine.generate(prompts, max_new_tokens=10)]

    async def collect() -> list[list[int]]:
        out: dict[int, list[int]] = {i: [] for i in range(3)}
        async for event in engine.astream(prompts, max_new_tokens=10):
            out[event.index] += event.token_ids
        return [out[i] for i in range(3)]

    assert asyncio.run(collect()) == expected


def test_stop_strings_cut_text(tiny_models_fp32, tokenizer) -> None:
    engine = make_engine(tiny_models_fp32, tokenizer, "none", 1)
    prompt = random_prompts(1, seed=13)
    full = engine.generate(prompt, max_new_tokens=16)[0]
    words = full.text.split()
    assert len(words) >= 4, "the tiny model should produce a few tokens"
    stop = " " + words[3]
    cut = engine.generate(prompt, max_new_tokens=16, stop=[stop])[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text)
    assert cut.text == full.text[: full.text.index(stop)]


def test_streamed_text_never_contains_stop_prefix_retractions(tiny_models_fp32, tokenizer) -> None:
    engine = make_engine(tiny_models_fp32, tokenizer, "static", 1)
    prompt = random_prompts(1, seed=13)
    full = engine.generate(prompt, max_new_tokens=16)[0].text
    stop = full.split()[3]
    streamed = "".join(e.text for e in engine.stream(prompt, max_new_tokens=16, stop=[stop]))
    assert streamed == full[: full.index(stop)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompts": [""]}, "prompts[0]"),
        ({"prompts": []}, "prompts"),
        ({"prompts": ["t5 " * 600]}, "prompts[0]"),
        ({"prompts": ["t5 " * 500], "max_new_tokens": 100}, "max_new_tokens"),
        ({"prompts": ["t5"], "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompts": ["t5"], "temperature": -0.1}, "temperature"),
        ({"prompts": ["t5"], "top_p": 0.0}, "top_p"),
        ({"prompts": ["t5"], "top_p": 1.5}, "top_p"),
        ({"prompts": ["t5"], "top_k": -1}, "top_k"),
        ({"prompts": [[5, 999]]}, "prompts[0]"),
    ],
)
def test_bad_input_names_the_field(tiny_models_fp32, tokenizer, kwargs, field: str) -> None:
    engine = make_engine(tiny_models_fp32, tokenizer, "cast", 2)
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        engine.generate(**kwargs)
    # the engine still works afterwards
    assert engine.generate(["t5 t6"], max_new_tokens=2)[0].token_ids


def test_unknown_policy_and_missing_drafter(tiny_models_fp32, tokenizer) -> None:
    target, _ = tiny_models_fp32
    with pytest.raises(ValueError, match="policy"):
        Engine(target, tokenizer, None, policy="beam")
    with pytest.raises(ValueError, match="drafter"):
        Engine(target, tokenizer, None, policy="cast")
    with pytest.raises(ValueError, match="policy"):
        Engine.from_pretrained(target="unused", policy="beam")


def test_mismatched_tokenizers_refused(tmp_path) -> None:
    target, drafter = tiny_pair("llama", torch.float32)
    target.save_pretrained(tmp_path / "target")
    tiny_tokenizer().save_pretrained(tmp_path / "target")
    drafter.save_pretrained(tmp_path / "drafter")
    tiny_tokenizer(vocab_size=100).save_pretrained(tmp_path / "drafter")
    with pytest.raises(ValueError, match="drafter"):
        Engine.from_pretrained(target=tmp_path / "target", drafter=tmp_path / "drafter", dtype="float32")


def test_from_pretrained_local_folders(tmp_path) -> None:
    target, drafter = tiny_pair("qwen2", torch.float32)
    for name, model in (("target", target), ("drafter", drafter)):
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    engine = Engine.from_pretrained(
        target=tmp_path / "target", drafter=tmp_path / "drafter", policy="cast", dtype="float32", cost_profile=PROFILE
    )
    prompt = random_prompts(1, seed=21)[0]
    assert engine.generate([prompt], max_new_tokens=8)[0].token_ids == reference_greedy(target, prompt, 8, TINY_EOS)
    native = Engine.from_pretrained(target=tmp_path / "target", drafter=tmp_path / "drafter", cost_profile=PROFILE)
    expected = DTYPES[native_dtype(device_name("cpu"))]
    assert native.target.dtype == expected and native.drafter_model.dtype == expected, "dtype auto: this CPU's native one"
    with pytest.raises(ValueError, match="device"):
        Engine.from_pretrained(target=tmp_path / "target", drafter=tmp_path / "drafter", device="warp-drive")


def test_drafter_feeds_only_what_its_last_tree_did_not(tokenizer) -> None:
    """Accepted drafts come from the drafter's stash: each catch-up forward feeds about the bonus token alone.

    Without the stash every catch-up would re-feed the accepted drafts (about
    ``accepted length`` tokens per row); with it only the drafts of the tree's
    unfed last layer and the bonus token remain. (Context lookup is off: its tokens widen the
    catch-up forward on purpose, see test_lookup.)
    """
    target, drafter = tiny_pair("llama", torch.float32, noise=0.0)
    widths: list[tuple[str, int]] = []
    target.model.embed_tokens.register_forward_hook(lambda m, args, out: widths.append(("target", args[0].shape[1])))
    drafter.model.embed_tokens.register_forward_hook(lambda m, args, out: widths.append(("drafter", args[0].shape[1])))
    engine = make_engine((target, drafter), tokenizer, "cast", 1, CAST.model_copy(update={"lookup_tokens": 0}))
    prompt = random_prompts(1, max_len=12, seed=21)[0]
    gen = engine.generate([prompt], max_new_tokens=40)[0]
    after_target = [w for (prev, _), (who, w) in zip(widths, widths[1:]) if prev == "target" and who == "drafter"]
    catch_ups = after_target[1:]  # the first is the prompt's prefill
    assert gen.stats.mean_accepted_length > 3
    assert len(catch_ups) == gen.stats.steps - 1
    assert sum(catch_ups) / len(catch_ups) <= 2.0 < gen.stats.mean_accepted_length


def test_ragged_prompts_are_fed_to_the_drafter_apart_and_output_stays_greedy(tokenizer) -> None:
    """With a cost per token and row (the synthetic profile), the first drafted step feeds the longest prompts to
    the drafter one row at a time (``cast_core.drafter._rows_fed_apart``) instead of padding every row to the
    longest, and the output is still the target's own greedy output."""
    target, drafter = tiny_pair("llama", torch.float32)
    shapes: list[tuple[int, int]] = []
    drafter.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    prompts = [random_prompts(1, max_len=3, seed=5)[0], list(range(3, 43)), random_prompts(1, max_len=4, seed=6)[0]]
    engine = make_engine((target, drafter), tokenizer, "cast", 3)
    generations = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
    assert [g.token_ids for g in generations] == [reference_greedy(target, p, NEW_TOKENS, TINY_EOS) for p in prompts]
    assert shapes[0] == (1, 39), "the 40-token prompt, but its last token, alone"
    assert shapes[1][0] == 3 and shapes[1][1] < 10, "then every row's last tokens, batched"


def _profile_where_padding_pays() -> CostProfile:
    """A measured-looking profile whose target runs 1 token slower than 2 and 4-7 tokens slower than 8."""
    counts = [1, 2, 4, 8, 16, 32, 64]
    target_row = [3.0, 1.0, 2.5, 2.0, 4.0, 8.0, 16.0]
    drafter_row = [0.1 + 0.01 * n for n in counts]

    def table(model: str, row: list[float]) -> CostTable:
        batches, contexts = [1, 2, 4, 8], [16, 512]
        return CostTable(
            model=model,
            batch_sizes=batches,
            context_buckets=contexts,
            token_counts=counts,
            seconds=[[[x * (1 + 0.1 * b) for x in row] for _ in contexts] for b in batches],
        )

    return CostProfile(
        device="test",
        dtype="float32",
        target=table("target", target_row),
        drafter=table("drafter", drafter_row),
        measured_at="2026-01-01T00:00:00+00:00",
        torch_threads=1,
    )


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("policy", ["none", "static", "cast"])
def test_padded_verifier_forwards_keep_greedy_output(tokenizer, policy: str, batch: int) -> None:
    """Where the profile says more tokens run faster, the verifier pads its trees with invalid nodes;
    the output stays the target's own greedy output, and no forward runs at a width padding avoids."""
    target, drafter = tiny_pair("qwen2", torch.float32)
    profile = _profile_where_padding_pays()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, TINY_VOCAB, (12,), generator=gen).tolist() for _ in range(4)]
    refs = [reference_greedy(target, p, NEW_TOKENS, TINY_EOS) for p in prompts]
    widths: list[int] = []
    target.model.embed_tokens.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    engine = Engine(
        target, tokenizer, drafter if policy != "none" else None, policy=policy, cost_profile=profile,
        max_batch_size=batch, static_config=StaticConfig(top_k=3, depth=2, total_tokens=5), cast_config=CAST,
    )
    assert [g.token_ids for g in engine.generate(prompts, max_new_tokens=NEW_TOKENS)] == refs
    decode_widths = {w for w in widths if w != 11}  # 11: the prompts' prefills (all but the last token)
    assert not decode_widths & {1, 4, 5, 6, 7}
    if policy == "none":
        assert decode_widths == {2}
    if policy == "static":  # root + 5 drafted nodes, padded to 8
        assert decode_widths == {8}


def test_vanilla_from_pretrained_pads_with_a_given_or_measured_profile(tmp_path) -> None:
    target, _ = tiny_pair("qwen2", torch.float32)
    target.save_pretrained(tmp_path / "target")
    tiny_tokenizer().save_pretrained(tmp_path / "target")
    profile = _profile_where_padding_pays()
    path = profile.save(tmp_path / "profile.json")
    engine = Engine.from_pretrained(target=tmp_path / "target", policy="none", dtype="float32", cost_profile=path)
    assert engine.drafter is None and engine.verifier.cost == profile.target
    # no profile measured for this pair: plain steps run unpadded, and nothing is fetched for the drafter
    bare = Engine.from_pretrained(target=tmp_path / "target", drafter="not-fetched", policy="none", dtype="float32")
    assert bare.verifier.cost is None
