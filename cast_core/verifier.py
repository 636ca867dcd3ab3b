"""The verifier: one target forward over a batch of draft trees, then acceptance and commit.

Row ``b``'s tree (root + drafted nodes, padded) goes through the target with
``position_ids = next_pos[b] + depth`` and a mask of the committed prefix plus
the tree's ancestor matrix. Where the target's cost table says a forward of
more tokens is cheaper (a one-token forward at batch 1 on a CPU runs a slow
matrix-vector kernel), the trees are padded with invalid nodes up to that count
(:meth:`~cast_core.cost.CostTable.padded_tokens`); they see only themselves,
are never accepted and their cache entries are dropped. Acceptance (``cast_core.acceptance``) picks a path;
the cache keeps exactly the root's and the accepted nodes' KV entries, and the
bonus token becomes the next root.
"""

from __future__ import annotations

import torch

from cast_core.acceptance import AcceptedPath, accept_greedy, accept_sampled
from cast_core.cost import CostProfile
from cast_core.forward import forward_logits, prefill_prompts
from cast_core.kv import KVState
from cast_core.sampling import SamplingParams
from cast_core.tree import DraftTree


class Verifier:
    """Runs the target model over draft trees."""

    def __init__(self, model: torch.nn.Module, cost_profile: CostProfile | None = None) -> None:
        """``cost_profile``: its target table decides padding where it was measured (synthetic or None: never pad)."""
        self.model = model
        self.cost = cost_profile.target if cost_profile is not None and cost_profile.measured else None

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def new_state(self, batch_size: int) -> KVState:
        return KVState(self.model.config.num_hidden_layers, batch_size, self.model.device)

    def prefill(self, state: KVState, prompts: list[list[int]]) -> None:
        """Cache every prompt but its last token (the first step's root)."""
        prefill_prompts(self.model, state, prompts)

    @torch.inference_mode()
    def verify(
        self,
        state: KVState,
        tree: DraftTree,
        params: list[SamplingParams],
        generators: list[torch.Generator],
        keep_rows: set[int] | None = None,
    ) -> list[AcceptedPath]:
        """Verify ``tree`` (one row per sequence of ``state``), commit the accepted paths.

        Rows outside ``keep_rows`` (default: all rows) are idle: their forward
        output is ignored and they commit nothing (an empty path).
        """
        if self.cost is not None:
            tree = tree.padded(self.cost.padded_tokens(tree.batch_size, state.base, tree.num_nodes))
        try:
            logits = forward_logits(
                self.model, state, tree.tokens, tree.position_ids(state.next_pos), tree.ancestors()
            )
            assert logits is not None
            paths = []
            for b in range(tree.batch_size):
                row_logits = logits[b]
                if keep_rows is not None and b not in keep_rows:
                    paths.append(AcceptedPath(nodes=[], tokens=[]))
                elif params[b].greedy:
                    paths.append(accept_greedy(tree, row_logits, b))
                else:
                    paths.append(accept_sampled(tree, row_logits, b, params[b], generators[b]))
        except BaseException:
            state.discard_tail()  # a failed step leaves the cache as it was: every row stays usable
            raise
        state.commit([p.nodes for p in paths])
        return paths
