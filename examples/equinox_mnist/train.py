"""Equinox's CNN from its MNIST tutorial on digits: the full batch against accumulation.

Every run starts from the same model, sees the same batches of N images in the same order
and takes one AdamW update per batch:

- ``full batch``: the plain Equinox step, ``eqx.filter_value_and_grad(loss_fn)`` on all N
  images and an Optax update of ``eqx.filter(model, eqx.is_inexact_array)``.
- ``control: rows reversed``: the full batch with its rows reversed, the same gradient in
  exact arithmetic: how far float32 round-off alone carries over a training run.
- ``accumulate k=…``: the same step around
  ``jaxaccum.accumulate(eqx.filter_value_and_grad(loss_fn), k)``.
- ``train_step k=…``: ``jaxaccum.train_step(loss_fn, optimizer, k)``, with the model
  itself as the params.
- ``multi_steps k=…``: one micro-batch per call to the plain Equinox step, whose optimizer
  is ``jaxaccum.multi_steps(adamw, k)``: k calls make one update.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import digits, report

import jaxaccum

Batch = dict[str, jax.Array]
Row = dict[str, Any]
GradFn = Callable[[Any, Batch], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings of one invocation (``main.py`` sets them from its flags).

    Attributes:
      steps: batches of N per run.
      batch_size: images per batch, N.
      k: micro-batches per batch; divides ``batch_size``.
      lr: AdamW's learning rate.
      eval_every: test interval, in batches.
      seed: fixes the split, the initial model and the batch order.
    """

    steps: int = 200
    batch_size: int = 256
    k: int = 8
    lr: float = 1e-2
    eval_every: int = 10
    seed: int = 0


class CNN(eqx.Module):
    """The layer stack of Equinox's MNIST tutorial, sized for 8x8 images.

    Conv (3 channels, 4x4) -> max-pool (2x2, stride 1) -> ReLU -> flatten -> Linear(48,
    512) -> sigmoid -> Linear(512, 64) -> ReLU -> Linear(64, 10) -> log-softmax. The
    activation functions and ``jnp.ravel`` are leaves of the model, next to its weights.
    """

    layers: list[Any]

    def __init__(self, key: jax.Array) -> None:
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.layers = [
            eqx.nn.Conv2d(1, 3, kernel_size=4, key=k1),  # 1x8x8 -> 3x5x5
            eqx.nn.MaxPool2d(kernel_size=2),  # -> 3x4x4
            jax.nn.relu,
            jnp.ravel,  # -> 48
            eqx.nn.Linear(48, 512, key=k2),
            jax.nn.sigmoid,
            eqx.nn.Linear(512, 64, key=k3),
            jax.nn.relu,
            eqx.nn.Linear(64, 10, key=k4),
            jax.nn.log_softmax,
        ]

    def __call__(self, x: jax.Array) -> jax.Array:
        """Log-probabilities of the 10 classes for one 1x8x8 image."""
        for layer in self.layers:
            x = layer(x)
        return x


def loss_fn(model: CNN, batch: Batch) -> jax.Array:
    """Mean cross-entropy over the images of a (micro-)batch."""
    log_probs = jax.vmap(model)(batch["x"])
    return -jnp.mean(jnp.take_along_axis(log_probs, batch["y"][:, None], axis=1))


