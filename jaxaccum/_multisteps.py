"""Accumulation across calls: one micro-batch per call, around an Optax optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaccum import _checks, _equinox, _reduce

SCOPE = "jaxaccum.multi_steps"


class MultiStepsState(NamedTuple):
    """State of :func:`multi_steps`.

    The first five fields have the names, order and meaning of
    ``optax.MultiStepsState``'s, so code that reads ``state.gradient_step`` or looks into
    ``state.inner_opt_state`` (for example ``optax.tree.get(state, "count")``) works
    unchanged. Unlike optax's, ``acc_grads`` holds a weighted sum, not a running mean;
    :meth:`from_optax` converts an optax state (a restored checkpoint) in one call.

    Attributes:
      mini_step: calls accumulated in the current window (int32, from 0 to k - 1). Calls
        of weight 0 and skipped calls do not count.
      gradient_step: inner optimizer updates applied so far (int32). ``every_k_schedule``
        is called with it, and the inner optimizer's own counters (its learning-rate
        schedule) also advance once per update, never once per call.
      inner_opt_state: the wrapped optimizer's state.
      acc_grads: ``sum_i w_i g_i`` over the window's calls, shaped like the params, in
        ``accum_dtype`` (promoted with each param's dtype; the params' dtype for None).
      skip_state: what ``should_skip_update_fn`` returned for the last call (``()``
        without one).
      acc_weight: ``sum_i w_i`` over the window (float32 scalar); without weights, the
        number of calls.
      emitted: whether the call that returned this state applied an update (bool scalar;
        False after ``init``).
    """

    mini_step: jax.Array
    gradient_step: jax.Array
    inner_opt_state: Any
    acc_grads: Any
    skip_state: Any
    acc_weight: jax.Array
    emitted: jax.Array

    @classmethod
    def from_optax(cls, state: Any, *, use_grad_mean: bool = True) -> MultiStepsState:
        """This state from an ``optax.MultiStepsState`` (e.g. a restored checkpoint).

        optax keeps the running mean of the window's ``mini_step`` gradients (their sum
        with ``use_grad_mean=False``); this state keeps their sum and count, so training
        resumed with :func:`multi_steps` on the same inner optimizer continues the
        window where optax left it. Give :func:`multi_steps` the same
        ``should_skip_update_fn`` (its ``skip_state`` is kept) and ``use_grad_mean``;
        ``acc_grads`` keep optax's accumulator dtype (float32 by default, as here).

        Args:
          state: an ``optax.MultiStepsState``, or anything with its five fields.
          use_grad_mean: what the ``optax.MultiSteps`` that made it was given.

        Returns:
          The equivalent :class:`MultiStepsState` (weights 1 per call); a
          :class:`MultiStepsState` is returned as it is.

        Raises:
          TypeError: for a ``state`` without the five fields of ``optax.MultiStepsState``.

        Examples:
          >>> import jax.numpy as jnp, optax, jaxaccum
          >>> theirs = optax.MultiSteps(optax.sgd(1.0), 4)
          >>> params, state = jnp.zeros(2), theirs.init(jnp.zeros(2))
          >>> for g in ([1.0, 0.0], [3.0, 2.0]):
          ...     _, state = theirs.update(jnp.array(g), state, params)
          >>> ours = jaxaccum.MultiStepsState.from_optax(state)
          >>> ours.acc_grads.tolist(), float(ours.acc_weight)
          ([4.0, 2.0], 2.0)
        """
        if isinstance(state, cls):  # already this state: its sums are not means
            return state
        fields = ("mini_step", "gradient_step", "inner_opt_state", "acc_grads")
        if not all(hasattr(state, f) for f in fields):
            raise TypeError(
                "from_optax(state) needs the optax.MultiStepsState that optax.MultiSteps' "
                f"init or update returned (fields {', '.join(fields)}, skip_state), got "
                f"{type(state).__name__}."
            )
        mini = jnp.asarray(state.mini_step, jnp.int32)
        step = jnp.asarray(state.gradient_step, jnp.int32)
        count = mini.astype(_reduce.weight_dtype(None, jax.tree.leaves(state.acc_grads)))
        acc = state.acc_grads
        if use_grad_mean:
            acc = jax.tree.map(lambda a: (a * count.astype(a.dtype)).astype(a.dtype), acc)
        return cls(
            mini_step=mini,
            gradient_step=step,
            inner_opt_state=state.inner_opt_state,
            acc_grads=acc,
            skip_state=getattr(state, "skip_state", ()),
            acc_weight=count,
            emitted=(mini == 0) & (step > 0),
        )


def _calls_per_update(
    schedule: int | Callable[[jax.Array], Any], step: jax.Array, staged: bool
) -> Any:
    if isinstance(schedule, int):
        return schedule
    return _checks.calls_per_update(schedule(step), step, staged)


def _zeros_acc(p: Any, accum: np.dtype | None) -> jax.Array:
    dtype = jnp.asarray(p).dtype
    if accum is None:
        return jnp.zeros(jnp.shape(p), dtype)
    acc = jnp.promote_types(dtype, accum) if jnp.issubdtype(dtype, jnp.inexact) else accum
    return jnp.zeros(jnp.shape(p), acc)


def _init(inner: Any, params: Any, accum: np.dtype | None, skip_fn: Any) -> MultiStepsState:
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


def _close(
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


def _no_skip(updates: Any, gradient_step: Any, params: Any) -> tuple[jax.Array, Any]:
    return jnp.zeros((), jnp.bool_), ()


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
    inner = _as_inner(optimizer)
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
    skip_fn = should_skip_update_fn or _no_skip

    def init(params: Any) -> MultiStepsState:
        return _init(
            inner, _checks.given_arrays(_equinox.trained(params), "params"), accum, skip_fn
        )

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
        with jax.named_scope(SCOPE):
            k = _calls_per_update(schedule, state.gradient_step, runtime_checks)
            skip, skip_state = _checks.skip_verdict(skip_fn(grads, state.gradient_step, params))
            if weight is None:
                w = jnp.ones((), state.acc_weight.dtype)
                counts = ~skip
            else:
                w = _checks.call_weight(weight, state.acc_weight.dtype, runtime_checks)
                counts = ~skip & (w > 0)

            def add(a: jax.Array, g: Any) -> jax.Array:
                g = jnp.asarray(g)
                if weight is not None:  # w*g before any cast down
                    wide = jnp.promote_types(a.dtype, w.dtype)
                    g = g.astype(wide) * w.astype(wide)
                return jnp.where(counts, a + g.astype(a.dtype), a)

            acc = jax.tree.map(add, state.acc_grads, grads)
            mini_step = state.mini_step + counts.astype(jnp.int32)
            window = state._replace(
                mini_step=mini_step,
                acc_grads=acc,
                skip_state=skip_state,
                acc_weight=state.acc_weight + jnp.where(counts, w, 0),
            )
            dtypes = jax.tree.map(lambda g: jnp.asarray(g).dtype, grads)
            return _close(
                inner, window, counts & (mini_step >= k), dtypes, params, extra_args, use_grad_mean
            )

    transform = MultiStepsTransformation(init, update)
    transform.inner, transform.use_grad_mean = optimizer, use_grad_mean
    return transform


class MultiStepsTransformation(optax.GradientTransformationExtraArgs):  # type: ignore[misc]
    """What :func:`multi_steps` returns: an Optax transformation that knows its inner one.

    It also answers ``optax.MultiSteps``' calls: :meth:`has_updated`,
    :meth:`gradient_transformation` and :attr:`inner_opt`.

    Attributes:
      inner: the wrapped optimizer.
      use_grad_mean: whether windows apply their mean (True) or sum (False).
    """

    inner: optax.GradientTransformation
    use_grad_mean: bool

    def flush(self, state: MultiStepsState, params: Any = None, **extra_args: Any) -> Any:
        """:func:`flush` with this transformation."""
        return flush(self, state, params, **extra_args)

    @property
    def inner_opt(self) -> optax.GradientTransformation:
        """The wrapped optimizer, under ``optax.MultiSteps``' attribute name."""
        return self.inner

    def has_updated(self, state: MultiStepsState) -> jax.Array:
        """Whether the call that returned ``state`` applied the inner update.

        ``optax.MultiSteps``' method, read from ``state.emitted``: unlike optax's
        ``mini_step == 0 and gradient_step > 0``, it stays False after a call of weight 0
        or a skipped call that follows an update.

        Example:
          >>> import jax.numpy as jnp, optax, jaxaccum
          >>> opt = jaxaccum.multi_steps(optax.sgd(1.0), every_k_schedule=2)
          >>> state = opt.init(jnp.zeros(2))
          >>> for _ in range(2):
          ...     _, state = opt.update(jnp.ones(2), state)
          ...     print(bool(opt.has_updated(state)))
          False
          True
        """
        if not isinstance(state, MultiStepsState):
            raise TypeError(
                "state must be the MultiStepsState this transformation's init or update "
                f"returned, got {type(state).__name__}; convert an optax state with "
                "MultiStepsState.from_optax."
            )
        return state.emitted

    def gradient_transformation(self) -> MultiStepsTransformation:
        """``optax.MultiSteps``' method: the transformation itself, already an Optax one."""
        return self


