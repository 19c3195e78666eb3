"""Bad input raises a clear error at trace time, naming the argument, leaf and fix."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxaccum
from jaxaccum import optax_compat


def loss(params, batch):
    return jnp.mean(batch["x"] @ params)


GRAD = jax.value_and_grad(loss)
W = jnp.ones(3)


def batch_of(n: int) -> dict[str, jax.Array]:
    return {"x": jnp.ones((n, 3))}


@pytest.mark.parametrize("k", [0, -2, 2.0, True, "4", None])
def test_k_must_be_positive_int(k):
    with pytest.raises(ValueError, match=r"k must be a positive int .*got " + re.escape(repr(k))):
        jaxaccum.accumulate(GRAD, k)


def test_numpy_int_k_is_accepted():
    out = jaxaccum.accumulate(GRAD, np.int64(2))(W, batch_of(4))
    np.testing.assert_allclose(out[0], GRAD(W, batch_of(4))[0])


def test_not_divisible_lists_the_ks_that_work_and_padding():
    msg = (
        r"batch size 10 at leaf batch\['x'\] is not divisible by k=4; "
        r"choose k from \[1, 2, 5, 10\].*jaxaccum.pad_batch.*weight_fn"
    )
    with pytest.raises(ValueError, match=msg):
        jax.jit(jaxaccum.accumulate(GRAD, 4))(W, batch_of(10))


def test_k_larger_than_batch():
    with pytest.raises(ValueError, match=r"k=8 is larger than the batch size 4 at batch\['x'\]"):
        jaxaccum.accumulate(GRAD, 8)(W, batch_of(4))


def test_leaves_with_different_leading_sizes_are_listed():
    bad = {"x": jnp.ones((8, 3)), "y": jnp.ones(6), "z": jnp.ones((8,))}
    msg = r"disagree .*batch\['x'\]: 8, batch\['y'\]: 6, batch\['z'\]: 8"
    with pytest.raises(ValueError, match=msg):
        jaxaccum.accumulate(GRAD, 2)(W, bad)


def test_scalar_leaf_has_no_leading_axis():
    with pytest.raises(ValueError, match=r"leaf batch\['t'\] .* scalar with no leading example"):
        jaxaccum.accumulate(GRAD, 2)(W, {"x": jnp.ones((4, 3)), "t": jnp.float32(1.0)})


def test_empty_batch():
    with pytest.raises(ValueError, match=r"no array leaves \(batch is an empty pytree\)"):
        jaxaccum.accumulate(lambda params, batch: 0.0, 2)(W, {})
    with pytest.raises(ValueError, match=r"empty: its leading axis has size 0 at batch\['x'\]"):
        jaxaccum.accumulate(GRAD, 2)(W, batch_of(0))


def test_non_array_leaf():
    with pytest.raises(TypeError, match=r"leaf batch\['name'\] .* is a str, not an array"):
        jaxaccum.accumulate(GRAD, 2)(W, {"x": jnp.ones((4, 3)), "name": "digits"})


def test_weight_fn_must_return_a_scalar():
    acc = jaxaccum.accumulate(GRAD, 2, weight_fn=lambda mb: mb["x"].sum(axis=0))
    with pytest.raises(ValueError, match=r"weight_fn must return one real scalar .*shape \(3,\)"):
        acc(W, batch_of(4))


def test_carry_changing_structure():
    def step(state, batch):
        return batch["x"].sum(), {"count": state["count"] + 1, "extra": 0.0}

    acc = jaxaccum.accumulate(step, 2, carry_argnums=0)
    with pytest.raises(
        ValueError, match=r"(?s)different structure .*received: .*count.*returned: .*extra"
    ):
        acc({"count": jnp.int32(0)}, batch_of(4))


def test_carry_changing_dtype_names_the_leaf():
    def step(state, batch):
        return batch["x"].sum(), {"count": state["count"] + 0.5}

    acc = jaxaccum.accumulate(step, 2, carry_argnums=0)
    msg = r"state\['count'\]: \(\) int32 -> \(\) float32.*astype"
    with pytest.raises(ValueError, match=msg):
        jax.jit(acc)({"count": jnp.int32(0)}, batch_of(4))


def test_carry_step_must_return_a_pair():
    acc = jaxaccum.accumulate(lambda s, b: b["x"].sum(), 2, carry_argnums=0)
    with pytest.raises(ValueError, match=r"must return \(outputs, new_state\)"):
        acc(jnp.zeros(()), batch_of(4))


@pytest.mark.parametrize(
    "key", [jnp.float32(1.0), jnp.zeros((2, 2), jnp.uint32), jax.random.split(jax.random.key(0))]
)
def test_rng_argument_must_be_one_prng_key(key):
    acc = jaxaccum.accumulate(lambda key, b: b["x"].sum(), 2, rng_argnums=0)
    with pytest.raises(TypeError, match=r"the rng argument key must be one PRNG key"):
        acc(key, batch_of(4))


def test_missing_batch_argument():
    with pytest.raises(TypeError, match=r"batch argument batch was not passed"):
        jaxaccum.accumulate(GRAD, 2)(W)


def test_one_argument_two_roles():
    with pytest.raises(ValueError, match=r"batch is marked both as batch and as carry"):
        jaxaccum.accumulate(GRAD, 2, carry_argnames="batch")


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"split": "random"}, r"split='random' is not one of \('strided', 'contiguous'"),
        ({"unroll": 0}, r"unroll must be a positive int or a bool"),
        ({"accum_dtype": jnp.int32}, r"accum_dtype must be a floating dtype"),
        ({"reduce": "average"}, r"unknown reduction 'average'.*'weighted_mean'"),
        ({"batch_argnums": -1}, r"batch_argnums must hold non-negative ints"),
        ({"batch_argnums": (), "batch_argnames": ()}, r"no batch argument"),
    ],
)
def test_bad_options(kwargs, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        jaxaccum.accumulate(GRAD, 2, **kwargs)


def test_weight_fn_must_be_callable():
    with pytest.raises(TypeError, match=r"weight_fn must be callable"):
        jaxaccum.accumulate(GRAD, 2, weight_fn=3)


def test_reduce_spec_must_fit_the_outputs():
    acc = jaxaccum.accumulate(GRAD, 2, reduce={"loss": "sum"})
    with pytest.raises(ValueError, match=r"reduce= must be a prefix of step_fn's output tree"):
        acc(W, batch_of(4))


def test_mean_of_integer_output_suggests_sum():
    acc = jaxaccum.accumulate(lambda p, b: jnp.int32(1), 2, reduce="mean")
    with pytest.raises(TypeError, match=r"needs a floating output, .*int32; use Reduce.SUM"):
        acc(W, batch_of(4))


def test_weighted_mean_needs_weight_fn():
    acc = jaxaccum.accumulate(GRAD, 2, reduce=jaxaccum.Reduce.WEIGHTED_MEAN)
    with pytest.raises(ValueError, match=r"WEIGHTED_MEAN at output leaf output\[0\] needs weights"):
        acc(W, batch_of(4))


def test_pad_batch_rejects_bad_multiple():
    with pytest.raises(ValueError, match=r"multiple must be a positive int, got 0"):
        jaxaccum.pad_batch(batch_of(4), 0)


# Inputs that were accepted with a wrong result: each is now right, or refused by name.
def test_a_constant_output_comes_back_once_whatever_its_type():
    x = jnp.arange(8.0)
    for constant in (7, 7.0, True, np.int32(7)):
        out = jaxaccum.accumulate(lambda b, c=constant: c, 4, batch_argnums=0)(x)
        assert out == constant and jnp.asarray(out).dtype == jnp.asarray(constant).dtype
    # reduce= named explicitly still does what it says
    assert int(jaxaccum.accumulate(lambda b: 7, 4, batch_argnums=0, reduce="sum")(x)) == 28
    # an output computed from the micro-batch is reduced as before
    assert int(jaxaccum.accumulate(lambda b: jnp.sum(b >= 0), 4, batch_argnums=0)(x)) == 8


def test_complex_params_train_as_optax_trains_them():
    w, b = jnp.array([1 + 2j]), jnp.ones((4, 1))

    def complex_loss(w, b):
        return jnp.mean(jnp.abs(b @ w) ** 2)

    step = jaxaccum.train_step(complex_loss, optax.sgd(0.1), 2)
    state, metrics = step.update(step.init(w), b)
    grads = jax.grad(complex_loss)(w, b)
    updates, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(w))
    np.testing.assert_allclose(state.params, optax.apply_updates(w, updates), rtol=1e-6)
    np.testing.assert_allclose(metrics.grad_norm, optax.tree.norm(grads), rtol=1e-6)
    assert complex(state.params[0]).imag != 2.0  # the imaginary part of the gradient applied


def test_from_optax_keeps_its_own_state_and_refuses_others():
    opt = jaxaccum.multi_steps(optax.sgd(1.0), 4)
    state = opt.init(jnp.zeros(2))
    for _ in range(3):
        _, state = opt.update(jnp.ones(2), state)
    assert jaxaccum.MultiStepsState.from_optax(state) is state
    assert state.acc_grads.tolist() == [3.0, 3.0]
    with pytest.raises(TypeError, match=r"from_optax\(state\) needs the optax.MultiStepsState"):
        jaxaccum.MultiStepsState.from_optax(None)


@pytest.mark.parametrize("weight", [lambda mb: 1j * jax.tree.leaves(mb)[0].sum(), lambda mb: "3"])
def test_weights_must_be_real_numbers(weight):
    with pytest.raises(TypeError, match=r"weight_fn must return one real scalar"):
        jaxaccum.accumulate(lambda mb: mb.sum(), 2, batch_argnums=0, weight_fn=weight)(
            jnp.arange(4.0)
        )
    step = jaxaccum.train_step(loss, optax.sgd(0.1), 2, weight_fn=weight)
    with pytest.raises(TypeError, match=r"weight_fn must return one real scalar"):
        step.update(step.init(W), batch_of(4))


def test_multi_steps_refuses_params_of_other_shapes_than_its_state():
    opt = jaxaccum.multi_steps(optax.sgd(1.0), 2)
    state = opt.init(jnp.zeros(2))
    with pytest.raises(ValueError, match=r"state.acc_grads .* the params.*\(5,\)"):
        opt.update(jnp.ones(2), state, jnp.zeros(5))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_weight_shows_as_nan_and_a_train_step_skips(bad):
    x = jnp.arange(4.0)

    def weight(mb):
        return jnp.where(mb[0] == 0, bad, 1.0)

    out = jaxaccum.accumulate(lambda mb: mb.mean(), 2, batch_argnums=0, weight_fn=weight)(x)
    assert np.isnan(float(out))  # never the other micro-batch's mean alone

    def rows(mb):  # every micro-batch of batch_of(4) gets the bad weight
        return weight(mb["x"][:, 0] - 1)

    step = jaxaccum.train_step(loss, optax.sgd(0.1), 2, weight_fn=rows)
    state, metrics = step.update(step.init(W), batch_of(4))
    assert not bool(metrics.applied) and int(state.skipped) == 1
    dropping = jaxaccum.train_step(loss, optax.sgd(0.1), 2, weight_fn=rows, nonfinite="drop")
    assert float(dropping.update(dropping.init(W), batch_of(4))[1].weight) == 0.0


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: jaxaccum.train_step(
                loss, optax.sgd(0.1), 2, loss_scale=jaxaccum.DynamicLossScale(growth_interval=2.5)
            ),
            r"DynamicLossScale.growth_interval must be a positive int, got 2.5",
        ),
        (
            lambda: jaxaccum.multi_steps(optax.sgd(0.1), 2, runtime_checks="no"),
            r"runtime_checks must be a bool \(True or False\), got 'no'",
        ),
        (
            lambda: jaxaccum.inspect.scale_learning_rate(-0.1, 256, 1024, "linear"),
            r"learning_rate must be a finite number > 0, got -0.1",
        ),
    ]
    + [
        (
            lambda size=size: optax_compat.microbatch(lambda x: x, 0, microbatch_size=size),
            rf"microbatch_size must be a positive int, got {re.escape(repr(size))}",
        )
        for size in (True, 0, -1, "4", np.float64(4.0))
    ],
)
def test_numbers_of_the_wrong_kind_are_refused_by_name(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build()
