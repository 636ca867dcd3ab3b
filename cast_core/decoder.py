"""The in-process speculative decoding loop over a batch of live sequences.

``SpecDecoder`` owns one KV state per model; row ``b`` of both is sequence
``rows[b]``. A step is::

    ctx   = cost curves at (B, context)            # cast policy only
    trees = drafter.draft(pending tokens per row)  # one forward per layer
    paths = verifier.verify(trees)                 # one target forward
    pending[b] = accepted drafts + bonus token      # the drafter's next catch-up

With a speedup gate (``cast``), the drafter may skip a step where drafting
does not pay at this batch size: the trees are roots alone (a plain decode
step) and the drafter catches up later (``cast_core.gate``). It also skips
steps whose trees are the rows' context lookups alone, where those pay more
(``CastPolicy.lookup_only_length``).

Sequences are admitted (prefilled, then appended as rows) and retired
(rows dropped) between steps, so a batch mixes prompt lengths and ages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cast_core.cost import CostProfile
from cast_core.drafter import Drafter
from cast_core.policy import CostContext, RowPlan, TreePolicy
from cast_core.sampling import SamplingParams, make_generator
from cast_core.tree import DraftTree
from cast_core.verifier import Verifier


@dataclass
class StepStats:
    """What one decoding step did (per batch).

    Attributes:
        batch_size: rows in the step.
        nodes_drafted: drafted nodes per row before reranking.
        tokens_verified: tree nodes per row sent to the target, root included.
        drafter_forwards: drafter forwards of the step (the catch-up, then one
            per grown layer; 0 when the speedup gate skipped the drafter or
            the step verified the context lookup alone).
        accepted: per row, drafted tokens accepted (bonus not counted).
        draft_s, verify_s, plan_s: seconds drafting (planning included),
            verifying, and in policy decisions.
    """

    batch_size: int
    nodes_drafted: int
    tokens_verified: list[int]
    drafter_forwards: int
    accepted: list[int]
    draft_s: float
    verify_s: float
    plan_s: float


@dataclass
class LiveSequence:
    """Decoding state of one sequence; ``pending`` are tokens the drafter has not seen."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    plan: RowPlan
    pending: list[int] = field(default_factory=list)


class SpecDecoder:
    """Batched draft -> verify -> commit over live sequences, in one process."""

    def __init__(
        self,
        verifier: Verifier,
        drafter: Drafter | None,
        policy: TreePolicy,
        cost_profile: CostProfile | None,
    ) -> None:
        if policy.drafts and drafter is None:
            raise ValueError(f"policy: {policy.name!r} needs a drafter model")
        self.verifier, self.drafter, self.policy, self.cost_profile = verifier, drafter, policy, cost_profile
        self.rows: list[LiveSequence] = []
        self.target_state = verifier.new_state(0)
        self.drafter_state = drafter.new_state(0) if drafter is not None else None

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int | None = None) -> LiveSequence:
        """Prefill a new sequence that may generate ``max_new_tokens`` (None: unbounded) and add it as the last row.

        The drafter's row starts empty with the prompt as its backlog: it is
        fed at the row's first drafted step, and never where the speedup gate
        keeps the drafter idle.
        """
        seq = LiveSequence(
            seq_id=seq_id,
            prompt_ids=list(prompt_ids),
            params=params,
            generator=make_generator(params.seed),
            plan=self.policy.new_row_plan(max_new_tokens),
            pending=[prompt_ids[-1]],
        )
        state = self.verifier.new_state(1)
        self.verifier.prefill(state, [seq.prompt_ids])
        self.target_state.extend(state)
        if self.drafter is not None and self.drafter_state is not None:
            self.drafter_state.extend(self.drafter.new_state(1))
            seq.plan.backlog = list(prompt_ids[:-1])
        self.rows.append(seq)
        return seq

    def retire(self, seq_ids: set[int]) -> None:
        """Drop the rows of the given sequences."""
        keep = [i for i, s in enumerate(self.rows) if s.seq_id not in seq_ids]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.target_state.select_rows(keep)
        if self.drafter_state is not None:
            self.drafter_state.select_rows(keep)

    def cost_context(self) -> CostContext | None:
        """Cost curves at the current batch size and context (None without a profile)."""
        if self.cost_profile is None or not self.policy.needs_costs:
            return None
        return CostContext.from_profile(
            self.cost_profile, len(self.rows), self.target_state.base, self.policy.cost_horizon
        )

    def step(self) -> tuple[list[list[int]], StepStats]:
        """One draft/verify step for every row; returns the new tokens per row."""
        if not self.rows:
            raise RuntimeError("step() with no live sequences")
        t0 = time.perf_counter()
        ctx = self.cost_context()
        plan_s = time.perf_counter() - t0
        if self.policy.drafts:
            assert self.drafter is not None and self.drafter_state is not None
            result = self.drafter.draft(
                self.drafter_state, [s.pending for s in self.rows], self.policy, ctx, [s.plan for s in self.rows]
            )
            tree, drafted, forwards = result.tree, result.nodes_drafted, result.layers
            plan_s += result.plan_s
        else:
            tree, drafted, forwards = DraftTree.roots(torch.tensor([s.pending[-1] for s in self.rows])), 0, 0
        t1 = time.perf_counter()
        paths = self.verifier.verify(
            self.target_state, tree, [s.params for s in self.rows], [s.generator for s in self.rows]
        )
        t2 = time.perf_counter()
        for seq, path in zip(self.rows, paths):
            seq.pending = path.tokens
        stats = StepStats(
            batch_size=len(self.rows),
            nodes_drafted=drafted,
            tokens_verified=tree.sizes(),
            drafter_forwards=forwards,
            accepted=[p.accepted_drafts for p in paths],
            draft_s=t1 - t0,
            verify_s=t2 - t1,
            plan_s=plan_s,
        )
        return [p.tokens for p in paths], stats
