"""The accumulated train step behind every entry point (Optax, Flax linen, Flax NNX).

A front-end turns its own state into a :class:`Core` (params, optimizer state, counters and
whatever must be carried through the micro-batches) and gives a ``forward`` function that
runs the user's loss on one micro-batch. The engine owns everything else: the per-micro-batch
gradient and weight, loss scaling, dropping or skipping non-finite micro-batches, the one
weighted mean, the key of every micro-batch, and the one optimizer update of the ``Core``,
or else an :class:`Accumulated` (mean gradient, carry, finite flag, metrics) that the
front-end's ``commit`` applies in its own way.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxaccum import _checks, _loss_scale, _options, _parallel, _reduce
from jaxaccum._accumulate import accumulate
from jaxaccum._loss_scale import DynamicLossScale
from jaxaccum._parallel import FSDP, DataAxis
from jaxaccum._reduce import Reduce
from jaxaccum._split import Split, check_split


class NonFinite(_options.Option):
    """What a non-finite micro-batch gradient does to a step (a member or its string).

    Attributes:
      SKIP: ``"skip"`` (default): the whole update is skipped; params, optimizer state,
        step count, carried collections and key are left bitwise unchanged and the skip
        counter increments.
      DROP: ``"drop"``: only the bad micro-batches are left out, and the others are
        averaged by their own total weight (the dropped weight leaves the denominator).
        If every micro-batch is bad the update is skipped as above.
    """

    SKIP = "skip"
    DROP = "drop"


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


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """What every train-step builder returns: ``init`` makes the state, ``update`` steps it.

    The record is also callable, ``step(...)`` being ``step.update(...)``, so
    ``jax.jit(step)`` jits the update; and it unpacks, ``init, update = step``.

    Attributes:
      init: builds the state a step starts from (see each builder for its arguments).
      update: runs k micro-batches and one optimizer update; jit it, donating the state.
    """

    init: Callable[..., Any]
    update: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.update(*args, **kwargs)

    def __iter__(self) -> Iterator[Callable[..., Any]]:
        return iter((self.init, self.update))


@dataclasses.dataclass(frozen=True)
class Engine:
    """A train step's options, checked once when the step is built."""

    k: int
    weight_fn: Callable[[Any], Any] | None
    has_aux: bool
    nonfinite: NonFinite
    loss_scale: DynamicLossScale | None
    split: Split
    unroll: int | bool
    data_axis: DataAxis | None
    mesh: jax.sharding.Mesh | None
    axis_name: DataAxis | None
    fsdp: FSDP | None
    param_specs: Any
    aux_reduce: Any = None


def configure(
    loss_fn: Callable[..., Any],
    call: str,
    k: int,
    *,
    weight_fn: Callable[[Any], Any] | None,
    has_aux: bool,
    nonfinite: NonFinite | str,
    loss_scale: DynamicLossScale | None = None,
    split: Split | str,
    unroll: int | bool,
    data_axis: DataAxis | None,
    mesh: jax.sharding.Mesh | None,
    axis_name: DataAxis | None,
    fsdp: FSDP | str | None,
    param_specs: Any,
    aux_reduce: Any = None,
) -> Engine:
    """Checks a train step's options at once; ``call`` shows how ``loss_fn`` is called."""
    k = _checks.check_k(k)
    _checks.check_functions(loss_fn, weight_fn, call)
    has_aux = _checks.flag(has_aux, "has_aux")
    mode = NonFinite.parse(nonfinite, "nonfinite")
    if loss_scale is not None:
        _loss_scale.check_config(loss_scale)
        if mode != NonFinite.SKIP:
            raise ValueError(
                "loss_scale needs nonfinite='skip': with loss scaling a non-finite micro-batch "
                "is an overflow, so the step is skipped and the scale lowered."
            )
    _checks.check_unroll(unroll)
    _parallel.options(data_axis, mesh, axis_name, fsdp, param_specs, specs_name="param_specs")
    weighted_mean = _reduce.BUILTIN[Reduce.WEIGHTED_MEAN]
    _checks.check_aux_reduce(aux_reduce, has_aux, _reduce.spec_members, weighted_mean)
    return Engine(
        k,
        weight_fn,
        has_aux,
        mode,
        loss_scale,
        check_split(split),
        unroll,
        data_axis,
        mesh,
        axis_name,
        None if fsdp is None else FSDP.parse(fsdp, "fsdp"),
        param_specs,
        aux_reduce,
    )


