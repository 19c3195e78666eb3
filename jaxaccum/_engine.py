"""The accumulated train step behind every entry point (Optax, Flax linen, Flax NNX).

A front-end gives the trained params, its batch and a ``forward`` function that runs the
user's loss on one micro-batch, plus whatever must be carried through the micro-batches.
The engine owns the per-micro-batch gradient and weight, loss scaling, dropping non-finite
micro-batches, the one weighted mean and the key of every micro-batch, and returns an
:class:`Accumulated`: the mean gradient, the carried state, the finite flag and the
metrics. Each front-end applies its own update from it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaccum import _accumulate, _checks, _loss_scale, _micro, _parallel, _reduce
from jaxaccum._loss_scale import DynamicLossScale
from jaxaccum._micro import NonFinite, TrainMetrics
from jaxaccum._parallel import FSDP, DataAxis
from jaxaccum._reduce import Reduce
from jaxaccum._split import Split, check_split

__all__ = ["Accumulated", "Engine", "NonFinite", "TrainMetrics", "TrainStep", "configure", "run"]


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """What every train-step builder returns: ``init`` makes the state, ``update`` steps it.

    Calling the record calls ``update`` (``jax.jit(step)`` jits the update, as the
    ``train_step`` functions of Flax's examples are jitted). Each builder documents the
    arguments of its two functions.

    Attributes:
      init: builds the state a step starts from.
      update: runs k micro-batches and one optimizer update; jit it, donating the state.
    """

    init: Callable[..., Any]
    update: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.update(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Engine:
    """A train step's options, checked once when the step is built.

    Attributes:
      weight_fn: the micro-batch weight, or None (examples count).
      has_aux: the loss returns ``(loss, aux)``.
      nonfinite: what a non-finite micro-batch does.
      loss_scale: the dynamic loss-scale settings, or None.
      axis_name: the axes bound by the caller's ``pmap``/``shard_map``, or None.
      aux_reduce: how the aux leaves it names are reduced.
      loops: the micro-batch loop's checked options, without and with a key argument.
    """

    weight_fn: Callable[[Any], Any] | None
    has_aux: bool
    nonfinite: NonFinite
    loss_scale: DynamicLossScale | None
    axis_name: DataAxis | None
    aux_reduce: Any
    loops: dict[bool, _accumulate.Config]


_F32 = np.dtype(np.float32)  # the running sums' dtype


# The one micro-batch function the engine accumulates: its arguments, named for the loop.
def _micro_signature(params: Any, batch: Any, carry: Any, consts: Any, scale: Any) -> Any: ...
def _keyed_signature(
    params: Any, batch: Any, carry: Any, consts: Any, scale: Any, key: Any
) -> Any: ...


def configure(
    loss_fn: Callable[..., Any],
    loss_args: tuple[str, ...],
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
    loss_keywords: tuple[str, ...] = (),
) -> Engine:
    """Checks a train step's options at once; ``loss_fn`` is called with arguments named
    ``loss_args`` by position and ``loss_keywords`` by keyword."""
    k = _checks.check_k(k)
    _checks.check_functions(loss_fn, weight_fn, loss_args, loss_keywords)
    has_aux = _checks.flag(has_aux, "has_aux")
    mode = NonFinite.parse(nonfinite, "nonfinite")
    if loss_scale is not None:
        _loss_scale.check_config(loss_scale)
        if mode != NonFinite.SKIP:
            raise ValueError(
                "loss_scale needs nonfinite='skip': with loss scaling a non-finite micro-batch "
                "is an overflow, so the step is skipped and the scale lowered."
            )
    specs = None if param_specs is None else (param_specs,)
    parallel = _parallel.options(data_axis, mesh, axis_name, fsdp, specs, specs_name="param_specs")
    weighted_mean = _reduce.BUILTIN[Reduce.WEIGHTED_MEAN]
    _checks.check_aux_reduce(aux_reduce, has_aux, _reduce.spec_members, weighted_mean)
    split, unroll = check_split(split), _checks.check_unroll(unroll)

    def loop(signature: Callable[..., Any], key: tuple[str, ...]) -> _accumulate.Config:
        """The micro-batch loop's options, its arguments' roles given by name."""
        refs = _accumulate.roles(signature, None, "batch", (), "carry", (), key)
        return _accumulate.Config(refs, k, None, None, split, _F32, unroll, (0,), parallel)

    loops = {False: loop(_micro_signature, ()), True: loop(_keyed_signature, ("key",))}
    return Engine(weight_fn, has_aux, mode, loss_scale, axis_name, aux_reduce, loops)


class Accumulated(NamedTuple):
    """What the k micro-batches of a step leave for the front-end's update.

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


# forward(params, micro_batch, carry, consts, key) -> (loss_fn's output, side); `key` is
# this micro-batch's key or None, `side` what the front-end's `after` needs (new state).
Forward = Callable[[Any, Any, Any, Any, jax.Array | None], tuple[Any, Any]]
# after(side, carry, consts, counted) -> (outputs reduced with `reduce`, new carry).
After = Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]]
# finish(reduced outputs, carry after the last micro-batch) -> the carry the update keeps.
Finish = Callable[[Any, Any], Any]


