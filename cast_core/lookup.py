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

from collections.abc import Iterable


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
        if length < 1:
            return []
        for n in range(min(self.max_ngram, len(self.tokens)), 0, -1):
            start = self._next.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start : start + length]
        return []
