"""A jittable train step: k micro-batches and one Optax update in one call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from jaxaccum import _checks, _loss_scale
from jaxaccum._accumulate import accumulate
from jaxaccum._loss_scale import DynamicLossScale, LossScaleState
from jaxaccum._reduce import Reduce
from jaxaccum._sharding import FSDP, DataAxis
from jaxaccum._split import Split

NonFinite = Literal["skip", "drop"]
"""What a non-finite micro-batch gradient does to a step.

* ``"skip"`` (default): the whole update is skipped; params, optimizer state, step count
  and key are left bitwise unchanged and ``TrainState.skipped`` increments.
* ``"drop"``: only the bad micro-batches are left out, and the others are averaged by
  their own total weight (the dropped weight leaves the denominator). If every
  micro-batch is bad the update is skipped as above.
"""


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


class TrainMetrics(NamedTuple):
    """What one train step reports.

    Attributes:
      loss: the (weighted) mean loss of the step's counted micro-batches, float32.
      losses: each micro-batch's own loss, shape ``(k,)``, float32 (unscaled).
      grad_norm: global norm of the accumulated gradient (unscaled, before the optimizer,
        so before any clipping in the chain), float32.
      weight: total weight of the counted micro-batches: valid items with a ``weight_fn``,
        examples otherwise.
      applied: whether the optimizer update was applied (bool).
      aux: ``loss_fn``'s auxiliary output reduced over micro-batches (floating leaves
        weight-averaged like the loss, integer leaves summed, bool leaves counted), or None.
    """

    loss: jax.Array
    losses: jax.Array
    grad_norm: jax.Array
    weight: jax.Array
    applied: jax.Array
    aux: Any = None


class TrainStep(NamedTuple):
    """A train step built by :func:`train_step`.

    Attributes:
      init: ``init(params, key=None) -> TrainState``. The state holds the very arrays
        passed as ``params`` (no copy), so donating the state to ``update`` deletes them;
        pass ``jax.tree.map(jnp.copy, params)`` to keep the originals usable.
      update: ``update(state, batch) -> (TrainState, TrainMetrics)``; jit it, donating the
        state: ``jax.jit(step.update, donate_argnums=0)``.
    """

    init: Callable[..., TrainState]
    update: Callable[[TrainState, Any], tuple[TrainState, TrainMetrics]]


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _weigh_aux(aux: Any, w: jax.Array) -> Any:
    def weigh(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.where(w > 0, x.astype(jnp.float32) * w, 0.0)
        return x.astype(jnp.int32) if x.dtype == jnp.bool_ else x

    return jax.tree.map(weigh, aux)


def _unweigh_aux(aux: Any, total: jax.Array) -> Any:
    """Divides the weighted (floating) aux sums by the total weight."""
    safe = jnp.where(total > 0, total, 1.0)

    def unweigh(x: jax.Array) -> jax.Array:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.where(total > 0, x / safe, 0.0)
        return x

    return jax.tree.map(unweigh, aux)


def micro_weight(weight_fn: Callable[[Any], Any] | None, mb: Any) -> jax.Array:
    """A micro-batch's weight: ``weight_fn(mb)``, or its number of examples."""
    size = jax.tree.leaves(mb)[0].shape[0]
    return jnp.asarray(size if weight_fn is None else weight_fn(mb), jnp.float32)


def micro_outputs(
    loss: jax.Array, aux: Any, grads: Any, w: jax.Array, nonfinite: NonFinite
) -> tuple[dict[str, Any], jax.Array]:
    """One micro-batch's contribution to a train step, reduced with :func:`micro_spec`.

    Returns the outputs (gradient and loss pre-multiplied by the counted weight, in
    float32) and whether the micro-batch is counted (under ``"drop"``, a non-finite one
    is not).
    """
    finite = _all_finite(grads) & jnp.isfinite(loss)
    counted = jnp.where(finite | (nonfinite == "skip"), w, 0.0)
    w_eff = jnp.where(counted > 0, counted, 0.0)
    outputs = {
        "grads": jax.tree.map(
            lambda g: jnp.where(w_eff > 0, g.astype(jnp.float32) * w_eff, 0.0), grads
        ),
        "loss_sum": jnp.where(w_eff > 0, loss.astype(jnp.float32) * w_eff, 0.0),
        "weight": w_eff,
        "losses": loss.astype(jnp.float32),
        "ok": finite | (w <= 0),
        "aux": _weigh_aux(aux, w_eff),
    }
    return outputs, finite | (nonfinite == "skip")


def micro_spec(has_aux: bool) -> dict[str, Reduce | None]:
    """How :func:`micro_outputs` are reduced over the micro-batches."""
    return {
        "grads": Reduce.SUM,
        "loss_sum": Reduce.SUM,
        "weight": Reduce.SUM,
        "losses": Reduce.STACK,
        "ok": Reduce.MIN,
        "aux": Reduce.SUM if has_aux else None,
    }


class StepResult(NamedTuple):
    """What :func:`finish_step` derives from the reduced micro-batch outputs.

    Attributes:
      grads: the mean gradient, unscaled, in the params' dtypes.
      finite: every counted micro-batch and the mean gradient are finite.
      metrics: the step's :class:`TrainMetrics`; ``applied`` says whether to update.
    """

    grads: Any
    finite: jax.Array
    metrics: TrainMetrics


