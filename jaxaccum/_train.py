"""The Optax train step: k micro-batches and one Optax update in one call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxaccum import _checks, _docs, _engine, _equinox, _loss_scale
from jaxaccum._engine import NonFinite, TrainMetrics, TrainStep
from jaxaccum._loss_scale import DynamicLossScale, LossScaleState
from jaxaccum._parallel import FSDP, DataAxis
from jaxaccum._split import Split

__all__ = ["NonFinite", "TrainMetrics", "TrainState", "TrainStep", "train_step"]


class TrainState(NamedTuple):
    """Everything a training run carries from one step to the next.

    Attributes:
      params: the model parameters: any pytree of arrays, or an Equinox module (whole; its
        inexact arrays are the trained ones).
      opt_state: the Optax optimizer state.
      step: optimizer updates applied so far (int32). Schedules inside the optimizer see
        this count, never micro-step indices.
      skipped: updates skipped because a gradient was not finite (int32).
      key: base PRNG key, or None. Step ``t`` uses ``fold_in(key, t)`` and its micro-batch
        ``j`` ``fold_in(fold_in(key, t), j)``, so a restart from a checkpoint replays the
        same stream.
      loss_scale: dynamic loss-scale state, or None when loss scaling is off.
      model_state: with ``has_state``, the model's mutable state (any pytree of arrays, e.g.
        an ``eqx.nn.State`` with BatchNorm statistics), threaded through the micro-batches
        in order; None otherwise.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    skipped: jax.Array
    key: jax.Array | None = None
    loss_scale: LossScaleState | None = None
    model_state: Any = None


