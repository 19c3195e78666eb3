"""The examples run end to end with tiny settings and report sane results."""

from __future__ import annotations

import math

import pytest
from helpers import load_example

# Examples and benchmarks: run by .ci/run, left out with -m 'not slow'.
pytestmark = pytest.mark.slow


def test_train_digits_accumulated_runs_track_the_full_batch(monkeypatch, capsys):
    main = load_example("train_digits", monkeypatch).main
    rows = main(["--steps", "5", "--ks", "2,4", "--builder-ks", "4"])

    names = [r["name"] for r in rows]
    assert names == [
        "full batch",
        "control: rows reversed",
        "accumulate k=2",
        "accumulate k=4",
        "train_step k=4",
        "multi_steps k=4",
    ]
    assert [(r["k"], r["micro_batch"]) for r in rows] == [
        (1, 1024),
        (1, 1024),
        (2, 512),
        (4, 256),
        (4, 256),
        (4, 256),
    ]
    for r in rows:
        assert r["steps"] == len(r["losses"]) == 5, r["name"]
        assert all(math.isfinite(loss) for loss in r["losses"]), r["name"]
        assert r["final_loss"] < r["losses"][0], r["name"]
        assert 0.0 <= r["test_acc"] <= 1.0, r["name"]
        assert r["max_abs_dparams"] < 1e-4, r["name"]
        assert r["max_abs_dgrads"] < 1e-6, r["name"]
        assert r["temp_bytes"] > 0 and r["step_ms"] > 0, r["name"]
    assert rows[0]["max_abs_dparams"] == rows[0]["max_abs_dgrads"] == 0.0
    # Only one micro-batch's activations are alive in the accumulated train step.
    assert rows[3]["temp_bytes"] < rows[2]["temp_bytes"] < rows[0]["temp_bytes"]

    out = capsys.readouterr().out
    assert "| run | k | micro-batch |" in out
    assert all(f"| {name} |" in out for name in names)
