"""CostTable / CostProfile: interpolation rules, monotonicity, JSON storage, lookup by slug."""

from __future__ import annotations

import itertools
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from cast_core.attention import GROUPED_SDPA
from cast_core.cost import (
    PACKAGED_PROFILES_DIR,
    CostProfile,
    CostTable,
    cpu_info,
    cpu_isa,
    device_name,
    find_profile,
    native_dtype,
    profile_slug,
    resolve_dtype_name,
    resolve_profile,
    usable_device_name,
    user_profiles_dir,
)

# Hand-made table: B in (1, 4), ctx in (100, 300), n in (1, 3, 7); increasing in n (no padding).
SECONDS = [
    [[1.0, 2.0, 4.0], [1.5, 3.0, 5.0]],  # B = 1
    [[2.0, 5.0, 6.0], [3.0, 6.0, 9.0]],  # B = 4
]


def make_table(seconds: list = SECONDS, model: str = "m") -> CostTable:
    return CostTable(
        model=model, batch_sizes=[1, 4], context_buckets=[100, 300], token_counts=[1, 3, 7], seconds=seconds
    )


def make_profile(**overrides: object) -> CostProfile:
    fields = dict(
        device="cpu-2core-Test CPU",
        dtype="bfloat16",
        target=make_table(model="Org/Target-1.5B"),
        drafter=make_table([[[x / 10 for x in row] for row in plane] for plane in SECONDS], model="Org/Drafter-0.5B"),
        measured_at="2026-01-01T00:00:00+00:00",
        torch_threads=2,
        notes={"source": "test"},
    )
    fields.update(overrides)
    return CostProfile(**fields)


@pytest.fixture
def profile() -> CostProfile:
    return make_profile()


# --- interpolation -----------------------------------------------------------------------


def test_exact_at_grid_points(profile: CostProfile) -> None:
    for (b, batch), (c, ctx), (k, n) in itertools.product(
        enumerate([1, 4]), enumerate([100, 300]), enumerate([1, 3, 7])
    ):
        assert profile.latency("target", batch, ctx, n) == pytest.approx(SECONDS[b][c][k])
        assert profile.latency("drafter", batch, ctx, n) == pytest.approx(SECONDS[b][c][k] / 10)


def test_linear_between_points_on_each_axis(profile: CostProfile) -> None:
    # tokens: n = 5 halfway between 3 and 7
    assert profile.latency("target", 1, 100, 5) == pytest.approx((2.0 + 4.0) / 2)
    # tokens: n = 2 halfway between 1 and 3
    assert profile.latency("target", 4, 300, 2) == pytest.approx((3.0 + 6.0) / 2)
    # context: 150 is a quarter of the way from 100 to 300
    assert profile.latency("target", 1, 150, 3) == pytest.approx(0.75 * 2.0 + 0.25 * 3.0)
    # batch: B = 2 is a third of the way from 1 to 4
    assert profile.latency("target", 2, 100, 7) == pytest.approx(2 / 3 * 4.0 + 1 / 3 * 6.0)


def test_trilinear_at_cell_centre(profile: CostProfile) -> None:
    # B = 2.5, ctx = 200, n = 2 is the centre of the cell B in [1, 4], ctx in [100, 300], n in [1, 3]
    corners = [SECONDS[b][c][k] for b in (0, 1) for c in (0, 1) for k in (0, 1)]
    assert profile.latency("target", 2.5, 200, 2) == pytest.approx(sum(corners) / 8)


def test_context_is_clamped_to_the_buckets(profile: CostProfile) -> None:
    assert profile.latency("target", 1, 1, 3) == pytest.approx(2.0)
    assert profile.latency("target", 1, 99, 3) == pytest.approx(2.0)
    assert profile.latency("target", 1, 10_000, 3) == pytest.approx(3.0)
    assert profile.latency("target", 4, 301, 7) == pytest.approx(9.0)


