"""Exact merging of BatchNorm statistics over equal-sized micro-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merged_update(
    old: jax.Array,
    written: jax.Array,
    written_mean: jax.Array,
    written_mean_sq: jax.Array,
    momentum: float,
    is_mean: bool,
) -> jax.Array:
    """One momentum update of a running mean or variance from k merged micro-batches.

    Given zero running statistics, BatchNorm writes ``(1 - m) * stat_j`` for micro-batch j.
    ``written`` is the mean over micro-batches of what it wrote for this leaf,
    ``written_mean`` the same for the layer's running mean, and ``written_mean_sq`` the
    mean of its square. With equal micro-batch sizes the whole batch's mean is the mean of
    the means, and its variance is ``E_j[var_j + mean_j^2] - mean^2``.
    """
    a = 1.0 - momentum
    mu = written_mean / a
    if is_mean:
        stat = mu
    else:
        second_moment = written / a + written_mean_sq / (a * a)
        stat = jnp.maximum(0.0, second_moment - mu * mu)
    return (momentum * old + a * stat).astype(old.dtype)
