"""Everything optax.microbatch and optax.MultiSteps do, in jaxaccum's own transforms.

References are independent: the step on the whole batch (or on the examples of the
micro-batches that ran), hand-written Python loops, and optax itself. Tolerances: the
float32 round-off of summing in another order, ``helpers.RTOL``/``ATOL``, unless a case
says exact.
"""

from __future__ import annotations

import functools

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
from jaxaccum import Reduce

K = 4
ALL_REDUCE = [r for r in Reduce if r is not Reduce.WEIGHTED_MEAN]


def _rows(batch, take):
    return jax.tree.map(lambda x: x[take], batch)


def _first_examples(batch, m, k):
    """The examples of the first m strided micro-batches, in micro-batch order."""
    n = batch["x"].shape[0] // k
    order = np.concatenate([np.arange(j, n * k, k) for j in range(m)])
    return _rows(batch, order)


def _per_example_step(params, batch):
    """Outputs of every kind: mean, count, flag, extreme, per-example rows."""
    logits = batch["x"] @ params
    loss = jnp.mean(logits**2)
    return {
        "mean": loss,
        "count": jnp.sum(batch["y"] > 4),
        "flag": jnp.any(batch["y"] == 9),
        "max": jnp.max(logits),
        "rows": logits,
    }


# --- Early stop: only the first m of k micro-batches run, m traced or batched ----------


def _reference(params, batch, m, k, reduce):
    """Each reduction over the first m micro-batches, by a Python loop."""
    outs = [_per_example_step(params, strided_micro(batch, j, k)) for j in range(m)]
    zero = jax.tree.map(jnp.zeros_like, _per_example_step(params, strided_micro(batch, 0, k)))

    def red(name):
        vals = [o[name] for o in outs]
        if reduce is Reduce.MEAN:
            return sum(vals) / m if m else jnp.zeros_like(zero[name])
        if reduce is Reduce.SUM:
            if vals and vals[0].dtype == jnp.bool_:
                return functools.reduce(jnp.logical_or, vals, jnp.zeros_like(zero[name]))
            return sum(vals, jnp.zeros_like(zero[name]))
        if reduce in (Reduce.MAX, Reduce.MIN):
            op = jnp.maximum if reduce is Reduce.MAX else jnp.minimum
            return functools.reduce(op, vals) if vals else jnp.zeros_like(zero[name])
        if reduce is Reduce.LAST:
            return vals[-1] if vals else zero[name]
        stacked = jnp.stack(vals + [zero[name]] * (k - m))
        if reduce is Reduce.STACK:
            return stacked
        return jnp.swapaxes(stacked, 0, 1).reshape(-1, *stacked.shape[2:])  # CONCAT

    return red


@pytest.mark.parametrize("reduce", ALL_REDUCE, ids=lambda r: r.name)
def test_early_stop_traced_count_every_reduction(reduce):
    batch = digits_batch(32)
    params = jax.random.normal(jax.random.key(0), (64,)) * 0.1
    names = {
        Reduce.MEAN: ["mean", "max"],
        Reduce.SUM: ["count", "flag", "mean"],
        Reduce.MAX: ["count", "flag", "max"],
        Reduce.MIN: ["count", "max"],
        Reduce.LAST: ["mean", "rows"],
        Reduce.STACK: ["mean", "rows"],
        Reduce.CONCAT: ["rows"],
    }[reduce]

    def step(params, batch):
        return {n: _per_example_step(params, batch)[n] for n in names}

    @jax.jit
    def run(params, batch, m):
        f = jaxaccum.accumulate(step, K, reduce=reduce, num_real_microbatches=m)
        return f(params, batch)

    for m in [K, 2, 1, 0]:
        got = run(params, batch, jnp.int32(m))
        red = _reference(params, batch, m, K, reduce)
        for n in names:
            assert got[n].dtype == step(params, strided_micro(batch, 0, K))[n].dtype
            assert_trees_close(got[n], red(n))
    assert run._cache_size() == 1  # one compilation for every count


