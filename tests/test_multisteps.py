"""Accumulation across calls, each property against an independent reference.

References are the full-batch step (``jax.grad`` on all examples, then the optimizer), the
in-step path (``jaxaccum.accumulate``), gradients of hand-sliced micro-batches averaged in
NumPy, and plain ``optax.MultiSteps`` as the negative control. Tolerance: 1e-6 absolute on
params, updates and gradients (float32 round-off) unless a test says otherwise.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
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
from jaxaccum import MultiStepsState, flush, multi_steps

N = 64
TOL = {"rtol": 0.0, "atol": 1e-6}


@pytest.fixture(scope="module")
def params() -> Any:
    return init_params()


@pytest.fixture(scope="module")
def batch() -> dict[str, jax.Array]:
    return digits_batch(3 * N)


def _window(batch: dict[str, jax.Array], t: int) -> dict[str, jax.Array]:
    """The t-th block of N examples: the data of one optimizer update."""
    return jax.tree.map(lambda x: x[t * N : (t + 1) * N], batch)


def _train_step(opt: Any, loss: Any = mean_loss) -> Any:
    """A jitted micro-step: gradient of one micro-batch, ``opt.update``, apply."""

    @jax.jit
    def step(p: Any, s: Any, mb: Any, **extra: Any) -> tuple[Any, Any, Any]:
        grads = jax.grad(loss)(p, mb)
        updates, s = opt.update(grads, s, p, **extra)
        return optax.apply_updates(p, updates), s, updates

    return step


token_grad = jax.jit(jax.grad(masked_mean_loss))


def _max_diff(a: Any, b: Any) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


def _uneven_mask(k: int) -> jax.Array:
    """Valid-example mask whose count differs a lot between strided micro-batches."""
    rows = np.arange(N)
    mask = rows % 5 != 0
    mask[0::k] = rows[0::k] < 12  # micro-batch 0 keeps 3 of 16 examples
    return jnp.asarray(mask, jnp.float32)


# Exactness: k calls equal the in-step path and the full batch.
@pytest.mark.parametrize("k", [1, 4, 8])
def test_k_calls_equal_in_step_and_full_batch(params, batch, k):
    inner = optax.adamw(1e-2)
    step = _train_step(multi_steps(inner, k))
    grad_fn = jax.value_and_grad(mean_loss)

    @jax.jit(static_argnums=3)
    def reference(p, s, b, in_step):
        fn = jaxaccum.accumulate(grad_fn, k) if in_step else grad_fn
        updates, s = inner.update(fn(p, b)[1], s, p)
        return optax.apply_updates(p, updates), s, updates

    p, s = params, multi_steps(inner, k).init(params)
    refs = {True: (params, inner.init(params)), False: (params, inner.init(params))}
    for t in range(3):
        b = _window(batch, t)
        for j in range(k):
            p, s, updates = step(p, s, strided_micro(b, j, k))
            assert bool(s.emitted) == (j == k - 1)
        for in_step in refs:
            ref_p, ref_s, ref_updates = reference(*refs[in_step], b, in_step)
            refs[in_step] = (ref_p, ref_s)
            assert_trees_close(updates, ref_updates, **TOL)
            assert_trees_close(p, ref_p, **TOL)
            assert_trees_close(s.inner_opt_state, ref_s, **TOL)
    # The inner optimizer counts updates, not calls.
    assert int(s.gradient_step) == 3 == int(optax.tree.get(s.inner_opt_state, "count"))
    assert int(s.mini_step) == 0 and float(s.acc_weight) == 0.0


def test_state_dtypes_and_low_precision_params(params):
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    opt = multi_steps(optax.sgd(1.0), 2)
    s = opt.init(bf16)
    assert (s.mini_step.dtype, s.gradient_step.dtype) == (jnp.int32, jnp.int32)
    assert (s.acc_weight.dtype, s.emitted.dtype) == (jnp.float32, jnp.bool_)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s.acc_grads))
    ones = jax.tree.map(jnp.ones_like, bf16)
    updates, s = opt.update(ones, s, bf16)
    updates, s = opt.update(ones, s, bf16)
    assert bool(s.emitted) and all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert all(bool(jnp.all(u == -1)) for u in jax.tree.leaves(updates))
    # The state keeps the first four field names of optax's, for code that reads them.
    assert MultiStepsState._fields[:4] == optax.MultiStepsState._fields[:4]


# Per-call weights: the exact token mean; optax.MultiSteps averages calls equally.
def test_weights_give_token_mean_and_multisteps_gives_equal_weight_mean(params, batch):
    k = 4
    b = _window(batch, 0) | {"mask": _uneven_mask(k)}
    mbs = [strided_micro(b, j, k) for j in range(k)]
    token_mean = token_grad(params, b)  # full batch, by hand
    per_call = [token_grad(params, mb) for mb in mbs]
    equal_mean = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *per_call)

    def run(opt, weighted):
        step, s = _train_step(opt, masked_mean_loss), opt.init(params)
        for mb in mbs:
            extra = {"weight": mb["mask"].sum()} if weighted else {}
            _, s, updates = step(params, s, mb, **extra)
        return updates  # optax.identity(): the update is the accumulated gradient

    weighted = run(multi_steps(optax.identity(), k), weighted=True)
    assert_trees_close(weighted, token_mean, **TOL)
    plain = run(optax.MultiSteps(optax.identity(), k), weighted=False)
    assert_trees_close(plain, equal_mean, **TOL)
    assert _max_diff(plain, token_mean) > 1e-2  # negative control: not the token mean
    # Without weights the wrapper averages calls equally too.
    assert_trees_close(run(multi_steps(optax.identity(), k), weighted=False), plain, **TOL)


def test_zero_weight_calls_add_nothing_and_do_not_count(params, batch):
    k = 4
    b = _window(batch, 0) | {"mask": _uneven_mask(k)}
    mbs = [strided_micro(b, j, k) for j in range(k)]
    empty = mbs[1] | {"mask": jnp.zeros_like(mbs[1]["mask"])}  # no valid example: NaN gradient
    opt = multi_steps(optax.identity(), k)
    step, s = _train_step(opt, masked_mean_loss), opt.init(params)
    for i, mb in enumerate([mbs[0], empty, empty, *mbs[1:]]):
        _, s, updates = step(params, s, mb, weight=mb["mask"].sum())
        assert bool(s.emitted) == (i == k + 1)
        assert int(s.mini_step) == [1, 1, 1, 2, 3, 0][i]  # weight-0 calls are not mini-steps
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
    assert_trees_close(updates, token_grad(params, b), **TOL)
    # Calls of weight 0 never close a window: nothing is applied.
    for mb in mbs:
        p, s, updates = step(params, s, mb, weight=0.0)
        assert not bool(s.emitted)
    assert trees_equal(p, params) and int(s.gradient_step) == 1 and int(s.mini_step) == 0
    assert all(not bool(jnp.any(a)) for a in jax.tree.leaves(s.acc_grads))


# The inner update runs on emitting calls only.
def _counting(counter: list[int]) -> optax.GradientTransformation:
    """An identity transformation whose update reports each execution to the host."""

    def update(updates, state, params=None):
        jax.debug.callback(lambda: counter.append(1))
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def test_inner_update_runs_only_on_emitting_calls(params, batch):
    k, windows = 4, 3
    mbs = [strided_micro(_window(batch, t), j, k) for t in range(windows) for j in range(k)]
    ours, theirs = [], []
    for opt in [multi_steps(_counting(ours), k), optax.MultiSteps(_counting(theirs), k)]:
        step, p, s = _train_step(opt), params, opt.init(params)
        for mb in mbs:
            p, s, _ = step(p, s, mb)
        jax.block_until_ready(p)
        jax.effects_barrier()
    assert len(ours) == windows
    assert len(theirs) == windows * k  # negative control: optax.MultiSteps runs it every call


def test_extra_args_reach_the_inner_update(params):
    def update(updates, state, params=None, *, factor):
        return jax.tree.map(lambda u: factor * u, updates), state

    inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    opt = multi_steps(inner, 2)
    s, ones = opt.init(params), jax.tree.map(jnp.ones_like, params)
    updates, s = opt.update(ones, s, params, factor=3.0)
    updates, s = opt.update(ones, s, params, factor=3.0)
    assert all(bool(jnp.all(u == 3.0)) for u in jax.tree.leaves(updates))


def _fit(make: Any, params: Any, batch: Any, calls: int) -> tuple[Any, list[bool]]:
    """A training loop written against ``optax.MultiSteps``' methods only."""
    multi = make(optax.adam(1e-2), every_k_schedule=3)
    assert multi.inner_opt is not None
    opt = multi.gradient_transformation()

    @jax.jit
    def step(p: Any, s: Any, mb: Any) -> tuple[Any, Any, Any]:
        updates, s = opt.update(jax.grad(mean_loss)(p, mb), s, p)
        return optax.apply_updates(p, updates), s, multi.has_updated(s)

    s, updated = opt.init(params), []
    for t in range(calls):
        params, s, done = step(params, s, strided_micro(_window(batch, 0), t % 4, 4))
        updated.append(bool(done))
    return params, updated


