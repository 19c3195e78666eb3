"""optax's ``microbatch`` and ``MultiSteps`` with optax's signatures, on jaxaccum.

A drop-in path for code written against ``optax.microbatching`` and
``optax.MultiSteps``: change the import, keep the calls. Every function here is a thin
layer over :func:`jaxaccum.accumulate` and :func:`jaxaccum.multi_steps`; the enums,
``Accumulator`` records and ``MultiStepsState`` are optax's own objects, so values made
with optax (an ``AccumulationType``, a user's ``Accumulator``, a restored
``optax.MultiStepsState`` checkpoint) work here unchanged. optax's own test modules for
both transforms run against this module in jaxaccum's test suite
(``tests/test_optax_suites.py``).

What differs from optax, on purpose:

* floating sums are accumulated in float32 (at least) and cast back once, so a bf16
  SUM is as exact as jaxaccum's; the result keeps the output's dtype;
* a user's ``Accumulator`` is applied leaf by leaf (optax's built-in accumulators are
  too; one that couples the leaves of a subtree is not supported);
* ``MultiSteps`` runs the inner optimizer only on the calls that apply it, where
  optax computes it on every call and masks the result;
* optax's ``reshape_batch_axis`` helper is not provided: :func:`microbatch` splits the
  batch axis in place itself (``in_axes``), without copying the batch.

Examples:
  >>> import jax.numpy as jnp
  >>> from jaxaccum import optax_compat
  >>> fun = lambda x: (x + 1, jnp.sum(3 * x))
  >>> how = (optax_compat.AccumulationType.CONCAT, optax_compat.AccumulationType.SUM)
  >>> optax_compat.microbatch(fun, argnums=0, microbatch_size=2, accumulator=how)(
  ...     jnp.array([1, 2, 3, 4]))
  (Array([2, 3, 4, 5], dtype=int32), Array(30, dtype=int32))
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.microbatching

from jaxaccum import _args, _checks, _reduce
from jaxaccum._accumulate import accumulate
from jaxaccum._optax_multisteps import MultiSteps, skip_large_updates, skip_not_finite
from jaxaccum._reduce import LeafInfo, Reduce, Reduction

__all__ = [
    "AccumulationType",
    "Accumulator",
    "MultiSteps",
    "MultiStepsState",
    "ShouldSkipUpdateFunction",
    "micro_grad",
    "micro_vmap",
    "microbatch",
    "skip_large_updates",
    "skip_not_finite",
]

AccumulationType = optax.microbatching.AccumulationType
Accumulator = optax.microbatching.Accumulator
MultiStepsState = optax.MultiStepsState
ShouldSkipUpdateFunction = optax.ShouldSkipUpdateFunction
IndividualOutputs = collections.namedtuple("IndividualOutputs", ["values", "metrics", "aux"])
"""The auxiliary outputs of :func:`micro_grad`, one entry per example."""


def _floating_only(name: str) -> Callable[[LeafInfo, str], None]:
    def check(info: LeafInfo, path: str) -> None:
        if not jnp.issubdtype(info.out.dtype, jnp.floating):
            raise ValueError(
                f"AccumulationType.{name} needs floating outputs, but {path} has dtype "
                f"{info.out.dtype}; use AccumulationType.SUM for counts."
            )

    return check


def _mean_over_k(acc: jax.Array, info: LeafInfo, count: Any, weight_sum: Any) -> jax.Array:
    """optax's MEAN divides by the number of micro-batches even when fewer ran."""
    return (acc / info.k).astype(info.out.dtype)


_MEAN = dataclasses.replace(
    _reduce.BUILTIN[Reduce.MEAN], finalize=_mean_over_k, check=_floating_only("MEAN")
)
_RUNNING_MEAN = dataclasses.replace(
    _reduce.BUILTIN[Reduce.MEAN], check=_floating_only("RUNNING_MEAN"), name="RUNNING_MEAN"
)
_BY_TYPE: dict[Any, Reduction] = {
    AccumulationType.SUM: _reduce.BUILTIN[Reduce.SUM],
    AccumulationType.MEAN: _MEAN,
    AccumulationType.RUNNING_MEAN: _RUNNING_MEAN,
    AccumulationType.CONCAT: _reduce.BUILTIN[Reduce.CONCAT],
}
_AGGREGATE: dict[Any, Callable[[Any], Any]] = {
    AccumulationType.SUM: lambda v: jnp.sum(v, axis=0),
    AccumulationType.MEAN: lambda v: jnp.mean(v, axis=0),
    AccumulationType.RUNNING_MEAN: lambda v: jnp.mean(v, axis=0),
    AccumulationType.CONCAT: lambda v: v,
}


def _is_spec(x: Any) -> bool:
    return isinstance(x, (AccumulationType, Accumulator))


