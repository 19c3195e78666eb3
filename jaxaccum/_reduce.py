"""How each output leaf of a step function is combined across micro-batches."""

from __future__ import annotations

import enum
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class Reduce(enum.Enum):
    """How one output leaf is combined over the k micro-batches.

    Attributes:
      MEAN: ``sum_j out_j / k``, summed in ``accum_dtype`` and cast back once. The
        default for floating leaves when no ``weight_fn`` is given.
      WEIGHTED_MEAN: ``sum_j w_j out_j / sum_j w_j`` with ``w_j = weight_fn(micro-batch j)``.
        A micro-batch of weight 0 contributes nothing (even if its output is NaN); if all
        weights are 0 the result is 0. The default for floating leaves with a ``weight_fn``.
      SUM: ``sum_j out_j`` (floating leaves summed in ``accum_dtype``). The default for
        integer leaves (counts).
      MAX: elementwise maximum. The default for bool leaves (logical "any").
      MIN: elementwise minimum (for bool leaves: logical "all").
      LAST: the output of the last micro-batch.
      STACK: every micro-batch's output, stacked on a new leading axis of size k.
    """

    MEAN = "mean"
    WEIGHTED_MEAN = "weighted_mean"
    SUM = "sum"
    MAX = "max"
    MIN = "min"
    LAST = "last"
    STACK = "stack"


def as_reduce(value: Any) -> Reduce | None:
    """Accepts a ``Reduce``, its string value, or None (the dtype's default)."""
    if value is None or isinstance(value, Reduce):
        return value
    try:
        return Reduce(value)
    except ValueError:
        valid = [r.value for r in Reduce]
        raise ValueError(
            f"unknown reduction {value!r} in reduce=; use a jaxaccum.Reduce member or one of "
            f"{valid}."
        ) from None


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (Reduce, str))


def spec_members(spec: Any) -> list[Reduce | None]:
    """Every reduction named in a ``reduce=`` spec (validated)."""
    return [as_reduce(x) for x in jax.tree.leaves(spec, is_leaf=_is_spec_leaf)]


def default_reduce(dtype: np.dtype, weighted: bool) -> Reduce:
    if jnp.issubdtype(dtype, jnp.inexact):
        return Reduce.WEIGHTED_MEAN if weighted else Reduce.MEAN
    if jnp.issubdtype(dtype, jnp.bool_):
        return Reduce.MAX
    return Reduce.SUM


def _check(reduce: Reduce, leaf: jax.ShapeDtypeStruct, path: str, weighted: bool) -> None:
    dtype = leaf.dtype
    if jnp.issubdtype(dtype, jax.dtypes.extended):
        raise TypeError(
            f"output leaf {path} has dtype {dtype}, which jaxaccum cannot reduce; return "
            "jax.random.key_data(...) of it instead."
        )
    inexact = jnp.issubdtype(dtype, jnp.inexact)
    if reduce in (Reduce.MEAN, Reduce.WEIGHTED_MEAN) and not inexact:
        raise TypeError(
            f"Reduce.{reduce.name} needs a floating output, but leaf {path} has dtype {dtype}; "
            "use Reduce.SUM for counts or cast the output to float in step_fn."
        )
    if reduce is Reduce.WEIGHTED_MEAN and not weighted:
        raise ValueError(
            f"Reduce.WEIGHTED_MEAN at output leaf {path} needs weights; pass weight_fn= to "
            "jaxaccum.accumulate."
        )
    if reduce is Reduce.SUM and jnp.issubdtype(dtype, jnp.bool_):
        raise TypeError(f"Reduce.SUM of bool leaf {path}; cast it to int32 in step_fn.")
    if reduce in (Reduce.MAX, Reduce.MIN) and jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"Reduce.{reduce.name} is undefined for complex leaf {path}.")


