"""Measure a :class:`~cast_core.cost.CostProfile` on the local device (``cast profile``).

For each model role and every grid point ``(B, ctx, n)`` the profiler times the
forward CAST actually runs: ``n`` new tokens per sequence for ``B`` sequences on
top of a ``ctx``-token KV cache, with

* the engine's own forward path: :class:`~cast_core.kv.KVState` (preallocated,
  in-place cache) and :func:`~cast_core.forward.forward_logits`, with a mask of the
  cached prefix plus a causal block among the new tokens -- a tree mask of ``n``
  nodes costs the same as a causal block of ``n`` (same shapes, same kernels);
* explicit ``position_ids = ctx + arange(n)``; logits for all ``n`` tokens (the
  verifier scores every tree node, the drafter every frontier node), the drafter's
  over its core draft vocabulary (``--draft-vocab``, :mod:`cast_core.vocab`), as it drafts.

The KV cache of one context bucket is built by a batch-1 prefill of random tokens
and copied along the batch (KV *values* do not change the cost of dense kernels).
After each timed forward ``discard_tail()`` restores the context, so every repeat
sees exactly ``ctx`` cached tokens. For one ``(B, ctx)`` the token counts and the two models
are timed round-robin (``warmup`` untimed rounds, then ``repeats`` timed ones), so a slow spell
of a shared machine hits every n and both models alike (timed table after table, minutes apart,
the drafter's forward on the 2-core Intel Xeon with AMX read 0.44-0.50 of a target step at B=1
where decoding paid 0.39), and each point records the median of its ``repeats`` timings: the cost a
decoding step pays (some kernels, such as a CPU's one-token matrix-vector path, are fast only
some of the time, which a minimum would hide). On CUDA the device is synchronised before the
clock is read.

Runtime: the default grid (B in 1,2,4,8 x ctx in 128,512,1024 x n in
1,2,4,8,16,24,32,48,64; 5 repeats + 2 warmups = 7 forwards per point, 1512 forwards)
for Qwen2.5-1.5B + 0.5B in bfloat16 on this project's 2-core CPU is estimated at
12-20 minutes, from DESIGN.md's measurements (batch 1: 134 ms for n <= 4, 340 ms
for n = 64; batch 8 x 64 tokens: 4.7 s) and the drafter at about a third of the
target. ``--repeats 3 --warmup 1`` roughly halves it; on a GPU it takes seconds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from cast_core.cost import CostProfile, CostTable, device_name, dtype_name, resolve_dtype_name, usable_device_name, user_profiles_dir
from cast_core.forward import forward_logits, prefill_prompts
from cast_core.kv import KVState
from cast_core.models import add_dtype_arg, load_drafter, load_model, resolve_model
from cast_core.packing import is_packed
from cast_core.quantize import add_quantization_arg, drafter_profile_name
from cast_core.vocab import DEFAULT_CORE_SIZE, DraftHead, DraftVocab

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8)
DEFAULT_CONTEXT_BUCKETS: tuple[int, ...] = (128, 512, 1024)
DEFAULT_TOKEN_COUNTS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64)

_DESCRIPTION = (
    "Measure the target and drafter forward latency f(B, ctx, n) on this device over a grid of batch sizes, "
    "KV-cache lengths and new-token counts, and write the cost profile JSON that CAST's policy reads."
)
_SEED = 0  # random token ids of the prefill and timed forwards (values do not affect cost)


def causal_block(batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    """``[batch, tokens, tokens]`` bool: causal visibility among the new tokens."""
    return torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril().expand(batch, tokens, tokens)


def batch_state(model: PreTrainedModel, prompt: list[int], batch: int, device: torch.device) -> KVState:
    """A ``batch``-row :class:`~cast_core.kv.KVState` holding ``prompt`` in every row
    (one batch-1 prefill, rows copied with :meth:`~cast_core.kv.KVState.extend`)."""
    layers = model.config.num_hidden_layers
    one = KVState(layers, 1, device)
    prefill_prompts(model, one, [prompt + [0]])
    state = KVState(layers, 0, device)
    for _ in range(batch):
        state.extend(copy.deepcopy(one))
    return state


def forward_block(model: PreTrainedModel, state: KVState, input_ids: torch.Tensor, head: DraftHead | None = None) -> torch.Tensor:
    """The profiled forward: ``input_ids`` ``[B, n]`` after the cached context, causal
    among themselves, ``position_ids = next_pos + arange(n)``, logits for all ``n``
    tokens (the engine's own :func:`~cast_core.forward.forward_logits`; over ``head``'s ids
    if given). The new slots stay in the tail; the caller drops them with ``discard_tail()``."""
    batch, tokens = input_ids.shape
    positions = state.next_pos[:, None] + torch.arange(tokens, device=input_ids.device)[None, :]
    logits = forward_logits(model, state, input_ids, positions, causal_block(batch, tokens, input_ids.device), head=head)
    assert logits is not None
    return logits


def _model_dtype(model: PreTrainedModel) -> torch.dtype:
    """Dtype of the model's first floating-point parameter."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _measure_tables(
    models: Sequence[tuple[str, PreTrainedModel, DraftHead | None]],
    device: torch.device,
    batch_sizes: Sequence[int],
    context_buckets: Sequence[int],
    token_counts: Sequence[int],
    repeats: int,
    warmup: int,
    bar: tqdm,
) -> list[CostTable]:
    """Forward seconds of each ``(name, model, head)`` on the whole grid (module docstring for the method),
    one table per model; ``head``: the output head it scores with (None: its whole vocabulary).

    Per ``(context, batch)`` cell the models take turns within every round, so the ratios the policy prices
    (a drafter forward over a target step) come from one state of the machine."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generators = [torch.Generator().manual_seed(_SEED) for _ in models]
    seconds = [[[[0.0] * len(token_counts) for _ in context_buckets] for _ in batch_sizes] for _ in models]

    for c, context in enumerate(context_buckets):
        prompts = [torch.randint(model.config.vocab_size, (context,), generator=gen).tolist() for (_, model, _), gen in zip(models, generators)]
        for b, batch in enumerate(batch_sizes):
            states = [batch_state(model, prompt, batch, device) for (_, model, _), prompt in zip(models, prompts)]
            ids = [
                [torch.randint(model.config.vocab_size, (batch, tokens), generator=gen).to(device) for tokens in token_counts]
                for (_, model, _), gen in zip(models, generators)
            ]
            timings = [[[] for _ in token_counts] for _ in models]
            for i in range(warmup + repeats):  # round-robin over n and the models: a slow spell hits all alike
                for k, tokens in enumerate(token_counts):
                    for m, (name, model, head) in enumerate(models):
                        bar.set_postfix_str(f"{name} B={batch} ctx={context} n={tokens}", refresh=False)
                        sync()
                        start = time.perf_counter()
                        forward_block(model, states[m], ids[m][k], head)
                        sync()
                        if i >= warmup:
                            timings[m][k].append(time.perf_counter() - start)
                        states[m].discard_tail()
            for m in range(len(models)):
                for k in range(len(token_counts)):
                    seconds[m][b][c][k] = statistics.median(timings[m][k])
                    bar.update()
            del states
    return [
        CostTable(
            model=name,
            batch_sizes=list(batch_sizes),
            context_buckets=list(context_buckets),
            token_counts=list(token_counts),
            seconds=table,
        )
        for (name, _, _), table in zip(models, seconds)
    ]


def measure_profile(
    target_model: PreTrainedModel,
    drafter_model: PreTrainedModel,
    target_name: str,
    drafter_name: str,
    device: str | torch.device,
    dtype: str | torch.dtype,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    context_buckets: Sequence[int] = DEFAULT_CONTEXT_BUCKETS,
    token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
    repeats: int = 5,
    warmup: int = 2,
    progress: bool = True,
    draft_vocab: int | None = DEFAULT_CORE_SIZE,
) -> CostProfile:
    """Time both models on the grid ``batch_sizes x context_buckets x token_counts`` and
    return the profile (keyed by :func:`~cast_core.cost.device_name` of ``device``).

    The models must already be loaded on ``device`` in ``dtype`` (checked for the dtype).
    Grid axes are sorted and de-duplicated. ``seconds[b][c][k]`` is the median of
    ``repeats`` timed forwards after ``warmup`` untimed ones, stored raw (lookups price
    padding, :mod:`cast_core.cost`). ``progress`` shows a tqdm bar over all points.
    The drafter scores the first ``draft_vocab`` ids of the target's vocabulary (None: all of them), as
    :class:`~cast_core.drafter.Drafter` does with no rare context tokens.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    torch_device = torch.device(device)
    for role, model in (("target", target_model), ("drafter", drafter_model)):
        model_dtype = dtype_name(_model_dtype(model))
        if model_dtype != dtype_name(dtype):
            raise ValueError(f"{role} model is {model_dtype}, profile dtype is {dtype_name(dtype)}")
    axes = [sorted(set(axis)) for axis in (batch_sizes, context_buckets, token_counts)]
    points = len(axes[0]) * len(axes[1]) * len(axes[2])
    started = time.perf_counter()
    draft_head = DraftVocab(drafter_model, target_model.config.vocab_size, draft_vocab).head()
    with torch.inference_mode(), tqdm(total=2 * points, desc="cast profile", unit="pt", disable=not progress) as bar:
        target_table, drafter_table = _measure_tables(
            [(target_name, target_model, None), (drafter_name, drafter_model, draft_head)],
            torch_device,
            *axes,
            repeats=repeats,
            warmup=warmup,
            bar=bar,
        )
    return CostProfile(
        device=device_name(torch_device),
        dtype=dtype_name(dtype),
        target=target_table,
        drafter=drafter_table,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        torch_threads=torch.get_num_threads(),
        notes={
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "attn_implementation": target_model.config._attn_implementation,
            "weight_packing": {"target": is_packed(target_model), "drafter": is_packed(drafter_model)},
            "cache": "cast_core.kv.KVState (the engine's own forward path)",
            "statistic": f"median of {repeats} after {warmup} warmup",
            "draft_vocab": len(draft_head.ids),
            "wall_s": round(time.perf_counter() - started, 1),
        },
    )


