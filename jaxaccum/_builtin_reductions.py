"""The functions the built-in reductions are made of, and the arithmetic they share.

Each function here is one phase of a :class:`jaxaccum.Reduction`, with the signature the
public protocol gives that phase; ``_reduce.BUILTIN`` puts them together, one record per
:class:`jaxaccum.Reduce` member. The dtype rules and the divide-once helpers are shared with
the train steps, which weigh their gradients the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum import _parallel

if TYPE_CHECKING:
    from jaxaccum._reduce import LeafInfo

# --- dtypes, weights and dividing once ----------------------------------------------------


def accum_dtype(dtype: Any, accum: Any) -> np.dtype:
    """The running-sum dtype of a floating leaf (its own with ``accum`` None)."""
    dtype = np.dtype(dtype)
    if accum is None or not jnp.issubdtype(dtype, jnp.inexact):
        return dtype
    return np.dtype(jnp.promote_types(dtype, accum))


def weight_dtype(accum: Any, leaves: list[Any]) -> np.dtype:
    """Weight sums: float32, or as wide as the accumulators and floating ``leaves``."""
    dtype = np.dtype(jnp.float32) if accum is None else accum
    for leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            dtype = jnp.promote_types(dtype, jnp.finfo(leaf.dtype).dtype)
    return np.dtype(jnp.promote_types(dtype, jnp.float32))


def counts(w: jax.Array) -> jax.Array:
    """Whether a weight counts: unless it is <= 0. A NaN weight counts, so that it shows
    as a NaN result (as an infinite one does) instead of being left out unseen."""
    return ~(w <= 0)


def _divide(acc: jax.Array, total: Any) -> jax.Array:
    """``acc / total``, 0 where ``total`` is 0 (nothing ran, or all weights 0)."""
    if isinstance(total, int) and total > 0:  # a static count: one plain divide
        return acc / jnp.asarray(total, acc.dtype)
    total = jnp.asarray(total)
    wide = jnp.promote_types(acc.dtype, total.dtype)  # a float32 weight sum stays float32
    safe = jnp.where(counts(total), total, jnp.ones_like(total)).astype(wide)
    return jnp.where(counts(total), acc.astype(wide) / safe, 0).astype(acc.dtype)


def weighted(acc: jax.Array, total: Any, dtype: Any) -> jax.Array:
    """A weighted sum divided by its weight once, cast back to ``dtype``."""
    return _divide(acc, total).astype(dtype)


# --- init(info) ---------------------------------------------------------------------------


def zeros(info: LeafInfo) -> jax.Array:
    """A running sum: zeros in the leaf's accumulation dtype."""
    return jnp.zeros(info.out.shape, accum_dtype(info.out.dtype, info.accum_dtype))


def like_out(info: LeafInfo) -> jax.Array:
    """Zeros of the leaf's own type."""
    return jnp.zeros(info.out.shape, info.out.dtype)


def stacked(info: LeafInfo) -> jax.Array:
    """Room for every micro-batch's output: ``(k, *shape)`` zeros."""
    return jnp.zeros((info.k, *info.out.shape), info.out.dtype)


def _extreme(dtype: np.dtype, largest: bool) -> Any:
    """The largest value of ``dtype``, or its lowest."""
    if jnp.issubdtype(dtype, jnp.bool_):
        return largest
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return info.max if largest else info.min
    return np.inf if largest else -np.inf


def lowest(info: LeafInfo) -> jax.Array:
    """A running maximum before the first micro-batch: the dtype's lowest value."""
    return jnp.full(info.out.shape, _extreme(info.out.dtype, largest=False), info.out.dtype)


def highest(info: LeafInfo) -> jax.Array:
    """A running minimum before the first micro-batch: the dtype's largest value."""
    return jnp.full(info.out.shape, _extreme(info.out.dtype, largest=True), info.out.dtype)


# --- update(carry, value, index, weight) --------------------------------------------------


def add(acc: jax.Array, x: jax.Array, index: Any, weight: Any) -> jax.Array:
    return acc + x.astype(acc.dtype)


def add_weighted(acc: jax.Array, x: jax.Array, index: Any, weight: Any) -> jax.Array:
    """``acc + w x``, adding nothing for a weight that does not count (even a NaN ``x``)."""
    wide = jnp.promote_types(acc.dtype, weight.dtype)  # a float32 weight is not cast down
    value = _parallel.times(x.astype(wide), weight.astype(wide)).astype(acc.dtype)
    return acc + jnp.where(counts(weight), value, jnp.zeros_like(value))


