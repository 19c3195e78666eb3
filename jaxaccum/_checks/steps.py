"""What only a call shows: how ``step_fn`` returns carried state, the batch arguments of
``optax_compat``'s calls, the values ``multi_steps`` gets per call (a schedule's k, a weight,
a skip verdict), and the note added when a step fails with a batch argument left whole.

Values that are traced under ``jax.jit`` are checked by :func:`require`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum._checks.arguments import function
from jaxaccum._checks.trees import ARRAY_TYPES, returned_arrays

if TYPE_CHECKING:
    from jaxaccum._args import ArgRef, BoundCall


def unpack_state(result: Any, n: int) -> tuple[Any, tuple[Any, ...]]:
    """``step_fn``'s ``(outputs, new_state)`` with ``n`` carried arguments, the new states
    as a tuple."""
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError(
            "with carried arguments, step_fn must return (outputs, new_state); got "
            f"{type(result).__name__}."
        )
    out, new_state = result
    if n == 1:
        return out, (new_state,)
    if not (isinstance(new_state, tuple) and len(new_state) == n):
        raise ValueError(
            f"step_fn carries {n} arguments, so it must return (outputs, (state_1, ..., "
            f"state_{n})); got new_state of type {type(new_state).__name__}."
        )
    return out, new_state


def unsplit_hint(
    k: int,
    in_axes: tuple[int, ...],
    batches: Sequence[Any],
    call: BoundCall,
    plain: Sequence[ArgRef],
) -> str:
    """Names the arguments left whole (``plain``) that have the batch's leading size, if
    any: when the step fails, a forgotten batch argument (``loss(params, x, y)`` with only
    ``x`` split) is the likely cause. ``batches`` are the batch arguments' values."""
    axes = in_axes * len(batches) if len(in_axes) == 1 else in_axes
    sizes = {
        np.shape(leaf)[ax]
        for tree, ax in zip(batches, axes, strict=True)
        for leaf in jax.tree.leaves(tree)
        if np.ndim(leaf) > ax
    }
    if len(sizes) != 1:
        return ""
    (n,) = sizes
    whole = [
        ref
        for ref in plain
        if any(np.ndim(x) and np.shape(x)[0] == n for x in jax.tree.leaves(call.get(ref, "")))
    ]
    if not whole:
        return ""
    names = ", ".join(ref.describe("") for ref in whole)
    return (
        f"jaxaccum: step_fn failed on micro-batch 0 ({n // k} of the batch's {n} "
        f"examples). {names[0].upper()}{names[1:]} has leading size {n}, the batch's, but is not "
        "split: if it is part of the batch, list it in batch_argnums= (or batch_argnames=)."
    )


def accumulator(spec: Any, is_spec: Callable[[Any], bool]) -> None:
    """Raises unless every leaf of ``optax_compat``'s ``accumulator`` is an
    AccumulationType or Accumulator (what ``is_spec`` tells)."""
    leaves = jax.tree.leaves(spec, is_leaf=is_spec)
    bad = next((x for x in leaves if not is_spec(x)), None) if leaves else spec
    if bad is not None or not leaves:
        raise TypeError(
            "accumulator must be an optax.microbatching.AccumulationType member, an "
            "Accumulator record, or a pytree prefix of fun's outputs holding them, got "
            f"{bad!r}; e.g. accumulator=AccumulationType.MEAN."
        )


def compat_axes(in_axes: Any, allow_none: bool) -> tuple[Any, ...]:
    """``optax_compat``'s ``in_axes`` as a tuple: one int (or None, where ``allow_none``) or
    a sequence of them."""
    given = in_axes if isinstance(in_axes, Sequence) else (in_axes,)
    ok = [
        (allow_none and a is None)
        or (isinstance(a, (int, np.integer)) and not isinstance(a, bool) and a >= 0)
        for a in given
    ]
    if not given or not all(ok):
        also = " or None (not mapped)" if allow_none else ""
        raise ValueError(
            f"in_axes must be a non-negative int{also}, or a sequence of them (one per "
            f"argument), got {in_axes!r}."
        )
    return tuple(given)


