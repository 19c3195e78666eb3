"""Accumulation across calls: one micro-batch per call, around an Optax optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaccum import _reduce, _split
from jaxaccum._accumulate import _check_accum_dtype
from jaxaccum._reduce import Reduce

SCOPE = "jaxaccum.multi_steps"
_K_BAD = (
    "every_k_schedule returned k={} at gradient_step={}; it must return a positive number "
    "of calls per update."
)


class MultiStepsState(NamedTuple):
    """State of :func:`multi_steps`.

    The first four fields have the names and meaning of ``optax.MultiStepsState``'s, so
    code that reads ``state.gradient_step`` or looks into ``state.inner_opt_state`` (for
    example ``optax.tree.get(state, "count")``) works unchanged. Unlike optax's,
    ``acc_grads`` holds a weighted sum, not a running mean, so the two states cannot be
    swapped.

    Attributes:
      mini_step: calls accumulated in the current window (int32, from 0 to k - 1).
      gradient_step: inner optimizer updates applied so far (int32). ``every_k_schedule``
        is called with it, and the inner optimizer's own counters (its learning-rate
        schedule) also advance once per update, never once per call.
      inner_opt_state: the wrapped optimizer's state.
      acc_grads: ``sum_i w_i g_i`` over the window's calls, shaped like the params, in
        ``accum_dtype`` (promoted with each param's dtype).
      acc_weight: ``sum_i w_i`` over the window (float32 scalar); without weights, the
        number of calls.
      emitted: whether the call that returned this state applied an update (bool scalar;
        False after ``init``).
    """

    mini_step: jax.Array
    gradient_step: jax.Array
    inner_opt_state: Any
    acc_grads: Any
    acc_weight: jax.Array
    emitted: jax.Array


def _is_traced(*values: Any) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


def _require(ok: Any, staged: bool, template: str, *values: Any) -> None:
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


def _as_schedule(every_k_schedule: Any) -> int | Callable[[jax.Array], Any]:
    """A constant k (validated) or the schedule function itself."""
    if callable(every_k_schedule):
        return every_k_schedule
    k = every_k_schedule
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(
            f"every_k_schedule must be a positive int (calls per update) or a function of "
            f"the update count returning one, got {k!r}; e.g. every_k_schedule=4."
        )
    return int(k)


def _calls_per_update(
    schedule: int | Callable[[jax.Array], Any], step: jax.Array, staged: bool
) -> Any:
    if isinstance(schedule, int):
        return schedule
    k = schedule(step)
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        _require(k >= 1, staged, _K_BAD, k, step)
        return int(k)
    k = jnp.asarray(k)
    if k.shape != () or not jnp.issubdtype(k.dtype, jnp.integer):
        raise TypeError(
            f"every_k_schedule must return an integer scalar, got shape {k.shape} dtype "
            f"{k.dtype}; e.g. lambda step: jnp.where(step < 100, 2, 8), or cast a float "
            "schedule with .astype(jnp.int32)."
        )
    _require(k >= 1, staged, _K_BAD, k, step)
    return k.astype(jnp.int32)


def _call_weight(weight: Any, dtype: Any, staged: bool) -> jax.Array:
    w = jnp.asarray(weight)
    real = jnp.issubdtype(w.dtype, jnp.integer) or jnp.issubdtype(w.dtype, jnp.floating)
    if w.shape != () or not real:
        raise ValueError(
            f"weight must be one real scalar per call (e.g. the micro-batch's valid-token "
            f"count, mask.sum()), got shape {w.shape} dtype {w.dtype}."
        )
    _require(
        (w >= 0) & jnp.isfinite(w),
        staged,
        "weight must be finite and >= 0 (a count of valid items), got weight={}.",
        w,
    )
    return w.astype(dtype)


def _zeros_acc(p: Any, accum: np.dtype) -> jax.Array:
    dtype = jnp.asarray(p).dtype
    acc = jnp.promote_types(dtype, accum) if jnp.issubdtype(dtype, jnp.inexact) else accum
    return jnp.zeros(jnp.shape(p), acc)


def _check_layout(name: str, actual: Any, expected: Any, source: str) -> None:
    """Raises if ``actual`` differs from ``expected`` in tree structure or leaf shapes."""
    s_actual: Any = jax.tree.structure(actual)
    s_expected: Any = jax.tree.structure(expected)
    if s_actual != s_expected:
        raise ValueError(
            f"mismatched optimizer state: state.{name} has structure\n  {s_actual}\nbut "
            f"{source} has\n  {s_expected}\nInitialise the state with the same inner "
            "optimizer and params: multi_steps(optimizer, k).init(params)."
        )
    changed = [
        f"{path}: {np.shape(a)} vs {np.shape(e)}"
        for path, a, e in _split.changed_leaves(actual, expected, f"state.{name}", dtypes=False)
    ]
    if changed:
        raise ValueError(
            f"mismatched optimizer state: leaf shapes differ from {source}: "
            + "; ".join(changed)
            + ". Initialise the state from the params being trained."
        )


def _check_state(state: Any, inner: Any, like_params: Any, source: str) -> None:
    """Raises unless ``state`` is a MultiStepsState for ``inner`` and these params."""
    if isinstance(state, optax.MultiStepsState):
        raise TypeError(
            "got an optax.MultiStepsState (from optax.MultiSteps); jaxaccum's multi_steps "
            "keeps a weighted sum and needs its own state: multi_steps(optimizer, k).init(params)."
        )
    if not isinstance(state, MultiStepsState):
        raise TypeError(
            "state must be the MultiStepsState from multi_steps(optimizer, k).init(params), "
            f"got {type(state).__name__}."
        )
    _check_layout("acc_grads", state.acc_grads, like_params, source)
    expected = jax.eval_shape(inner.init, like_params)
    _check_layout("inner_opt_state", state.inner_opt_state, expected, "optimizer.init(params)")


def _close(
    inner: Any,
    state: MultiStepsState,
    close: jax.Array,
    dtypes: Any,
    params: Any,
    extra_args: dict[str, Any],
) -> tuple[Any, MultiStepsState]:
    """Applies the inner optimizer to the window's mean if ``close`` and it has weight.

    ``dtypes`` gives, per leaf, the dtype the mean gradient is cast to. Only the branch
    taken runs: the inner update is computed on applying calls alone.
    """
    apply = close & (state.acc_weight > 0)

    def mean_update() -> tuple[Any, Any]:
        mean = jax.tree.map(
            lambda a, d: _reduce.finish(Reduce.WEIGHTED_MEAN, a, d, 1, state.acc_weight),
            state.acc_grads,
            dtypes,
        )
        return inner.update(mean, state.inner_opt_state, params, **extra_args)

    def apply_update() -> tuple[Any, Any]:
        updates, new_inner = mean_update()
        cast = lambda n, o: jnp.asarray(n).astype(o.dtype)  # noqa: E731
        return updates, jax.tree.map(cast, new_inner, state.inner_opt_state)

    def hold() -> tuple[Any, Any]:
        shapes = jax.eval_shape(mean_update)[0]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), state.inner_opt_state

    # Only the inner update sits in the cond; the window's sums are reset with a select
    # that fuses with the accumulation, which keeps XLA from copying them in a branch.
    updates, inner_state = jax.lax.cond(apply, apply_update, hold)
    step = state.gradient_step
    new_state = MultiStepsState(
        mini_step=jnp.where(close, 0, state.mini_step).astype(jnp.int32),
        gradient_step=jnp.where(apply, optax.safe_increment(step), step).astype(step.dtype),
        inner_opt_state=inner_state,
        acc_grads=jax.tree.map(lambda a: jnp.where(close, jnp.zeros_like(a), a), state.acc_grads),
        acc_weight=jnp.where(close, jnp.zeros_like(state.acc_weight), state.acc_weight),
        emitted=apply,
    )
    return updates, new_state


def multi_steps(
    optimizer: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], Any],
    *,
    accum_dtype: Any = jnp.float32,
    runtime_checks: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Accumulates gradients over calls and applies ``optimizer`` once every k calls.

    For data that arrives one micro-batch per call. Each call adds ``w_i g_i`` and
    ``w_i`` to float32 running sums; the k-th call divides once and runs the inner
    update on ``sum_i w_i g_i / sum_i w_i``, the arithmetic of
    ``jaxaccum.accumulate(..., weight_fn=...)``, so k calls give what one in-step call
    on the k micro-batches gives. Without weights ``w_i = 1``: the plain mean, like
    ``optax.MultiSteps``. With per-call weights (valid-token counts) it is the exact
    token mean across calls, which ``optax.MultiSteps`` cannot give: it averages calls
    equally. A call of weight 0 adds nothing, even a NaN gradient.

    The inner update sits in a ``jax.lax.cond`` branch and runs on applying calls only
    (``optax.MultiSteps`` computes it on every call and masks it); the other calls
    return zero updates. (Under ``jax.vmap`` with a batched state, JAX runs both
    branches and selects, as for any cond.) ``state.emitted`` tells whether a call
    applied an update. A window whose calls all had weight 0 is dropped: nothing is
    applied, ``emitted`` is False and ``gradient_step`` does not advance. Donate the
    state to the jitted step (``donate_argnums``) so that a non-emitting call updates
    the sums in place and leaves the inner state's buffers alone.

    Args:
      optimizer: the inner ``optax.GradientTransformation``; extra keyword arguments of
        ``update`` reach it on applying calls.
      every_k_schedule: calls per update: a positive int, or a function of
        ``state.gradient_step`` (the number of updates applied so far) returning an
        integer scalar, e.g. ``lambda step: jnp.where(step < 100, 2, 8)``.
      accum_dtype: dtype of the running sums, promoted with each param's dtype.
      runtime_checks: check traced schedule values and weights under ``jax.jit`` with a
        host callback (see Raises). A program holding a callback costs extra dispatch
        time on every call (see ``benchmarks/bench_multisteps.py``); with False nothing
        is staged and bad traced values go unreported: a negative or NaN weight counts
        as 0, and a k below 1 as 1. Concrete values are always checked.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. ``init(params)`` gives a
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
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
        )
    inner = optax.with_extra_args_support(optimizer)
    schedule = _as_schedule(every_k_schedule)
    accum = _check_accum_dtype(accum_dtype)
    weight_dtype = jnp.promote_types(accum, jnp.float32)

    def init(params: Any) -> MultiStepsState:
        return MultiStepsState(
            mini_step=jnp.zeros((), jnp.int32),
            gradient_step=jnp.zeros((), jnp.int32),
            inner_opt_state=inner.init(params),
            acc_grads=jax.tree.map(lambda p: _zeros_acc(p, accum), params),
            acc_weight=jnp.zeros((), weight_dtype),
            emitted=jnp.zeros((), jnp.bool_),
        )

    def update(
        grads: Any,
        state: MultiStepsState,
        params: Any = None,
        *,
        weight: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, MultiStepsState]:
        _check_state(state, inner, grads, "the gradients")
        with jax.named_scope(SCOPE):
            k = _calls_per_update(schedule, state.gradient_step, runtime_checks)
            if weight is None:
                w, total = None, state.acc_weight + 1
                how = Reduce.MEAN
            else:
                w = _call_weight(weight, state.acc_weight.dtype, runtime_checks)
                total, how = state.acc_weight + jnp.where(w > 0, w, 0), Reduce.WEIGHTED_MEAN
            acc = jax.tree.map(
                lambda a, g: _reduce.update(how, a, jnp.asarray(g), w), state.acc_grads, grads
            )
            mini_step = state.mini_step + 1
            window = state._replace(mini_step=mini_step, acc_grads=acc, acc_weight=total)
            dtypes = jax.tree.map(lambda g: jnp.asarray(g).dtype, grads)
            return _close(inner, window, mini_step >= k, dtypes, params, extra_args)

    return optax.GradientTransformationExtraArgs(init, update)


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
    ``emitted`` True. A window whose calls all had weight 0 is dropped instead.

    Args:
      optimizer: the inner optimizer given to :func:`multi_steps`.
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
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
        )
    inner = optax.with_extra_args_support(optimizer)
    like = getattr(state, "acc_grads", None) if params is None else params
    _check_state(state, inner, like, "the params" if params is not None else "state.acc_grads")
    if not _is_traced(state.mini_step) and int(state.mini_step) == 0:
        raise ValueError(
            "flush: nothing accumulated since the last update (mini_step=0), so there is no "
            "partial window to apply; flush only after calls that did not close a window, "
            "e.g. `if state.mini_step > 0: flush(...)`."
        )
    dtypes = jax.tree.map(lambda x: jnp.asarray(x).dtype, like)
    with jax.named_scope(SCOPE):
        return _close(inner, state, state.mini_step > 0, dtypes, params, extra_args)
