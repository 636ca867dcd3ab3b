"""Tree masks, positions and KV compaction against a brute-force full recompute (fp64)."""

from __future__ import annotations

import pytest
import torch

from cast_core.forward import forward_logits, prefill_prompts
from cast_core.kv import KVState
from cast_core.tree import DraftTree

from conftest import tiny_pair


def full_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """Logits at the last position of a plain, cache-free causal forward."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def random_tree(gen: torch.Generator, n: int, vocab: int, root: int) -> DraftTree:
    """A random tree of ``n`` nodes (root included) whose parents precede children."""
    parents, depth = [-1], [0]
    for i in range(1, n):
        p = int(torch.randint(0, i, (1,), generator=gen))
        parents.append(p)
        depth.append(depth[p] + 1)
    tokens = [root] + torch.randint(3, vocab, (n - 1,), generator=gen).tolist()
    return DraftTree(
        tokens=torch.tensor([tokens]),
        parents=torch.tensor([parents]),
        depth=torch.tensor([depth]),
        confidence=torch.ones((1, n)),
        valid=torch.ones((1, n), dtype=torch.bool),
    )


def path_to(tree: DraftTree, b: int, node: int) -> list[int]:
    """Node indices from the root to ``node``."""
    out = [node]
    while tree.parents[b, out[-1]] >= 0:
        out.append(int(tree.parents[b, out[-1]]))
    return out[::-1]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_pair("llama", torch.float64)[0]


def test_ancestors_and_positions() -> None:
    tree = DraftTree(
        tokens=torch.tensor([[5, 6, 7, 8, 9]]),
        parents=torch.tensor([[-1, 0, 0, 1, 3]]),
        depth=torch.tensor([[0, 1, 1, 2, 3]]),
        confidence=torch.ones((1, 5)),
        valid=torch.ones((1, 5), dtype=torch.bool),
    )
    tree.validate()
    anc = tree.ancestors()[0].int().tolist()
    assert anc == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 1, 1],
    ]
    assert tree.position_ids(torch.tensor([10])).tolist() == [[10, 11, 11, 12, 13]]


def test_validate_rejects_child_before_parent() -> None:
    tree = DraftTree(
        tokens=torch.tensor([[5, 6, 7]]),
        parents=torch.tensor([[-1, 2, 0]]),
        depth=torch.tensor([[0, 2, 1]]),
        confidence=torch.ones((1, 3)),
        valid=torch.ones((1, 3), dtype=torch.bool),
    )
    with pytest.raises(ValueError, match="parents"):
        tree.validate()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_logits_match_full_recompute_batched(model: torch.nn.Module, seed: int) -> None:
    """Every node's logits equal a plain forward of prefix + its root path, in a ragged batch."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in (1, 7, 13)]
    state = KVState(model.config.num_hidden_layers, len(prompts))
    prefill_prompts(model, state, prompts)
    trees = [random_tree(gen, n, vocab, p[-1]) for n, p in zip((9, 4, 12), prompts)]
    tree = DraftTree.stack(trees)
    with torch.no_grad():
        logits = forward_logits(model, state, tree.tokens, tree.position_ids(state.next_pos), tree.ancestors())
    for b, prompt in enumerate(prompts):
        for node in range(trees[b].num_nodes):
            path_tokens = [int(tree.tokens[b, j]) for j in path_to(tree, b, node)]
            expected = full_logits(model, prompt[:-1] + path_tokens)
            torch.testing.assert_close(logits[b, node], expected, rtol=1e-9, atol=1e-9)


