"""Train an MLP on scikit-learn's digits with and without gradient accumulation.

Every run starts from the same initial parameters and sees the same batches of N examples
in the same order, and takes one Adam update per batch. The runs:

- ``full batch``: ``jax.value_and_grad(loss)`` on all N examples at once.
- ``control: rows reversed``: the full batch with its rows reversed (see below).
- ``accumulate k=…``: the same gradient function wrapped in ``jaxaccum.accumulate(..., k)``,
  which splits each batch into k micro-batches of N/k examples inside one ``jax.lax.scan``,
  in a train step written by hand.
- ``train_step k=…``: the whole step built by ``jaxaccum.train_step(loss, optimizer, k)``
  (k micro-batches and one update per jitted call, state donated).
- ``multi_steps k=…``: the batch fed one micro-batch per call to a jitted step that wraps
  Adam in ``jaxaccum.multi_steps(adam, k)``: k calls make one update, as when data arrives
  one micro-batch at a time.

Because the loss is a mean over examples, each step's gradient equals the full-batch one up
to float32 round-off, while the compiled step holds only one micro-batch's activations.

Round-off differences do not stay at round-off size over a whole training run: Adam divides
each gradient by its running scale, so differences in the eighth digit of small gradients
grow step by step. The control run shows how far that alone carries: it is the full batch
with its rows reversed, the same gradient in exact arithmetic, with no accumulation at all.
Compare the accumulated runs' parameter differences with the control's, not with zero.

The table at the end shows, per run: the final training loss, the test accuracy, the
largest parameter difference from the full-batch run after training, the largest gradient
difference from it at the first step (same parameters, same batch; for the runs that build
their gradient inside the step, that of ``accumulate`` at the same k), the temporary memory
XLA reserves for the jitted step (for ``multi_steps``, the one-micro-batch step called k
times), and the median time of one update (compilation excluded).

Run ``python examples/train_digits.py`` (200 updates per run) or see ``--help``. The
progress bars go to stderr and the table to stdout.

Needs ``jax``, ``optax``, ``flax``, ``scikit-learn``, ``tqdm`` and ``jaxaccum``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

import jaxaccum

Params = Any
Batch = dict[str, jax.Array]
Data = dict[str, np.ndarray]
GradFn = Callable[[Params, Batch], tuple[jax.Array, Params]]


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


def load_data(seed: int) -> tuple[Data, Data]:
    """Digits split 80/20 (stratified), standardised with the training set's statistics.

    Args:
      seed: fixes the split.

    Returns:
      ``(train, test)``, each ``{"x": float32 (n, 64), "y": int32 (n,)}``.
    """
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    scaler = StandardScaler().fit(x_train)  # pixels that are always 0 stay 0
    return (
        {"x": scaler.transform(x_train).astype(np.float32), "y": y_train.astype(np.int32)},
        {"x": scaler.transform(x_test).astype(np.float32), "y": y_test.astype(np.int32)},
    )


def batch_order(n_train: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Which training examples each step uses: ``batch_size`` distinct ones per step.

    Drawn once from a seeded generator, so every run sees the same batches in the same order.

    Returns:
      Integer indices of shape ``(steps, batch_size)``.
    """
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_train)[:batch_size] for _ in range(steps)])


