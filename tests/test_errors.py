"""Bad input raises a clear error at trace time, naming the argument, leaf and fix."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccum


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