def _as_inner(optimizer: Any) -> Any:
    _checks.optimizer(optimizer, "optimizer")
    return optax.with_extra_args_support(optimizer)


def flush(
    optimizer: optax.GradientTransformation,
    state: MultiStepsState,
    params: Any = None,
    **extra_args: Any,
) -> tuple[Any, MultiStepsState]:
    """Applies the inner optimizer to a partial window now, dividing by its real weight.

    For the remainder at the end of the data: after m < k calls, the update is the
    inner optimizer's on ``sum_i w_i g_i / sum_i w_i`` over those m calls (without
    weights, the sum divided by m, not k), as a whole step on their examples would be.
    The window then closes as at its k-th call: ``mini_step`` 0, ``gradient_step`` + 1,
    ``emitted`` True. With the transformation itself, a window-sum one
    (``use_grad_mean=False``) applies the partial window's sum.

    Args:
      optimizer: the transformation :func:`multi_steps` returned (its window sum or mean
        setting is used), or the inner optimizer given to it (a mean is applied).
      state: the :class:`MultiStepsState` after the window's last call.
      params: the current params, if the inner optimizer needs them. The mean gradient
        is cast to their dtypes (to ``state.acc_grads``'s, without params).
      **extra_args: passed to the inner optimizer's ``update``.

    Returns:
      ``(updates, new_state)``.

    Raises:
      ValueError: with a concrete state, when nothing is accumulated (``mini_step`` is
        0: no call since the last update). Under ``jax.jit`` the state is traced, and
        such a flush is a no-op instead: zero updates, the state unchanged apart from
        ``emitted``, which is False. Also for a state that does not fit ``optimizer``
        or ``params`` (as in ``update``).
      TypeError: for a non-Optax ``optimizer`` or a state that is not a
        :class:`MultiStepsState`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import jaxaccum
      >>> inner = optax.sgd(1.0)
      >>> opt, params = jaxaccum.multi_steps(inner, every_k_schedule=4), jnp.zeros(2)
      >>> state = opt.init(params)
      >>> for g in ([1.0, 0.0], [0.0, 2.0], [2.0, 4.0]):
      ...     _, state = opt.update(jnp.array(g), state, params)
      >>> updates, state = jaxaccum.flush(inner, state, params)
      >>> updates.tolist(), bool(state.emitted), int(state.mini_step)  # mean of 3 calls
      ([-1.0, -2.0], True, 0)
      >>> jaxaccum.flush(inner, state, params)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: flush: nothing accumulated since the last update (mini_step=0)...
    """
    mean = True
    if isinstance(optimizer, MultiStepsTransformation):
        optimizer, mean = optimizer.inner, optimizer.use_grad_mean
    inner = _as_inner(optimizer)
    params = _equinox.trained(params)
    like = getattr(state, "acc_grads", None) if params is None else params
    source = "the params" if params is not None else "state.acc_grads"
    _checks.multi_steps_state(state, MultiStepsState, inner, like, source)
    _checks.flush_window(state.mini_step)
    dtypes = jax.tree.map(lambda x: jnp.asarray(x).dtype, like)
    with jax.named_scope(SCOPE):
        return _close(inner, state, state.mini_step > 0, dtypes, params, extra_args, mean)
