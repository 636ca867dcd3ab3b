"""The drafter: a small causal LM that grows a draft tree layer by layer.

Per step and batch (one forward per layer, every row in it):

1. *Catch-up*: commit each row's pending tokens (tokens committed since the
   last step, ending with the root): the accepted drafts the last tree fed
   come from its stashed cache entries, the rest (at least the root) is fed
   as a causal chain -- of a long one (a prompt, a backlog) only its most
   recent tokens where the speedup gate finds feeding it whole does not pay
   (``DraftGate.catch_up``); a new row's prompt fed whole goes in a forward
   of its own where the profile prices that below padding it with the
   batch's (``_rows_fed_apart``). The logits at the root give layer 1: the root's
   ``top_k`` children, ``v = p_D(child)``. ``p_D`` is the drafter's
   distribution over its draft vocabulary ``V_D`` (:mod:`cast_core.vocab`):
   a core of leading ids plus the rows' own rarer context tokens.
   *Context lookup* (:mod:`cast_core.lookup`): where a row's current suffix
   occurred before in its own tokens, up to ``lookup_tokens`` of what followed
   it there are fed after the root in the same forward, uncommitted, so the
   drafter prices them: ``p_D(a_j | root, a_1 .. a_{j-1})`` for each.
2. For layer ``i``: the policy keeps ``n_i`` candidates (best ``v`` first)
   and decides whether to grow. Growing feeds the kept nodes (tree mask over
   their ancestors, position = root position + depth) and takes, over all
   their children, the ``top_k`` by ``v = v(parent) * p_D(child)`` as layer
   ``i + 1``.
   The lookup's node at depth ``i + 1`` needs no forward where its path is
   among layer ``i``'s kept nodes, so its ``v`` counts as covered in the
   policy's depth decision.
3. The lookup tokens not already in the tree are grafted on below the deepest
   node of their path (``v`` = parent's ``v`` times their ``p_D``).
   Where the policy finds the lookups alone worth more per unit of verify cost
   than a drafted step (``TreePolicy.lookup_only_length``), no forward runs:
   each row's tree is its lookup as a chain, and the step's tokens join the
   row's backlog, as on a step the speedup gate skips.
   The tree's part of the drafter cache is stashed per row, then dropped; the policy picks how many
   nodes to verify, best ``v`` first (a connected subtree: ``v`` never grows
   along a path, and ties keep node order, where parents come first).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from cast_core.forward import feed_chain_ahead, feed_rows_apart, forward_logits
from cast_core.kv import KVState, TailStash
from cast_core.gate import DraftGate
from cast_core.lookup import lookup_gain
from cast_core.policy import CostContext, DraftedStep, LookupStep, PlainStep, RowPlan, TreePolicy, reference_step_s
from cast_core.tree import DraftTree
from cast_core.vocab import DEFAULT_CORE_SIZE, DraftHead, DraftVocab


@dataclass
class DraftResult:
    """A drafted batch of trees and what building them cost.

    Attributes:
        tree: the trees to verify (root included).
        nodes_drafted: nodes the drafter produced per row (before reranking).
        layers: drafted layers = drafter forwards (the catch-up yields layer 1, each further layer one more).
        plan_s: seconds spent in policy decisions.
    """

    tree: DraftTree
    nodes_drafted: int
    layers: int
    plan_s: float


class Drafter:
    """Builds draft trees with a small causal LM sharing the target's tokenizer."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, core_vocab: int | None = DEFAULT_CORE_SIZE) -> None:
        """``vocab_size``: ids the target accepts (drafter logits beyond it are ignored);
        ``core_vocab``: ``N``, the leading ids every drafted layer scores (None: all of them)."""
        self.model = model
        self.vocab = DraftVocab(model, vocab_size, core_vocab)

    def new_state(self, batch_size: int) -> KVState:
        return KVState(self.model.config.num_hidden_layers, batch_size, self.model.device)

    @staticmethod
    def _probs(logits: torch.Tensor) -> torch.Tensor:
        """``p_D`` over the draft vocabulary (the head's ids)."""
        return torch.softmax(logits.float(), dim=-1)

    @torch.inference_mode()
    def draft(
        self,
        state: KVState,
        pending: list[list[int]],
        policy: TreePolicy,
        ctx: CostContext | None,
        plans: list[RowPlan],
        step_s: list[float | None] | None = None,
    ) -> DraftResult:
        """Catch up on ``pending`` tokens (each row's list ends with its root) and draft a tree per row.

        A row with an empty ``pending`` list is idle: it rides along in the
        padded forwards, its tree is garbage, and it is left out of every
        policy decision (utilities average over the active rows only).

        Accepted drafts whose cache entries the row's last tree stashed are
        committed from the stash rather than fed again.

        With a speedup gate (``policy.gate``), the active rows first report
        how their last step went (a plain step's wall time; a drafted step's
        tokens committed and cost in plain steps, ``DraftedStep.judge``: the
        wall time from its drafting to this call, or ``step_s[b]`` where the
        caller measured row ``b``'s last step itself); if the gate then says drafting does
        not pay at this batch size, no forward runs: every tree is its root
        alone and the pending tokens wait in each row's backlog for the next
        drafted step. So they do where the policy verifies the rows' context
        lookups alone (``_lookup_only``), each tree being its lookup as a chain;
        the next call learns from the tokens such a step committed.
        """
        active = np.array([bool(p) for p in pending])
        if not active.any():
            raise ValueError("pending: no active row to draft for")
        if policy.lookup_tokens:
            for plan, tokens in zip(plans, pending):
                if tokens:
                    plan.context.extend(tokens if len(plan.context) else plan.backlog + tokens)
        roots = torch.tensor([p[-1] if p else 0 for p in pending], dtype=torch.long)
        live = [plan for plan, a in zip(plans, active) if a]
        gate = policy.gate if ctx is not None else None
        t0 = time.perf_counter()
        after_draft = any(isinstance(plan.last_step, (DraftedStep, LookupStep)) for plan in live)
        for plan, tokens in zip(plans, pending):
            if tokens and isinstance(plan.last_step, LookupStep):
                policy.observe_lookup_step(plan.last_step, tokens)
        gains = [
            lookup_gain(tokens[:-1], *plan.last_step.lookup)
            for plan, tokens in zip(plans, pending)
            if tokens and isinstance(plan.last_step, DraftedStep) and plan.last_step.lookup is not None
        ]
        if gains:
            policy.observe_lookup(float(np.mean(gains)))
        if gate is not None:
            walls = [None] * len(live) if step_s is None else [w for w, a in zip(step_s, active) if a]
            _report_speedups(gate, live, [p for p in pending if p], t0, walls)
        fresh = _reuse_stashed_path(state, pending, plans)
        guesses, lookup_only = _lookup_only(plans, active, policy, ctx)
        skip = not lookup_only and gate is not None and not gate.should_draft(ctx.batch_size)
        plan_s = time.perf_counter() - t0
        if skip or lookup_only:
            for plan, chain in zip(plans, fresh):
                plan.backlog.extend(chain)
            for plan, (guess, ngram), a in zip(plans, guesses, active):
                if a:
                    plan.last_step = LookupStep(ctx.batch_size, ngram, guess[:lookup_only]) if lookup_only else PlainStep(ctx.batch_size, t0, ctx.step_s, timed=not after_draft)
            if not lookup_only:
                return DraftResult(tree=DraftTree.roots(roots), nodes_drafted=0, layers=0, plan_s=plan_s)
            chains = [guess[:lookup_only] for guess, _ in guesses]
            return DraftResult(tree=DraftTree.chains(roots, chains), nodes_drafted=max(map(len, chains)), layers=0, plan_s=plan_s)
        chains = [plan.backlog + chain if chain else [] for plan, chain in zip(plans, fresh)]
        # a row new to the drafter feeds its prompt: a one-off debt, not the cost of drafting
        feeds_prompt = any(plan.backlog for plan, pos, a in zip(plans, state.next_pos.tolist(), active) if a and pos == 0)
        for plan in live:
            plan.backlog = []
        for plan, chain in zip(plans, chains):
            plan.rare_tokens |= self.vocab.rare(chain)
        head = self.vocab.head(set().union(*(plan.rare_tokens for plan in live)))
        gaps = None
        cached = state.next_pos.tolist()
        if gate is not None:  # a prompt or a backlog is fed whole only where drafting repays it
            left = [plan.budget_left for plan in plans]
            chains, gaps = gate.catch_up(ctx.batch_size, chains, cached, left, lambda fed, cut: _rows_fed_apart(fed, cut, cached, ctx)[1])
        apart = {b: chains[b][:-1] for b in _rows_fed_apart(chains, gaps, cached, ctx)[0]}
        chains = [chain[-1:] if b in apart else chain for b, chain in enumerate(chains)]
        ahead = _lookups(chains, [guess for guess, _ in guesses], policy, ctx)
        try:
            decisive = _decisive_rows(plans, active) if policy.sizes_for_slowest else active
            result, layer_costs, catch_up_s, lookup_depth = self._grow(
                state, chains, apart, ahead, gaps, head, roots, active, decisive, policy, ctx, plans
            )
        except BaseException:
            state.discard_tail()  # a failed step leaves no half-built tree behind
            raise
        result.plan_s += plan_s
        if ctx is not None:
            catch_up = _catch_up_excess(fresh, chains, apart, ahead, catch_up_s, ctx)
            verify = ctx.target[min(result.tree.tokens.shape[1], len(ctx.target) - 1)]
            fed_lookup = any(ahead)
            for plan, guess, depth, a in zip(plans, ahead, lookup_depth, active):
                if a:
                    lookup = (guess, int(depth)) if fed_lookup else None
                    plan.last_step = _drafted_step(ctx, t0, catch_up, feeds_prompt, float(layer_costs + verify), lookup)
        return result

    def _grow(
        self,
        state: KVState,
        chains: list[list[int]],
        apart: dict[int, list[int]],
        ahead: list[list[int]],
        gaps: list[tuple[int, int]] | None,
        head: DraftHead,
        roots: torch.Tensor,
        active: np.ndarray,
        decisive: np.ndarray,
        policy: TreePolicy,
        ctx: CostContext | None,
        plans: list[RowPlan],
    ) -> tuple[DraftResult, float, float, np.ndarray]:
        """Feed the chains of the rows fed ``apart`` (``feed_rows_apart``), then ``chains`` (with ``gaps``, see
        ``feed_chain``) and, uncommitted, the lookup tokens ``ahead`` of them; grow the tree layer by layer over
        ``head``'s ids, stash the fed nodes, graft the lookup tokens on (``_graft_lookup``), rerank. The policy
        sizes every row's tree from the ``decisive`` rows' confidences (a subset of the ``active`` ones,
        ``_decisive_rows``).

        Also returns the drafted layers' cost (target steps), the catch-up forward's seconds and, per
        row, the depth the drafted tree reached along its lookup's path (below it the lookup was grafted).
        """
        bsz, k = len(chains), min(policy.top_k, int(head.ids.numel()))  # a draft vocabulary may hold fewer ids than top_k
        t_feed = time.perf_counter()
        feed_rows_apart(self.model, state, apart)
        fed_logits = feed_chain_ahead(self.model, state, chains, ahead, gaps=gaps, head=head)
        catch_up_s = time.perf_counter() - t_feed
        assert fed_logits is not None
        plan_s, layer_costs = 0.0, 0.0
        root_pos = (state.next_pos - 1).clamp(min=0)
        histories = [plan.depth for plan, d in zip(plans, decisive) if d]

        ahead_p = _lookup_probs(fed_logits, ahead, head) if any(ahead) else None
        ahead_v = None if ahead_p is None else torch.cumprod(ahead_p, dim=1).numpy()  # [B, W]: v of the lookup's j+1-th node
        path_node = np.full(bsz, -1)  # per row, the tree node (index) holding the lookup's path down to the current layer
        deepest = np.zeros((2, bsz), dtype=np.int64)  # per row, the deepest such node and its depth (root: 0, 0)
        conf, local = torch.topk(self._probs(fed_logits[:, 0]), k, dim=-1)  # [B, k]
        conf, tok = conf.cpu(), head.ids[local].cpu()  # the tree is built on the CPU, whatever the model's device
        node_tok, node_parent, node_depth, node_conf = [tok], [torch.zeros_like(tok)], [torch.ones_like(tok)], [conf]
        # visibility of each node over drafter tail slots (its fed ancestors), grown as nodes are fed
        layer_vis = torch.zeros((bsz, k, 0), dtype=torch.bool)
        layer_start, layer, tail = 1, 1, 0  # node index of the current layer's first node (root = 0)
        prev_kept: np.ndarray | None = None
        fed_tok: list[torch.Tensor] = []
        fed_parent: list[torch.Tensor] = []  # tail slot of each fed node's parent (-1: the root)
        while True:
            t0 = time.perf_counter()
            cand = node_conf[-1].numpy()[decisive]
            n_keep = policy.layer_width(layer, cand, ctx)
            for lst in (node_tok, node_parent, node_depth, node_conf):
                lst[-1] = lst[-1][:, :n_keep]
            layer_vis = layer_vis[:, :n_keep]
            kept = node_conf[-1].numpy()[decisive]
            if prev_kept is not None:
                policy.observe_layer(prev_kept, kept, histories)
            covered = 0.0
            if ahead_v is not None:
                path_node = _follow_lookup(path_node, ahead, layer, node_tok[-1], node_parent[-1], layer_start)
                deepest[:, path_node >= 0] = np.stack([path_node, np.full(bsz, layer)])[:, path_node >= 0]
                on_path = [a and n >= 0 and len(ahead[b]) > layer for b, (a, n) in enumerate(zip(active, path_node))]
                covered = float(np.where(on_path, ahead_v[:, min(layer, ahead_v.shape[1] - 1)], 0.0)[decisive].mean())
            grow = layer < policy.max_depth and policy.grow(layer, kept, ctx, histories, covered, _verified_so_far(node_conf, decisive, policy, ctx))
            plan_s += time.perf_counter() - t0
            if not grow:
                break
            if ctx is not None:
                layer_costs += float(ctx.drafter[min(n_keep, len(ctx.drafter) - 1)])
            # feed the kept nodes: each sees its fed ancestors and itself (fed node i sits in tail slot i - 1)
            fed_tok.append(node_tok[-1])
            fed_parent.append(node_parent[-1] - 1)
            vis = torch.cat([layer_vis, torch.eye(n_keep, dtype=torch.bool).expand(bsz, n_keep, n_keep)], dim=2)
            positions = root_pos[:, None] + layer
            logits = forward_logits(self.model, state, node_tok[-1], positions.expand(bsz, n_keep), vis, head=head)
            probs = self._probs(logits)  # [B, n_keep, |V_D|]
            c_conf, c_local = torch.topk(probs, k, dim=-1)  # [B, n_keep, k]
            c_conf, c_tok = c_conf.cpu(), head.ids[c_local].cpu()
            path = node_conf[-1][:, :, None] * c_conf
            conf, flat = torch.topk(path.reshape(bsz, -1), min(k, n_keep * k), dim=-1)  # [B, k]
            parent_local = torch.div(flat, k, rounding_mode="floor")
            node_tok.append(torch.gather(c_tok.reshape(bsz, -1), 1, flat))
            node_parent.append(parent_local + layer_start)
            node_depth.append(torch.full_like(flat, layer + 1))
            node_conf.append(conf)
            # children see their parent's fed ancestors, their parent's slot, and (later) themselves
            parent_slot = torch.nn.functional.one_hot(parent_local + tail, tail + n_keep).bool()
            layer_vis = torch.cat([torch.gather(layer_vis, 1, parent_local[:, :, None].expand(-1, -1, tail)), torch.zeros((bsz, flat.shape[1], n_keep), dtype=torch.bool)], dim=2) | parent_slot
            tail += n_keep
            layer_start += n_keep
            layer += 1
            prev_kept = kept
        if fed_tok:
            stashes = state.stash_tail(torch.cat(fed_tok, 1), torch.cat(fed_parent, 1))
            for plan, stash, a in zip(plans, stashes, active):
                if a:
                    plan.stash = stash
        state.discard_tail()

        t0 = time.perf_counter()
        nodes = [torch.cat(x, dim=1) for x in (node_tok, node_parent, node_depth, node_conf)]  # [B, N] each
        valid = torch.ones_like(nodes[0], dtype=torch.bool)
        if ahead_p is not None:
            grafted, grafted_valid = _graft_lookup(nodes[0].shape[1], nodes[3], deepest, ahead, ahead_p)
            nodes = [torch.cat([x, g], dim=1) for x, g in zip(nodes, grafted)]
            valid = torch.cat([valid, grafted_valid], dim=1)
        all_conf = nodes[3]
        order = torch.sort(all_conf, dim=1, descending=True, stable=True).indices
        m = policy.verify_count(torch.gather(all_conf, 1, order).numpy()[decisive], ctx)
        plan_s += time.perf_counter() - t0
        chosen = torch.sort(order[:, :m], dim=1).values  # node order keeps parents first
        tree = _assemble(roots, *nodes, valid, chosen)
        return DraftResult(tree=tree, nodes_drafted=int(all_conf.shape[1]), layers=layer, plan_s=plan_s), layer_costs, catch_up_s, deepest[1]


