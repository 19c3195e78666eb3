"""The Optax train step: k micro-batches and one Optax update in one call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxaccum import _checks, _docs, _engine, _loss_scale
from jaxaccum._engine import NonFinite, TrainMetrics, TrainStep
from jaxaccum._loss_scale import DynamicLossScale, LossScaleState
from jaxaccum._parallel import FSDP, DataAxis
from jaxaccum._split import Split

__all__ = ["NonFinite", "TrainMetrics", "TrainState", "TrainStep", "train_step"]


class TrainState(NamedTuple):
    """Everything a training run carries from one step to the next.

    Attributes:
      params: the model parameters.
      opt_state: the Optax optimizer state.
      step: optimizer updates applied so far (int32). Schedules inside the optimizer see
        this count, never micro-step indices.
      skipped: updates skipped because a gradient was not finite (int32).
      key: base PRNG key, or None. Step ``t`` uses ``fold_in(key, t)`` and its micro-batch
        ``j`` ``fold_in(fold_in(key, t), j)``, so a restart from a checkpoint replays the
        same stream.
      loss_scale: dynamic loss-scale state, or None when loss scaling is off.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    skipped: jax.Array
    key: jax.Array | None = None
    loss_scale: LossScaleState | None = None


@_docs.shared_step_args
def train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    k: int,
    *,
    weight_fn: Callable[[Any], Any] | None = None,
    has_aux: bool = False,
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

    Args:
      loss_fn: ``loss_fn(params, batch)`` (or ``loss_fn(params, batch, key)`` with
        ``with_key``) returning a scalar loss that is a mean over the micro-batch's
        examples (or over its valid items, with ``weight_fn``), or ``(loss, aux)`` with
        ``has_aux``.
      optimizer: any ``optax.GradientTransformation``.
      k: micro-batches per update.
      weight_fn: ``weight_fn(micro_batch)`` returning its number of valid items (e.g.
        ``lambda mb: mb["mask"].sum()``); the gradient is then the exact item-weighted
        mean. Default: every example counts once.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
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
      A :class:`TrainStep` ``(init, update)``.

      ``init(params)`` keeps the arrays it is given (no copy, so no extra memory): after
      ``jax.jit(step.update, donate_argnums=0)`` has run once, the caller's ``params``
      arrays are deleted, their buffers reused for the new state. If the originals are
      still needed, copy them first: ``step.init(jax.tree.map(jnp.copy, params))``.

    Raises:
      ValueError: for a bad ``k``, ``nonfinite`` or loss-scale setting at once; at trace
        time, for a ``state.opt_state`` whose structure or leaf shapes differ from
        ``optimizer.init(state.params)`` (a state made for another optimizer or params).
      TypeError: for a non-Optax ``optimizer``, a ``loss_scale`` of the wrong type, or a
        ``loss_fn`` or ``weight_fn`` that is not callable at once; at trace time, for a
        ``loss_fn`` whose output does not match ``has_aux`` or whose loss is not a scalar.

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
    """
    engine = _engine.configure(
        loss_fn,
        "loss_fn(params, batch, key)" if with_key else "loss_fn(params, batch)",
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
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
        )

    def init(params: Any, key: jax.Array | None = None) -> TrainState:
        if with_key and key is None:
            raise TypeError("train_step(..., with_key=True) needs init(params, key=...).")
        return TrainState(
            params=params,
            opt_state=optimizer.init(params),
            step=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
            key=key,
            loss_scale=None if loss_scale is None else _loss_scale.init(loss_scale),
        )

    def forward(params: Any, batch: Any, carry: Any, consts: Any, key: Any) -> tuple[Any, None]:
        return loss_fn(params, batch, *(() if key is None else (key,))), None

    def update(state: TrainState, batch: Any) -> tuple[TrainState, TrainMetrics]:
        _checks.check_opt_state(
            state.opt_state,
            optimizer.init,
            state.params,
            ("state.opt_state", "optimizer.init(state.params)"),
            "create the state with this step's own init, step.init(params), or to switch "
            "optimizers keep the params and start a new optimizer state: "
            "state._replace(opt_state=optimizer.init(state.params)).",
        )
        if with_key and state.key is None:
            raise TypeError("train_step(..., with_key=True) needs a TrainState with a key.")
        core = _engine.Core(
            state.params, state.opt_state, state.step, state.skipped, {}, state.loss_scale
        )
        core, metrics = _engine.run(
            engine, optimizer, core, batch, forward, key=state.key if with_key else None
        )
        new_state = state._replace(
            params=core.params,
            opt_state=core.opt_state,
            step=core.step,
            skipped=state.skipped if core.skipped is None else core.skipped,
            loss_scale=core.loss_scale,
        )
        return new_state, metrics

    return TrainStep(init=init, update=update)
