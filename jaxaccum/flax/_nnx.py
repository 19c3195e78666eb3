"""Flax NNX: a train step over an ``nnx.Module`` and its ``nnx.Optimizer``.

Reached as ``jaxaccum.flax.nnx_train_step``; the linen step is in ``_linen``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccum import _checks, _docs, _engine, _loss_scale
from jaxaccum._engine import NonFinite, TrainMetrics, TrainStep
from jaxaccum._loss_scale import DynamicLossScale, LossScaleState
from jaxaccum._parallel import FSDP, DataAxis
from jaxaccum._reduce import Reduce
from jaxaccum._split import Split
from jaxaccum.flax import _batch_norm as _bn
from jaxaccum.flax._batch_norm import BatchNormMode

__all__ = ["BatchNormMode", "nnx_train_step"]


def _keys(path: Any) -> _bn.Path:
    """A state leaf's path as plain keys, without the trailing ``.value``."""
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)


def _batch_norms(model: nnx.Module, exact: bool) -> dict[_bn.Path, float]:
    """The momentum of every ``nnx.BatchNorm`` in ``model``, by its path (exact mode only)."""
    if not exact:
        return {}
    momenta = {}
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, nnx.BatchNorm):
            continue
        if module.use_running_average:
            raise ValueError(
                f"batch_norm='exact' needs BatchNorm {'.'.join(map(str, path)) or '<model>'} "
                "in training mode (it has use_running_average=True, so it would normalise "
                "with the zeroed statistics the merge feeds it); call model.train() before "
                "the step, or build it with use_running_average=False."
            )
        momenta[tuple(path)] = float(module.momentum)
    return momenta


def _reseed(rest: Any, key: jax.Array | None) -> Any:
    """Gives the i-th PRNG key of the state ``fold_in(key, i)`` (no change without a key)."""
    if key is None:
        return rest
    leaves, treedef = jax.tree.flatten(rest)
    count = 0
    out = []
    for leaf in leaves:
        if _is_key(leaf):
            new = jax.random.fold_in(key, count)
            out.append(jax.random.split(new, leaf.shape) if leaf.shape else new)
            count += 1
        else:
            out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def _split_model(model: nnx.Module, wrt: Any) -> tuple[Any, Any, Any]:
    """``(graphdef, trained, rest)``: the variables ``wrt`` selects, and everything else."""
    parts: Any = nnx.split(model, wrt, ...)
    return parts[0], parts[1], parts[2]


def _zero_bn(rest: Any, momenta: dict[_bn.Path, float]) -> Any:
    def zero(path: Any, leaf: Any) -> Any:
        return jnp.zeros_like(leaf) if _bn.is_stat(_keys(path), momenta) else leaf

    return jax.tree_util.tree_map_with_path(zero, rest)


