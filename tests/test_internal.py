"""Convolutions in a loop body: canonical for XLA:CPU, as written elsewhere, same results.

XLA:CPU runs a convolution fast only in (batch, spatial..., feature) / (spatial..., in, out)
layout and rewrites other layouts into it only outside loops. ``jaxaccum/_internal/cpu_conv.py``
rewrites them in the CPU lowering of a loop body. These tests call it from hand-written
``lax.scan`` loops and check that results equal the same loop calling the step directly
(1e-5 relative and absolute: float32 kernels that sum in another order), that the compiled
CPU loop holds only canonical convolutions (the plain loop is the negative control), that
GPU and TPU lowerings are, operation for operation, those of the plain loop, and that what
the rewrite does not reach runs as written. The 8-device checks run in a subprocess that
executes this file as a script.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import assert_trees_close, trees_equal
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxaccum
from jaxaccum._internal import cpu_conv as _cpu_conv

RTOL, ATOL = 1e-5, 1e-5
CANONICAL = {"b0f_0io->b0f", "b01f_01io->b01f", "b012f_012io->b012f"}
NHWC = ("NHWC", "HWIO", "NHWC")


def scan_steps(step: Any, rewrite: bool, k: int = 2) -> Any:
    """A hand-written loop: ``step(params, carry, mb) -> (out, carry)`` over ``k`` strided
    micro-batches in ``lax.scan``, through ``_cpu_conv.call`` or not; ``(outs, carry)``."""

    def loop(params: Any, carry: Any, batch: Any) -> Any:
        mbs = jax.tree.map(lambda x: x.reshape(-1, k, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(c: Any, mb: Any) -> Any:
            out, c = _cpu_conv.call(step, params, c, mb) if rewrite else step(params, c, mb)
            return c, out

        carry, outs = jax.lax.scan(body, carry, mbs)
        return outs, carry

    return loop


def stateless(fn: Any) -> Any:
    """``fn(params, mb)`` as a step for :func:`scan_steps` (with carry ``()``)."""
    return lambda params, carry, mb: (fn(params, mb), carry)


def conv_labels(fn: Any, *args: Any) -> list[str]:
    """``dim_labels`` of every convolution in the CPU-compiled program of ``fn``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return re.findall(r"= \S+ convolution\(.*?dim_labels=(\S+?),", text)


def only_canonical(labels: list[str]) -> bool:
    return bool(labels) and set(labels) <= CANONICAL


def binds_primitive(fn: Any, *args: Any) -> bool:
    return _cpu_conv.cpu_layout_p.name in str(jax.make_jaxpr(fn)(*args))


def op_names(text: str) -> list[str]:
    """StableHLO operation names in order, without SSA names, operands or locations."""
    return re.findall(r'^\s*(?:%[^=]*=\s*)?"?([a-z_]+\.[a-z_]+)', text, re.M)


# One convolution per case: (input shape, kernel shape, lax.conv_general_dilated kwargs).
CASES: dict[str, tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]]] = {
    "nhwc": ((4, 9, 9, 3), (3, 3, 3, 5), {"dimension_numbers": NHWC}),
    "nchw": ((4, 3, 9, 9), (5, 3, 3, 3), {"dimension_numbers": ("NCHW", "OIHW", "NCHW")}),
    "strided_dilated_1d": (
        (4, 17, 3),
        (3, 3, 6),
        {"dimension_numbers": ("NWC", "WIO", "NWC"), "window_strides": (2,), "rhs_dilation": (2,)},
    ),
    "transposed_conv": (
        (4, 6, 6, 3),
        (3, 3, 3, 4),
        {"dimension_numbers": NHWC, "lhs_dilation": (2, 2), "padding": ((1, 1), (1, 1))},
    ),
    "grouped": ((4, 8, 8, 6), (3, 3, 3, 4), {"dimension_numbers": NHWC, "feature_group_count": 2}),
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
# Weight gradients XLA turns back into a non-canonical form after the rewrite: that of a
# grouped convolution (batch_group_count expanded) and that of a transposed convolution
# (operands swapped by the algebraic simplifier). Their results are still checked.
REWRITTEN_AGAIN_BY_XLA = frozenset({"grouped", "transposed_conv"})


def conv_loss(case: str, n: int | None = None) -> tuple[Any, jax.Array, jax.Array]:
    """A loss of the convolution of ``CASES[case]``, its kernel, and ``n`` inputs."""
    x_shape, w_shape, kwargs = CASES[case]
    kwargs = {"window_strides": (1,) * (len(x_shape) - 2), "padding": "SAME"} | kwargs

    def loss(w: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.mean(jnp.tanh(jax.lax.conv_general_dilated(x, w, **kwargs)) ** 2)

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n or x_shape[0], *x_shape[1:]))
    return loss, jax.random.normal(kw, w_shape), x