def test_tokens_extrapolate_with_the_slope_over_the_upper_half_of_the_counts(profile: CostProfile) -> None:
    # B = 1, ctx = 100: from 3 (the first count >= 7 / 2) to 7 rises 2.0 over 4 tokens: slope 0.5 s/token
    assert profile.latency("target", 1, 100, 11) == pytest.approx(4.0 + 4 * 0.5)
    assert profile.latency("target", 1, 100, 8) == pytest.approx(4.5)
    # the 2-core AMD EPYC's int8 drafter at B=8: a flat last segment (48 -> 64) does not set the slope, 32 -> 64 does
    table = CostTable(
        model="m", batch_sizes=[8], context_buckets=[512], token_counts=[1, 16, 32, 48, 64], seconds=[[[0.043, 0.257, 0.491, 0.862, 0.925]]]
    )
    assert table.latency(8, 512, 186) == pytest.approx(0.925 + 122 * (0.925 - 0.491) / 32)


def test_tokens_below_first_count_and_zero() -> None:
    table = CostTable(model="m", batch_sizes=[1], context_buckets=[64], token_counts=[4, 8], seconds=[[[2.0, 3.0]]])
    assert table.latency(1, 64, 1) == pytest.approx(2.0)  # clamped to the first measured count
    assert table.latency(1, 64, 0) == 0.0
    assert table.latency(1, 64, -3) == 0.0


def test_single_point_axes_are_constant() -> None:
    table = CostTable(model="m", batch_sizes=[2], context_buckets=[64], token_counts=[8], seconds=[[[0.5]]])
    for batch, ctx, n in itertools.product((1, 2, 9), (1, 64, 999), (1, 8, 100)):
        assert table.latency(batch, ctx, n) == pytest.approx(0.5)


def test_batch_extrapolates_with_last_segment_slope(profile: CostProfile) -> None:
    # ctx = 100, n = 1: B 1 -> 4 rises 1.0 over 3 sequences
    assert profile.latency("target", 10, 100, 1) == pytest.approx(2.0 + 6 * (1.0 / 3))
    assert profile.latency("target", 1, 100, 1) == pytest.approx(1.0)
    assert profile.latency("target", 0, 100, 1) == pytest.approx(1.0)  # below the first size: clamped


def test_batch_extrapolation_never_below_last_value() -> None:
    # Timings fall from B = 1 to B = 2 (noise): extrapolation stays at the B = 2 value.
    table = CostTable(
        model="m", batch_sizes=[1, 2], context_buckets=[64], token_counts=[1, 2], seconds=[[[3.0, 4.0]], [[2.0, 2.5]]]
    )
    assert table.latency(2, 64, 1) == pytest.approx(2.0)
    assert table.latency(50, 64, 1) == pytest.approx(2.0)
    assert table.latency(50, 64, 2) == pytest.approx(2.5)


def test_batch_extrapolation_is_priced_with_padding() -> None:
    # Raw per-sequence slopes over n are [1.0, 0.1]: at B = 3 the raw row is [3.0, 2.2], so one token
    # is padded to two and costs 2.2.
    table = CostTable(
        model="m", batch_sizes=[1, 2], context_buckets=[64], token_counts=[1, 2], seconds=[[[1.0, 2.0]], [[2.0, 2.1]]]
    )
    assert table.latency(3, 64, 1) == pytest.approx(2.2)
    assert table.latency(3, 64, 2) == pytest.approx(2.2)
    assert table.padded_tokens(3, 64, 1) == 2
    assert table.padded_tokens(1, 64, 1) == 1
    curve = table.latency_curve(40, 64, 10)
    assert np.all(np.diff(curve) >= 0)


# --- padding, monotonicity and validation ---------------------------------------------------


