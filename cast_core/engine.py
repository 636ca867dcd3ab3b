"""The embedded engine: ``Engine.from_pretrained(...).generate(prompts)``.

Batches up to ``max_batch_size`` sequences through ``SpecDecoder`` (one
verifier forward per step for the whole batch); admits waiting prompts as
rows finish; streams tokens as they are accepted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cast_core.cost import (
    CostProfile,
    dtype_name,
    find_profile,
    resolve_drafter_quantization,
    resolve_dtype_name,
    resolve_profile,
    usable_device_name,
)
from cast_core.decoder import SpecDecoder, StepStats
from cast_core.drafter import Drafter
from cast_core.models import AUTO_DTYPE, check_tokenizers_compatible, load_drafter, load_model, load_tokenizer, resolve_model
from cast_core.output import OutputTracker
from cast_core.policy import POLICY_NAMES, CastConfig, StaticConfig, TreePolicy, make_policy
from cast_core.quantize import drafter_profile_name
from cast_core.sampling import SamplingParams
from cast_core.verifier import Verifier
from cast_core.vocab import DEFAULT_CORE_SIZE

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFTER = "qwen2.5-coder-0.5b-instruct"


@dataclass
class GenerationStats:
    """Speculative decoding statistics of one sequence.

    Attributes:
        steps: verifier forwards the sequence took part in.
        drafted_steps: steps that verified drafts (the speedup gate skips the others).
        lookup_steps: drafted steps that verified the context lookup alone, without a drafter forward.
        drafted_nodes: drafted nodes over all steps (before reranking).
        drafter_forwards: drafter forwards of the steps it took part in.
        verified_tokens: tree nodes sent to the verifier, roots included.
        accepted_tokens: drafted tokens accepted.
        accepted_at_least: ``accepted_at_least[i]`` = steps that accepted more
            than ``i`` drafted tokens (acceptance by depth).
        draft_s, verify_s, plan_s: seconds of the steps it took part in.
    """

    steps: int = 0
    drafted_steps: int = 0
    lookup_steps: int = 0
    drafted_nodes: int = 0
    drafter_forwards: int = 0
    verified_tokens: int = 0
    accepted_tokens: int = 0
    accepted_at_least: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0
    plan_s: float = 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens gained per step: ``(accepted drafts + bonus tokens) / steps``."""
        return (self.accepted_tokens + self.steps) / self.steps if self.steps else 0.0

    def add(self, step: StepStats, row: int) -> None:
        self.steps += 1
        self.drafted_steps += int(step.nodes_drafted > 0)
        self.lookup_steps += int(step.nodes_drafted > 0 and step.drafter_forwards == 0)
        self.drafted_nodes += step.nodes_drafted
        self.drafter_forwards += step.drafter_forwards
        self.verified_tokens += step.tokens_verified[row]
        self.accepted_tokens += step.accepted[row]
        depth = step.accepted[row]
        self.accepted_at_least.extend([0] * (depth - len(self.accepted_at_least)))
        for i in range(depth):
            self.accepted_at_least[i] += 1
        self.draft_s += step.draft_s
        self.verify_s += step.verify_s
        self.plan_s += step.plan_s

    def as_dict(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "drafted_steps": self.drafted_steps,
            "lookup_steps": self.lookup_steps,
            "drafted_nodes": self.drafted_nodes,
            "drafter_forwards": self.drafter_forwards,
            "verified_tokens": self.verified_tokens,
            "accepted_tokens": self.accepted_tokens,
            "mean_accepted_length": self.mean_accepted_length,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "plan_s": self.plan_s,
        }


@dataclass
class Generation:
    """One finished completion."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class TokenEvent:
    """Tokens newly accepted for prompt ``index``; ``generation`` is set on its last event."""

    index: int
    token_ids: list[int]
    text: str
    finished: bool
    generation: Generation | None = None


class GenerateRequest(BaseModel):
    """Validated arguments of ``Engine.generate``; errors name the offending field."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1, description="Tokens to generate at most per prompt.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables it.")
    seed: int | None = Field(None, description="Seed; prompt i uses seed + i.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (not included in the output).")


