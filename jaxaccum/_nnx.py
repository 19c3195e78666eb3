"""Flax NNX: a train step over an ``nnx.Module`` and its ``nnx.Optimizer``.

Reached as ``jaxaccum.flax.nnx_train_step``; the linen pieces live in ``jaxaccum.flax``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxaccum import _bn, _checks
from jaxaccum._accumulate import accumulate
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

__all__ = ["nnx_train_step"]

Path = tuple[Any, ...]


def _keys(path: Any) -> Path:
    """A state leaf's path as plain keys, without the trailing ``.value``."""
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)


def _batch_norms(model: nnx.Module, exact: bool) -> dict[Path, float]:
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


def _merge_exact(rest: Any, first: Any, second: Any, momenta: dict[Path, float]) -> Any:
    """One momentum update per BatchNorm from the exactly merged micro-batch statistics.

    Given zero running statistics, BatchNorm writes ``(1 - m) * stat_j``; ``first`` is the
    mean of that over the micro-batches and ``second`` the mean of its square. With equal
    micro-batch sizes the whole batch's mean is the mean of the means and its variance
    ``E_j[var_j + mean_j^2] - mean^2``.
    """

    def merge(path: Any, old: Any) -> Any:
        keys = _keys(path)
        if not _is_bn(keys, momenta):
            return old
        module, name = keys[:-1], keys[-1]
        mean = (*module, "mean")
        return _bn.merged_update(
            old, first[keys], first[mean], second[mean], momenta[module], name == "mean"
        )

    return jax.tree_util.tree_map_with_path(merge, rest)


def _split_model(model: nnx.Module, wrt: Any) -> tuple[Any, Any, Any]:
    """``(graphdef, trained, rest)``: the variables ``wrt`` selects, and everything else."""
    parts: Any = nnx.split(model, wrt, ...)
    return parts[0], parts[1], parts[2]


def _is_bn(keys: Path, momenta: dict[Path, float]) -> bool:
    return bool(keys) and keys[:-1] in momenta and keys[-1] in ("mean", "var")


def _bn_stats(rest: Any, momenta: dict[Path, float]) -> dict[Path, jax.Array]:
    """The running mean and variance of every BatchNorm in ``momenta``, by leaf path."""
    flat = jax.tree_util.tree_flatten_with_path(rest)[0]
    return {_keys(path): leaf for path, leaf in flat if _is_bn(_keys(path), momenta)}


def _zero_bn(rest: Any, momenta: dict[Path, float]) -> Any:
    def zero(path: Any, leaf: Any) -> Any:
        return jnp.zeros_like(leaf) if _is_bn(_keys(path), momenta) else leaf

    return jax.tree_util.tree_map_with_path(zero, rest)


def _check_args(loss_fn: Any, weight_fn: Any, batch_norm: Any, nonfinite: Any) -> None:
    _checks.check_functions(loss_fn, weight_fn, "loss_fn(model, micro_batch)")
    if batch_norm not in ("sequential", "exact"):
        raise ValueError(
            f"batch_norm={batch_norm!r} is not one of ('sequential', 'exact'); use "
            "'sequential' (k running-statistics updates per step) or 'exact' (one, merged)."
        )
    if nonfinite not in get_args(NonFinite):
        raise ValueError(f"nonfinite={nonfinite!r} is not one of {get_args(NonFinite)}.")
    if batch_norm == "exact" and nonfinite == "drop":
        raise ValueError(
            "nonfinite='drop' cannot be combined with batch_norm='exact' (a dropped "
            "micro-batch would still count in the merged statistics); use nonfinite='skip' "
            "or batch_norm='sequential'."
        )


def _check_objects(model: Any, optimizer: Any) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"model must be a flax.nnx.Module, got {type(model).__name__}; call "
            "update(model, optimizer, batch)."
        )
    if not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(
            f"optimizer must be a flax.nnx.Optimizer, got {type(optimizer).__name__}; build "
            "it with nnx.Optimizer(model, optax_transform, wrt=nnx.Param)."
        )