def test_commit_compact_and_continue_match_full_recompute(model: torch.nn.Module) -> None:
    """Keep a non-prefix path per row, compact, extend the batch, and keep decoding exactly."""
    gen = torch.Generator().manual_seed(7)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in (5, 11)]
    state = KVState(model.config.num_hidden_layers, 2)
    prefill_prompts(model, state, prompts)
    histories = [list(p[:-1]) for p in prompts]
    roots = [p[-1] for p in prompts]
    for step in range(6):
        trees = [random_tree(gen, n, vocab, r) for n, r in zip((6 + step, 3 + step), roots)]
        tree = DraftTree.stack(trees)
        with torch.no_grad():
            forward_logits(model, state, tree.tokens, tree.position_ids(state.next_pos), tree.ancestors())
        keep = [path_to(tree, b, trees[b].num_nodes - 1) for b in range(2)]  # deepest-last node's path
        state.commit(keep)
        for b in range(2):
            histories[b] += [int(tree.tokens[b, j]) for j in keep[b]]
            roots[b] = int(torch.randint(3, vocab, (1,), generator=gen))
        if step == 3:
            state.compact()
            assert bool(state.valid.all()) or state.valid.sum(1).tolist() == state.next_pos.tolist()
    assert state.next_pos.tolist() == [len(h) for h in histories]
    # a newcomer joins the batch; then every row decodes one more token
    newcomer = torch.randint(3, vocab, (4,), generator=gen).tolist()
    other = KVState(model.config.num_hidden_layers, 1)
    prefill_prompts(model, other, [newcomer])
    state.extend(other)
    histories.append(newcomer[:-1])
    roots.append(newcomer[-1])
    tree = DraftTree.roots(torch.tensor(roots))
    with torch.no_grad():
        logits = forward_logits(model, state, tree.tokens, tree.position_ids(state.next_pos), tree.ancestors())
    for b in range(3):
        torch.testing.assert_close(logits[b, 0], full_logits(model, histories[b] + [roots[b]]), rtol=1e-9, atol=1e-9)
    # drop the middle row: the others are unaffected
    state.commit([[0], [0], [0]])
    state.select_rows([0, 2])
    histories = [histories[0] + [roots[0]], histories[2] + [roots[2]]]
    tree = DraftTree.roots(torch.tensor([9, 10]))
    with torch.no_grad():
        logits = forward_logits(model, state, tree.tokens, tree.position_ids(state.next_pos), tree.ancestors())
    for b in range(2):
        torch.testing.assert_close(logits[b, 0], full_logits(model, histories[b] + [9 + b]), rtol=1e-9, atol=1e-9)


def test_holes_trigger_automatic_compaction(model: torch.nn.Module) -> None:
    """Rows that take turns keeping long paths leave holes; the cache packs itself."""
    state = KVState(model.config.num_hidden_layers, 2)
    prefill_prompts(model, state, [[5] * 40, [6] * 40])
    pattern = [(10, 1), (1, 10)] * 6
    for step, (k0, k1) in enumerate(pattern):
        tree = DraftTree.stack([_chain(10, 7), _chain(10, 8)])
        with torch.no_grad():
            forward_logits(model, state, tree.tokens, tree.position_ids(state.next_pos), tree.ancestors())
        state.commit([list(range(k0)), list(range(k1))])
        assert state.base - int(state.next_pos.max()) <= KVState.HOLE_FRACTION * state.base
    assert state.next_pos.tolist() == [39 + 66, 39 + 66]
    assert state.valid.sum(1).tolist() == state.next_pos.tolist()


def _chain(n: int, token: int) -> DraftTree:
    return DraftTree(
        tokens=torch.full((1, n), token),
        parents=torch.arange(-1, n - 1)[None],
        depth=torch.arange(n)[None],
        confidence=torch.ones((1, n)),
        valid=torch.ones((1, n), dtype=torch.bool),
    )


def test_stashed_tail_commits_an_accepted_path_exactly(model: torch.nn.Module) -> None:
    """The drafter's reuse: stash a tree's entries, commit a path from the stash, decode on; equal to a full recompute."""
    from cast_core.forward import feed_chain

    gen = torch.Generator().manual_seed(11)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in (6, 9, 4)]
    state = KVState(model.config.num_hidden_layers, 3)
    prefill_prompts(model, state, prompts)
    feed_chain(model, state, [[p[-1]] for p in prompts], want_last=False)  # the roots are committed
    trees = [random_tree(gen, n, vocab, p[-1]) for n, p in zip((7, 5, 6), prompts)]
    tree = DraftTree.stack(trees)
    # feed every node but the root into the tail: the root is a committed slot, a node sees its other ancestors
    with torch.no_grad():
        forward_logits(model, state, tree.tokens[:, 1:], tree.position_ids(state.next_pos - 1)[:, 1:], tree.ancestors()[:, 1:, 1:])
    stashes = state.stash_tail(tree.tokens[:, 1:], (tree.parents[:, 1:] - 1).clamp(min=-1))
    state.discard_tail()
    paths = [path_to(tree, b, trees[b].num_nodes - 1)[1:] for b in range(3)]
    pending = [
        [int(tree.tokens[0, j]) for j in paths[0]] + [5],  # the whole path accepted, then a bonus token
        [int(tree.tokens[1, j]) for j in paths[1][:1]] + [vocab - 1, 6],  # one draft matches, then a token the tree lacks
        [7],  # nothing accepted
    ]
    picks = [(s, s.match(p[:-1])) for s, p in zip(stashes, pending)]
    assert [len(p[1]) for p in picks] == [len(paths[0]), 1, 0]
    counts = state.append_committed(picks)
    rest = [p[n:] for p, n in zip(pending, counts)]
    logits = feed_chain(model, state, rest, want_last=True)
    for b in range(3):
        expected = full_logits(model, prompts[b] + pending[b])
        torch.testing.assert_close(logits[b], expected, rtol=1e-9, atol=1e-9)