@_docs.shared_step_args
def nnx_train_step(
    loss_fn: Callable[..., Any],
    k: int,
    *,
    batch_norm: BatchNormMode | str = BatchNormMode.SEQUENTIAL,
    weight_fn: Callable[[Any], Any] | None = None,
    has_aux: bool = False,
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
    """Builds an NNX train step: k micro-batches, then one optimizer update, in one call.

    The step works on the objects an NNX training loop already has, and updates them in
    place like ``optimizer.update(model, grads)`` does: ``update(model, optimizer, batch)``.
    Inside, the model is split into the variables the optimizer trains (its ``wrt``,
    usually ``nnx.Param``), which alone are differentiated, and everything else
    (``nnx.BatchStat``, RNG keys and counts, other variables), which is carried through
    the micro-batches in order: micro-batch j+1 sees what micro-batch j wrote, as a Python
    loop of k calls would. The mean gradient then goes through ``optimizer.tx`` once, as
    ``nnx.Optimizer.update`` would apply it, and ``optimizer.step`` counts applied updates.

    Args:
      loss_fn: ``loss_fn(model, micro_batch)`` returning a scalar loss that is a mean over
        the micro-batch's examples (or valid items, with ``weight_fn``), or ``(loss, aux)``
        with ``has_aux``. Call the model as usual; put it in training mode
        (``model.train()``) before the step.
      k: micro-batches per update.
      batch_norm: ``"sequential"`` (default): each ``nnx.BatchNorm`` normalises micro-batch
        j with its own statistics and updates its running statistics k times, in order.
        ``"exact"``: the running mean and variance get one momentum update per step, from
        the statistics of all k micro-batches merged exactly (equal micro-batch sizes), as
        the full batch would have computed; normalisation still uses each micro-batch's own
        statistics. Other non-trained state is carried sequentially in both modes.
      weight_fn: ``weight_fn(micro_batch)``, its number of valid items; the gradient is
        then the exact item-weighted mean.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      nonfinite: ``"skip"`` (default: a non-finite micro-batch skips the whole update; the
        model's state, ``optimizer.opt_state`` and ``optimizer.step`` stay bitwise
        unchanged) or ``"drop"`` (only bad micro-batches are left out; carried state keeps
        its value from before a dropped micro-batch; not with ``batch_norm="exact"``).
      loss_scale: a :class:`jaxaccum.DynamicLossScale` for float16 compute, or None, as in
        :func:`jaxaccum.train_step`: each micro-batch's loss is multiplied by the scale and
        the accumulated gradient divided by it once; an overflow skips the update as
        ``"skip"`` does and lowers the scale, and ``growth_interval`` finite steps in a
        row raise it. The optimizer keeps the :class:`jaxaccum.LossScaleState` in
        ``optimizer.loss_scale``, an ``nnx.OptState`` that ``init`` adds. Requires
        ``nonfinite="skip"``.
      split: how the batch is split; see :data:`jaxaccum.Split`.
      unroll: micro-batches per loop iteration (see :func:`jaxaccum.accumulate`; u > 1
        keeps about u micro-batches' activations alive).
      <shared step args>

    Returns:
      A :class:`jaxaccum.TrainStep` with ``init`` and ``update``, callable as ``update``.

      ``init(model, tx, wrt=nnx.Param)`` builds the ``nnx.Optimizer`` of ``model`` with a
      ``skipped`` counter (an ``nnx.OptState``), and with ``loss_scale`` the scale's state
      in ``optimizer.loss_scale``; an optimizer built by hand works too (give it
      ``optimizer.loss_scale = nnx.OptState(jaxaccum.LossScaleState(jnp.float32(scale),
      jnp.int32(0)))`` for ``loss_scale``).

      ``update(model, optimizer, batch, key=None) -> TrainMetrics`` updates ``model`` and
      ``optimizer`` in place, as ``optimizer.update(model, grads)`` does; wrap it in
      ``nnx.jit`` (it also runs eagerly).

      ``key`` (optional): with a key, every PRNG key in the model's state (its
      ``nnx.Rngs`` streams, e.g. ``dropout``) is replaced, for micro-batch ``j`` of step
      ``t = optimizer.step``, by ``fold_in(fold_in(fold_in(key, t), j), i)`` for the i-th
      key in state order (the key scheme of every jaxaccum train step, for every k
      including 1), and restored afterwards: the same key and state reproduce a step
      bitwise, and every micro-batch and step draws fresh masks. Without a key the model's
      own streams are used, their counters carried from micro-batch to micro-batch like
      any other state.

      Skipped updates: ``metrics.applied`` is False; if the optimizer has a ``skipped``
      ``nnx.Variable`` (as ``init`` gives it), it is incremented.

    Raises:
      ValueError: for a bad ``k``, ``batch_norm``, ``nonfinite`` or loss-scale setting at
        once; at trace time, for ``batch_norm="exact"`` with a BatchNorm not in training
        mode, state that changes structure, shape or dtype during a micro-batch, an
        ``optimizer.opt_state`` whose structure or leaf shapes differ from
        ``optimizer.tx.init`` of the model's trained variables (an optimizer built for
        another model), or ``loss_scale`` with an optimizer that holds no
        ``loss_scale`` (or one that holds it, without ``loss_scale``).
      TypeError: for a ``loss_fn`` or ``weight_fn`` that is not callable or a
        ``loss_scale`` of the wrong type at once; at trace
        time, for a model that is not an ``nnx.Module``, an optimizer that is not an
        ``nnx.Optimizer``, a ``key`` that is not one PRNG key, or a ``loss_fn`` whose
        output does not match ``has_aux`` or whose loss is not a scalar.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxaccum.flax
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.norm = nnx.BatchNorm(2, momentum=0.99, rngs=rngs)
      ...         self.linear = nnx.Linear(2, 1, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.linear(self.norm(x))[:, 0]
      >>> def loss_fn(model, mb):
      ...     return jnp.mean((model(mb["x"]) - mb["y"]) ** 2)
      >>> step = jaxaccum.flax.nnx_train_step(loss_fn, k=4, batch_norm="exact")
      >>> model = Net(nnx.Rngs(0))
      >>> optimizer = step.init(model, optax.sgd(0.1))
      >>> update = nnx.jit(step.update)
      >>> x, y = jnp.arange(32.0).reshape(16, 2), jnp.arange(16.0)
      >>> metrics = update(model, optimizer, {"x": x, "y": y})
      >>> int(optimizer.step[...]), int(optimizer.skipped[...]), bool(metrics.applied)
      (1, 0, True)
      >>> # one momentum update (0.99) from the whole batch's mean, 15, 16:
      >>> [round(float(m), 4) for m in model.norm.mean[...]]
      [0.15, 0.16]

      ``loss_scale`` for float16 compute. The loss here is float16, so the first scale,
      2**16, is beyond float16's largest value (65504): the step overflows, is skipped and
      halves the scale; the next one applies.

      >>> class Half(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.linear = nnx.Linear(2, 1, dtype=jnp.float16, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.linear(x)[:, 0]
      >>> scaling = jaxaccum.DynamicLossScale(init_scale=2.0**16)
      >>> step = jaxaccum.flax.nnx_train_step(loss_fn, k=4, loss_scale=scaling)
      >>> model = Half(nnx.Rngs(0))
      >>> optimizer = step.init(model, optax.sgd(0.1))  # with optimizer.loss_scale
      >>> small = {"x": x / 32, "y": (y / 16).astype(jnp.float16)}
      >>> for _ in range(2):
      ...     metrics = nnx.jit(step.update)(model, optimizer, small)
      ...     scale = optimizer.loss_scale.get_value().scale
      ...     print(bool(metrics.applied), float(scale), int(optimizer.step[...]))
      False 32768.0 0
      True 32768.0 1
    """
    engine = _engine.configure(
        loss_fn,
        ("model", "micro_batch"),
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
        # Specs read off nnx.state(...) wrap each spec in its Variable, as the state does.
        param_specs=None if param_specs is None else nnx.as_pure(param_specs),
    )
    exact = BatchNormMode.parse(batch_norm, "batch_norm") == BatchNormMode.EXACT
    if exact and engine.nonfinite == NonFinite.DROP:
        raise ValueError(
            "nonfinite='drop' cannot be combined with batch_norm='exact' (a dropped "
            "micro-batch would still count in the merged statistics); use nonfinite='skip' "
            "or batch_norm='sequential'."
        )

    return TrainStep(
        init=functools.partial(_init, loss_scale),
        update=functools.partial(_update, engine, loss_fn, exact),
    )


def _init(
    loss_scale: DynamicLossScale | None, model: nnx.Module, tx: Any, wrt: Any = nnx.Param
) -> nnx.Optimizer[Any]:
    """The step's ``init``: the model's ``nnx.Optimizer``, with a ``skipped`` counter and
    the loss scale's state."""
    _checks.nnx_init(model, tx, nnx.Module)
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    # A counter the step increments on every skipped update.
    optimizer.skipped = nnx.OptState(jnp.zeros((), jnp.int32))  # type: ignore[attr-defined]
    if loss_scale is not None:
        scale = nnx.OptState(_loss_scale.init(loss_scale))
        optimizer.loss_scale = scale  # type: ignore[attr-defined]
    return optimizer


def _held_scale(optimizer: nnx.Optimizer[Any], engine: _engine.Engine) -> nnx.Variable[Any] | None:
    """The optimizer's ``loss_scale`` variable, checked against the step's ``loss_scale=``."""
    held = getattr(optimizer, "loss_scale", None)
    if engine.loss_scale is None and held is not None:
        raise ValueError(
            "optimizer.loss_scale holds a loss scale, but the step was built without "
            "loss_scale=; build it with the settings the optimizer was made with, "
            "nnx_train_step(..., loss_scale=jaxaccum.DynamicLossScale(...)), or remove it: "
            "del optimizer.loss_scale."
        )
    if engine.loss_scale is not None and not (
        isinstance(held, nnx.Variable) and isinstance(held.get_value(), LossScaleState)
    ):
        raise ValueError(
            f"nnx_train_step(..., loss_scale={engine.loss_scale}) keeps the scale in "
            "optimizer.loss_scale, which this optimizer does not hold; build it with the "
            "step's init, step.init(model, tx), or add it: optimizer.loss_scale = "
            "nnx.OptState(jaxaccum.LossScaleState(jnp.float32(init_scale), jnp.int32(0))), "
            f"with init_scale={engine.loss_scale.init_scale}."
        )
    return held


def _update(
    engine: _engine.Engine,
    loss_fn: Callable[..., Any],
    exact: bool,
    model: nnx.Module,
    optimizer: nnx.Optimizer[Any],
    batch: Any,
    key: jax.Array | None = None,
) -> TrainMetrics:
    """The step's ``update``: k micro-batches, one optimizer update, in place."""
    _checks.nnx_objects(model, optimizer, nnx.Module, nnx.Optimizer)
    momenta = _batch_norms(model, exact)
    graphdef, params, rest = _split_model(model, optimizer.wrt)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    _checks.check_opt_state(
        nnx.as_pure(optimizer.opt_state),
        optimizer.tx.init,
        params,
        ("optimizer.opt_state", "optimizer.tx.init(params)"),
        "build the optimizer for this model and the variables it trains: "
        "nnx.Optimizer(model, tx, wrt=nnx.Param).",
    )
    if key is not None:
        _checks.check_key(key, "key")

    def forward(p: Any, batch: Any, rest: Any, consts: Any, key: Any) -> tuple[Any, Any]:
        given = _reseed(_zero_bn(rest, momenta), key)
        # Copied: variables created in this trace may be updated by the model.
        model = nnx.merge(graphdef, p, given, copy=True)
        return loss_fn(model, batch), nnx.as_pure(_split_model(model, optimizer.wrt)[2])

    def after(new: Any, rest: Any, consts: Any, counted: jax.Array) -> tuple[Any, Any]:
        def carry(path: Any, n: Any, o: Any) -> Any:
            # Keys go back to the model's own; BatchNorm statistics merged at the end
            # (exact mode) keep the step's value until then.
            if _is_key(o) or _bn.is_stat(_keys(path), momenta):
                return o
            return jnp.where(counted, n, o)

        stats = _bn.moments(new, momenta, _keys)
        return stats, jax.tree_util.tree_map_with_path(carry, new, rest)

    def finish(stats: Any, rest: Any) -> Any:
        first, second = stats
        return _bn.merge(rest, first, second, momenta, _keys) if exact else rest

    skipped = getattr(optimizer, "skipped", None)
    scale = _held_scale(optimizer, engine)
    done = _engine.run(
        engine,
        params,
        batch,
        forward,
        step=optimizer.step[...],
        carry=rest,
        loss_scale=None if scale is None else scale.get_value(),
        key=key,
        after=after,
        reduce=Reduce.MEAN,
        finish=finish,
        model_axes=lambda: _axis_names(model),
    )

    count = skipped[...] if isinstance(skipped, nnx.Variable) else None
    before = (params, nnx.as_pure(optimizer.opt_state), optimizer.step[...], count, rest)
    params, opt_state, step, count, rest = _engine.optax_update(optimizer.tx, done, before)
    nnx.update(model, params, rest)
    nnx.update(optimizer.opt_state, nnx.state(opt_state))
    optimizer.step[...] = step
    if isinstance(skipped, nnx.Variable):
        skipped[...] = count
    if scale is not None and engine.loss_scale is not None:
        scale.set_value(_loss_scale.adjust(engine.loss_scale, scale.get_value(), done.finite))
    return done.metrics


def _axis_names(model: nnx.Module) -> list[str]:
    """The axis names the model's layers reduce over (``nnx.BatchNorm(axis_name=...)``)."""
    return [name for _, module in nnx.iter_modules(model) for name in _engine.axis_names_of(module)]