def nnx_train_step(
    loss_fn: Callable[..., Any],
    k: int,
    *,
    batch_norm: Literal["sequential", "exact"] = "sequential",
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
) -> Callable[..., TrainMetrics]:
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
      ``update(model, optimizer, batch, key=None) -> TrainMetrics``. It updates ``model``
      and ``optimizer`` in place; wrap it in ``nnx.jit`` (it also runs eagerly).

      ``key`` (optional): with a key, every PRNG key in the model's state (its
      ``nnx.Rngs`` streams, e.g. ``dropout``) is replaced, for micro-batch ``j`` of step
      ``t = optimizer.step``, by ``fold_in(fold_in(fold_in(key, t), j), i)`` for the i-th
      key in state order (with ``k=1``, ``fold_in(fold_in(key, t), i)``: no micro-batch
      fold), and restored afterwards: the same key and state reproduce a
      step bitwise, and every micro-batch and step draws fresh masks. Without a key the
      model's own streams are used, their counters carried from micro-batch to
      micro-batch like any other state.

      Skipped updates: ``metrics.applied`` is False; if the optimizer has a ``skipped``
      ``nnx.Variable`` (``optimizer.skipped = nnx.OptState(jnp.zeros((), jnp.int32))``), it
      is incremented.

    Raises:
      ValueError: for a bad ``k``, ``batch_norm`` or ``nonfinite`` at once; at trace time,
        for ``batch_norm="exact"`` with a BatchNorm not in training mode, state that
        changes structure, shape or dtype during a micro-batch, or an
        ``optimizer.opt_state`` whose structure or leaf shapes differ from
        ``optimizer.tx.init`` of the model's trained variables (an optimizer built for
        another model).
      TypeError: for a ``loss_fn`` or ``weight_fn`` that is not callable at once; at trace
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
      >>> model = Net(nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
      >>> def loss_fn(model, mb):
      ...     return jnp.mean((model(mb["x"]) - mb["y"]) ** 2)
      >>> step = nnx.jit(jaxaccum.flax.nnx_train_step(loss_fn, k=4, batch_norm="exact"))
      >>> x, y = jnp.arange(32.0).reshape(16, 2), jnp.arange(16.0)
      >>> metrics = step(model, optimizer, {"x": x, "y": y})
      >>> int(optimizer.step[...]), bool(metrics.applied), metrics.losses.shape
      (1, True, (4,))
      >>> # one momentum update (0.99) from the whole batch's mean, 15, 16:
      >>> [round(float(m), 4) for m in model.norm.mean[...]]
      [0.15, 0.16]
    """
    k = _checks.check_k(k)
    _check_args(loss_fn, weight_fn, batch_norm, nonfinite)
    exact = batch_norm == "exact"

    def update(
        model: nnx.Module, optimizer: nnx.Optimizer[Any], batch: Any, key: jax.Array | None = None
    ) -> TrainMetrics:
        _check_objects(model, optimizer)
        momenta = _batch_norms(model, exact)
        wrt = optimizer.wrt
        graphdef, params, rest = _split_model(model, wrt)
        _checks.check_opt_state(
            nnx.as_pure(optimizer.opt_state),
            optimizer.tx.init,
            nnx.as_pure(params),
            ("optimizer.opt_state", "optimizer.tx.init(params)"),
            "build the optimizer for this model and the variables it trains: "
            "nnx.Optimizer(model, tx, wrt=nnx.Param).",
        )

        def micro(p: Any, batch: Any, rest: Any, *key: jax.Array) -> tuple[dict[str, Any], Any]:
            given = _reseed(_zero_bn(rest, momenta), key[0] if key else None)

            def loss_of(p: Any) -> tuple[jax.Array, Any]:
                # Copied: variables created in this trace may be updated by the model.
                model = nnx.merge(graphdef, p, given, copy=True)
                loss, aux = _checks.split_loss(loss_fn(model, batch), has_aux)
                return loss, (aux, _split_model(model, wrt)[2])

            (loss, (aux, new)), grads = jax.value_and_grad(loss_of, has_aux=True)(p)
            w = micro_weight(weight_fn, batch)
            outputs, counted = micro_outputs(loss, aux, grads, w, nonfinite)
            stats = {q: v.astype(jnp.float32) for q, v in _bn_stats(new, momenta).items()}
            outputs["stats"] = (stats, {q: jnp.square(v) for q, v in stats.items()})

            def carry(path: Any, n: Any, o: Any) -> Any:
                # Keys go back to the model's own; BatchNorm statistics merged at the end
                # (exact mode) keep the step's value until then.
                if _is_key(o) or _is_bn(_keys(path), momenta):
                    return o
                return jnp.where(counted, n, o)

            return outputs, jax.tree_util.tree_map_with_path(carry, new, rest)

        keys: tuple[jax.Array, ...] = ()
        if key is not None:
            _checks.check_key(key, "key")
            keys = (jax.random.fold_in(key, optimizer.step[...]),)
        accumulated = accumulate(
            micro,
            k,
            batch_argnums=1,
            carry_argnums=2,
            rng_argnums=3 if keys else (),
            reduce=micro_spec(has_aux) | {"stats": Reduce.MEAN},
            split=split,
            unroll=unroll,
            data_axis=data_axis,
            mesh=mesh,
            axis_name=axis_name,
            fsdp=fsdp,
            in_specs=None if param_specs is None else (param_specs,),
        )
        out, final_rest = accumulated(params, batch, rest, *keys)
        result = finish_step(out, jnp.float32(1.0), params, nonfinite, has_aux)
        if exact:
            first, second = out["stats"]
            final_rest = _merge_exact(final_rest, first, second, momenta)
        tx = optimizer.tx

        def do_update(operands: Any) -> Any:
            p, o, _, step = operands
            updates, o = tx.update(nnx.as_pure(result.grads), o, p)
            return optax.apply_updates(p, updates), o, nnx.as_pure(final_rest), step + 1

        def skip_update(operands: Any) -> Any:
            return operands

        operands = (
            nnx.as_pure(params),
            nnx.as_pure(optimizer.opt_state),
            nnx.as_pure(rest),
            optimizer.step[...],
        )
        new_params, new_opt, new_rest, new_step = jax.lax.cond(
            result.metrics.applied, do_update, skip_update, operands
        )
        nnx.update(model, new_params, new_rest)
        nnx.update(optimizer.opt_state, nnx.state(new_opt))
        optimizer.step[...] = new_step
        skipped = getattr(optimizer, "skipped", None)
        if isinstance(skipped, nnx.Variable):
            skipped[...] += (~result.metrics.applied).astype(skipped[...].dtype)
        return result.metrics

    return update
