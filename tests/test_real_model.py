"""Greedy equality on a real model: SmolLM2-135M-Instruct (fp32) with an early-exit drafter.

The drafter is the same checkpoint truncated to its first layers, so it shares
the tokenizer and agrees with the target often but not always. Twenty HumanEval
prompts of mixed length, every policy, batch sizes 1-8: token ids must equal
transformers' own ``generate(do_sample=False)`` run on the target alone.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cast_core import Engine, StaticConfig
from cast_core.cost import CostProfile
from cast_core.models import load_model, load_tokenizer, resolve_model

from conftest import reference_greedy

pytestmark = pytest.mark.slow

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "HumanEval.jsonl.gz"
VENDORED = Path(__file__).resolve().parents[1] / "bench" / "data" / "HumanEval.jsonl.gz"
NEW_TOKENS = 24
DRAFTER_LAYERS = 10


def humaneval_prompts(n: int) -> list[str]:
    path = VENDORED if VENDORED.exists() else HUMANEVAL
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r["prompt"] for r in rows[:n]]


@pytest.fixture(scope="module")
def smollm2():
    path = resolve_model("smollm2-135m-instruct")
    target = load_model(path, "float32")
    drafter = AutoModelForCausalLM.from_pretrained(
        path, num_hidden_layers=DRAFTER_LAYERS, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    drafter.requires_grad_(False)
    tokenizer = load_tokenizer(path)
    prompts = humaneval_prompts(20)
    eos = target.generation_config.eos_token_id
    refs = [
        reference_greedy(target, tokenizer(p)["input_ids"], NEW_TOKENS, eos if isinstance(eos, int) else None)
        for p in prompts
    ]
    return target, drafter, tokenizer, prompts, refs


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
@pytest.mark.parametrize("policy", ["none", "static", "cast"])
def test_smollm2_greedy_equals_generate(smollm2, policy: str, batch: int) -> None:
    target, drafter, tokenizer, prompts, refs = smollm2
    engine = Engine(
        target,
        tokenizer,
        drafter,
        policy=policy,
        cost_profile=CostProfile.synthetic(0.03, 0.0005, 0.01, 0.0003),
        max_batch_size=batch,
        static_config=StaticConfig(),
    )
    gens = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
    mismatches = [i for i, (g, r) in enumerate(zip(gens, refs)) if g.token_ids != r]
    assert not mismatches, f"prompts {mismatches} differ from generate()"
    if policy != "none":
        accepted = sum(g.stats.accepted_tokens for g in gens)
        steps = sum(g.stats.steps for g in gens)
        assert accepted / steps > 0.3, "the early-exit drafter should be accepted regularly"