def batch_size(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    nums: tuple[int, ...],
    names: tuple[str, ...],
    axes: tuple[Any, ...],
) -> int:
    """The one batch size of the batch arguments, each argument checked as it is found."""
    if len(axes) != len(nums) + len(names):
        raise ValueError(
            f"in_axes must be one int, or one per batch argument ({len(nums) + len(names)}: "
            f"argnums {list(nums)}, then argnames {list(names)}), got {len(axes)}."
        )
    for num in nums:
        if num >= len(args):
            raise ValueError(
                f"argnums={num} is out of range: the call passed {len(args)} positional "
                "argument(s); point argnums at the batch arguments' positions."
            )
    for name in names:
        if name not in kwargs:
            raise ValueError(
                f"argnames={name!r} was not passed by keyword (got {sorted(kwargs)}); pass it "
                "by name or list its position in argnums."
            )
    sizes = set()
    labels = [f"argument {i}" for i in nums] + list(names)
    batches = [args[i] for i in nums] + [kwargs[name] for name in names]
    for label, tree, ax in zip(labels, batches, axes, strict=True):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            if not isinstance(ax, int) or not 0 <= ax < np.ndim(leaf):
                raise ValueError(
                    f"in_axes={ax!r} for {label} does not name an axis of its leaf "
                    f"{label}{jax.tree_util.keystr(path)} of shape {np.shape(leaf)}; give "
                    "the example axis, an int in [0, ndim)."
                )
            sizes.add(np.shape(leaf)[ax])
    if len(sizes) != 1:
        raise ValueError(f"batch arguments must share one batch size, got {sorted(sizes)}.")
    return sizes.pop()


def microbatch_call(
    fun: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch: tuple[tuple[int, ...], tuple[str, ...], tuple[Any, ...]],
    microbatch_size: int,
) -> int:
    """``optax_compat.microbatch``'s call: ``fun`` takes it, and the batch arguments
    (``batch``: argnums, argnames, in_axes) share a batch size ``microbatch_size`` divides,
    which is returned."""
    nums, names, axes = batch
    function(fun, "fun", "fun(*args, **kwargs)", len(args), tuple(kwargs))
    n = batch_size(args, kwargs, nums, names, axes)
    if n % microbatch_size:
        raise ValueError(
            f"the batch size {n} of the batch arguments (argnums={list(nums)}, "
            f"argnames={list(names)}) is not divisible by microbatch_size="
            f"{microbatch_size}."
        )
    return n


def micro_vmap_call(
    fun: Any, args: tuple[Any, ...], kwargs: dict[str, Any], each: tuple[Any, ...], in_axes: Any
) -> list[int]:
    """``optax_compat.micro_vmap``'s call: ``fun`` takes it and ``in_axes`` (``each``: one
    entry per positional argument) fits it; returns the positions mapped."""
    function(fun, "fun", "fun(*examples)", len(args), tuple(kwargs))
    if len(each) != len(args):
        raise ValueError(
            f"in_axes has {len(each)} entries but the call passed {len(args)} positional "
            "argument(s); give one entry per positional argument (None: not mapped), "
            "as jax.vmap does."
        )
    mapped = [i for i, a in enumerate(each) if a is not None]
    if not mapped and not kwargs:
        raise ValueError(f"in_axes={in_axes!r} maps no argument; give one a batch axis.")
    return mapped


def micro_grad_call(
    fun: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch: tuple[int, ...],
    microbatch_size: int | None,
) -> None:
    """``optax_compat.micro_grad``'s call: the batch arguments (``batch``: their positions)
    are passed, ``fun`` takes the call, and ``microbatch_size`` divides their batch size."""
    if max(batch) >= len(args):
        raise ValueError(
            f"batch_argnums={list(batch)} is out of range: the call passed {len(args)} "
            "positional argument(s)."
        )
    function(fun, "fun", "fun(*args, **kwargs)", len(args), tuple(kwargs))
    n = batch_size(args, {}, batch, (), (0,) * len(batch))
    if microbatch_size is not None and n % microbatch_size:
        raise ValueError(
            f"the batch arguments (batch_argnums={list(batch)}) have {n} examples, not "
            f"divisible by microbatch_size={microbatch_size}."
        )


