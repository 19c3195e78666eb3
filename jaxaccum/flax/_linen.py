"""The Flax linen train step: k micro-batches, then one ``apply_gradients``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax.training.dynamic_scale import DynamicScale

from jaxaccum import _checks, _docs, _engine, _loss_scale
from jaxaccum._engine import NonFinite, TrainMetrics, TrainStep
from jaxaccum._loss_scale import DynamicLossScale, LossScaleState
from jaxaccum._parallel import FSDP, DataAxis
from jaxaccum._reduce import Reduce
from jaxaccum._split import Split
from jaxaccum.flax._batch_norm import BatchNormMode
from jaxaccum.flax._model import Mode, Model
from jaxaccum.flax._state import CollectionMode, TrainState, collections_of

_REDUCE = {
    BatchNormMode.EXACT: Reduce.MEAN,  # batch_stats' moments, merged after the loop
    CollectionMode.MEAN: Reduce.MEAN,
    CollectionMode.SUM: Reduce.SUM,
    CollectionMode.MAX: Reduce.MAX,
    CollectionMode.LAST: Reduce.LAST,
}


def _modes(
    names: Sequence[str], batch_norm: BatchNormMode, collections: Mapping[str, CollectionMode]
) -> dict[str, Mode]:
    unknown = sorted(set(collections) - set(names))
    if unknown:
        raise ValueError(
            f"collections={dict(collections)!r} names {unknown}, which the TrainState does "
            f"not hold (it holds {sorted(names)}); build the state with "
            "jaxaccum.flax.TrainState.from_variables(model.apply, model.init(key, x), tx)."
        )
    exact = batch_norm == BatchNormMode.EXACT
    return {
        name: BatchNormMode.EXACT
        if name == "batch_stats" and exact
        else collections.get(name, CollectionMode.SEQUENTIAL)
        for name in names
    }


def _check_modes(
    modes: Mapping[str, CollectionMode], batch_norm: BatchNormMode, nonfinite: NonFinite
) -> None:
    """Refuses options that contradict each other, when the step is built."""
    if "batch_stats" in modes:
        raise ValueError(
            f"collections names 'batch_stats' (as {str(modes['batch_stats'])!r}), which "
            "batch_norm= decides: batch_norm='sequential' carries it through the "
            "micro-batches, batch_norm='exact' merges the statistics once per step; drop "
            "it from collections=."
        )
    combined = {n: str(m) for n, m in modes.items() if m != CollectionMode.SEQUENTIAL}
    if batch_norm == BatchNormMode.EXACT:
        combined["batch_stats"] = "batch_norm='exact'"
    if nonfinite == NonFinite.DROP and combined:
        raise ValueError(
            f"nonfinite='drop' works with sequential collections only, got {combined} (a "
            "dropped micro-batch would still count in what they combine); use "
            "nonfinite='skip', or carry them with 'sequential'."
        )


def _takes_params(loss_fn: Callable[..., Any]) -> bool:
    """Whether ``loss_fn`` has a parameter named ``params`` (passed by keyword)."""
    try:
        parameters = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get("params")
    return param is not None and param.kind != inspect.Parameter.POSITIONAL_ONLY


@_docs.shared_step_args
def train_step(
    loss_fn: Callable[..., Any],
    k: int,
    *,
    batch_norm: BatchNormMode | str = BatchNormMode.SEQUENTIAL,
    collections: Mapping[str, CollectionMode | str] | None = None,
    rngs: Sequence[str] = ("dropout",),
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
    """Builds a Flax train step: k micro-batches, then one ``apply_gradients``, in one call.

    Args:
      loss_fn: ``loss_fn(apply, micro_batch)`` returning a scalar loss that is a mean over
        the micro-batch's examples (or valid items, with ``weight_fn``), or ``(loss, aux)``
        with ``has_aux``. ``apply(*args, **kwargs)`` calls ``state.apply_fn`` with the
        params being differentiated, the state's collections (made mutable, each handled
        as its mode says) and this micro-batch's ``rngs``; it returns the model's output.
        A ``loss_fn`` with a parameter named ``params`` also receives the params being
        differentiated, for terms such as weight decay: ``loss_fn(apply, batch, params)``.
      k: micro-batches per update.
      batch_norm: how ``batch_stats`` are updated; see :data:`BatchNormMode`.
      collections: a mode per collection name (see :data:`CollectionMode`); collections
        not named are carried sequentially. ``batch_stats`` is not named here:
        ``batch_norm`` decides it.
      rngs: names of the PRNG streams the model asks for (``self.make_rng(name)``); each
        gets its own key per micro-batch and step. Needs a state with a ``key``.
      weight_fn: ``weight_fn(micro_batch)``, its number of valid items; the gradient is
        then the exact item-weighted mean.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      nonfinite: ``"skip"`` (default: a non-finite micro-batch skips the whole update; params,
        optimizer state, step, collections and key are unchanged, ``skipped`` increments) or
        ``"drop"`` (only bad micro-batches are left out; sequential collections keep the
        value from before a dropped micro-batch; refused when the step is built with
        another collection mode or ``batch_norm="exact"``).
      loss_scale: a :class:`jaxaccum.DynamicLossScale` for float16 compute, or None, as in
        :func:`jaxaccum.train_step`: each micro-batch's loss is multiplied by the scale and
        the accumulated gradient divided by it once; an overflow (any non-finite
        micro-batch) skips the update as ``"skip"`` does and lowers the scale, and
        ``growth_interval`` finite steps in a row raise it. The scale lives in the
        state's ``loss_scale`` (``init`` starts it). Requires ``nonfinite="skip"``. A state
        whose ``dynamic_scale`` field holds a ``flax.training.dynamic_scale.DynamicScale``
        (Flax's ImageNet example) drives the scaling without this option, by Flax's rules.
      split: how the batch is split; see :data:`jaxaccum.Split`.
      unroll: micro-batches per loop iteration (see :func:`jaxaccum.accumulate`; u > 1
        keeps about u micro-batches' activations alive).
      <shared step args>

    Returns:
      A :class:`jaxaccum.TrainStep` with ``init`` and ``update``, callable as ``update``.

      ``init(apply_fn, variables, tx, key=None)`` is :meth:`TrainState.from_variables`
      with this step's ``loss_scale``.

      ``update(state, batch) -> (state, TrainMetrics)``, to be jitted (donate the state).
      ``state`` is a :class:`TrainState`, Flax's own
      ``flax.training.train_state.TrainState``, or a subclass of it that keeps collections
      in fields of their names (``batch_stats: Any``, the flax/examples pattern); those
      fields are read and written back. With ``rngs``, a state with a ``key`` field gives
      micro-batch ``j`` of step ``t`` the stream keys ``fold_in(fold_in(fold_in(key, t),
      j), i)``, the i-th name in ``rngs`` taking ``i``; a second ``apply`` call in the
      same micro-batch folds in its call index once more. A state with a ``dynamic_scale``
      that is not None scales each micro-batch's loss by ``dynamic_scale.scale`` and comes
      back with ``fin_steps`` and ``scale`` updated as Flax's ``DynamicScale`` updates
      them; an overflow skips the update (params, ``opt_state``, ``step`` and collections
      are kept; Flax's example keeps only the params and ``opt_state``).

      Donating the state deletes the arrays it was built from: ``TrainState.create`` and
      :meth:`TrainState.from_variables` keep the params they are given without a copy.
      If the originals are still needed, build the state from
      ``jax.tree.map(jnp.copy, variables)``.

    Raises:
      ValueError: for a bad ``k``, mode, ``nonfinite`` or loss-scale setting at once, and
        there too for ``collections`` naming ``batch_stats`` (``batch_norm`` decides it)
        or ``nonfinite="drop"`` with a collection that is not carried sequentially; at
        trace time, for a collection mode naming a collection the state lacks, exact
        merging of something that is not BatchNorm statistics, a collection that changes
        shape between micro-batches, a model that updates a collection it was not given
        (the message shows the corrected call), a ``state.opt_state`` whose structure or
        leaf shapes differ from ``state.tx.init(state.params)``, ``loss_scale`` with a
        state that holds no loss-scale state (or a state that holds one without
        ``loss_scale``), or a ``state.dynamic_scale`` together with ``loss_scale`` or
        ``nonfinite="drop"``.
      TypeError: for a ``loss_fn`` or ``weight_fn`` that is not callable or a
        ``loss_scale`` of the wrong type at once; at trace time, for a ``state.apply_fn``
        that is not callable, ``apply`` given ``mutable=`` or ``rngs=``, a ``loss_fn`` that
        never calls ``apply``, a ``loss_fn`` whose output does not match ``has_aux`` or
        whose loss is not a scalar, ``rngs`` without a state key, or a
        ``state.dynamic_scale`` that is not a Flax ``DynamicScale``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, jaxaccum.flax
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         x = nn.BatchNorm(use_running_average=not train)(x)
      ...         return nn.Dense(1)(x)[:, 0]
      >>> x, y = jnp.arange(32.0).reshape(16, 2), jnp.arange(16.0)
      >>> variables = Net().init(jax.random.key(0), x, train=False)
      >>> state = jaxaccum.flax.TrainState.from_variables(Net().apply, variables, optax.sgd(0.1))
      >>> def loss_fn(apply, mb):
      ...     return jnp.mean((apply(mb["x"], train=True) - mb["y"]) ** 2)
      >>> step = jax.jit(jaxaccum.flax.train_step(loss_fn, k=4, batch_norm="exact"))
      >>> new, metrics = step(state, {"x": x, "y": y})
      >>> int(new.step), bool(metrics.applied)
      (1, True)
      >>> # one momentum update (0.99) from the whole batch's mean, 15, 16:
      >>> [round(float(m), 4) for m in new.collections["batch_stats"]["BatchNorm_0"]["mean"]]
      [0.15, 0.16]

      ``loss_scale`` for float16 compute. The loss here is float16, so the first scale,
      2**16, is beyond float16's largest value (65504): the step overflows, is skipped and
      halves the scale; the next one applies.

      >>> class Half(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         return nn.Dense(1, dtype=jnp.float16)(x)[:, 0]
      >>> scaling = jaxaccum.DynamicLossScale(init_scale=2.0**16)
      >>> step = jaxaccum.flax.train_step(loss_fn, k=4, loss_scale=scaling)
      >>> variables = Half().init(jax.random.key(0), x, train=False)
      >>> half = step.init(Half().apply, variables, optax.sgd(0.1))  # half.loss_scale set
      >>> small = {"x": x / 32, "y": (y / 16).astype(jnp.float16)}
      >>> for _ in range(2):
      ...     half, metrics = jax.jit(step)(half, small)
      ...     print(bool(metrics.applied), float(half.loss_scale.scale), int(half.step))
      False 32768.0 0
      True 32768.0 1
    """
    wants_params = _takes_params(loss_fn)
    engine = _engine.configure(
        loss_fn,
        ("apply", "micro_batch"),
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
        loss_keywords=("params",) if wants_params else (),
    )
    bn_mode = BatchNormMode.parse(batch_norm, "batch_norm")
    modes_given, rng_names = _checks.collection_options(collections, rngs, CollectionMode)
    _check_modes(modes_given, bn_mode, engine.nonfinite)

    def init(
        apply_fn: Callable[..., Any],
        variables: Mapping[str, Any],
        tx: Any,
        key: jax.Array | None = None,
    ) -> TrainState:
        return TrainState.from_variables(apply_fn, variables, tx, key=key, loss_scale=loss_scale)

    def update(state: Any, batch: Any) -> tuple[Any, TrainMetrics]:
        _checks.flax_state(state)
        cols, with_collections = collections_of(state)
        modes = _modes(list(cols), bn_mode, modes_given)
        model = Model(state.apply_fn, loss_fn, wants_params, modes, rng_names, cols)
        scale, rescale = _scaling(state, engine)
        done = _engine.run(
            engine,
            state.params,
            batch,
            model.forward,
            step=state.step,
            carry=model.carried(),
            loss_scale=scale,
            key=getattr(state, "key", None) if rng_names else None,
            consts=model.given(),
            after=model.after,
            reduce={n: _REDUCE[model.modes[n]] for n in model.fixed},
            finish=model.finish,
            model_axes=lambda: model.axis_names,
        )

        def apply(state: Any) -> Any:  # Flax's own update: a subclass's override runs
            return with_collections(state.apply_gradients(grads=done.grads), done.carry)

        def skip(state: Any) -> Any:
            return state.replace(skipped=state.skipped + 1) if hasattr(state, "skipped") else state

        new = jax.lax.cond(done.metrics.applied, apply, skip, state)
        return rescale(new, done.finite), done.metrics

    return TrainStep(init=init, update=update)


def _scaling(state: Any, engine: _engine.Engine) -> tuple[Any, Callable[[Any, jax.Array], Any]]:
    """The loss-scale state the step starts from (None: no scaling), and how a new state
    gets the next one after a step whose gradient was (not) finite."""
    dynamic = getattr(state, "dynamic_scale", None)
    held = getattr(state, "loss_scale", None)
    config = engine.loss_scale
    if dynamic is not None:
        skips = engine.nonfinite == NonFinite.SKIP
        _checks.dynamic_scale(dynamic, DynamicScale, engine.loss_scale, skips)
        return dynamic, lambda s, finite: s.replace(
            dynamic_scale=_loss_scale.adjust_flax(dynamic, finite)
        )
    if config is None and held is not None:
        raise ValueError(
            "state.loss_scale holds a loss scale, but the step was built without "
            "loss_scale=; build it with the settings the state was made with, "
            "train_step(..., loss_scale=jaxaccum.DynamicLossScale(...)), or drop the scale "
            "from the state: state.replace(loss_scale=None)."
        )
    if config is None:
        return None, lambda s, finite: s
    if not isinstance(held, LossScaleState):
        raise ValueError(
            f"train_step(..., loss_scale={config}) keeps the scale in state.loss_scale, "
            f"which this {type(state).__name__} does not hold; build the state with the "
            "step's init, step.init(model.apply, variables, tx), or "
            "TrainState.from_variables(model.apply, variables, tx, loss_scale=...). With "
            "Flax's own TrainState, give it a dynamic_scale field holding "
            "flax.training.dynamic_scale.DynamicScale() and build the step without "
            "loss_scale=."
        )
    return held, lambda s, finite: s.replace(loss_scale=_loss_scale.adjust(config, held, finite))
