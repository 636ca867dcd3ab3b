"""``bench.serving`` on the tiny pair: HTTP vs in-process at concurrency 1 and 2, JSON shape, equal outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.serving import ServingBenchConfig, load_serving, run_serving_benchmark, save_serving, serving_table
from serve_utils import save_tiny_models

pytestmark = [pytest.mark.serve, pytest.mark.timeout(300)]


def test_serving_benchmark_on_tiny_models(tmp_path: Path) -> None:
    target, drafter = save_tiny_models(tmp_path / "models")
    config = ServingBenchConfig(
        name="serving-tiny",
        target=str(target),
        drafter=str(drafter),
        dtype="float32",
        prompts=2,
        max_new_tokens=12,
        warmup_tokens=2,
        concurrency=[1, 2],
        torch_threads=1,
        app_overrides={"telemetry": {"tracing_exporter": "none"}},
    )
    prompts = [("p0", "t5 t7 t9 t11"), ("p1", "t20 t21 t60 t33 t8")]
    result = run_serving_benchmark(config, prompts)
    path = save_serving(result, tmp_path / "results")
    assert load_serving(path) == result
    assert set(json.loads(path.read_text())) == {"config", "machine", "levels"}
    assert [lv.concurrency for lv in result.levels] == [1, 2]
    for lv in result.levels:
        assert lv.outputs_match, lv.mismatched_prompts
        assert lv.requests == 2 and lv.http_tokens == lv.inprocess_tokens > 0
        assert lv.http_tokens_per_s > 0 and lv.inprocess_tokens_per_s > 0
        assert lv.ratio == pytest.approx(lv.http_tokens_per_s / lv.inprocess_tokens_per_s)
        b = lv.breakdown
        assert b is not None and b.steps > 0 and b.session_open_s > 0
        assert b.router_step_s >= b.draft_compute_s + b.verify_compute_s > 0
        assert b.verify_batch is not None and 1 <= b.verify_batch <= lv.concurrency
        assert b.draft_batch is not None and 1 <= b.draft_batch <= lv.concurrency
        assert b.router_step_s == pytest.approx(
            b.session_open_s + b.draft_compute_s + b.verify_compute_s + b.drafter_queue_s + b.verifier_queue_s + b.planner_s + b.handles_and_transfer_s
        )
    for key in ("cpu_model", "usable_cpus", "torch_threads", "dtype"):
        assert key in result.machine
    table = serving_table(result)
    print(table)
    assert table.count("\n| ") == 2 and "HTTP tok/s" in table