def _int_list(text: str) -> list[int]:
    """Parse ``"1,2,4"`` into ``[1, 2, 4]`` (argparse type)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``profile`` command's options."""
    parser.add_argument("--target", required=True, help="target model: known name or path (folder / .gguf)")
    parser.add_argument("--drafter", required=True, help="drafter model: known name or path (folder / .gguf)")
    add_dtype_arg(parser)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--batch-sizes", type=_int_list, default=list(DEFAULT_BATCH_SIZES), help="comma-separated (default: 1,2,4,8)"
    )
    parser.add_argument(
        "--contexts",
        type=_int_list,
        default=list(DEFAULT_CONTEXT_BUCKETS),
        help="comma-separated KV-cache lengths (default: 128,512,1024)",
    )
    parser.add_argument(
        "--tokens",
        type=_int_list,
        default=list(DEFAULT_TOKEN_COUNTS),
        help="comma-separated new-token counts (default: 1,2,4,8,16,24,32,48,64)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per point, median kept (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per point first (default: 2)")
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=DEFAULT_CORE_SIZE,
        help=f"leading token ids the drafter scores, as the engine's draft_vocab (default: {DEFAULT_CORE_SIZE}; 0: all)",
    )
    add_quantization_arg(parser)
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="time models built from each folder's config.json with random weights (a forward's cost "
        "depends on shapes, not values): profiles a device from the model configs alone, no weight files",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output JSON file, or an existing directory to write <slug>.json into "
        "(default: $CAST_CACHE_DIR/profiles/<slug>.json, where find_profile looks first)",
    )