def _verified_so_far(node_conf: list[torch.Tensor], decisive: np.ndarray, policy: TreePolicy, ctx: CostContext | None) -> int:
    """How many of the tree's nodes so far (``node_conf``: each layer's kept ``v``) the policy would verify
    (``TreePolicy.verify_count`` over the ``decisive`` rows): the margin at which a further layer's node is verified."""
    conf = torch.cat(node_conf, dim=1).numpy()[decisive]
    return policy.verify_count(-np.sort(-conf, axis=1), ctx)


def _decisive_rows(plans: list[RowPlan], active: np.ndarray) -> np.ndarray:
    """The active rows with the most tokens left (``RowPlan.budget_left``), the ones the batch waits for.

    A batch decodes until its longest row is done, so a drafted token shortens it only on such a
    row; an unbounded row counts as having the most left. At a batch's start every row does.
    """
    left = np.array([plan.budget_left for plan in plans])
    return active & (left >= left[active].max())


def _rows_fed_apart(
    chains: list[list[int]], gaps: list[tuple[int, int]] | None, cached: list[int], ctx: CostContext | None
) -> tuple[list[int], float]:
    """The rows whose catch-up ``chains`` are fed apart, each alone (``feed_rows_apart``), and the catch-up's cost in
    plain steps (0 without ``ctx``).

    A batched forward pads every row to the longest chain. A row that holds nothing in the drafter's cache
    (``cached[b] == 0``: a new row's prompt) and whose chain is fed whole may instead be fed alone, but for its
    last token, which joins the batched forward for its logits. With the ``j`` longest such chains
    (``L_1 >= L_2 >= ...``) fed apart::

        cost_j = sum_{i <= j} C_D(1, L_i - 1) + C_D(B, W_j)

    ``W_j`` the longest chain left in the batched forward (1 for a row fed apart); the least ``cost_j`` wins
    (``j = 0`` on ties, and always without ``ctx.drafter_alone``).
    """
    if ctx is None:
        return [], 0.0
    lengths = [len(chain) for chain in chains]
    best = (ctx.drafter_cost(max(lengths, default=0)), 0)
    if ctx.drafter_alone is None:
        return [], best[0]
    candidates = sorted(
        (b for b, n in enumerate(lengths) if n > 1 and cached[b] == 0 and (gaps is None or gaps[b][1] == 0)),
        key=lambda b: -lengths[b],
    )
    batched = [n for b, n in enumerate(lengths) if b not in candidates]
    alone = 0.0
    for j, b in enumerate(candidates, start=1):
        alone += ctx.drafter_alone_cost(lengths[b] - 1)
        width = max([1] + batched + [lengths[r] for r in candidates[j:]])
        best = min(best, (alone + ctx.drafter_cost(width), j))
    return candidates[: best[1]], best[0]


