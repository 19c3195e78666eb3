"""A CNN with BatchNorm on digits: the full batch, accumulation in both BatchNorm modes, and
per-micro-batch updates, from the same parameters on the same batches.

The runs (README.md says what each shows):

- ``full batch``: one Adam update per batch of N, ``jaxaccum.flax.train_step`` with k = 1.
- ``accumulate, sequential``: k micro-batches, one update; the running statistics take one
  momentum update per micro-batch, as in a hand-written loop.
- ``accumulate, exact``: k micro-batches, one update; the running statistics take one
  momentum update per step, from the k micro-batches' statistics merged exactly.
- ``per-micro-batch updates``: k updates per batch, each on N/k of its examples.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import digits, report

import jaxaccum.flax as jf

Batch = dict[str, jax.Array]
Row = dict[str, Any]
Step = Callable[[jf.TrainState, Batch], tuple[jf.TrainState, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings of one invocation (``main.py`` sets them from its flags).

    Attributes:
      steps: batches of N per run.
      batch_size: examples per batch, N.
      k: micro-batches per batch; divides ``batch_size``.
      lr: Adam's learning rate.
      eval_every: test interval, in batches.
      seed: fixes the split, the initial parameters and the batch order.
    """

    steps: int = 150
    batch_size: int = 256
    k: int = 8
    lr: float = 3e-3
    eval_every: int = 10
    seed: int = 0


