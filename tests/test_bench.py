"""Benchmark harness end to end on tiny fp32 models: schema, speedups, exact match, report, sweep."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from bench.cli import main as bench_main
from bench.cli import trace_gate
from bench.datasets import DATASET_NAMES, TUNING_SIZE, Prompt, load_prompts
from bench.harness import BenchConfig, explain_mismatch, first_difference, load_result, make_groups, plain_top2, run_benchmark, save_result
from bench.methods import METHOD_NAMES, EngineMethod, ForwardTimer, ModelPair
from bench.overhead import profile_overhead
from bench.report import END, START, floor_table, generate_report, pace_adjusted, paired_ratio, pooled_ratio, write_readme_section
from bench.serving import ServingBenchConfig, explain_serving_mismatch, shared_tokens
from bench.sweep import SweepConfig, load_sweep, run_sweep, save_sweep
from cast_core import CastConfig, StaticConfig
from cast_core.cost import CostProfile, device_name, native_dtype
from cast_core.gate import DraftGate
from cast_core.vocab import DraftVocab

from conftest import TINY_EOS, TINY_VOCAB, reference_greedy, tiny_pair, tiny_tokenizer

CAST = CastConfig(c1=0.5, c2=0.5, c3=0.5)
STATIC = StaticConfig(top_k=4, depth=4, total_tokens=16)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pair() -> ModelPair:
    target, drafter = tiny_pair("llama", torch.float32)
    return ModelPair(
        target=target,
        drafter=drafter,
        tokenizer=tiny_tokenizer(),
        cost_profile=CostProfile.synthetic(0.01, 0.0002, 0.003, 0.0001),
        target_name="tiny-target",
        drafter_name="tiny-drafter",
    )


def toy_prompts(dataset: str, n: int, seed: int) -> list[Prompt]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Prompt(dataset, f"{dataset}/{i}", " ".join(f"t{t}" for t in torch.randint(3, 128, (5 + 3 * i,), generator=gen).tolist()))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def result(pair, tmp_path_factory):
    config = BenchConfig(
        name="tiny",
        target="tiny-target",
        drafter="tiny-drafter",
        dtype="float32",
        datasets=["toy_a", "toy_b"],
        batch_sizes=[1, 2],
        prompts=2,
        prompts_at={2: 4},
        max_new_tokens=8,
        warmup_tokens=2,
        cast=CAST,
        static=STATIC,
    )
    prompts = {d: toy_prompts(d, 4, seed) for seed, d in enumerate(config.datasets)}
    partials = []
    res = run_benchmark(config, pair, prompts, progress=False, on_block=partials.append)
    assert [len(p.cells) for p in partials] == [5, 9, 14, 18] and not any(p.complete for p in partials)
    assert res.complete and res.cells == partials[-1].cells
    results_dir = tmp_path_factory.mktemp("results")
    path = save_result(res, results_dir)
    return res, path


def test_result_schema_and_cells(result) -> None:
    res, path = result
    assert load_result(path) == res
    assert {"cpu_model", "cpu_flags", "usable_cpus", "torch_threads", "dtype", "torch", "transformers", "date"} <= set(res.machine)
    assert res.machine["dtype"] == "float32"
    expected = {(d, m, b) for d in ("toy_a", "toy_b") for m in METHOD_NAMES for b in (1, 2) if not (m == "hf_assisted" and b > 1)}
    assert {(c.dataset, c.method, c.batch_size) for c in res.cells} == expected
    assert res.prompts == {d: [f"{d}/{i}" for i in range(4)] for d in ("toy_a", "toy_b")}
    for c in res.cells:
        assert len(c.groups) == 2  # B=1: 2 prompts; B=2: prompts_at gives 4
        assert c.tokens_per_s.min <= c.tokens_per_s.median <= c.tokens_per_s.max
        assert c.tokens_per_s.min > 0 and c.speedup_vs_vanilla.min > 0
        assert 0 <= c.plan_share < 1 and 0 < c.model_forward_share <= 1
        assert c.verified_tokens_per_step >= 1
        if c.method == "vanilla":
            assert c.speedup_vs_vanilla.median == pytest.approx(1.0)
            assert len(c.drafter_ranks) == sum(len(g.prompt_ids) for g in c.groups) and all(1 <= r <= CAST.top_k + 1 for seq in c.drafter_ranks for r in seq)
            assert sum(len(seq) for seq in c.drafter_ranks) == sum(g.tokens for g in c.groups)
            assert [len(seq) for seq in c.drafter_confidences] == [len(seq) for seq in c.drafter_ranks]
            assert all(0 < p <= 1 for seq in c.drafter_confidences for p in seq)
        else:
            assert c.drafter_ranks == [] and c.drafter_confidences == []
        if c.method in ("vanilla", "hf_generate"):
            assert c.mean_accepted_length == pytest.approx(1.0)
            assert c.drafted_nodes_per_step == 0
        elif c.method == "cast":  # the speedup gate may stop drafting where the tiny drafter does not pay
            assert c.mean_accepted_length >= 1
        else:
            assert c.drafted_nodes_per_step > 0 and c.mean_accepted_length > 1


def test_fp32_outputs_match_vanilla(result) -> None:
    """Every method, transformers' generate and assisted generation included, is token-identical in fp32."""
    res, _ = result
    assert all(c.match_rate == 1.0 and not c.mismatches for c in res.cells)
    assert sum(g.tokens for c in res.cells for g in c.groups) > 0