@dataclass(frozen=True)
class _CatchUpExcess:
    """A catch-up forward's price against its fresh chains' (``_catch_up_excess``)."""

    fresh: float  # the fresh chains' catch-up, in plain steps
    excess: float  # the fed chains' catch-up over ``fresh``, in plain steps
    excess_s: float  # the same share of the catch-up forward's measured seconds


def _catch_up_excess(
    fresh: list[list[int]],
    chains: list[list[int]],
    apart: dict[int, list[int]],
    ahead: list[list[int]],
    catch_up_s: float,
    ctx: CostContext,
) -> _CatchUpExcess:
    """How much of a catch-up forward went on more than each row's ``fresh`` chain (the tokens its last step
    committed): a prompt or the backlog of plain steps before it. With the profile's prices::

        c_fresh = C_D(B, max_b |fresh_b| + |ahead_b|)
        c_fed   = C_D(B, max_b |chains_b| + |ahead_b|) + sum_{b apart} C_D(1, |apart_b|)
        excess  = max(0, c_fed - c_fresh),  excess_s = catch_up_s * excess / c_fed

    (the measured seconds shared in the priced proportion, so a machine slower than its profile does not
    read as a backlog where there is none).
    """
    width = max(len(c) + len(a) for c, a in zip(chains, ahead))
    fed = ctx.drafter_cost(width) + sum(ctx.drafter_alone_cost(len(tokens)) for tokens in apart.values())
    own = ctx.drafter_cost(max(len(c) + len(a) for c, a in zip(fresh, ahead)))
    excess = max(0.0, fed - own)
    return _CatchUpExcess(own, excess, catch_up_s * excess / fed if fed > 0 else 0.0)