class CNN(nn.Module):
    """Conv -> BatchNorm -> ReLU twice (the second with stride 2), mean-pool, classifier."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for width, stride in ((16, 1), (32, 2)):
            x = nn.Conv(width, (3, 3), strides=stride)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def loss_fn(apply: Callable[..., jax.Array], batch: Batch) -> jax.Array:
    """Mean cross-entropy over the examples of a (micro-)batch, in training mode."""
    logits = apply(batch["x"], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def load_data(seed: int) -> tuple[digits.Data, digits.Data]:
    """Digits as 8x8x1 float32 images in [0, 1]: ``(train, test)``, split 80/20."""

    def images(data: digits.Data) -> digits.Data:
        return {"x": (data["x"] / 16.0).astype(np.float32).reshape(-1, 8, 8, 1), "y": data["y"]}

    train, test = digits.split(seed)
    return images(train), images(test)


def create_state(config: Config) -> jf.TrainState:
    """The CNN's initial parameters and running statistics, with Adam's state."""
    model = CNN()
    variables = model.init(jax.random.key(config.seed), jnp.zeros((2, 8, 8, 1)), train=False)
    return jf.TrainState.from_variables(model.apply, variables, optax.adam(config.lr))


@jax.jit
def evaluate(state: jf.TrainState, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Loss and accuracy in evaluation mode (BatchNorm uses the running statistics)."""
    logits = state.apply_fn({"params": state.params, **state.collections}, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


class Run(NamedTuple):
    """One way of training: its label, BatchNorm mode, k, and one update on a batch of N."""

    name: str
    bn_mode: str
    k: int
    step: Step


def loss_of(step: Callable[..., tuple[jf.TrainState, Any]]) -> Step:
    """``step`` returning its metrics' loss instead of the metrics."""

    def update(state: jf.TrainState, batch: Batch) -> tuple[jf.TrainState, jax.Array]:
        state, metrics = step(state, batch)
        return state, metrics.loss

    return update


def per_micro_batch(step: Step, k: int) -> Step:
    """k calls of ``step`` per batch, on micro-batches j, j+k, j+2k, …; their mean loss."""

    def k_updates(state: jf.TrainState, batch: Batch) -> tuple[jf.TrainState, jax.Array]:
        losses = []
        for j in range(k):
            state, loss = step(state, jax.tree.map(lambda x, j=j: x[j::k], batch))
            losses.append(loss)
        return state, jnp.mean(jnp.stack(losses))

    return k_updates


def runs(k: int) -> list[Run]:
    """The four runs, each step jitted."""
    one = loss_of(jax.jit(jf.train_step(loss_fn, 1)))
    sequential = jax.jit(jf.train_step(loss_fn, k))
    exact = jax.jit(jf.train_step(loss_fn, k, batch_norm="exact"))
    return [
        Run("full batch", "-", 1, one),
        Run("accumulate, sequential", "sequential", k, loss_of(sequential)),
        Run("accumulate, exact", "exact", k, loss_of(exact)),
        Run("per-micro-batch updates", "-", k, per_micro_batch(one, k)),
    ]


def train_run(
    run: Run, state: jf.TrainState, train: digits.Data, test: digits.Data, config: Config
) -> Row:
    """Trains one run on the batches of ``config`` and evaluates it.

    Returns:
      The run's row: ``name``, ``bn_mode``, ``k``, the training loss per batch (``losses``,
      ``final_loss``), the test accuracy every ``eval_every`` batches (``eval_steps``,
      ``test_accs``), the final ``test_loss`` and ``test_acc``, and the final ``state``.
    """
    order = digits.batch_order(len(train["y"]), config.batch_size, config.steps, config.seed)
    losses, eval_steps, test_accs = [], [], []
    with report.progress(len(order), run.name, "batch") as bar:
        for t, idx in enumerate(order):
            state, loss = run.step(state, digits.take(train, idx))
            losses.append(float(loss))
            if (t + 1) % config.eval_every == 0 or t + 1 == len(order):
                eval_steps.append(t + 1)
                test_accs.append(float(evaluate(state, test["x"], test["y"])[1]))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            bar.update()
    test_loss, test_acc = evaluate(state, test["x"], test["y"])
    return {
        **run._asdict(),
        "losses": losses,
        "eval_steps": eval_steps,
        "test_accs": test_accs,
        "final_loss": losses[-1],
        "test_loss": float(test_loss),
        "test_acc": float(test_acc),
        "state": state,
    }


def bn0_running_mean(state: jf.TrainState) -> jax.Array:
    """The running mean of the first BatchNorm layer."""
    return state.collections["batch_stats"]["BatchNorm_0"]["mean"]


def train_and_evaluate(config: Config) -> list[Row]:
    """Trains the four runs from the same state; one row per run (see :func:`train_run`),
    plus ``bn0_mean_dev``: how far the first BatchNorm's running mean ends up from the
    full-batch run's (largest absolute difference)."""
    train, test = load_data(config.seed)
    print(
        f"digits: {len(train['y'])} train / {len(test['y'])} test images, "
        f"N={config.batch_size} per batch, k={config.k}, {config.steps} batches per run, "
        f"{jax.devices()[0].platform} backend"
    )
    state = create_state(config)
    rows = [train_run(run, state, train, test, config) for run in runs(config.k)]
    reference = bn0_running_mean(rows[0]["state"])
    for row in rows:
        row["bn0_mean_dev"] = report.max_abs_diff(bn0_running_mean(row["state"]), reference)
    return rows


def print_table(rows: Sequence[Row]) -> None:
    """The results as a Markdown table, one line per run."""
    header = ["run", "k", "BN running statistics", "final train loss", "test loss", "test acc"]
    header.append("max abs Δ BN_0 running mean")
    cells = [
        [
            r["name"],
            str(r["k"]),
            r["bn_mode"],
            *(f"{r[key]:.4f}" for key in ("final_loss", "test_loss", "test_acc")),
            f"{r['bn0_mean_dev']:.1e}",
        ]
        for r in rows
    ]
    print(report.markdown_table(header, "lrlrrrr", cells))


def plot(rows: Sequence[Row], path: pathlib.Path) -> None:
    """Training loss per batch and test accuracy, one line per run, saved to ``path``."""
    report.loss_and_accuracy(rows, path, "test accuracy (eval mode)")