@_docs.shared_step_args
def train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    k: int,
    *,
    weight_fn: Callable[[Any], Any] | None = None,
    has_aux: bool = False,
    has_state: bool = False,
    with_key: bool = False,
    nonfinite: NonFinite | str = NonFinite.SKIP,
    loss_scale: DynamicLossScale | None = None,
    split: Split | str = Split.STRIDED,
    unroll: int | bool = 1,
    data_axis: DataAxis | None = None,
    mesh: jax.sharding.Mesh | None = None,
    axis_name: DataAxis | None = None,
    fsdp: FSDP | str | None = None,
    param_specs: Any = None,
    aux_reduce: Any = None,
) -> TrainStep:
    """Builds a train step: k micro-batches, then one optimizer update, in one call.

    The gradient is accumulated with :func:`jaxaccum.accumulate` (float32 sums, divided
    once), so everything in the optimizer chain (``optax.clip_by_global_norm``,
    schedules, weight decay) acts once per step on the accumulated gradient, exactly as
    on a full batch of N examples.

    The params may be an Equinox module (or a pytree holding some): its inexact arrays
    are trained, as ``eqx.filter(params, eqx.is_inexact_array)`` selects, and everything
    else in it (activation functions, integer buffers) passes through unchanged;
    ``state.params`` stays the whole module. Jit such a step with ``eqx.filter_jit``.

    Args:
      loss_fn: ``loss_fn(params, batch)`` (or ``loss_fn(params, batch, key)`` with
        ``with_key``) returning a scalar loss that is a mean over the micro-batch's
        examples (or over its valid items, with ``weight_fn``), or ``(loss, aux)`` with
        ``has_aux``. With ``has_state``, ``loss_fn(params, model_state, batch[, key])``
        returning ``(that output, new model_state)``.
      optimizer: any ``optax.GradientTransformation``.
      k: micro-batches per update.
      weight_fn: ``weight_fn(micro_batch)`` returning its number of valid items (e.g.
        ``lambda mb: mb["mask"].sum()``); the gradient is then the exact item-weighted
        mean. Default: every example counts once.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      has_state: the model has mutable state (any pytree of arrays, e.g. the
        ``eqx.nn.State`` holding Equinox's BatchNorm statistics), kept in
        ``TrainState.model_state``: micro-batch j gets the state micro-batch j - 1
        returned, as a loop over the micro-batches would thread it, and the update keeps
        the last one (a skipped update keeps the state it started from; a micro-batch
        dropped by ``nonfinite="drop"`` leaves the state as it found it).
      with_key: pass each micro-batch a distinct key derived from ``TrainState.key``.
      nonfinite: ``"skip"`` or ``"drop"``; see :data:`NonFinite`.
      loss_scale: a :class:`DynamicLossScale` for float16 compute, or None. With it, any
        non-finite micro-batch counts as an overflow (the update is skipped and the scale
        lowered), so it requires ``nonfinite="skip"``.
      split: how the batch is split; see :data:`jaxaccum.Split`.
      unroll: micro-batches per loop iteration (see :func:`jaxaccum.accumulate`; u > 1
        keeps about u micro-batches' activations alive).
      <shared step args>

    Returns:
      A :class:`TrainStep` with ``init`` and ``update``: ``init(params, key=None,
      model_state=None)`` and ``update(state, batch)``.

      ``init(params)`` keeps the arrays it is given (no copy, so no extra memory): after
      ``jax.jit(step.update, donate_argnums=0)`` has run once, the caller's ``params``
      arrays are deleted, their buffers reused for the new state. If the originals are
      still needed, copy them first: ``step.init(jax.tree.map(jnp.copy, params))``.

    Raises:
      ValueError: for a bad ``k``, ``nonfinite`` or loss-scale setting at once; at trace
        time, for a ``state.opt_state`` whose structure or leaf shapes differ from
        ``optimizer.init(state.params)`` (a state made for another optimizer or params),
        or a ``model_state`` returned by ``loss_fn`` with another layout than it was given.
      TypeError: for a non-Optax ``optimizer``, a ``loss_scale`` of the wrong type, or a
        ``loss_fn`` or ``weight_fn`` that is not callable at once; a ``model_state``
        missing with ``has_state`` or given without it; at trace time, for a ``loss_fn``
        whose output does not match ``has_aux`` or ``has_state`` or whose loss is not a
        scalar.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxaccum
      >>> def loss_fn(w, batch):
      ...     return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
      >>> step = jaxaccum.train_step(loss_fn, optax.sgd(0.1), k=4)
      >>> state = step.init(jnp.zeros(3))
      >>> batch = {"x": jnp.ones((16, 3)), "y": jnp.ones(16)}
      >>> state, metrics = jax.jit(step.update, donate_argnums=0)(state, batch)
      >>> int(state.step), metrics.losses.shape, bool(metrics.applied)
      (1, (4,), True)

      ``weight_fn`` with a loss that averages over valid rows, and ``has_aux``: the step's
      loss is the mean over the 12 valid rows, however they fall across micro-batches.

      >>> def masked(w, mb):
      ...     err = (mb["x"] @ w - mb["y"]) ** 2 * mb["mask"]
      ...     n = mb["mask"].sum()
      ...     return err.sum() / jnp.maximum(n, 1), {"rows": n.astype(jnp.int32)}
      >>> batch["mask"] = (jnp.arange(16) < 12).astype(jnp.float32)
      >>> step = jaxaccum.train_step(
      ...     masked, optax.sgd(0.1), k=4, weight_fn=lambda mb: mb["mask"].sum(), has_aux=True)
      >>> state, metrics = step.update(step.init(jnp.zeros(3)), batch)
      >>> float(metrics.weight), int(metrics.aux["rows"]), float(metrics.loss)
      (12.0, 12, 1.0)

      ``nonfinite``: a NaN in one micro-batch skips the whole update by default, or with
      ``"drop"`` leaves only that micro-batch out.

      >>> bad = {"x": batch["x"].at[0].set(jnp.nan), "y": batch["y"]}
      >>> for mode in ("skip", "drop"):
      ...     step = jaxaccum.train_step(loss_fn, optax.sgd(0.1), k=4, nonfinite=mode)
      ...     state, metrics = step.update(step.init(jnp.zeros(3)), bad)
      ...     print(mode, bool(metrics.applied), int(state.skipped), float(metrics.weight))
      skip False 1 16.0
      drop True 0 12.0

      ``with_key``: ``loss_fn`` also takes a key, distinct per micro-batch and per step.

      >>> def noisy(w, mb, key):
      ...     x = mb["x"] * jax.random.bernoulli(key, 0.9, mb["x"].shape)
      ...     return jnp.mean((x @ w - mb["y"]) ** 2)
      >>> step = jaxaccum.train_step(noisy, optax.sgd(0.1), k=4, with_key=True)
      >>> state = step.init(jnp.zeros(3), key=jax.random.key(0))
      >>> state, metrics = step.update(state, {"x": batch["x"], "y": batch["y"]})
      >>> int(state.step)
      1

      ``loss_scale`` for float16: each micro-batch's loss is scaled, the sum unscaled once;
      an overflow skips the update and halves the scale.

      >>> scaling = jaxaccum.DynamicLossScale(init_scale=2.0**15)
      >>> step = jaxaccum.train_step(loss_fn, optax.sgd(0.1), k=4, loss_scale=scaling)
      >>> state = step.init(jnp.zeros(3, jnp.float16))
      >>> half = {"x": bad["x"].astype(jnp.float16), "y": batch["y"]}
      >>> state, metrics = step.update(state, half)
      >>> bool(metrics.applied), float(state.loss_scale.scale)
      (False, 16384.0)

      ``has_state``: the model state is threaded through the micro-batches in order, here a
      running mean of the inputs with momentum 0.5 (an Equinox model passes its
      ``eqx.nn.State`` the same way; see the Equinox guide).

      >>> def tracking(w, running, mb):
      ...     running = 0.5 * running + 0.5 * mb["x"].mean(0)
      ...     return loss_fn(w, mb), running
      >>> step = jaxaccum.train_step(tracking, optax.sgd(0.1), k=4, has_state=True)
      >>> state = step.init(jnp.zeros(3), model_state=jnp.zeros(3))
      >>> state, _ = step.update(state, {"x": batch["x"], "y": batch["y"]})
      >>> state.model_state.tolist()  # 1 - 0.5**4 after four micro-batches of ones
      [0.9375, 0.9375, 0.9375]
    """
    has_state = _checks.flag(has_state, "has_state")
    with_key = _checks.flag(with_key, "with_key")
    engine = _engine.configure(
        loss_fn,
        (
            "params",
            *(("model_state",) if has_state else ()),
            "batch",
            *(("key",) if with_key else ()),
        ),
        k,
        weight_fn=weight_fn,
        has_aux=has_aux,
        aux_reduce=aux_reduce,
        nonfinite=nonfinite,
        loss_scale=loss_scale,
        split=split,
        unroll=unroll,
        data_axis=data_axis,
        mesh=mesh,
        axis_name=axis_name,
        fsdp=fsdp,
        param_specs=param_specs,
    )
    _checks.optimizer(optimizer, "optimizer")
    forward = _forward(loss_fn, has_state)

    def init(params: Any, key: jax.Array | None = None, model_state: Any = None) -> TrainState:
        if with_key and key is None:
            raise TypeError("train_step(..., with_key=True) needs init(params, key=...).")
        if key is not None:
            _checks.check_key(key, "init(params, key=...)'s key")
        _checks.model_state_given(model_state, has_state, "init(params, model_state=...)")
        return TrainState(
            params=params,
            opt_state=optimizer.init(_equinox.trained(params)),
            step=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
            key=key,
            loss_scale=None if loss_scale is None else _loss_scale.init(loss_scale),
            model_state=model_state,
        )

    def update(state: TrainState, batch: Any) -> tuple[TrainState, TrainMetrics]:
        trained, rest = _checks.train_state(state, TrainState, optimizer, with_key, has_state)
        done = _engine.run(
            engine,
            trained,
            batch,
            forward,
            step=state.step,
            carry=state.model_state if has_state else None,
            loss_scale=state.loss_scale,
            key=state.key if with_key else None,
            consts=rest,
            after=_next_state,
            model_axes=lambda: _engine.declared_axes(state.params),
        )
        before = (trained, state.opt_state, state.step, state.skipped, state.model_state)
        params, opt_state, step, skipped, model_state = _engine.optax_update(
            optimizer, done, before
        )
        scale = state.loss_scale
        if loss_scale is not None and scale is not None:
            scale = _loss_scale.adjust(loss_scale, scale, done.finite)
        merged = _equinox.merge(params, rest)
        new = TrainState(merged, opt_state, step, skipped, state.key, scale, model_state)
        return new, done.metrics

    return TrainStep(init=init, update=update)


def _forward(loss_fn: Callable[..., Any], has_state: bool) -> _engine.Forward:
    """Runs ``loss_fn`` on one micro-batch; the model state it returns travels as the side.

    ``rest`` is what the optimizer does not see (for an Equinox module, everything but its
    inexact arrays), put back around the trained leaves before ``loss_fn`` is called.
    """

    def forward(params: Any, batch: Any, carry: Any, rest: Any, key: Any) -> tuple[Any, Any]:
        model = _equinox.merge(params, rest)
        keys = () if key is None else (key,)
        if not has_state:
            return loss_fn(model, batch, *keys), carry
        return _checks.returned_model_state(loss_fn(model, carry, batch, *keys), carry)

    return forward


def _next_state(new: Any, carry: Any, rest: Any, counted: jax.Array) -> tuple[None, Any]:
    """The state the next micro-batch starts from: the one ``loss_fn`` returned, or the
    one before it for a micro-batch left out (``nonfinite="drop"``)."""
    return None, jax.tree.map(lambda n, o: jnp.where(counted, n, o), new, carry)