def _drafted_step(
    ctx: CostContext, started: float, catch_up: _CatchUpExcess, feeds_prompt: bool, rest: float, lookup: tuple[list[int], int] | None
) -> DraftedStep:
    """A row's record of a drafted step that began at ``started``, its drafted layers and verify costing
    ``rest`` plain steps: judged as if it had fed its fresh chain alone.

    A prompt is a one-off debt, not the cost of drafting: the step's wall leaves out the catch-up's excess. A
    backlog (tokens of the plain steps before it, thinned or skipped) is what thinning and probing cost: judged
    without it (an open gate drafts every step and carries none), it is kept as ``backlog_s`` so the gate
    charges it to the loss it budgets (``DraftGate.observe``'s ``full_cost``).
    """
    predicted = catch_up.fresh + rest
    if feeds_prompt:
        return DraftedStep(ctx.batch_size, started, ctx.step_s, predicted, lookup, prompt_s=catch_up.excess_s)
    return DraftedStep(ctx.batch_size, started, ctx.step_s, predicted, lookup, catch_up.excess_s, catch_up.excess)


def _lookups(chains: list[list[int]], guesses: list[list[int]], policy: TreePolicy, ctx: CostContext | None) -> list[list[int]]:
    """Each active row's context-lookup tokens (``guesses``) to feed ahead of its root (``cast_core.lookup``), where
    the policy finds them worth the catch-up forward's extra width (``TreePolicy.use_lookup``); else ``[]``."""
    none: list[list[int]] = [[] for _ in chains]
    ahead = [guess if chain else [] for guess, chain in zip(guesses, chains)]
    if not any(ahead):
        return none
    width = max(len(c) for c in chains)
    fed = max(len(c) + len(a) for c, a in zip(chains, ahead))
    return ahead if policy.use_lookup(width, fed, ctx) else none


