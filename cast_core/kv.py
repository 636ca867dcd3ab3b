"""Batched KV cache with per-row slot validity, for tree decoding on stock transformers.

Layout: every layer holds keys/values ``[B, H_kv, L, d]`` in a preallocated
buffer that grows by doubling (``update`` writes in place: no per-forward
concatenation of the whole cache). Slots ``[0, base)`` are *committed*; row
``b`` may use only those where ``valid[b]`` is True — rows of different length
and tokens that were dropped after verification leave *holes*, which attention
never sees. Slots ``[base, L)`` are the *tail*: written by the forwards of the
current step and not yet committed.

RoPE is applied before keys are cached, so a row's committed slots need not be
contiguous; its positions are tracked separately: ``next_pos[b]`` = number of
committed tokens of row ``b`` = position of its next token.

One step:

1. ``forward(model, ids, positions, tail_visible)`` appends ``q`` slots per row.
   The attention mask is ``[B, 1, q, L + q]``: committed columns follow
   ``valid``, tail columns follow ``tail_visible`` (the tree's ancestor matrix).
2. ``commit(keep)`` keeps, per row, the listed tail slots (in order), moves them
   to the front of the tail, marks them valid and drops the rest of the tail.
   ``discard_tail()`` drops it all.

``compact()`` packs rows to the left when that would shrink the cache by a
fraction ``HOLE_FRACTION``.

A tail can outlive its step as a ``TailStash`` (``stash_tail``): the drafter
keeps the entries of the nodes it fed, and once the verifier has chosen a
path, ``append_committed`` writes the entries of the accepted nodes as
committed slots instead of computing them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache, CacheLayerMixin

#: Attention kernels the engine's forwards may use: every SDPA backend but cuDNN's. cuDNN builds an
#: execution plan for each new shape, and a speculative engine meets new shapes every step (the cache
#: grows by the accepted tokens, trees vary in width): on an NVIDIA H200 (torch 2.11) a first
#: pass of plain decoding over fresh shapes at B=1 ran 73.7 ms a step with it and 29.0 ms without,
#: CAST 95.1 and 36.7 ms (``bench/results/h200/``).
ENGINE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class SlotLayer(CacheLayerMixin):
    """One layer's KV buffer ``[B, H, capacity, d]`` written in place."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, q, d = key_states.shape
        capacity = max(256, 2 * q)
        self._k = key_states.new_zeros((b, h, capacity, d))
        self._v = value_states.new_zeros((b, h, capacity, value_states.shape[-1]))
        self.device = key_states.device
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        assert self._k is not None and self._v is not None
        capacity = self._k.shape[2]
        if needed <= capacity:
            return
        new_cap = max(needed, 2 * capacity)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_zeros((old.shape[0], old.shape[1], new_cap, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        end = self.length + q
        self._reserve(end)
        assert self._k is not None and self._v is not None
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self._k[:, :, :end]
        self.values = self._v[:, :, :end]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` slots (transformers' negative-count convention)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count")
        self.length += tokens_to_remove
        self._refresh_views()

    def _refresh_views(self) -> None:
        if self._k is not None and self._v is not None:
            self.keys = self._k[:, :, : self.length]
            self.values = self._v[:, :, : self.length]

    def gather_slots(self, start: int, index: torch.Tensor) -> None:
        """``slots[b, start + j] = slots[b, index[b, j]]`` for ``j < index.shape[1]``; length = start + width."""
        if self._k is None or self._v is None:
            return
        width = index.shape[1]
        for name in ("_k", "_v"):
            buf = getattr(self, name)
            h, d = buf.shape[1], buf.shape[3]
            idx = index[:, None, :, None].expand(-1, h, -1, d)
            picked = torch.gather(buf[:, :, : self.length], 2, idx)
            self._reserve(start + width)
            buf = getattr(self, name)
            buf[:, :, start : start + width] = picked
        self.length = start + width
        self._refresh_views()

    def select_rows(self, rows: torch.Tensor) -> None:
        if self._k is None or self._v is None:
            return
        self._k = self._k.index_select(0, rows)
        self._v = self._v.index_select(0, rows)
        self._refresh_views()

    def pad_to(self, length: int) -> None:
        """Extend with zero (invalid) slots up to ``length``."""
        if self._k is None:
            return
        self._reserve(length)
        assert self._k is not None and self._v is not None
        self._k[:, :, self.length : length] = 0
        self._v[:, :, self.length : length] = 0
        self.length = length
        self._refresh_views()


@dataclass
class TailStash:
    """One row's tail slots, kept past the step that wrote them, with the tree they encode.

    Attributes:
        keys, values: per layer, ``[H, T, d]`` entries of the row's ``T`` tail slots.
        tokens: the token each slot holds.
        parents: each slot's parent slot (``-1``: the step's root, a committed token).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    tokens: list[int]
    parents: list[int]

    def match(self, tokens: Sequence[int]) -> list[int]:
        """Slots of the longest prefix of ``tokens`` that is a path down from the root."""
        children: dict[tuple[int, int], int] = {}
        for slot, (token, parent) in enumerate(zip(self.tokens, self.parents)):
            children.setdefault((parent, token), slot)
        path, node = [], -1
        for token in tokens:
            nxt = children.get((node, int(token)))
            if nxt is None:
                break
            path.append(nxt)
            node = nxt
        return path


class KVState:
    """A model's batched KV cache plus per-row validity and positions.

    Attributes:
        cache: the transformers ``Cache`` handed to the model.
        valid: ``[B, base]`` bool, committed slots each row may attend to.
        next_pos: ``[B]`` position id of each row's next token: its committed
            tokens plus the positions it skipped (``skip_positions``).
    """

    #: compact when slots that no row needs exceed this fraction of the committed length
    HOLE_FRACTION = 0.25
    #: ... and the committed length exceeds this many slots
    MIN_COMPACT_LENGTH = 64

    def __init__(self, num_layers: int, batch_size: int, device: torch.device | str = "cpu") -> None:
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.layers = [SlotLayer() for _ in range(num_layers)]
        self.cache = Cache(layers=self.layers)
        self.valid = torch.zeros((batch_size, 0), dtype=torch.bool, device=self.device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    @property
    def batch_size(self) -> int:
        return int(self.valid.shape[0])

    @property
    def base(self) -> int:
        """Committed length (slots, holes included)."""
        return int(self.valid.shape[1])

    @property
    def length(self) -> int:
        """Slots in the cache, tail included."""
        return self.layers[0].length

    @torch.inference_mode()
    def forward(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        tail_visible: torch.Tensor,
        output: str = "logits",
    ) -> torch.Tensor:
        """Run ``model`` on ``q`` new tokens per row; returns ``[B, q, V]`` logits.

        With ``output="hidden"``, ``model`` is a bare decoder and its
        ``last_hidden_state`` ``[B, q, hidden]`` is returned instead.

        Args:
            input_ids: ``[B, q]``.
            position_ids: ``[B, q]``.
            tail_visible: ``[B, q, T + q]`` bool over the tail written earlier in
                this step (``T`` slots) and the new tokens. Each query must see
                itself.

        The three may live anywhere (trees are built on the CPU); they are moved to the cache's device.
        """
        input_ids, position_ids, tail_visible = (t.to(self.device) for t in (input_ids, position_ids, tail_visible))
        b, q = input_ids.shape
        base, tail = self.base, self.length - self.base
        if tail_visible.shape != (b, q, tail + q):
            raise ValueError(f"tail_visible must be {(b, q, tail + q)}, got {tuple(tail_visible.shape)}")
        visible = torch.cat([self.valid[:, None, :].expand(b, q, base), tail_visible], dim=2)
        dtype = model.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        with sdpa_kernel(ENGINE_SDPA_BACKENDS):
            out = model(
                input_ids=input_ids,
                attention_mask=mask[:, None],
                position_ids=position_ids,
                cache=self.cache,
                use_cache=True,
            )
        return out.last_hidden_state if output == "hidden" else out.logits

    @torch.inference_mode()
    def commit(self, keep: Sequence[Sequence[int]]) -> None:
        """Keep, per row, the listed tail slots (offsets from ``base``); drop the rest of the tail.

        Row ``b``'s kept slots become committed slots ``base .. base + len(keep[b])``
        in the given order, and ``next_pos[b] += len(keep[b])``.
        """
        if len(keep) != self.batch_size:
            raise ValueError("commit needs one keep list per row")
        base, width = self.base, max((len(k) for k in keep), default=0)
        counts = torch.tensor([len(k) for k in keep], dtype=torch.long, device=self.device)
        identity = all(list(k) == list(range(len(k))) for k in keep)
        if identity:
            for layer in self.layers:
                layer.crop(-(layer.length - base - width))
        else:
            index = torch.full((self.batch_size, width), base, dtype=torch.long, device=self.device)
            for b, k in enumerate(keep):
                if k:
                    index[b, : len(k)] = torch.tensor(k, dtype=torch.long, device=self.device) + base
            for layer in self.layers:
                layer.gather_slots(base, index)
        new_valid = torch.arange(width, device=self.device)[None, :] < counts[:, None]
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        self.next_pos = self.next_pos + counts
        self._maybe_compact()

    @torch.inference_mode()
    def stash_tail(self, tokens: torch.Tensor, parents: torch.Tensor) -> list[TailStash]:
        """Copy each row's tail out (``tokens``/``parents``: ``[B, T]`` per slot) before it is discarded."""
        base, tail = self.base, self.length - self.base
        if tokens.shape != (self.batch_size, tail) or parents.shape != tokens.shape:
            raise ValueError(f"tokens and parents must be {(self.batch_size, tail)}")
        keys = [layer.keys[:, :, base:].clone() for layer in self.layers]
        values = [layer.values[:, :, base:].clone() for layer in self.layers]
        return [
            TailStash([k[b] for k in keys], [v[b] for v in values], tokens[b].tolist(), parents[b].tolist())
            for b in range(self.batch_size)
        ]

    def skip_positions(self, counts: Sequence[int]) -> None:
        """Advance ``next_pos[b]`` by ``counts[b]`` without adding slots.

        The skipped positions become a gap: the row's later tokens keep their
        true positions (RoPE distances stay right) and never attend to the
        tokens that would have sat there. A drafter may skip context this way;
        its drafts only get worse, never wrong, since the target verifies them.
        """
        if len(counts) != self.batch_size or any(c < 0 for c in counts):
            raise ValueError(f"counts must be {self.batch_size} non-negative numbers; got {list(counts)}")
        self.next_pos = self.next_pos + torch.tensor(list(counts), dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def append_committed(self, picks: Sequence[tuple[TailStash, list[int]] | None]) -> list[int]:
        """Commit, per row, the given slots of a stash (in order) as its next tokens; returns the counts.

        Row ``b`` gains ``len(slots)`` committed slots holding the stashed
        entries and ``next_pos[b]`` grows by as much; ``None`` adds nothing.
        The entries must have been computed at exactly those positions with
        exactly those ancestors (a path of the row's last tree from its root).
        """
        if len(picks) != self.batch_size:
            raise ValueError("append_committed needs one entry per row")
        if self.length != self.base:
            raise RuntimeError("append_committed() with an uncommitted tail")
        counts = [len(p[1]) if p is not None else 0 for p in picks]
        width = max(counts, default=0)
        if width == 0:
            return counts
        base = self.base
        for i, layer in enumerate(self.layers):
            layer.pad_to(base + width)
            assert layer._k is not None and layer._v is not None
            for b, pick in enumerate(picks):
                if pick is not None and pick[1]:
                    stash, slots = pick
                    index = torch.tensor(slots, dtype=torch.long, device=self.device)
                    layer._k[b, :, base : base + len(slots)] = stash.keys[i].index_select(1, index)
                    layer._v[b, :, base : base + len(slots)] = stash.values[i].index_select(1, index)
        count_t = torch.tensor(counts, dtype=torch.long, device=self.device)
        new_valid = torch.arange(width, device=self.device)[None, :] < count_t[:, None]
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        self.next_pos = self.next_pos + count_t
        return counts

    @torch.inference_mode()
    def discard_tail(self) -> None:
        """Drop every uncommitted slot."""
        for layer in self.layers:
            layer.crop(-(layer.length - self.base))

    def _maybe_compact(self) -> None:
        base = self.base
        if base < self.MIN_COMPACT_LENGTH:
            return
        # packing every row to the left shrinks the cache to the longest row
        reclaimable = base - int(self.next_pos.max())
        if reclaimable > self.HOLE_FRACTION * base:
            self.compact()

    @torch.inference_mode()
    def compact(self) -> None:
        """Left-pack every row's committed slots, removing holes (tail must be empty)."""
        if self.length != self.base:
            raise RuntimeError("compact() with an uncommitted tail")
        counts = self.valid.sum(dim=1)
        width = int(counts.max()) if self.batch_size else 0
        order = torch.argsort((~self.valid).to(torch.int8), dim=1, stable=True)[:, :width]
        for layer in self.layers:
            layer.gather_slots(0, order)
        self.valid = torch.arange(width, device=self.device)[None, :] < counts[:, None]

    @torch.inference_mode()
    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only the given rows (e.g. drop finished sequences)."""
        if self.length != self.base:
            raise RuntimeError("select_rows() with an uncommitted tail")
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        for layer in self.layers:
            layer.select_rows(idx)
        self.valid = self.valid.index_select(0, idx)
        self.next_pos = self.next_pos.index_select(0, idx)
        if self.batch_size and self.base:
            self.compact()

    @torch.inference_mode()
    def replace_rows(self, rows: Sequence[int], other: "KVState") -> None:
        """Put ``other``'s row ``i`` in place of row ``rows[i]``, which must hold nothing yet (no slot, position 0):
        a row's cache filled by a forward of its own (``cast_core.forward.feed_rows_apart``).

        Its slots, validity and ``next_pos`` come over; every row is padded with holes to the longer committed length.
        """
        if self.length != self.base or other.length != other.base:
            raise RuntimeError("replace_rows() with an uncommitted tail")
        if len(rows) != other.batch_size:
            raise ValueError(f"rows: one per row of the other state ({other.batch_size}); got {len(rows)}")
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        if bool(self.valid.index_select(0, idx).any()) or bool(self.next_pos.index_select(0, idx).any()):
            raise ValueError(f"rows: only rows that hold nothing can be replaced; got {list(rows)}")
        length = max(self.base, other.base)
        for mine, theirs in zip(self.layers, other.layers):
            if not _aligned(mine, self.batch_size, theirs, other.batch_size, length):
                continue
            assert mine._k is not None and mine._v is not None and theirs._k is not None and theirs._v is not None
            mine._k[idx, :, :length] = theirs._k[:, :, :length]
            mine._v[idx, :, :length] = theirs._v[:, :, :length]
        valid = torch.zeros((self.batch_size, length), dtype=torch.bool, device=self.device)
        valid[:, : self.base] = self.valid
        valid[idx, : other.base] = other.valid.to(self.device)
        next_pos = self.next_pos.clone()
        next_pos[idx] = other.next_pos.to(self.device)
        self.valid, self.next_pos = valid, next_pos

    @torch.inference_mode()
    def extend(self, other: "KVState") -> None:
        """Append ``other``'s rows after this state's rows (admission of new sequences)."""
        if self.length != self.base or other.length != other.base:
            raise RuntimeError("extend() with an uncommitted tail")
        if self.batch_size == 0:
            self.layers, self.cache = other.layers, other.cache
            self.valid, self.next_pos = other.valid, other.next_pos
            return
        length = max(self.base, other.base)
        for mine, theirs in zip(self.layers, other.layers):
            if not _aligned(mine, self.batch_size, theirs, other.batch_size, length):
                continue
            assert mine._k is not None and mine._v is not None and theirs._k is not None and theirs._v is not None
            mine._k = torch.cat([mine._k[:, :, :length], theirs._k[:, :, :length]], dim=0)
            mine._v = torch.cat([mine._v[:, :, :length], theirs._v[:, :, :length]], dim=0)
            mine.length = length
            mine._refresh_views()

        def pad_valid(v: torch.Tensor) -> torch.Tensor:
            filler = torch.zeros((v.shape[0], length - v.shape[1]), dtype=torch.bool, device=self.device)
            return torch.cat([v, filler], dim=1)

        self.valid = torch.cat([pad_valid(self.valid), pad_valid(other.valid)], dim=0)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])


def _aligned(mine: SlotLayer, mine_rows: int, theirs: SlotLayer, their_rows: int, length: int) -> bool:
    """Allocate whichever of two layers (of ``mine_rows`` and ``their_rows`` rows) no forward has written yet,
    shaped like the other, and pad both with zero slots to ``length``; False where neither holds anything."""
    if mine._k is None and theirs._k is None:
        return False
    if theirs._k is None:
        theirs.lazy_initialization(*(t[:, :, :0] for t in _empty_like_rows(mine, their_rows)))
    if mine._k is None:
        mine.lazy_initialization(*(t[:, :, :0] for t in _empty_like_rows(theirs, mine_rows)))
    mine.pad_to(length)
    theirs.pad_to(length)
    return True


def _empty_like_rows(layer: SlotLayer, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-length key/value tensors shaped like ``layer``'s, for ``rows`` rows."""
    assert layer._k is not None and layer._v is not None
    k = layer._k.new_zeros((rows, layer._k.shape[1], 1, layer._k.shape[3]))
    v = layer._v.new_zeros((rows, layer._v.shape[1], 1, layer._v.shape[3]))
    return k, v