def test_lookups_price_the_cheapest_padded_count() -> None:
    raw = [[[3.0, 2.0, 2.5, 2.4, 4.0]]]  # one token slower than two; 4 tokens slower than 8
    table = CostTable(model="m", batch_sizes=[1], context_buckets=[64], token_counts=[1, 2, 4, 8, 16], seconds=raw)
    assert table.seconds == raw  # stored raw
    assert [table.padded_tokens(1, 64, n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [2, 2, 3, 8, 8, 8, 9, 16, 17]
    assert table.latency(1, 64, 1) == pytest.approx(2.0)
    assert table.latency(1, 64, 3) == pytest.approx(2.25)  # interpolated between 2 and 4 tokens
    assert table.latency(1, 64, 5) == pytest.approx(2.4)  # raw 2.475, but 8 tokens cost 2.4
    assert table.latency(1, 64, 2) == pytest.approx(2.0)
    assert table.latency(1, 64, 12) == pytest.approx(3.2)  # between 8 and 16, nothing larger is cheaper
    values = [table.latency(1, 64, n) for n in range(0, 40)]
    assert values == sorted(values)
    curve = table.latency_curve(1, 64, 39)
    assert curve.tolist() == pytest.approx(values)


def test_padding_ties_keep_the_smaller_count() -> None:
    table = CostTable(model="m", batch_sizes=[1], context_buckets=[64], token_counts=[1, 2, 4], seconds=[[[2.0, 2.0, 2.0]]])
    assert [table.padded_tokens(1, 64, n) for n in (1, 2, 3, 4)] == [1, 2, 3, 4]


def test_raw_timings_survive_json_round_trip(tmp_path: Path) -> None:
    data = make_profile().model_dump()
    data["target"]["seconds"][0][0] = [5.0, 1.0, 2.0]  # raw timings as a file may hold them
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    loaded = CostProfile.load(path)
    assert loaded.target.seconds[0][0] == [5.0, 1.0, 2.0]
    assert loaded.latency("target", 1, 100, 1) == pytest.approx(1.0)
    assert loaded.target.padded_tokens(1, 100, 1) == 3


@pytest.mark.parametrize(
    "change",
    [
        {"batch_sizes": [4, 1]},
        {"batch_sizes": [1, 1]},
        {"context_buckets": [0, 300]},
        {"token_counts": [1, 3, -7]},
        {"token_counts": []},
        {"seconds": SECONDS[:1]},
        {"seconds": [[[1.0, 2.0], [1.5, 3.0]], [[2.0, 5.0], [3.0, 6.0]]]},
        {"seconds": [[[1.0, 2.0, 4.0], [1.5, 3.0, 5.0]], [[0.0, 5.0, 6.0], [3.0, 6.0, 9.0]]]},
        {"seconds": [[[1.0, 2.0, float("nan")], [1.5, 3.0, 5.0]], [[2.0, 5.0, 6.0], [3.0, 6.0, 9.0]]]},
    ],
)
def test_invalid_tables_are_rejected(change: dict) -> None:
    fields = make_table().model_dump() | change
    with pytest.raises(pydantic.ValidationError):
        CostTable(**fields)


def test_unknown_role_raises(profile: CostProfile) -> None:
    with pytest.raises(KeyError):
        profile.latency("verifier", 1, 100, 1)  # type: ignore[arg-type]


def test_dtype_is_canonical() -> None:
    assert make_profile(dtype="torch.bfloat16").dtype == "bfloat16"


# --- latency_curve ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "ctx"), [(1, 100), (2, 150), (4, 300), (3, 1000), (7, 50), (16, 220)]
)
def test_latency_curve_matches_latency(profile: CostProfile, batch: int, ctx: int) -> None:
    for role in ("target", "drafter"):
        curve = profile.latency_curve(role, batch, ctx, 20)
        assert curve.shape == (21,)
        assert curve[0] == 0.0
        expected = [profile.latency(role, batch, ctx, n) for n in range(21)]
        np.testing.assert_allclose(curve, expected, rtol=1e-12, atol=1e-12)
        assert np.all(np.diff(curve) >= 0)


def test_latency_curve_zero_tokens(profile: CostProfile) -> None:
    np.testing.assert_array_equal(profile.latency_curve("target", 1, 100, 0), [0.0])
    with pytest.raises(ValueError, match="max_tokens"):
        profile.latency_curve("target", 1, 100, -1)


# --- synthetic model -----------------------------------------------------------------------


def test_synthetic_affine_formula_everywhere() -> None:
    p = CostProfile.synthetic(0.1, 0.002, 0.03, 0.0005, token_counts=(1, 4, 16), batch_sizes=(1, 8))
    assert p.notes["synthetic"] is True
    for batch, ctx, n in itertools.product((1, 2, 5, 8, 13, 64), (1, 128, 700, 5000), (1, 3, 16, 17, 100)):
        assert p.latency("target", batch, ctx, n) == pytest.approx(0.1 + 0.002 * batch * n)
        assert p.latency("drafter", batch, ctx, n) == pytest.approx(0.03 + 0.0005 * batch * n)
    np.testing.assert_allclose(
        p.latency_curve("target", 3, 256, 40), [0.0] + [0.1 + 0.002 * 3 * n for n in range(1, 41)], rtol=1e-12
    )


def test_synthetic_linear_cost_has_no_base() -> None:
    p = CostProfile.synthetic(0.0, 1.0, 0.0, 0.25)
    assert p.latency("target", 2, 512, 5) == pytest.approx(10.0)
    assert p.latency("drafter", 1, 512, 8) == pytest.approx(2.0)


# --- storage and lookup --------------------------------------------------------------------


def test_json_round_trip(tmp_path: Path, profile: CostProfile) -> None:
    path = profile.save(tmp_path / "sub" / "profile.json")
    loaded = CostProfile.load(path)
    assert loaded == profile
    for args in [(1, 100, 1), (3, 222, 5), (9, 400, 12)]:
        assert loaded.latency("target", *args) == profile.latency("target", *args)


def test_profile_slug() -> None:
    slug = profile_slug(
        "NVIDIA H100 80GB HBM3", "Qwen/Qwen2.5-1.5B-Instruct", "/models/Qwen2.5-0.5B-Instruct/", "bfloat16"
    )
    assert slug == "nvidia-h100-80gb-hbm3__qwen2-5-1-5b-instruct__qwen2-5-0-5b-instruct__bfloat16"
    assert profile_slug("cpu-2core-X", "a", "b", torch.float32) == "cpu-2core-x__a__b__float32"


def test_find_profile_by_slug(tmp_path: Path, profile: CostProfile) -> None:
    profile.save(tmp_path / f"{profile.slug}.json")
    found = find_profile("cpu-2core-Test CPU", "/local/Target-1.5B", "Org/Drafter-0.5B", "bfloat16", [tmp_path])
    assert found == profile
    assert find_profile("cpu-2core-Test CPU", "Org/Target-1.5B", "Org/Drafter-0.5B", "float32", [tmp_path]) is None
    assert find_profile("NVIDIA H100", "Org/Target-1.5B", "Org/Drafter-0.5B", "bfloat16", [tmp_path]) is None


def test_find_profile_search_order(tmp_path: Path, profile: CostProfile) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    profile.save(second / f"{profile.slug}.json")
    other = make_profile(notes={"source": "first"})
    other.save(first / f"{other.slug}.json")
    found = find_profile(profile.device, "Org/Target-1.5B", "Org/Drafter-0.5B", "bfloat16", [first, second])
    assert found is not None and found.notes == {"source": "first"}


@pytest.mark.parametrize("attention, warns", [("sdpa", True), (GROUPED_SDPA, False), (None, False)])
def test_find_profile_warns_on_another_attention(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, attention: str | None, warns: bool
) -> None:
    """A profile timed with stock sdpa (which copied the KV cache per query head on tree forwards) prices trees high."""
    profile = make_profile(notes={} if attention is None else {"attn_implementation": attention})
    profile.save(tmp_path / f"{profile.slug}.json")
    with caplog.at_level(logging.WARNING, logger="cast_core.cost"):
        assert find_profile(profile.device, "Org/Target-1.5B", "Org/Drafter-0.5B", "bfloat16", [tmp_path]) == profile
    assert ("attention" in caplog.text) == warns


def test_find_profile_default_dirs_use_cast_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profile: CostProfile
) -> None:
    monkeypatch.setenv("CAST_CACHE_DIR", str(tmp_path))
    assert user_profiles_dir() == tmp_path / "profiles"
    assert find_profile(profile.device, "Org/Target-1.5B", "Org/Drafter-0.5B", "bfloat16") is None
    profile.save(tmp_path / "profiles" / f"{profile.slug}.json")
    assert find_profile(profile.device, "Org/Target-1.5B", "Org/Drafter-0.5B", "bfloat16") == profile
    assert PACKAGED_PROFILES_DIR.name == "profiles"


