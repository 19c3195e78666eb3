"""The examples in ``examples/`` run end to end on tiny settings and report what they claim.

Each example is imported the way its ``main.py`` runs it, with ``examples/`` on the path.
References: the examples' own full-batch runs (their tables compare against them) and, for
BatchNorm's running statistics, plain Flax ``apply(..., mutable=["batch_stats"])`` calls.
"""

from __future__ import annotations

import importlib
import math
import pathlib
from types import ModuleType
from typing import Any

import pytest
from helpers import assert_trees_close

# Examples and benchmarks: run by .ci/run, left out with -m 'not slow'.
pytestmark = pytest.mark.slow

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(module: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Imports ``module`` (e.g. ``"cnn_batchnorm.main"``) with ``examples/`` on the path."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module(module)


def plain_flax_running_means(train: Any, config: Any) -> tuple[Any, Any]:
    """BatchNorm_0's running mean after the first batch, by plain Flax calls: one call on
    the whole batch, and k calls on its strided micro-batches in order."""
    data, _ = train.load_data(config.seed)
    digits = importlib.import_module("common.digits")
    order = digits.batch_order(len(data["y"]), config.batch_size, 1, config.seed)
    x = digits.take(data, order[0])["x"]
    state = train.create_state(config)

    def update(stats: Any, images: Any) -> Any:
        variables = {"params": state.params, **stats}
        _, new = train.CNN().apply(variables, images, train=True, mutable=["batch_stats"])
        return new

    whole, sequential = update(state.collections, x), state.collections
    for j in range(config.k):
        sequential = update(sequential, x[j :: config.k])
    return (
        whole["batch_stats"]["BatchNorm_0"]["mean"],
        sequential["batch_stats"]["BatchNorm_0"]["mean"],
    )


def test_cnn_batchnorm_exact_mode_keeps_the_full_batch_running_statistics(
    monkeypatch, tmp_path, capsys
):
    main = load("cnn_batchnorm.main", monkeypatch)
    train = load("cnn_batchnorm.train", monkeypatch)
    png = tmp_path / "cnn.png"
    rows = main.main(["--steps", "1", "--batch-size", "64", "--k", "4", "--out", str(png)])

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
    full, sequential, exact, _ = rows
    assert exact["bn0_mean_dev"] < 1e-5
    assert sequential["bn0_mean_dev"] > 1e-3
    whole, in_order = plain_flax_running_means(train, train.Config(batch_size=64, k=4))
    assert_trees_close(train.bn0_running_mean(full["state"]), whole)
    assert_trees_close(train.bn0_running_mean(exact["state"]), whole)
    assert_trees_close(train.bn0_running_mean(sequential["state"]), in_order)
    assert png.stat().st_size > 0
    assert "| accumulate, exact | 4 | exact |" in capsys.readouterr().out


def test_mlp_digits_accumulated_runs_track_the_full_batch(monkeypatch, tmp_path, capsys):
    main = load("mlp_digits.main", monkeypatch)
    png = tmp_path / "mlp.png"
    rows = main.main(["--steps", "5", "--ks", "2,4", "--builder-ks", "4", "--out", str(png)])

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
    assert png.stat().st_size > 0
    out = capsys.readouterr().out
    assert "| run | k | micro-batch |" in out
    assert all(f"| {name} |" in out for name in names)


def test_mlp_digits_repeats_its_results_exactly(monkeypatch, capsys):
    train = load("mlp_digits.train", monkeypatch)
    config = train.Config(steps=2, ks=(2,), builder_ks=(), batch_size=64)
    first, second = train.train_and_evaluate(config), train.train_and_evaluate(config)

    measured = ("step_ms",)  # a timing, the one figure that may change
    assert [{k: v for k, v in r.items() if k not in measured} for r in first] == [
        {k: v for k, v in r.items() if k not in measured} for r in second
    ]


def test_mlp_digits_rejects_a_k_that_does_not_divide_the_batch(monkeypatch, capsys):
    main = load("mlp_digits.main", monkeypatch)
    with pytest.raises(SystemExit):
        main.main(["--ks", "3", "--batch-size", "64"])
    assert "k values [3] (--ks, --builder-ks) do not divide --batch-size 64" in (
        capsys.readouterr().err
    )


def test_token_weighted_lm_tracks_the_full_batch_and_the_mean_of_means_does_not(
    monkeypatch, tmp_path, capsys
):
    main = load("token_weighted_lm.main", monkeypatch)
    png = tmp_path / "lm.png"
    args = ["--steps", "3", "--batch-size", "16", "--k", "4", "--length", "32"]
    full, weighted, naive = main.main([*args, "--eval-every", "1", "--out", str(png)])

    assert [r["name"] for r in (full, weighted, naive)] == [
        "full batch",
        "token-weighted k=4",
        "mean of means k=4",
    ]
    for r in (full, weighted, naive):
        assert len(r["losses"]) == len(r["dparams"]) == 3
        assert all(math.isfinite(x) for x in r["losses"] + r["held_out_losses"])
    assert full["max_abs_dgrads"] == full["max_abs_dparams"] == 0.0
    # Weighted: the full-batch gradient to float32 round-off. Naive: a different gradient.
    assert weighted["max_abs_dgrads"] < 1e-6
    assert naive["max_abs_dgrads"] > 1e-4
    assert naive["max_abs_dparams"] > 10 * weighted["max_abs_dparams"]
    assert png.stat().st_size > 0
    assert "| token-weighted k=4 |" in capsys.readouterr().out


def test_equinox_mnist_entry_points_track_the_full_batch(monkeypatch, tmp_path, capsys):
    main = load("equinox_mnist.main", monkeypatch)
    png = tmp_path / "equinox.png"
    args = ["--steps", "2", "--batch-size", "64", "--k", "4", "--eval-every", "1"]
    rows = main.main([*args, "--out", str(png)])

    assert [r["name"] for r in rows] == [
        "full batch",
        "control: rows reversed",
        "accumulate k=4",
        "train_step k=4",
        "multi_steps k=4",
    ]
    for r in rows:
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"]), r["name"]
        assert 0.0 <= r["test_acc"] <= 1.0, r["name"]
        # Every run is the full batch's up to float32 round-off (Adam's first steps move
        # each weight by about the learning rate, so round-off shows at about 1e-5).
        assert r["max_abs_dparams"] < 1e-4, r["name"]
    assert rows[0]["max_abs_dparams"] == 0.0
    # What is not an inexact array (the activation functions, jnp.ravel) is passed through.
    assert all(r["model"].layers[2] is rows[0]["model"].layers[2] for r in rows)
    assert png.stat().st_size > 0
    assert "| train_step k=4 | 4 |" in capsys.readouterr().out
