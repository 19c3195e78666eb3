"""How each output leaf of a step function is combined across micro-batches.

A reduction is a small record of functions (:class:`Reduction`), each given what its phase
needs: ``init(info)`` makes a carry from the leaf's :class:`LeafInfo`, ``update(carry,
value, index, weight)`` folds micro-batch ``index``'s output in, ``finalize(carry, info,
count, weight_sum)`` turns the carry into the result, and ``combine`` / ``aggregate`` say
how per-device results become one. The built-in reductions named by :class:`Reduce` are
records of the same protocol (:data:`BUILTIN`), made of the functions in
``_builtin_reductions``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum import _builtin_reductions, _checks, _options
from jaxaccum._builtin_reductions import accum_dtype as accum_dtype
from jaxaccum._builtin_reductions import counts as counts
from jaxaccum._builtin_reductions import weight_dtype as weight_dtype
from jaxaccum._builtin_reductions import weighted as weighted


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


class LeafInfo(NamedTuple):
    """What a :class:`Reduction` is told about the output leaf it reduces and the loop.

    Static, and the same in every phase that takes it.

    Attributes:
      out: the leaf's type for one micro-batch (``jax.ShapeDtypeStruct``).
      k: micro-batches per call.
      accum_dtype: dtype for running sums of floating leaves (None: the leaf's own).
      split: how the batch was split (``"strided"``, ``"contiguous"``, ``"presplit"``).
      weighted: whether a ``weight_fn`` gives micro-batch weights.
    """

    out: Any
    k: int
    accum_dtype: Any
    split: str
    weighted: bool


_PHASES = (  # each function of a Reduction, how the loop calls it, and its argument count
    ("init", "init(info)", 1),
    ("update", "update(carry, value, index, weight)", 4),
    ("finalize", "finalize(carry, info, count, weight_sum)", 4),
    ("aggregate", "aggregate(values)", 1),
    ("combine", "combine(carry, info, axes, count, weights)", 5),
    ("check", "check(info, path)", 2),
)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Reduction:
    """A reduction of one output leaf over micro-batches: a record of functions.

    The loop runs ``carry = init(info)``, then ``carry = update(carry, value, index,
    weight)`` for each micro-batch ``index`` that runs (``value`` its output leaf, ``weight``
    its weight, or None without ``weight_fn``), then returns ``finalize(carry, info, count,
    weight_sum)``. The carry is any pytree of arrays with a fixed type. ``info`` is the
    leaf's :class:`LeafInfo`. Give a ``Reduction`` anywhere ``reduce=`` takes a
    :class:`Reduce`; :meth:`builtin` gives the records the members name.

    Over devices (``data_axis=`` or ``axis_name=``): with ``combine``, each device's
    carry after its loop is combined over the data ``axes`` (inside ``shard_map``) and then
    finalized; without it, each device finalizes its own carry, the results are gathered
    on a new leading axis (one per device, in the batch's device order) and reduced by
    ``aggregate``.

    Attributes:
      init: ``(info) -> carry``, from the type of one micro-batch's output ``info.out``.
      update: ``(carry, value, index, weight) -> carry``; ``index`` is the micro-batch
        index (an int32 scalar, traced), ``weight`` its weight (a float scalar) or None.
      finalize: ``(carry, info, count, weight_sum) -> result``; ``count`` micro-batches
        ran (k unless the loop stopped early, then traced) and their positive weights sum
        to ``weight_sum`` (None without ``weight_fn``): over all devices after
        ``combine``, on this device when the results are aggregated.
      aggregate: ``(values) -> result``, reducing a leading axis of stacked results
        (e.g. ``lambda v: v.sum(0)``); needed over devices when ``combine`` is None.
      combine: ``(carry, info, axes, count, weights) -> carry``, combining the carries
        over the data ``axes``; ``count`` micro-batches ran on this device, ``weights``
        holds their weights, shape ``(k,)`` (0 for those that did not run), or is None
        without ``weight_fn``. Or None.
      check: ``(info, path) -> None``, raising ``TypeError``/``ValueError`` at trace time
        for an output leaf (``info.out``, at ``path``) the reduction does not fit; or None.
      name: shown in error messages.

    Examples:
      >>> import jax.numpy as jnp, jaxaccum
      >>> sum_sq = jaxaccum.Reduction(
      ...     init=lambda info: jnp.zeros(info.out.shape, jnp.float32),
      ...     update=lambda acc, x, index, weight: acc + x.astype(jnp.float32) ** 2,
      ...     finalize=lambda acc, info, count, weight_sum: jnp.sqrt(acc),
      ...     aggregate=lambda v: jnp.sqrt((v**2).sum(0)),
      ...     name="root_sum_squares")
      >>> f = jaxaccum.accumulate(lambda b: b.sum(), k=2, batch_argnums=0, reduce=sum_sq)
      >>> float(f(jnp.array([1.0, 2.0, 0.0, 2.0])))  # sqrt((1 + 0) ** 2 + (2 + 2) ** 2)
      4.123105525970459
    """

    init: Callable[[LeafInfo], Any]
    update: Callable[[Any, Any, Any, Any], Any]
    finalize: Callable[[Any, LeafInfo, Any, Any], Any]
    aggregate: Callable[[Any], Any] | None = None
    combine: Callable[[Any, LeafInfo, tuple[str, ...], Any, Any], Any] | None = None
    check: Callable[[LeafInfo, str], None] | None = None
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


BUILTIN: dict[Reduce, Reduction] = {
    Reduce.MEAN: Reduction(
        init=_builtin_reductions.zeros,
        update=_builtin_reductions.add,
        finalize=_builtin_reductions.mean,
        aggregate=lambda v: jnp.mean(v, axis=0),
        combine=_builtin_reductions.psum,
        check=_builtin_reductions.floating("MEAN"),
        name="MEAN",
    ),
    Reduce.WEIGHTED_MEAN: Reduction(
        init=_builtin_reductions.zeros,
        update=_builtin_reductions.add_weighted,
        finalize=_builtin_reductions.weighted_mean,
        aggregate=lambda v: jnp.mean(v, axis=0),
        combine=_builtin_reductions.psum,
        check=_builtin_reductions.floating("WEIGHTED_MEAN"),
        name="WEIGHTED_MEAN",
    ),
    Reduce.SUM: Reduction(
        init=_builtin_reductions.zeros,
        update=_builtin_reductions.add_or,
        finalize=_builtin_reductions.cast,
        aggregate=lambda v: jnp.any(v, axis=0) if v.dtype == jnp.bool_ else jnp.sum(v, axis=0),
        combine=_builtin_reductions.psum_or,
        name="SUM",
    ),
    Reduce.MAX: Reduction(
        init=_builtin_reductions.lowest,
        update=_builtin_reductions.maximum,
        finalize=_builtin_reductions.if_any_ran,
        aggregate=lambda v: jnp.max(v, axis=0),
        combine=_builtin_reductions.pmax,
        check=_builtin_reductions.real("MAX"),
        name="MAX",
    ),
    Reduce.MIN: Reduction(
        init=_builtin_reductions.highest,
        update=_builtin_reductions.minimum,
        finalize=_builtin_reductions.if_any_ran,
        aggregate=lambda v: jnp.min(v, axis=0),
        combine=_builtin_reductions.pmin,
        check=_builtin_reductions.real("MIN"),
        name="MIN",
    ),
    Reduce.LAST: Reduction(
        init=_builtin_reductions.like_out,
        update=_builtin_reductions.replace,
        finalize=_builtin_reductions.as_is,
        combine=_builtin_reductions.last_over_devices,
        name="LAST",
    ),
    Reduce.STACK: Reduction(
        init=_builtin_reductions.stacked,
        update=_builtin_reductions.put,
        finalize=_builtin_reductions.as_is,
        combine=_builtin_reductions.stack_over_devices,
        name="STACK",
    ),
    Reduce.CONCAT: Reduction(
        init=_builtin_reductions.stacked,
        update=_builtin_reductions.put,
        finalize=_builtin_reductions.unsplit,
        aggregate=lambda v: v.reshape(-1, *v.shape[2:]),
        combine=_builtin_reductions.concat_over_devices,
        check=_builtin_reductions.has_rows,
        name="CONCAT",
    ),
}
"""The record of each :class:`Reduce` member, written in the public protocol."""

LINEAR = (Reduce.MEAN, Reduce.WEIGHTED_MEAN, Reduce.SUM)
"""Built-ins that add up their outputs, so that they take ``unreduced`` values as they are."""

PER_STEP = (Reduce.MEAN, Reduce.WEIGHTED_MEAN, Reduce.SUM, Reduce.MAX, Reduce.MIN, Reduce.LAST)
"""Built-ins for which one micro-batch (k = 1) reduces to the step's own output."""


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


def _check_leaf(r: Reduction, info: LeafInfo, path: str) -> None:
    _checks.reducible(info.out, path)
    if r.check is not None:
        r.check(info, path)


def resolve(spec: Any, out_shapes: Any, loop: LeafInfo) -> Any:
    """A tree shaped like the outputs holding one checked ``Reduction`` per leaf: the one
    ``reduce=`` names, or its dtype's default. ``loop`` is the ``LeafInfo`` of every leaf
    but for its ``out``, each leaf's own type in ``out_shapes``."""
    named = per_leaf(spec, out_shapes, "reduce", "step_fn's output tree")
    tree = jax.tree.map(lambda s, r: r or default_reduce(s.dtype, loop.weighted), out_shapes, named)
    is_r = lambda x: isinstance(x, Reduction)  # noqa: E731
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_r)
    for (path, r), leaf in zip(flat, jax.tree.leaves(out_shapes), strict=True):
        _check_leaf(r, loop._replace(out=leaf), "output" + jax.tree_util.keystr(path))
    return tree
