"""A tiny character-level transformer LM: token-weighted accumulation vs the mean of means.

The corpus is real English shipped with Python: the docstrings of twenty standard-library
modules, split into sentences of 20 to 120 characters. Each training example is one
sentence, padded to a fixed length, so examples hold different numbers of real tokens and
so do the micro-batches they are split into.

The loss of a batch is the mean cross-entropy over its real (unpadded) tokens. Three runs
start from the same parameters and see the same batches:

- ``full batch``: ``jax.value_and_grad`` of that loss over the whole batch of N sentences.
- ``token-weighted k=…``: ``jaxaccum.train_step(loss, adamw, k, weight_fn=count)``: each
  micro-batch's token mean is weighted by its token count, which gives exactly the full
  batch's token mean and its gradient.
- ``mean of means k=…``: the same without ``weight_fn``: every micro-batch counts equally,
  so a token in a short micro-batch weighs more than one in a long micro-batch. This is the
  naive method: its gradient is not the full batch's.

Printed per run: the token-mean loss of the last training batch and of 256 held-out
sentences after training, the largest gradient difference from the full batch at the first
step, and the largest parameter difference after training. A PNG plots the held-out loss
(every ``--eval-every`` updates) and the parameter difference from the full-batch run over
the updates. (The loss a step reports is not used: without weights it is itself a mean of
means, not comparable with the others.)

Run ``python examples/token_weighted_lm.py`` (under a minute on 2 cores) or see ``--help``.
Needs ``jax``, ``optax``, ``flax``, ``matplotlib``, ``tqdm`` and ``jaxaccum``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pathlib
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from tqdm import tqdm

import jaxaccum

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

MODULES = (
    "argparse", "collections", "textwrap", "json", "inspect", "functools", "itertools",
    "pathlib", "random", "statistics", "string", "shutil", "unittest", "logging", "email",
    "http.client", "urllib.request", "csv", "datetime", "decimal",
)  # fmt: skip
PAD = 0
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "plots" / "token_weighted_lm.png"
Params = Any
Batch = dict[str, jax.Array]


def load_sentences() -> list[str]:
    """Sentences of 20 to 120 characters from the docstrings of ``MODULES``, in order."""
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        with warnings.catch_warnings():  # reading a deprecated alias's docstring is fine
            warnings.simplefilter("ignore", DeprecationWarning)
            members = inspect.getmembers(module)
        for _, obj in members:
            doc = inspect.getdoc(obj)
            if doc and getattr(obj, "__module__", name) == name:
                docs.append(doc)
    text = " ".join(" ".join(docs).split())
    sentences = (s.strip() for s in re.split(r"(?<=[.!?])\s+", text))
    return [s for s in sentences if 20 <= len(s) <= 120]


def encode(sentences: Sequence[str], length: int) -> tuple[np.ndarray, int]:
    """Character ids (0 is padding), each sentence cut or padded to ``length`` + 1.

    Returns:
      ``(ids, vocab_size)`` with ``ids`` of shape ``(len(sentences), length + 1)``.
    """
    chars = sorted(set("".join(sentences)))
    index = {c: i + 1 for i, c in enumerate(chars)}
    ids = np.full((len(sentences), length + 1), PAD, np.int32)
    for row, s in enumerate(sentences):
        codes = [index[c] for c in s[: length + 1]]
        ids[row, : len(codes)] = codes
    return ids, len(chars) + 1


def as_batch(ids: np.ndarray) -> Batch:
    """Inputs, next-character targets and the mask of real target tokens."""
    return {
        "x": jnp.asarray(ids[:, :-1]),
        "y": jnp.asarray(ids[:, 1:]),
        "mask": jnp.asarray(ids[:, 1:] != PAD, jnp.float32),
    }


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    dim: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads)(h, h, mask=causal)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(h)))


class TinyLM(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a tied-free output head."""

    vocab: int
    length: int
    dim: int = 64
    heads: int = 4
    layers: int = 2

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, self.dim)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.length, self.dim))
        for _ in range(self.layers):
            x = Block(self.dim, self.heads)(x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def make_loss(model: TinyLM) -> Callable[[Params, Batch], jax.Array]:
    """Mean cross-entropy over the real tokens of a batch (0 for a batch of padding only)."""

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        logits = model.apply({"params": params}, batch["x"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return jnp.sum(nll * batch["mask"]) / jnp.maximum(batch["mask"].sum(), 1.0)

    return loss_fn


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest absolute elementwise difference between two pytrees."""
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer updates per run")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per update (N)")
    parser.add_argument("--k", type=int, default=8, help="micro-batches per update")
    parser.add_argument("--length", type=int, default=96, help="characters per example")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--eval-every", type=int, default=10, help="held-out loss interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="PNG path")
    args = parser.parse_args(argv)
    if args.k < 1 or args.batch_size % args.k:
        parser.error(f"--k {args.k} must divide --batch-size {args.batch_size}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    return args


def plot(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """Training loss and parameter difference from the full batch, per step."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r, color in zip(rows, ("black", "tab:blue", "tab:red"), strict=False):
        left.plot(r["eval_steps"], r["held_out_losses"], label=r["name"], lw=1.2, color=color)
        if r["name"] != "full batch":
            steps = np.arange(1, len(r["dparams"]) + 1)
            right.semilogy(steps, np.maximum(r["dparams"], 1e-12), label=r["name"], color=color)
    left.set(xlabel="update", ylabel="held-out loss (token mean)", title="loss")
    right.set(xlabel="update", ylabel="max |params - full-batch params|", title="drift")
    left.legend()
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trains the three runs, prints the table, saves the plot; returns one dict per run."""
    args = parse_args(argv)
    sentences = load_sentences()
    ids, vocab = encode(sentences, args.length)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(ids))
    held_out, train_ids = ids[order[:256]], ids[order[256:]]
    model = TinyLM(vocab, args.length)
    loss_fn = make_loss(model)
    params0 = model.init(jax.random.key(args.seed), jnp.zeros((1, args.length), jnp.int32))
    params0 = params0["params"]
    optimizer = optax.adamw(args.lr)
    batches = [
        as_batch(train_ids[rng.choice(len(train_ids), args.batch_size, replace=False)])
        for _ in range(args.steps)
    ]
    tokens = [float(b["mask"].sum()) for b in batches[:1]]
    print(
        f"{len(sentences)} sentences from the docstrings of {len(MODULES)} standard-library "
        f"modules, vocabulary {vocab}, N={args.batch_size} sentences per update "
        f"({tokens[0]:.0f} real tokens in the first batch), k={args.k}, {args.steps} AdamW "
        f"updates, {jax.devices()[0].platform} backend"
    )

    @jax.jit
    def full_step(state: jaxaccum.TrainState, batch: Batch) -> tuple[Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), loss

    def accumulated(weighted: bool) -> Callable[[Any, Batch], tuple[Any, jax.Array]]:
        weight_fn = (lambda mb: mb["mask"].sum()) if weighted else None
        built = jaxaccum.train_step(loss_fn, optimizer, args.k, weight_fn=weight_fn)
        update = jax.jit(built.update)
        return lambda state, batch: (lambda s, m: (s, m.loss))(*update(state, batch))

    init = jaxaccum.train_step(loss_fn, optimizer, 1).init
    runs = [
        ("full batch", full_step),
        (f"token-weighted k={args.k}", accumulated(True)),
        (f"mean of means k={args.k}", accumulated(False)),
    ]
    full_grads = jax.grad(loss_fn)(params0, batches[0])
    grad_fns = {
        runs[1][0]: jaxaccum.accumulate(
            jax.grad(loss_fn), args.k, weight_fn=lambda mb: mb["mask"].sum()
        ),
        runs[2][0]: jaxaccum.accumulate(jax.grad(loss_fn), args.k),
    }
    held = as_batch(held_out)
    evaluate = jax.jit(loss_fn)
    rows: list[dict[str, Any]] = []
    trajectory: list[Params] = []
    interval = 0.1 if sys.stderr.isatty() else 5.0
    for name, step in runs:
        state = init(params0)
        losses, dparams, eval_steps, held_out_losses = [], [], [], []
        with tqdm(total=args.steps, desc=name, unit="step", mininterval=interval) as bar:
            for t, batch in enumerate(batches):
                state, loss = step(state, batch)
                losses.append(float(loss))
                if name == "full batch":
                    trajectory.append(state.params)
                dparams.append(max_abs_diff(state.params, trajectory[t]))
                if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
                    eval_steps.append(t + 1)
                    held_out_losses.append(float(evaluate(state.params, held)))
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                bar.update()
        first_grads = jax.jit(grad_fns[name])(params0, batches[0]) if name in grad_fns else None
        rows.append(
            {
                "name": name,
                "losses": losses,
                "dparams": dparams,
                "eval_steps": eval_steps,
                "held_out_losses": held_out_losses,
                "final_loss": float(evaluate(state.params, batches[-1])),
                "held_out_loss": held_out_losses[-1],
                "max_abs_dgrads": 0.0
                if first_grads is None
                else max_abs_diff(first_grads, full_grads),
                "max_abs_dparams": dparams[-1],
            }
        )
    print("| run | final train loss | held-out loss | max abs Δgrads, step 1 | max abs Δparams |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['name']} | {r['final_loss']:.4f} | {r['held_out_loss']:.4f} "
            f"| {r['max_abs_dgrads']:.1e} | {r['max_abs_dparams']:.1e} |"
        )
    plot(rows, args.out)
    print(f"plot: {args.out}")
    return rows


if __name__ == "__main__":
    main()