def test_early_stop_mean_equals_step_on_the_examples_that_ran():
    params, batch = init_params(), digits_batch(64)
    grad = jax.value_and_grad(mean_loss)
    f = jax.jit(lambda p, b, m: jaxaccum.accumulate(grad, 8, num_real_microbatches=m)(p, b))
    assert_trees_close(f(params, batch, 3), grad(params, _first_examples(batch, 3, 8)))
    # Weighted: the token mean over the micro-batches that ran.
    mask = (jnp.arange(64) % 3 != 0).astype(jnp.float32)
    wb = batch | {"mask": mask}
    w = jaxaccum.accumulate(
        jax.value_and_grad(masked_mean_loss),
        8,
        weight_fn=lambda mb: mb["mask"].sum(),
        num_real_microbatches=5,
    )
    assert_trees_close(
        w(params, wb), jax.value_and_grad(masked_mean_loss)(params, _first_examples(wb, 5, 8))
    )


def test_early_stop_with_a_concrete_count_is_a_shorter_scan():
    """A Python int m: a scan of length m (differentiable, unrolled as asked), not a while
    loop; m = 0 runs nothing."""
    batch = digits_batch(32)
    w = jax.random.normal(jax.random.key(3), (64,)) * 0.1

    def loss(w, b):
        return jnp.mean((b["x"] @ w) ** 2)

    f = jaxaccum.accumulate(loss, K, num_real_microbatches=2, unroll=2)
    prims = [e.primitive.name for e in jax.make_jaxpr(f)(w, batch).jaxpr.eqns]
    assert "scan" in prims and "while" not in prims
    assert_trees_close(f(w, batch), loss(w, _first_examples(batch, 2, K)))
    # Differentiable through the loop (a while loop is not), as optax's fori_loop is.
    assert_trees_close(jax.grad(f)(w, batch), jax.grad(loss)(w, _first_examples(batch, 2, K)))
    none = jaxaccum.accumulate(loss, K, num_real_microbatches=0)
    assert float(none(w, batch)) == 0.0


@pytest.mark.parametrize("reduce", ALL_REDUCE, ids=lambda r: r.name)
def test_early_stop_under_vmap_with_batched_counts(reduce):
    batch = digits_batch(32)
    params = jax.random.normal(jax.random.key(1), (64,)) * 0.1
    name = {Reduce.SUM: "count", Reduce.CONCAT: "rows"}.get(reduce, "max")

    def run(m):
        step = lambda p, b: _per_example_step(p, b)[name]  # noqa: E731
        return jaxaccum.accumulate(step, K, reduce=reduce, num_real_microbatches=m)(params, batch)

    ms = jnp.array([4, 1, 3, 0])
    got = jax.vmap(run)(ms)
    for i, m in enumerate(ms.tolist()):
        assert_trees_close(got[i], _reference(params, batch, m, K, reduce)(name))


def test_early_stop_bad_counts():
    step = lambda p, b: b.sum()  # noqa: E731
    for bad in (-1, K + 1, 1.5, "2"):
        with pytest.raises(
            ValueError, match=r"num_real_microbatches must be an integer in \[0, k=4\]"
        ):
            jaxaccum.accumulate(step, K, num_real_microbatches=bad)

    @jax.jit
    def traced(m):
        return jaxaccum.accumulate(step, K, num_real_microbatches=m)(0.0, jnp.ones(8))

    with pytest.raises(TypeError, match="num_real_microbatches must be an integer scalar"):
        traced(jnp.float32(2))


# --- A batch axis other than the leading one, without copying the batch ------------------


def _time_major_loss(w, batch):
    """A loss over (T, N, F) sequences, examples on axis 1."""
    return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)