def fun_output(out: Any, has_aux: bool) -> Any:
    """``micro_grad``'s ``fun`` output as ``(value, aux)`` (aux None without ``has_aux``),
    checked to hold arrays."""
    if has_aux and not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"fun must return (value, aux) with has_aux=True, got {out!r}.")
    return returned_arrays(out if has_aux else (out, None), "fun", "output")


def _is_traced(*values: Any) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


def require(ok: Any, staged: bool, template: str, *values: Any) -> None:
    """Raises ``ValueError(template.format(*values))`` unless ``ok``.

    With concrete values it raises now. With a traced ``ok`` (under ``jax.jit``) and
    ``staged``, it stages a host callback that runs only when ``ok`` is False and raises
    there; the call then fails with ``jax.errors.JaxRuntimeError`` whose message holds
    the ``ValueError``'s. A program holding a host callback costs dispatch time on every
    call, so nothing is staged when ``ok`` is known at trace time.
    """
    if not _is_traced(ok) and bool(ok):
        return
    if _is_traced(ok) and not staged:
        return
    if not _is_traced(ok, *values):
        raise ValueError(template.format(*(np.asarray(v).item() for v in values)))

    def fail(ok: Any, *values: Any) -> None:
        if not np.all(ok):  # vmap runs both branches of a cond; check again here
            raise ValueError(template.format(*(np.asarray(v).item() for v in values)))

    jax.lax.cond(ok, lambda: None, lambda: jax.debug.callback(fail, ok, *values))


_K_BAD = (
    "every_k_schedule returned k={} at gradient_step={}; it must return a positive number "
    "of calls per update."
)


def calls_per_update(value: Any, step: jax.Array, staged: bool) -> Any:
    """What ``every_k_schedule(step)`` returned, as an int or an int32 scalar, if it is a
    positive integer scalar (checked by :func:`require` when traced and ``staged``)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        require(value >= 1, staged, _K_BAD, value, step)
        return int(value)
    k = jnp.asarray(value) if isinstance(value, ARRAY_TYPES) else None
    if k is None or k.shape != () or not jnp.issubdtype(k.dtype, jnp.integer):
        got = f"{value!r}" if k is None else f"shape {k.shape} dtype {k.dtype}"
        raise TypeError(
            f"every_k_schedule must return an integer scalar, got {got}; e.g. "
            "lambda step: jnp.where(step < 100, 2, 8), or cast a float "
            "schedule with .astype(jnp.int32)."
        )
    require(k >= 1, staged, _K_BAD, k, step)
    return k.astype(jnp.int32)


def call_weight(weight: Any, dtype: Any, staged: bool) -> jax.Array:
    """``multi_steps``' ``update(..., weight=)`` in ``dtype``, if it is one finite real
    scalar >= 0 (checked by :func:`require` when traced and ``staged``)."""
    w = jnp.asarray(weight)
    real = jnp.issubdtype(w.dtype, jnp.integer) or jnp.issubdtype(w.dtype, jnp.floating)
    if w.shape != () or not real:
        raise ValueError(
            f"weight must be one real scalar per call (e.g. the micro-batch's valid-token "
            f"count, mask.sum()), got shape {w.shape} dtype {w.dtype}."
        )
    require(
        (w >= 0) & jnp.isfinite(w),
        staged,
        "weight must be finite and >= 0 (a count of valid items), got weight={}.",
        w,
    )
    return w.astype(dtype)


def skip_verdict(verdict: Any) -> tuple[Any, Any]:
    """``should_skip_update_fn``'s ``(skip, skip_state)``, ``skip`` checked to be one bool."""
    if not (isinstance(verdict, tuple) and len(verdict) == 2):
        raise TypeError(
            f"should_skip_update_fn must return a pair (skip, skip_state), got {verdict!r}; "
            "e.g. return jnp.any(...), {} (optax.skip_not_finite returns such a pair)."
        )
    skip, skip_state = verdict
    skip = jnp.asarray(skip)
    if skip.shape != () or skip.dtype != jnp.bool_:
        raise TypeError(
            f"should_skip_update_fn must return (bool scalar, skip_state), got a first "
            f"element of shape {skip.shape} dtype {skip.dtype}; e.g. optax.skip_not_finite, "
            "or return jnp.any(...) of your test."
        )
    return skip, skip_state