@eqx.filter_jit
def evaluate(model: CNN, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Test loss and accuracy."""
    log_probs = jax.vmap(model)(x)
    loss = -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))
    return loss, jnp.mean(jnp.argmax(log_probs, -1) == y)


def load_data(seed: int) -> tuple[digits.Data, digits.Data]:
    """Digits as 1x8x8 float32 images in [0, 1] (channels first): ``(train, test)``."""

    def images(data: digits.Data) -> digits.Data:
        return {"x": (data["x"] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), "y": data["y"]}

    train, test = digits.split(seed)
    return images(train), images(test)


def trained(model: CNN) -> Any:
    """The leaves an optimizer sees: the model's inexact arrays, None elsewhere."""
    return eqx.filter(model, eqx.is_inexact_array)


class Run(NamedTuple):
    """One way of training: its label, k, its state from a model, one update on a batch
    of N (returning the new state and the batch's loss), and the model in a state."""

    name: str
    k: int
    init: Callable[[CNN], Any]
    update: Callable[[Any, Batch], tuple[Any, jax.Array]]
    model: Callable[[Any], CNN]


def equinox_run(name: str, k: int, grad_fn: GradFn, optimizer: Any) -> Run:
    """The plain Equinox step around ``grad_fn``: one update per call."""

    @eqx.filter_jit
    def update(state: Any, batch: Batch) -> tuple[Any, jax.Array]:
        model, opt_state = state
        loss, grads = grad_fn(model, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trained(model))
        return (eqx.apply_updates(model, updates), opt_state), loss

    return Run(name, k, lambda m: (m, optimizer.init(trained(m))), update, lambda s: s[0])


def train_step_run(k: int, optimizer: Any) -> Run:
    """``jaxaccum.train_step`` with the model as the params."""
    step = jaxaccum.train_step(loss_fn, optimizer, k)

    @eqx.filter_jit
    def update(state: jaxaccum.TrainState, batch: Batch) -> tuple[Any, jax.Array]:
        state, metrics = step.update(state, batch)
        return state, metrics.loss

    return Run(f"train_step k={k}", k, step.init, update, lambda s: s.params)


def multi_steps_run(k: int, optimizer: Any) -> Run:
    """The plain Equinox step with ``jaxaccum.multi_steps`` as its optimizer, called on
    micro-batches j, j+k, j+2k, … of each batch in turn."""
    opt = jaxaccum.multi_steps(optimizer, k)
    one = equinox_run("", 1, eqx.filter_value_and_grad(loss_fn), opt).update

    def update(state: Any, batch: Batch) -> tuple[Any, jax.Array]:
        losses = []
        for j in range(k):
            state, loss = one(state, jax.tree.map(lambda x, j=j: x[j::k], batch))
            losses.append(loss)
        return state, jnp.mean(jnp.stack(losses))

    return Run(f"multi_steps k={k}", k, lambda m: (m, opt.init(m)), update, lambda s: s[0])


def reversed_rows(grad_fn: GradFn) -> GradFn:
    """``grad_fn`` on the batch with its rows in reverse order."""
    return lambda model, batch: grad_fn(model, jax.tree.map(lambda x: x[::-1], batch))


def runs(config: Config) -> list[Run]:
    """The five runs, in the table's order."""
    optimizer = optax.adamw(config.lr)
    grad_fn = eqx.filter_value_and_grad(loss_fn)
    k = config.k
    return [
        equinox_run("full batch", 1, grad_fn, optimizer),
        equinox_run("control: rows reversed", 1, reversed_rows(grad_fn), optimizer),
        equinox_run(f"accumulate k={k}", k, jaxaccum.accumulate(grad_fn, k), optimizer),
        train_step_run(k, optimizer),
        multi_steps_run(k, optimizer),
    ]


def train_run(run: Run, model: CNN, train: digits.Data, test: digits.Data, config: Config) -> Row:
    """Trains one run on the batches of ``config`` and evaluates it.

    Returns:
      The run's row: ``name``, ``k``, the training loss per batch (``losses``,
      ``final_loss``), the test accuracy every ``eval_every`` batches (``eval_steps``,
      ``test_accs``), the final ``test_loss`` and ``test_acc``, and the final ``model``.
    """
    order = digits.batch_order(len(train["y"]), config.batch_size, config.steps, config.seed)
    state, losses, eval_steps, test_accs = run.init(model), [], [], []
    with report.progress(len(order), run.name, "batch") as bar:
        for t, idx in enumerate(order):
            state, loss = run.update(state, digits.take(train, idx))
            losses.append(float(loss))
            if (t + 1) % config.eval_every == 0 or t + 1 == len(order):
                eval_steps.append(t + 1)
                test_accs.append(float(evaluate(run.model(state), test["x"], test["y"])[1]))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            bar.update()
    test_loss, test_acc = evaluate(run.model(state), test["x"], test["y"])
    return {
        "name": run.name,
        "k": run.k,
        "losses": losses,
        "eval_steps": eval_steps,
        "test_accs": test_accs,
        "final_loss": losses[-1],
        "test_loss": float(test_loss),
        "test_acc": float(test_acc),
        "model": run.model(state),
    }


def train_and_evaluate(config: Config) -> list[Row]:
    """Trains the five runs from the same model; one row per run (see :func:`train_run`),
    plus ``max_abs_dparams``: how far the run's trained arrays end from the full-batch
    run's (largest absolute difference)."""
    train, test = load_data(config.seed)
    print(
        f"digits: {len(train['y'])} train / {len(test['y'])} test images, "
        f"N={config.batch_size} per batch, k={config.k}, {config.steps} AdamW steps "
        f"(lr {config.lr:g}), {jax.devices()[0].platform} backend"
    )
    model = CNN(jax.random.key(config.seed))
    rows = [train_run(run, model, train, test, config) for run in runs(config)]
    reference = trained(rows[0]["model"])
    for row in rows:
        row["max_abs_dparams"] = report.max_abs_diff(trained(row["model"]), reference)
    return rows


def print_table(rows: Sequence[Row]) -> None:
    """The results as a Markdown table, one line per run."""
    header = ["run", "k", "final train loss", "test loss", "test acc", "max abs Δparams"]
    cells = [
        [
            r["name"],
            str(r["k"]),
            *(f"{r[key]:.6f}" for key in ("final_loss", "test_loss")),
            f"{r['test_acc']:.4f}",
            f"{r['max_abs_dparams']:.1e}",
        ]
        for r in rows
    ]
    print(report.markdown_table(header, "lrrrrr", cells))


def plot(rows: Sequence[Row], path: pathlib.Path) -> None:
    """Training loss per batch and test accuracy, one line per run, saved to ``path``."""
    styles = ("-", (0, (1, 3)), "--", ":", "-.")  # the runs overlap: each dashed its own way
    report.loss_and_accuracy(rows, path, "test accuracy", styles)
