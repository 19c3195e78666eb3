"""Token-weighted accumulation on a tiny character LM, against the full batch and the mean
of micro-batch means.

The loss of a batch is the mean cross-entropy over its real (unpadded) tokens. Three runs
start from the same parameters and see the same batches:

- ``full batch``: ``jax.value_and_grad`` of that loss over the whole batch of N sentences,
  in a hand-written step.
- ``token-weighted k=…``: ``jaxaccum.train_step(loss_fn, adamw, k, weight_fn=token_count)``:
  each micro-batch's token mean weighs as many tokens as it holds, which gives exactly the
  full batch's token mean and its gradient.
- ``mean of means k=…``: the same without ``weight_fn``: every micro-batch counts equally,
  so a token in a short micro-batch weighs more than one in a long micro-batch (the naive
  method; its gradient is not the full batch's).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import report

import jaxaccum
from token_weighted_lm import data, models

Params = Any
Batch = dict[str, jax.Array]
Row = dict[str, Any]
Step = Callable[[Any, Batch], tuple[Any, jax.Array]]
LossFn = Callable[[Params, Batch], jax.Array]
HELD_OUT = 256  # sentences kept out of training


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings of one invocation (``main.py`` sets them from its flags).

    Attributes:
      steps: optimizer updates per run.
      batch_size: sentences per update, N.
      k: micro-batches per update; divides ``batch_size``.
      length: characters per example.
      lr: AdamW's learning rate.
      eval_every: held-out loss interval, in updates.
      seed: fixes the held-out set, the batches and the initial parameters.
    """

    steps: int = 150
    batch_size: int = 64
    k: int = 8
    length: int = 96
    lr: float = 3e-3
    eval_every: int = 10
    seed: int = 0


class Data(NamedTuple):
    """The training batches, one per update, the held-out batch and the vocabulary size."""

    sentences: int
    vocab: int
    batches: list[Batch]
    held_out: Batch


def load_data(config: Config) -> Data:
    """Encodes the sentences, keeps ``HELD_OUT`` of them out and draws ``steps`` batches."""
    sentences = data.load_sentences()
    ids, vocab = data.encode(sentences, config.length)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(ids))
    held_out, train_ids = ids[order[:HELD_OUT]], ids[order[HELD_OUT:]]
    batches = [
        data.as_batch(train_ids[rng.choice(len(train_ids), config.batch_size, replace=False)])
        for _ in range(config.steps)
    ]
    return Data(len(sentences), vocab, batches, data.as_batch(held_out))


class Run(NamedTuple):
    """One way of training.

    Attributes:
      name: the row's label.
      init: ``params -> state``.
      step: ``(state, batch) -> (state, loss)``: one optimizer update on a batch of N.
      params: ``state -> params``.
      grad_fn: ``(params, batch) -> grads`` computed the run's way, compared with the
        full batch's at the first step; None for the full batch itself.
    """

    name: str
    init: Callable[[Params], Any]
    step: Step
    params: Callable[[Any], Params]
    grad_fn: Callable[[Params, Batch], Params] | None