@pytest.mark.parametrize("case", sorted(CASES))
def test_rewritten_convolutions_equal_the_plain_loop(case):
    """Forward, input-gradient and weight-gradient convolutions (the latter with batch and
    feature swapped, or a batch_group_count), rewritten, equal the plain loop to 1e-5."""
    loss, w, x = conv_loss(case)
    step = stateless(jax.value_and_grad(loss, argnums=(0, 1)))
    assert _cpu_conv.needs_rewrite(jax.make_jaxpr(step)(w, (), x).jaxpr)
    fast, plain = scan_steps(step, True), scan_steps(step, False)
    assert binds_primitive(fast, w, (), x) and not binds_primitive(plain, w, (), x)
    assert_trees_close(jax.jit(fast)(w, (), x), jax.jit(plain)(w, (), x), RTOL, ATOL)
    if case not in REWRITTEN_AGAIN_BY_XLA:
        assert only_canonical(conv_labels(fast, w, (), x))


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
    """``step(params, batch_stats, mb) -> ((loss, grads), new_batch_stats)`` and inputs."""
    kx, ky = jax.random.split(jax.random.key(1))
    batch = {"x": jax.random.normal(kx, (n, 12, 12, 1)), "y": jax.random.randint(ky, (n,), 0, 10)}
    variables = CNN().init(jax.random.key(0), batch["x"][:2])

    def step(params: Any, stats: Any, mb: dict[str, jax.Array]) -> Any:
        def loss(p: Any) -> Any:
            variables = {"params": p, "batch_stats": stats}
            logits, new = CNN().apply(variables, mb["x"], mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, mb["y"]).mean()
            return ce, new["batch_stats"]

        (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return (value, grads), new_stats

    return step, variables["params"], variables["batch_stats"], batch


@pytest.mark.parametrize("k", [2, 4])
def test_cnn_with_batchnorm_and_remat_equals_python_loop(k):
    """Outputs and carried BatchNorm state equal k jitted steps run from Python (1e-5);
    the loop body is canonical, and the plain loop (negative control) is not."""
    step, params, stats, batch = cnn_setup()
    jitted, outs, expected_stats = jax.jit(step), [], stats
    for j in range(k):
        mb = {name: x[j::k] for name, x in batch.items()}
        out, expected_stats = jitted(params, expected_stats, mb)
        outs.append(out)
    expected = (jax.tree.map(lambda *xs: jnp.stack(xs), *outs), expected_stats)
    fast = scan_steps(step, True, k)
    assert_trees_close(jax.jit(fast)(params, stats, batch), expected, RTOL, ATOL)
    assert only_canonical(conv_labels(fast, params, stats, batch))
    assert not only_canonical(conv_labels(scan_steps(step, False, k), params, stats, batch))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_other_backends_lower_the_plain_loop(platform):
    """For GPU and TPU the loop lowers to the very operations of the plain loop."""
    step, params, stats, batch = cnn_setup()

    def lowered(rewrite: bool) -> str:
        traced = jax.jit(scan_steps(step, rewrite)).trace(params, stats, batch)
        return traced.lower(lowering_platforms=(platform,)).as_text()

    text = lowered(True)
    assert op_names(text) == op_names(lowered(False))
    assert {"stablehlo.convolution", "stablehlo.while"} <= set(op_names(text))
    assert "stablehlo.case" not in text and "platform_index" not in text


def nchw_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )


custom_nchw_conv = jax.custom_vjp(nchw_conv)
custom_nchw_conv.defvjp(
    lambda *xw: (nchw_conv(*xw), xw), lambda xw, g: jax.vjp(nchw_conv, *xw)[1](g)
)


def printing_step(w: jax.Array, x: jax.Array) -> Any:
    """A step with an effect (a host callback)."""
    value, grad = jax.value_and_grad(conv_loss("nchw")[0])(w, x)
    jax.debug.print("loss {}", value)
    return value, grad


