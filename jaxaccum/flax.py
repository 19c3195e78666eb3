"""Flax linen: a TrainState that holds mutable collections, and a step that carries them.

Import it as ``import jaxaccum.flax`` (it needs ``flax``; the rest of jaxaccum does not).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.training import train_state
from flax.training.dynamic_scale import DynamicScale

from jaxaccum import _bn, _checks, _docs, _engine, _loss_scale, _options
from jaxaccum._bn import BatchNormMode
from jaxaccum._engine import NonFinite, TrainMetrics, TrainStep
from jaxaccum._loss_scale import DynamicLossScale, LossScaleState
from jaxaccum._nnx import nnx_train_step as nnx_train_step
from jaxaccum._parallel import FSDP, DataAxis
from jaxaccum._reduce import Reduce
from jaxaccum._split import Split

__all__ = [
    "BatchNormMode",
    "CollectionMode",
    "TrainState",
    "nnx_train_step",
    "train_step",
]


class CollectionMode(_options.Option):
    """How a mutable collection is combined over the k micro-batches of a step.

    A member or its string.

    Attributes:
      SEQUENTIAL: ``"sequential"``: carried through the loop; micro-batch j+1 sees
        micro-batch j's value (and a second ``apply`` call in one micro-batch sees the
        first's).
      EXACT: ``"exact"``: BatchNorm statistics merged exactly, one update per step
        (``batch_stats``; see :class:`BatchNormMode`).
      MEAN: ``"mean"``: every micro-batch starts from the step's value and the k values
        it produces are averaged (in float32), e.g. ``intermediates``.
      SUM: ``"sum"``: as MEAN, summed. Not for counters: a counter that adds 1 per call
        gives ``k * (old + 1)``; carry it with SEQUENTIAL.
      MAX: ``"max"``: as MEAN, the elementwise maximum (amax histories).
      LAST: ``"last"``: as MEAN, the last micro-batch's value.
    """

    SEQUENTIAL = "sequential"
    EXACT = "exact"
    MEAN = "mean"
    SUM = "sum"
    MAX = "max"
    LAST = "last"


_REDUCE = {
    CollectionMode.EXACT: Reduce.MEAN,
    CollectionMode.MEAN: Reduce.MEAN,
    CollectionMode.SUM: Reduce.SUM,
    CollectionMode.MAX: Reduce.MAX,
    CollectionMode.LAST: Reduce.LAST,
}


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` plus mutable collections, a key, a counter.

    Attributes:
      collections: every variable collection other than ``params``, e.g.
        ``{"batch_stats": ...}``; each is carried through the step's micro-batches.
      key: base PRNG key, or None. Step ``t`` uses ``fold_in(key, t)``, micro-batch ``j``
        ``fold_in(fold_in(key, t), j)``, and the i-th name in ``rngs`` (``"dropout"``)
        ``fold_in`` of that with i.
      skipped: updates skipped because a gradient was not finite.
      loss_scale: the dynamic loss-scale state of a step built with ``loss_scale=``
        (:class:`jaxaccum.LossScaleState`), or None.
    """

    collections: dict[str, Any] = struct.field(default_factory=dict)
    key: jax.Array | None = None
    skipped: jax.Array | int = 0
    loss_scale: LossScaleState | None = None

    @classmethod
    def from_variables(
        cls,
        apply_fn: Callable[..., Any],
        variables: Mapping[str, Any],
        tx: Any,
        *,
        key: jax.Array | None = None,
        loss_scale: DynamicLossScale | None = None,
    ) -> TrainState:
        """Builds the state from ``model.init``'s output: ``params`` and every other collection.

        Args:
          apply_fn: usually ``model.apply``.
          variables: what ``model.init(...)`` returned.
          tx: an Optax ``GradientTransformation``.
          key: base PRNG key for dropout and other ``rngs``, or None.
          loss_scale: the :class:`jaxaccum.DynamicLossScale` of a step built with
            ``loss_scale=``: the state starts at its ``init_scale``. None: no loss scaling.

        Returns:
          A :class:`TrainState` at step 0. It holds the very arrays in ``variables`` (no
          copy), so a step jitted with ``donate_argnums=0`` deletes them after its first
          call; pass ``jax.tree.map(jnp.copy, variables)`` to keep the originals usable.

        Raises:
          ValueError: if ``variables`` has no ``params`` collection, or for a bad
            ``loss_scale`` setting.
          TypeError: for a ``loss_scale`` that is not a :class:`jaxaccum.DynamicLossScale`.
        """
        if loss_scale is not None:
            _loss_scale.check_config(loss_scale)
        _checks.flax_variables(apply_fn, variables, tx)
        rest = dict(variables)
        params = rest.pop("params")
        return cls.create(
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            collections=rest,
            key=key,
            skipped=jnp.zeros((), jnp.int32),
            loss_scale=None if loss_scale is None else _loss_scale.init(loss_scale),
        )