def _keep_carry(side: Any, carry: Any, consts: Any, counted: jax.Array) -> tuple[Any, Any]:
    return None, carry


def _keep(reduced: Any, carry: Any) -> Any:
    return carry


def stream_keys(key: jax.Array, names: tuple[str, ...]) -> dict[str, jax.Array]:
    """The i-th named PRNG stream of a micro-batch gets ``fold_in(key, i)``."""
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(names)}


def run(
    engine: Engine,
    params: Any,
    batch: Any,
    forward: Forward,
    *,
    step: jax.Array,
    carry: Any = None,
    loss_scale: Any = None,
    key: jax.Array | None = None,
    consts: Any = None,
    after: After = _keep_carry,
    reduce: Any = None,
    finish: Finish = _keep,
    model_axes: Callable[[], Iterable[str]] = tuple,
) -> Accumulated:
    """The k micro-batches of step ``step``: the mean gradient of ``params`` and the rest.

    Micro-batch ``j`` gets the key ``fold_in(fold_in(key, step), j)``, for every k including
    1. ``loss_scale`` is the loss-scale state (its ``scale`` multiplies every micro-batch's
    loss), or None. ``consts`` reach every micro-batch unchanged (traced values must travel
    as arguments: a ``shard_map`` over Explicit axes cannot close over them).
    ``model_axes`` gives the axis names the model's layers reduce over (a linen
    ``BatchNorm(axis_name=...)``); on one device, those not bound are bound with size 1.
    """
    _warn_unnamed_axes(engine.axis_name)
    scale = jnp.asarray(1.0 if loss_scale is None else loss_scale.scale, jnp.float32)
    micro = _micro_step(engine, forward, after)
    loop = engine.loops[key is not None]
    loop = dataclasses.replace(loop, reduce=_micro.micro_spec(engine) | {"extra": reduce})
    args: tuple[Any, ...] = (params, batch, {} if carry is None else carry, consts, scale)
    if key is not None:
        args = (*args, jax.random.fold_in(key, step))
    with _parallel.mesh_of((params, batch)):  # no jax.set_mesh needed
        accumulated = _accumulate.bind(micro, loop)
        bound = engine.axis_name is not None
        out, new_carry = _with_model_axes(accumulated, args, model_axes, bound)
    grads, finite, metrics = _micro.finish_step(out, scale, params, engine)
    return Accumulated(grads, finish(out["extra"], new_carry), finite, metrics)