def _lookup_only(
    plans: list[RowPlan], active: np.ndarray, policy: TreePolicy, ctx: CostContext | None
) -> tuple[list[tuple[list[int], int]], int]:
    """Each row's context lookup and matched suffix length (``([], 0)`` for idle rows), and how many of
    its tokens a drafter-free step verifies (``TreePolicy.lookup_only_length``; 0: none, the step drafts
    or runs plain). The alternative's yield is ``max(1, rho^B)`` from the speedup gate (1 without one)."""
    none = [([], 0) for _ in plans]
    if ctx is None or not policy.lookup_tokens:
        return none, 0
    guesses = [plan.context.lookup(policy.lookup_tokens) if a else ([], 0) for plan, a in zip(plans, active)]
    if not any(g for g, _ in guesses):
        return guesses, 0
    baseline = policy.gate.threshold_scale(ctx.batch_size) if policy.gate is not None else 1.0
    return guesses, policy.lookup_only_length([g for g, a in zip(guesses, active) if a], ctx, baseline)


def _follow_lookup(
    path_node: np.ndarray, ahead: list[list[int]], layer: int, tokens: torch.Tensor, parents: torch.Tensor, layer_start: int
) -> np.ndarray:
    """Per row, the node of layer ``layer`` (kept: ``tokens``/``parents`` ``[B, n]``, tree indices from ``layer_start``)
    whose path is ``ahead[b][:layer]``, given last layer's ``path_node`` (root 0 for layer 1); -1 where there is none."""
    found = np.full(len(ahead), -1)
    for b, a in enumerate(ahead):
        parent = 0 if layer == 1 else int(path_node[b])
        if len(a) < layer or parent < 0:
            continue
        hits = ((tokens[b] == a[layer - 1]) & (parents[b] == parent)).nonzero()
        if len(hits):
            found[b] = layer_start + int(hits[0, 0])
    return found