@pytest.mark.parametrize("split", ["strided", "contiguous"])
def test_in_axes_matches_the_leading_axis_batch(split):
    key = jax.random.key(2)
    x = jax.random.normal(key, (5, 16, 3))  # (time, examples, features)
    y = jax.random.normal(jax.random.fold_in(key, 1), (5, 16))
    w = jnp.ones(3)
    grad = jax.value_and_grad(_time_major_loss)
    f = jaxaccum.accumulate(grad, K, in_axes=1, split=split)
    assert_trees_close(f(w, {"x": x, "y": y}), grad(w, {"x": x, "y": y}))
    # The same examples per micro-batch as the leading-axis split of the transposed batch.
    ids = jaxaccum.accumulate(lambda i: i, K, batch_argnums=0, reduce="stack", split=split)
    ids_t = jaxaccum.accumulate(
        lambda i: i[0], K, batch_argnums=0, reduce="stack", split=split, in_axes=1
    )
    n = jnp.arange(16)
    assert trees_equal(ids(n), ids_t(jnp.stack([n, n])))


def test_in_axes_per_argument_and_no_copy_of_the_batch():
    a = jnp.arange(2 * 12 * 3, dtype=jnp.float32).reshape(2, 12, 3)  # examples on axis 1
    b = jnp.arange(12 * 3, dtype=jnp.float32).reshape(12, 3)  # examples on axis 0

    def step(a, b):
        return jnp.sum(a * b[None]), a[0]

    f = jaxaccum.accumulate(
        step, 3, batch_argnums=(0, 1), in_axes=(1, 0), reduce=(Reduce.SUM, Reduce.CONCAT)
    )
    total, rows = f(a, b)
    assert_trees_close(total, jnp.sum(a * b[None]))
    assert trees_equal(rows, a[0])  # CONCAT: the examples back in their original order
    # The batch is only reshaped (a free view) and sliced per micro-batch, never transposed.
    g = jaxaccum.accumulate(lambda a, b: step(a, b)[0], 3, batch_argnums=(0, 1), in_axes=(1, 0))
    prims = {e.primitive.name for e in jax.make_jaxpr(g)(a, b).jaxpr.eqns}
    assert "transpose" not in prims and "copy" not in prims and "copy_p" not in prims
    with pytest.raises(ValueError, match="in_axes must be a non-negative int"):
        jaxaccum.accumulate(step, 3, batch_argnums=(0, 1), in_axes=(1, 0, 0))
    with pytest.raises(ValueError, match=r"no axis 2 for in_axes"):
        jaxaccum.accumulate(step, 3, batch_argnums=(0, 1), in_axes=2)(a, b)


# --- Reductions: a public protocol, bool sums, stacked outputs in example order -----------


def test_user_reduction_protocol_matches_a_python_loop():
    top = jaxaccum.Reduction(  # the largest per-micro-batch loss and the index that had it
        init=lambda info: (jnp.full(info.out.shape, -jnp.inf, info.out.dtype), jnp.int32(-1)),
        update=lambda c, x, index, weight: jax.lax.cond(x > c[0], lambda: (x, index), lambda: c),
        finalize=lambda c, info, count, weight_sum: jnp.stack([c[0], c[1].astype(c[0].dtype)]),
        aggregate=lambda v: v[jnp.argmax(v[:, 0])],
        name="argmax",
    )
    params, batch = init_params(), digits_batch(64)
    got = jaxaccum.accumulate(mean_loss, 8, reduce=top)(params, batch)
    losses = [float(mean_loss(params, strided_micro(batch, j, 8))) for j in range(8)]
    assert got.tolist() == pytest.approx([max(losses), losses.index(max(losses))], rel=1e-6)