def take(data: Data, idx: np.ndarray) -> Batch:
    """The examples ``idx`` of ``data``, as a batch on the default device."""
    return jax.device_put({key: value[idx] for key, value in data.items()})


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
    """

    name: str
    k: int
    init: Callable[[Params], Any]
    update: Callable[[Any, Batch], tuple[Any, jax.Array]]
    params: Callable[[Any], Params]
    memory: Callable[[Any, Batch], jaxaccum.inspect.MemoryStats]


def grad_fn_run(name: str, k: int, grad_fn: GradFn, optimizer: optax.GradientTransformation) -> Run:
    """A train step written by hand around ``grad_fn``: gradient, update, new params.

    Args:
      name: the row's label.
      k: micro-batches per update (for the table only).
      grad_fn: ``(params, batch) -> (loss, grads)``, e.g. ``jax.value_and_grad(loss_fn)``
        or ``jaxaccum.accumulate(jax.value_and_grad(loss_fn), k)``.
      optimizer: an optax optimizer.
    """

    @jax.jit
    def step(state: tuple[Params, optax.OptState], batch: Batch) -> tuple[Any, jax.Array]:
        params, opt_state = state
        loss, grads = grad_fn(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return Run(
        name=name,
        k=k,
        init=lambda params: (params, optimizer.init(params)),
        update=step,
        params=lambda state: state[0],
        memory=lambda state, batch: jaxaccum.inspect.compiled_memory(step, state, batch),
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
    )


def multi_steps_run(k: int, optimizer: optax.GradientTransformation) -> Run:
    """k calls of a one-micro-batch step wrapping ``optimizer`` in ``jaxaccum.multi_steps``.

    Micro-batch j of a batch is its rows j, j+k, j+2k, … (the split ``accumulate`` uses),
    so the k calls see exactly the micro-batches of the in-step runs.
    """
    opt = jaxaccum.multi_steps(optimizer, every_k_schedule=k)
    grad_fn = jax.value_and_grad(loss_fn)

    def micro_step(
        state: tuple[Params, jaxaccum.MultiStepsState], micro: Batch
    ) -> tuple[Any, jax.Array]:
        params, opt_state = state
        loss, grads = grad_fn(params, micro)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    jitted = jax.jit(micro_step, donate_argnums=0)

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
    )


def train(
    run: Run, params: Params, train_data: Data, order: np.ndarray
) -> tuple[Params, dict[str, Any]]:
    """Trains from ``params`` on the batches ``train_data[order[step]]``, one bar per run.

    Args:
      run: how to train.
      params: initial parameters (not modified, even by runs that donate their state).
      train_data: the training set.
      order: training-example indices per step, shape ``(steps, batch_size)``.

    Returns:
      The final parameters, and a dict with the per-update ``losses``, the compiled
      ``temp_bytes`` of the program that runs and the median ``step_ms`` of one update (the
      first update, which compiles, is left out when there are others).
    """
    state = run.init(jax.tree.map(jnp.copy, params))
    memory = run.memory(state, take(train_data, order[0]))
    losses, seconds = [], []
    # Progress goes to stderr; when that is a file or pipe, redraw rarely to keep logs short.
    interval = 0.1 if sys.stderr.isatty() else 5.0
    with tqdm(total=len(order), desc=run.name, unit="step", mininterval=interval) as bar:
        for idx in order:
            batch = take(train_data, idx)
            start = time.perf_counter()
            state, loss = jax.block_until_ready(run.update(state, batch))
            seconds.append(time.perf_counter() - start)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            bar.update()
    timed = seconds[1:] or seconds
    stats = {
        "losses": losses,
        "temp_bytes": memory.temp_bytes,
        "step_ms": 1e3 * statistics.median(timed),
    }
    return run.params(state), stats


def max_abs_diff(a: Params, b: Params) -> float:
    """The largest absolute elementwise difference between two parameter pytrees."""
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def format_bytes(n: int) -> str:
    """``n`` bytes in KiB below 1 MiB, in MiB from there."""
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """Prints the results as a Markdown table, one line per run."""
    print(
        "| run | k | micro-batch | final train loss | test acc | max abs Δparams "
        "| max abs Δgrads, step 1 | temp memory | step ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['name']} | {r['k']} | {r['micro_batch']} | {r['final_loss']:.6f} "
            f"| {r['test_acc']:.4f} | {r['max_abs_dparams']:.1e} | {r['max_abs_dgrads']:.1e} "
            f"| {format_bytes(r['temp_bytes'])} | {r['step_ms']:.2f} |"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Reads the command line; every k must divide the batch size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--ks", default="2,4,8,16", help="micro-batch counts, comma-separated")
    parser.add_argument(
        "--builder-ks",
        default="8",
        help="k for the train_step and multi_steps runs, comma-separated (empty: none)",
    )
    parser.add_argument("--batch-size", type=int, default=1024, help="examples per step (N)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="fixes split, init and data order")
    args = parser.parse_args(argv)
    for option in ("ks", "builder_ks"):
        text = getattr(args, option)
        try:
            setattr(args, option, [int(k) for k in text.split(",") if k.strip()])
        except ValueError:
            flag = "--" + option.replace("_", "-")
            parser.error(f"{flag} must be comma-separated integers such as 2,4,8, got {text!r}")
    bad = [k for k in args.ks + args.builder_ks if k < 1 or args.batch_size % k]
    if bad:
        divisors = [d for d in range(1, args.batch_size + 1) if args.batch_size % d == 0]
        parser.error(
            f"k values {bad} (--ks, --builder-ks) do not divide --batch-size "
            f"{args.batch_size}; use some of {divisors}"
        )
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trains every run (see the module docstring) and prints the table.

    Args:
      argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
      One dict per run: ``name``, ``k``, ``micro_batch``, ``steps``, ``losses``,
      ``final_loss``, ``test_acc``, ``max_abs_dparams`` (against the full-batch run's final
      parameters), ``max_abs_dgrads`` (against the full-batch gradient at the initial
      parameters and first batch, of the run's own gradient function or, for
      ``train_step`` and ``multi_steps``, of ``accumulate`` at the same k), ``temp_bytes``
      and ``step_ms``.
    """
    args = parse_args(argv)
    train_data, test_data = load_data(args.seed)
    n_train = len(train_data["y"])
    if args.batch_size > n_train:
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {n_train} training examples")
    order = batch_order(n_train, args.batch_size, args.steps, args.seed)
    params0 = MLP().init(jax.random.key(args.seed), jnp.zeros((1, train_data["x"].shape[1])))
    optimizer = optax.adam(args.lr)
    print(
        f"digits: {n_train} train / {len(test_data['y'])} test examples, "
        f"N={args.batch_size} per step, {args.steps} Adam steps (lr {args.lr:g}), "
        f"{jax.devices()[0].platform} backend"
    )
    grad_fn = jax.value_and_grad(loss_fn)
    control = reversed_rows(grad_fn)
    # Each run, with the gradient function whose first-step gradient the table compares.
    runs: list[tuple[Run, GradFn]] = [
        (grad_fn_run("full batch", 1, grad_fn, optimizer), grad_fn),
        (grad_fn_run("control: rows reversed", 1, control, optimizer), control),
    ]
    for k in args.ks:
        accumulated = jaxaccum.accumulate(grad_fn, k)
        runs.append((grad_fn_run(f"accumulate k={k}", k, accumulated, optimizer), accumulated))
    for k in args.builder_ks:
        accumulated = jaxaccum.accumulate(grad_fn, k)
        runs.append((train_step_run(k, optimizer), accumulated))
        runs.append((multi_steps_run(k, optimizer), accumulated))
    first = take(train_data, order[0])
    rows: list[dict[str, Any]] = []
    reference: tuple[Params, Params] | None = None
    for run, fn in runs:
        first_grads = jax.jit(fn)(params0, first)[1]
        params, stats = train(run, params0, train_data, order)
        reference = reference or (params, first_grads)
        rows.append(
            {
                "name": run.name,
                "k": run.k,
                "micro_batch": args.batch_size // run.k,
                "steps": len(stats["losses"]),
                "final_loss": stats["losses"][-1],
                "test_acc": float(accuracy(params, test_data["x"], test_data["y"])),
                "max_abs_dparams": max_abs_diff(params, reference[0]),
                "max_abs_dgrads": max_abs_diff(first_grads, reference[1]),
                **stats,
            }
        )
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
