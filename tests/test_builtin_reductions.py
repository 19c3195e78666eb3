"""``_builtin_reductions``: every built-in reduction's record against a numpy loop.

The records (``_reduce.BUILTIN``, made of this module's functions) are driven here by hand,
one micro-batch at a time, the way the micro-batch loop drives them, through the public
protocol; references are numpy loops in float64 (float32 round-off: ``RTOL``/``ATOL`` from
``helpers``). Where the record performs exactly the reference's operations in the
reference's order (bool or, integer sums, max/min, copies, casts of one float32 quotient)
results must be equal.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ATOL, RTOL

from jaxaccum import _builtin_reductions
from jaxaccum._reduce import BUILTIN, LeafInfo, Reduce, Reduction

RNG = np.random.default_rng(0)


def leaf_info(out: Any, k: int, *, accum=None, split="strided", weighted=False) -> LeafInfo:
    spec = jax.ShapeDtypeStruct(np.shape(out), jnp.asarray(out).dtype)
    return LeafInfo(spec, k, accum, split, weighted)


def drive(r: Reduction, outs: list[Any], *, k=None, weights=None, accum=None, split="strided"):
    """``r`` run over ``outs`` (micro-batches 0..m-1 of k) as the loop runs it on one device."""
    k = len(outs) if k is None else k
    info = leaf_info(outs[0], k, accum=accum, split=split, weighted=weights is not None)
    carry = r.init(info)
    w_sum = None
    if weights is not None:
        w_sum = jnp.float32(sum(w for w in weights[: len(outs)] if w > 0))
    for j, x in enumerate(outs):
        w = None if weights is None else jnp.float32(weights[j])
        carry = r.update(carry, jnp.asarray(x), jnp.int32(j), w)
    return r.finalize(carry, info, len(outs), w_sum)


def floats(k: int, shape=(3, 2), dtype=np.float32) -> list[np.ndarray]:
    return [RNG.normal(size=shape).astype(dtype) for _ in range(k)]


# --- MEAN ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
def test_mean_is_the_numpy_mean_of_the_micro_batches(k):
    outs = floats(k)
    got = drive(BUILTIN[Reduce.MEAN], outs)
    assert got.dtype == jnp.float32 and got.shape == (3, 2)
    expected = sum(o.astype(np.float64) for o in outs) / k
    np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=ATOL)


def test_mean_of_bfloat16_sums_in_accum_dtype_and_casts_once():
    outs = [np.full((4,), v, jnp.bfloat16) for v in (1.0, 2.0**-9, 2.0**-9, 2.0**-9)]
    got = drive(BUILTIN[Reduce.MEAN], outs, accum=np.dtype(np.float32))
    assert got.dtype == jnp.bfloat16
    total = np.float32(0)
    for o in outs:  # the same float32 sum in the same order, one divide, one cast
        total = np.float32(total + o.astype(np.float32))
    expected = (total / np.float32(4)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got), expected)
    # Negative control: summing in bfloat16 loses the small terms (1 + 2**-9 == 1).
    naive = drive(BUILTIN[Reduce.MEAN], outs, accum=None)
    assert not np.array_equal(np.asarray(naive), expected)


def test_mean_of_fewer_micro_batches_than_k_divides_by_those_that_ran():
    outs = floats(2)
    got = drive(BUILTIN[Reduce.MEAN], outs, k=4)
    expected = (outs[0].astype(np.float64) + outs[1]) / 2
    np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("count", [0, jnp.int32(0)])
def test_mean_when_nothing_ran_is_zero(count):
    r = BUILTIN[Reduce.MEAN]
    info = leaf_info(np.ones(3, np.float32), 4)
    got = r.finalize(r.init(info), info, count, None)
    np.testing.assert_array_equal(np.asarray(got), np.zeros(3, np.float32))


# --- WEIGHTED_MEAN ------------------------------------------------------------------------


def test_weighted_mean_is_the_numpy_weighted_mean():
    outs, weights = floats(4), [3.0, 1.0, 0.5, 2.0]
    got = drive(BUILTIN[Reduce.WEIGHTED_MEAN], outs, weights=weights)
    expected = sum(w * o.astype(np.float64) for w, o in zip(weights, outs, strict=True))
    np.testing.assert_allclose(np.asarray(got), expected / sum(weights), rtol=RTOL, atol=ATOL)


def test_weighted_mean_ignores_zero_weight_micro_batches_even_if_not_finite():
    outs = floats(3)
    outs[1] = np.array([[np.nan, np.inf], [-np.inf, 1e30], [0.0, 1.0]], np.float32)
    weights = [2.0, 0.0, 1.0]
    got = drive(BUILTIN[Reduce.WEIGHTED_MEAN], outs, weights=weights)
    expected = (2.0 * outs[0].astype(np.float64) + outs[2]) / 3.0
    np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=ATOL)


def test_weighted_mean_with_all_weights_zero_is_zero():
    outs = floats(3)
    got = drive(BUILTIN[Reduce.WEIGHTED_MEAN], outs, weights=[0.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(got), np.zeros((3, 2), np.float32))


def test_weighted_mean_of_float16_keeps_a_float32_weight_and_casts_back_once():
    # A weight of 1e5 does not fit float16 (max 65504): it must not be cast down first.
    outs = [np.full((2,), 1.0, np.float16), np.full((2,), 3.0, np.float16)]
    got = drive(BUILTIN[Reduce.WEIGHTED_MEAN], outs, weights=[1e5, 1e5], accum=np.dtype(np.float32))
    assert got.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(got), np.full((2,), 2.0, np.float16))


# --- SUM, MAX, MIN ------------------------------------------------------------------------


def test_sum_of_floats_and_of_integer_counts():
    outs = floats(3)
    got = drive(BUILTIN[Reduce.SUM], outs)
    np.testing.assert_allclose(
        np.asarray(got), sum(o.astype(np.float64) for o in outs), rtol=RTOL, atol=ATOL
    )
    counts = [RNG.integers(0, 100, size=(4,)).astype(np.int32) for _ in range(5)]
    total = drive(BUILTIN[Reduce.SUM], counts)
    assert total.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(total), np.sum(counts, axis=0))


def test_sum_of_bools_is_logical_or():
    flags = [np.array([False, True, False, False]), np.array([False, False, True, False])]
    got = drive(BUILTIN[Reduce.SUM], flags)
    assert got.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got), np.logical_or(*flags))
    assert not bool(drive(BUILTIN[Reduce.SUM], [np.array(False)] * 3))


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_max_and_min_are_elementwise_over_micro_batches(dtype):
    outs = [(RNG.normal(size=(5,)) * 100).astype(dtype) for _ in range(4)]
    np.testing.assert_array_equal(
        np.asarray(drive(BUILTIN[Reduce.MAX], outs)), np.max(outs, axis=0)
    )
    np.testing.assert_array_equal(
        np.asarray(drive(BUILTIN[Reduce.MIN], outs)), np.min(outs, axis=0)
    )


def test_max_of_bools_is_any_and_min_is_all():
    flags = [np.array([True, True, False]), np.array([True, False, False])]
    np.testing.assert_array_equal(np.asarray(drive(BUILTIN[Reduce.MAX], flags)), [1, 1, 0])
    np.testing.assert_array_equal(np.asarray(drive(BUILTIN[Reduce.MIN], flags)), [1, 0, 0])


@pytest.mark.parametrize("name", [Reduce.MAX, Reduce.MIN])
def test_extremes_when_nothing_ran_are_zero(name):
    r = BUILTIN[name]
    info = leaf_info(np.ones(3, np.float32), 4)
    got = r.finalize(r.init(info), info, jnp.int32(0), None)
    np.testing.assert_array_equal(np.asarray(got), np.zeros(3, np.float32))


# --- LAST, STACK, CONCAT ------------------------------------------------------------------


def test_last_is_the_last_micro_batch_that_ran():
    outs = floats(3)
    np.testing.assert_array_equal(np.asarray(drive(BUILTIN[Reduce.LAST], outs)), outs[-1])
    early = drive(BUILTIN[Reduce.LAST], outs[:2], k=3)
    np.testing.assert_array_equal(np.asarray(early), outs[1])


def test_stack_keeps_micro_batch_order_with_zero_rows_for_those_that_did_not_run():
    outs = floats(3)
    got = drive(BUILTIN[Reduce.STACK], outs)
    np.testing.assert_array_equal(np.asarray(got), np.stack(outs))
    early = drive(BUILTIN[Reduce.STACK], outs[:2], k=3)
    np.testing.assert_array_equal(np.asarray(early), np.stack([*outs[:2], 0 * outs[2]]))


@pytest.mark.parametrize(
    ("split", "micro"),
    [
        ("strided", lambda x, j, k: x[j::k]),
        ("contiguous", lambda x, j, k: x[j * len(x) // k : (j + 1) * len(x) // k]),
        ("presplit", lambda x, j, k: x[j * len(x) // k : (j + 1) * len(x) // k]),
    ],
)
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_concat_restores_the_batchs_example_order(split, micro, k):
    """Per-example outputs of each micro-batch (cut by numpy indexing) come back as the
    whole batch's per-example outputs, row for row."""
    batch = np.arange(12 * 2, dtype=np.float32).reshape(12, 2)
    per_example = lambda x: 10 * x + 1  # noqa: E731
    outs = [per_example(micro(batch, j, k)) for j in range(k)]
    got = drive(BUILTIN[Reduce.CONCAT], outs, split=split)
    np.testing.assert_array_equal(np.asarray(got), per_example(batch))