class Engine:
    """Speculative tree decoding with a target and a drafter model, in process."""

    def __init__(
        self,
        target: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        drafter: PreTrainedModel | None = None,
        policy: str | TreePolicy = "cast",
        cost_profile: CostProfile | None = None,
        max_batch_size: int = 8,
        static_config: StaticConfig | None = None,
        cast_config: CastConfig | None = None,
        draft_vocab: int | None = DEFAULT_CORE_SIZE,
    ) -> None:
        """``draft_vocab``: leading token ids the drafter scores besides each row's rarer context
        tokens (``cast_core.vocab``; None: the whole vocabulary)."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.policy = policy if isinstance(policy, TreePolicy) else make_policy(policy, static_config, cast_config)
        if self.policy.drafts and drafter is None:
            raise ValueError(f"drafter: policy {self.policy.name!r} needs a drafter model")
        self.target, self.tokenizer, self.drafter_model = target, tokenizer, drafter
        self.verifier = Verifier(target, cost_profile)
        self.drafter = Drafter(drafter, self.verifier.vocab_size, draft_vocab) if drafter is not None and self.policy.drafts else None
        self.cost_profile = cost_profile
        self.max_batch_size = max_batch_size
        self.context_window = int(getattr(target.config, "max_position_embeddings", 1 << 30))
        eos = target.generation_config.eos_token_id if target.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        target: str | Path = DEFAULT_TARGET,
        drafter: str | Path | None = DEFAULT_DRAFTER,
        policy: str = "cast",
        dtype: str = AUTO_DTYPE,
        device: str = "cpu",
        cost_profile: CostProfile | str | Path | None = None,
        max_batch_size: int = 8,
        static_config: StaticConfig | None = None,
        cast_config: CastConfig | None = None,
        draft_vocab: int | None = DEFAULT_CORE_SIZE,
        drafter_quantization: str = "auto",
    ) -> "Engine":
        """Load models by path or known name (fetched on first use) and pick the cost profile.

        ``cost_profile``: a profile, a JSON path, or None to look one up for this
        device, model pair (the drafter named with its quantization) and dtype (a synthetic
        affine profile, with a warning, if none was measured). Policy ``none`` loads no
        drafter; it uses a measured profile of the pair, where one is found, to pad its plain steps.
        ``dtype``: a name from ``cast_core.models.DTYPES``, or ``auto``: bfloat16 where the device multiplies
        it natively, else float32 (``cast_core.cost.native_dtype``).
        ``drafter_quantization``: ``auto`` (int8 linears on a CPU, unless only the plain drafter's
        profile was measured there), ``none`` or ``int8`` (:mod:`cast_core.quantize`; the output is the
        target's either way).
        """
        if policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {', '.join(POLICY_NAMES)}; got {policy!r}")
        kind = usable_device_name(device)
        dtype = resolve_dtype_name(dtype, kind)
        target_path = resolve_model(str(target))
        tokenizer = load_tokenizer(target_path)
        target_model = load_model(target_path, dtype, device)
        drafter_model = None
        profile: CostProfile | None = None
        if isinstance(cost_profile, CostProfile):
            profile = cost_profile
        elif cost_profile is not None:
            profile = CostProfile.load(cost_profile)
        if policy != "none":
            if drafter is None:
                raise ValueError(f"drafter: policy {policy!r} needs a drafter model")
            drafter_path = resolve_model(str(drafter))
            check_tokenizers_compatible(tokenizer, load_tokenizer(drafter_path))
            quantization = resolve_drafter_quantization(drafter_quantization, kind, target_path.name, drafter_path.name, dtype)
            drafter_model, _ = load_drafter(drafter_path, dtype, device, quantization)
            if profile is None:
                drafter_key = drafter_profile_name(drafter_path.name, quantization)
                profile = resolve_profile(kind, target_path.name, drafter_key, dtype_name(dtype))
        elif profile is None and drafter is not None:
            quantization = resolve_drafter_quantization(drafter_quantization, kind, target_path.name, str(drafter), dtype)
            profile = find_profile(kind, target_path.name, drafter_profile_name(str(drafter), quantization), dtype_name(dtype))
        return cls(
            target_model,
            tokenizer,
            drafter_model,
            policy=policy,
            cost_profile=profile,
            max_batch_size=max_batch_size,
            static_config=static_config,
            cast_config=cast_config,
            draft_vocab=draft_vocab,
        )

    def encode(self, prompt: str | Sequence[int], field_name: str = "prompt") -> list[int]:
        """Token ids of a prompt (text or ids); ``ValueError`` naming the field if empty."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"{field_name}: must not be empty")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
            vocab = self.verifier.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise ValueError(f"{field_name}: token ids must be in [0, {vocab})")
        if not ids:
            raise ValueError(f"{field_name}: encodes to no tokens")
        return ids

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages with the target's chat template, ready for generation."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _check(self, prompts: Sequence[str | Sequence[int]], request: GenerateRequest) -> list[list[int]]:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts: give a non-empty list of prompts")
        encoded = [self.encode(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        for i, ids in enumerate(encoded):
            if len(ids) >= self.context_window:
                raise ValueError(
                    f"prompts[{i}]: {len(ids)} tokens exceed the context window of {self.context_window}"
                )
            if len(ids) + request.max_new_tokens > self.context_window:
                raise ValueError(
                    f"max_new_tokens: prompts[{i}] has {len(ids)} tokens; with max_new_tokens="
                    f"{request.max_new_tokens} it exceeds the context window of {self.context_window}"
                )
        return encoded

    def stream(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> Iterator[TokenEvent]:
        """Generate, yielding a ``TokenEvent`` per prompt per step as tokens are accepted.

        Arguments are validated before this returns (``ValueError`` naming the field).
        """
        try:
            request = GenerateRequest(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
                stop=list(stop or []),
            )
        except ValidationError as err:
            first = err.errors()[0]
            raise ValueError(f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
        return self._locked_run(self._check(prompts, request), request)

    def _locked_run(self, encoded: list[list[int]], request: GenerateRequest) -> Iterator[TokenEvent]:
        with self._lock:
            yield from self._run(encoded, request)

    def _run(self, encoded: list[list[int]], request: GenerateRequest) -> Iterator[TokenEvent]:
        decoder = SpecDecoder(self.verifier, self.drafter, self.policy, self.cost_profile)
        waiting = list(range(len(encoded)))
        trackers: dict[int, OutputTracker] = {}
        stats: dict[int, GenerationStats] = {}
        while waiting or len(decoder):
            while waiting and len(decoder) < self.max_batch_size:
                i = waiting.pop(0)
                params = SamplingParams(
                    temperature=request.temperature,
                    top_p=request.top_p,
                    top_k=request.top_k,
                    seed=None if request.seed is None else request.seed + i,
                )
                decoder.admit(i, encoded[i], params, request.max_new_tokens)
                trackers[i] = OutputTracker(self.tokenizer, self.eos_token_ids, request.max_new_tokens, tuple(request.stop))
                stats[i] = GenerationStats()
            new_tokens, step = decoder.step()
            done: set[int] = set()
            for row, (seq, tokens) in enumerate(zip(decoder.rows, new_tokens)):
                tracker = trackers[seq.seq_id]
                stats[seq.seq_id].add(step, row)
                kept, delta = tracker.extend(tokens)
                generation = None
                if tracker.finished:
                    done.add(seq.seq_id)
                    generation = Generation(
                        index=seq.seq_id,
                        text=tracker.text,
                        token_ids=list(tracker.token_ids),
                        finish_reason=tracker.finish_reason or "stop",
                        prompt_tokens=len(seq.prompt_ids),
                        stats=stats[seq.seq_id],
                    )
                if kept or delta or generation is not None:
                    yield TokenEvent(seq.seq_id, kept, delta, generation is not None, generation)
            decoder.retire(done)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> list[Generation]:
        """Generate a completion for every prompt; results in prompt order."""
        results: dict[int, Generation] = {}
        for event in self.stream(prompts, max_new_tokens, temperature, top_p, top_k, seed, stop):
            if event.generation is not None:
                results[event.index] = event.generation
        return [results[i] for i in range(len(results))]

    async def astream(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """``stream`` as an async iterator: steps run in a worker thread, the event loop stays free."""
        iterator = self.stream(prompts, max_new_tokens, temperature, top_p, top_k, seed, stop)
        sentinel = object()
        while True:
            event = await asyncio.to_thread(next, iterator, sentinel)
            if event is sentinel:
                return
            yield event  # type: ignore[misc]