def _modes(
    names: Sequence[str], batch_norm: BatchNormMode, collections: Mapping[str, CollectionMode]
) -> dict[str, CollectionMode]:
    unknown = sorted(set(collections) - set(names))
    if unknown:
        raise ValueError(
            f"collections={dict(collections)!r} names {unknown}, which the TrainState does "
            f"not hold (it holds {sorted(names)}); build the state with "
            "jaxaccum.flax.TrainState.from_variables(model.apply, model.init(key, x), tx)."
        )
    return {
        name: collections.get(
            name,
            CollectionMode(batch_norm) if name == "batch_stats" else CollectionMode.SEQUENTIAL,
        )
        for name in names
    }


def _takes_params(loss_fn: Callable[..., Any]) -> bool:
    """Whether ``loss_fn`` has a parameter named ``params`` (passed by keyword)."""
    try:
        parameters = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get("params")
    return param is not None and param.kind != inspect.Parameter.POSITIONAL_ONLY


def _teaching(err: Exception, names: Sequence[str]) -> Exception:
    mutable = sorted(names) or ["batch_stats"]
    if isinstance(err, flax.errors.ScopeCollectionNotFound):
        return ValueError(
            f"the model uses a variable collection the state does not hold ({err}). Create "
            "the state from everything model.init returns, not only its params: "
            "jaxaccum.flax.TrainState.from_variables(model.apply, model.init(key, x), tx); "
            f"the step then passes every collection to the model (mutable={mutable})."
        )
    return ValueError(
        f"the model tried to update a variable collection it was not allowed to ({err}). "
        "Inside jaxaccum.flax.train_step, call the model through the `apply` argument of "
        "loss_fn, which passes the params, every collection of the state and "
        f"mutable={mutable} for you:\n"
        "    def loss_fn(apply, batch):\n"
        "        logits = apply(batch['x'], train=True)\n"
        "        ...\n"
        "and keep the collections in the state: "
        "jaxaccum.flax.TrainState.from_variables(model.apply, model.init(key, x), tx). "
        "Calling the model yourself, the corrected call is\n"
        f"    model.apply({{'params': params, **collections}}, x, train=True, mutable={mutable})"
    )


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
        not named are carried sequentially, ``batch_stats`` as ``batch_norm`` says.
      rngs: names of the PRNG streams the model asks for (``self.make_rng(name)``); each
        gets its own key per micro-batch and step. Needs a state with a ``key``.
      weight_fn: ``weight_fn(micro_batch)``, its number of valid items; the gradient is
        then the exact item-weighted mean.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      nonfinite: ``"skip"`` (default: a non-finite micro-batch skips the whole update; params,
        optimizer state, step, collections and key are unchanged, ``skipped`` increments) or
        ``"drop"`` (only bad micro-batches are left out; sequential collections keep the
        value from before a dropped micro-batch; not with other collection modes).
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
      A :class:`jaxaccum.TrainStep` ``(init, update)``, callable as ``update``.

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
      ValueError: for a bad ``k``, mode, ``nonfinite`` or loss-scale setting at once; at
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
        f"loss_fn(apply, micro_batch{', params=params' if wants_params else ''})",
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
    bn_mode = BatchNormMode.parse(batch_norm, "batch_norm")
    modes_given, rng_names = _checks.collection_options(collections, rngs, CollectionMode)

    def init(
        apply_fn: Callable[..., Any],
        variables: Mapping[str, Any],
        tx: Any,
        key: jax.Array | None = None,
    ) -> TrainState:
        return TrainState.from_variables(apply_fn, variables, tx, key=key, loss_scale=loss_scale)

    def update(state: Any, batch: Any) -> tuple[Any, TrainMetrics]:
        _checks.flax_state(state)
        cols, with_collections = _collections_of(state)
        modes = _modes(list(cols), bn_mode, modes_given)
        model = _Model(state.apply_fn, loss_fn, wants_params, modes, rng_names, cols)
        if engine.nonfinite == NonFinite.DROP and model.fixed:
            raise ValueError(
                f"nonfinite='drop' works with sequential collections only, got modes "
                f"{ {n: str(m) for n, m in model.modes.items()} }; use nonfinite='skip' or "
                "carry every collection with 'sequential'."
            )
        scale, rescale = _scaling(state, engine)
        core = _engine.Core(state.params, state.opt_state, state.step, None, model.carried(), scale)
        return _engine.run(
            engine,
            state.tx,
            core,
            batch,
            model.forward,
            key=getattr(state, "key", None) if rng_names else None,
            consts=model.given(),
            after=model.after,
            reduce={n: _REDUCE[model.modes[n]] for n in model.fixed},
            finish=model.finish,
            commit=_commit(state, with_collections, rescale),
        )

    return TrainStep(init=init, update=update)


