"""``jaxaccum.flax._batch_norm``: merging BatchNorm statistics of k equal micro-batches exactly.

The reference is the whole batch: one momentum update of the running mean and (biased)
variance from the statistics of all N examples, computed with numpy in float64, and, as a
second reference, what ``flax.linen.BatchNorm`` itself writes when it sees the whole batch.
Each micro-batch's contribution is what BatchNorm writes from zero running statistics,
``(1 - momentum) * stat_j``. Float32 round-off with a variance computed as a difference of
moments: relative and absolute tolerance 1e-5.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccum.flax import _batch_norm as _bn

RTOL = ATOL = 1e-5
RNG = np.random.default_rng(0)


def merged(x: np.ndarray, k: int, momentum: float, old_mean, old_var):
    """Running (mean, var) after one merged update from k equal micro-batches of ``x``."""
    a = 1.0 - momentum
    parts = np.split(x.astype(np.float32), k)
    wrote_mean = [a * p.mean(0) for p in parts]  # what BatchNorm writes from zero stats
    wrote_var = [a * p.var(0) for p in parts]
    written_mean = jnp.asarray(np.mean(wrote_mean, 0))
    written_var = jnp.asarray(np.mean(wrote_var, 0))
    written_mean_sq = jnp.asarray(np.mean(np.square(wrote_mean), 0))
    mean = _bn.merged_update(old_mean, written_mean, written_mean, written_mean_sq, momentum, True)
    var = _bn.merged_update(old_var, written_var, written_mean, written_mean_sq, momentum, False)
    return mean, var


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("momentum", [0.9, 0.99, 0.0])
def test_merged_update_equals_the_full_batch_statistics(k, momentum):
    x = RNG.normal(loc=0.5, scale=2.0, size=(32, 5))
    old_mean = jnp.asarray(RNG.normal(size=5), jnp.float32)
    old_var = jnp.asarray(RNG.uniform(0.5, 2.0, size=5), jnp.float32)
    mean, var = merged(x, k, momentum, old_mean, old_var)
    expected_mean = momentum * np.asarray(old_mean, np.float64) + (1 - momentum) * x.mean(0)
    expected_var = momentum * np.asarray(old_var, np.float64) + (1 - momentum) * x.var(0)
    np.testing.assert_allclose(np.asarray(mean), expected_mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(var), expected_var, rtol=RTOL, atol=ATOL)
    # Negative control: the mean of the micro-batch variances misses the spread of their means.
    naive = np.mean([p.var(0) for p in np.split(x, k)], 0)
    if k > 1:
        assert not np.allclose(naive, x.var(0), rtol=1e-3)


def test_merged_update_keeps_the_running_statistics_dtype():
    old = jnp.ones(3, jnp.bfloat16)
    w = jnp.full(3, 0.1, jnp.float32)
    assert _bn.merged_update(old, w, w, w * w, 0.9, is_mean=False).dtype == jnp.bfloat16


def test_merged_variance_of_a_constant_is_zero_not_negative():
    """Round-off in E[x^2] - E[x]^2 must not give a negative variance."""
    x = np.full((8, 3), 1000.1, np.float32)
    _, var = merged(x, 4, 0.0, jnp.zeros(3), jnp.zeros(3))
    assert np.all(np.asarray(var) >= 0)
    np.testing.assert_allclose(np.asarray(var), 0.0, atol=1e-1)


class Net(nn.Module):
    momentum: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.BatchNorm(use_running_average=False, momentum=self.momentum, name="bn")(x)


def linen_stats(x: np.ndarray, momentum: float, stats: Any) -> Any:
    """The batch_stats ``flax.linen.BatchNorm`` leaves after one training call on ``x``."""
    variables = {"params": Net(momentum).init(jax.random.key(0), x)["params"], **stats}
    _, new = Net(momentum).apply(variables, x, mutable=["batch_stats"])
    return new


def keys_of(path: Any) -> tuple[Any, ...]:
    return tuple(entry.key for entry in path)


@pytest.mark.parametrize("k", [2, 4])
def test_merge_of_linen_micro_batch_statistics_equals_linen_on_the_whole_batch(k):
    momentum = 0.9
    x = RNG.normal(loc=1.0, size=(16, 6)).astype(np.float32)
    old = {"batch_stats": {"bn": {"mean": jnp.full(6, 0.3), "var": jnp.full(6, 1.7)}}}
    zero = jax.tree.map(jnp.zeros_like, old)
    momenta = {("batch_stats", "bn"): momentum}
    # What each micro-batch writes from zero statistics, and its square, averaged over j.
    written = [
        _bn.moments(linen_stats(p, momentum, zero), momenta, keys_of) for p in np.split(x, k)
    ]
    first = jax.tree.map(lambda *v: sum(v) / k, *[w[0] for w in written])
    second = jax.tree.map(lambda *v: sum(v) / k, *[w[1] for w in written])
    got = _bn.merge(old, first, second, momenta, keys_of)
    expected = linen_stats(x, momentum, old)
    jax.tree.map(
        lambda g, e: np.testing.assert_allclose(np.asarray(g), e, rtol=RTOL, atol=ATOL),
        got,
        expected,
    )


# --- finding and merging the statistics in a tree -----------------------------------------------

MOMENTA = {("stats", "bn"): 0.9}


def test_is_stat_finds_mean_and_var_of_known_batch_norms_only():
    assert _bn.is_stat(("stats", "bn", "mean"), MOMENTA)
    assert _bn.is_stat(("stats", "bn", "var"), MOMENTA)
    assert not _bn.is_stat(("stats", "bn", "count"), MOMENTA)
    assert not _bn.is_stat(("stats", "other", "mean"), MOMENTA)
    assert not _bn.is_stat((), MOMENTA)


def test_moments_are_float32_statistics_and_their_squares():
    tree = {
        "stats": {
            "bn": {"mean": jnp.asarray([1.0, -2.0], jnp.bfloat16), "var": jnp.asarray([3.0, 4.0])},
            "step": jnp.int32(7),
        }
    }
    first, second = _bn.moments(tree, MOMENTA, keys_of)
    assert set(first) == set(second) == {("stats", "bn", "mean"), ("stats", "bn", "var")}
    assert first[("stats", "bn", "mean")].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(second[("stats", "bn", "mean")]), [1.0, 4.0])
    np.testing.assert_array_equal(np.asarray(second[("stats", "bn", "var")]), [9.0, 16.0])


def test_merge_keeps_other_leaves_or_refuses_them_by_name():
    old = {"stats": {"bn": {"mean": jnp.zeros(2), "var": jnp.ones(2)}, "seen": jnp.int32(3)}}
    first = {("stats", "bn", "mean"): jnp.zeros(2), ("stats", "bn", "var"): jnp.zeros(2)}
    second = {("stats", "bn", "mean"): jnp.zeros(2), ("stats", "bn", "var"): jnp.zeros(2)}
    got = _bn.merge(old, first, second, MOMENTA, keys_of)
    assert int(got["stats"]["seen"]) == 3
    np.testing.assert_allclose(np.asarray(got["stats"]["bn"]["var"]), 0.9)
    with pytest.raises(
        ValueError,
        match=r"batch_stats\['stats'\]\['seen'\] is not the running "
        r"mean or variance .* batch_norm='sequential', or keep other variables out of the "
        r"'batch_stats' collection",
    ):
        _bn.merge(old, first, second, MOMENTA, keys_of, only_stats="batch_stats")


def test_batch_norm_modes_equal_their_strings():
    assert _bn.BatchNormMode("exact") is _bn.BatchNormMode.EXACT
    assert _bn.BatchNormMode.SEQUENTIAL == "sequential"
