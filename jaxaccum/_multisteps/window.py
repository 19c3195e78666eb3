"""The window's arithmetic: the empty window, a call added to it, and its close.

A window holds the weighted sum of the gradients of the calls since the last update and the
sum of their weights. Closing it divides once and runs the inner optimizer on the result, in
the one branch of a ``jax.lax.cond`` taken on applying calls only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaccum import _checks, _reduce
from jaxaccum._multisteps.state import MultiStepsState

SCOPE = "jaxaccum.multi_steps"


def as_inner(optimizer: Any) -> Any:
    """The inner optimizer, checked, taking extra keyword arguments in ``update``."""
    _checks.optimizer(optimizer, "optimizer")
    return optax.with_extra_args_support(optimizer)


def no_skip(updates: Any, gradient_step: Any, params: Any) -> tuple[jax.Array, Any]:
    """The ``should_skip_update_fn`` used without one: never skips, keeps ``()``."""
    return jnp.zeros((), jnp.bool_), ()


def calls_per_update(
    schedule: int | Callable[[jax.Array], Any], step: jax.Array, staged: bool
) -> Any:
    """The window's length k after ``step`` updates, checked (under ``jax.jit`` if ``staged``)."""
    if isinstance(schedule, int):
        return schedule
    return _checks.calls_per_update(schedule(step), step, staged)


def _zeros_acc(p: Any, accum: np.dtype | None) -> jax.Array:
    dtype = jnp.asarray(p).dtype
    if accum is None:
        return jnp.zeros(jnp.shape(p), dtype)
    acc = jnp.promote_types(dtype, accum) if jnp.issubdtype(dtype, jnp.inexact) else accum
    return jnp.zeros(jnp.shape(p), acc)


def init(inner: Any, params: Any, accum: np.dtype | None, skip_fn: Any) -> MultiStepsState:
    """The state before the first call: empty window, the inner optimizer's initial state."""
    step = jnp.zeros((), jnp.int32)
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.asarray(p).dtype), params)
    leaves = jax.eval_shape(lambda: jax.tree.leaves(params))
    return MultiStepsState(
        mini_step=jnp.zeros((), jnp.int32),
        gradient_step=step,
        inner_opt_state=inner.init(params),
        acc_grads=jax.tree.map(lambda p: _zeros_acc(p, accum), params),
        skip_state=_checks.skip_verdict(skip_fn(zeros, step, params))[1],
        acc_weight=jnp.zeros((), _reduce.weight_dtype(accum, leaves)),
        emitted=jnp.zeros((), jnp.bool_),
    )


def add(
    state: MultiStepsState,
    grads: Any,
    weight: Any,
    skip: jax.Array,
    skip_state: Any,
    runtime_checks: bool,
) -> tuple[MultiStepsState, jax.Array]:
    """The window with one call's ``w * grads`` and ``w`` added, and whether the call counts.

    ``weight`` None weighs the call 1. A skipped call or one of weight 0 adds nothing and
    does not count; ``skip_state`` is kept either way.
    """
    if weight is None:
        w = jnp.ones((), state.acc_weight.dtype)
        counts = ~skip
    else:
        w = _checks.call_weight(weight, state.acc_weight.dtype, runtime_checks)
        counts = ~skip & (w > 0)

    def one(a: jax.Array, g: Any) -> jax.Array:
        g = jnp.asarray(g)
        if weight is not None:  # w*g before any cast down
            wide = jnp.promote_types(a.dtype, w.dtype)
            g = g.astype(wide) * w.astype(wide)
        return jnp.where(counts, a + g.astype(a.dtype), a)

    window = state._replace(
        mini_step=state.mini_step + counts.astype(jnp.int32),
        acc_grads=jax.tree.map(one, state.acc_grads, grads),
        skip_state=skip_state,
        acc_weight=state.acc_weight + jnp.where(counts, w, 0),
    )
    return window, counts


def close(
    inner: Any,
    state: MultiStepsState,
    close: jax.Array,
    dtypes: Any,
    params: Any,
    extra_args: dict[str, Any],
    mean: bool = True,
) -> tuple[Any, MultiStepsState]:
    """Applies the inner optimizer to the window's mean (or sum) if ``close``.

    ``dtypes`` gives, per leaf, the dtype the window's gradient is cast to. Only the
    branch taken runs: the inner update is computed on applying calls alone.
    """
    apply = close & (state.acc_weight > 0)

    def window_update() -> tuple[Any, Any]:
        if mean:
            grads = jax.tree.map(
                lambda a, d: _reduce.weighted(a, state.acc_weight, d), state.acc_grads, dtypes
            )
        else:
            grads = jax.tree.map(lambda a, d: a.astype(d), state.acc_grads, dtypes)
        return inner.update(grads, state.inner_opt_state, params, **extra_args)

    def apply_update() -> tuple[Any, Any]:
        updates, new_inner = window_update()
        cast = lambda n, o: jnp.asarray(n).astype(o.dtype)  # noqa: E731
        return updates, jax.tree.map(cast, new_inner, state.inner_opt_state)

    def hold() -> tuple[Any, Any]:
        shapes = jax.eval_shape(window_update)[0]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), state.inner_opt_state

    # Only the inner update sits in the cond; the window's sums are reset with a select
    # that fuses with the accumulation, which keeps XLA from copying them in a branch.
    updates, inner_state = jax.lax.cond(apply, apply_update, hold)
    step = state.gradient_step
    new_state = state._replace(
        mini_step=jnp.where(close, 0, state.mini_step).astype(jnp.int32),
        gradient_step=jnp.where(apply, optax.safe_increment(step), step).astype(step.dtype),
        inner_opt_state=inner_state,
        acc_grads=jax.tree.map(lambda a: jnp.where(close, jnp.zeros_like(a), a), state.acc_grads),
        acc_weight=jnp.where(close, jnp.zeros_like(state.acc_weight), state.acc_weight),
        emitted=apply,
    )
    return updates, new_state
