"""Context lookup: a sequence's own earlier tokens as a draft of what follows.

Code and answers repeat their context: identifiers, docstring phrases, whole
lines. If the last ``n`` tokens of a sequence occurred earlier in it, the
tokens that followed them there are a guess at what follows now, found
without a model forward (prompt-lookup decoding). The drafter feeds such a
guess after the root in the catch-up forward it runs anyway, so the drafter
prices every token of it (``v``) at the cost of a few more tokens in one
forward instead of one forward per layer (:mod:`cast_core.drafter`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence


class ContextIndex:
    """One sequence's tokens with, per n-gram (``n <= max_ngram``), where its most recent continuation starts.

    ``continuation(L)``: for the longest suffix ``s`` of the tokens (``n = max_ngram .. 1``)
    that occurred before, the (up to ``L``) tokens that followed its most recent earlier
    occurrence. Appending a token costs ``max_ngram`` dictionary writes.
    """

    def __init__(self, max_ngram: int = 3) -> None:
        """Raises ValueError naming ``max_ngram`` if it is below 1."""
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1; got {max_ngram}")
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append ``tokens``; each becomes the continuation of the n-grams that end just before it."""
        for token in tokens:
            i = len(self.tokens)
            self.tokens.append(int(token))
            for n in range(1, min(self.max_ngram, i) + 1):
                self._next[tuple(self.tokens[i - n : i])] = i

    def continuation(self, length: int) -> list[int]:
        """Up to ``length`` tokens that followed the latest earlier occurrence of the longest repeated suffix ([] if none)."""
        return self.lookup(length)[0]

    def lookup(self, length: int) -> tuple[list[int], int]:
        """``(continuation(length), n)``: the continuation and the length ``n`` of the suffix it matched (0: none)."""
        if length < 1:
            return [], 0
        for n in range(min(self.max_ngram, len(self.tokens)), 0, -1):
            start = self._next.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start : start + length], n
        return [], 0


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def lookup_gain(accepted: Sequence[int], lookup: Sequence[int], covered: int) -> int:
    """Accepted tokens that only a lookup grafted onto a drafted tree offered: ``max(0, L - d)``.

    ``L`` is the length of the common prefix of the step's accepted drafts and the lookup, ``d``
    (``covered``) the depth the drafted tree already reached along the lookup's path, below which
    the lookup's tokens were grafted on as new nodes.
    """
    return max(0, common_prefix_length(accepted, lookup) - covered)


class LookupAcceptance:
    """How far drafter-free lookups were accepted, by the length ``n`` of the suffix they matched.

    ``P_n(a >= j)``, the chance that a lookup's first ``j`` tokens are all accepted, is estimated
    from the lookups of at least ``j`` tokens verified so far, with a prior of ``PRIOR_WEIGHT``
    lookups accepted with chance ``PRIOR_P ** j`` (optimistic enough that a new server tries them)::

        P_n(a >= j) = (hits_n[j] + PRIOR_WEIGHT * PRIOR_P ** j) / (trials_n[j] + PRIOR_WEIGHT)
        E_n(L)      = sum_{j=1..L} P_n(a >= j)      # expected accepted tokens of an L-token lookup
    """

    PRIOR_WEIGHT = 1.0
    PRIOR_P = 0.7

    def __init__(self, max_ngram: int, max_tokens: int) -> None:
        self._hits = [[0.0] * max_tokens for _ in range(max_ngram + 1)]
        self._trials = [[0.0] * max_tokens for _ in range(max_ngram + 1)]

    def chance(self, n: int, j: int) -> float:
        """``P_n(a >= j)`` for ``j >= 1``."""
        prior = self.PRIOR_WEIGHT * self.PRIOR_P**j
        return (self._hits[n][j - 1] + prior) / (self._trials[n][j - 1] + self.PRIOR_WEIGHT)

    def expected(self, n: int, length: int) -> float:
        """``E_n(L)`` for ``L = length``."""
        return self.expected_curve(n, length)[length]

    def expected_curve(self, n: int, length: int) -> list[float]:
        """``[E_n(0), E_n(1), .., E_n(length)]`` (cumulative sums of ``P_n(a >= j)``)."""
        return list(itertools.accumulate((self.chance(n, j) for j in range(1, length + 1)), initial=0.0))

    def observe(self, n: int, length: int, accepted: int) -> None:
        """Record a verified lookup of ``length`` tokens (matched suffix ``n``) whose first ``accepted`` were accepted."""
        for j in range(length):
            self._trials[n][j] += 1
            self._hits[n][j] += j < accepted