def test_explain_mismatch_reports_plain_top2(pair) -> None:
    prompt = Prompt("toy", "toy/0", "t5 t6 t7")
    ids = pair.encode(prompt.text)
    ref = reference_greedy(pair.target, ids, 4, TINY_EOS)
    assert len(ref) >= 2
    other = ref[:1] + [(ref[1] + 1) % 128]
    m = explain_mismatch(pair, prompt, ids, ref, other)
    assert (m.position, m.vanilla_token, m.method_token, m.plain_top1) == (1, ref[1], other[1], ref[1])
    assert m.logit_gap > 0 and m.plain_top2 != m.plain_top1


def check_config(name: str, methods: list[str], **fields) -> BenchConfig:
    """A check run's config on toy_a (a floor or batch-1 check): ``methods`` and the given ``fields``, 6 new tokens."""
    common = dict(target="tiny-target", drafter="tiny-drafter", dtype="float32", datasets=["toy_a"], max_new_tokens=6)
    return BenchConfig(name=name, methods=methods, warmup_tokens=2, **{"cast": CAST, **common, **fields})


def test_report_renders_plots_and_readme_table(result, tmp_path) -> None:
    res, path = result
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nintro\n\n## Benchmarks\n\n" + START + "\nold\n" + END + "\n\n## After\nkept\n")
    body = generate_report("tiny", path.parent, readme)
    for suffix in ("speedup", "acceptance"):
        assert (path.parent / f"tiny_{suffix}.png").read_bytes()[:8] == PNG_MAGIC
    text = readme.read_text()
    assert text.startswith("# Project\n\nintro\n\n## Benchmarks\n\n" + START) and text.endswith(END + "\n\n## After\nkept\n")
    assert "old" not in text and body in text
    assert "| cast | 1 |" in body and "| hf_assisted | 1 |" in body and "### Targets" in body
    assert "--prompts 2 --prompts-at 2=4 " in body and "(4 at B=2)" in body
    generate_report("tiny", path.parent, readme)
    assert readme.read_text() == text  # regenerating is idempotent
    assert bench_main(["report", "--name", "tiny", "--results-dir", str(path.parent), "--no-readme"]) == 0


def test_floor_check_pairs_vanilla_and_cast_back_to_back_and_reports_them(result, pair) -> None:
    res, path = result
    config = check_config(
        "floor", ["vanilla", "cast"], batch_sizes=[2], prompts=6, cast=CAST.model_copy(update={"min_speedup": 1.1})
    )
    floor = run_benchmark(config, pair, {"toy_a": toy_prompts("toy_a", 6, 3)}, progress=False)
    cast, vanilla = floor.cell("toy_a", "cast", 2), floor.cell("toy_a", "vanilla", 2)
    assert len(cast.groups) == 3 and cast.match_rate == 1.0
    pooled = pooled_ratio(cast, vanilla)
    assert pooled == pytest.approx(
        (sum(g.tokens for g in cast.groups) / sum(g.wall_s for g in cast.groups))
        / (sum(g.tokens for g in vanilla.groups) / sum(g.wall_s for g in vanilla.groups))
    )
    floor_path = save_result(floor, path.parent)
    try:  # the other report tests share this results folder
        body = generate_report("tiny", path.parent, None)
        s = cast.speedup_vs_vanilla
        assert "### The 0.97x floor, in back-to-back pairs" in body
        assert (
            "cast bench run --name floor --datasets toy_a --methods vanilla cast --prompts 6 --batch-sizes 2 "
            "--max-new-tokens 6 --drafter-quantization none --c1 0.5 --c2 0.5 --c3 0.5 --min-speedup 1.1`" in body
        )
        assert "; 3 groups at B=2, of the reported prompts" in body
        assert f"| toy_a | 2 | 3 | {s.median:.3f}x ({s.min:.2f}–{s.max:.2f}) |" in body
        assert f"worst cell of the floor check (toy_a, B=2; 3 back-to-back pairs) | >= 0.97x | {s.median:.2f}x |" in body
        assert "floor check" not in generate_report("floor", path.parent, None)  # the check itself reported as a run
        elsewhere = floor.model_copy(update={"machine": {**floor.machine, "cpu_model": "Other CPU", "cpu_flags": ["avx2"], "git_commit": "abcdef123"}})
        save_result(elsewhere, path.parent)  # a floor check from another machine says so beside its worst cell
        assert "(toy_a, B=2; 3 back-to-back pairs; on Other CPU (avx2), commit `abcdef1`) |" in generate_report("tiny", path.parent, None)
    finally:
        floor_path.unlink()
    assert "pace" not in floor_table(floor)  # runs without a measured profile record none
    paced = floor.model_copy(deep=True)
    for c in paced.cells:
        for g in c.groups:
            g.stats["target_pace"] = 1.1 if c.method == "cast" else 1.0
    cast, vanilla = paced.cell("toy_a", "cast", 2), paced.cell("toy_a", "vanilla", 2)
    adjusted = sorted(pace_adjusted(a, b) for a, b in zip(cast.groups, vanilla.groups))
    assert adjusted == pytest.approx(sorted(1.1 * g.speedup_vs_vanilla for g in cast.groups))
    below = sum(a < 0.97 for a in adjusted)
    assert f"| 1.100 (1.10–1.10) | {adjusted[1]:.3f}x ({adjusted[0]:.2f}–{adjusted[2]:.2f}) | {below} |" in floor_table(paced)