def _lookup_probs(fed_logits: torch.Tensor, ahead: list[list[int]], head: DraftHead) -> torch.Tensor:
    """``[B, W]``: ``p_D(ahead[b][j] | root, ahead[b][:j])`` from the catch-up forward's logits over ``V_D``
    (0 outside ``V_D`` and past a row's lookup): ``exp(logit[a_j] - logsumexp(logits))``, one value per
    position rather than a softmax over all of ``V_D`` at every position. On the CPU, whatever the model's device."""
    bsz, width = fed_logits.shape[:2]
    tokens = torch.zeros((bsz, width), dtype=torch.long)
    for b, a in enumerate(ahead):
        tokens[b, : len(a)] = torch.tensor(a, dtype=torch.long)
    local = head.local(tokens.to(head.ids.device))
    logits = fed_logits.float()
    picked = torch.gather(logits, 2, local.clamp(min=0)[:, :, None])[:, :, 0]  # head.ids live with the logits
    probs = torch.exp(picked - torch.logsumexp(logits, dim=-1)).cpu()
    local = local.cpu()
    real = (local >= 0) & (torch.arange(width)[None, :] < torch.tensor([len(a) for a in ahead])[:, None])
    return torch.where(real, probs, 0.0)


def _graft_lookup(
    n_drafted: int,
    conf: torch.Tensor,
    deepest: np.ndarray,
    ahead: list[list[int]],
    ahead_p: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The lookup tokens as tree nodes: ``(tokens, parents, depth, conf)`` blocks ``[B, G]`` and their validity.

    ``deepest[:, b]`` = (tree node, depth ``d``) of the deepest drafted node on row ``b``'s lookup path
    ``a_1 .. a_d`` (``(0, 0)``: the root; tree node ``i + 1`` is drafted node ``i``, ``conf[b, i]`` its ``v``;
    ``n_drafted`` drafted nodes per row). The lookup's remaining tokens ``a_{d+1} ..`` become a chain of new
    nodes below it, with path confidence ``v(a_j) = v(parent) * p_D(a_j | root, a_1 .. a_{j-1})`` (never
    above its parent's, so reranking still picks a connected subtree), until ``v`` reaches 0.
    Rows are padded to ``G`` nodes with invalid padding nodes (token 0, parent root, depth 0,
    ``v = 0``).
    """
    bsz = conf.shape[0]
    grafts: list[list[tuple[int, int, int, float]]] = []
    for b in range(bsz):
        row: list[tuple[int, int, int, float]] = []
        node, d = int(deepest[0, b]), int(deepest[1, b])
        v = float(conf[b, node - 1]) if node > 0 else 1.0
        for j in range(d, len(ahead[b])):
            v *= float(ahead_p[b, j])
            if v <= 0:
                break
            row.append((ahead[b][j], node, j + 1, v))
            node = n_drafted + len(row)
        grafts.append(row)
    width = max(len(r) for r in grafts)
    block = torch.zeros((4, bsz, width), dtype=torch.float64)
    valid = torch.zeros((bsz, width), dtype=torch.bool)
    for b, row in enumerate(grafts):
        if row:
            block[:, b, : len(row)] = torch.tensor(row, dtype=torch.float64).T
            valid[b, : len(row)] = True
    out = [block[0].long(), block[1].long(), block[2].long(), block[3].to(conf.dtype)]
    return out, valid


def _reuse_stashed_path(state: KVState, pending: list[list[int]], plans: list[RowPlan]) -> list[list[int]]:
    """Commit the stashed entries of each row's accepted drafts; returns the tokens still to feed.

    ``pending[b]`` = the drafts accepted from row ``b``'s last tree, then the
    bonus token. The drafter fed every node of that tree but its last layer,
    so the accepted path's prefix down to that layer is already computed:
    those entries become committed slots and only the rest of ``pending``
    (at least the bonus token) is fed again.
    """
    picks: list[tuple[TailStash, list[int]] | None] = []
    for plan, tokens in zip(plans, pending):
        stash = plan.stash if tokens else None  # an idle row keeps its stash for its own next step
        if stash is not None:
            plan.stash = None
        picks.append((stash, stash.match(tokens[:-1])) if stash is not None else None)
    counts = state.append_committed(picks)
    return [tokens[n:] for tokens, n in zip(pending, counts)]


def _report_speedups(gate: DraftGate, plans: list[RowPlan], pending: list[list[int]], now: float, walls: list[float | None]) -> None:
    """Tell ``gate`` how the rows' last steps went, per batch size: the mean wall time of timed plain
    (skipped) steps (``PlainStep.timed``), then, of drafted ones, their costs without and with the backlog
    they fed, their basis (``DraftedStep.judge``) and the tokens committed by their critical rows. Each
    judged step's tokens count against its row's ``tokens_left``.

    A step's wall time is ``walls[r]`` where given (the caller's own measure of the row's last step),
    else ``now - started``: from its drafting call to this one. A serving replica's sessions measure it
    by the step's draft and verify forwards: between two of a session's drafting calls it also waits
    behind other sessions' prefills and batches, which a plain step in its place would have waited too
    (on the 2-core AMD EPYC at concurrency 4, the first drafted steps read 12-36 plain steps by the
    wall clock and closed the gate for 256 steps).

    ``pending`` holds each row's tokens committed by that step (accepted drafts + bonus). A batch
    decodes until its longest row is done, so the tokens that shorten it are those of the rows with
    the most tokens left before the step (``tokens_left``, unbounded counting as most); the gate is
    told their mean::

        n = mean { n_r : L_r = max_s L_s }

    At a batch's start every row has its whole budget left and ``n`` is the mean over all rows. As
    rows drift apart, the laggard's tokens count: at MT-bench B=4 (2-core AMD EPYC) the mean row
    committed 1.1x a plain step's worth of drafted time while the row with the most left committed
    0.8x, and the batch ran 0.90x vanilla. Where finished rows are replaced at once (continuous
    batching), every row's tokens count and this reads drafting's gain low: the gate errs towards
    plain decoding, which costs little near break-even.
    """
    plain: dict[int, list[tuple[float, float]]] = {}
    drafted: dict[int, list[tuple[DraftedStep, int, float, float]]] = {}
    for plan, tokens, wall in zip(plans, pending, walls):
        step, plan.last_step = plan.last_step, None
        left = plan.budget_left
        if step is not None and plan.tokens_left is not None:
            plan.tokens_left = max(0, plan.tokens_left - len(tokens))
        if isinstance(step, (PlainStep, DraftedStep)) and wall is None:
            wall = now - step.started
        if isinstance(step, PlainStep) and step.timed:
            plain.setdefault(step.batch_size, []).append((wall, reference_step_s(step.plain_step_s)))
        elif isinstance(step, DraftedStep):
            drafted.setdefault(step.batch_size, []).append((step, len(tokens), left, wall))
    for batch_size, timings in plain.items():
        seconds, reference = np.mean(timings, axis=0).tolist()
        gate.observe_plain(batch_size, seconds, reference)
    for batch_size, steps in drafted.items():
        scale = gate.plain_scale(batch_size)
        judged = [step.judge(wall, scale) for step, _, _, wall in steps]
        cost, full_cost = np.mean([(c, full) for c, full, _ in judged], axis=0).tolist()
        on_profile = all(p for _, _, p in judged)
        most_left = max(left for _, _, left, _ in steps)
        critical = float(np.mean([n for _, n, left, _ in steps if left == most_left]))
        gate.observe(batch_size, critical, cost, on_profile, full_cost)


def _assemble(
    roots: torch.Tensor,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    depth: torch.Tensor,
    conf: torch.Tensor,
    valid: torch.Tensor,
    chosen: torch.Tensor,
) -> DraftTree:
    """Root + the ``chosen`` drafted nodes (indices into the drafted arrays, ascending) as a ``DraftTree``.

    Drafted node ``j`` is tree node ``j + 1`` before selection; parents are
    remapped to positions within the selection (root = 0); ``valid`` is False for padding nodes.
    """
    bsz, m = chosen.shape
    remap = torch.zeros((bsz, tokens.shape[1] + 1), dtype=torch.long)
    remap.scatter_(1, chosen + 1, torch.arange(1, m + 1).expand(bsz, m))
    sel_parent = torch.gather(parents, 1, chosen)
    return DraftTree(
        tokens=torch.cat([roots[:, None], torch.gather(tokens, 1, chosen)], dim=1),
        parents=torch.cat([torch.full((bsz, 1), -1, dtype=torch.long), torch.gather(remap, 1, sel_parent)], dim=1),
        depth=torch.cat([torch.zeros((bsz, 1), dtype=torch.long), torch.gather(depth, 1, chosen)], dim=1),
        confidence=torch.cat([torch.ones((bsz, 1)), torch.gather(conf, 1, chosen)], dim=1),
        valid=torch.cat([torch.ones((bsz, 1), dtype=torch.bool), torch.gather(valid, 1, chosen)], dim=1),
    )