def test_builtins_are_written_in_the_protocol():
    for r in Reduce:
        built = jaxaccum.Reduction.builtin(r)
        assert isinstance(built, jaxaccum.Reduction)
        # The same reduction passed as a record gives what the enum gives.
        step = lambda b: {"f": b.astype(jnp.float32), "i": b}  # noqa: E731
        x = jnp.arange(12)
        spec = {"f": r, "i": r if r not in (Reduce.MEAN, Reduce.WEIGHTED_MEAN) else "sum"}
        if r is Reduce.WEIGHTED_MEAN:
            kw = {"weight_fn": lambda b: b.sum().astype(jnp.float32)}
        else:
            kw = {}
        by_enum = jaxaccum.accumulate(step, 3, batch_argnums=0, reduce=spec, **kw)(x)
        as_record = jax.tree.map(
            jaxaccum.Reduction.builtin, spec, is_leaf=lambda s: isinstance(s, (Reduce, str))
        )
        by_record = jaxaccum.accumulate(step, 3, batch_argnums=0, reduce=as_record, **kw)(x)
        assert trees_equal(by_enum, by_record)


def test_user_reduction_whose_carry_changes_type_is_named():
    drifting = jaxaccum.Reduction(
        init=lambda info: jnp.zeros(info.out.shape, jnp.int32),
        update=lambda acc, x, index, weight: acc + x,  # int32 + float32 -> float32
        finalize=lambda acc, info, count, weight_sum: acc,
        name="drifting",
    )
    step = lambda b: {"loss": b.sum()}  # noqa: E731
    with pytest.raises(TypeError, match=r"reduction drifting at output\['loss'\]: update"):
        jaxaccum.accumulate(step, 2, batch_argnums=0, reduce=drifting)(jnp.ones(4))


def test_bool_sum_is_logical_or_and_integer_mean_is_rejected():
    flags = jnp.array([False, False, True, False, False, False])
    f = jaxaccum.accumulate(lambda b: b, 3, batch_argnums=0, reduce="sum")
    assert f(flags).tolist() == [True, False]  # micro-batches [F, F], [F, F], [T, F]
    with pytest.raises(TypeError, match=r"Reduce.MEAN needs a floating output.*output"):
        jaxaccum.accumulate(lambda b: b, 3, batch_argnums=0, reduce="mean")(jnp.arange(6))


@pytest.mark.parametrize("split", ["strided", "contiguous", "presplit"])
def test_concat_gives_the_original_example_order(split):
    x = jnp.arange(24).reshape(12, 2)
    batch = x.reshape(3, 4, 2) if split == "presplit" else x
    f = jaxaccum.accumulate(lambda b: b * 10, 3, batch_argnums=0, reduce="concat", split=split)
    assert trees_equal(f(batch), x * 10)
    with pytest.raises(
        ValueError, match=r"Reduce.CONCAT needs outputs with a leading example axis"
    ):
        jaxaccum.accumulate(lambda b: b.sum(), 3, batch_argnums=0, reduce="concat")(x)


# --- MultiSteps: skip predicates, window sums, None dtype, optax checkpoints, flush -------


