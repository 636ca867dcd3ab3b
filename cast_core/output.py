"""A sequence's output: stop conditions and incremental detokenisation.

Tokens arrive in bursts (a step accepts several). ``OutputTracker.extend``
appends them one by one and stops at the first of:

* an end-of-sequence token (not emitted), finish reason ``"stop"``;
* ``max_new_tokens`` reached, finish reason ``"length"``;
* a stop string appearing in the text, finish reason ``"stop"``: the text is
  cut before it and the token that completed it is the last one kept.

Text is streamed as deltas of the decoded output. A delta is held back while
the text ends in an incomplete UTF-8 sequence (the tokenizer's replacement
character) or in a prefix of a stop string, so a client never receives text
that is later retracted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase


@dataclass
class OutputTracker:
    """Generated tokens and text of one sequence."""

    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _emitted: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def extend(self, tokens: list[int]) -> tuple[list[int], str]:
        """Append a step's tokens; returns ``(tokens kept, text delta now safe to emit)``."""
        kept: list[int] = []
        cut = False
        for tok in tokens:
            if self.finished:
                break
            if tok in self.eos_token_ids:
                self.finish_reason = "stop"
                break
            self.token_ids.append(tok)
            kept.append(tok)
            if self.stop and self._cut_at_stop():
                self.finish_reason, cut = "stop", True
                break
            if len(self.token_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
        if not cut:
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return kept, self._delta()

    def _cut_at_stop(self) -> bool:
        """Decode; if a stop string occurs, cut the text before the earliest one."""
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _delta(self) -> str:
        safe = len(self.text)
        if not self.finished:
            if self.text.endswith("\ufffd"):
                safe = len(self.text.rstrip("\ufffd"))
            for s in self.stop:
                for n in range(min(len(s) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(s[:n]):
                        safe -= n
                        break
        safe = max(safe, self._emitted)
        delta = self.text[self._emitted : safe]
        self._emitted = safe
        return delta
