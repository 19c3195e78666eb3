"""An MLP on digits through every accumulation path, against the full batch and a control.

Every run starts from the same parameters, sees the same batches of N examples in the same
order and takes one Adam update per batch:

- ``full batch``: ``jax.value_and_grad(loss_fn)`` on all N examples, in a hand-written step.
- ``control: rows reversed``: the full batch with its rows reversed, the same gradient in
  exact arithmetic: how far float32 round-off alone carries over a training run.
- ``accumulate k=…``: the same step around ``jaxaccum.accumulate(grad_fn, k)``.
- ``train_step k=…``: the step built by ``jaxaccum.train_step(loss_fn, optimizer, k)``.
- ``multi_steps k=…``: one micro-batch per call to a step whose optimizer is
  ``jaxaccum.multi_steps(adam, k)``: k calls make one update.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import digits, report
from sklearn.preprocessing import StandardScaler

import jaxaccum

Params = Any
Batch = dict[str, jax.Array]
Row = dict[str, Any]
GradFn = Callable[[Params, Batch], tuple[jax.Array, Params]]
Step = Callable[[Any, Batch], tuple[Any, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings of one invocation (``main.py`` sets them from its flags).

    Attributes:
      steps: optimizer updates per run.
      ks: micro-batch counts of the ``accumulate`` runs.
      builder_ks: micro-batch counts of the ``train_step`` and ``multi_steps`` runs.
      batch_size: examples per update, N; every k divides it.
      lr: Adam's learning rate.
      seed: fixes the split, the initial parameters and the batch order.
    """

    steps: int = 200
    ks: tuple[int, ...] = (2, 4, 8, 16)
    builder_ks: tuple[int, ...] = (8,)
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0


class MLP(nn.Module):
    """A ReLU perceptron from the 64 pixel features to 10 class logits.

    Attributes:
      features: widths of the hidden layers, then the number of classes.
    """

    features: Sequence[int] = (256, 256, 10)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.features[:-1]:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.features[-1])(x)


