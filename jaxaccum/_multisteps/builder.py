"""The builder :func:`jaxaccum.multi_steps`: options checked once, ``init`` and ``update``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxaccum import _checks, _equinox
from jaxaccum._multisteps import window as _window
from jaxaccum._multisteps.state import MultiStepsState
from jaxaccum._multisteps.transformation import MultiStepsTransformation


def multi_steps(
    optimizer: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], Any],
    *,
    accum_dtype: Any = jnp.float32,
    use_grad_mean: bool = True,
    should_skip_update_fn: Callable[..., Any] | None = None,
    runtime_checks: bool = True,
) -> MultiStepsTransformation:
    """Accumulates gradients over calls and applies ``optimizer`` once every k calls.

    For data that arrives one micro-batch per call. Each call adds ``w_i g_i`` and
    ``w_i`` to float32 running sums; the k-th call divides once and runs the inner
    update on ``sum_i w_i g_i / sum_i w_i``, the arithmetic of
    ``jaxaccum.accumulate(..., weight_fn=...)``, so k calls give what one in-step call
    on the k micro-batches gives. Without weights ``w_i = 1``: the plain mean, like
    ``optax.MultiSteps``. With per-call weights (valid-token counts) it is the exact
    token mean across calls, which ``optax.MultiSteps`` cannot give: it averages calls
    equally. A call of weight 0 adds nothing, even a NaN gradient, and does not count
    as one of the window's k calls (``mini_step`` stays), so a window always holds k
    calls with data; a call skipped by ``should_skip_update_fn`` does not count either.

    The inner update sits in a ``jax.lax.cond`` branch and runs on applying calls only
    (``optax.MultiSteps`` computes it on every call and masks it); the other calls
    return zero updates. (Under ``jax.vmap`` with a batched state, JAX runs both
    branches and selects, as for any cond.) ``state.emitted`` tells whether a call
    applied an update. Donate the
    state to the jitted step (``donate_argnums``) so that a non-emitting call updates
    the sums in place and leaves the inner state's buffers alone.

    The params may be an Equinox module: ``init(model)`` and ``update(grads, state,
    model)`` take its inexact arrays, as ``eqx.filter(model, eqx.is_inexact_array)``
    selects (the gradients of ``eqx.filter_grad``), and the updates hold None elsewhere,
    ready for ``eqx.apply_updates(model, updates)``.

    Args:
      optimizer: the inner ``optax.GradientTransformation``; extra keyword arguments of
        ``update`` reach it on applying calls.
      every_k_schedule: calls per update: a positive int, or a function of
        ``state.gradient_step`` (the number of updates applied so far) returning an
        integer scalar, e.g. ``lambda step: jnp.where(step < 100, 2, 8)``.
      accum_dtype: dtype of the running sums, promoted with each param's dtype; None
        keeps each param's own dtype (optax's ``accumulator_dtype=None``).
      use_grad_mean: True (default) applies the window's (weighted) mean; False its sum
        ``sum_i w_i g_i`` (``sum_i g_i`` without weights), as ``optax.MultiSteps``'s
        ``use_grad_mean=False``.
      should_skip_update_fn: ``(grads, gradient_step, params) -> (skip, skip_state)``
        with ``skip`` a bool scalar, e.g. ``optax.skip_not_finite`` or
        ``functools.partial(optax.skip_large_updates, max_squared_norm=...)``. A skipped
        call is as if it never happened (zero updates, the window unchanged), except
        that ``state.skip_state`` holds what the function returned.
      runtime_checks: check traced schedule values and weights under ``jax.jit`` with a
        host callback (see Raises). A program holding a callback costs extra dispatch
        time on every call (see ``python -m benchmarks multisteps``); with False nothing
        is staged and bad traced values go unreported: a negative or NaN weight counts
        as 0, and a k below 1 as 1. Concrete values are always checked.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (with ``.inner``, the wrapped
      optimizer, and ``.flush``, see :func:`flush`). ``init(params)`` gives a
      :class:`MultiStepsState`; ``update(grads, state, params=None, *, weight=None,
      **extra_args)`` gives ``(updates, new_state)``, with ``updates`` in the gradients'
      dtypes. ``weight`` is this call's scalar weight ``w_i >= 0`` (default 1).

    Raises:
      ValueError: for a bad ``every_k_schedule`` or ``accum_dtype``; in ``update``, for a
        non-scalar weight or a state whose structure or shapes do not fit the gradients
        or the inner optimizer (at trace time); for a schedule value < 1 or a negative or
        non-finite weight, at once when the value is concrete. Under ``jax.jit`` such a
        value fails the call with ``jax.errors.JaxRuntimeError`` carrying the same
        message, raised from a host callback that runs only when the value is bad (with
        asynchronous dispatch, possibly when the result is first read).
      TypeError: for a non-Optax ``optimizer``; in ``update``, for a state that is not a
        :class:`MultiStepsState` (e.g. ``optax.MultiSteps``'s) or a schedule returning
        something other than an integer scalar.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxaccum
      >>> opt = jaxaccum.multi_steps(optax.sgd(1.0), every_k_schedule=2)
      >>> params = jnp.zeros(2)
      >>> state = opt.init(params)
      >>> step = jax.jit(lambda g, s, w: opt.update(g, s, params, weight=w))
      >>> updates, state = step(jnp.array([1.0, 0.0]), state, 1.0)
      >>> bool(state.emitted), updates.tolist()
      (False, [0.0, 0.0])
      >>> updates, state = step(jnp.array([0.0, 4.0]), state, 3.0)
      >>> bool(state.emitted), updates.tolist()  # -(1 * [1, 0] + 3 * [0, 4]) / (1 + 3)
      (True, [-0.25, -3.0])
      >>> int(state.gradient_step), int(state.mini_step)
      (1, 0)

      A schedule of the update count: two calls per update for the first two updates,
      then four.

      >>> opt = jaxaccum.multi_steps(optax.sgd(1.0), lambda step: jnp.where(step < 2, 2, 4))
      >>> state, emitted = opt.init(params), []
      >>> for _ in range(8):
      ...     _, state = opt.update(jnp.ones(2), state, params)
      ...     emitted.append(int(state.emitted))
      >>> emitted
      [0, 1, 0, 1, 0, 0, 0, 1]

      Bad values are reported with the fix; concrete ones at once, traced ones (under
      ``jax.jit``) by a host callback unless ``runtime_checks=False``. The running sums
      are float32 unless ``accum_dtype`` says otherwise.

      >>> opt = jaxaccum.multi_steps(optax.sgd(1.0), 2, accum_dtype=jnp.float32)
      >>> opt.update(jnp.ones(2), opt.init(params), params, weight=-1.0)
      Traceback (most recent call last):
      ...
      ValueError: weight must be finite and >= 0 (a count of valid items), got weight=-1.0.
      >>> opt.init(jnp.zeros(2, jnp.bfloat16)).acc_grads.dtype
      dtype('float32')
    """
    inner = _window.as_inner(optimizer)
    schedule = _checks.schedule(every_k_schedule)
    accum = _checks.check_accum_dtype(accum_dtype)
    _checks.flag(use_grad_mean, "use_grad_mean")
    _checks.flag(runtime_checks, "runtime_checks")
    if should_skip_update_fn is not None:
        _checks.function(
            should_skip_update_fn,
            "should_skip_update_fn",
            "should_skip_update_fn(grads, gradient_step, params) -> (skip, skip_state)",
            3,
            fix="e.g. optax.skip_not_finite.",
        )
    skip_fn = should_skip_update_fn or _window.no_skip

    def init(params: Any) -> MultiStepsState:
        params = _checks.given_arrays(_equinox.trained(params), "params")
        return _window.init(inner, params, accum, skip_fn)

    def update(
        grads: Any,
        state: MultiStepsState,
        params: Any = None,
        *,
        weight: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, MultiStepsState]:
        grads, params = _equinox.trained(grads), _equinox.trained(params)
        _checks.multi_steps_state(
            state, MultiStepsState, inner, grads, "updates (the gradients)", params
        )
        with jax.named_scope(_window.SCOPE):
            k = _window.calls_per_update(schedule, state.gradient_step, runtime_checks)
            skip, skip_state = _checks.skip_verdict(skip_fn(grads, state.gradient_step, params))
            window, counts = _window.add(state, grads, weight, skip, skip_state, runtime_checks)
            dtypes = jax.tree.map(lambda g: jnp.asarray(g).dtype, grads)
            close = counts & (window.mini_step >= k)
            return _window.close(inner, window, close, dtypes, params, extra_args, use_grad_mean)

    transform = MultiStepsTransformation(init, update)
    transform.inner, transform.use_grad_mean = optimizer, use_grad_mean
    return transform
