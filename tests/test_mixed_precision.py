"""Low-precision params and compute: float32 accumulation and dynamic loss scaling."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import digits_batch, init_params, mean_loss, trees_equal

import jaxaccum


def _rel_err(tree, ref) -> float:
    diff = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), tree, ref)
    return float(optax.tree.norm(diff) / optax.tree.norm(ref))


def test_bfloat16_error_is_small_and_flat_in_k():
    n = 256
    params = init_params(dtype=jnp.bfloat16)
    batch = digits_batch(n)
    ref = jax.grad(mean_loss)(jax.tree.map(lambda p: p.astype(jnp.float32), params), batch)
    grad_fn = jax.value_and_grad(mean_loss)
    err = {
        k: _rel_err(jax.jit(jaxaccum.accumulate(grad_fn, k))(params, batch)[1], ref)
        for k in (2, 32)
    }
    assert err[2] <= 1e-2 and err[32] <= 1e-2, err
    assert err[32] <= 1.5 * err[2], err
    # The train step keeps the same property for the applied update.
    for k in (2, 32):
        step = jaxaccum.train_step(mean_loss, optax.sgd(1.0), k)
        new = step.update(step.init(params), batch)[0].params
        delta = jax.tree.map(
            lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), params, new
        )
        assert _rel_err(delta, ref) <= 2e-2


def _scaled_loss(factor):
    def loss(params, batch):
        return mean_loss(params, batch) * jnp.asarray(factor, jax.tree.leaves(params)[0].dtype)

    return loss


def test_float16_loss_scaling_recovers_underflowing_gradients():
    params16, batch, k = init_params(dtype=jnp.float16), digits_batch(64), 4
    loss = _scaled_loss(2.0**-22)  # exact in float16; gradients fall below its subnormals
    ref = jax.grad(loss)(jax.tree.map(lambda p: p.astype(jnp.float32), params16), batch)
    # Negative control: without scaling, float16 flushes most of the gradient to zero.
    plain = jax.jit(jaxaccum.accumulate(jax.grad(loss), k))(params16, batch)
    assert _rel_err(plain, ref) > 0.5
    # With scaling: loss x 2**15 per micro-batch, unscaled once after accumulation.
    step = jaxaccum.train_step(loss, optax.sgd(1.0), k, loss_scale=jaxaccum.DynamicLossScale())
    state, metrics = jax.jit(step.update)(step.init(params16), batch)
    assert bool(metrics.applied) and float(state.loss_scale.scale) == 2.0**15
    np.testing.assert_allclose(float(metrics.grad_norm), float(optax.tree.norm(ref)), rtol=2e-2)


def test_float16_overflow_skips_and_backs_off_then_recovers():
    params16, batch = init_params(dtype=jnp.float16), digits_batch(64)
    config = jaxaccum.DynamicLossScale(init_scale=2.0**15, growth_interval=2)
    step = jaxaccum.train_step(_scaled_loss(50.0), optax.sgd(1e-4), 4, loss_scale=config)
    update = jax.jit(step.update)
    state = step.init(params16)
    scales, applied = [], []
    for _ in range(12):
        prev = state
        state, metrics = update(state, batch)
        scales.append(float(state.loss_scale.scale))
        applied.append(bool(metrics.applied))
        if not applied[-1]:
            assert trees_equal(
                (state.params, state.opt_state, state.step),
                (prev.params, prev.opt_state, prev.step),
            )
    first_ok = applied.index(True)
    assert first_ok > 0 and not any(applied[:first_ok])
    assert scales[:first_ok] == [2.0**15 / 2 ** (i + 1) for i in range(first_ok)]
    assert int(state.skipped) == applied.count(False)
    # After growth_interval=2 good steps the scale doubles (and may overflow again).
    assert scales[first_ok + 1] == 2 * scales[first_ok]


@pytest.mark.parametrize(
    ("param_dtype", "compute_dtype"),
    list(itertools.product([jnp.float32, jnp.bfloat16, jnp.float16], repeat=2)),
)
def test_output_dtypes_follow_param_dtypes(param_dtype, compute_dtype):
    def loss(params, batch):
        cast = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        return mean_loss(cast, batch)

    params = init_params(dtype=param_dtype)
    scale = jaxaccum.DynamicLossScale() if compute_dtype == jnp.float16 else None
    step = jaxaccum.train_step(loss, optax.adam(1e-3), 4, loss_scale=scale)
    state, metrics = jax.jit(step.update)(step.init(params), digits_batch(64))
    assert bool(metrics.applied)
    assert jax.tree.map(lambda p: p.dtype, state.params) == jax.tree.map(lambda p: p.dtype, params)
    grads = jaxaccum.accumulate(jax.grad(loss), 4)(params, digits_batch(64))
    assert all(g.dtype == param_dtype for g in jax.tree.leaves(grads))
    assert metrics.loss.dtype == metrics.grad_norm.dtype == jnp.float32
