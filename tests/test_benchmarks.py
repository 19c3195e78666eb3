"""The benchmark script runs end to end in quick mode and compares like with like.

Only correctness is checked here: step times depend on the machine and are never asserted.
"""

from __future__ import annotations

import json
import pathlib
import runpy

import pytest

# Examples and benchmarks: run by .ci/run, left out with -m 'not slow'.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_accumulate.py"
METHODS = {
    "full batch",
    "jaxaccum.accumulate",
    "optax.microbatch",
    "optax.MultiSteps",
    "python loop",
    "jaxaccum.train_step",
    "jaxaccum.multi_steps",
}


def test_quick_benchmark_writes_json_and_every_method_matches_full_batch(tmp_path, capsys):
    out = tmp_path / "accumulate.json"
    main = runpy.run_path(str(SCRIPT), run_name="bench_accumulate")["main"]
    main(["--quick", "--out", str(out)])

    report = json.loads(out.read_text())
    assert {"platform", "cpu", "cores", "jax", "jaxlib", "optax", "devices"} <= set(
        report["machine"]
    )
    rows = report["results"]
    assert {(r["k"], r["method"]) for r in rows} == {(k, m) for k in (1, 2, 4) for m in METHODS}
    for r in rows:
        assert r["grad_max_abs_diff"] < 1e-4, r
        assert r["loss_abs_diff"] < 1e-4, r
        assert r["temp_bytes"] >= 0 and len(r["times_ms"]) == report["settings"]["reps"]
    assert "| k | method |" in capsys.readouterr().out
