"""The benchmark suite runs end to end on tiny models and compares like with like.

Only correctness and the shape of what it writes are checked: step times depend on the
machine and are never asserted.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import runpy

import pytest

# Examples and benchmarks: run by .ci/run, left out with -m 'not slow'.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
MODELS = ("mlp", "cnn", "transformer")
PEERS = {"optax.microbatch", "optax.MultiSteps", "python loop", "hand-written scan"}
METHODS = {"full batch", "jaxaccum.accumulate", *PEERS}
ROW_KEYS = {
    "model",
    "k",
    "method",
    "median_ms",
    "ratio_to_full",
    "ratio_p25_p75",
    "ratio_of_medians",
    "compile_s",
    "temp_bytes",
    "memory",
    "one_call",
    "reference",
    "loss_abs_diff",
    "grad_max_abs_diff",
    "state_max_abs_diff",
    "state_carried",
    "ok",
    "achieved_flops_per_s",
    "mfu",
    "times_ms",
}
SUMMARY_KEYS = {
    "model",
    "k",
    "jaxaccum_ratio_to_full",
    "fastest_peer",
    "fastest_peer_ratio_to_full",
    "jaxaccum_vs_fastest_peer",
    "jaxaccum_vs_fastest_peer_p25_p75",
    "jaxaccum_le_fastest_peer",
    "jaxaccum_clearly_behind",
}


def suite_main():
    return runpy.run_path(str(BENCHMARKS / "suite.py"), run_name="suite")["main"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    suite_main()(["--smoke", "--ks", "1,2", "--reps", "2", "--out", str(out)])
    return out, json.loads((out / "suite.json").read_text())


def test_smoke_run_writes_every_row_and_file(smoke):
    out, report = smoke
    assert {"platform", "cpu", "cores", "jax", "jaxlib", "optax", "devices"} <= set(
        report["machine"]
    )
    settings = report["settings"]
    assert settings["mode"] == "smoke" and settings["ks"] == [1, 2]
    assert set(settings["workloads"]) == set(MODELS)
    expected = set(itertools.product(MODELS, (1, 2), METHODS))
    expected |= {(model, 2, "jaxaccum.accumulate unroll=True") for model in MODELS}
    assert {(r["model"], r["k"], r["method"]) for r in report["rows"]} == expected
    for r in report["rows"]:
        assert set(r) >= ROW_KEYS, r["method"]
        assert len(r["times_ms"]) == 2 and r["temp_bytes"] >= 0
        assert r["achieved_flops_per_s"] > 0 and r["mfu"] is None  # CPU: no known peak
    assert {(s["model"], s["k"]) for s in report["summary"]} == set(
        itertools.product(MODELS, (1, 2))
    )
    for s in report["summary"]:
        assert set(s) >= SUMMARY_KEYS and s["fastest_peer"] in PEERS
        assert s["jaxaccum_le_fastest_peer"] == (s["jaxaccum_vs_fastest_peer"] <= 1.0)
    for name in ("suite.md", "time_ratio.png", "temp_memory.png", "collectives.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "suite.md").read_text()
    assert "## cnn" in text and "| k | method | step ms |" in text
    assert "| model | k | jaxaccum × full | fastest peer |" in text
    assert "| model | k=1 | k=2 | largest k / k=2 |" in text
    assert "| model | k | unroll | × full |" in text


def test_compile_and_unroll_sections(smoke):
    _, report = smoke
    compile_rows = {r["model"]: r for r in report["compile"]}
    assert set(compile_rows) == set(MODELS)
    for r in compile_rows.values():
        assert set(r["compile_s"]) == {"1", "2"} and r["largest_k"] == 2
        assert r["largest_k_over_k2"] is None  # needs a k above 2
    unroll = [(r["model"], r["unroll"]) for r in report["unroll"]]
    assert unroll == [(model, u) for model in MODELS for u in (1, True)]
    for r in report["unroll"]:
        assert r["k"] == 2 and r["temp_bytes"] >= 0 and r["compile_s"] > 0
        if r["unroll"] == 1 and r["unroll"] is not True:  # True == 1 in Python
            assert r["temp_over_unroll_1"] == 1.0


def test_every_method_matches_its_reference(smoke):
    _, report = smoke
    tol = report["settings"]["tolerance"]
    for r in report["rows"]:
        assert r["ok"], r
        assert r["loss_abs_diff"] <= tol and r["grad_max_abs_diff"] <= tol, r
        if r["model"] != "cnn":
            assert r["reference"] == "full batch" and r["state_max_abs_diff"] is None
        if r["k"] == 1 and r["method"] == "jaxaccum.accumulate":
            assert r["grad_max_abs_diff"] == 0.0  # k == 1 runs the step function itself


def test_batchnorm_statistics_are_carried_except_by_optax_microbatch(smoke):
    _, report = smoke
    tol = report["settings"]["tolerance"]
    cnn = [r for r in report["rows"] if r["model"] == "cnn"]
    for r in cnn:
        if r["method"] == "full batch":
            assert r["state_carried"] is None
        elif r["method"] == "optax.microbatch":
            assert r["state_carried"] is False  # averages the k updates instead
        else:
            assert r["state_carried"] is True and r["state_max_abs_diff"] <= tol, r
            assert r["reference"].startswith("python loop")
    averaged = [r for r in cnn if r["method"] == "optax.microbatch" and r["k"] == 2]
    assert averaged[0]["state_max_abs_diff"] > tol  # a real difference, not a no-op check


def test_collectives_plot_takes_rows(tmp_path):
    plot = runpy.run_path(str(BENCHMARKS / "report.py"))["plot_collectives"]
    rows = [
        {
            "method": method,
            "k": k,
            "in_loop": {"all-reduce": per_loop * k, "all-gather": 1} if per_loop else {},
            "outside_loop": {"all-reduce": 1},
        }
        for method, per_loop in (("jaxaccum.accumulate", 0), ("python loop", 2))
        for k in (1, 2, 4, 8)
    ]
    for name, given in (("rows.png", rows), ("empty.png", [])):
        plot(given, tmp_path / name)
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize(
    "argv",
    [["--smoke", "--ks", "3"], ["--smoke", "--models", "rnn"], ["--quick", "--full"]],
)
def test_bad_command_lines_are_refused(argv, tmp_path):
    with pytest.raises(SystemExit):
        suite_main()([*argv, "--out", str(tmp_path)])


def test_collectives_section_counts_one_all_reduce_per_step_for_jaxaccum(smoke):
    _, report = smoke
    rows = {(r["method"], r["k"]): r for r in report["collectives"]}
    for k in (1, 2):
        mine = rows[("jaxaccum data_axis", k)]
        assert mine["in_loop"] == {} and mine["outside_loop"] == {"all-reduce": 1}
        assert mine["per_step"] == 1
    # the same scan left to the compiler all-reduces once per micro-batch
    assert rows[("jit scan (strided)", 2)]["in_loop"] == {"all-reduce": 1}
    assert rows[("python loop", 2)]["per_step"] == 2
