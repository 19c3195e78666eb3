"""A CNN with BatchNorm on scikit-learn's digits: full batch, accumulation, per-micro-batch steps.

BatchNorm is where accumulation stops being exact: a micro-batch of N/k examples is
normalised with its own statistics, not the full batch's. This example shows how much that
matters and what the two BatchNorm modes of ``jaxaccum.flax.train_step`` do about the
running statistics, which are what the model uses at evaluation.

All runs start from the same parameters and see the same batches of N training images in
the same order:

- ``full batch``: one Adam update per batch of N (``jaxaccum.flax.train_step`` with k=1,
  which is the plain step: no loop).
- ``accumulate, sequential``: k micro-batches, one update; running statistics updated once
  per micro-batch (k momentum updates per step), as a hand-written loop would.
- ``accumulate, exact``: k micro-batches, one update; running statistics updated once per
  step from the k micro-batches' statistics merged exactly.
- ``per-micro-batch updates``: the alternative to accumulation: k updates per batch, each
  on N/k examples (same examples, k times more and smaller steps).

The table shows the final training loss (mean over the last batch), the test loss and
accuracy in evaluation mode (with the running statistics), and how far the first
BatchNorm's running mean is from the full-batch run's. The PNG plots training loss and test
accuracy over the updates of N examples.

Run ``python examples/digits_cnn_batchnorm.py`` (about a minute on 2 cores) or see ``--help``.
Needs ``jax``, ``optax``, ``flax``, ``scikit-learn``, ``matplotlib``, ``tqdm`` and ``jaxaccum``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxaccum.flax as jf

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "plots" / "digits_cnn_batchnorm.png"
Batch = dict[str, jax.Array]
Data = dict[str, np.ndarray]
Step = Callable[[jf.TrainState, Batch], tuple[jf.TrainState, Any]]


class CNN(nn.Module):
    """Conv -> BatchNorm -> ReLU twice (the second with stride 2), mean-pool, classifier."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for width, stride in ((16, 1), (32, 2)):
            x = nn.Conv(width, (3, 3), strides=stride)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def loss_fn(apply: Any, batch: Batch) -> jax.Array:
    """Mean cross-entropy over the examples of a (micro-)batch, in training mode."""
    logits = apply(batch["x"], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def load_data(seed: int) -> tuple[Data, Data]:
    """Digits as 8x8x1 images scaled to [0, 1], split 80/20 (stratified)."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return {"x": x_tr, "y": y_tr.astype(np.int32)}, {"x": x_te, "y": y_te.astype(np.int32)}


@jax.jit
def evaluate(state: jf.TrainState, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Loss and accuracy in evaluation mode (BatchNorm uses the running statistics)."""
    logits = state.apply_fn({"params": state.params, **state.collections}, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="batches of N per run")
    parser.add_argument("--batch-size", type=int, default=256, help="examples per batch (N)")
    parser.add_argument("--k", type=int, default=8, help="micro-batches per batch")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--eval-every", type=int, default=10, help="test interval, in batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="PNG path")
    args = parser.parse_args(argv)
    if args.k < 1 or args.batch_size % args.k:
        parser.error(f"--k {args.k} must divide --batch-size {args.batch_size}")
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be at least 1")
    return args


def plot(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """Training loss per batch and test accuracy, one line per run."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        left.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], label=r["name"], lw=1.1)
        right.plot(r["eval_steps"], r["test_accs"], label=r["name"], lw=1.1)
    left.set(xlabel="batches of N seen", ylabel="training loss", yscale="log", title="loss")
    right.set(xlabel="batches of N seen", ylabel="test accuracy (eval mode)", title="accuracy")
    left.legend()
    right.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trains the four runs, prints the table, saves the plot; returns one dict per run."""
    args = parse_args(argv)
    train, test = load_data(args.seed)
    rng = np.random.default_rng(args.seed)
    order = [rng.permutation(len(train["y"]))[: args.batch_size] for _ in range(args.steps)]
    model = CNN()
    variables = model.init(jax.random.key(args.seed), jnp.zeros((2, 8, 8, 1)), train=False)
    state0 = jf.TrainState.from_variables(model.apply, variables, optax.adam(args.lr))
    k = args.k
    print(
        f"digits: {len(train['y'])} train / {len(test['y'])} test images, N={args.batch_size} "
        f"per batch, k={k}, {args.steps} batches per run, {jax.devices()[0].platform} backend"
    )

    def per_batch(step: Step) -> Step:
        return step

    def per_micro_batch(step: Step) -> Step:
        def k_updates(state: jf.TrainState, batch: Batch) -> tuple[jf.TrainState, Any]:
            losses = []
            for j in range(k):
                state, metrics = step(state, jax.tree.map(lambda x, j=j: x[j::k], batch))
                losses.append(metrics.loss)
            return state, jf.TrainMetrics(jnp.mean(jnp.stack(losses)), *([None] * 5))

        return k_updates

    one = jax.jit(jf.train_step(loss_fn, 1))
    runs: list[tuple[str, str, int, Step]] = [
        ("full batch", "-", 1, per_batch(one)),
        ("accumulate, sequential", "sequential", k, jax.jit(jf.train_step(loss_fn, k))),
        (
            "accumulate, exact",
            "exact",
            k,
            jax.jit(jf.train_step(loss_fn, k, batch_norm="exact")),
        ),
        ("per-micro-batch updates", "-", k, per_micro_batch(one)),
    ]
    rows: list[dict[str, Any]] = []
    interval = 0.1 if sys.stderr.isatty() else 5.0
    for name, mode, run_k, step in runs:
        state, losses, eval_steps, test_accs = state0, [], [], []
        with tqdm(total=args.steps, desc=name, unit="batch", mininterval=interval) as bar:
            for t, idx in enumerate(order):
                batch = {"x": jnp.asarray(train["x"][idx]), "y": jnp.asarray(train["y"][idx])}
                state, metrics = step(state, batch)
                losses.append(float(metrics.loss))
                if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
                    eval_steps.append(t + 1)
                    test_accs.append(float(evaluate(state, test["x"], test["y"])[1]))
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                bar.update()
        test_loss, test_acc = evaluate(state, test["x"], test["y"])
        rows.append(
            {
                "name": name,
                "bn_mode": mode,
                "k": run_k,
                "losses": losses,
                "eval_steps": eval_steps,
                "test_accs": test_accs,
                "final_loss": losses[-1],
                "test_loss": float(test_loss),
                "test_acc": float(test_acc),
                "state": state,
            }
        )
    reference = rows[0]["state"].collections["batch_stats"]["BatchNorm_0"]["mean"]
    for r in rows:
        mean = r["state"].collections["batch_stats"]["BatchNorm_0"]["mean"]
        r["bn0_mean_dev"] = float(jnp.max(jnp.abs(mean - reference)))
    print(
        "| run | k | BN running statistics | final train loss | test loss | test acc "
        "| max abs Δ BN_0 running mean |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['name']} | {r['k']} | {r['bn_mode']} | {r['final_loss']:.4f} "
            f"| {r['test_loss']:.4f} | {r['test_acc']:.4f} | {r['bn0_mean_dev']:.1e} |"
        )
    plot(rows, args.out)
    print(f"plot: {args.out}")
    return rows


if __name__ == "__main__":
    main()