# --- aggregate over devices ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        (Reduce.MEAN, lambda v: v.mean(0)),
        (Reduce.WEIGHTED_MEAN, lambda v: v.mean(0)),
        (Reduce.SUM, lambda v: v.sum(0)),
        (Reduce.MAX, lambda v: v.max(0)),
        (Reduce.MIN, lambda v: v.min(0)),
        (Reduce.CONCAT, lambda v: v.reshape(-1, *v.shape[2:])),
    ],
)
def test_aggregate_reduces_per_device_results_stacked_on_a_leading_axis(name, reference):
    stacked = RNG.normal(size=(4, 3, 2)).astype(np.float32)
    got = BUILTIN[name].aggregate(jnp.asarray(stacked))
    np.testing.assert_allclose(np.asarray(got), reference(stacked), rtol=RTOL, atol=ATOL)


def test_aggregate_of_bool_sums_is_any():
    stacked = np.array([[False, True], [False, False], [False, True]])
    got = BUILTIN[Reduce.SUM].aggregate(jnp.asarray(stacked))
    np.testing.assert_array_equal(np.asarray(got), [False, True])


def test_weighted_divides_once_and_is_zero_without_weight():
    acc = jnp.asarray([3.0, -6.0], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(_builtin_reductions.weighted(acc, jnp.float32(3), jnp.bfloat16)),
        np.asarray([1.0, -2.0], jnp.bfloat16),
    )
    assert _builtin_reductions.weighted(acc, jnp.float32(3), jnp.bfloat16).dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(_builtin_reductions.weighted(acc, 0.0, jnp.float32)), [0, 0]
    )