def custom_vjp_step(w: jax.Array, x: jax.Array) -> Any:
    """A rewritable NCHW convolution next to one inside ``custom_vjp``, out of reach."""
    return jnp.mean(nchw_conv(x, w)) + jnp.mean(custom_nchw_conv(x, w))


@pytest.mark.parametrize("fn", [printing_step, custom_vjp_step])
def test_steps_the_rewrite_does_not_reach_run_as_written(fn):
    """Effects, or a convolution in a primitive the rewrite leaves alone: the plain loop."""
    _, w, x = conv_loss("nchw")
    step = stateless(fn)
    assert _cpu_conv.needs_rewrite(jax.make_jaxpr(step)(w, (), x).jaxpr)
    fast = scan_steps(step, True)
    assert not binds_primitive(fast, w, (), x)
    assert not only_canonical(conv_labels(fast, w, (), x))
    assert_trees_close(jax.jit(fast)(w, (), x), jax.jit(scan_steps(step, False))(w, (), x))


def test_inner_jit_keeps_its_shardings_and_name():
    """A jitted function is rebound, not inlined: its sharding constraints and its name
    reach the CPU lowering of the rewritten loop as in the plain loop's."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))

    def sharded_conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)

    conv = jax.jit(sharded_conv, in_shardings=(sharding, None), out_shardings=sharding)
    _, w, x = conv_loss("nhwc")
    step = stateless(jax.value_and_grad(lambda w, x: jnp.mean(jnp.tanh(conv(x, w)) ** 2)))
    fast = scan_steps(step, True)
    assert binds_primitive(fast, w, (), x) and only_canonical(conv_labels(fast, w, (), x))
    texts = [jax.jit(scan_steps(step, r)).lower(w, (), x).as_text() for r in (True, False)]
    constraints = [len(re.findall(r"sdy\.sharding_constraint|@Sharding", t)) for t in texts]
    assert constraints[0] == constraints[1] > 0, constraints
    assert all("func.func private @sharded_conv(" in t for t in texts)


def test_literal_outputs_come_back_as_arrays():
    """Constants a step returns leave the rewritten call as arrays of the same types."""
    loss, w, x = conv_loss("nhwc")

    def step(w: jax.Array, c: Any, b: jax.Array) -> Any:
        value, grad = jax.value_and_grad(loss)(w, b)
        extra = {"lr": 0.1, "n": b.shape[0], "flag": True, "z": jnp.array(0.0)}
        return {"loss": value, "grad": grad, **extra}, c

    def checked(w: jax.Array, c: Any, b: jax.Array) -> Any:
        """The plain loop's step; it also checks, in the loop body, what ``call`` returns."""
        out = _cpu_conv.call(step, w, c, b)
        assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(out))
        return step(w, c, b)

    fast, plain = scan_steps(step, True), scan_steps(checked, False)
    assert binds_primitive(fast, w, (), x)
    got, expected = jax.jit(fast)(w, (), x), jax.jit(plain)(w, (), x)
    assert jax.tree.map(jax.typeof, got) == jax.tree.map(jax.typeof, expected)
    assert_trees_close(got, expected, RTOL, ATOL)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_grad_and_vmap_of_the_loop_equal_the_plain_loop(transform):
    """Differentiating (second order here) or vmapping the loop uses the plain step."""
    step, params, stats, batch = cnn_setup(16)

    def total(rewrite: bool) -> Any:
        def f(params: Any) -> Any:
            ((values, grads), _) = scan_steps(step, rewrite)(params, stats, batch)
            return jnp.sum(values) + sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads))

        return jax.jit(jax.grad(f) if transform == "grad" else jax.vmap(f))

    if transform == "vmap":
        params = jax.tree.map(lambda p: jnp.stack([p, 2 * p]), params)
    assert_trees_close(total(True)(params), total(False)(params), RTOL, ATOL)


