"""Flax linen: a TrainState that holds mutable collections, and a step that carries them.

Import it as ``import jaxaccum.flax`` (it needs ``flax``; the rest of jaxaccum does not).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.training import train_state

from jaxaccum import _bn, _checks, _split
from jaxaccum._accumulate import accumulate
from jaxaccum._nnx import nnx_train_step as nnx_train_step
from jaxaccum._reduce import Reduce
from jaxaccum._sharding import FSDP, DataAxis
from jaxaccum._split import Split
from jaxaccum._train import (
    NonFinite,
    TrainMetrics,
    finish_step,
    micro_outputs,
    micro_spec,
    micro_weight,
)

__all__ = [
    "BatchNormMode",
    "CollectionMode",
    "TrainState",
    "nnx_train_step",
    "train_step",
]

BatchNormMode = Literal["sequential", "exact"]
"""How ``batch_stats`` (Flax BatchNorm running statistics) are updated in a step.

* ``"sequential"`` (default): micro-batch j normalises with its own statistics and updates
  the running statistics, in order: k momentum updates per step, as k consecutive
  ``apply(..., mutable=["batch_stats"])`` calls of a hand-written loop (PyTorch's and
  T5X's behaviour with accumulation).
* ``"exact"``: micro-batch j still normalises with its own statistics (in one pass nothing
  else is possible), but the running statistics get **one** momentum update per step, from
  the statistics of all k micro-batches merged exactly (count, mean and sum of squares:
  the parallel-variance combination), which is what the full batch would have computed.
  Only ``flax.linen.BatchNorm`` statistics can be merged this way.
"""

CollectionMode = Literal["sequential", "exact", "mean", "sum", "max", "last"]
"""How a mutable collection is combined over the k micro-batches of a step.

* ``"sequential"``: carried through the loop; micro-batch j+1 sees micro-batch j's value.
* ``"exact"``: BatchNorm statistics merged exactly, one update per step (``batch_stats``).
* ``"mean"``, ``"sum"``, ``"max"``, ``"last"``: every micro-batch starts from the step's
  value, and the k values it produces are averaged (in float32), summed, maximised, or the
  last kept. For counters (``"sum"`` of increments is not what you want: a counter that adds
  1 per call gives ``k * (old + 1)``; carry it with ``"sequential"``), ``intermediates``
  (``"last"`` or ``"mean"``) or amax histories (``"max"``).
"""

_REDUCE: dict[str, Reduce] = {
    "mean": Reduce.MEAN,
    "sum": Reduce.SUM,
    "max": Reduce.MAX,
    "last": Reduce.LAST,
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
    """

    collections: dict[str, Any] = struct.field(default_factory=dict)
    key: jax.Array | None = None
    skipped: jax.Array | int = 0

    @classmethod
    def from_variables(
        cls,
        apply_fn: Callable[..., Any],
        variables: Mapping[str, Any],
        tx: Any,
        *,
        key: jax.Array | None = None,
    ) -> TrainState:
        """Builds the state from ``model.init``'s output: ``params`` and every other collection.

        Args:
          apply_fn: usually ``model.apply``.
          variables: what ``model.init(...)`` returned.
          tx: an Optax ``GradientTransformation``.
          key: base PRNG key for dropout and other ``rngs``, or None.

        Returns:
          A :class:`TrainState` at step 0. It holds the very arrays in ``variables`` (no
          copy), so a step jitted with ``donate_argnums=0`` deletes them after its first
          call; pass ``jax.tree.map(jnp.copy, variables)`` to keep the originals usable.

        Raises:
          ValueError: if ``variables`` has no ``params`` collection.
        """
        rest = dict(variables)
        if "params" not in rest:
            raise ValueError(
                f"variables has no 'params' collection (it has {sorted(rest)}); pass what "
                "model.init(key, x) returned."
            )
        params = rest.pop("params")
        return cls.create(
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            collections=rest,
            key=key,
            skipped=jnp.zeros((), jnp.int32),
        )


def _modes(
    names: Sequence[str], batch_norm: BatchNormMode, collections: Mapping[str, CollectionMode]
) -> dict[str, str]:
    unknown = sorted(set(collections) - set(names))
    if unknown:
        raise ValueError(
            f"collections={dict(collections)!r} names {unknown}, which the TrainState does "
            f"not hold (it holds {sorted(names)}); build the state with "
            "jaxaccum.flax.TrainState.from_variables(model.apply, model.init(key, x), tx)."
        )
    return {
        name: collections.get(name, batch_norm if name == "batch_stats" else "sequential")
        for name in names
    }


def _merge_exact(
    name: str, old: Any, first: Any, second: Any, momenta: Mapping[tuple[str, ...], float]
) -> Any:
    """One momentum update from the exactly merged statistics of the k micro-batches.

    Given zero running statistics, BatchNorm writes ``(1 - m) * stat_j`` for micro-batch j;
    ``first`` is the mean of that over the micro-batches and ``second`` the mean of its
    square. With equal micro-batch sizes, the whole batch's mean is the mean of the means,
    and its variance is E_j[var_j + mean_j^2] - mean^2.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(old)
    keyed = {
        tuple(str(getattr(p, "key", p)) for p in path): (leaf, f, s)
        for (path, leaf), f, s in zip(
            flat, jax.tree.leaves(first), jax.tree.leaves(second), strict=True
        )
    }
    merged = []
    for path, _ in flat:
        keys = tuple(str(getattr(p, "key", p)) for p in path)
        module, leaf_name = keys[:-1], keys[-1]
        if module not in momenta or leaf_name not in ("mean", "var"):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} is not the running mean or variance of a "
                "flax.linen.BatchNorm, so it cannot be merged exactly; choose "
                "batch_norm='sequential' or give it another mode, e.g. "
                f"collections={{{name!r}: 'sequential'}}."
            )
        old_leaf, f, _ = keyed[keys]
        _, f_mean, s_mean = keyed[(*module, "mean")]
        merged.append(
            _bn.merged_update(old_leaf, f, f_mean, s_mean, momenta[module], leaf_name == "mean")
        )
    return jax.tree.unflatten(treedef, merged)


def _takes_params(loss_fn: Callable[..., Any]) -> bool:
    """Whether ``loss_fn`` has a parameter named ``params`` (passed by keyword)."""
    try:
        parameters = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get("params")
    return param is not None and param.kind != inspect.Parameter.POSITIONAL_ONLY


_UNBOUND = re.compile(r"unbound axis name: ([^\s.]+)")


def _bind_unbound_axes(fn: Callable[..., Any], args: tuple[Any, ...], devices: Any) -> Any:
    """``fn(*args)``; on one device, axis names the model reduces over are bound (size 1).

    A Flax model written for ``pmap`` (``BatchNorm(axis_name="batch")``, as in Flax's
    ImageNet example) averages its statistics over that axis. Called without the axis bound
    (one device, no ``pmap``, no ``axis_name=``), the step binds it with a size-1
    ``jax.vmap``, over which a mean is the value itself: the single-device result.
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


def train_step(
    loss_fn: Callable[..., Any],
    k: int,
    *,
    batch_norm: BatchNormMode = "sequential",
    collections: Mapping[str, CollectionMode] | None = None,
    rngs: Sequence[str] = ("dropout",),
    weight_fn: Callable[[Any], Any] | None = None,
    has_aux: bool = False,
    nonfinite: NonFinite = "skip",
    split: Split = "strided",
    unroll: int | bool = 1,
    data_axis: DataAxis | None = None,
    mesh: jax.sharding.Mesh | None = None,
    axis_name: DataAxis | None = None,
    fsdp: FSDP = "per_microbatch",
    param_specs: Any = None,
) -> Callable[[Any, Any], tuple[Any, TrainMetrics]]:
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
      ``update(state, batch) -> (state, TrainMetrics)``, to be jitted (donate the state).
      ``state`` is a :class:`TrainState` or a plain ``flax.training.train_state.TrainState``
      (no collections, no key).

      Donating the state deletes the arrays it was built from: ``TrainState.create`` and
      :meth:`TrainState.from_variables` keep the params they are given without a copy.
      If the originals are still needed, build the state from
      ``jax.tree.map(jnp.copy, variables)``.

    Raises:
      ValueError: for a bad ``k``, mode or ``nonfinite`` at once; at trace time, for a
        collection mode naming a collection the state lacks, exact merging of something
        that is not BatchNorm statistics, a collection that changes shape between
        micro-batches, a model that updates a collection it was not given (the message
        shows the corrected call), or a ``state.opt_state`` whose structure or leaf shapes
        differ from ``state.tx.init(state.params)``.
      TypeError: for a ``loss_fn`` or ``weight_fn`` that is not callable at once; at trace
        time, for a ``state.apply_fn`` that is not callable, ``apply`` given ``mutable=``
        or ``rngs=``, a ``loss_fn`` that never calls ``apply``, a ``loss_fn`` whose output
        does not match ``has_aux`` or whose loss is not a scalar, or ``rngs`` without a
        state key.

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
    """
    k = _checks.check_k(k)
    _checks.check_functions(loss_fn, weight_fn, "loss_fn(apply, micro_batch)")
    wants_params = _takes_params(loss_fn)
    if batch_norm not in get_args(BatchNormMode):
        raise ValueError(f"batch_norm={batch_norm!r} is not one of {get_args(BatchNormMode)}.")
    modes_given = dict(collections or {})
    for name, mode in modes_given.items():
        if mode not in get_args(CollectionMode):
            raise ValueError(
                f"collections[{name!r}]={mode!r} is not one of {get_args(CollectionMode)}."
            )
    if nonfinite not in get_args(NonFinite):
        raise ValueError(f"nonfinite={nonfinite!r} is not one of {get_args(NonFinite)}.")
    rng_names = tuple(rngs)

    def update(state: Any, batch: Any) -> tuple[Any, TrainMetrics]:
        _check_state(state)
        cols, with_collections = _collections_of(state)
        modes = _modes(list(cols), batch_norm, modes_given)
        if nonfinite == "drop" and any(m != "sequential" for m in modes.values()):
            raise ValueError(
                f"nonfinite='drop' works with sequential collections only, got modes {modes}; "
                "use nonfinite='skip' or carry every collection with 'sequential'."
            )
        carried = {n: v for n, v in cols.items() if modes[n] == "sequential"}
        given = {
            n: jax.tree.map(jnp.zeros_like, v) if modes[n] == "exact" else v
            for n, v in cols.items()
            if modes[n] != "sequential"
        }
        names = list(carried) + list(given)
        base_key = getattr(state, "key", None)
        momenta: dict[tuple[str, ...], float] = {}

        def record(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
            if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
                momenta[tuple(context.module.path)] = float(context.module.momentum)
            return next_fun(*args, **kwargs)

        def micro(params: Any, batch: Any, seq: Any, fixed: Any, *key: jax.Array) -> Any:
            streams = {n: jax.random.fold_in(key[0], i) for i, n in enumerate(rng_names) if key}
            box: dict[str, Any] = {}

            def loss_of(p: Any) -> tuple[jax.Array, Any]:
                def apply(*args: Any, **kwargs: Any) -> Any:
                    if "mutable" in kwargs or "rngs" in kwargs:
                        raise TypeError(
                            "apply(...) passes mutable= and rngs= itself (from the state's "
                            "collections and the train step's rngs); call it without them."
                        )
                    calls = box.get("calls", 0)
                    box["calls"] = calls + 1
                    if calls and names and fixed:
                        raise ValueError(
                            f"loss_fn called apply {calls + 1} times in one micro-batch, but "
                            f"the collections {sorted(fixed)} (modes "
                            f"{ {n: modes[n] for n in sorted(fixed)} }) are combined from one "
                            "update per micro-batch, so a second update would be lost; call "
                            "apply once per micro-batch (concatenate the inputs), or carry "
                            "them with collections={name: 'sequential'}, which threads every "
                            "call's updates into the next."
                        )
                    # A later call sees the collections as the earlier calls left them.
                    current = {**seq, **box.get("new", {})}
                    variables = {"params": p, **current, **fixed}
                    rngs = {n: jax.random.fold_in(r, calls) for n, r in streams.items()}
                    extra = {"rngs": rngs if calls else streams} if key else {}
                    with nn.intercept_methods(record):
                        if not names:
                            return state.apply_fn(variables, *args, **extra, **kwargs)
                        out, new = state.apply_fn(
                            variables, *args, mutable=names, **extra, **kwargs
                        )
                    box["new"] = {**box.get("new", {}), **dict(new)}
                    return out

                try:
                    out = loss_fn(apply, batch, **({"params": p} if wants_params else {}))
                except (
                    flax.errors.ModifyScopeVariableError,
                    flax.errors.ScopeCollectionNotFound,
                ) as err:
                    raise _teaching(err, names) from err
                except flax.errors.InvalidRngError as err:
                    raise TypeError(
                        f"the model asked for a PRNG stream the step did not give it ({err}). "
                        f"The step passes rngs={list(rng_names)} from the state's key: build the "
                        "state with a key, TrainState.from_variables(model.apply, variables, tx, "
                        "key=jax.random.key(0)), and name every stream the model uses in "
                        "train_step(..., rngs=('dropout', ...))."
                    ) from err
                if names and "new" not in box:
                    raise TypeError(
                        "loss_fn never called `apply`, so the collections "
                        f"{names} were not updated; compute the model's output with "
                        "apply(x, ...) inside loss_fn."
                    )
                loss, aux = _checks.split_loss(out, has_aux)
                return loss, (aux, box.get("new", {}))

            (loss, (aux, new)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
            outputs, counted = micro_outputs(
                loss, aux, grads, micro_weight(weight_fn, batch), nonfinite
            )
            new_seq = {}
            for n, old in seq.items():
                value = new.get(n, old)
                _check_same_layout(n, value, old)
                new_seq[n] = jax.tree.map(lambda a, b: jnp.where(counted, a, b), value, old)
            reduced = {}
            for n, old in fixed.items():
                value = new.get(n, old)
                _check_same_layout(n, value, old)
                if modes[n] == "exact":
                    means = jax.tree.map(lambda v: v.astype(jnp.float32), value)
                    reduced[n] = (means, jax.tree.map(jnp.square, means))
                else:
                    reduced[n] = value
            return {**outputs, "collections": reduced}, new_seq

        spec = micro_spec(has_aux) | {
            "collections": {
                n: Reduce.MEAN if modes[n] == "exact" else _REDUCE[modes[n]] for n in given
            }
        }
        accumulated = accumulate(
            micro,
            k,
            batch_argnums=1,
            carry_argnums=2,
            rng_argnums=4 if rng_names and base_key is not None else (),
            reduce=spec,
            split=split,
            unroll=unroll,
            data_axis=data_axis,
            mesh=mesh,
            axis_name=axis_name,
            fsdp=fsdp,
            in_specs=None if param_specs is None else (param_specs,),
        )
        keys: tuple[jax.Array, ...] = ()
        if base_key is not None and rng_names:
            keys = (jax.random.fold_in(base_key, state.step),)
        args = (state.params, batch, carried, given, *keys)
        out, final_seq = _bind_unbound_axes(accumulated, args, data_axis or axis_name)
        result = finish_step(out, jnp.float32(1.0), state.params, nonfinite, has_aux)
        new_cols = dict(final_seq)
        for n in given:
            if modes[n] == "exact":
                first, second = out["collections"][n]
                new_cols[n] = _merge_exact(n, cols[n], first, second, momenta)
            else:
                new_cols[n] = jax.tree.map(
                    lambda v, o: v.astype(jnp.asarray(o).dtype), out["collections"][n], cols[n]
                )

        def do_update(state: Any) -> Any:
            state = state.apply_gradients(grads=result.grads)
            return with_collections(state, new_cols)

        def skip_update(state: Any) -> Any:
            if hasattr(state, "skipped"):
                return state.replace(skipped=state.skipped + 1)
            return state

        new_state = jax.lax.cond(result.metrics.applied, do_update, skip_update, state)
        return new_state, result.metrics

    return update


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


def _check_state(state: Any) -> None:
    """Raises unless ``state`` can run the step: a callable model and a matching opt_state."""
    if not callable(getattr(state, "apply_fn", None)):
        raise TypeError(
            f"state.apply_fn must be the model's apply function, got "
            f"{type(getattr(state, 'apply_fn', None)).__name__}; build the state with "
            "jaxaccum.flax.TrainState.from_variables(model.apply, model.init(key, x), tx)."
        )
    _checks.check_opt_state(
        state.opt_state,
        state.tx.init,
        state.params,
        ("state.opt_state", "state.tx.init(state.params)"),
        "build the state with its optimizer, TrainState.from_variables(model.apply, "
        "variables, tx), or to switch optimizers start a new optimizer state: "
        "state.replace(tx=tx, opt_state=tx.init(state.params)).",
    )


def _check_same_layout(name: str, new: Any, old: Any) -> None:
    """Raises if a collection changed structure or shape within one micro-batch's call."""
    # PyTreeDef comes from jaxlib without annotations that mypy can resolve.
    before: Any = jax.tree.structure(old)
    after: Any = jax.tree.structure(new)
    if before != after:
        raise ValueError(
            f"collection {name!r} changed structure during a micro-batch: it had\n  "
            f"{before}\nbefore and\n  {after}\nafter. "
            "A collection carried through the micro-batches must keep its layout. For sown "
            "values, overwrite instead of appending: self.sow(..., reduce_fn=lambda a, b: b, "
            "init_fn=lambda: jnp.zeros(shape)), and create the state from model.init(key, x, "
            "mutable=True) so the collection exists from the start."
        )
    bad = [
        f"{path}: {jnp.shape(o)} {_split.leaf_dtype(o)} -> {jnp.shape(n)} {_split.leaf_dtype(n)}"
        for path, o, n in _split.changed_leaves(old, new, name)
    ]
    if bad:
        raise ValueError(
            f"collection {name!r} changed shape or dtype between micro-batches: "
            + "; ".join(bad)
            + ". Variables that depend on the batch size must be initialised with a "
            "micro-batch: model.init(key, x[: N // k]), and must not grow with the batch."
        )
