"""``cast serve`` as a user runs it: a subprocess that prints its endpoints, serves, stops on Ctrl-C."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve_utils import free_port, reference_engine, save_tiny_models

pytestmark = [pytest.mark.serve, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]


def test_cast_serve_prints_endpoints_serves_and_stops(tmp_path: Path) -> None:
    target, drafter = save_tiny_models(tmp_path)
    http_port, grpc_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "services.cli", "serve",
        "--target", str(target), "--drafter", str(drafter), "--dtype", "float32",
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--num-cpus", "4", "--torch-threads", "1",
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_AUTH_MODE", None)  # cast serve sets it itself
    # started with SIGINT ignored, as a shell starts a background job: Ctrl-C must stop it all the same
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    output: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while not any("Ctrl-C stops the server" in line for line in output):
            assert proc.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "".join(output)
            try:
                output.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        text = "".join(output)
        assert f"http://127.0.0.1:{http_port}/v1" in text and f"127.0.0.1:{grpc_port}" in text
        assert "curl" in text and "examples/grpc_client.py" in text

        expected = reference_engine(target, drafter).generate(["t5 t7 t9"], max_new_tokens=12)[0].text
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json={"prompt": "t5 t7 t9", "max_tokens": 12}, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
        client = subprocess.run(
            [sys.executable, "examples/grpc_client.py", "--server", f"127.0.0.1:{grpc_port}", "--prompt", "t5 t7 t9", "--max-tokens", "12", "--stream"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        assert client.stdout == expected and "finish=" in client.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            while not lines.empty():
                output.append(lines.get())
            raise AssertionError("cast serve did not stop within 60 s of Ctrl-C; its output:\n" + "".join(output)) from None
    assert proc.returncode == 0