def test_packaged_profiles_are_valid() -> None:
    for path in sorted(PACKAGED_PROFILES_DIR.glob("*.json")):
        profile = CostProfile.load(path)
        assert path.stem == profile.slug


def test_resolve_profile_falls_back_to_synthetic_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cast_core.cost"):
        p = resolve_profile("cpu-2core-Test CPU", "t", "d", "bfloat16", search_dirs=[tmp_path])
    assert p.notes["synthetic"] is True
    assert (p.device, p.target.model, p.drafter.model, p.dtype) == ("cpu-2core-Test CPU", "t", "d", "bfloat16")
    assert "SYNTHETIC" in caplog.text and "cast profile" in caplog.text


def test_resolve_profile_prefers_measured(tmp_path: Path, profile: CostProfile) -> None:
    profile.save(tmp_path / f"{profile.slug}.json")
    assert resolve_profile(profile.device, "Org/Target-1.5B", "Org/Drafter-0.5B", "bfloat16", [tmp_path]) == profile


# --- device and speed ----------------------------------------------------------------------


def test_device_name_cpu() -> None:
    name = device_name("cpu")
    assert name.startswith(f"cpu-{torch.get_num_threads()}core-")
    assert name.endswith("-" + cpu_isa(cpu_info()[1]))
    assert name == device_name(torch.device("cpu"))