def loss_fn(params: Params, batch: Batch) -> jax.Array:
    """Mean softmax cross-entropy over the examples of ``batch``.

    A mean over examples is what makes accumulation exact: the mean of the k micro-batch
    means (all of the same size) is the mean over the whole batch, and so are the gradients.
    """
    logits = MLP().apply(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


@jax.jit
def accuracy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """The fraction of examples whose highest logit is the true class."""
    return jnp.mean(jnp.argmax(MLP().apply(params, x), axis=-1) == y)


def load_data(seed: int) -> tuple[digits.Data, digits.Data]:
    """Digits split 80/20, standardised with the training set's statistics (float32)."""
    train, test = digits.split(seed)
    scaler = StandardScaler().fit(train["x"])  # pixels that are always 0 stay 0

    def standardised(data: digits.Data) -> digits.Data:
        return {"x": scaler.transform(data["x"]).astype(np.float32), "y": data["y"]}

    return standardised(train), standardised(test)


def reversed_rows(grad_fn: GradFn) -> GradFn:
    """``grad_fn`` on the batch with its rows reversed: the same value in exact arithmetic."""

    def reversed_grad_fn(params: Params, batch: Batch) -> tuple[jax.Array, Params]:
        return grad_fn(params, jax.tree.map(lambda x: x[::-1], batch))

    return reversed_grad_fn


@dataclasses.dataclass(frozen=True)
class Run:
    """One way of training: how to start, how to take one update, where the params are.

    Attributes:
      name: the row's label.
      k: micro-batches per update.
      init: ``params -> state``.
      update: ``(state, batch) -> (state, loss)``: one optimizer update on one batch of N.
      params: ``state -> params``.
      memory: ``(state, batch) -> MemoryStats`` of the compiled program that runs.
      grad_fn: the gradient function whose first-step gradient the table compares with the
        full batch's (for the runs that build their gradient inside the step, that of
        ``accumulate`` at the same k).
    """

    name: str
    k: int
    init: Callable[[Params], Any]
    update: Step
    params: Callable[[Any], Params]
    memory: Callable[[Any, Batch], jaxaccum.inspect.MemoryStats]
    grad_fn: GradFn


def train_step(grad_fn: GradFn, optimizer: optax.GradientTransformation) -> Step:
    """A train step written by hand around ``grad_fn``: gradient, update, new params.

    Args:
      grad_fn: ``(params, batch) -> (loss, grads)``, e.g. ``jax.value_and_grad(loss_fn)``
        or ``jaxaccum.accumulate(jax.value_and_grad(loss_fn), k)``.
      optimizer: an optax optimizer.

    Returns:
      ``step((params, opt_state), batch) -> ((params, opt_state), loss)``, not jitted.
    """

    def step(state: tuple[Params, Any], batch: Batch) -> tuple[tuple[Params, Any], jax.Array]:
        params, opt_state = state
        loss, grads = grad_fn(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def grad_fn_run(name: str, k: int, grad_fn: GradFn, optimizer: optax.GradientTransformation) -> Run:
    """The hand-written :func:`train_step` around ``grad_fn``, jitted; ``k`` is for the table."""
    step = jax.jit(train_step(grad_fn, optimizer))
    return Run(
        name=name,
        k=k,
        init=lambda params: (params, optimizer.init(params)),
        update=step,
        params=lambda state: state[0],
        memory=lambda state, batch: jaxaccum.inspect.compiled_memory(step, state, batch),
        grad_fn=grad_fn,
    )


def train_step_run(k: int, optimizer: optax.GradientTransformation) -> Run:
    """The step built by ``jaxaccum.train_step``, jitted with its state donated."""
    built = jaxaccum.train_step(loss_fn, optimizer, k)
    update = jax.jit(built.update, donate_argnums=0)

    def step(state: jaxaccum.TrainState, batch: Batch) -> tuple[Any, jax.Array]:
        state, metrics = update(state, batch)
        return state, metrics.loss

    return Run(
        name=f"train_step k={k}",
        k=k,
        init=built.init,
        update=step,
        params=lambda state: state.params,
        memory=lambda state, batch: jaxaccum.inspect.compiled_memory(update, state, batch),
        grad_fn=jaxaccum.accumulate(jax.value_and_grad(loss_fn), k),
    )


def multi_steps_run(k: int, optimizer: optax.GradientTransformation) -> Run:
    """k calls of a one-micro-batch step wrapping ``optimizer`` in ``jaxaccum.multi_steps``.

    Micro-batch j of a batch is its rows j, j+k, j+2k, … (the split ``accumulate`` uses),
    so the k calls see exactly the micro-batches of the in-step runs.
    """
    opt = jaxaccum.multi_steps(optimizer, every_k_schedule=k)
    jitted = jax.jit(train_step(jax.value_and_grad(loss_fn), opt), donate_argnums=0)

    def micro(batch: Batch, j: int) -> Batch:
        return jax.tree.map(lambda x: x[j::k], batch)

    def step(state: Any, batch: Batch) -> tuple[Any, jax.Array]:
        losses = []
        for j in range(k):
            state, loss = jitted(state, micro(batch, j))
            losses.append(loss)
        if not bool(state[1].emitted):
            raise RuntimeError(f"multi_steps did not apply an update after {k} calls")
        return state, jnp.mean(jnp.stack(losses))

    return Run(
        name=f"multi_steps k={k}",
        k=k,
        init=lambda params: (params, opt.init(params)),
        update=step,
        params=lambda state: state[0],
        memory=lambda state, batch: jaxaccum.inspect.compiled_memory(
            jitted, state, micro(batch, 0)
        ),
        grad_fn=jaxaccum.accumulate(jax.value_and_grad(loss_fn), k),
    )


def runs(config: Config) -> list[Run]:
    """Every run of the table, in its order."""
    optimizer = optax.adam(config.lr)
    grad_fn = jax.value_and_grad(loss_fn)
    accumulated = [
        grad_fn_run(f"accumulate k={k}", k, jaxaccum.accumulate(grad_fn, k), optimizer)
        for k in config.ks
    ]
    builders = [
        build(k, optimizer)
        for k in config.builder_ks
        for build in (train_step_run, multi_steps_run)
    ]
    return [
        grad_fn_run("full batch", 1, grad_fn, optimizer),
        grad_fn_run("control: rows reversed", 1, reversed_rows(grad_fn), optimizer),
        *accumulated,
        *builders,
    ]


def train(
    run: Run, params: Params, data: digits.Data, order: np.ndarray
) -> tuple[Params, dict[str, Any]]:
    """Trains from ``params`` on the batches ``data[order[step]]``, with a progress bar.

    Args:
      run: how to train.
      params: initial parameters (not modified, even by runs that donate their state).
      data: the training set.
      order: training-example indices per step, shape ``(steps, batch_size)``.

    Returns:
      The final parameters, and a dict with the per-update ``losses``, the compiled
      ``temp_bytes`` of the program that runs and the median ``step_ms`` of one update (the
      first update, which compiles, is left out when there are others).
    """
    state = run.init(jax.tree.map(jnp.copy, params))
    memory = run.memory(state, digits.take(data, order[0]))
    losses, seconds = [], []
    with report.progress(len(order), run.name, "step") as bar:
        for idx in order:
            batch = digits.take(data, idx)
            start = time.perf_counter()
            state, loss = jax.block_until_ready(run.update(state, batch))
            seconds.append(time.perf_counter() - start)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            bar.update()
    ms = 1e3 * statistics.median(seconds[1:] or seconds)
    return run.params(state), {"losses": losses, "temp_bytes": memory.temp_bytes, "step_ms": ms}


def train_and_evaluate(config: Config) -> list[Row]:
    """Trains every run of :func:`runs` from the same parameters on the same batches.

    Returns:
      One row per run: ``name``, ``k``, ``micro_batch``, ``steps``, ``losses``,
      ``final_loss``, ``test_acc``, ``max_abs_dparams`` (against the full-batch run's final
      parameters), ``max_abs_dgrads`` (of the run's ``grad_fn`` against the full-batch
      gradient at the initial parameters and first batch), ``temp_bytes`` and ``step_ms``.
    """
    train_data, test_data = load_data(config.seed)
    n_train = len(train_data["y"])
    order = digits.batch_order(n_train, config.batch_size, config.steps, config.seed)
    params0 = MLP().init(jax.random.key(config.seed), jnp.zeros((1, train_data["x"].shape[1])))
    print(
        f"digits: {n_train} train / {len(test_data['y'])} test examples, "
        f"N={config.batch_size} per step, {config.steps} Adam steps (lr {config.lr:g}), "
        f"{jax.devices()[0].platform} backend"
    )
    first = digits.take(train_data, order[0])
    rows: list[Row] = []
    reference: tuple[Params, Params] | None = None
    for run in runs(config):
        first_grads = jax.jit(run.grad_fn)(params0, first)[1]
        params, stats = train(run, params0, train_data, order)
        reference = reference or (params, first_grads)
        rows.append(
            {
                "name": run.name,
                "k": run.k,
                "micro_batch": config.batch_size // run.k,
                "steps": len(stats["losses"]),
                "final_loss": stats["losses"][-1],
                "test_acc": float(accuracy(params, test_data["x"], test_data["y"])),
                "max_abs_dparams": report.max_abs_diff(params, reference[0]),
                "max_abs_dgrads": report.max_abs_diff(first_grads, reference[1]),
                **stats,
            }
        )
    return rows


def format_bytes(n: int) -> str:
    """``n`` bytes in KiB below 1 MiB, in MiB from there."""
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def print_table(rows: Sequence[Row]) -> None:
    """The results as a Markdown table, one line per run."""
    header = ["run", "k", "micro-batch", "final train loss", "test acc", "max abs Δparams"]
    header += ["max abs Δgrads, step 1", "temp memory", "step ms"]
    cells = [
        [
            r["name"],
            str(r["k"]),
            str(r["micro_batch"]),
            f"{r['final_loss']:.6f}",
            f"{r['test_acc']:.4f}",
            f"{r['max_abs_dparams']:.1e}",
            f"{r['max_abs_dgrads']:.1e}",
            format_bytes(r["temp_bytes"]),
            f"{r['step_ms']:.2f}",
        ]
        for r in rows
    ]
    print(report.markdown_table(header, "lrrrrrrrr", cells))


def plot(rows: Sequence[Row], path: pathlib.Path) -> None:
    """Each run's largest relative training-loss gap to the full batch so far, per update,
    and the compiled temporaries of each run's step; saved to ``path``."""
    fig, left, right = report.two_panels()
    reference = np.asarray(rows[0]["losses"])
    for r in rows[1:]:
        gap = np.maximum.accumulate(np.abs(np.asarray(r["losses"]) / reference - 1.0))
        style = {"color": "black", "ls": "--", "zorder": 3} if r["k"] == 1 else {}  # control
        left.semilogy(np.arange(1, len(gap) + 1), np.maximum(gap, 1e-9), label=r["name"], **style)
    left.set(xlabel="update", ylabel="max so far of |loss / full-batch loss - 1|")
    left.set(title="training loss against the full batch")
    left.legend(fontsize="small")
    right.barh([r["name"] for r in rows], [r["temp_bytes"] / 2**20 for r in rows])
    right.invert_yaxis()
    right.set(xlabel="compiled temporaries (MiB)", title="memory of the step that runs")
    report.save(fig, path)