def _grads(n, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return [{"w": jax.random.normal(k, (3,)), "b": jax.random.normal(k, ())} for k in keys]


def _run(opt, grads, params):
    state, out = opt.init(params), []
    update = jax.jit(opt.update)
    for g in grads:
        u, state = update(g, state, params)
        out.append(u)
    return out, state


@pytest.mark.parametrize(
    "skip",
    [optax.skip_not_finite, functools.partial(optax.skip_large_updates, max_squared_norm=4.0)],
    ids=["skip_not_finite", "skip_large_updates"],
)
def test_skip_predicates_as_optax(skip):
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    grads = _grads(9)
    grads[2] = jax.tree.map(lambda g: g * jnp.nan, grads[2])
    grads[5] = jax.tree.map(lambda g: g * 100.0, grads[5])
    theirs, ts = _run(
        optax.MultiSteps(optax.adam(0.1), 3, should_skip_update_fn=skip), grads, params
    )
    ours, os_ = _run(
        jaxaccum.multi_steps(optax.adam(0.1), 3, should_skip_update_fn=skip), grads, params
    )
    assert_trees_close(ours, theirs)
    assert trees_equal(os_.skip_state, ts.skip_state)
    assert int(os_.mini_step) == int(ts.mini_step) and int(os_.gradient_step) == int(
        ts.gradient_step
    )
    with pytest.raises(TypeError, match="should_skip_update_fn must return"):
        bad = jaxaccum.multi_steps(optax.sgd(1.0), 2, should_skip_update_fn=lambda g, s, p: (1, ()))
        bad.update(grads[0], bad.init(params), params)


def test_window_sum_as_optax_use_grad_mean_false():
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    grads = _grads(8, seed=3)
    theirs, _ = _run(optax.MultiSteps(optax.sgd(1.0), 4, use_grad_mean=False), grads, params)
    ours, _ = _run(jaxaccum.multi_steps(optax.sgd(1.0), 4, use_grad_mean=False), grads, params)
    assert_trees_close(ours, theirs)
    summed = jax.tree.map(lambda *g: -sum(g), *grads[:4])
    assert_trees_close(ours[3], summed)


def test_none_dtype_means_the_params_dtype():
    params = {"w": jnp.zeros(3, jnp.bfloat16), "b": jnp.zeros((), jnp.float32)}
    state = jaxaccum.multi_steps(optax.sgd(1.0), 2, accum_dtype=None).init(params)
    assert jax.tree.map(lambda a: a.dtype, state.acc_grads) == {"w": jnp.bfloat16, "b": jnp.float32}
    theirs = optax.MultiSteps(optax.sgd(1.0), 2, accumulator_dtype=None).init(params)
    assert jax.tree.map(lambda a: a.dtype, theirs.acc_grads) == {
        "w": jnp.bfloat16,
        "b": jnp.float32,
    }
    # In-step accumulation: None sums each leaf in its own dtype.
    x = jnp.full((4,), 1.001, jnp.bfloat16)
    for dtype, want in ((None, jnp.bfloat16), (jnp.float32, jnp.float32)):
        f = jaxaccum.accumulate(
            lambda b: b.sum(), 4, batch_argnums=0, reduce="sum", accum_dtype=dtype
        )
        assert f(x).dtype == jnp.bfloat16
        assert jax.make_jaxpr(f)(x).jaxpr.eqns[-1].outvars[0].aval.dtype == jnp.bfloat16
        scan = next(e for e in jax.make_jaxpr(f)(x).jaxpr.eqns if e.primitive.name == "scan")
        assert any(v.aval.dtype == want for v in scan.outvars)


def test_resume_from_an_optax_checkpoint_with_orbax(tmp_path):
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    grads = _grads(10, seed=5)
    inner = optax.adamw(0.05)
    theirs = optax.MultiSteps(inner, 4)
    state = theirs.init(params)
    for g in grads[:6]:  # one whole window and half of the next
        _, state = theirs.update(g, state, params)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ckpt", jax.eval_shape(lambda: theirs.init(params)))
    ours = jaxaccum.multi_steps(inner, 4)
    s = jaxaccum.MultiStepsState.from_optax(restored)
    for g in grads[6:]:
        got, s = ours.update(g, s, params)
        want, state = theirs.update(g, state, params)
        assert_trees_close(got, want)
    assert int(s.gradient_step) == 2 and int(s.mini_step) == 2  # a window closed at call 8
    with pytest.raises(TypeError, match=r"MultiStepsState.from_optax\(state\)"):
        ours.update(grads[0], state, params)


def test_flush_accepts_the_wrapper():
    params = jnp.zeros(2)
    for mean, want in ((True, [-2.0, -1.0]), (False, [-4.0, -2.0])):
        opt = jaxaccum.multi_steps(optax.sgd(1.0), 4, use_grad_mean=mean)
        state = opt.init(params)
        for g in ([1.0, 2.0], [3.0, 0.0]):
            _, state = opt.update(jnp.array(g), state, params)
        for flushed in (jaxaccum.flush(opt, state, params), opt.flush(state, params)):
            updates, new = flushed
            assert updates.tolist() == want and bool(new.emitted)
        assert opt.inner is not None and opt.use_grad_mean is mean


# --- Edges that crashed ---------------------------------------------------------------


def test_constant_outputs():
    def step(w, b):
        return {
            "loss": jnp.mean(b * w),
            "lr": 0.1,
            "n": b.shape[0],
            "zero": jnp.array(0.0),
            "ok": True,
        }

    got = jax.jit(jaxaccum.accumulate(step, 4))(2.0, jnp.arange(8.0))
    assert float(got["loss"]) == pytest.approx(7.0)
    # constants come back once, as the step returned them (the micro-batch's own size);
    # reduce="sum" on that leaf would add them up over the micro-batches
    assert float(got["lr"]) == pytest.approx(0.1) and int(got["n"]) == 2
    assert float(got["zero"]) == 0.0 and bool(got["ok"]) is True


def test_x64_weights_sum_in_float64():
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(64,)) * 1e3, jnp.float64)
        w = jnp.asarray(np.random.default_rng(1).integers(1, 1000, size=(64,)), jnp.float64) + 0.1

        def step(b):
            return jnp.sum(b["x"] * b["w"]) / jnp.sum(b["w"])

        f = jaxaccum.accumulate(step, 8, batch_argnums=0, weight_fn=lambda b: b["w"].sum())
        got = f({"x": x, "w": w})
        want = jnp.sum(x * w) / jnp.sum(w)
        assert got.dtype == jnp.float64
        assert abs(float(got) - float(want)) <= 1e-12 * abs(float(want))