def full_batch_run(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> Run:
    """The reference: ``jax.value_and_grad`` over the whole batch, then one update."""

    @jax.jit
    def step(state: tuple[Params, Any], batch: Batch) -> tuple[tuple[Params, Any], jax.Array]:
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def init(params: Params) -> tuple[Params, Any]:
        return params, optimizer.init(params)

    return Run("full batch", init, step, lambda state: state[0], None)


def accumulated_run(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    k: int,
    weighted: bool,
) -> Run:
    """``jaxaccum.train_step`` with k micro-batches, weighted by token count or not."""
    weight_fn = data.token_count if weighted else None
    built = jaxaccum.train_step(loss_fn, optimizer, k, weight_fn=weight_fn)
    update = jax.jit(built.update)

    def step(state: jaxaccum.TrainState, batch: Batch) -> tuple[jaxaccum.TrainState, jax.Array]:
        state, metrics = update(state, batch)
        return state, metrics.loss

    name = f"token-weighted k={k}" if weighted else f"mean of means k={k}"
    grad_fn = jaxaccum.accumulate(jax.grad(loss_fn), k, weight_fn=weight_fn)
    return Run(name, built.init, step, lambda state: state.params, grad_fn)


def train_run(
    run: Run,
    params: Params,
    d: Data,
    loss_fn: LossFn,
    config: Config,
    reference: Sequence[Params] | None,
) -> tuple[Row, list[Params]]:
    """Trains one run from ``params`` on the batches of ``d``.

    Args:
      loss_fn: the token-mean loss, for the held-out and final losses.
      reference: the full-batch run's parameters after each update, or None when ``run``
        is the full-batch run: its own are then recorded and returned.

    Returns:
      The run's row (``name``, per update ``losses`` and ``dparams``, the held-out loss at
      ``eval_steps`` as ``held_out_losses``, ``final_loss`` on the last training batch,
      ``held_out_loss``, ``max_abs_dparams``), and the recorded parameters.
    """
    evaluate = jax.jit(loss_fn)
    state = run.init(params)
    own: list[Params] = []
    against = own if reference is None else reference
    losses, dparams, eval_steps, held_out_losses = [], [], [], []
    with report.progress(len(d.batches), run.name, "step") as bar:
        for t, batch in enumerate(d.batches):
            state, loss = run.step(state, batch)
            losses.append(float(loss))
            if reference is None:
                own.append(run.params(state))
            dparams.append(report.max_abs_diff(run.params(state), against[t]))
            if (t + 1) % config.eval_every == 0 or t + 1 == len(d.batches):
                eval_steps.append(t + 1)
                held_out_losses.append(float(evaluate(run.params(state), d.held_out)))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
    final_loss = float(evaluate(run.params(state), d.batches[-1]))
    row: Row = {"name": run.name, "losses": losses, "dparams": dparams}
    row |= {"eval_steps": eval_steps, "held_out_losses": held_out_losses}
    row |= {"final_loss": final_loss, "held_out_loss": held_out_losses[-1]}
    return row | {"max_abs_dparams": dparams[-1]}, own


def train_and_evaluate(config: Config) -> list[Row]:
    """Trains the three runs from the same parameters on the same batches.

    Returns:
      One row per run (see :func:`train_run`), with ``max_abs_dgrads``: the largest
      difference of the run's first-step gradient from the full batch's.
    """
    d = load_data(config)
    model = models.TinyLM(d.vocab, config.length)
    loss_fn = models.make_loss(model)
    zeros = jnp.zeros((1, config.length), jnp.int32)
    params = model.init(jax.random.key(config.seed), zeros)["params"]
    print(
        f"{d.sentences} sentences from the docstrings of {len(data.MODULES)} standard-library "
        f"modules, vocabulary {d.vocab}, N={config.batch_size} sentences per update "
        f"({float(data.token_count(d.batches[0])):.0f} real tokens in the first batch), "
        f"k={config.k}, {config.steps} AdamW updates, {jax.devices()[0].platform} backend"
    )
    optimizer = optax.adamw(config.lr)
    runs = [full_batch_run(loss_fn, optimizer)]
    runs += [accumulated_run(loss_fn, optimizer, config.k, weighted) for weighted in (True, False)]
    full_grads = jax.grad(loss_fn)(params, d.batches[0])
    rows, reference = [], None
    for run in runs:
        row, own = train_run(run, params, d, loss_fn, config, reference)
        reference = reference or own
        first = full_grads if run.grad_fn is None else jax.jit(run.grad_fn)(params, d.batches[0])
        rows.append({**row, "max_abs_dgrads": report.max_abs_diff(first, full_grads)})
    return rows


def print_table(rows: Sequence[Row]) -> None:
    """The results as a Markdown table, one line per run."""
    header = ["run", "final train loss", "held-out loss", "max abs Δgrads, step 1"]
    header.append("max abs Δparams")
    cells = [
        [
            r["name"],
            f"{r['final_loss']:.4f}",
            f"{r['held_out_loss']:.4f}",
            f"{r['max_abs_dgrads']:.1e}",
            f"{r['max_abs_dparams']:.1e}",
        ]
        for r in rows
    ]
    print(report.markdown_table(header, "lrrrr", cells))


def plot(rows: Sequence[Row], path: pathlib.Path) -> None:
    """Held-out loss, and the parameter difference from the full-batch run, per update."""
    fig, left, right = report.two_panels()
    for r, color in zip(rows, ("black", "tab:blue", "tab:red"), strict=False):
        left.plot(r["eval_steps"], r["held_out_losses"], label=r["name"], lw=1.2, color=color)
        if r["name"] != "full batch":
            steps = np.arange(1, len(r["dparams"]) + 1)
            right.semilogy(steps, np.maximum(r["dparams"], 1e-12), label=r["name"], color=color)
    left.set(xlabel="update", ylabel="held-out loss (token mean)", title="loss")
    right.set(xlabel="update", ylabel="max |params - full-batch params|", title="drift")
    left.legend()
    right.legend()
    report.save(fig, path)