def _from_accumulator(acc: Any) -> Reduction:
    """An optax ``Accumulator`` record as a jaxaccum ``Reduction`` (leaf by leaf)."""
    return Reduction(
        init=lambda info: acc.init(info.out),
        update=lambda carry, x, index, weight: acc.update(carry, x, index),
        finalize=lambda carry, info, count, weight_sum: acc.finalize(carry),
        aggregate=acc.aggregate,
        name=f"Accumulator({acc.update})",
    )


def _reductions(accumulator: Any) -> Any:
    _checks.accumulator(accumulator, _is_spec)

    def one(spec: Any) -> Reduction:
        return _from_accumulator(spec) if isinstance(spec, Accumulator) else _BY_TYPE[spec]

    return jax.tree.map(one, accumulator, is_leaf=_is_spec)


def _aggregates(accumulator: Any) -> Any:
    _checks.accumulator(accumulator, _is_spec)

    def one(spec: Any) -> Callable[[Any], Any]:
        return spec.aggregate if isinstance(spec, Accumulator) else _AGGREGATE[spec]

    return jax.tree.map(one, accumulator, is_leaf=_is_spec)


def microbatch(
    fun: Callable[..., Any],
    argnums: int | Sequence[int],
    microbatch_size: int | None,
    accumulator: Any = AccumulationType.SUM,
    *,
    argnames: str | Sequence[str] = (),
    in_axes: int | Sequence[int] = 0,
    num_real_microbatches: int | jax.Array | None = None,
) -> Callable[..., Any]:
    """``optax.microbatch`` on :func:`jaxaccum.accumulate`.

    Splits the batch arguments into micro-batches of ``microbatch_size`` examples
    (strided, as optax does: micro-batch j holds examples j, j + k, …), runs ``fun``
    on each in one loop and combines the outputs as ``accumulator`` says.

    Args:
      fun: the function to run per micro-batch.
      argnums: positions of the batch arguments.
      microbatch_size: examples per micro-batch (must divide the batch); None returns
        ``fun`` itself.
      accumulator: an ``AccumulationType``, an ``Accumulator``, or a pytree prefix of
        ``fun``'s outputs holding them. SUM (default), MEAN (divided by the number of
        micro-batches), RUNNING_MEAN (divided by the number that ran), CONCAT (outputs
        concatenated along axis 0 in example order).
      argnames: names of batch arguments passed by keyword.
      in_axes: the example axis of each batch argument (``argnums`` then ``argnames``).
      num_real_microbatches: run only the first this many micro-batches (may be traced).

    Returns:
      A function with ``fun``'s signature.
    """
    _checks.function(fun, "fun", "fun(*args, **kwargs)")
    if microbatch_size is None:
        return fun
    microbatch_size = _checks.positive_int(
        microbatch_size, "microbatch_size", "examples per micro-batch, e.g. 8, or None"
    )
    nums = _args.as_tuple(argnums, "argnums", int)
    names = _args.as_tuple(argnames, "argnames", str)
    reduce = _reductions(accumulator)

    _checks.names_some((*nums, *names), "argnums and argnames")
    given_axes = _checks.compat_axes(in_axes, allow_none=False)

    def microbatched(*args: Any, **kwargs: Any) -> Any:
        axes = given_axes * (len(nums) + len(names)) if len(given_axes) == 1 else given_axes
        n = _checks.microbatch_call(fun, args, kwargs, (nums, names, axes), microbatch_size)
        run = accumulate(
            fun,
            n // microbatch_size,
            batch_argnums=nums,
            batch_argnames=names,
            in_axes=axes,
            reduce=reduce,
            num_real_microbatches=num_real_microbatches,
        )
        return run(*args, **kwargs)

    return microbatched