def test_cpu_isa_names_the_widest_matmul_instructions() -> None:
    """Two CPUs that report one model name (``AMD EPYC``) but differ in bf16 instructions get different profiles."""
    assert cpu_isa(["avx2", "avx512f", "avx512_bf16", "amx_bf16"]) == "amx"
    assert cpu_isa(["avx2", "avx512f", "avx512_bf16"]) == "avx512bf16"
    assert cpu_isa(["avx2", "avx512f"]) == "avx512"
    assert cpu_isa(["avx2"]) == "avx2"
    assert cpu_isa([]) == "base"


def test_auto_dtype_is_bfloat16_only_where_the_device_multiplies_it_natively() -> None:
    """A CPU without AVX-512 bf16 or AMX emulates bf16 matmuls (a B=16 forward in about 3x fp32's time): ``auto`` is float32 there."""
    xeon = "cpu-2core-Intel(R) Xeon(R) Processor"
    assert [native_dtype(f"{xeon}-{isa}") for isa in ("amx", "avx512bf16", "avx512", "avx2", "base")] == [
        "bfloat16",
        "bfloat16",
        "float32",
        "float32",
        "float32",
    ]
    assert native_dtype("NVIDIA H100 80GB HBM3") == "bfloat16"
    assert resolve_dtype_name("auto", f"{xeon}-avx512") == "float32"
    assert resolve_dtype_name("float16", f"{xeon}-amx") == "float16", "an explicit dtype is kept"
    assert resolve_dtype_name("auto", device_name("cpu")) == native_dtype(device_name("cpu"))
    assert usable_device_name("cpu") == device_name("cpu")
    with pytest.raises(ValueError, match="device"):
        usable_device_name("warp-drive")


def test_latency_call_speed_is_reported(profile: CostProfile) -> None:
    """Per-call cost of the hot-loop lookup; reported (and warned above 20 us), never asserted."""
    calls = 20_000
    start = time.perf_counter()
    for i in range(calls):
        profile.latency("target", 1 + i % 9, 50 + i % 400, 1 + i % 12)
    per_call_us = (time.perf_counter() - start) / calls * 1e6
    print(f"CostProfile.latency: {per_call_us:.2f} us per call")
    if per_call_us > 20:
        warnings.warn(f"CostProfile.latency took {per_call_us:.1f} us per call (budget 20 us)", stacklevel=1)