def add_or(acc: jax.Array, x: jax.Array, index: Any, weight: Any) -> jax.Array:
    """A sum, or for bool leaves a logical or."""
    if jnp.issubdtype(acc.dtype, jnp.bool_):
        return acc | x.astype(jnp.bool_)
    return add(acc, x, index, weight)


def replace(acc: jax.Array, x: jax.Array, index: Any, weight: Any) -> jax.Array:
    return x.astype(acc.dtype)


def maximum(acc: jax.Array, x: jax.Array, index: Any, weight: Any) -> jax.Array:
    return jnp.maximum(acc, x.astype(acc.dtype))


def minimum(acc: jax.Array, x: jax.Array, index: Any, weight: Any) -> jax.Array:
    return jnp.minimum(acc, x.astype(acc.dtype))


def put(acc: jax.Array, x: jax.Array, index: Any, weight: Any) -> jax.Array:
    """Micro-batch ``index``'s output written at its row of the stacked carry."""
    return jax.lax.dynamic_update_index_in_dim(acc, x.astype(acc.dtype), index, 0)


# --- finalize(carry, info, count, weight_sum) ---------------------------------------------


def mean(acc: jax.Array, info: LeafInfo, count: Any, weight_sum: Any) -> jax.Array:
    return weighted(acc, count, info.out.dtype)


def weighted_mean(acc: jax.Array, info: LeafInfo, count: Any, weight_sum: Any) -> jax.Array:
    return weighted(acc, weight_sum, info.out.dtype)


def cast(acc: jax.Array, info: LeafInfo, count: Any, weight_sum: Any) -> jax.Array:
    return acc.astype(info.out.dtype)


def as_is(acc: jax.Array, info: LeafInfo, count: Any, weight_sum: Any) -> jax.Array:
    return acc


def if_any_ran(acc: jax.Array, info: LeafInfo, count: Any, weight_sum: Any) -> jax.Array:
    """The extreme, or zeros when no micro-batch ran (early stop at 0)."""
    if isinstance(count, int) and count > 0:
        return acc
    return jnp.where(jnp.asarray(count) > 0, acc, jnp.zeros_like(acc))


def unsplit(acc: jax.Array, info: LeafInfo, count: Any, weight_sum: Any) -> jax.Array:
    """Stacked ``(k, n, ...)`` outputs back in the batch's example order ``(k·n, ...)``."""
    if info.split == "strided":
        acc = jnp.swapaxes(acc, 0, 1)  # rows sharded by type stay major: a free merge
    elif _parallel.base.explicit_entry(acc, 1) is not None:
        # Micro-batch-major order interleaves the devices' rows: gather them first.
        spec = jax.typeof(acc).sharding.spec
        acc = jax.sharding.reshard(acc, jax.sharding.PartitionSpec(*spec[:1], None, *spec[2:]))
    return acc.reshape(-1, *acc.shape[2:])


# --- combine(carry, info, axes, count, weights) -------------------------------------------


def _p_extreme(x: jax.Array, axes: tuple[str, ...], largest: bool) -> jax.Array:
    """The elementwise maximum (``largest``) or minimum over the devices along ``axes``."""
    op = jax.lax.pmax if largest else jax.lax.pmin
    if jnp.issubdtype(x.dtype, jnp.bool_):
        return op(x.astype(jnp.int32), axes).astype(jnp.bool_)
    return op(x, axes)


def _p_weighted(x: jax.Array, w: jax.Array | None, axes: tuple[str, ...]) -> jax.Array:
    """The mean over devices of ``x``, weighted by ``w`` (zero-weight devices left out)."""
    if w is None:
        wide = jnp.promote_types(x.dtype, jnp.float32)
        return jax.lax.pmean(x.astype(wide), axes).astype(x.dtype)
    w = jnp.where(counts(w), w, 0).astype(jnp.promote_types(x.dtype, jnp.float32))
    w = w.reshape(w.shape + (1,) * (x.ndim - w.ndim))
    num = jax.lax.psum(jnp.where(counts(w), x.astype(w.dtype) * w, 0), axes)
    return _divide(num, jax.lax.psum(w, axes)).astype(x.dtype)


