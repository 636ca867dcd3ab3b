"""The decoding methods a benchmark compares, behind one interface.

Every method takes a group of tokenized prompts (one batch) and returns, per
prompt, the generated token ids (EOS removed), plus the group's wall time and
step statistics (:class:`RunStats`). Models are loaded once (:class:`ModelPair`)
and shared by all methods; building a method is cheap.

======================  ============================================================
``vanilla``             our engine, policy ``none``: plain decoding, batch B
``hf_generate``         transformers ``generate(do_sample=False)`` on the target,
                        batch B with left padding (the reference autoregressive speed)
``hf_assisted``         transformers assisted generation with the same drafter
                        (``assistant_model=drafter``, library defaults), batch 1 only
``static``              our engine, EAGLE-2 tree (``StaticConfig``)
``cast``                our engine, CAST policy (``CastConfig``)
======================  ============================================================

Model forward time is measured the same way for every method
(:class:`ForwardTimer`: hooks on each model's decoder and LM head), so the
time outside the two models' forwards — framework and engine overhead — is
comparable across methods.
"""

from __future__ import annotations

import argparse
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cast_core import CastConfig, Engine, StaticConfig
from cast_core.engine import DEFAULT_DRAFTER, DEFAULT_TARGET
from cast_core.cost import CostProfile, Role, dtype_name, resolve_drafter_quantization, resolve_dtype_name, resolve_profile, usable_device_name
from cast_core.models import AUTO_DTYPE, DTYPES, add_dtype_arg, check_dtype_name, check_tokenizers_compatible, load_drafter, load_model, load_tokenizer, resolve_model
from cast_core.policy import make_policy
from cast_core.quantize import add_quantization_arg, drafter_profile_name

METHOD_NAMES = ("vanilla", "hf_generate", "hf_assisted", "static", "cast")


