"""Convolutions inside the accumulation loop: canonical for XLA:CPU, same results.

XLA:CPU lowers a convolution to its fast kernels only in (batch, spatial..., feature) /
(spatial..., in, out) layout and rewrites other layouts into it only in the entry
computation, not in a ``while`` body. ``jaxaccum`` rewrites them before the loop is built
(``jaxaccum/_conv.py``). These tests check the results against the same convolutions
computed outside any loop (which XLA canonicalises itself), with float32 tolerances for
kernels that sum in another order, and read the compiled HLO to check that no
non-canonical convolution is left; a hand-written scan is the negative control.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close

import jaxaccum
from jaxaccum import _conv

RTOL, ATOL = 1e-5, 1e-5
CANONICAL = {1: "b0f_0io->b0f", 2: "b01f_01io->b01f", 3: "b012f_012io->b012f"}


def conv_labels(fn: Any, *args: Any) -> list[str]:
    """``dim_labels`` of every convolution in the compiled program of ``fn``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return re.findall(r"= \S+ convolution\(.*?dim_labels=(\S+?),", text)


def rewritten(fn: Any) -> Any:
    """``fn`` traced once and evaluated with the convolution rewrite, as in the loop body."""
    return lambda *args: _conv.Traced(fn, *args)(*args, canonical_convolutions=True)


def only_canonical(labels: list[str]) -> bool:
    return bool(labels) and all(label in CANONICAL.values() for label in labels)


# One convolution per case: (input shape, kernel shape, lax.conv_general_dilated kwargs).
CASES: dict[str, tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]]] = {
    "nhwc": ((4, 9, 9, 3), (3, 3, 3, 5), {"dimension_numbers": ("NHWC", "HWIO", "NHWC")}),
    "nchw": ((4, 3, 9, 9), (5, 3, 3, 3), {"dimension_numbers": ("NCHW", "OIHW", "NCHW")}),
    "strided_dilated_1d": (
        (4, 17, 3),
        (3, 3, 6),
        {"dimension_numbers": ("NWC", "WIO", "NWC"), "window_strides": (2,), "rhs_dilation": (2,)},
    ),
    "transposed_conv": (
        (4, 6, 6, 3),
        (3, 3, 3, 4),
        {
            "dimension_numbers": ("NHWC", "HWIO", "NHWC"),
            "lhs_dilation": (2, 2),
            "padding": ((1, 1), (1, 1)),
        },
    ),
    "grouped": (
        (4, 8, 8, 6),
        (3, 3, 3, 4),
        {"dimension_numbers": ("NHWC", "HWIO", "NHWC"), "feature_group_count": 2},
    ),
    "depthwise_3d": (
        (2, 5, 5, 5, 4),
        (2, 2, 2, 1, 4),
        {"dimension_numbers": ("NDHWC", "DHWIO", "NDHWC"), "feature_group_count": 4},
    ),
    "channels_first_out": (
        (4, 9, 9, 3),
        (3, 3, 3, 5),
        {"dimension_numbers": ("NHWC", "HWIO", "NCHW"), "padding": ((1, 2), (0, 1))},
    ),
}


# Weight gradients XLA itself turns back into a non-canonical form after the rewrite, inside
# the loop body too: the one of a grouped convolution (batch_group_count expanded) and the
# one of a transposed convolution (operands swapped by the algebraic simplifier). Their
# results are still checked; README "Compilation" documents the limitation.
REWRITTEN_AGAIN_BY_XLA = frozenset({"grouped", "transposed_conv"})