def test_a_chain_fed_with_a_gap_matches_a_forward_at_the_true_positions(model: torch.nn.Module) -> None:
    """``feed_chain(gaps=...)``: left-out tokens are unseen, later tokens keep their true positions; decoding goes on."""
    from cast_core.forward import feed_chain

    gen = torch.Generator().manual_seed(12)
    vocab = model.config.vocab_size
    chains = [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in (9, 5, 12)]
    gaps = [(2, 30), (0, 0), (0, 7)]  # row 0: 2 sink tokens, then 30 positions skipped; row 2: a leading gap of 7
    state = KVState(model.config.num_hidden_layers, 3)
    logits = feed_chain(model, state, chains, want_last=True, gaps=gaps)
    assert state.next_pos.tolist() == [9 + 30, 5, 12 + 7]
    more = feed_chain(model, state, [[4], [5], [6]], want_last=True)

    def expected(chain: list[int], head: int, skipped: int) -> torch.Tensor:
        positions = [i if i < head else i + skipped for i in range(len(chain))]
        with torch.no_grad():
            return model(input_ids=torch.tensor([chain]), position_ids=torch.tensor([positions])).logits[0, -1]

    for b, (chain, (head, skipped)) in enumerate(zip(chains, gaps)):
        torch.testing.assert_close(logits[b], expected(chain, head, skipped), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(more[b], expected(chain + [4 + b], head, skipped), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="counts"):
        state.skip_positions([1, -1, 0])


def test_rows_fed_apart_decode_on_as_if_fed_in_the_batch(model: torch.nn.Module) -> None:
    """``feed_rows_apart``: prompts fed one row at a time into empty rows of a batch (one row already holding
    tokens), then the rows' last tokens batched, give the logits of a plain forward of each whole chain, and
    decoding goes on from there."""
    from cast_core.forward import feed_chain, feed_rows_apart

    gen = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    chains = [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in (3, 17, 6, 11)]
    state = KVState(model.config.num_hidden_layers, 4)
    feed_chain(model, state, [chains[0][:2], [], [], []], want_last=False)  # row 0 holds 2 tokens; the rest nothing
    feed_rows_apart(model, state, {1: chains[1][:-1], 3: chains[3][:-1]})
    assert state.next_pos.tolist() == [2, 16, 0, 10]
    last = feed_chain(model, state, [chains[0][2:], chains[1][-1:], chains[2], chains[3][-1:]], want_last=True)
    more = feed_chain(model, state, [[4], [5], [6], [7]], want_last=True)
    for b, chain in enumerate(chains):
        torch.testing.assert_close(last[b], full_logits(model, chain), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(more[b], full_logits(model, chain + [4 + b]), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="only rows that hold nothing"):
        feed_rows_apart(model, state, {0: [3, 4]})


def test_rows_fed_apart_fill_a_state_no_forward_has_touched(model: torch.nn.Module) -> None:
    from cast_core.forward import feed_chain, feed_rows_apart

    chains = [[5, 6, 7, 8, 9], [10, 11]]
    state = KVState(model.config.num_hidden_layers, 2)
    feed_rows_apart(model, state, {0: chains[0][:-1]})
    last = feed_chain(model, state, [chains[0][-1:], chains[1]], want_last=True)
    for b, chain in enumerate(chains):
        torch.testing.assert_close(last[b], full_logits(model, chain), rtol=1e-9, atol=1e-9)