def resolve(spec: Any, out_shapes: Any, weighted: bool) -> Any:
    """A tree shaped like the outputs holding one checked ``Reduce`` per leaf."""

    def expand(r: Any, sub: Any) -> Any:
        return jax.tree.map(lambda s: as_reduce(r) or default_reduce(s.dtype, weighted), sub)

    try:
        tree = jax.tree.map(expand, spec, out_shapes, is_leaf=_is_spec_leaf)
    except ValueError as err:
        raise ValueError(
            "reduce= must be a prefix of step_fn's output tree (a Reduce or None at each "
            f"node); reduce={spec!r} does not match the output structure "
            f"{jax.tree.structure(out_shapes)}."
        ) from err
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Reduce))
    for (path, r), leaf in zip(flat, jax.tree.leaves(out_shapes), strict=True):
        _check(r, leaf, "output" + jax.tree_util.keystr(path), weighted)
    return tree


def accum_dtype_for(reduce: Reduce, dtype: np.dtype, accum_dtype: np.dtype) -> np.dtype:
    summing = reduce in (Reduce.MEAN, Reduce.WEIGHTED_MEAN, Reduce.SUM)
    if summing and jnp.issubdtype(dtype, jnp.inexact):
        return jnp.promote_types(dtype, accum_dtype)
    return np.dtype(dtype)


def _extreme(dtype: np.dtype, lowest: bool) -> Any:
    if jnp.issubdtype(dtype, jnp.bool_):
        return not lowest
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return info.max if not lowest else info.min
    return np.inf if not lowest else -np.inf


def init(reduce: Reduce, leaf: jax.ShapeDtypeStruct, accum_dtype: np.dtype) -> jax.Array:
    """The accumulator before the first micro-batch (a dummy scalar for STACK)."""
    dtype = accum_dtype_for(reduce, leaf.dtype, accum_dtype)
    if reduce is Reduce.STACK:
        return jnp.zeros((), dtype)
    if reduce is Reduce.MAX:
        return jnp.full(leaf.shape, _extreme(dtype, lowest=True), dtype)
    if reduce is Reduce.MIN:
        return jnp.full(leaf.shape, _extreme(dtype, lowest=False), dtype)
    return jnp.zeros(leaf.shape, dtype)


def contribution(reduce: Reduce, x: jax.Array, w: jax.Array | None, dtype: Any) -> jax.Array:
    """What one micro-batch adds to a summing (MEAN, WEIGHTED_MEAN, SUM) accumulator."""
    if reduce is Reduce.WEIGHTED_MEAN:
        assert w is not None  # guaranteed by _check
        weighted = x.astype(dtype) * w.astype(dtype)
        return jnp.where(w > 0, weighted, jnp.zeros_like(weighted))
    return x.astype(dtype)


def update(reduce: Reduce, acc: jax.Array, x: jax.Array, w: jax.Array | None) -> jax.Array:
    """Folds one micro-batch's output ``x`` (with weight ``w``) into ``acc``."""
    if reduce in (Reduce.MEAN, Reduce.SUM, Reduce.WEIGHTED_MEAN):
        return acc + contribution(reduce, x, w, acc.dtype)
    if reduce is Reduce.MAX:
        return jnp.maximum(acc, x.astype(acc.dtype))
    if reduce is Reduce.MIN:
        return jnp.minimum(acc, x.astype(acc.dtype))
    if reduce is Reduce.LAST:
        return x.astype(acc.dtype)
    return acc  # STACK: collected as scan outputs instead


def finish(
    reduce: Reduce, acc: jax.Array, dtype: np.dtype, k: int, weight_sum: jax.Array | None
) -> jax.Array:
    """The reduced output from the final accumulator, cast back to the leaf dtype once."""
    if reduce is Reduce.MEAN:
        acc = acc / k
    elif reduce is Reduce.WEIGHTED_MEAN:
        assert weight_sum is not None  # guaranteed by _check
        total = weight_sum.astype(acc.dtype)
        safe = jnp.where(total > 0, total, jnp.ones_like(total))
        acc = jnp.where(total > 0, acc / safe, jnp.zeros_like(acc))
    return acc.astype(dtype)