def run_profile_command(args: argparse.Namespace) -> int:
    """Load (or build) both models, measure, write the JSON; exit status 0, or 2 on a bad model/dtype/device."""
    try:
        dtype = resolve_dtype_name(args.dtype, usable_device_name(args.device))
        target = load_model(resolve_model(args.target), dtype, args.device, args.random_weights)
        drafter, quantization = load_drafter(
            resolve_model(args.drafter), dtype, args.device, args.drafter_quantization, args.random_weights
        )
    except (ValueError, OSError) as err:  # OSError: a folder without weight files
        print(f"cast profile: error: {err}", file=sys.stderr)
        return 2
    profile = measure_profile(
        target,
        drafter,
        args.target,
        drafter_profile_name(args.drafter, quantization),
        args.device,
        dtype,
        batch_sizes=args.batch_sizes,
        context_buckets=args.contexts,
        token_counts=args.tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        draft_vocab=args.draft_vocab or None,
    )
    profile.notes["weights"] = "random, built from config.json" if args.random_weights else "loaded"
    if args.out is None:
        out = user_profiles_dir() / f"{profile.slug}.json"
    elif args.out.is_dir():
        out = args.out / f"{profile.slug}.json"
    else:
        out = args.out
    profile.save(out)
    print(f"wrote {out} ({profile.device}, {profile.dtype}, {profile.notes['wall_s']} s)")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``cast profile`` to a CLI's subparsers; the handler is ``args.func(args) -> int``."""
    parser = subparsers.add_parser(
        "profile",
        help="measure the target/drafter cost tables on this device",
        description=_DESCRIPTION,
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_profile_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cast_core.profiler ...``: the ``profile`` command without the ``cast`` CLI."""
    parser = argparse.ArgumentParser(prog="python -m cast_core.profiler", description=_DESCRIPTION)
    _add_arguments(parser)
    return run_profile_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
