"""The CNN + BatchNorm digits example runs end to end with tiny settings."""

from __future__ import annotations

import math

import pytest
from helpers import load_example

# Examples and benchmarks: run by .ci/run, left out with -m 'not slow'.
pytestmark = pytest.mark.slow


def test_digits_cnn_batchnorm_runs_and_exact_mode_follows_the_full_batch(
    monkeypatch, tmp_path, capsys
):
    module = load_example("digits_cnn_batchnorm", monkeypatch)
    png = tmp_path / "cnn.png"
    rows = module.main(["--steps", "1", "--batch-size", "64", "--k", "4", "--out", str(png)])

    assert [r["name"] for r in rows] == [
        "full batch",
        "accumulate, sequential",
        "accumulate, exact",
        "per-micro-batch updates",
    ]
    for r in rows:
        assert all(math.isfinite(x) for x in r["losses"]) and 0.0 <= r["test_acc"] <= 1.0
    # After one step from the same parameters, the first BatchNorm sees the same inputs in
    # every run: exact merging gives the full batch's running mean, k momentum updates do not.
    _, sequential, exact, _ = rows
    assert exact["bn0_mean_dev"] < 1e-5
    assert sequential["bn0_mean_dev"] > 1e-3
    assert png.stat().st_size > 0
    assert "| accumulate, exact | 4 | exact |" in capsys.readouterr().out