class Core(NamedTuple):
    """What every front-end's state comes down to.

    Attributes:
      params: the trained parameters (a plain pytree of arrays).
      opt_state: the Optax state of those parameters.
      step: optimizer updates applied so far; the step's keys are derived from it.
      skipped: updates skipped, or None where the front-end's state keeps no such count.
      carry: state carried through the micro-batches in order (Flax collections, NNX
        state other than the trained variables); ``{}`` for none.
      loss_scale: dynamic loss-scale state, or None. Its ``scale`` multiplies every
        micro-batch's loss. A :class:`LossScaleState` is adjusted by the engine after the
        update; a front-end's own (Flax's ``DynamicScale``) by the front-end's commit.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    skipped: jax.Array | None
    carry: Any
    loss_scale: Any = None


# forward(params, micro_batch, carry, consts, key) -> (loss_fn's output, side); `key` is
# this micro-batch's key or None, `side` what the front-end's `after` needs (new state).
Forward = Callable[[Any, Any, Any, Any, jax.Array | None], tuple[Any, Any]]
# after(side, carry, consts, counted) -> (outputs reduced with `reduce`, new carry).
After = Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]]
# finish(reduced outputs, carry after the last micro-batch) -> the carry the update keeps.
Finish = Callable[[Any, Any], Any]


class Accumulated(NamedTuple):
    """What the k micro-batches of a step leave for the update.

    Attributes:
      grads: the mean gradient, unscaled, in the params' dtypes.
      carry: the carried state after the step (after the front-end's ``finish``).
      finite: every counted micro-batch and the mean gradient are finite; with loss
        scaling, False is an overflow.
      metrics: the step's :class:`TrainMetrics`; ``metrics.applied`` says whether to update.
    """

    grads: Any
    carry: Any
    finite: jax.Array
    metrics: TrainMetrics


# commit(accumulated) -> the front-end's new state, run instead of the ``Core`` update: its
# own update (e.g. Flax's apply_gradients) when ``metrics.applied``, its skip otherwise.
Commit = Callable[[Accumulated], Any]


def _keep_carry(side: Any, carry: Any, consts: Any, counted: jax.Array) -> tuple[Any, Any]:
    return None, carry


def stream_keys(key: jax.Array, names: tuple[str, ...]) -> dict[str, jax.Array]:
    """The i-th named PRNG stream of a micro-batch gets ``fold_in(key, i)``."""
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(names)}


def run(
    engine: Engine,
    tx: optax.GradientTransformation,
    core: Core,
    batch: Any,
    forward: Forward,
    *,
    key: jax.Array | None = None,
    consts: Any = None,
    after: After = _keep_carry,
    reduce: Any = None,
    finish: Finish | None = None,
    commit: Commit | None = None,
) -> tuple[Any, TrainMetrics]:
    """One train step: k micro-batches, then one update of ``core`` by ``tx``, or ``commit``.

    Micro-batch ``j`` of step ``t`` gets the key ``fold_in(fold_in(key, t), j)``, for every
    k including 1. ``consts`` reach every micro-batch unchanged (traced values must travel
    as arguments: a ``shard_map`` over Explicit axes cannot close over them).
    """
    _warn_unnamed_axes(engine.axis_name)
    with _parallel.mesh_of((core.params, batch)):  # no jax.set_mesh needed
        return _run(engine, tx, core, batch, forward, key, consts, after, reduce, finish, commit)


def _warn_unnamed_axes(axis_name: DataAxis | None) -> None:
    """Warns when the step runs per device over mapped axes that ``axis_name=`` does not name."""
    named = {axis_name} if isinstance(axis_name, str) else set(axis_name or ())
    unnamed = [a for a in jax.sharding.get_abstract_mesh().manual_axes if a not in named]
    if unnamed:
        warnings.warn(
            f"this train step runs inside jax.pmap or jax.shard_map over axes {unnamed}, but "
            "was built without naming them in axis_name=: each device applies the gradient "
            "of its own examples, and the replicas drift apart. If the batch is split over "
            f"them, build the step with axis_name={unnamed[0]!r} (and drop any pmean of "
            "your own); if every device holds the same batch, this warning does not apply.",
            stacklevel=3,
        )


def _run(
    e: Engine,
    tx: optax.GradientTransformation,
    core: Core,
    batch: Any,
    forward: Forward,
    key: jax.Array | None,
    consts: Any,
    after: After,
    reduce: Any,
    finish: Finish | None,
    commit: Commit | None,
) -> tuple[Any, TrainMetrics]:
    scale = jnp.asarray(1.0 if core.loss_scale is None else core.loss_scale.scale, jnp.float32)
    keys = () if key is None else (jax.random.fold_in(key, core.step),)

    # Named as the user names them: errors about the batch say `batch['x']`.
    def micro(params: Any, batch: Any, carry: Any, consts: Any, scale: Any, *key: Any) -> Any:
        def scaled(p: Any) -> tuple[jax.Array, Any]:
            out, side = forward(p, batch, carry, consts, key[0] if key else None)
            loss, aux = _checks.split_loss(out, e.has_aux)
            return loss * jnp.asarray(scale, loss.dtype), (loss, aux, side)

        (_, (loss, aux, side)), grads = jax.value_and_grad(scaled, has_aux=True)(params)
        outputs, counted = micro_outputs(loss, aux, grads, micro_weight(e.weight_fn, batch), e)
        extra, new_carry = after(side, carry, consts, counted)
        return {**outputs, "extra": extra}, new_carry

    accumulated = accumulate(
        micro,
        e.k,
        batch_argnums=1,
        carry_argnums=2,
        rng_argnums=5 if keys else (),
        reduce=micro_spec(e) | {"extra": reduce},
        split=e.split,
        unroll=e.unroll,
        data_axis=e.data_axis,
        mesh=e.mesh,
        axis_name=e.axis_name,
        fsdp=e.fsdp,
        in_specs=None if e.param_specs is None else (e.param_specs,),
    )
    args = (core.params, batch, core.carry, consts, scale, *keys)
    out, carry = bind_unbound_axes(accumulated, args, e.axis_name)
    result = finish_step(out, scale, core.params, e)
    if finish is not None:
        carry = finish(out["extra"], carry)
    done = Accumulated(result.grads, carry, result.finite, result.metrics)
    if commit is not None:  # the front-end's own update, e.g. Flax's apply_gradients
        return commit(done), done.metrics
    return _update_core(e, tx, core, done), done.metrics


def _update_core(
    e: Engine, tx: optax.GradientTransformation, core: Core, done: Accumulated
) -> Core:
    """One Optax update of ``core`` if the step applies, a skip otherwise; the next scale."""

    def apply(core: Core) -> Core:
        updates, opt_state = tx.update(done.grads, core.opt_state, core.params)
        params = optax.apply_updates(core.params, updates)
        step = core.step + 1
        return core._replace(params=params, opt_state=opt_state, step=step, carry=done.carry)

    def skip(core: Core) -> Core:
        return core._replace(skipped=None if core.skipped is None else core.skipped + 1)

    new = jax.lax.cond(done.metrics.applied, apply, skip, core)
    if e.loss_scale is not None and core.loss_scale is not None:
        new = new._replace(
            loss_scale=_loss_scale.adjust(e.loss_scale, core.loss_scale, done.finite)
        )
    return new


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


def micro_weight(weight_fn: Callable[[Any], Any] | None, mb: Any) -> jax.Array:
    """A micro-batch's weight: ``weight_fn(mb)``, or its number of examples."""
    size = jax.tree.leaves(mb)[0].shape[0]
    w = size if weight_fn is None else _checks.check_weight(weight_fn(mb))
    return jnp.asarray(w, jnp.float32)


def micro_outputs(
    loss: jax.Array, aux: Any, grads: Any, w: jax.Array, engine: Engine
) -> tuple[dict[str, Any], jax.Array]:
    """One micro-batch's contribution, reduced with :func:`micro_spec`.

    Returns the outputs (gradient, loss and floating aux pre-multiplied by the counted
    weight, in float32) and whether the micro-batch is counted (under ``"drop"``, a
    non-finite one is not).
    """
    # Under "skip" a non-finite gradient makes the summed gradient non-finite, which
    # finish_step sees; only "drop" needs each micro-batch's own verdict (one scalar
    # reduction per micro-batch where the gradient is unreduced).
    finite = jnp.isfinite(loss) & jnp.isfinite(w)  # a NaN or infinite weight: not finite
    if engine.nonfinite == NonFinite.DROP:
        finite = finite & _parallel.all_finite(grads)
    keep = finite | (engine.nonfinite == NonFinite.SKIP)
    counted = jnp.where(keep & (w > 0), w, 0.0)

    def weigh(g: jax.Array) -> jax.Array:
        # float32 sums; complex gradients (complex params, as optax takes) stay complex
        scaled = _parallel.times(g.astype(jnp.promote_types(g.dtype, jnp.float32)), counted)
        return jnp.where(counted > 0, scaled, jnp.zeros_like(scaled))

    outputs = {
        "grads": jax.tree.map(weigh, grads),
        "loss_sum": jnp.where(counted > 0, loss.astype(jnp.float32) * counted, 0.0),
        "weight": counted,
        "losses": loss.astype(jnp.float32),
        "ok": finite | (w <= 0),
    }
    # aux leaves aux_reduce names are reduced as it says; the others weighted like the loss
    specs = _reduce.per_leaf(engine.aux_reduce, aux, "aux_reduce", "loss_fn's aux")
    outputs["aux"] = _weigh_aux(_pick(specs, aux, lambda r: r is None), counted)
    outputs["aux_as_given"] = _pick(specs, aux, lambda r: r is not None)
    return outputs, keep


def _pick(specs: Any, tree: Any, keep: Callable[[Any], bool]) -> Any:
    """``tree`` with None at the leaves whose spec ``keep`` refuses."""
    return jax.tree.map(
        lambda r, x: x if keep(r) else None, specs, tree, is_leaf=lambda x: x is None
    )


def micro_spec(engine: Engine) -> dict[str, Any]:
    """How :func:`micro_outputs` are reduced over the micro-batches: weighted sums, divided
    once by :func:`finish_step`, and the aux leaves ``aux_reduce`` names."""
    return {
        "grads": Reduce.SUM,
        "loss_sum": Reduce.SUM,
        "weight": Reduce.SUM,
        "losses": Reduce.STACK,
        "ok": Reduce.MIN,
        "aux": Reduce.SUM if engine.has_aux else None,
        "aux_as_given": engine.aux_reduce,
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


def finish_step(out: dict[str, Any], scale: jax.Array, params: Any, engine: Engine) -> StepResult:
    """Divides the weighted sums once (the one weighted mean) and decides on the update."""
    total = out["weight"]
    mean_grads = jax.tree.map(lambda g: _reduce.weighted(g, total * scale, g.dtype), out["grads"])
    grads = jax.tree.map(lambda g, p: g.astype(jnp.asarray(p).dtype), mean_grads, params)
    finite = out["ok"] & _all_finite(grads)
    ok = finite if engine.nonfinite == NonFinite.SKIP else _all_finite(grads)
    aux = None
    if engine.has_aux:
        weighted = jax.tree.map(
            lambda x: (
                _reduce.weighted(x, total, x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x
            ),
            out["aux"],
        )
        aux = jax.tree.map(
            lambda w, given: given if w is None else w,
            weighted,
            out["aux_as_given"],
            is_leaf=lambda x: x is None,
        )
    metrics = TrainMetrics(
        loss=_reduce.weighted(out["loss_sum"], total, jnp.float32),
        losses=out["losses"],
        grad_norm=optax.tree.norm(mean_grads),
        weight=total,
        applied=(total > 0) & ok,
        aux=aux,
    )
    return StepResult(grads, finite, metrics)


_UNBOUND = re.compile(r"unbound axis name: ([^\s.]+)")


def bind_unbound_axes(fn: Callable[..., Any], args: tuple[Any, ...], devices: Any) -> Any:
    """``fn(*args)``; on one device, axis names the model reduces over are bound (size 1).

    A model written for ``pmap`` (``BatchNorm(axis_name="batch")``, as in Flax's ImageNet
    example) averages its statistics over that axis. Called without the axis bound (one
    device, no ``pmap``, no ``axis_name=``), the step binds it with a size-1 ``jax.vmap``,
    over which a mean is the value itself: the single-device result.
    """
    bound: list[str] = []
    while True:
        try:
            call = fn
            for name in bound:
                call = _size_one_axis(call, name)
            return call(*args)
        except NameError as err:
            found = _UNBOUND.search(str(err))
            if devices is not None or found is None or found.group(1) in bound:
                raise
            bound.append(found.group(1))


def _size_one_axis(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        out = jax.vmap(lambda *a: fn(*a), in_axes=None, axis_size=1, axis_name=name)(*args)
        return jax.tree.map(lambda x: x[0], out)

    return run
