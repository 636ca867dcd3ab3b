"""``cast bench run`` with CAST's speedup gate traced (run from the repository root)::

    RAY_AUTH_MODE=disabled PYTHONPATH=. python bench/results/b16/bench_trace.py run <cast bench run arguments>

Runs ``cast bench`` with its arguments unchanged (so the warm-up, the interleaving and the result file are
those of the benchmark itself) and prints, with seconds since start, every step the gate lets draft
(``sd B -> True``: whether the batch size's record was new, its ``rho``, judged row steps, thinned or
closed) and every judged drafted step (``obs``: its tokens ``n`` from the rows with the most tokens left,
its cost ``C`` in plain steps, whether ``C`` is on the profile's basis, the record's ``rho`` and standard
error, judged rows, closed, skip countdown and backoff, the thinning loss ``L`` against the time ``E``, and
the batch size's recent plain-step scales ``t / t_ref``).
"""

import argparse
import sys
import time

from bench.cli import register_cli
from cast_core.gate import DraftGate

START = time.time()
_observe, _should_draft = DraftGate.observe, DraftGate.should_draft


def _traced_observe(self: DraftGate, b: int, tokens: float, cost: float, on_profile: bool = False) -> None:
    thinned = b in self._by_batch and self._by_batch[b].thinned
    _observe(self, b, tokens, cost, on_profile)
    g = self._by_batch[b]
    print(
        f"{time.time() - START:7.1f} obs B={b} n={tokens:.2f} C={cost:.2f} prof={on_profile} thinned={thinned} "
        f"rho={g.tokens / g.cost:.3f} se={g.tokens_spread() / g.cost:.3f} judged={g.judged} closed={self._closed(g)} "
        f"skip={g.skip_left} backoff={g.backoff} L={self._thin_loss:.2f} E={self._elapsed:.1f} "
        f"scales={[round(x, 2) for x in g.plain_scales]}",
        flush=True,
    )


def _traced_should_draft(self: DraftGate, b: int) -> bool:
    new = b not in self._by_batch
    drafts = _should_draft(self, b)
    if drafts:
        g = self._by_batch[b]
        rho = g.tokens / g.cost if g.cost else None
        print(
            f"{time.time() - START:7.1f} sd B={b} -> True (new={new}) rho={rho} judged={g.judged} thinned={g.thinned} "
            f"closed={self._closed(g)}",
            flush=True,
        )
    return drafts


def main(argv: list[str]) -> int:
    DraftGate.observe, DraftGate.should_draft = _traced_observe, _traced_should_draft
    parser = argparse.ArgumentParser(prog="bench_trace.py")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