# --- dtypes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "accum", "expected"),
    [
        (jnp.bfloat16, None, jnp.bfloat16),
        (jnp.bfloat16, jnp.float32, jnp.float32),
        (jnp.float16, jnp.float32, jnp.float32),
        (jnp.float32, jnp.bfloat16, jnp.float32),  # never narrower than the leaf
        (jnp.int32, jnp.float32, jnp.int32),  # counts keep their integer type
        (jnp.bool_, jnp.float32, jnp.bool_),
    ],
)
def test_accum_dtype_widens_floating_leaves_only(dtype, accum, expected):
    assert _builtin_reductions.accum_dtype(dtype, accum) == np.dtype(expected)


@pytest.mark.parametrize(
    ("accum", "leaf_dtypes", "expected"),
    [
        (None, [], jnp.float32),
        (None, [jnp.int32, jnp.bool_], jnp.float32),
        (None, [jnp.bfloat16, jnp.float16], jnp.float32),  # never below float32
        (jnp.bfloat16, [jnp.bfloat16], jnp.float32),
        (None, [jnp.complex64], jnp.float32),  # a complex leaf: its real part's width
        (None, [jnp.float32, jnp.float64], jnp.float64),  # as wide as the widest leaf
        (None, [jnp.complex128], jnp.float64),
        (jnp.float64, [jnp.float32], jnp.float64),  # as wide as the accumulators
    ],
)
def test_weight_dtype_rules(accum, leaf_dtypes, expected):
    leaves = [jax.ShapeDtypeStruct((2,), d) for d in leaf_dtypes]
    accum = None if accum is None else np.dtype(accum)
    assert _builtin_reductions.weight_dtype(accum, leaves) == np.dtype(expected)