def optax_update(
    tx: Any, done: Accumulated, before: tuple[Any, Any, Any, Any, Any]
) -> tuple[Any, ...]:
    """``(params, opt_state, step, skipped, carry)`` after a step of the Optax and NNX
    front-ends: if ``done.metrics.applied``, one ``tx.update`` and ``optax.apply_updates``,
    the step counted and the carried state taken from ``done`` (a ``carry`` of None stays
    None); otherwise everything kept and ``skipped`` incremented (None: no count kept)."""

    def apply(s: tuple[Any, ...]) -> tuple[Any, ...]:
        params, opt_state, step, skipped, carry = s
        updates, opt_state = tx.update(done.grads, opt_state, params)
        new_carry = None if carry is None else done.carry
        return optax.apply_updates(params, updates), opt_state, step + 1, skipped, new_carry

    def skip(s: tuple[Any, ...]) -> tuple[Any, ...]:
        params, opt_state, step, skipped, carry = s
        return params, opt_state, step, None if skipped is None else skipped + 1, carry

    return jax.lax.cond(done.metrics.applied, apply, skip, before)


def _micro_step(engine: Engine, forward: Forward, after: After) -> Callable[..., Any]:
    """One micro-batch: the scaled loss's gradient, its weight and what it contributes."""

    # Named as the user names them: errors about the batch say `batch['x']`.
    def micro(params: Any, batch: Any, carry: Any, consts: Any, scale: Any, key: Any = None) -> Any:
        def scaled(p: Any) -> tuple[jax.Array, Any]:
            out, side = forward(p, batch, carry, consts, key)
            loss, aux = _checks.split_loss(out, engine.has_aux)
            return loss * jnp.asarray(scale, loss.dtype), (loss, aux, side)

        (_, (loss, aux, side)), grads = jax.value_and_grad(scaled, has_aux=True)(params)
        weight = _micro.micro_weight(engine.weight_fn, batch)
        outputs, counted = _micro.micro_outputs(loss, aux, grads, weight, engine)
        extra, new_carry = after(side, carry, consts, counted)
        return {**outputs, "extra": extra}, new_carry

    return micro


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


def _unbound(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that no enclosing ``vmap``/``pmap``/``shard_map`` binds."""
    found = []
    for name in dict.fromkeys(names):
        try:
            jax.lax.axis_size(name)
        except NameError:
            found.append(name)
    return found


def _with_model_axes(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    model_axes: Callable[[], Iterable[str]],
    bound: bool,
) -> Any:
    """``fn(*args)``, on one device with the model's unbound axis names bound (size 1).

    A model written for ``pmap`` (``BatchNorm(axis_name="batch")``, as in Flax's ImageNet
    example) averages its statistics over that axis. Called without the axis bound (one
    device, no ``pmap``, no ``axis_name=``), the step binds it with a size-1 ``jax.vmap``,
    over which a mean is the value itself: the single-device result. The names come from
    the model's own layers (``model_axes``, read after the first trace, during which a
    linen model shows its layers), never from the error's text.
    """
    try:
        return fn(*args)
    except NameError:
        names = [] if bound else _unbound(model_axes())
        if not names:
            raise
    return _size_one_axes(fn, names)(*args)


def _size_one_axes(fn: Callable[..., Any], names: list[str]) -> Callable[..., Any]:
    for name in names:
        fn = _size_one_axis(fn, name)
    return fn


def _size_one_axis(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        out = jax.vmap(lambda *a: fn(*a), in_axes=None, axis_size=1, axis_name=name)(*args)
        return jax.tree.map(lambda x: x[0], out)

    return run


def axis_names_of(module: Any) -> list[str]:
    """The axis names a layer declares in its ``axis_name`` (a name, a tuple, or none)."""
    name = getattr(module, "axis_name", None)
    if isinstance(name, str):
        return [name]
    return list(name) if isinstance(name, tuple) else []


def declared_axes(tree: Any) -> list[str]:
    """The axis names that modules held in ``tree`` declare (an Equinox ``BatchNorm``'s
    ``axis_name``), for :func:`run`'s ``model_axes``."""
    nodes = jax.tree.leaves(tree, is_leaf=lambda x: bool(axis_names_of(x)))
    return [name for node in nodes for name in axis_names_of(node)]
