"""The token-weighted LM example runs end to end with tiny settings."""

from __future__ import annotations

import math

import pytest
from helpers import load_example

# Examples and benchmarks: run by .ci/run, left out with -m 'not slow'.
pytestmark = pytest.mark.slow


def test_token_weighted_lm_tracks_the_full_batch_and_the_mean_of_means_does_not(
    monkeypatch, tmp_path, capsys
):
    module = load_example("token_weighted_lm", monkeypatch)
    png = tmp_path / "lm.png"
    args = ["--steps", "3", "--batch-size", "16", "--k", "4", "--length", "32"]
    full, weighted, naive = module.main([*args, "--eval-every", "1", "--out", str(png)])

    assert [r["name"] for r in (full, weighted, naive)] == [
        "full batch",
        "token-weighted k=4",
        "mean of means k=4",
    ]
    for r in (full, weighted, naive):
        assert len(r["losses"]) == len(r["dparams"]) == 3
        assert all(math.isfinite(x) for x in r["losses"] + r["held_out_losses"])
    # Weighted: the full-batch gradient to float32 round-off. Naive: a different gradient.
    assert weighted["max_abs_dgrads"] < 1e-6
    assert naive["max_abs_dgrads"] > 1e-4
    assert naive["max_abs_dparams"] > 10 * weighted["max_abs_dparams"]
    assert png.stat().st_size > 0
    assert "| token-weighted k=4 |" in capsys.readouterr().out