def micro_vmap(
    fun: Callable[..., Any],
    in_axes: int | Sequence[int | None] = 0,
    out_axes: Any = 0,
    *,
    microbatch_size: int | None = None,
    vmap_fn: Callable[..., Any] = jax.vmap,
    accumulator: Any = AccumulationType.CONCAT,
    num_real_microbatches: int | jax.Array | None = None,
) -> Callable[..., Any]:
    """``optax.microbatching.micro_vmap``: ``jax.vmap`` run a micro-batch at a time.

    Each micro-batch is vmapped and its per-example outputs reduced with the
    accumulator's aggregate (CONCAT keeps them); the micro-batches' results are then
    combined by :func:`microbatch`. Keyword arguments are mapped over axis 0.

    Args:
      fun: the per-example function.
      in_axes: the mapped axis of each positional argument (None: not mapped).
      out_axes: must be 0.
      microbatch_size: examples per micro-batch; None vmaps the whole batch at once.
      vmap_fn: a function with ``jax.vmap``'s signature.
      accumulator: as for :func:`microbatch`; CONCAT (default) gives ``jax.vmap``'s
        result.
      num_real_microbatches: as for :func:`microbatch`.

    Returns:
      The mapped function.
    """
    _checks.function(fun, "fun", "fun(*examples)")
    _checks.out_axes(out_axes)
    axes = _checks.compat_axes(in_axes, allow_none=True)
    aggregate = _aggregates(accumulator)

    def mapped_and_reduced(*args: Any, kwargs: dict[str, Any]) -> Any:
        each = axes if isinstance(in_axes, Sequence) else axes * len(args)
        out = vmap_fn(fun, each, out_axes)(*args, **kwargs)
        return jax.tree.map(lambda agg, v: jax.tree.map(agg, v), aggregate, out, is_leaf=callable)

    def call(*args: Any, **kwargs: Any) -> Any:
        each = axes if isinstance(in_axes, Sequence) else axes * len(args)
        mapped = _checks.micro_vmap_call(fun, args, kwargs, each, in_axes)
        run = microbatch(
            mapped_and_reduced,
            argnums=tuple(mapped),
            argnames="kwargs",
            microbatch_size=microbatch_size,
            accumulator=accumulator,
            in_axes=(*(each[i] for i in mapped), 0),
            num_real_microbatches=num_real_microbatches,
        )
        return run(*args, kwargs=kwargs)

    return call


def micro_grad(
    fun: Callable[..., Any],
    has_aux: bool = False,
    argnums: int | Sequence[int] = 0,
    *,
    batch_argnums: int | Sequence[int] = 1,
    keep_batch_dim: bool = True,
    microbatch_size: int | None = None,
    accumulator: Any = AccumulationType.SUM,
    transform_fn: Callable[[Any], Any] = lambda g: g,
    metrics_fn: Callable[[Any], Any] = lambda g: None,
    num_real_microbatches: int | jax.Array | None = None,
) -> Callable[..., Any]:
    """``optax.microbatching.micro_grad``: per-example gradients, transformed and reduced.

    Each example's gradient of ``fun`` is passed through ``transform_fn`` and reduced
    by ``accumulator`` over the batch; its value, ``metrics_fn`` of its gradient and
    its aux come back per example.

    Args:
      fun: the loss of one example (or of a batch of one, with ``keep_batch_dim``).
      has_aux: ``fun`` returns ``(loss, aux)``.
      argnums: the arguments to differentiate.
      batch_argnums: the arguments with a batch axis 0.
      keep_batch_dim: ``fun`` expects its batch arguments with a batch axis (of size 1).
      microbatch_size: examples per micro-batch (None: all at once).
      accumulator: how the transformed gradients are reduced over examples.
      transform_fn: applied to each example's gradient.
      metrics_fn: applied to each example's gradient, returned per example.
      num_real_microbatches: as for :func:`microbatch`.

    Returns:
      A function returning ``(reduced, IndividualOutputs(values, metrics, aux))``.
    """
    _checks.function(fun, "fun", "fun(*args)")
    if microbatch_size is not None:
        microbatch_size = _checks.positive_int(
            microbatch_size, "microbatch_size", "examples per micro-batch, e.g. 8, or None"
        )
    has_aux = _checks.flag(has_aux, "has_aux")
    keep_batch_dim = _checks.flag(keep_batch_dim, "keep_batch_dim")
    _checks.names_some(_args.as_tuple(argnums, "argnums", int), "argnums")
    batch = _args.as_tuple(batch_argnums, "batch_argnums", int)
    _checks.names_some(batch, "batch_argnums")

    def with_aux(*args: Any, **kwargs: Any) -> Any:
        return _checks.fun_output(fun(*args, **kwargs), has_aux)

    value_and_grad = jax.value_and_grad(with_aux, argnums, has_aux=True)

    def per_example(*args: Any, **kwargs: Any) -> Any:
        if keep_batch_dim:
            args = tuple(
                jax.tree.map(lambda x: jnp.expand_dims(x, 0), a) if i in batch else a
                for i, a in enumerate(args)
            )
        (value, aux), grad = value_and_grad(*args, **kwargs)
        return transform_fn(grad), IndividualOutputs(value, metrics_fn(grad), aux)

    _checks.accumulator(accumulator, _is_spec)

    def call(*args: Any, **kwargs: Any) -> Any:
        _checks.micro_grad_call(fun, args, kwargs, batch, microbatch_size)
        return micro_vmap(
            per_example,
            in_axes=[0 if i in batch else None for i in range(len(args))],
            accumulator=(accumulator, AccumulationType.CONCAT),
            microbatch_size=microbatch_size,
            num_real_microbatches=num_real_microbatches,
        )(*args, **kwargs)

    return call
