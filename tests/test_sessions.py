"""Replica-side session state: any subset of sessions steps together, output stays exact."""

from __future__ import annotations

import pytest

from cast_core.cost import CostProfile
from cast_core.drafter import Drafter
from cast_core.policy import CastConfig, CastPolicy, CostContext
from cast_core.sampling import SamplingParams
from cast_core.sessions import DrafterSessions, SessionNotFound, VerifierSessions
from cast_core.verifier import Verifier
from cast_core.vocab import DEFAULT_CORE_SIZE

from conftest import TINY_EOS, random_prompts, reference_greedy

NEW = 16


def make(models, draft_vocab: int | None = DEFAULT_CORE_SIZE):
    target, drafter_model = models
    verifier = VerifierSessions(Verifier(target))
    drafter = DrafterSessions(Drafter(drafter_model, target.config.vocab_size, draft_vocab), CastPolicy(CastConfig(c1=0.5, c2=0.5, c3=0.5)))
    return verifier, drafter


def run_sessions(verifier, drafter, prompts, schedule) -> dict[str, list[int]]:
    """Step sessions per ``schedule(step) -> participating ids`` until each has NEW tokens (EOS stops)."""
    ctx = CostContext.from_profile(CostProfile.synthetic(0.01, 0.0002, 0.003, 0.0001), 4, 32, 70)
    out = {f"s{i}": [] for i in range(len(prompts))}
    pending = {f"s{i}": [p[-1]] for i, p in enumerate(prompts)}
    done: set[str] = set()
    for i, p in enumerate(prompts):
        verifier.open(f"s{i}", p, SamplingParams())
        drafter.open(f"s{i}", p)
    step = 0
    while len(done) < len(prompts):
        ids = [s for s in schedule(step) if s not in done]
        step += 1
        if not ids:
            continue
        drafts = drafter.draft({s: pending[s] for s in ids}, ctx)
        paths = verifier.verify({s: drafts[s][0] for s in ids})
        for s in ids:
            tokens = paths[s].tokens
            pending[s] = tokens
            for t in tokens:
                if t == TINY_EOS or len(out[s]) >= NEW:
                    done.add(s)
                    break
                out[s].append(t)
            if len(out[s]) >= NEW:
                done.add(s)
        for s in done:
            if s in verifier.sessions():
                verifier.close([s])
                drafter.close([s])
    return out


@pytest.mark.parametrize(
    "schedule",
    [
        lambda step: ["s0", "s1", "s2", "s3"],
        lambda step: ["s0", "s1", "s2", "s3"][: 1 + step % 4],
        lambda step: ["s3", "s1"] if step % 2 else ["s0", "s2"],
    ],
    ids=["all", "growing-subsets", "alternating"],
)
@pytest.mark.parametrize("draft_vocab", [DEFAULT_CORE_SIZE, 16], ids=["whole-vocab", "core-16"])
def test_subsets_of_sessions_decode_exactly(tiny_models_fp32, schedule, draft_vocab) -> None:
    """Also with 16 core ids of 128: each step's draft vocabulary is the union of its own sessions' rare tokens."""
    prompts = random_prompts(4, seed=31)
    verifier, drafter = make(tiny_models_fp32, draft_vocab)
    out = run_sessions(verifier, drafter, prompts, schedule)
    for i, p in enumerate(prompts):
        assert out[f"s{i}"] == reference_greedy(tiny_models_fp32[0], p, NEW, TINY_EOS)
    assert verifier.occupancy == 0 and drafter.occupancy == 0


def test_unknown_session_and_reopen(tiny_models_fp32) -> None:
    verifier, drafter = make(tiny_models_fp32)
    with pytest.raises(SessionNotFound):
        verifier.verify({"nope": None})
    prompt = random_prompts(1, seed=41)[0]
    verifier.open("a", prompt, SamplingParams())
    verifier.open("a", prompt, SamplingParams())  # re-open replaces the row
    assert verifier.occupancy == 1
    assert verifier.evict_idle(0.0) == ["a"]
    assert verifier.occupancy == 0


def test_a_failed_verify_leaves_every_session_usable(tiny_models_fp32) -> None:
    """A forward that raises mid-step (after earlier layers wrote their cache) must not corrupt the shared cache."""
    import torch

    from cast_core.tree import DraftTree

    target = tiny_models_fp32[0]
    verifier = VerifierSessions(Verifier(target))
    prompts = random_prompts(2, seed=31)
    for i, p in enumerate(prompts):
        verifier.open(f"s{i}", p, SamplingParams())

    def fail(*_):
        raise RuntimeError("injected failure in the last layer")

    hook = target.model.layers[-1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="injected"):
        verifier.verify({"s0": DraftTree.roots(torch.tensor([prompts[0][-1]]))})
    hook.remove()
    out = {f"s{i}": [] for i in range(2)}
    roots = {f"s{i}": p[-1] for i, p in enumerate(prompts)}
    for _ in range(6):
        paths = verifier.verify({s: DraftTree.roots(torch.tensor([roots[s]])) for s in out})
        for s, path in paths.items():
            out[s] += path.tokens
            roots[s] = path.tokens[-1]
    for i, p in enumerate(prompts):
        assert out[f"s{i}"] == reference_greedy(target, p, 6, eos=None)


def test_a_negative_budget_is_refused_naming_the_field(tiny_models_fp32) -> None:
    _, drafter = make(tiny_models_fp32)
    with pytest.raises(ValueError, match="tokens_left"):
        drafter.open("s", [5, 6, 7], tokens_left=-1)
    assert drafter.sessions() == []