def finish_step(
    out: dict[str, Any], scale: jax.Array, params: Any, nonfinite: NonFinite, has_aux: bool
) -> StepResult:
    """Divides the weighted sums once and decides whether the update applies."""
    total = out["weight"]
    denom = jnp.where(total > 0, total * scale, 1.0)
    mean_grads = jax.tree.map(lambda g: g / denom, out["grads"])
    grads = jax.tree.map(lambda g, p: g.astype(jnp.asarray(p).dtype), mean_grads, params)
    finite = out["ok"] & _all_finite(grads)
    apply = (total > 0) & (finite if nonfinite == "skip" else _all_finite(grads))
    safe_total = jnp.where(total > 0, total, 1.0)
    metrics = TrainMetrics(
        loss=jnp.where(total > 0, out["loss_sum"] / safe_total, 0.0),
        losses=out["losses"],
        grad_norm=optax.tree.norm(mean_grads),
        weight=total,
        applied=apply,
        aux=_unweigh_aux(out["aux"], total) if has_aux else None,
    )
    return StepResult(grads, finite, metrics)


def train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    k: int,
    *,
    weight_fn: Callable[[Any], Any] | None = None,
    has_aux: bool = False,
    with_key: bool = False,
    nonfinite: NonFinite = "skip",
    loss_scale: DynamicLossScale | None = None,
    split: Split = "strided",
    unroll: int | bool = 1,
    data_axis: DataAxis | None = None,
    mesh: jax.sharding.Mesh | None = None,
    axis_name: DataAxis | None = None,
    fsdp: FSDP = "per_microbatch",
    param_specs: Any = None,
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
      data_axis: mesh axis name(s) the batch is sharded over: each device accumulates
        its own micro-batches and the gradient is all-reduced once per step, after the
        loop (see :func:`jaxaccum.accumulate`). The update then runs on the combined
        gradient under the params' own sharding.
      mesh: the mesh for ``data_axis`` (default: the one set with ``jax.set_mesh``).
      axis_name: mesh or ``pmap`` axis name(s) already bound by the caller (inside its
        ``jax.shard_map`` or ``jax.pmap``, e.g. Flax's ImageNet example's ``"batch"``):
        each device accumulates its own micro-batches and every output (and BatchNorm
        statistic) is combined over the axis once, after the loop, with the semantics of
        ``data_axis``. Exclusive with ``data_axis``.
      fsdp: with ``data_axis``, how parameters sharded over the data axis are handled,
        ``"per_microbatch"`` (default) or ``"gather_once"``; see :data:`jaxaccum.FSDP`.
        The gradient is reduce-scattered and the update runs in the params' sharding.
      param_specs: with ``data_axis``, the params' ``PartitionSpec`` (a pytree prefix of
        the params). Default: read from the params' types, which carry it on meshes
        with Explicit axes (``jax.make_mesh``'s default); on Auto axes a traced array
        carries no placement, so pass it there to keep FSDP params sharded.

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
    k = _checks.check_k(k)
    call = "loss_fn(params, batch, key)" if with_key else "loss_fn(params, batch)"
    _checks.check_functions(loss_fn, weight_fn, call)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
        )
    if nonfinite not in get_args(NonFinite):
        raise ValueError(f"nonfinite={nonfinite!r} is not one of {get_args(NonFinite)}.")
    if loss_scale is not None:
        _loss_scale.check_config(loss_scale)
        if nonfinite != "skip":
            raise ValueError(
                "loss_scale needs nonfinite='skip': with loss scaling a non-finite micro-batch "
                "is an overflow, so the step is skipped and the scale lowered."
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

    def micro(params: Any, batch: Any, scale: Any, *key: jax.Array) -> dict[str, Any]:
        def scaled(p: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            loss, aux = _checks.split_loss(loss_fn(p, batch, *key), has_aux)
            return loss * jnp.asarray(scale, loss.dtype), (loss, aux)

        (_, (loss, aux)), grads = jax.value_and_grad(scaled, has_aux=True)(params)
        return micro_outputs(loss, aux, grads, micro_weight(weight_fn, batch), nonfinite)[0]

    accumulated = accumulate(
        micro,
        k,
        batch_argnums=1,
        rng_argnums=3 if with_key else (),
        reduce=micro_spec(has_aux),
        split=split,
        unroll=unroll,
        data_axis=data_axis,
        mesh=mesh,
        axis_name=axis_name,
        fsdp=fsdp,
        in_specs=None if param_specs is None else (param_specs,),
    )

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
        scale = jnp.float32(1.0) if state.loss_scale is None else state.loss_scale.scale
        keys: tuple[jax.Array, ...] = ()
        if with_key:
            if state.key is None:
                raise TypeError("train_step(..., with_key=True) needs a TrainState with a key.")
            keys = (jax.random.fold_in(state.key, state.step),)
        out = accumulated(state.params, batch, scale, *keys)
        step = finish_step(out, scale, state.params, nonfinite, has_aux)

        def do_update(state: TrainState) -> TrainState:
            updates, opt_state = optimizer.update(step.grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return state._replace(params=params, opt_state=opt_state, step=state.step + 1)

        def skip_update(state: TrainState) -> TrainState:
            return state._replace(skipped=state.skipped + 1)

        new_state = jax.lax.cond(step.metrics.applied, do_update, skip_update, state)
        if loss_scale is not None and state.loss_scale is not None:
            new_scale = _loss_scale.adjust(loss_scale, state.loss_scale, step.finite)
            new_state = new_state._replace(loss_scale=new_scale)
        return new_state, step.metrics

    return TrainStep(init=init, update=update)