def test_target_pace_is_the_decoding_forwards_time_over_the_profiles(result, pair) -> None:
    measured = pair.cost_profile.model_copy(update={"notes": {}})
    timer = ForwardTimer(pair.target)
    with timer.attached():
        run = EngineMethod(dataclasses.replace(pair, cost_profile=measured), "vanilla", "none").run([[5, 6, 7, 8, 9], [10, 11, 12]], 6)
    prefills = [f for f in timer.forwards if f.context == 0]
    steps = [f for f in timer.forwards if f.context > 0]
    assert [(f.batch, f.tokens) for f in prefills] == [(1, 4), (1, 2)]  # one row at a time, the root left out
    assert len(steps) == run.stats.batch_steps and all(f.tokens == 1 and f.seconds > 0 for f in steps)
    assert [f.context for f in steps] == sorted(f.context for f in steps) and steps[0].context == 4
    expected = sum(f.seconds for f in steps) / sum(measured.latency("target", f.batch, f.context, f.tokens) for f in steps)
    assert timer.pace(measured, "target") == pytest.approx(expected)
    assert run.stats.target_pace == pytest.approx(expected, rel=0.5)  # the run's own timer, hooked beside this one
    assert timer.pace(pair.cost_profile, "target") is None  # a synthetic profile measures no machine
    res, _ = result
    assert all(g.stats["target_pace"] is None for c in res.cells for g in c.groups)


def test_batch1_check_is_reported_beside_the_full_runs_batch1_targets(result, pair) -> None:
    res, path = result
    config = check_config("b1_check", ["vanilla", "hf_assisted", "cast"], batch_sizes=[1], prompts=3)
    b1 = run_benchmark(config, pair, {"toy_a": toy_prompts("toy_a", 3, 5)}, progress=False)
    b1_path = save_result(b1, path.parent)
    try:  # the other report tests share this results folder
        body = generate_report("tiny", path.parent, None)
        assert "### Batch 1 on more prompts" in body
        assert "`cast bench run --name b1_check --datasets toy_a --methods vanilla hf_assisted cast --prompts 3 --batch-sizes 1 " in body
        ratio = paired_ratio(b1, "toy_a", 1, "cast", "hf_assisted")
        assert f"| toy_a, B=1 (batch-1 check, 3 prompts): cast / hf_assisted | >= 1.15x | {ratio:.2f}x |" in body
        assert f"| toy_a, B=1: cast / hf_assisted | >= 1.15x | {paired_ratio(res, 'toy_a', 1, 'cast', 'hf_assisted'):.2f}x |" in body
        assert "| toy_a | 3 | " in body and "toy_b, B=1 (batch-1 check" not in body
        assert "Batch 1 on more prompts" not in generate_report("b1_check", path.parent, None)  # the check itself reported as a run
    finally:
        b1_path.unlink()


def test_run_takes_the_gates_min_speedup_and_rejects_a_bad_one(capsys) -> None:
    assert bench_main(["run", "--min-speedup", "0"]) == 2  # validated before any model loads
    assert "min_speedup" in capsys.readouterr().err