def conv_loss(case: str) -> tuple[Any, jax.Array, jax.Array]:
    x_shape, w_shape, kwargs = CASES[case]
    kwargs = {"window_strides": (1,) * (len(x_shape) - 2), "padding": "SAME"} | kwargs

    def loss(w: jax.Array, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(x, w, **kwargs)
        return jnp.mean(jnp.tanh(y) ** 2)

    kx, kw = jax.random.split(jax.random.key(0))
    return loss, jax.random.normal(kw, w_shape), jax.random.normal(kx, x_shape)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rewritten_convolution_gradients_equal_the_originals(case):
    """Forward, input-gradient and weight-gradient convolutions (the latter with batch
    and feature swapped, or a batch_group_count for grouped convolutions), each rewritten,
    equal the same function compiled as it is."""
    loss, w, x = conv_loss(case)
    both = jax.value_and_grad(loss, argnums=(0, 1))
    assert _conv.needs_rewrite(jax.make_jaxpr(both)(w, x).jaxpr)
    expected = jax.jit(both)(w, x)
    assert_trees_close(jax.jit(rewritten(both))(w, x), expected, RTOL, ATOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_accumulated_convolutions_equal_the_full_batch_and_are_canonical(case):
    loss, w, x = conv_loss(case)
    vg = jax.value_and_grad(loss)
    expected = jax.jit(vg)(w, x)
    fn = jaxaccum.accumulate(vg, k=2)
    assert_trees_close(jax.jit(fn)(w, x), expected, RTOL, ATOL)
    labels = conv_labels(fn, w, x)
    if case not in REWRITTEN_AGAIN_BY_XLA:
        assert only_canonical(labels), labels


class CNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool, twice; a rematerialised conv; a dense head."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in (8, 16):
            x = nn.Conv(width, (3, 3))(x)
            x = nn.relu(nn.BatchNorm(use_running_average=False, momentum=0.9)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.remat(nn.Conv)(16, (3, 3))(x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def cnn_setup(n: int = 32) -> tuple[Any, Any, Any, dict[str, jax.Array]]:
    kx, ky = jax.random.split(jax.random.key(1))
    batch = {
        "x": jax.random.normal(kx, (n, 12, 12, 1)),
        "y": jax.random.randint(ky, (n,), 0, 10),
    }
    variables = CNN().init(jax.random.key(0), batch["x"][:2])

    def step(params: Any, stats: Any, mb: dict[str, jax.Array]) -> Any:
        def loss(p: Any) -> Any:
            logits, new = CNN().apply(
                {"params": p, "batch_stats": stats}, mb["x"], mutable=["batch_stats"]
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, mb["y"]).mean()
            return ce, new["batch_stats"]

        (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return (value, grads), new_stats

    return step, variables["params"], variables["batch_stats"], batch


def python_loop(step: Any, params: Any, stats: Any, batch: Any, k: int) -> Any:
    """The reference: k jitted micro-steps on strided micro-batches, BN state carried."""
    jitted, outs = jax.jit(step), []
    for j in range(k):
        out, stats = jitted(params, stats, jax.tree.map(lambda x, j=j: x[j::k], batch))
        outs.append(out)
    return jax.tree.map(lambda *xs: sum(xs) / k, *outs), stats


@pytest.mark.parametrize("k", [2, 4])
def test_cnn_with_batchnorm_and_remat_equals_python_loop(k):
    step, params, stats, batch = cnn_setup()
    fn = jaxaccum.accumulate(step, k, batch_argnums=2, carry_argnums=1)
    assert_trees_close(
        jax.jit(fn)(params, stats, batch), python_loop(step, params, stats, batch, k), RTOL, ATOL
    )
    assert only_canonical(conv_labels(fn, params, stats, batch))


def test_hand_written_scan_keeps_slow_convolutions():
    """Negative control: the same loop written with lax.scan directly leaves weight-gradient
    convolutions in the loop body non-canonical, so the HLO check above can fail."""
    step, params, stats, batch = cnn_setup()

    def scanned(params: Any, stats: Any, batch: Any) -> Any:
        mbs = jax.tree.map(lambda x: x.reshape(4, -1, *x.shape[1:]), batch)
        return jax.lax.scan(lambda s, mb: step(params, s, mb)[::-1], stats, mbs)

    assert not only_canonical(conv_labels(scanned, params, stats, batch))


def test_convolutions_in_cond_and_inner_scan_are_rewritten():
    w = jax.random.normal(jax.random.key(0), (3, 3, 2, 2))
    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 2))

    def conv(h: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def loss(w_: jax.Array, mb: jax.Array) -> jax.Array:
        del w_
        h = jax.lax.cond(mb.sum() > 0, conv, lambda h: conv(h) * 2, mb)
        h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(conv(h)), None), h, None, length=2)
        return jnp.mean(h**2)

    vg = jax.grad(lambda w_, mb: loss(w_, mb) + jnp.sum(w_) * 0, argnums=1)
    fn = jaxaccum.accumulate(vg, k=2, reduce="stack")
    expected = jnp.stack([jax.jit(vg)(w, x[j::2]) for j in range(2)])
    assert_trees_close(jax.jit(fn)(w, x), expected, RTOL, ATOL)
    assert only_canonical(conv_labels(fn, w, x))


def test_static_python_arguments_stay_static():
    """Non-array arguments (here an int that sets a shape) reach step_fn as they are."""
    w = jax.random.normal(jax.random.key(0), (3, 3, 1, 4))
    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 1))

    def loss(w: jax.Array, x: jax.Array, crop: int) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.mean(y[:, :crop, :crop] ** 2)

    vg = jax.value_and_grad(loss)
    fn = jaxaccum.accumulate(vg, k=4)
    assert_trees_close(jax.jit(fn, static_argnums=2)(w, x, 3), vg(w, x, 3), RTOL, ATOL)
    assert_trees_close(fn(w, x, 3), vg(w, x, 3), RTOL, ATOL)  # eager, no outer jit


def test_differentiating_the_accumulated_function_still_works():
    """Not the recommended use (it keeps all residuals), but the rewrite is differentiable."""
    loss, w, x = conv_loss("nchw")
    acc = jaxaccum.accumulate(loss, k=2)
    assert_trees_close(jax.jit(jax.grad(acc))(w, x), jax.grad(loss)(w, x), RTOL, ATOL)


def test_models_without_convolutions_are_untouched():
    """The jaxpr of a step without convolutions is evaluated as traced: bitwise the same."""
    w = jnp.arange(12.0).reshape(4, 3) / 10
    x = jnp.linspace(-1, 1, 32).reshape(8, 4)

    def loss(w: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.mean(jnp.tanh(x @ w) ** 2)

    vg = jax.value_and_grad(loss)
    assert not _conv.needs_rewrite(jax.make_jaxpr(vg)(w, x).jaxpr)
    wrapped = jax.jit(rewritten(vg))(w, x)
    plain = jax.jit(vg)(w, x)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(wrapped), jax.tree.leaves(plain), strict=True)
    )