def test_convolutions_in_cond_inner_scan_and_remat_are_rewritten():
    """Inside ``cond`` branches, an inner ``scan`` and ``checkpoint``: canonical, 1e-5."""
    w = jax.random.normal(jax.random.key(0), (3, 3, 2, 2))
    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 2))

    def conv(h: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=NHWC)

    def loss(mb: jax.Array) -> jax.Array:
        h = jax.lax.cond(mb.sum() > 0, conv, lambda h: conv(h) * 2, mb)
        h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(conv(h)), None), h, None, length=2)
        return jnp.mean(jax.checkpoint(conv)(h) ** 2)

    step = stateless(lambda _, mb: jax.grad(loss)(mb))
    fast = scan_steps(step, True)
    assert binds_primitive(fast, w, (), x)
    assert_trees_close(jax.jit(fast)(w, (), x), jax.jit(scan_steps(step, False))(w, (), x))
    assert only_canonical(conv_labels(fast, w, (), x))


def test_steps_without_convolutions_are_called_as_they_are():
    """Nothing to rewrite: ``call`` is ``fn(*args)``, bitwise."""
    w = jnp.arange(12.0).reshape(4, 3) / 10
    x = jnp.linspace(-1, 1, 32).reshape(8, 4)
    step = stateless(jax.value_and_grad(lambda w, x: jnp.mean(jnp.tanh(x @ w) ** 2)))
    assert not _cpu_conv.needs_rewrite(jax.make_jaxpr(step)(w, (), x).jaxpr)
    fast = scan_steps(step, True)
    assert not binds_primitive(fast, w, (), x)
    assert trees_equal(jax.jit(fast)(w, (), x), jax.jit(scan_steps(step, False))(w, (), x))


def test_accumulate_gives_canonical_convolutions():
    """``jaxaccum.accumulate`` runs a CNN step with only canonical convolutions on CPU."""
    step, params, stats, batch = cnn_setup()
    fn = jaxaccum.accumulate(step, 2, batch_argnums=2, carry_argnums=1)
    assert only_canonical(conv_labels(fn, params, stats, batch))


def test_accumulate_keeps_static_arguments_and_is_differentiable():
    """A Python int reaches the step as it is (with and without an outer jit); ``jax.grad``
    of the accumulated loss equals that of the full batch (1e-5)."""
    loss, w, x = conv_loss("nhwc", n=8)
    vg = jax.value_and_grad(lambda w, x, crop: loss(w, x[:, :crop, :crop]))
    acc = jaxaccum.accumulate(vg, k=4)
    assert_trees_close(jax.jit(acc, static_argnums=2)(w, x, 3), vg(w, x, 3), RTOL, ATOL)
    assert_trees_close(acc(w, x, 3), vg(w, x, 3), RTOL, ATOL)
    grad = jax.grad(jaxaccum.accumulate(loss, k=2))
    assert_trees_close(jax.jit(grad)(w, x), jax.grad(loss)(w, x), RTOL, ATOL)


def sharded_checks() -> None:
    """In ``shard_map`` (check_vma on and off) and with Explicit mesh axes, on 8 devices,
    the rewritten loop equals the plain one (1e-5) and is canonical."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    loss, w, x = conv_loss("nhwc", n=32)
    step = stateless(jax.value_and_grad(loss))
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    w = jax.device_put(w, NamedSharding(mesh, P()))

    def per_device(rewrite: bool, check_vma: bool) -> Any:
        def body(w: jax.Array, x: jax.Array) -> Any:
            return jax.lax.pmean(scan_steps(step, rewrite)(w, (), x)[0], "data")

        specs = {"in_specs": (P(), P("data")), "out_specs": P()}
        return jax.shard_map(body, mesh=mesh, check_vma=check_vma, **specs)

    cases = {f"shard_map(check_vma={v})": lambda r, v=v: per_device(r, v) for v in (True, False)}
    cases["explicit"] = lambda r: lambda w, x: scan_steps(step, r)(w, (), x)[0]
    with jax.set_mesh(mesh):
        for name, make in cases.items():
            fast = make(True)
            assert binds_primitive(fast, w, x), name
            expected = jax.jit(make(False))(w, x)
            assert_trees_close(jax.jit(fast)(w, x), expected, RTOL, ATOL)
            assert only_canonical(conv_labels(fast, w, x)), name


def test_sharded_loops_in_a_subprocess():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    path = pathlib.Path(__file__)
    proc = subprocess.run(
        [sys.executable, path.name], cwd=path.parent, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "sharded checks passed" in proc.stdout, proc.stderr[-4000:]


if __name__ == "__main__":
    assert jax.device_count() == 8, "run with --xla_force_host_platform_device_count=8"
    sharded_checks()
    print("sharded checks passed")