def _p_union(x: jax.Array, w: jax.Array | None, axes: tuple[str, ...]) -> jax.Array:
    """The j-th global micro-batch is every device's j-th one: floating values are
    averaged over devices (weighted), counts summed, flags or-ed."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return _p_weighted(x, w, axes)
    if jnp.issubdtype(x.dtype, jnp.bool_):
        return _p_extreme(x, axes, largest=True)
    return jax.lax.psum(x, axes)


def pmax(acc: jax.Array, info: LeafInfo, axes: tuple[str, ...], count: Any, weights: Any) -> Any:
    return _p_extreme(acc, axes, largest=True)


def pmin(acc: jax.Array, info: LeafInfo, axes: tuple[str, ...], count: Any, weights: Any) -> Any:
    return _p_extreme(acc, axes, largest=False)


def psum(acc: Any, info: LeafInfo, axes: tuple[str, ...], count: Any, weights: Any) -> Any:
    return jax.lax.psum(acc, axes)


def psum_or(acc: jax.Array, info: LeafInfo, axes: tuple[str, ...], count: Any, weights: Any) -> Any:
    """A sum over the devices, or for bool leaves a logical or."""
    if jnp.issubdtype(acc.dtype, jnp.bool_):
        return _p_extreme(acc, axes, largest=True)
    return jax.lax.psum(acc, axes)


def last_over_devices(
    acc: jax.Array, info: LeafInfo, axes: tuple[str, ...], count: Any, weights: Any
) -> jax.Array:
    """Every device's last output, weighted by the weight of the micro-batch it came from
    (0 on a device where none ran)."""
    if weights is None:
        return _p_union(acc, None, axes)
    count = jnp.asarray(count)
    last = weights[jnp.clip(count - 1, 0, info.k - 1)]
    return _p_union(acc, jnp.where(count > 0, last, jnp.zeros_like(last)), axes)


def stack_over_devices(
    acc: jax.Array, info: LeafInfo, axes: tuple[str, ...], count: Any, weights: Any
) -> jax.Array:
    return _p_union(acc, weights, axes)


def concat_over_devices(
    acc: jax.Array, info: LeafInfo, axes: tuple[str, ...], count: Any, weights: Any
) -> jax.Array:
    """Every device's ``(k, n, ...)`` rows gathered so that :func:`unsplit` gives the global
    example order: the batch is sharded in blocks of examples, split per device."""
    if info.split == "contiguous":  # device d's micro-batches are one block: d-major
        return _parallel.gather(acc, axes, axis=0, tiled=True)
    # strided: local row i of micro-batch j is the device's example i*k + j; presplit:
    # the devices hold column blocks of every micro-batch. Both gather along the rows.
    return _parallel.gather(acc, axes, axis=1, tiled=True)


# --- check(info, path) --------------------------------------------------------------------


def floating(name: str) -> Callable[[LeafInfo, str], None]:
    """The check of ``Reduce.<name>``, a mean: a floating leaf (and weights if weighted)."""

    def check(info: LeafInfo, path: str) -> None:
        if not jnp.issubdtype(info.out.dtype, jnp.inexact):
            raise TypeError(
                f"Reduce.{name} needs a floating output, but leaf {path} has dtype "
                f"{info.out.dtype}; use Reduce.SUM for counts or cast the output to float in "
                "step_fn."
            )
        if name == "WEIGHTED_MEAN" and not info.weighted:
            raise ValueError(
                f"Reduce.WEIGHTED_MEAN at output leaf {path} needs weights; pass weight_fn= "
                "to jaxaccum.accumulate."
            )

    return check


def real(name: str) -> Callable[[LeafInfo, str], None]:
    """The check of ``Reduce.<name>``, an extreme: no complex leaf."""

    def check(info: LeafInfo, path: str) -> None:
        if jnp.issubdtype(info.out.dtype, jnp.complexfloating):
            raise TypeError(f"Reduce.{name} is undefined for complex leaf {path}.")

    return check


def has_rows(info: LeafInfo, path: str) -> None:
    if len(info.out.shape) == 0:
        raise ValueError(
            f"Reduce.CONCAT needs outputs with a leading example axis, but leaf {path} is a "
            "scalar per micro-batch; use Reduce.STACK to stack scalars."
        )