def _commit(
    state: Any,
    with_collections: Callable[[Any, dict[str, Any]], Any],
    rescale: Callable[[Any, jax.Array], Any],
) -> _engine.Commit:
    """Flax's ``apply_gradients`` and the new collections if the step applies, else a skip
    (only a ``skipped`` counter moves); then the next loss scale."""

    def commit(done: _engine.Accumulated) -> Any:
        def apply(state: Any) -> Any:
            return with_collections(state.apply_gradients(grads=done.grads), done.carry)

        def skip(state: Any) -> Any:
            return state.replace(skipped=state.skipped + 1) if hasattr(state, "skipped") else state

        return rescale(jax.lax.cond(done.metrics.applied, apply, skip, state), done.finite)

    return commit


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


class _Model:
    """A linen model inside the engine's micro-batch loop, for one traced step.

    Sequential collections travel as the engine's carry; the others (``fixed``) start each
    micro-batch from the step's value (exact BatchNorm statistics from zero, so what the
    layer writes is its statistic) and are reduced over the micro-batches. The momentum of
    every ``nn.BatchNorm`` called is recorded for the exact merge.
    """

    def __init__(
        self,
        apply_fn: Callable[..., Any],
        loss_fn: Callable[..., Any],
        wants_params: bool,
        modes: dict[str, CollectionMode],
        rng_names: tuple[str, ...],
        cols: dict[str, Any],
    ) -> None:
        self.apply_fn, self.loss_fn, self.wants_params = apply_fn, loss_fn, wants_params
        self.modes, self.rng_names = modes, rng_names
        self.names = list(modes)
        self.fixed = [n for n in modes if modes[n] != CollectionMode.SEQUENTIAL]
        self.momenta: dict[tuple[str, ...], float] = {}
        self.cols = cols  # the step's collections, before any micro-batch

    def carried(self) -> dict[str, Any]:
        return {n: v for n, v in self.cols.items() if n not in self.fixed}

    def given(self) -> dict[str, Any]:
        exact = lambda n: self.modes[n] == CollectionMode.EXACT  # noqa: E731
        return {
            n: jax.tree.map(jnp.zeros_like, self.cols[n]) if exact(n) else self.cols[n]
            for n in self.fixed
        }

    def _record(self, next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            self.momenta[tuple(context.module.path)] = float(context.module.momentum)
        return next_fun(*args, **kwargs)

    def forward(self, p: Any, batch: Any, carry: Any, fixed: Any, key: Any) -> tuple[Any, Any]:
        """The user's loss on one micro-batch, and the collections its ``apply`` calls left."""
        streams = {} if key is None else _engine.stream_keys(key, self.rng_names)
        calls: list[dict[str, Any]] = []

        def apply(*args: Any, **kwargs: Any) -> Any:
            self._check_call(kwargs, len(calls), fixed)
            # A later call sees the collections as the earlier calls left them.
            variables = {"params": p, **carry, **(calls[-1] if calls else {}), **fixed}
            rngs = {n: jax.random.fold_in(r, len(calls)) for n, r in streams.items()}
            extra = {"rngs": rngs if calls else streams} if streams else {}
            with nn.intercept_methods(self._record):
                if not self.names:
                    calls.append({})
                    return self.apply_fn(variables, *args, **extra, **kwargs)
                out, new = self.apply_fn(variables, *args, mutable=self.names, **extra, **kwargs)
            calls.append({**(calls[-1] if calls else {}), **dict(new)})
            return out

        try:
            out = self.loss_fn(apply, batch, **({"params": p} if self.wants_params else {}))
        except (flax.errors.ModifyScopeVariableError, flax.errors.ScopeCollectionNotFound) as err:
            raise _teaching(err, self.names) from err
        except flax.errors.InvalidRngError as err:
            raise TypeError(
                f"the model asked for a PRNG stream the step did not give it ({err}). "
                f"The step passes rngs={list(self.rng_names)} from the state's key: build the "
                "state with a key, TrainState.from_variables(model.apply, variables, tx, "
                "key=jax.random.key(0)), and name every stream the model uses in "
                "train_step(..., rngs=('dropout', ...))."
            ) from err
        if self.names and not calls:
            raise TypeError(
                f"loss_fn never called `apply`, so the collections {self.names} were not "
                "updated; compute the model's output with apply(x, ...) inside loss_fn."
            )
        return out, calls[-1] if calls else {}

    def _check_call(self, kwargs: dict[str, Any], calls: int, fixed: Any) -> None:
        if "mutable" in kwargs or "rngs" in kwargs:
            raise TypeError(
                "apply(...) passes mutable= and rngs= itself (from the state's "
                "collections and the train step's rngs); call it without them."
            )
        if calls and fixed:
            raise ValueError(
                f"loss_fn called apply {calls + 1} times in one micro-batch, but the "
                f"collections {sorted(fixed)} (modes "
                f"{ {n: str(self.modes[n]) for n in sorted(fixed)} }) are combined from one "
                "update per micro-batch, so a second update would be lost; call apply once "
                "per micro-batch (concatenate the inputs), or carry them with "
                "collections={name: 'sequential'}, which threads every call's updates into "
                "the next."
            )

    def after(self, new: Any, carry: Any, fixed: Any, counted: jax.Array) -> tuple[Any, Any]:
        """Sequential collections move on (a dropped micro-batch leaves them); the others'
        values are what gets reduced."""
        for n, old in {**carry, **fixed}.items():
            _checks.collection_layout(n, new.get(n, old), old)
        moved = {
            n: jax.tree.map(lambda a, b: jnp.where(counted, a, b), new.get(n, v), v)
            for n, v in carry.items()
        }
        reduced = {
            n: _bn.moments(new.get(n, v), self.momenta, _linen_keys)
            if self.modes[n] == CollectionMode.EXACT
            else new.get(n, v)
            for n, v in fixed.items()
        }
        return reduced, moved

    def finish(self, reduced: Any, carry: Any) -> Any:
        """Every collection after the step: merged, reduced or carried."""

        def one(n: str) -> Any:
            v = self.cols[n]
            if self.modes[n] == CollectionMode.EXACT:
                first, second = reduced[n]
                return _bn.merge(v, first, second, self.momenta, _linen_keys, only_stats=n)
            return jax.tree.map(lambda r, o: r.astype(jnp.asarray(o).dtype), reduced[n], v)

        return {**carry, **{n: one(n) for n in self.fixed}}


def _linen_keys(path: Any) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


_FLAX_FIELDS = {f.name for f in dataclasses.fields(train_state.TrainState)}


def _collections_of(state: Any) -> tuple[dict[str, Any], Callable[[Any, dict[str, Any]], Any]]:
    """The state's variable collections, and how to put new ones back.

    jaxaccum's :class:`TrainState` keeps them in ``collections``; a subclass of Flax's own
    ``TrainState`` (the flax/examples pattern) keeps each in a field of its name, such as
    ``batch_stats``.
    """
    if isinstance(state, TrainState):
        cols = dict(state.collections or {})
        return cols, lambda s, new: s.replace(collections=new) if cols else s
    names = [
        f.name
        for f in (dataclasses.fields(state) if dataclasses.is_dataclass(state) else ())
        if f.name not in _FLAX_FIELDS and isinstance(getattr(state, f.name), Mapping)
    ]
    return {n: getattr(state, n) for n in names}, lambda s, new: s.replace(
        **{n: new[n] for n in names}
    )