def test_float16_sums_with_large_weights_do_not_overflow():
    """accum_dtype=None keeps float16 sums; the float32 weights are not cast down first."""
    x = jnp.full((4,), 1.0, jnp.float16)
    m = jnp.full((4,), 40000.0, jnp.float32)  # each micro-batch weighs 80000 > float16 max

    def step(b):
        return b["x"].mean() / 1e3  # w * out = 80 per micro-batch: fits float16

    f = jaxaccum.accumulate(
        step, 2, batch_argnums=0, accum_dtype=None, weight_fn=lambda b: b["m"].sum()
    )
    got = f({"x": x, "m": m})
    assert got.dtype == jnp.float16 and float(got) == pytest.approx(1e-3, rel=1e-3)
    params = jnp.zeros(2, jnp.float16)
    opt = jaxaccum.multi_steps(optax.sgd(1.0), 2, accum_dtype=None)
    state = opt.init(params)
    for _ in range(2):
        updates, state = opt.update(jnp.full(2, 1e-3, jnp.float16), state, params, weight=40000.0)
    assert bool(jnp.isfinite(updates).all()) and float(updates[0]) == pytest.approx(-1e-3, rel=1e-3)


def test_bad_outputs_and_keys_are_named():
    with pytest.raises(TypeError, match=r"returned a str at output\['name'\]"):
        jaxaccum.accumulate(lambda w, b: {"name": "x", "v": b.sum()}, 2)(1.0, jnp.ones(4))

    def int_grad(p, b):
        return jax.grad(lambda p: jnp.sum(p["f"] * b) + 0 * p["i"], allow_int=True)(p)

    with pytest.raises(TypeError, match=r"output\['i'\] has dtype float0"):
        jaxaccum.accumulate(int_grad, 2)({"f": 1.0, "i": 3}, jnp.ones(4))
    noisy = lambda key, b: jax.random.uniform(key) * b.sum()  # noqa: E731
    bad_key = jnp.zeros((3,), jnp.uint32)
    with pytest.raises(
        TypeError, match=r"the rng argument key \(rng_argnums=0\) is a uint32 array of shape \(3,\)"
    ):
        jaxaccum.accumulate(noisy, 2, rng_argnums=0)(bad_key, jnp.ones(4))
