"""``python -m benchmarks``: every mode runs end to end with its smallest settings.

One run of ``python -m benchmarks all --smoke`` (each mode in its own process, two at a
time) feeds the checks of every mode's output. Only correctness and the shape of what the
modes print and write are checked: step times depend on the machine and are never asserted.
"""

from __future__ import annotations

import importlib
import itertools
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

# Examples and benchmarks: run by .ci/run, left out with -m 'not slow'.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("suite", "builders", "multisteps", "batchnorm", "collectives", "fsdp-memory")
MACHINE = {"platform", "cpu", "cores", "jax", "jaxlib", "optax", "backend", "devices"}
TOL = 1e-4  # float32 round-off of a gradient over a few dozen examples

SUITE_MODELS = ("mlp", "cnn", "transformer")
PEERS = {"optax.microbatch", "optax.MultiSteps", "python loop", "hand-written scan"}
SUITE_METHODS = {"full batch", "jaxaccum.accumulate", *PEERS}
SUITE_ROW_KEYS = {
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
BUILDERS_METHODS = {
    "full batch",
    "jaxaccum.accumulate",
    "optax.microbatch",
    "optax.MultiSteps",
    "python loop",
    "jaxaccum.train_step",
    "jaxaccum.multi_steps",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Runs ``python -m benchmarks all --smoke``; returns its output folder and stdout."""
    out = tmp_path_factory.mktemp("benchmarks")
    cmd = [sys.executable, "-m", "benchmarks", "all", "--smoke", "--jobs", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    return out, proc.stdout


@pytest.fixture
def cli(monkeypatch):
    """The entry point's ``main``, imported in this process."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.__main__").main


def read(smoke, name):
    return json.loads((smoke[0] / name).read_text())


def test_all_runs_every_mode_in_its_own_process(smoke):
    _, stdout = smoke
    for mode in MODES:
        assert f"$ python -m benchmarks {mode} " in stdout, mode
    assert "all: 6 of 6 modes ran; failed: none" in stdout


def test_builders_mode_matches_the_full_batch_with_every_method(smoke):
    report = read(smoke, "builders.json")
    assert set(report["machine"]) >= MACHINE and report["machine"]["backend"] == "cpu"
    assert report["settings"]["ks"] == [2]
    assert {(r["k"], r["method"]) for r in report["results"]} == {(2, m) for m in BUILDERS_METHODS}
    for r in report["results"]:
        assert r["grad_max_abs_diff"] < TOL and r["loss_abs_diff"] < TOL, r["method"]
        assert r["temp_bytes"] >= 0 and len(r["times_ms"]) == report["settings"]["reps"]
    assert "| k | method | median ms | × full batch |" in smoke[1]


def test_multisteps_mode_emits_on_the_kth_call_like_optax(smoke):
    report = read(smoke, "multisteps.json")
    assert set(report["machine"]) >= MACHINE
    rows = {(r["method"], r["call"]): r for r in report["results"]}
    assert rows[("gradient only", "-")]["ratio_to_grad"] == 1.0
    for method in (
        "optax.MultiSteps",
        "jaxaccum multi_steps",
        "jaxaccum multi_steps, weighted",
        "jaxaccum multi_steps, weighted, runtime_checks=False",
    ):
        for call in ("non-emitting", "emitting"):
            r = rows[(method, call)]
            # the same AdamW update as optax.MultiSteps after k calls, to round-off
            assert r["params_max_abs_diff_vs_optax"] < 1e-6, (method, call)
            assert r["state_bytes"] > rows[("grad + adamw", "-")]["state_bytes"]
            assert r["median_ms"] > 0 and len(r["times_ms"]) == report["settings"]["reps"]
    ours = rows[("jaxaccum multi_steps", "non-emitting")]["state_bytes"]
    theirs = rows[("optax.MultiSteps", "non-emitting")]["state_bytes"]
    assert 0 < ours - theirs <= 16  # two scalars more: the weight sum and the emitted flag
    assert "| method | call | median ms | × gradient only |" in smoke[1]


def test_batchnorm_mode_exact_merging_reproduces_the_first_layer(smoke):
    report = read(smoke, "batchnorm.json")
    assert report["settings"] == {"batch": 64, "k": 2}
    layers = report["layers"]
    assert set(layers) == {"exact", "sequential"}
    assert set(layers["exact"]) == {f"BatchNorm_{i}" for i in range(4)}
    # The first BatchNorm sees the raw input: exact merging gives the full batch's
    # statistics to float32 round-off; k momentum updates do not (negative control).
    assert layers["exact"]["BatchNorm_0"][0] < 1e-6
    assert layers["sequential"]["BatchNorm_0"][0] > 1e-3
    # Deeper layers: close to the full batch with exact merging, far from it sequentially.
    assert all(relative < 1e-2 for _, relative in layers["exact"].values())
    assert all(relative > 1e-2 for _, relative in layers["sequential"].values())
    assert "| mode | layer | max abs Δ mean |" in smoke[1]


def test_collectives_mode_counts_one_all_reduce_per_step_for_jaxaccum(smoke):
    result = read(smoke, "collectives.json")
    assert len(result["devices"]) == 8 and set(result["machine"]) >= MACHINE
    rows = {(r["method"], r["k"]): r for r in result["rows"]}
    assert {method for method, _ in rows} == {
        "jaxaccum data_axis",
        "jaxaccum data_axis (Auto)",
        "jit scan (strided)",
        "jit scan (contiguous, Auto)",
        "optax.microbatch (Auto)",
        "python loop",
    }
    widths = (784, 1024, 1024, 10)
    kernels = 4 * sum(a * b for a, b in itertools.pairwise(widths))
    biases = 4 * sum(widths[1:])
    mine = rows[("jaxaccum data_axis", 2)]
    # the weight matrices reduced once after the loop; the biases and the loss in it
    assert mine["bytes_outside_loop"] == kernels and mine["bytes_in_loop"] == biases + 4
    # the same scan left as written all-reduces every gradient once per micro-batch
    naive = rows[("jit scan (strided)", 2)]
    assert naive["bytes_in_loop"] == kernels + biases + 4 and naive["bytes_outside_loop"] == 0
    assert rows[("python loop", 2)]["per_step"] == 2
    assert "| method | k | in loop (bytes) | outside loop (bytes) | run per step |" in smoke[1]


def test_fsdp_memory_mode_shards_the_accumulator(smoke):
    result = read(smoke, "fsdp_memory.json")
    rows = {(r["layout"], r["k"]): r for r in result["rows"]}
    expected = {
        (f"{kind}: {name}", k)
        for kind in ("explicit", "auto")
        for name, k in (("FSDP, no accumulation", 1), ("per_microbatch", 2), ("gather_once", 2))
    } | {
        ("auto, used whole: FSDP, no accumulation", 1),
        ("auto, used whole: strided split", 2),
        ("auto, used whole: contiguous split", 2),
        ("auto, used whole: hand-written pinned scan, strided", 2),
        ("auto, used whole: hand-written pinned scan, contiguous", 2),
    }
    assert set(rows) == expected
    for r in rows.values():
        peak = r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]
        assert r["peak_bytes"] == peak, r["layout"]
    grads = result["param_bytes"]
    for kind in ("explicit", "auto"):
        assert rows[f"{kind}: FSDP, no accumulation", 1]["accumulator_bytes"] == 0
        # each device accumulates its eighth of the float32 gradient, or all of it
        small = rows[f"{kind}: per_microbatch", 2]["accumulator_bytes"] - grads // 8
        assert 0 < small < 64
        # gathered once, the gradient is accumulated whole where the types defer its
        # reduction (Explicit); on Auto axes the compiler reduces it in the loop, sharded
        whole = grads if kind == "explicit" else grads // 8
        assert rows[f"{kind}: gather_once", 2]["accumulator_bytes"] == whole + small
    assert "| model and mesh: strategy | k | peak (MiB) |" in smoke[1]


def test_suite_mode_writes_every_row_and_file(smoke):
    out = smoke[0] / "suite"
    report = json.loads((out / "suite.json").read_text())
    assert set(report["machine"]) >= MACHINE
    settings = report["settings"]
    assert settings["mode"] == "smoke" and settings["ks"] == [2]
    assert set(settings["workloads"]) == set(SUITE_MODELS)
    expected = set(itertools.product(SUITE_MODELS, (2,), SUITE_METHODS))
    expected |= {(model, 2, "jaxaccum.accumulate unroll=True") for model in SUITE_MODELS}
    assert {(r["model"], r["k"], r["method"]) for r in report["rows"]} == expected
    for r in report["rows"]:
        assert set(r) >= SUITE_ROW_KEYS, r["method"]
        assert len(r["times_ms"]) == 2 and r["temp_bytes"] >= 0
        assert r["achieved_flops_per_s"] > 0 and r["mfu"] is None  # CPU: no known peak
    assert {(s["model"], s["k"]) for s in report["summary"]} == {(m, 2) for m in SUITE_MODELS}
    for s in report["summary"]:
        assert set(s) >= SUMMARY_KEYS and s["fastest_peer"] in PEERS
        assert s["jaxaccum_le_fastest_peer"] == (s["jaxaccum_vs_fastest_peer"] <= 1.0)
    for name in ("suite.md", "time_ratio.png", "temp_memory.png", "collectives.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "suite.md").read_text()
    assert "## cnn" in text and "| k | method | step ms |" in text
    assert "| model | k | jaxaccum × full | fastest peer |" in text
    assert "| model | k=2 | largest k / k=2 |" in text
    assert "| model | k | unroll | × full |" in text
    assert "| method | k | in loop (bytes) | outside loop (bytes) |" in text
    assert text in smoke[1]  # printed as written


def test_suite_compile_and_unroll_sections(smoke):
    report = json.loads((smoke[0] / "suite" / "suite.json").read_text())
    compile_rows = {r["model"]: r for r in report["compile"]}
    assert set(compile_rows) == set(SUITE_MODELS)
    for r in compile_rows.values():
        assert set(r["compile_s"]) == {"2"} and r["largest_k"] == 2
        assert r["largest_k_over_k2"] is None  # needs a k above 2
    unroll = [(r["model"], r["unroll"]) for r in report["unroll"]]
    assert unroll == [(model, u) for model in SUITE_MODELS for u in (1, True)]
    for r in report["unroll"]:
        assert r["k"] == 2 and r["temp_bytes"] >= 0 and r["compile_s"] > 0
        if r["unroll"] == 1 and r["unroll"] is not True:  # True == 1 in Python
            assert r["temp_over_unroll_1"] == 1.0


def test_suite_every_method_matches_its_reference(smoke):
    report = json.loads((smoke[0] / "suite" / "suite.json").read_text())
    tol = report["settings"]["tolerance"]
    for r in report["rows"]:
        assert r["ok"], r
        assert r["loss_abs_diff"] <= tol and r["grad_max_abs_diff"] <= tol, r
        if r["model"] != "cnn":
            assert r["reference"] == "full batch" and r["state_max_abs_diff"] is None


def test_suite_batchnorm_statistics_are_carried_except_by_optax_microbatch(smoke):
    report = json.loads((smoke[0] / "suite" / "suite.json").read_text())
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
    averaged = [r for r in cnn if r["method"] == "optax.microbatch"]
    assert averaged[0]["state_max_abs_diff"] > tol  # a real difference, not a no-op check


def test_suite_collectives_section(smoke):
    report = json.loads((smoke[0] / "suite" / "suite.json").read_text())
    rows = {(r["method"], r["k"]): r for r in report["collectives"]}
    assert (
        rows[("jaxaccum data_axis", 2)]["bytes_in_loop"]
        < rows[("jit scan (strided)", 2)]["bytes_in_loop"]
    )
    assert rows[("optax.microbatch (Auto)", 2)]["in_loop"] == {"all-reduce": 1}


def test_suite_rereport_rewrites_the_same_report(smoke, cli, tmp_path, capsys):
    folder = tmp_path / "suite"
    shutil.copytree(smoke[0] / "suite", folder)
    (folder / "suite.md").unlink()
    cli(["suite", "--rereport", str(folder)])
    assert (folder / "suite.md").read_text() == (smoke[0] / "suite" / "suite.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_collectives_plot_takes_rows(cli, tmp_path):
    plot = importlib.import_module("benchmarks.report").plot_collectives
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


def test_help_lists_every_mode():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for mode in (*MODES, "all"):
        assert f"    {mode}" in proc.stdout, mode


@pytest.mark.parametrize(
    "argv",
    [
        ["suite", "--smoke", "--ks", "3"],
        ["suite", "--smoke", "--models", "rnn"],
        ["suite", "--quick", "--full"],
        ["builders", "--quick", "--ks", "3"],
        ["builders", "--ks", "two"],
        ["multisteps", "--k", "1"],
        ["batchnorm", "--batch", "10", "--k", "3"],
        ["collectives", "--ks", "2", "--batch", "24"],
        ["fsdp-memory", "--ks", "0"],
        ["all", "--jobs", "0"],
        ["no-such-mode"],
    ],
)
def test_bad_command_lines_are_refused(argv, cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2  # argparse's usage error, before anything runs
    assert "usage: python -m benchmarks" in capsys.readouterr().err