def test_readme_section_created_when_missing(tmp_path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n")
    write_readme_section(readme, "table")
    assert readme.read_text() == f"# Project\n\n## Benchmarks\n\n{START}\ntable\n{END}\n"


def test_sweep_writes_trials_and_report_shows_it(result, pair) -> None:
    res, path = result
    config = SweepConfig(
        dtype="float32",
        datasets=["toy_a"],
        batch_sizes=[1, 2],
        prompts=1,
        max_new_tokens=6,
        warmup_tokens=2,
        start=CAST,
        order=["c3", "r"],
        c3=[0.25, 0.5],
        r=[4],
    )
    sweep = run_sweep(config, pair, {"toy_a": toy_prompts("toy_a", 4, 7)}, progress=False)
    assert len(sweep.trials) == 2  # (0.5, r=4) is the start; only c3=0.25 is new
    assert sweep.best in [t.cast for t in sweep.trials]
    assert max(t.score for t in sweep.trials) == next(t.score for t in sweep.trials if t.cast == sweep.best)
    assert sweep.prompts == {"toy_a": ["toy_a/0", "toy_a/1"]}
    assert load_sweep(save_sweep(sweep, path.parent)) == sweep
    assert "### Threshold sweep" in generate_report("tiny", path.parent, None)


def test_datasets_split_is_disjoint_and_deterministic() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    for name in DATASET_NAMES:
        tuning, reported = load_prompts(name, tok, "tuning"), load_prompts(name, tok, "reported")
        assert len(tuning) == TUNING_SIZE and len(reported) > 40
        assert not {p.id for p in tuning} & {p.id for p in reported}
        assert load_prompts(name, tok, "reported", limit=3) == reported[:3]
    mt = load_prompts("mtbench", tok, "reported", limit=8)
    assert all(p.text.startswith("<user>") and p.text.endswith("<assistant>") for p in mt)
    assert len({p.id for p in mt}) == 8
    he = load_prompts("humaneval", tok, "reported", limit=1)[0]
    assert he.id.startswith("HumanEval/") and "def " in he.text
    with pytest.raises(ValueError, match="dataset"):
        load_prompts("gsm8k", tok)


def test_groups_and_first_difference() -> None:
    ps = toy_prompts("x", 8, 0)
    assert [[p.id for p in g] for g in make_groups(ps, 2, 3)] == [["x/0", "x/1"], ["x/2", "x/3"]]
    assert len(make_groups(ps, 8, 4)) == 1
    with pytest.raises(ValueError, match="needs 16 prompts"):
        make_groups(ps, 8, 9)
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_config_requires_vanilla() -> None:
    with pytest.raises(ValueError, match="vanilla"):
        BenchConfig(methods=["cast"])


def test_configs_store_the_dtype_that_runs() -> None:
    """``auto`` is resolved when a config is built, so a result names the dtype its models ran in."""
    native = native_dtype(device_name("cpu"))
    assert BenchConfig().dtype == SweepConfig().dtype == ServingBenchConfig().dtype == native
    assert BenchConfig(dtype="float32").dtype == "float32"
    with pytest.raises(ValueError, match="dtype"):
        BenchConfig(dtype="int3")


def test_prompts_at_overrides_prompts_per_batch_size() -> None:
    config = BenchConfig(batch_sizes=[1, 8], prompts=2, prompts_at={8: 16})
    assert (config.prompts_for(1), config.prompts_for(8)) == (2, 16)
    with pytest.raises(ValueError, match=r"prompts_at: batch sizes \[4\]"):
        BenchConfig(batch_sizes=[1, 8], prompts_at={4: 8})
    with pytest.raises(ValueError, match="prompts_at: prompt counts"):
        BenchConfig(batch_sizes=[8], prompts_at={8: 0})
    with pytest.raises(SystemExit):
        bench_main(["run", "--prompts-at", "8"])  # not B=N
    assert bench_main(["run", "--batch-sizes", "1", "--prompts-at", "8=16"]) == 2  # rejected before loading models


def test_overhead_breakdown(pair) -> None:
    text = profile_overhead(pair, [pair.encode("t5 t6 t7 t8")], "cast", max_new_tokens=6, cast_config=CAST, top=10)
    for needle in ("target forwards", "outside model forwards", "engine plan", "decoder.step", "own time"):
        assert needle in text


def test_cells_record_acceptance_by_depth_and_drafted_share(result) -> None:
    res, _ = result
    for c in res.cells:
        assert all(a >= b for a, b in zip(c.acceptance_by_depth, c.acceptance_by_depth[1:])), "P(accepted > i) never grows with i"
        assert all(0 <= q <= 1 for q in c.acceptance_by_depth) and 0 <= c.drafted_step_share <= 1
        if c.method == "static":
            assert c.drafted_step_share == 1.0 and c.acceptance_by_depth
            # a fixed depth: the catch-up, then one forward per further layer
            assert c.draft_ms_per_drafter_forward == pytest.approx(c.draft_ms_per_step / STATIC.depth, rel=1e-6)
        if c.method in ("vanilla", "hf_generate"):
            assert c.drafted_step_share == 0.0 and not c.acceptance_by_depth and c.draft_ms_per_drafter_forward is None


def test_whole_run_ceiling_is_amdahls_law_over_vanillas_time_outside_its_steps(result) -> None:
    """S_run = 1 / (p + (1 - p) / S): the steps' speedup where nothing lies outside them, 1 where everything does;
    p is read from vanilla's groups as the wall time its draft and verify seconds leave."""
    from bench.bound import whole_run_ceiling
    from bench.report import outside_steps_share

    assert whole_run_ceiling(1.5, 0.0) == pytest.approx(1.5) and whole_run_ceiling(1.5, 1.0) == pytest.approx(1.0)
    assert whole_run_ceiling(1.4, 0.2) == pytest.approx(1 / (0.2 + 0.8 / 1.4))
    with pytest.raises(ValueError, match="outside_share"):
        whole_run_ceiling(1.4, 1.2)
    with pytest.raises(ValueError, match="step_speedup"):
        whole_run_ceiling(0.0, 0.2)
    res, _ = result
    vanilla = res.cell("toy_a", "vanilla", 1)
    walls = [(g.wall_s, g.stats["draft_s"], g.stats["verify_s"]) for g in vanilla.groups]
    share = outside_steps_share(vanilla)
    assert share == pytest.approx(sum(w - d - v for w, d, v in walls) / sum(w for w, _, _ in walls))
    assert 0 < share < 1, "prefill lies outside the steps"


def test_speedup_bounds_follow_the_formula() -> None:
    """Affine costs: S_perfect = max_d (1 + d) / (d c_D + c_V(d + 1)); measured acceptance can only lower it."""
    from bench.bound import extend_acceptance, speedup_bound

    profile = CostProfile.synthetic(0.1, 0.01, 0.03, 0.0, token_counts=(1, 2, 4, 8, 16, 32, 64))
    bound = speedup_bound(profile, 1, 128, [0.8, 0.6, 0.45])
    c_d = 0.03 / 0.11
    expected = max((1 + d) / (d * c_d + (0.1 + 0.01 * (d + 1)) / 0.11) for d in range(1, 49))
    assert bound.drafter_cost == pytest.approx(c_d)
    assert bound.perfect == pytest.approx(expected, rel=1e-6)
    assert bound.chain is not None and 1.0 < bound.chain < bound.perfect
    assert extend_acceptance([0.8, 0.4], 4).tolist() == pytest.approx([0.8, 0.4, 0.2, 0.1])
    dearer = speedup_bound(profile, 1, 128, [0.8, 0.6, 0.45], drafter_cost=2 * c_d)
    assert dearer.drafter_cost == 2 * c_d and dearer.perfect < bound.perfect and dearer.chain < bound.chain


def test_fixed_chain_bound_replays_one_depth_and_never_beats_hindsight() -> None:
    """S_fixed: a greedy chain of one depth every step accepts the leading rank-1 drafts; best depth for the run."""
    from bench.bound import fixed_chain_bound, oracle_tree_bound

    profile = CostProfile.synthetic(0.1, 0.01, 0.03, 0.0, token_counts=(1, 2, 4, 8, 16, 32, 64))
    c_d = 0.03 / 0.11

    def verify(n: int) -> float:
        return (0.1 + 0.01 * n) / 0.11

    assert fixed_chain_bound([[1, 1, 1, 1, 1]], profile, 1, 128, max_depth=4) == (pytest.approx(5 / (4 * c_d + verify(5))), 4)
    # depth 1: 0 -> 2 -> 4 (2 steps); depth 2: accepts 1 at 0 (rank 2 next), then 2 at 2 (2 steps, dearer)
    assert fixed_chain_bound([[1, 2, 1, 1]], profile, 1, 128, max_depth=2) == (pytest.approx(4 / (2 * (c_d + verify(2)))), 1)
    rng = np.random.default_rng(3)
    outputs = [list(rng.choice([1, 1, 1, 1, 2, 3], size=60)) for _ in range(3)]
    fixed, _ = fixed_chain_bound(outputs, profile, 1, 128, max_depth=6)
    assert fixed <= oracle_tree_bound(outputs, profile, 1, 128, top_k=4, max_depth=6) + 1e-9
    assert fixed_chain_bound([[]], profile, 1, 128, max_depth=4) is None


def test_confidence_chain_bound_stops_where_confidence_drops() -> None:
    """S_conf: a chain drafting while its path confidence stays >= theta; the best (theta, cap) in hindsight."""
    from bench.bound import confidence_chain_bound, fixed_chain_bound, oracle_tree_bound

    profile = CostProfile.synthetic(0.1, 0.01, 0.03, 0.0, token_counts=(1, 2, 4, 8, 16, 32, 64))
    c_d = 0.03 / 0.11

    def verify(n: int) -> float:
        return (0.1 + 0.01 * n) / 0.11

    certain = confidence_chain_bound([[1] * 5], [[1.0] * 5], profile, 1, 128, max_depth=4)
    assert certain[0] == pytest.approx(5 / (4 * c_d + verify(5)))  # one step: 4 drafts accepted + the bonus token
    # runs of rank-1 tokens of lengths 4, 1, 2, each ended by a rank-2 token the drafter is unsure of: a chain with
    # 0.0475 < theta <= 0.8145 and cap 5 stops on that token (drafted and verified), gaining the run + the bonus;
    # the best pair in hindsight does at least that well
    runs = [4, 1, 2]
    ranks = [r for n in runs for r in [1] * n + [2]]
    confidences = [c for n in runs for c in [0.95] * n + [0.05]]
    stopping_on_doubt = len(ranks) / sum((n + 1) * c_d + verify(n + 2) for n in runs)
    speedup, _, _ = confidence_chain_bound([ranks], [confidences], profile, 1, 128, max_depth=5)
    assert speedup >= stopping_on_doubt - 1e-9
    assert speedup > fixed_chain_bound([ranks], profile, 1, 128, max_depth=5)[0], "knowing when beats one depth"

    rng = np.random.default_rng(5)
    outputs = [list(rng.choice([1, 1, 1, 1, 2, 3], size=60)) for _ in range(3)]
    confs = [list(rng.uniform(0.05, 1.0, size=60)) for _ in range(3)]
    conf, _, _ = confidence_chain_bound(outputs, confs, profile, 1, 128, max_depth=6)
    assert fixed_chain_bound(outputs, profile, 1, 128, max_depth=6)[0] - 1e-9 <= conf  # theta = 0 is a fixed chain
    assert conf <= oracle_tree_bound(outputs, profile, 1, 128, top_k=4, max_depth=6) + 1e-9
    assert confidence_chain_bound(outputs, [], profile, 1, 128, max_depth=6) is None
    with pytest.raises(ValueError, match="one value per output token"):
        confidence_chain_bound(outputs, [c[:-1] for c in confs], profile, 1, 128, max_depth=6)


def _brute_force_time(ranks: list[int], c_d: float, verify, top_k: int, max_depth: int) -> float:
    """Least time to produce ``ranks``' output, trying every split into steps (the DP's reference)."""
    if not ranks:
        return 0.0
    best = 1.0 + _brute_force_time(ranks[1:], c_d, verify, top_k, max_depth)
    for d in range(1, min(max_depth, len(ranks)) + 1):
        if max(ranks[:d]) > top_k:
            break
        best = min(best, d * c_d + verify(sum(ranks[:d]) + 1) + _brute_force_time(ranks[d + 1 :], c_d, verify, top_k, max_depth))
    return best


def test_oracle_tree_bound_is_the_cheapest_schedule_of_best_first_trees() -> None:
    """S_oracle = sum |y| / sum T(0): a tree accepting d drafts holds the sum of their ranks in nodes."""
    from bench.bound import oracle_tree_bound, speedup_bound

    profile = CostProfile.synthetic(0.1, 0.01, 0.03, 0.0, token_counts=(1, 2, 4, 8, 16, 32, 64))
    c_d = 0.03 / 0.11

    def verify(n: int) -> float:
        return (0.1 + 0.01 * n) / 0.11

    five = oracle_tree_bound([[1, 1, 1, 1, 1]], profile, 1, 128, top_k=4, max_depth=4)
    assert five == pytest.approx(5 / (4 * c_d + verify(5)))  # one step: 4 drafts accepted + the bonus token
    outputs = [[1, 1, 2, 1, 1, 5, 1, 3, 1, 1, 1], [2, 7, 1, 1, 4, 1, 2, 2]]
    expected = sum(map(len, outputs)) / sum(_brute_force_time(seq, c_d, verify, 4, 3) for seq in outputs)
    assert oracle_tree_bound(outputs, profile, 1, 128, top_k=4, max_depth=3) == pytest.approx(expected)
    assert oracle_tree_bound([[9] * 20], profile, 1, 128, top_k=4, max_depth=4) == pytest.approx(1.0), "no tree holds a rank-9 token"
    assert oracle_tree_bound([[], []], profile, 1, 128, top_k=4, max_depth=4) is None
    chain = oracle_tree_bound([[1] * 400], profile, 1, 128, top_k=4, max_depth=48)
    assert chain <= speedup_bound(profile, 1, 128).perfect + 1e-9  # every draft accepted is the best case


def test_static_batch_oracle_waits_for_the_slowest_row() -> None:
    """S_static = sum_groups max_b |y_b| / sum_groups max_b T_b(0): a static batch is done when its slowest row is
    (priced at B=1's costs here, which ``verify`` spells out)."""
    from bench.bound import oracle_tree_bound, static_batch_oracle_bound

    profile = CostProfile.synthetic(0.1, 0.01, 0.03, 0.0, token_counts=(1, 2, 4, 8, 16, 32, 64))
    c_d = 0.03 / 0.11

    def verify(n: int) -> float:
        return (0.1 + 0.01 * n) / 0.11

    easy, hard, short = [1] * 8, [2, 7, 1, 1, 4, 1, 2, 2], [1, 1, 1]
    times = {name: _brute_force_time(seq, c_d, verify, 4, 3) for name, seq in (("easy", easy), ("hard", hard), ("short", short))}
    one = static_batch_oracle_bound([[easy, hard]], profile, 1, 128, top_k=4, max_depth=3)
    assert one == pytest.approx(8 / max(times["easy"], times["hard"]))
    assert one < oracle_tree_bound([easy, hard], profile, 1, 128, top_k=4, max_depth=3), "per-row pricing flatters a batch"
    two = static_batch_oracle_bound([[easy, hard], [short, easy]], profile, 1, 128, top_k=4, max_depth=3)
    assert two == pytest.approx((8 + 8) / (max(times["easy"], times["hard"]) + max(times["short"], times["easy"])))
    assert static_batch_oracle_bound([[easy]], profile, 1, 128, top_k=4, max_depth=3) == pytest.approx(
        oracle_tree_bound([easy], profile, 1, 128, top_k=4, max_depth=3)
    ), "a batch of one is the per-row ceiling"
    assert static_batch_oracle_bound([[[], []]], profile, 1, 128, top_k=4, max_depth=3) is None


def test_batch_chain_bounds_wait_for_the_slowest_row() -> None:
    """Fixed and confidence chains over static batches: sum_groups max_b |y_b| / sum_groups max_b T_b, each row's
    chain replayed alone; a batch of one is the rows-alone ceiling, and a batch with a slow row reads lower."""
    from bench.bound import batch_confidence_chain_bound, batch_fixed_chain_bound, confidence_chain_bound, fixed_chain_bound

    profile = CostProfile.synthetic(0.1, 0.01, 0.03, 0.0, token_counts=(1, 2, 4, 8, 16, 32, 64))
    c_d = 0.03 / 0.11

    def verify(n: int) -> float:
        return (0.1 + 0.01 * n) / 0.11

    easy, hard = [1] * 8, [2, 2, 1, 2, 2, 2, 1, 2]
    sure, unsure = [0.9] * 8, [0.3] * 8
    # easy takes 4 steps at depth 1 and 3 at depth 2, hard 6 at either (1, 1, 2, 1, 1, 2 tokens): a batch waits for hard
    fixed, depth = batch_fixed_chain_bound([[easy, hard]], profile, 1, 128, max_depth=2)
    assert depth in (1, 2) and fixed == pytest.approx(max(8 / (s * (d * c_d + verify(d + 1))) for d, s in ((1, 6), (2, 6))))
    assert fixed < fixed_chain_bound([easy, hard], profile, 1, 128, max_depth=2)[0], "rows alone flatter a batch"
    assert batch_fixed_chain_bound([[easy], [hard]], profile, 1, 128, max_depth=2) == fixed_chain_bound([easy, hard], profile, 1, 128, max_depth=2)
    alone = confidence_chain_bound([easy, hard], [sure, unsure], profile, 1, 128, max_depth=4)
    assert batch_confidence_chain_bound([[easy], [hard]], [[sure], [unsure]], profile, 1, 128, max_depth=4) == alone
    batched = batch_confidence_chain_bound([[easy, hard]], [[sure, unsure]], profile, 1, 128, max_depth=4)
    assert batched[0] < alone[0]
    assert batch_confidence_chain_bound([[easy, hard]], [[sure, unsure]], profile, 1, 128, max_depth=4)[0] >= fixed - 1e-9, "theta = 0 is a fixed chain"
    with pytest.raises(ValueError, match="one value per output token"):
        batch_confidence_chain_bound([[easy, hard]], [[sure, unsure[:-1]]], profile, 1, 128, max_depth=4)
    assert batch_fixed_chain_bound([[[], []]], profile, 1, 128, max_depth=2) is None


def test_teacher_forced_guesses_match_incremental_decoding() -> None:
    """The target ranks each of its own greedy tokens first; a noisy drafter as its step-by-step logits do."""
    from bench.ranks import teacher_forced_guesses

    target, drafter = tiny_pair("llama", torch.float32)
    prompt = [9, 60, 3]
    output = reference_greedy(target, prompt, 12, TINY_EOS)
    assert len(output) == 12
    assert teacher_forced_guesses(target, prompt, output, cap=4).ranks == [1] * len(output)
    guesses = teacher_forced_guesses(drafter, prompt, output, cap=3)
    with torch.no_grad():
        for i, token in enumerate(output):
            logits = drafter(input_ids=torch.tensor([prompt + output[:i]])).logits[0, -1]
            assert guesses.ranks[i] == min(1 + int((logits > logits[token]).sum()), 4)
            assert guesses.confidences[i] == pytest.approx(float(torch.softmax(logits, -1).max()), abs=1e-4)
    assert teacher_forced_guesses(drafter, prompt, [], cap=3).ranks == []
    with pytest.raises(ValueError, match="cap"):
        teacher_forced_guesses(drafter, prompt, output, cap=0)


def test_teacher_forced_guesses_rank_within_the_draft_vocabulary() -> None:
    """With a draft vocabulary, a token is ranked among the core ids and the rarer ids of its prefix, or not at all."""
    from bench.ranks import teacher_forced_guesses

    target, drafter = tiny_pair("llama", torch.float32)
    prompt = [9, 60, 3]
    output = reference_greedy(target, prompt, 12, TINY_EOS)
    guesses = teacher_forced_guesses(drafter, prompt, output, cap=3, vocab=DraftVocab(drafter, TINY_VOCAB, 16))
    seen = set(prompt)
    assert output[0] >= 16 and output[0] not in seen and 60 in output, "outside V_D, and a rare id of the prompt"
    with torch.no_grad():
        for i, token in enumerate(output):
            logits = drafter(input_ids=torch.tensor([prompt + output[:i]])).logits[0, -1]
            scored = torch.tensor([v for v in range(TINY_VOCAB) if v < 16 or v in seen])
            rank = min(1 + int((logits[scored] > logits[token]).sum()), 4) if token in scored.tolist() else 4
            assert guesses.ranks[i] == rank
            assert guesses.confidences[i] == pytest.approx(float(torch.softmax(logits[scored], -1).max()), abs=1e-4)
            seen.add(token)


def test_explain_serving_mismatch_finds_the_first_token_the_text_leaves(pair) -> None:
    """An HTTP text known only as text is matched token by token against the in-process ids; at the first token it
    leaves, the plain target's top-2 says which of the two the HTTP text went on with."""
    ids = pair.encode("t5 t6 t7")
    ref = reference_greedy(pair.target, ids, 6, TINY_EOS)
    assert len(ref) >= 4
    assert shared_tokens(pair.tokenizer, ref, pair.tokenizer.decode(ref)) == len(ref)
    top1, top2, gap = plain_top2(pair.target, ids + ref[:2])
    assert top1 == ref[2] and gap > 0
    http_text = pair.tokenizer.decode(ref[:2] + [top2] + ref[3:])
    m = explain_serving_mismatch(pair.target, pair.tokenizer, "toy/0", ids, ref, http_text)
    assert (m.position, m.inprocess_token, m.plain_top1, m.plain_top2, m.http_follows) == (2, ref[2], top1, top2, "top2")
    assert m.logit_gap == pytest.approx(gap)
    shared = len(pair.tokenizer.decode(ref[:2]))
    assert (m.http_text, m.inprocess_text) == (http_text[shared : shared + 40], pair.tokenizer.decode(ref)[shared : shared + 40])
    assert m.http_text != m.inprocess_text


def test_trace_gate_prints_the_gates_decisions_with_seconds_since_start(capsys) -> None:
    gate_logger = logging.getLogger("cast_core.gate")
    handlers, level = list(gate_logger.handlers), gate_logger.level
    try:
        trace_gate()
        DraftGate().should_draft(4)
    finally:
        gate_logger.handlers, gate_logger.level = handlers, level
    line = capsys.readouterr().err.strip()
    seconds, message = line.split(" ", 1)
    assert float(seconds) >= 0 and message == "draft B=4 rho=none judged=0 thinned=False closed=False"
