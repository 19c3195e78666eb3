"""Mode ``batchnorm``: per-layer deviation of BatchNorm running statistics from the full batch.

A CNN with BatchNorm after the input and after each of three convolutions takes one
training step on 256 of scikit-learn's digits, as one full batch and as k micro-batches
with ``jaxaccum.flax.train_step`` in both BatchNorm modes. Printed per BatchNorm layer:
the largest absolute difference of the running mean and variance from the full-batch
step's, and the same relative to the largest running value of that layer.

The first layer sees the raw input, so exact merging reproduces it to round-off. Deeper
layers see activations computed with each micro-batch's own normalisation, which differ
from the full batch's; that difference, not the merging, is what remains.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits

import jaxaccum.flax as jf
from benchmarks import UsageError
from benchmarks.common import print_machine


class CNN(nn.Module):
    """BatchNorm on the input, then three Conv -> BatchNorm -> ReLU blocks and a classifier."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        for width, stride in ((16, 1), (32, 2), (32, 1)):
            x = nn.Conv(width, (3, 3), strides=stride)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def loss_fn(apply: Any, mb: dict[str, jax.Array]) -> jax.Array:
    logits = apply(mb["x"], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, mb["y"]).mean()


def run(args: argparse.Namespace) -> dict[str, dict[str, tuple[float, float]]]:
    """Prints the machine and the table (and writes it to ``args.json`` if given).

    Returns:
      ``{mode: {layer: (max abs deviation, deviation relative to the layer's max)}}``.

    Raises:
      UsageError: for a batch outside 1-1797 (the digits) or not divisible by k.
    """
    if not 1 <= args.batch <= 1797 or args.k < 1 or args.batch % args.k:
        raise UsageError(f"--batch must be in 1-1797 and divisible by --k, got {args.batch}")
    machine = print_machine({"batch": args.batch, "k": args.k})
    x, y = load_digits(return_X_y=True)
    batch = {
        "x": jnp.asarray((x[: args.batch] / 16.0).reshape(-1, 8, 8, 1), jnp.float32),
        "y": jnp.asarray(y[: args.batch], jnp.int32),
    }
    variables = CNN().init(jax.random.key(0), batch["x"][:2], train=False)
    state = jf.TrainState.from_variables(CNN().apply, variables, optax.adam(1e-3))
    full, _ = jax.jit(jf.train_step(loss_fn, 1))(state, batch)
    reference = full.collections["batch_stats"]
    report: dict[str, dict[str, tuple[float, float]]] = {}
    print(f"one step, N={args.batch}, k={args.k}, momentum 0.9")
    print("| mode | layer | max abs Δ mean | max abs Δ var | Δ relative to layer's max |")
    print("| --- | --- | ---: | ---: | ---: |")
    for mode in ("exact", "sequential"):
        got, _ = jax.jit(jf.train_step(loss_fn, args.k, batch_norm=mode))(state, batch)
        report[mode] = {}
        for layer in sorted(reference, key=lambda n: int(n.split("_")[1])):
            ref, new = reference[layer], got.collections["batch_stats"][layer]
            d_mean = float(jnp.max(jnp.abs(new["mean"] - ref["mean"])))
            d_var = float(jnp.max(jnp.abs(new["var"] - ref["var"])))
            scale = max(float(jnp.max(jnp.abs(ref["mean"]))), float(jnp.max(ref["var"])))
            rel = max(d_mean, d_var) / scale
            report[mode][layer] = (max(d_mean, d_var), rel)
            print(f"| {mode} | {layer} | {d_mean:.1e} | {d_var:.1e} | {rel:.1e} |")
    if args.json:
        record = {"machine": machine, "settings": {"batch": args.batch, "k": args.k}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record | {"layers": report}, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return report