def test_optax_multisteps_methods_give_optax_results(params, batch):
    ours, ours_updated = _fit(multi_steps, params, batch, 7)
    theirs, theirs_updated = _fit(optax.MultiSteps, params, batch, 7)
    assert ours_updated == theirs_updated == [False, False, True] * 2 + [False]
    assert _max_diff(ours, theirs) < 1e-6  # float32 mean of 3 against a running mean


def test_has_updated_is_false_after_a_zero_weight_call(params, batch):
    opt = multi_steps(optax.sgd(0.1), 2)
    grads, s = jax.tree.map(jnp.ones_like, params), opt.init(params)
    for _ in range(2):
        _, s = opt.update(grads, s, params)
    assert bool(opt.has_updated(s))
    _, s = opt.update(grads, s, params, weight=0.0)
    assert not bool(opt.has_updated(s))
    # optax's formula (mini_step == 0 and gradient_step > 0) still says True here
    assert int(s.mini_step) == 0 and int(s.gradient_step) == 1
    with pytest.raises(TypeError, match="state must be the MultiStepsState"):
        opt.has_updated(optax.MultiSteps(optax.sgd(0.1), 2).init(params))


# Dynamic k.
def test_dynamic_k_update_pattern():
    opt = multi_steps(optax.identity(), lambda step: jnp.where(step < 2, 2, 4))
    params = jnp.zeros(3)
    step = jax.jit(opt.update)
    s, rows = opt.init(params), []
    grads = [jnp.full(3, float(i)) for i in range(12)]
    for g in grads:
        updates, s = step(g, s, params)
        rows.append((bool(s.emitted), int(s.mini_step), int(s.gradient_step), float(updates[0])))
    emitted = [r[0] for r in rows]
    assert emitted == [False, True, False, True] + [False, False, False, True] * 2
    assert [r[1] for r in rows] == [1, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert [r[2] for r in rows] == [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    means = [r[3] for r in rows if r[0]]
    assert means == [0.5, 2.5, 5.5, 9.5]  # means of calls (0, 1), (2, 3), (4..7), (8..11)


# Remainders: flush a partial window.
@pytest.mark.parametrize("weighted", [False, True])
def test_flush_partial_window_equals_whole_batch_step(params, batch, weighted):
    k, m = 4, 3
    b = _window(batch, 0) | {"mask": _uneven_mask(k) if weighted else jnp.ones(N)}
    mbs = [strided_micro(b, j, k) for j in range(m)]
    inner = optax.adamw(1e-2)
    opt = multi_steps(inner, k)
    step, p, s = _train_step(opt, masked_mean_loss), params, opt.init(params)
    for mb in mbs:
        p, s, _ = step(p, s, mb, **({"weight": mb["mask"].sum()} if weighted else {}))
    assert not bool(s.emitted) and int(s.mini_step) == m
    updates, s = jax.jit(lambda s, p: flush(inner, s, p))(s, p)
    p = optax.apply_updates(p, updates)
    assert bool(s.emitted) and int(s.mini_step) == 0 and int(s.gradient_step) == 1
    # Reference: one step on the m micro-batches' examples together.
    whole = jax.tree.map(lambda *x: jnp.concatenate(x), *mbs)
    ref_updates, ref_state = jax.jit(inner.update)(
        token_grad(params, whole), inner.init(params), params
    )
    assert_trees_close(updates, ref_updates, **TOL)
    assert_trees_close(p, optax.apply_updates(params, ref_updates), **TOL)
    assert_trees_close(s.inner_opt_state, ref_state, **TOL)
    # The next window is a full one again.
    for j in range(k):
        p, s, _ = step(p, s, strided_micro(b, j, k))
        assert bool(s.emitted) == (j == k - 1)


def test_flush_with_nothing_accumulated(params):
    inner = optax.adamw(1e-2)
    opt = multi_steps(inner, 2)
    s = opt.init(params)
    with pytest.raises(ValueError, match=r"nothing accumulated since the last update"):
        flush(inner, s, params)
    ones = jax.tree.map(jnp.ones_like, params)
    for _ in range(2):
        _, s = opt.update(ones, s, params)
    assert bool(s.emitted)
    with pytest.raises(ValueError, match=r"mini_step=0"):
        flush(inner, s, params)
    # Under jit the count is not known at trace time: the flush is a no-op.
    updates, after = jax.jit(lambda s: flush(inner, s, params))(s)
    assert all(not bool(jnp.any(u)) for u in jax.tree.leaves(updates))
    assert trees_equal(after._replace(emitted=s.emitted), s) and not bool(after.emitted)


# Checkpoints mid-window.
def _restore_target(opt: Any, params: Any) -> Any:
    """Abstract arrays of a fresh state, as a resuming program would build them."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, (params, opt.init(params)))


def test_checkpoint_at_every_mini_step_resumes_bitwise(params, batch, tmp_path):
    k = 4
    opt = multi_steps(optax.adamw(1e-2), k)
    mask = {"mask": _uneven_mask(k)}
    calls = [strided_micro(_window(batch, t) | mask, j, k) for t in range(2) for j in range(k)]
    step = _train_step(opt, masked_mean_loss)

    def run(p, s, mbs):
        for mb in mbs:
            p, s, _ = step(p, s, mb, weight=mb["mask"].sum())
        return p, s

    first = run(params, opt.init(params), calls[:k])  # one update done, then a window
    expected = run(*first, calls[k:])
    with ocp.StandardCheckpointer() as ckpt:
        for m in range(1, k):
            saved = run(*first, calls[k : k + m])
            ckpt.save(tmp_path / f"mini_step_{m}", saved)
            ckpt.wait_until_finished()
            restored = ckpt.restore(tmp_path / f"mini_step_{m}", _restore_target(opt, params))
            assert trees_equal(restored, saved)  # nothing accumulated is lost
            s = restored[1]
            assert isinstance(s, MultiStepsState) and int(s.mini_step) == m
            assert (s.mini_step.dtype, s.gradient_step.dtype) == (jnp.int32, jnp.int32)
            assert (s.acc_weight.dtype, s.emitted.dtype) == (jnp.float32, jnp.bool_)
            assert trees_equal(run(*restored, calls[k + m :]), expected)


# Bad input.
def test_bad_construction_arguments():
    for k in (0, -1, True, 2.0, "4"):
        with pytest.raises(ValueError, match=r"every_k_schedule must be a positive int"):
            multi_steps(optax.sgd(0.1), k)
    with pytest.raises(TypeError, match=r"optax.GradientTransformation"):
        multi_steps(optax.sgd, 2)
    with pytest.raises(ValueError, match=r"accum_dtype must be a floating dtype"):
        multi_steps(optax.sgd(0.1), 2, accum_dtype=jnp.int32)


def test_schedule_returning_less_than_one(params):
    ones = jax.tree.map(jnp.ones_like, params)
    opt = multi_steps(optax.sgd(0.1), lambda step: 0)
    with pytest.raises(ValueError, match=r"every_k_schedule returned k=0 at gradient_step=0"):
        opt.update(ones, opt.init(params), params)
    opt = multi_steps(optax.sgd(0.1), lambda step: jnp.where(step < 1, 1, 0))
    step = jax.jit(opt.update)
    _, s = step(ones, opt.init(params), params)
    assert bool(s.emitted)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"returned k=0 at gradient_step=1"):
        jax.block_until_ready(step(ones, s, params))
    bad_type = multi_steps(optax.sgd(0.1), lambda step: 2.0 * jnp.ones(()))
    with pytest.raises(TypeError, match=r"must return an integer scalar.*float32"):
        bad_type.update(ones, bad_type.init(params), params)
    # Without runtime checks nothing is staged and k < 1 acts as k = 1.
    quiet = multi_steps(optax.sgd(0.1), lambda step: jnp.int32(0) * step, runtime_checks=False)
    _, s = jax.jit(quiet.update)(ones, quiet.init(params), params)
    assert bool(s.emitted)


@pytest.mark.parametrize("w", [-1.0, float("nan"), float("inf")])
def test_bad_weights(params, w):
    opt = multi_steps(optax.sgd(0.1), 2)
    ones, s = jax.tree.map(jnp.ones_like, params), opt.init(params)
    with pytest.raises(ValueError, match=r"weight must be finite and >= 0.*weight=" + str(w)):
        opt.update(ones, s, params, weight=w)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"weight must be finite and >= 0"):
        jax.block_until_ready(jax.jit(opt.update)(ones, s, params, weight=jnp.float32(w)))


def test_non_scalar_weight(params):
    opt = multi_steps(optax.sgd(0.1), 2)
    ones, s = jax.tree.map(jnp.ones_like, params), opt.init(params)
    with pytest.raises(ValueError, match=r"one real scalar per call.*shape \(2,\)"):
        opt.update(ones, s, params, weight=jnp.ones(2))


def test_mismatched_optimizer_state(params):
    ones = jax.tree.map(jnp.ones_like, params)
    opt = multi_steps(optax.adamw(1e-2), 2)
    optax_state = optax.MultiSteps(optax.adamw(1e-2), 2).init(params)
    with pytest.raises(TypeError, match=r"optax.MultiStepsState"):
        opt.update(ones, optax_state, params)
    with pytest.raises(TypeError, match=r"got dict"):
        opt.update(ones, {"mini_step": 0}, params)
    sgd_state = multi_steps(optax.sgd(0.1, momentum=0.9), 2).init(params)
    with pytest.raises(ValueError, match=r"state.inner_opt_state was made for another optimizer"):
        opt.update(ones, sgd_state, params)
    with pytest.raises(ValueError, match=r"state.inner_opt_state was made for another optimizer"):
        flush(optax.adamw(1e-2), sgd_state, params)
    wider = opt.init(init_params(width=16))
    with pytest.raises(ValueError, match=r"of other shapes.*Dense_0.*kernel.*\(64, 16\)"):
        opt.update(ones, wider, params)
    other_tree = opt.init({"w": jnp.zeros(3)})
    with pytest.raises(
        ValueError,
        match=r"state.acc_grads was made for another optimizer or other params: it has the",
    ):
        opt.update(ones, other_tree, params)


# Compilation.
def test_no_retrace_over_many_calls(params, batch):
    k_schedule = lambda step: jnp.where(step < 2, 2, 3)  # noqa: E731
    opt = multi_steps(optax.adamw(1e-2), k_schedule)
    b = _window(batch, 0) | {"mask": _uneven_mask(4)}

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, s, mb):
        grads = jax.grad(masked_mean_loss)(p, mb)
        updates, s = opt.update(grads, s, p, weight=mb["mask"].sum())
        return optax.apply_updates(p, updates), s

    p, s = params, opt.init(params)
    for i in range(16):
        p, s = step(p, s, strided_micro(b, i % 4, 4))
    assert int(s.gradient_step) == 2 + (16 - 4) // 3


def test_named_scope_in_program(params):
    opt = multi_steps(optax.adamw(1e-2), 2)
    ones = jax.tree.map(jnp.ones_like, params)
    text = jax.jit(opt.update).lower(ones, opt.init(params), params).as_text(debug_info=True)
    assert "jaxaccum.multi_steps" in text
