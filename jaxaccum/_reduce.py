"""How each output leaf of a step function is combined across micro-batches.

A reduction is a record of functions (:class:`Reduction`): ``init`` makes a carry from
one micro-batch's output type, ``update`` folds micro-batch j's output into it,
``finalize`` turns the carry into the result, and ``combine`` / ``aggregate`` say how
per-device results become one. The built-in reductions named by :class:`Reduce` are
written in the same protocol users get.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum import _checks, _options, _parallel


class Reduce(_options.Option):
    """How one output leaf is combined over the k micro-batches.

    Attributes:
      MEAN: ``sum_j out_j / m`` over the m micro-batches that ran (m = k unless the
        loop stops early), summed in ``accum_dtype`` and cast back once. The default
        for floating leaves when no ``weight_fn`` is given.
      WEIGHTED_MEAN: ``sum_j w_j out_j / sum_j w_j`` with ``w_j = weight_fn(micro-batch j)``.
        A micro-batch of weight 0 contributes nothing (even if its output is NaN); if all
        weights are 0 the result is 0. The default for floating leaves with a ``weight_fn``.
      SUM: ``sum_j out_j`` (floating leaves summed in ``accum_dtype``); for bool leaves,
        logical or. The default for integer leaves (counts).
      MAX: elementwise maximum. The default for bool leaves (logical "any").
      MIN: elementwise minimum (for bool leaves: logical "all").
      LAST: the output of the last micro-batch that ran.
      STACK: every micro-batch's output, stacked on a new leading axis of size k, in
        micro-batch order (rows of micro-batches that did not run are zeros).
      CONCAT: every micro-batch's output concatenated along its axis 0 in the batch's
        original example order (the split undone): per-example outputs of a batch of
        N come back with N rows, as the step on the whole batch would return them.
    """

    MEAN = "mean"
    WEIGHTED_MEAN = "weighted_mean"
    SUM = "sum"
    MAX = "max"
    MIN = "min"
    LAST = "last"
    STACK = "stack"
    CONCAT = "concat"


class ReduceContext(NamedTuple):
    """What a :class:`Reduction`'s functions are told about the loop.

    Attributes:
      out: the leaf's type for one micro-batch (``jax.ShapeDtypeStruct``).
      k: micro-batches per call (static).
      accum_dtype: dtype for running sums of floating leaves (None: the leaf's own).
      split: how the batch was split (``"strided"``, ``"contiguous"``, ``"presplit"``).
      weighted: whether a ``weight_fn`` gives micro-batch weights.
      index: in ``update``, the micro-batch index j (an int32 scalar, traced).
      weight: in ``update``, ``w_j`` (a float scalar), or None without ``weight_fn``.
      count: in ``finalize``, the number of micro-batches that ran, over all devices
        (k times the devices unless the loop stopped early; then traced).
      weight_sum: in ``finalize``, the sum of the positive weights over all devices
        (None without ``weight_fn``).
      weights: in ``combine``, this device's per-micro-batch weights, shape ``(k,)``
        (0 for micro-batches that did not run), or None without ``weight_fn``.
      axes: in ``combine``, the data axes to combine over.
    """

    out: Any
    k: int
    accum_dtype: Any
    split: str
    weighted: bool
    index: Any = None
    weight: Any = None
    count: Any = None
    weight_sum: Any = None
    weights: Any = None
    axes: tuple[str, ...] = ()


_PHASES = (  # each function of a Reduction, how the loop calls it, and its argument count
    ("init", "init(out, ctx)", 2),
    ("update", "update(carry, out_j, ctx)", 3),
    ("finalize", "finalize(carry, ctx)", 2),
    ("aggregate", "aggregate(values)", 1),
    ("combine", "combine(carry, ctx)", 2),
    ("check", "check(out, path, ctx)", 3),
)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Reduction:
    """A user-defined reduction of one output leaf over micro-batches.

    The loop runs ``carry = init(out, ctx)``, then ``carry = update(carry, out_j, ctx)``
    for each micro-batch j that runs (``ctx.index`` is j, ``ctx.weight`` its weight),
    then returns ``finalize(carry, ctx)``. The carry is any pytree of arrays with a
    fixed type. Give a ``Reduction`` anywhere ``reduce=`` takes a :class:`Reduce`.

    Over devices (``data_axis=`` or ``axis_name=``): with ``combine``, each device's
    carry after its loop is combined by ``combine(carry, ctx)`` (``ctx.axes`` the data
    axes, inside ``shard_map``) and then finalized; without it, each device finalizes
    its own carry, the results are gathered on a new leading axis (one per device, in
    the batch's device order) and reduced by ``aggregate``.

    Attributes:
      init: ``(out, ctx) -> carry`` from one micro-batch's output type.
      update: ``(carry, value, ctx) -> carry``.
      finalize: ``(carry, ctx) -> result``.
      aggregate: ``values -> result``, reducing a leading axis of stacked results
        (e.g. ``lambda v: v.sum(0)``); needed over devices when ``combine`` is None.
      combine: ``(carry, ctx) -> carry`` over ``ctx.axes``, or None.
      check: ``(out, path, ctx) -> None``, raising ``TypeError``/``ValueError`` at trace
        time for an output leaf the reduction does not fit; or None.
      name: shown in error messages.

    Examples:
      >>> import jax.numpy as jnp, jaxaccum
      >>> sum_sq = jaxaccum.Reduction(
      ...     init=lambda out, ctx: jnp.zeros(out.shape, jnp.float32),
      ...     update=lambda acc, x, ctx: acc + x.astype(jnp.float32) ** 2,
      ...     finalize=lambda acc, ctx: jnp.sqrt(acc),
      ...     aggregate=lambda v: jnp.sqrt((v**2).sum(0)),
      ...     name="root_sum_squares")
      >>> f = jaxaccum.accumulate(lambda b: b.sum(), k=2, batch_argnums=0, reduce=sum_sq)
      >>> float(f(jnp.array([1.0, 2.0, 0.0, 2.0])))  # sqrt((1 + 0) ** 2 + (2 + 2) ** 2)
      4.123105525970459
    """

    init: Callable[[Any, ReduceContext], Any]
    update: Callable[[Any, Any, ReduceContext], Any]
    finalize: Callable[[Any, ReduceContext], Any]
    aggregate: Callable[[Any], Any] | None = None
    combine: Callable[[Any, ReduceContext], Any] | None = None
    check: Callable[[Any, str, ReduceContext], None] | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        _checks.check_reduction(self, _PHASES)

    def __repr__(self) -> str:
        return f"Reduction({self.name})"

    @staticmethod
    def builtin(reduce: Reduce | str) -> Reduction:
        """The record behind a :class:`Reduce` member (or its string value).

        Examples:
          >>> import jaxaccum
          >>> jaxaccum.Reduction.builtin("mean")
          Reduction(MEAN)
        """
        found = as_reduction(reduce)
        if found is None:
            raise ValueError("Reduction.builtin needs a Reduce member or its value, got None.")
        return found


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


def _zeros(out: Any, ctx: ReduceContext) -> jax.Array:
    return jnp.zeros(out.shape, accum_dtype(out.dtype, ctx.accum_dtype))


def _cast(acc: jax.Array, ctx: ReduceContext) -> jax.Array:
    return acc.astype(ctx.out.dtype)


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


def _extreme(dtype: np.dtype, lowest: bool) -> Any:
    if jnp.issubdtype(dtype, jnp.bool_):
        return not lowest
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return info.max if not lowest else info.min
    return np.inf if not lowest else -np.inf


def _p_extreme(x: jax.Array, axes: tuple[str, ...], largest: bool) -> jax.Array:
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


def _psum(acc: Any, ctx: ReduceContext) -> Any:
    return jax.lax.psum(acc, ctx.axes)


def _need_float(name: str) -> Callable[[Any, str, ReduceContext], None]:
    def check(out: Any, path: str, ctx: ReduceContext) -> None:
        if not jnp.issubdtype(out.dtype, jnp.inexact):
            raise TypeError(
                f"Reduce.{name} needs a floating output, but leaf {path} has dtype "
                f"{out.dtype}; use Reduce.SUM for counts or cast the output to float in "
                "step_fn."
            )
        if name == "WEIGHTED_MEAN" and not ctx.weighted:
            raise ValueError(
                f"Reduce.WEIGHTED_MEAN at output leaf {path} needs weights; pass weight_fn= "
                "to jaxaccum.accumulate."
            )

    return check


def _real(name: str) -> Callable[[Any, str, ReduceContext], None]:
    def check(out: Any, path: str, ctx: ReduceContext) -> None:
        if jnp.issubdtype(out.dtype, jnp.complexfloating):
            raise TypeError(f"Reduce.{name} is undefined for complex leaf {path}.")

    return check


def _stacked_init(out: Any, ctx: ReduceContext) -> jax.Array:
    return jnp.zeros((ctx.k, *out.shape), out.dtype)


def _stacked_update(acc: jax.Array, x: jax.Array, ctx: ReduceContext) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(acc, x.astype(acc.dtype), ctx.index, 0)


def _unsplit(acc: jax.Array, ctx: ReduceContext) -> jax.Array:
    """Stacked ``(k, n, ...)`` outputs back in the batch's example order ``(k·n, ...)``."""
    if ctx.split == "strided":
        acc = jnp.swapaxes(acc, 0, 1)  # rows sharded by type stay major: a free merge
    elif _parallel.base.explicit_entry(acc, 1) is not None:
        # Micro-batch-major order interleaves the devices' rows: gather them first.
        spec = jax.typeof(acc).sharding.spec
        acc = jax.sharding.reshard(acc, jax.sharding.PartitionSpec(*spec[:1], None, *spec[2:]))
    return acc.reshape(-1, *acc.shape[2:])


def _needs_rows(out: Any, path: str, ctx: ReduceContext) -> None:
    if len(out.shape) == 0:
        raise ValueError(
            f"Reduce.CONCAT needs outputs with a leading example axis, but leaf {path} is a "
            "scalar per micro-batch; use Reduce.STACK to stack scalars."
        )


def _sum_update(acc: jax.Array, x: jax.Array, ctx: ReduceContext) -> jax.Array:
    if jnp.issubdtype(acc.dtype, jnp.bool_):
        return acc | x.astype(jnp.bool_)
    return acc + x.astype(acc.dtype)


def _sum_combine(acc: jax.Array, ctx: ReduceContext) -> jax.Array:
    if jnp.issubdtype(acc.dtype, jnp.bool_):
        return _p_extreme(acc, ctx.axes, largest=True)
    return jax.lax.psum(acc, ctx.axes)


def _weigh(x: jax.Array, ctx: ReduceContext, dtype: Any) -> jax.Array:
    w = ctx.weight
    wide = jnp.promote_types(dtype, w.dtype)  # a float32 weight is not cast down first
    value = _parallel.times(x.astype(wide), w.astype(wide)).astype(dtype)
    return jnp.where(counts(w), value, jnp.zeros_like(value))


def _if_any_ran(acc: jax.Array, ctx: ReduceContext) -> jax.Array:
    """The extreme, or zeros when no micro-batch ran (early stop at 0)."""
    if isinstance(ctx.count, int) and ctx.count > 0:
        return acc
    return jnp.where(jnp.asarray(ctx.count) > 0, acc, jnp.zeros_like(acc))


def _concat_combine(acc: jax.Array, ctx: ReduceContext) -> jax.Array:
    """Every device's ``(k, n, ...)`` rows gathered so that ``_unsplit`` gives the global
    example order: the batch is sharded in blocks of examples, split per device."""
    if ctx.split == "contiguous":  # device d's micro-batches are one block: d-major
        return _parallel.gather(acc, ctx.axes, axis=0, tiled=True)
    # strided: local row i of micro-batch j is the device's example i*k + j; presplit:
    # the devices hold column blocks of every micro-batch. Both gather along the rows.
    return _parallel.gather(acc, ctx.axes, axis=1, tiled=True)


def _extreme_builtin(name: str, largest: bool) -> Reduction:
    op = jnp.maximum if largest else jnp.minimum
    return Reduction(
        init=lambda out, ctx: jnp.full(out.shape, _extreme(out.dtype, lowest=largest), out.dtype),
        update=lambda acc, x, ctx: op(acc, x.astype(acc.dtype)),
        finalize=_if_any_ran,
        aggregate=lambda v: (jnp.max if largest else jnp.min)(v, axis=0),
        combine=lambda acc, ctx: _p_extreme(acc, ctx.axes, largest),
        check=_real(name),
        name=name,
    )


BUILTIN: dict[Reduce, Reduction] = {
    Reduce.MEAN: Reduction(
        init=_zeros,
        update=lambda acc, x, ctx: acc + x.astype(acc.dtype),
        finalize=lambda acc, ctx: _cast(_divide(acc, ctx.count), ctx),
        aggregate=lambda v: jnp.mean(v, axis=0),
        combine=_psum,
        check=_need_float("MEAN"),
        name="MEAN",
    ),
    Reduce.WEIGHTED_MEAN: Reduction(
        init=_zeros,
        update=lambda acc, x, ctx: acc + _weigh(x, ctx, acc.dtype),
        finalize=lambda acc, ctx: _cast(_divide(acc, ctx.weight_sum), ctx),
        aggregate=lambda v: jnp.mean(v, axis=0),
        combine=_psum,
        check=_need_float("WEIGHTED_MEAN"),
        name="WEIGHTED_MEAN",
    ),
    Reduce.SUM: Reduction(
        init=_zeros,
        update=_sum_update,
        finalize=_cast,
        aggregate=lambda v: jnp.any(v, axis=0) if v.dtype == jnp.bool_ else jnp.sum(v, axis=0),
        combine=_sum_combine,
        name="SUM",
    ),
    Reduce.MAX: _extreme_builtin("MAX", largest=True),
    Reduce.MIN: _extreme_builtin("MIN", largest=False),
    Reduce.LAST: Reduction(
        init=lambda out, ctx: jnp.zeros(out.shape, out.dtype),
        update=lambda acc, x, ctx: x.astype(acc.dtype),
        finalize=lambda acc, ctx: acc,
        combine=lambda acc, ctx: _p_union(
            acc, None if ctx.weights is None else _last_weight(ctx), ctx.axes
        ),
        name="LAST",
    ),
    Reduce.STACK: Reduction(
        init=_stacked_init,
        update=_stacked_update,
        finalize=lambda acc, ctx: acc,
        combine=lambda acc, ctx: _p_union(acc, ctx.weights, ctx.axes),
        name="STACK",
    ),
    Reduce.CONCAT: Reduction(
        init=_stacked_init,
        update=_stacked_update,
        finalize=_unsplit,
        aggregate=lambda v: v.reshape(-1, *v.shape[2:]),
        combine=_concat_combine,
        check=_needs_rows,
        name="CONCAT",
    ),
}


LINEAR = (Reduce.MEAN, Reduce.WEIGHTED_MEAN, Reduce.SUM)
"""Built-ins that add up their outputs, so that they take ``unreduced`` values as they are."""

PER_STEP = (Reduce.MEAN, Reduce.WEIGHTED_MEAN, Reduce.SUM, Reduce.MAX, Reduce.MIN, Reduce.LAST)
"""Built-ins for which one micro-batch (k = 1) reduces to the step's own output."""


def _last_weight(ctx: ReduceContext) -> jax.Array:
    """The weight of the last micro-batch that ran on this device (0 if none ran)."""
    count = jnp.asarray(ctx.count)
    last = ctx.weights[jnp.clip(count - 1, 0, ctx.k - 1)]
    return jnp.where(count > 0, last, jnp.zeros_like(last))


def as_reduction(value: Any, argument: str = "reduce") -> Reduction | None:
    """A ``Reduce`` member, its string value, a ``Reduction``, or None (dtype default)."""
    if value is None or isinstance(value, Reduction):
        return value
    if isinstance(value, Reduce):
        return BUILTIN[value]
    try:
        return BUILTIN[Reduce(value)]
    except ValueError:
        valid = [r.value for r in Reduce]
        raise ValueError(
            f"unknown reduction {value!r} in {argument}=; use a jaxaccum.Reduce member, one of "
            f"{valid}, or a jaxaccum.Reduction."
        ) from None


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (Reduce, str, Reduction))


def spec_members(spec: Any, argument: str = "reduce") -> list[Reduction | None]:
    """Every reduction named in a ``reduce=`` spec (validated)."""
    return [as_reduction(x, argument) for x in jax.tree.leaves(spec, is_leaf=_is_spec_leaf)]


def per_leaf(spec: Any, tree: Any, argument: str, of: str) -> Any:
    """``tree``'s structure with the ``Reduction`` (or None) a prefix ``spec`` gives each leaf;
    ``argument`` names the spec and ``of`` the tree in the error for a spec that is no prefix.

    None stands for "not named" and stays a leaf of the result (``is_leaf=lambda x: x is
    None`` reads it back).
    """

    def expand(r: Any, sub: Any) -> Any:
        red = as_reduction(r, argument)
        return jax.tree.map(lambda _: red, sub)

    try:
        return jax.tree.map(expand, spec, tree, is_leaf=_is_spec_leaf)
    except ValueError as err:
        raise ValueError(
            f"{argument}= must be a prefix of {of} (a Reduce, a Reduction or None at each "
            f"node); {argument}={spec!r} does not match the output structure "
            f"{jax.tree.structure(tree)}."
        ) from err


def is_builtin(r: Reduction | None, *members: Reduce) -> bool:
    return r is not None and any(r is BUILTIN[m] for m in members)


def default_reduce(dtype: np.dtype, weighted: bool) -> Reduction:
    if jnp.issubdtype(dtype, jnp.inexact):
        return BUILTIN[Reduce.WEIGHTED_MEAN if weighted else Reduce.MEAN]
    if jnp.issubdtype(dtype, jnp.bool_):
        return BUILTIN[Reduce.MAX]
    return BUILTIN[Reduce.SUM]


def _check_leaf(r: Reduction, leaf: Any, path: str, ctx: ReduceContext) -> None:
    _checks.reducible(leaf, path)
    if r.check is not None:
        r.check(leaf, path, ctx._replace(out=leaf))


def resolve(spec: Any, out_shapes: Any, ctx: ReduceContext) -> Any:
    """A tree shaped like the outputs holding one checked ``Reduction`` per leaf: the one
    ``reduce=`` names, or its dtype's default."""
    named = per_leaf(spec, out_shapes, "reduce", "step_fn's output tree")
    tree = jax.tree.map(lambda s, r: r or default_reduce(s.dtype, ctx.weighted), out_shapes, named)
    is_r = lambda x: isinstance(x, Reduction)  # noqa: E731
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_r)
    for (path, r), leaf in zip(flat, jax.tree.leaves(out_shapes), strict=True):
        _check_leaf(r, leaf, "output" + jax.tree_util.keystr(path), ctx)
    return tree
