"""The accumulate contract, each property against an independent reference.

References are the full-batch computation (jax.value_and_grad on all N examples) and
hand-written Python loops over explicitly sliced micro-batches. Tolerances: float32
round-off, rtol 1e-5 / atol 1e-6, unless a test says otherwise.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    assert_trees_close,
    digits_batch,
    init_params,
    masked_mean_loss,
    mean_loss,
    strided_micro,
    trees_equal,
)

import jaxaccum
from jaxaccum import Reduce

N = 64


@pytest.fixture(scope="module")
def params() -> Any:
    return init_params()


@pytest.fixture(scope="module")
def batch() -> dict[str, jax.Array]:
    return digits_batch(N)


# 1/3: exactness against the full batch for every k dividing N, each split.
@pytest.mark.parametrize("split", ["strided", "contiguous"])
@pytest.mark.parametrize("k", [1, 2, 4, 8, 16, 32, 64])
def test_equals_full_batch_for_every_divisor(params, batch, k, split):
    grad_fn = jax.value_and_grad(mean_loss)
    loss, grads = jax.jit(jaxaccum.accumulate(grad_fn, k, split=split))(params, batch)
    ref_loss, ref_grads = jax.jit(grad_fn)(params, batch)
    assert_trees_close((loss, grads), (ref_loss, ref_grads))


def test_k1_runs_the_same_path_and_is_bitwise_step_fn(params, batch):
    grad_fn = jax.value_and_grad(mean_loss)
    one = jaxaccum.accumulate(grad_fn, 1)
    assert one is not grad_fn  # no special case: the options mean the same at every k
    assert trees_equal(one(params, batch), grad_fn(params, batch))
    assert trees_equal(jax.jit(one)(params, batch), jax.jit(grad_fn)(params, batch))


def test_presplit_input(params, batch):
    k = 4
    presplit = jax.tree.map(lambda x: x.reshape(k, N // k, *x.shape[1:]), batch)
    grad_fn = jax.value_and_grad(mean_loss)
    out = jax.jit(jaxaccum.accumulate(grad_fn, k, split="presplit"))(params, presplit)
    assert_trees_close(out, grad_fn(params, batch))


# 7: which examples each micro-batch holds.
@pytest.mark.parametrize(
    ("split", "expected"),
    [("strided", lambda x, j, k: x[j::k]), ("contiguous", lambda x, j, k: x.reshape(k, -1)[j])],
)
def test_split_assigns_examples(split, expected):
    k, x = 4, jnp.arange(16)
    stacked = jaxaccum.accumulate(lambda p, mb: mb, k, split=split, reduce=Reduce.STACK)(None, x)
    for j in range(k):
        np.testing.assert_array_equal(stacked[j], expected(x, j, k))


def test_program_size_does_not_grow_with_k():
    def step(p, mb):
        return jax.value_and_grad(lambda p: jnp.mean(jnp.tanh(mb @ p) ** 2))(p)

    def hlo_size(k: int, unroll: int = 1) -> int:
        f = jax.jit(jaxaccum.accumulate(step, k, unroll=unroll))
        return len(f.lower(jnp.ones((8, 8)), jnp.ones((256, 8))).as_text())

    assert hlo_size(32) <= 1.05 * hlo_size(2)
    assert hlo_size(32, unroll=32) > 1.5 * hlo_size(32)  # the unroll option is honoured


@pytest.mark.parametrize("unroll", [2, True])
def test_unroll_gives_same_result(params, batch, unroll):
    grad_fn = jax.value_and_grad(mean_loss)
    out = jax.jit(jaxaccum.accumulate(grad_fn, 8, unroll=unroll))(params, batch)
    assert_trees_close(out, grad_fn(params, batch))


# 1: batch arguments by position, by keyword, several of them; other args unchanged.
def test_several_batch_args_keywords_and_broadcast_args(params, batch):
    def loss(params, x, scale, *, y):
        return scale * mean_loss(params, {"x": x, "y": y})

    grad_fn = jax.value_and_grad(loss)
    acc = jaxaccum.accumulate(grad_fn, 8, batch_argnums=1, batch_argnames="y")
    out = jax.jit(acc)(params, batch["x"], 3.0, y=batch["y"])
    assert_trees_close(out, grad_fn(params, batch["x"], 3.0, y=batch["y"]))
    # A positional-or-keyword batch argument may also be passed by keyword.
    by_name = jaxaccum.accumulate(jax.value_and_grad(mean_loss), 8)
    assert_trees_close(by_name(params, batch=batch), jax.value_and_grad(mean_loss)(params, batch))


# 2: output reductions, default and per leaf, against a Python loop.
def _loop_outputs(fn, params, batch, k):
    return [fn(params, strided_micro(batch, j, k)) for j in range(k)]


def test_default_reductions_mean_floats_sum_ints_any_bools(batch):
    def step(p, mb):
        return {
            "f32": jnp.mean(mb["x"]),
            "bf16": jnp.mean(mb["x"], axis=0).astype(jnp.bfloat16),
            "count": jnp.sum(mb["y"] == 3).astype(jnp.int32),
            "seen_9": jnp.any(mb["y"] == 9),
        }

    k = 8
    out = jax.jit(jaxaccum.accumulate(step, k))(None, batch)
    outs = _loop_outputs(step, None, batch, k)
    np.testing.assert_allclose(out["f32"], np.mean([o["f32"] for o in outs]), rtol=1e-6)
    assert out["bf16"].dtype == jnp.bfloat16
    ref_bf16 = np.mean([np.asarray(o["bf16"], np.float32) for o in outs], axis=0)
    np.testing.assert_allclose(np.asarray(out["bf16"], np.float32), ref_bf16, rtol=1e-2)
    assert out["count"].dtype == jnp.int32 and int(out["count"]) == int(jnp.sum(batch["y"] == 3))
    assert out["seen_9"].dtype == jnp.bool_ and bool(out["seen_9"])


def test_per_leaf_reduction_spec(batch):
    def step(p, mb):
        m = jnp.mean(mb["x"], axis=1)
        return {"mean": m.mean(), "sum": m.sum(), "max": m.max(), "min": m.min(), "last": m, "s": m}

    k = 4
    spec = {"mean": None, "sum": "sum", "max": Reduce.MAX, "min": Reduce.MIN}
    spec |= {"last": Reduce.LAST, "s": Reduce.STACK}
    out = jax.jit(jaxaccum.accumulate(step, k, reduce=spec))(None, batch)
    outs = _loop_outputs(step, None, batch, k)
    np.testing.assert_allclose(out["mean"], np.mean([o["mean"] for o in outs]), rtol=1e-6)
    np.testing.assert_allclose(out["sum"], np.sum([o["sum"] for o in outs]), rtol=1e-6)
    np.testing.assert_array_equal(out["max"], np.max([o["max"] for o in outs]))
    np.testing.assert_array_equal(out["min"], np.min([o["min"] for o in outs]))
    np.testing.assert_array_equal(out["last"], outs[-1]["last"])
    np.testing.assert_array_equal(out["s"], np.stack([o["s"] for o in outs]))


def test_prefix_spec_applies_to_a_whole_subtree(params, batch):
    k = 4
    acc = jaxaccum.accumulate(jax.value_and_grad(mean_loss), k, reduce=(None, Reduce.SUM))
    loss, grads = jax.jit(acc)(params, batch)
    ref_loss, ref_grads = jax.value_and_grad(mean_loss)(params, batch)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, jax.tree.map(lambda g: k * g, ref_grads), rtol=1e-5, atol=1e-5)


def test_stack_at_k1_keeps_the_leading_axis(batch):
    out = jaxaccum.accumulate(lambda p, mb: mb["x"].sum(), 1, reduce=Reduce.STACK)(None, batch)
    assert out.shape == (1,)


# 10: bfloat16 outputs are summed in float32.
def test_bfloat16_mean_of_512_ones_is_exactly_one():
    step = lambda p, mb: (1 + mb.sum()).astype(jnp.bfloat16)  # noqa: E731  (1, not a constant)
    x = jnp.zeros((512, 1))
    out = jax.jit(jaxaccum.accumulate(step, 512))(None, x)
    assert out.dtype == jnp.bfloat16 and float(out) == 1.0
    # Negative control: a bfloat16 running sum stalls at 256 (1 is below half an ulp),
    # so the mean comes out as 0.5.
    naive = jax.jit(jaxaccum.accumulate(step, 512, accum_dtype=jnp.bfloat16))(None, x)
    assert float(naive) == 0.5


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2), (jnp.float16, 5e-3)]
)
def test_low_precision_params_keep_their_dtype(batch, dtype, rtol):
    params = init_params(dtype=dtype)
    grad_fn = jax.value_and_grad(mean_loss)
    loss, grads = jax.jit(jaxaccum.accumulate(grad_fn, 8))(params, batch)
    assert loss.dtype == dtype
    assert all(g.dtype == dtype for g in jax.tree.leaves(grads))
    # Reference: the same model computed in float32 from the same (rounded) params.
    ref_loss, ref_grads = grad_fn(jax.tree.map(lambda p: p.astype(jnp.float32), params), batch)
    assert_trees_close(loss, ref_loss, rtol=rtol, atol=rtol)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    assert_trees_close(grads, ref_grads, rtol=0, atol=4 * rtol * scale)


# 4: token-weighted accumulation, with a fully masked micro-batch.
def _uneven_mask(k: int) -> jax.Array:
    """Valid-example mask whose count differs per strided micro-batch; micro-batch 1 is empty."""
    rows = np.arange(N)
    mask = (rows % 3 != 0) | (rows < 10)
    mask[1::k] = False  # micro-batch 1 (strided split) has no valid example
    mask[2::k][:5] = False
    return jnp.asarray(mask, jnp.float32)


def test_weighted_equals_full_batch_token_mean(params, batch):
    k = 8
    batch = batch | {"mask": _uneven_mask(k)}
    grad_fn = jax.value_and_grad(masked_mean_loss)
    acc = jaxaccum.accumulate(grad_fn, k, weight_fn=lambda mb: mb["mask"].sum())
    loss, grads = jax.jit(acc)(params, batch)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves((loss, grads)))
    assert_trees_close((loss, grads), grad_fn(params, batch))
    # Negative control: the plain mean of per-micro-batch means is not the full-batch mean.
    # (The empty micro-batch's 0/0 must be left out by hand for the naive mean to be finite.)
    per_mb = _loop_outputs(grad_fn, params, batch, k)
    naive_loss = np.mean([float(o[0]) for o in per_mb if np.isfinite(float(o[0]))])
    assert abs(naive_loss - float(loss)) > 1e-3


def test_weighted_all_zero_weights_give_zero_not_nan(params, batch):
    batch = batch | {"mask": jnp.zeros(N)}
    acc = jaxaccum.accumulate(
        jax.value_and_grad(masked_mean_loss), 4, weight_fn=lambda mb: mb["mask"].sum()
    )
    loss, grads = acc(params, batch)
    assert float(loss) == 0.0 and all(not jnp.any(g) for g in jax.tree.leaves(grads))


def test_pad_batch_with_weights_equals_unpadded(params):
    batch = digits_batch(60)  # 60 examples, k=8 needs 64
    padded, mask = jaxaccum.pad_batch(batch, 8)
    padded["mask"] = mask.astype(jnp.float32)
    acc = jaxaccum.accumulate(
        jax.value_and_grad(masked_mean_loss), 8, weight_fn=lambda mb: mb["mask"].sum()
    )
    assert_trees_close(jax.jit(acc)(params, padded), jax.value_and_grad(mean_loss)(params, batch))


# 5: carried state, against a Python loop.
def test_carry_threads_state_in_order(batch):
    def step(scale, stats, mb):
        count, running = stats
        mean_x = jnp.mean(mb["x"])
        new = (count + 1, 0.9 * running + 0.1 * mean_x * scale)
        return mean_x * running, new

    k = 8
    stats = (jnp.zeros((), jnp.int32), jnp.ones(()))
    acc = jaxaccum.accumulate(step, k, batch_argnums=2, carry_argnums=1)
    out, final = jax.jit(acc)(2.0, stats, batch)
    ref_outs, state = [], stats
    for j in range(k):
        o, state = step(2.0, state, strided_micro(batch, j, k))
        ref_outs.append(o)
    np.testing.assert_allclose(out, np.mean(ref_outs), rtol=1e-6)
    assert int(final[0]) == k
    np.testing.assert_allclose(final[1], state[1], rtol=1e-6)


def test_several_carried_arguments_by_name(batch):
    def step(a, b, batch):
        return jnp.sum(batch["x"]), (a + 1, b * 2)

    acc = jaxaccum.accumulate(step, 4, batch_argnames="batch", carry_argnames=("a", "b"))
    total, (a, b) = acc(batch=batch, a=jnp.int32(0), b=jnp.float32(1))
    np.testing.assert_allclose(total, jnp.sum(batch["x"]) / 4, rtol=1e-6)
    assert int(a) == 4 and float(b) == 16.0


# 6: per-micro-batch keys.
def test_rng_distinct_per_microbatch_and_deterministic(batch):
    def step(key, mb):
        return jax.random.uniform(key, (3,))

    k = 8
    acc = jax.jit(jaxaccum.accumulate(step, k, batch_argnums=1, rng_argnums=0, reduce="stack"))
    key = jax.random.key(42)
    draws = acc(key, batch)
    assert len({tuple(np.asarray(d).tolist()) for d in draws}) == k
    assert trees_equal(draws, acc(key, batch))
    expected = jnp.stack([step(jax.random.fold_in(key, j), None) for j in range(k)])
    np.testing.assert_array_equal(draws, expected)
    legacy = acc(jax.random.PRNGKey(42), batch)  # raw uint32 keys work too
    assert len({tuple(np.asarray(d).tolist()) for d in legacy}) == k


# 8: one micro-batch's activations at a time.
def test_temp_memory_falls_with_k():
    """MLP over 4096 examples of width 512: activations dominate temporaries.

    On XLA:CPU, temp_size_in_bytes leaves out scratch placed in output buffers; here the
    outputs (one gradient) are small next to the activations (4096 x 512 x 4 bytes per
    layer), so the temporaries track activation memory.
    """
    width, n = 512, 4096
    params = [jnp.zeros((width, width)) for _ in range(3)]

    def loss(params, x):
        for w in params:
            x = jnp.tanh(x @ w)
        return jnp.mean(x**2)

    x = jax.ShapeDtypeStruct((n, width), jnp.float32)

    def temp(k: int) -> int:
        return jaxaccum.inspect.compiled_memory(
            jaxaccum.accumulate(jax.value_and_grad(loss), k), params, x
        )[2]

    t1, t8 = temp(1), temp(8)
    assert t8 <= 0.3 * t1, (t1, t8)


# 9: composition with jit, donation, user-level jit; no retracing; named scope.
def test_inside_user_jitted_step_with_donation_and_no_retrace(params, batch):
    traces = []

    def loss(p, b):
        traces.append(1)
        return mean_loss(p, b)

    grad_fn = jaxaccum.accumulate(jax.value_and_grad(loss), 4)

    @jax.jit
    def sgd_step(params, batch):
        loss, grads = grad_fn(params, batch)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss

    step = jax.jit(sgd_step, donate_argnums=0)
    p = jax.tree.map(jnp.copy, params)
    p, _ = step(p, batch)
    after_first = len(traces)
    for _ in range(3):
        p, _ = step(p, batch)
    assert len(traces) == after_first
    # Reference: the same three+one SGD steps with full-batch gradients.
    ref = params
    for _ in range(4):
        g = jax.grad(mean_loss)(ref, batch)
        ref = jax.tree.map(lambda p, g: p - 0.1 * g, ref, g)
    assert_trees_close(p, ref, rtol=1e-5, atol=1e-5)


def test_chex_max_traces(params, batch):
    @chex.assert_max_traces(n=1)
    def accumulated(params, batch):
        return jaxaccum.accumulate(jax.value_and_grad(mean_loss), 4)(params, batch)

    f = jax.jit(accumulated)
    for _ in range(3):
        f(params, batch)


def test_named_scope_in_program(params, batch):
    grad_fn = jaxaccum.accumulate(jax.value_and_grad(mean_loss), 4)
    text = jax.jit(grad_fn).lower(params, batch).as_text(debug_info=True)
    assert "jaxaccum.accumulate" in text


def test_negative_weights_count_as_zero(batch):
    k = 4
    weights = jnp.array([2.0, -5.0, 1.0, 0.0])  # one weight per strided micro-batch
    b = batch | {"w": jnp.tile(weights, N // k)}
    acc = jaxaccum.accumulate(lambda p, mb: jnp.mean(mb["x"]), k, weight_fn=lambda mb: mb["w"][0])
    means = [float(jnp.mean(strided_micro(b, j, k)["x"])) for j in range(k)]
    np.testing.assert_allclose(acc(None, b), (2 * means[0] + means[2]) / 3, rtol=1e-6)