class ModelPairConfig(BaseModel):
    """The models a benchmark command loads (``ModelPair.load``'s arguments). ``dtype`` ``auto`` is resolved on
    construction, so a result records the dtype that ran."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(DEFAULT_TARGET, description="Target model: known name or local path.")
    drafter: str = Field(DEFAULT_DRAFTER, description="Drafter model: known name or local path.")
    dtype: str = Field(
        AUTO_DTYPE,
        description=f"Model dtype of both models, one of {', '.join(DTYPES)}, or {AUTO_DTYPE} (stored resolved): bfloat16 "
        "where the device multiplies it natively, else float32 (cast_core.cost.native_dtype).",
    )
    device: str = Field("cpu", description="Torch device of both models.")
    drafter_quantization: str = Field(
        "auto", description="The drafter's linear layers: int8, mixed, none, or auto (cast_core.quantize.resolve_quantization)."
    )

    @model_validator(mode="after")
    def _resolve_dtype(self) -> "ModelPairConfig":
        if check_dtype_name(self.dtype) == AUTO_DTYPE:
            self.dtype = resolve_dtype_name(self.dtype, usable_device_name(self.device))
        return self


@dataclass
class ModelPair:
    """Target, drafter, their shared tokenizer and the cost profile CAST prices trees with.

    Attributes:
        target_name, drafter_name: names recorded in results (folder names for loaded models).
        drafter_quantization: the drafter's linear layers as loaded, ``none``, ``int8`` or ``mixed`` (:mod:`cast_core.quantize`).
        eos_token_ids: ids that end a sequence (the engine's rule: the target's
            generation config, else the tokenizer's EOS).
    """

    target: PreTrainedModel
    drafter: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cost_profile: CostProfile
    target_name: str
    drafter_name: str
    drafter_quantization: str = "none"
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not self.eos_token_ids:
            eos = self.target.generation_config.eos_token_id if self.target.generation_config else None
            eos = eos if eos is not None else self.tokenizer.eos_token_id
            self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    @property
    def pad_token_id(self) -> int:
        """Left-padding id for ``hf_generate`` (the tokenizer's pad token, else an EOS id)."""
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else min(self.eos_token_ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt text, exactly as the engine encodes it."""
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    @classmethod
    def load(
        cls, target: str, drafter: str, dtype: str = AUTO_DTYPE, device: str = "cpu", drafter_quantization: str = "auto"
    ) -> "ModelPair":
        """Load both models once (known names are fetched on first use) and resolve the cost profile
        (the drafter's, named with its quantization); ``dtype`` ``auto``: the device's native one."""
        target_path, drafter_path = resolve_model(target), resolve_model(drafter)
        tokenizer = load_tokenizer(target_path)
        check_tokenizers_compatible(tokenizer, load_tokenizer(drafter_path))
        kind = usable_device_name(device)
        dtype = resolve_dtype_name(dtype, kind)
        quantization = resolve_drafter_quantization(drafter_quantization, kind, target_path.name, drafter_path.name, dtype)
        drafter_model, _ = load_drafter(drafter_path, dtype, device, quantization)
        drafter_key = drafter_profile_name(drafter_path.name, quantization)
        return cls(
            target=load_model(target_path, dtype, device),
            drafter=drafter_model,
            tokenizer=tokenizer,
            cost_profile=resolve_profile(kind, target_path.name, drafter_key, dtype_name(dtype)),
            target_name=Path(target_path).name,
            drafter_name=Path(drafter_path).name,
            drafter_quantization=quantization,
        )


def add_model_pair_args(parser: argparse.ArgumentParser) -> None:
    """``--target --drafter --dtype --device --drafter-quantization``: the arguments of ``ModelPair.load``."""
    parser.add_argument("--target", default=DEFAULT_TARGET, help="target model: known name or local path")
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER, help="drafter model: known name or local path")
    add_dtype_arg(parser)
    parser.add_argument("--device", default="cpu", help="torch device")
    add_quantization_arg(parser)


def add_counts(*counts: list[int]) -> list[int]:
    """Element-wise sum of count lists of any lengths."""
    out = [0] * max((len(c) for c in counts), default=0)
    for c in counts:
        for i, n in enumerate(c):
            out[i] += n
    return out


@dataclass
class RunStats:
    """Statistics of one method on one group of prompts (one batch).

    Row-steps count, per sequence, the target forwards it took part in; per-step
    means divide by row-steps. Seconds are for the batch as a whole.

    Attributes:
        batch_steps: target forwards of the batch (plain decoding: one per token).
        row_steps: sum over sequences of the steps each took part in.
        gained_tokens: tokens gained over all row-steps (accepted drafts + one bonus per step).
        drafted_nodes: drafted nodes over all row-steps (before reranking).
        drafted_row_steps: row-steps the drafter ran for (CAST's speedup gate skips some).
        drafter_forwards: drafter forwards of the batch (the engine's methods).
        accepted_at_least: ``[i]`` = row-steps that accepted more than ``i`` drafted tokens.
        verified_tokens: tokens the target scored over all row-steps (tree roots included).
        draft_s, verify_s, plan_s: the engine's split of the step time (drafting with
            planning included, verifying, policy decisions alone). For the transformers
            methods: drafter and target forward time, and 0.
        target_forward_s, drafter_forward_s: seconds inside each model's forwards (hooks).
        target_pace: the target's forwards on a cache (decoding, not prefill) in seconds over the cost
            profile's for the same shapes (``ForwardTimer.pace``): the machine's speed during the run against
            its profile's, 1.0 = as profiled; None without a measured profile.
    """

    batch_steps: int = 0
    row_steps: int = 0
    gained_tokens: int = 0
    drafted_nodes: int = 0
    drafted_row_steps: int = 0
    drafter_forwards: int = 0
    accepted_at_least: list[int] = field(default_factory=list)
    verified_tokens: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    plan_s: float = 0.0
    target_forward_s: float = 0.0
    drafter_forward_s: float = 0.0
    target_pace: float | None = None


@dataclass
class MethodRun:
    """Output of one method on one group: token ids per prompt (EOS removed), wall time, stats."""

    token_ids: list[list[int]]
    wall_s: float
    stats: RunStats


@dataclass
class TimedForward:
    """One forward of a model as :class:`ForwardTimer` saw it: ``tokens`` new tokens for each of ``batch`` rows over
    a cache of ``context`` slots (0: a prefill into an empty cache), ``seconds`` from the decoder's call to the end
    of the LM head's that followed it (the decoder's own end where none did)."""

    batch: int
    context: int
    tokens: int
    started: float
    seconds: float = 0.0


class ForwardTimer:
    """Times and sizes every forward of one model, whoever calls it.

    Hooks sit on the bare decoder (``model.model``) and the LM head
    (``model.lm_head``) where the model has them — our engine calls those two
    directly, transformers' ``generate`` through ``model.forward`` — else on the
    model itself. ``seconds`` sums both; ``query_lengths`` holds the new-token
    count ``q`` of each decoder call (``input_ids`` is ``[B, q]``) and ``forwards``
    each call's shape and time (:class:`TimedForward`).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
        self.modules = [decoder, head] if decoder is not None and head is not None else [model]
        self.seconds = 0.0
        self.query_lengths: list[int] = []
        self.forwards: list[TimedForward] = []
        self._start: dict[int, float] = {}

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        now = time.perf_counter()
        if module is self.modules[0]:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:
                self.query_lengths.append(int(ids.shape[-1]))
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                context = int(cache.get_seq_length()) if cache is not None else 0
                self.forwards.append(TimedForward(int(ids.shape[0]), context, int(ids.shape[-1]), now))
        self._start[id(module)] = now

    def _post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        now = time.perf_counter()
        self.seconds += now - self._start.pop(id(module))
        if self.forwards:
            self.forwards[-1].seconds = now - self.forwards[-1].started

    def pace(self, profile: CostProfile | None, role: Role) -> float | None:
        """The machine's pace over this model's forwards on a cache (prefills left out)::

            pace = sum_i seconds_i / sum_i f_role(B_i, ctx_i, n_i)

        ``f`` being ``profile``'s latency for the same shape: 1.0 where the forwards ran as fast as profiled,
        1.2 where 20 % slower. Two runs of one model on one machine differ in pace by the machine's drift
        between them (and by how differently the profile misjudges their shapes). None without a measured
        profile or a forward on a cache.
        """
        if profile is None or not profile.measured:
            return None
        timed = [f for f in self.forwards if f.context > 0 and f.seconds > 0]
        predicted = sum(profile.latency(role, f.batch, f.context, f.tokens) for f in timed)
        return sum(f.seconds for f in timed) / predicted if predicted > 0 else None

    @contextmanager
    def attached(self) -> Iterator["ForwardTimer"]:
        """Register the hooks for the duration of the block."""
        handles = []
        for module in self.modules:
            handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            handles.append(module.register_forward_hook(self._post, with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


class Method(ABC):
    """A decoding method measured by the harness."""

    name: str
    #: largest batch the method supports (None: any)
    max_batch_size: int | None = None

    def __init__(self, pair: ModelPair) -> None:
        self.pair = pair

    def supports(self, batch_size: int) -> bool:
        return self.max_batch_size is None or batch_size <= self.max_batch_size

    def run(self, prompts: list[list[int]], max_new_tokens: int) -> MethodRun:
        """Generate greedily for one group of prompts (one batch), timing the whole call."""
        target_timer, drafter_timer = ForwardTimer(self.pair.target), ForwardTimer(self.pair.drafter)
        with target_timer.attached(), drafter_timer.attached():
            t0 = time.perf_counter()
            token_ids, stats = self._generate(prompts, max_new_tokens, target_timer, drafter_timer)
            wall_s = time.perf_counter() - t0
        stats.target_forward_s, stats.drafter_forward_s = target_timer.seconds, drafter_timer.seconds
        stats.target_pace = target_timer.pace(self.pair.cost_profile, "target")
        return MethodRun(token_ids=token_ids, wall_s=wall_s, stats=stats)

    @abstractmethod
    def _generate(
        self, prompts: list[list[int]], max_new_tokens: int, target_timer: ForwardTimer, drafter_timer: ForwardTimer
    ) -> tuple[list[list[int]], RunStats]:
        """Token ids per prompt (EOS removed) and the run's stats (forward times filled in by ``run``)."""


class EngineMethod(Method):
    """Our engine with one tree policy; the engine's batch size is the group size.

    The policy object lives as long as the method, as it would in a server: CAST's
    speedup gate keeps what it learned per batch size from one group (and the
    warm-up) to the next.
    """

    def __init__(
        self,
        pair: ModelPair,
        name: str,
        policy: str,
        static_config: StaticConfig | None = None,
        cast_config: CastConfig | None = None,
    ) -> None:
        super().__init__(pair)
        self.name, self.uses_drafter = name, policy != "none"
        self.policy = make_policy(policy, static_config, cast_config)

    def _generate(self, prompts, max_new_tokens, target_timer, drafter_timer):
        p = self.pair
        engine = Engine(
            p.target,
            p.tokenizer,
            p.drafter if self.uses_drafter else None,
            policy=self.policy,
            cost_profile=p.cost_profile,
            max_batch_size=len(prompts),
        )
        generations = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
        # Every prompt is admitted in the first step (group size == max_batch_size), so the
        # sequence with the most steps took part in all of them: its times are the batch's.
        longest = max((g.stats for g in generations), key=lambda s: s.steps)
        stats = RunStats(
            batch_steps=longest.steps,
            row_steps=sum(g.stats.steps for g in generations),
            gained_tokens=sum(g.stats.accepted_tokens + g.stats.steps for g in generations),
            drafted_nodes=sum(g.stats.drafted_nodes for g in generations),
            drafted_row_steps=sum(g.stats.drafted_steps for g in generations),
            drafter_forwards=longest.drafter_forwards,
            accepted_at_least=add_counts(*(g.stats.accepted_at_least for g in generations)),
            verified_tokens=sum(g.stats.verified_tokens for g in generations),
            draft_s=longest.draft_s,
            verify_s=longest.verify_s,
            plan_s=longest.plan_s,
        )
        return [g.token_ids for g in generations], stats


class HFGenerateMethod(Method):
    """transformers ``generate(do_sample=False)`` on the target; batch B, left padding."""

    name = "hf_generate"

    def _new_tokens(self, row: list[int]) -> list[int]:
        """Generated ids up to (not including) the first EOS; padding after EOS dropped."""
        for i, tok in enumerate(row):
            if tok in self.pair.eos_token_ids:
                return row[:i]
        return row

    def _generate(self, prompts, max_new_tokens, target_timer, drafter_timer):
        width = max(len(p) for p in prompts)
        pad = self.pair.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = self.pair.target.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=sorted(self.pair.eos_token_ids),
        )
        token_ids = [self._new_tokens(row[width:].tolist()) for row in out]
        # each forward yields one token per live row; a row lives until its EOS (included)
        rows = sum(min(len(t) + 1, max_new_tokens) for t in token_ids)
        stats = RunStats(
            batch_steps=len(target_timer.query_lengths),
            row_steps=rows,
            gained_tokens=rows,
            verified_tokens=rows,
            verify_s=target_timer.seconds,
        )
        return token_ids, stats


class HFAssistedMethod(HFGenerateMethod):
    """transformers assisted generation (``assistant_model=drafter``), batch 1 only.

    The assistant runs with the library's defaults (transformers 5.x: up to 20
    draft tokens per step, stopping early when the drafter's confidence falls
    below an adaptive threshold starting at 0.4).
    """

    name = "hf_assisted"
    max_batch_size = 1

    def _generate(self, prompts, max_new_tokens, target_timer, drafter_timer):
        if len(prompts) != 1:
            raise ValueError(f"hf_assisted supports batch 1 only; got {len(prompts)} prompts")
        prompt = prompts[0]
        out = self.pair.target.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            assistant_model=self.pair.drafter,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pair.pad_token_id,
            eos_token_id=sorted(self.pair.eos_token_ids),
        )
        token_ids = self._new_tokens(out[0, len(prompt) :].tolist())
        # The first target forward scores the prompt and the first candidates together;
        # count its last prompt token as the root, like every later forward's first token.
        lengths = list(target_timer.query_lengths)
        if lengths:
            lengths[0] -= len(prompt) - 1
        steps = len(lengths)
        stats = RunStats(
            batch_steps=steps,
            row_steps=steps,
            gained_tokens=min(len(token_ids) + 1, max_new_tokens),
            drafted_nodes=sum(lengths) - steps,
            drafted_row_steps=steps,
            verified_tokens=sum(lengths),
            draft_s=drafter_timer.seconds,
            verify_s=target_timer.seconds,
        )
        return [token_ids], stats


def build_methods(
    pair: ModelPair,
    names: list[str],
    static_config: StaticConfig | None = None,
    cast_config: CastConfig | None = None,
) -> list[Method]:
    """Methods by name, in the given order; ``ValueError`` for an unknown name."""
    methods: list[Method] = []
    for name in names:
        if name == "vanilla":
            methods.append(EngineMethod(pair, "vanilla", "none"))
        elif name == "static":
            methods.append(EngineMethod(pair, "static", "static", static_config=static_config))
        elif name == "cast":
            methods.append(EngineMethod(pair, "cast", "cast", cast_config=cast_config))
        elif name == "hf_generate":
            methods.append(HFGenerateMethod(pair))
        elif name == "hf_assisted":
            methods.append(HFAssistedMethod(pair))
        else:
            raise ValueError(f"method must be one of {', '.join(METHOD_NAMES)}; got {name!r}")
    return methods
