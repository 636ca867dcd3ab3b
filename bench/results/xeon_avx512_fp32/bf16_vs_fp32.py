"""bf16 against fp32 on this CPU: one MLP-sized matmul at 1, 16 and 128 rows, and the target's one-token forward
at B=1 and B=16 over a 128-token cache (median of 5 after 2 warm-ups, 2 torch threads)::

    RAY_AUTH_MODE=disabled PYTHONPATH=. .venv/bin/python bench/results/xeon_avx512_fp32/bf16_vs_fp32.py

Prints the machine's device kind, what ``dtype="auto"`` resolves to there, and one line per measurement.
"""

import statistics
import time
from collections.abc import Callable

import torch

from cast_core.cost import device_name, native_dtype
from cast_core.kv import KVState
from cast_core.models import load_model, resolve_model
from cast_core.profiler import batch_state, forward_block

REPEATS, WARMUP = 5, 2


def median_ms(fn: Callable[[], object]) -> float:
    """Median wall time of ``fn()`` in ms over ``REPEATS`` calls after ``WARMUP``."""
    times = []
    for i in range(WARMUP + REPEATS):
        start = time.perf_counter()
        fn()
        if i >= WARMUP:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    kind = device_name("cpu")
    print(f"device kind {kind}; dtype auto -> {native_dtype(kind)}")
    for rows in (1, 16, 128):
        line = []
        for dtype in (torch.float32, torch.bfloat16):
            x, w = torch.randn(rows, 1536, dtype=dtype), torch.randn(8960, 1536, dtype=dtype)
            line.append(f"{str(dtype)[6:]} {median_ms(lambda: x @ w.T):7.1f} ms")
        print(f"matmul {rows:3d} x 1536 by 1536 x 8960: " + ", ".join(line))
    path = resolve_model("qwen2.5-coder-1.5b-instruct")
    for dtype in ("float32", "bfloat16"):
        model = load_model(path, dtype)
        for batch in (1, 16):
            state: KVState = batch_state(model, list(range(100, 228)), batch, torch.device("cpu"))
            ids = torch.randint(1000, (batch, 1))

            def step(model: torch.nn.Module = model, state: KVState = state, ids: torch.Tensor = ids) -> None:
                forward_block(model, state, ids)
                state.discard_tail()

            with torch.no_grad():
                print(f"target one-token forward {dtype:8s} B={batch:2d}: {median_ms(step):7.1f} ms")
        del model


if __name__ == "__main__":
    main()
