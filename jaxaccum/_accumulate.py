"""The core transform: run a step function over k micro-batches in one ``lax.scan``.

:func:`accumulate` checks its options once into a :class:`Config`; :func:`bind` makes the
accumulated function, whose every call :func:`jaxaccum._loop.run` carries out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum import _args, _checks, _equinox, _loop, _parallel, _reduce, _split
from jaxaccum._args import ArgRef, BoundCall
from jaxaccum._parallel import FSDP, DataAxis
from jaxaccum._split import Split

F = TypeVar("F", bound=Callable[..., Any])

SCOPE = "jaxaccum.accumulate"


def accumulate(
    step_fn: F,
    k: int,
    *,
    batch_argnums: int | Sequence[int] | None = None,
    batch_argnames: str | Sequence[str] = (),
    carry_argnums: int | Sequence[int] = (),
    carry_argnames: str | Sequence[str] = (),
    rng_argnums: int | Sequence[int] = (),
    rng_argnames: str | Sequence[str] = (),
    weight_fn: Callable[..., Any] | None = None,
    reduce: Any = None,
    split: Split | str = Split.STRIDED,
    accum_dtype: Any = jnp.float32,
    unroll: int | bool = 1,
    data_axis: DataAxis | None = None,
    mesh: jax.sharding.Mesh | None = None,
    axis_name: DataAxis | None = None,
    fsdp: FSDP | str | None = None,
    in_specs: Sequence[Any] | None = None,
    in_axes: int | Sequence[int] = 0,
    num_real_microbatches: int | jax.Array | None = None,
) -> F:
    """Runs ``step_fn`` over k micro-batches of a batch and reduces the outputs.

    The batch argument (any pytree of arrays sharing a leading axis of size N) is split
    into k micro-batches of N/k examples. ``step_fn`` runs on each inside one
    ``jax.lax.scan``, so only one micro-batch's activations are alive at a time, and the
    outputs are combined: floating leaves averaged, integer leaves summed. For a loss that
    is a mean over examples, ``accumulate(jax.value_and_grad(loss), k)`` equals
    ``jax.value_and_grad(loss)`` on the whole batch up to float32 round-off.

    Accumulate the gradient function, do not differentiate the accumulated function:
    ``jax.grad(accumulate(loss, k))`` keeps every micro-batch's residuals alive.

    ``step_fn`` is traced once per compilation, on micro-batch 0 with its whole abstract
    type (its sharding on Explicit mesh axes, its varying axes inside ``shard_map``), and
    the loop body runs that trace: the program holds what a hand-written ``lax.scan``
    calling ``step_fn`` would. ``data_axis`` on Explicit mesh axes traces it once more,
    with parameters typed ``reduced`` (below). When the default backend is the CPU,
    convolutions XLA:CPU would run slowly inside a loop (those not in NHWC/HWIO layout,
    such as the weight gradient of an ordinary convolution) are compiled in that layout
    between transposes for the CPU only; what other backends compile is the plain loop.

    Args:
      step_fn: the function to run per micro-batch, typically ``jax.value_and_grad(loss)``.
      k: the number of micro-batches (static). Every k, 1 included, runs the same
        path: at ``k == 1`` the one micro-batch is the whole batch, called once without
        a loop, and a mean or sum comes back bitwise equal to ``step_fn``'s output;
        a key argument still gets ``fold_in(key, 0)`` and ``STACK`` its leading axis.
      batch_argnums: positions of the batch argument(s); default 1 (``step_fn(params,
        batch)``), or none when ``batch_argnames`` is given.
      batch_argnames: names of batch arguments passed by keyword.
      carry_argnums: positions of carried state (e.g. BatchNorm statistics). ``step_fn``
        then returns ``(outputs, new_state)`` (a tuple of new states, in the order given
        by ``carry_argnums`` then ``carry_argnames``, if several), micro-batch j+1 sees the
        state micro-batch j returned, and the accumulated function returns
        ``(reduced_outputs, final_state)``.
      carry_argnames: names of carried arguments passed by keyword.
      rng_argnums: positions of PRNG keys; micro-batch j receives
        ``jax.random.fold_in(key, j)``.
      rng_argnames: names of PRNG-key arguments passed by keyword.
      weight_fn: called with the micro-batch argument(s), returns a scalar weight
        ``w_j`` (e.g. ``lambda mb: mb["mask"].sum()``); floating outputs then default to
        the weighted mean ``sum_j w_j out_j / sum_j w_j``, exact for token-mean losses.
        Weights <= 0 count as 0; a NaN or infinite weight makes the weighted outputs NaN.
      reduce: a :class:`Reduce` (or its string value), a :class:`Reduction` (your own),
        or a pytree prefix of the outputs with one of those or ``None`` (dtype default)
        at each node.
      split: ``"strided"`` (default), ``"contiguous"`` or ``"presplit"``; see :data:`Split`.
      accum_dtype: dtype of the running sums of floating leaves (promoted with the leaf's
        own dtype, so float64 stays float64); outputs are cast back once at the end. None
        sums each leaf in its own dtype. Weight sums are float32, or float64 when the
        accumulators or floating outputs are.
      unroll: micro-batches per loop iteration, passed to ``jax.lax.scan``. 1 (default)
        keeps one micro-batch's activations alive and program size and compile time
        independent of k; with u > 1 XLA keeps about u micro-batches' activations alive
        at once, giving back the memory accumulation is for.
      data_axis: the mesh axis name(s) the batch's example axis is sharded over. The step
        then sees global types, as under ``jax.jit`` alone (its own ``reshard``,
        ``reduced`` annotations and sharding constraints keep working), each micro-batch
        is sharded over the data axes like the batch, and the result equals one device's.
        On Explicit axes (``jax.make_mesh``'s default) a floating argument replicated
        over the data axes reaches the step typed ``reduced`` over them wherever its uses
        take that type (``dot_general`` does; in jax 0.10 a convolution or a bias added
        to a sharded batch does not), so its gradient is each device's partial sum, added
        up locally and reduced once after the loop: an all-reduce into the argument's
        layout, a reduce-scatter into a sharded one. Other arguments' gradients are
        reduced where the step computes them, as in a hand-written loop; on Auto axes the
        compiler places every reduction (inside the loop), and jaxaccum pins each
        micro-batch to the data axes and each gradient's accumulator to its parameter's
        layout. Arguments sharded over the data axes (FSDP) are handled as ``fsdp`` says.
      mesh: the ``jax.sharding.Mesh`` for ``data_axis``; default: the mesh of the
        arguments' types, or the one set with ``jax.set_mesh``.
      axis_name: axis name(s) bound by the caller: ``accumulate`` is called inside the
        caller's ``jax.shard_map`` or ``jax.pmap`` over them. Each device runs its own
        loop on its own examples and every output is combined over the axes once, after
        it: floating outputs averaged over devices like micro-batches (weighted with
        ``weight_fn``), SUM and integer outputs summed, MAX/MIN taken over devices,
        carried floating state averaged; micro-batch j's key is also folded with the
        device index. Plain arguments are marked varying, so that ``jax.grad`` inside the
        step does not sum them over the devices at every micro-batch. Exclusive with
        ``data_axis``.
      fsdp: with ``data_axis``, what happens to arguments sharded over the data axes:
        ``"per_microbatch"`` (the default: nothing is gathered by jaxaccum) or
        ``"gather_once"``; see :data:`jaxaccum.FSDP`. Refused without ``data_axis``.
      in_specs: with ``data_axis`` on Auto mesh axes, a ``PartitionSpec`` prefix per
        positional argument (batch positions ignored) giving the layouts of traced
        arguments, whose types do not carry them there: a gradient's accumulator is kept
        in its parameter's layout. On Explicit axes the types carry the layouts, and a
        spec given must agree with its argument's type.
      in_axes: the example axis of the batch arguments: one int for all, or one per
        batch argument (``batch_argnums`` then ``batch_argnames``), e.g. 1 for
        time-major ``(T, N, ...)`` batches. The axis is split in place by a free reshape
        (the batch is not moved or copied) and each micro-batch keeps its example axis
        at the same position.
      num_real_microbatches: run only the first m of the k micro-batches (an int in
        [0, k], or an integer scalar that may be traced or batched under ``jax.vmap``;
        traced values are clipped to [0, k]). The loop is then a ``lax.while_loop``:
        ``MEAN`` divides by m, weighted means by the weights that ran, ``LAST`` is
        micro-batch m-1's, rows of ``STACK``/``CONCAT`` outputs for micro-batches that
        did not run are zeros, and m = 0 gives zeros.

    Returns:
      A function with ``step_fn``'s signature returning the reduced outputs, or
      ``(reduced_outputs, final_state)`` when arguments are carried.

    Raises:
      ValueError: for a bad ``k``, ``split``, ``unroll``, ``accum_dtype``, ``in_axes`` or
        concrete ``num_real_microbatches``, an argument given two roles, or a position
        past ``step_fn``'s parameters. At trace time, for batches that cannot be split, a
        ``reduce`` spec that does not fit the outputs, a non-scalar weight, or carried
        state that changes structure, shape or dtype.
      TypeError: at trace time, for non-array batch leaves, a missing batch argument, a
        reduction that does not fit a leaf's dtype, an output that is not an array or a
        number, or an rng argument that is no PRNG key.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxaccum
      >>> def loss(w, batch):
      ...     return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
      >>> w = jnp.ones(3)
      >>> batch = {"x": jnp.arange(24.0).reshape(8, 3), "y": jnp.arange(8.0)}
      >>> grad_fn = jaxaccum.accumulate(jax.value_and_grad(loss), k=4)
      >>> value, grads = jax.jit(grad_fn)(w, batch)
      >>> ref_value, ref_grads = jax.value_and_grad(loss)(w, batch)
      >>> bool(jnp.allclose(value, ref_value)), bool(jnp.allclose(grads, ref_grads))
      (True, True)

      Token-weighted accumulation: each micro-batch's loss is a mean over its valid
      tokens, the weight is its number of valid tokens.

      >>> def token_loss(w, mb):
      ...     err = (mb["x"] @ w - mb["y"]) ** 2
      ...     return jnp.sum(err * mb["mask"]) / jnp.maximum(mb["mask"].sum(), 1)
      >>> batch["mask"] = jnp.array([1, 1, 1, 0, 1, 0, 0, 0], jnp.float32)
      >>> weighted = jaxaccum.accumulate(
      ...     jax.value_and_grad(token_loss), k=2, weight_fn=lambda mb: mb["mask"].sum())
      >>> bool(jnp.allclose(weighted(w, batch)[0], token_loss(w, batch)))
      True

      Per-output reductions, and the split: ``STACK`` keeps each micro-batch's value.
      Strided micro-batch j holds examples j, j+k, …; contiguous holds the j-th block.

      >>> rows = lambda b: b["i"]
      >>> ids = {"i": jnp.arange(6)}
      >>> jaxaccum.accumulate(rows, k=3, batch_argnums=0, reduce="stack")(ids).tolist()
      [[0, 3], [1, 4], [2, 5]]
      >>> jaxaccum.accumulate(
      ...     rows, k=3, batch_argnums=0, reduce=jaxaccum.Reduce.STACK, split="contiguous"
      ... )(ids).tolist()
      [[0, 1], [2, 3], [4, 5]]
      >>> first = lambda b: (b["i"][0], b["i"].sum())  # a prefix spec: one entry per output
      >>> jaxaccum.accumulate(first, k=3, batch_argnums=0, reduce=("last", None))(ids)
      (Array(2, dtype=int32), Array(15, dtype=int32))

      Early stop with a traced count, and a time-major batch (examples on axis 1);
      ``CONCAT`` gives per-example outputs back in the batch's order.

      >>> run = jax.jit(lambda b, m: jaxaccum.accumulate(
      ...     lambda b: b.sum(), k=3, batch_argnums=0, num_real_microbatches=m)(b))
      >>> int(run(jnp.arange(6), 2))  # micro-batches [0, 3] and [1, 4]
      8
      >>> seqs = jnp.arange(12).reshape(2, 6)  # (time, examples)
      >>> jaxaccum.accumulate(lambda s: s[1] * 10, k=3, batch_argnums=0, in_axes=1,
      ...                     reduce="concat")(seqs).tolist()
      [60, 70, 80, 90, 100, 110]

      Keyword batch arguments, and carried state: ``step_fn`` returns ``(out, new_state)``
      and micro-batch j+1 sees micro-batch j's state.

      >>> def count(total, *, batch):
      ...     n = batch["i"].shape[0]
      ...     return jnp.float32(n), total + n
      >>> counted = jaxaccum.accumulate(
      ...     count, k=3, batch_argnames="batch", carry_argnums=0)
      >>> counted(jnp.int32(0), batch=ids)
      (Array(2., dtype=float32), Array(6, dtype=int32))

      Keys: micro-batch j gets ``jax.random.fold_in(key, j)``.

      >>> def noise(key, b):
      ...     return jax.random.uniform(key)
      >>> draws = jaxaccum.accumulate(noise, k=3, rng_argnums=0, reduce="stack")
      >>> key = jax.random.key(0)
      >>> expected = [jax.random.uniform(jax.random.fold_in(key, j)) for j in range(3)]
      >>> bool(jnp.array_equal(draws(key, ids), jnp.stack(expected)))
      True
    """
    _checks.function(step_fn, "step_fn", "step_fn(*args, **kwargs)")
    k = _checks.check_k(k)
    refs = roles(
        step_fn,
        batch_argnums,
        batch_argnames,
        carry_argnums,
        carry_argnames,
        rng_argnums,
        rng_argnames,
    )
    if weight_fn is not None:
        batches = ", ".join(ref.label for ref in refs["batch"])
        n = len(refs["batch"])
        _checks.function(
            weight_fn, "weight_fn", f"weight_fn({batches})", n, fix=_checks.WEIGHT_FN_FIX
        )
    _reduce.spec_members(reduce)
    config = Config(
        refs,
        k,
        weight_fn,
        reduce,
        _split.check_split(split),
        _checks.check_accum_dtype(accum_dtype),
        _checks.check_unroll(unroll),
        _checks.check_in_axes(in_axes, len(refs["batch"])),
        _parallel.options(data_axis, mesh, axis_name, fsdp, in_specs),
        _checks.check_num_real(num_real_microbatches, k),
    )
    return bind(step_fn, config)  # type: ignore[return-value]


def bind(step_fn: Callable[..., Any], config: Config) -> Callable[..., Any]:
    """``step_fn`` run over ``config.k`` micro-batches per call (``config`` checked before)."""

    @_equinox.wraps(step_fn)
    def accumulated(*args: Any, **kwargs: Any) -> Any:
        call = BoundCall(args, kwargs)
        with _parallel.mesh_of((args, kwargs)), jax.named_scope(SCOPE):
            labels = {r.label: None for r in config.roles["batch"]}
            place = _parallel.placement(
                config.parallel,
                call,
                config.roles,
                k=config.k,
                split=config.split,
                in_axes=_split.axes_of(labels, config.in_axes),
            )
            return _loop.run(step_fn, call, config, place, config.num_real)

    return accumulated


def roles(
    step_fn: Callable[..., Any],
    batch_argnums: Any,
    batch_argnames: Any,
    carry_argnums: Any,
    carry_argnames: Any,
    rng_argnums: Any,
    rng_argnames: Any,
) -> dict[str, tuple[ArgRef, ...]]:
    """The batch, carried and key arguments of ``step_fn`` (checked), by role."""
    nums = _args.as_tuple(() if batch_argnums is None else batch_argnums, "batch_argnums", int)
    names = _args.as_tuple(batch_argnames, "batch_argnames", str)
    if batch_argnums is None and not names:
        nums = (1,)
    roles = {
        "batch": _args.resolve_refs(step_fn, nums, names),
        "carry": _args.resolve_refs(
            step_fn,
            _args.as_tuple(carry_argnums, "carry_argnums", int),
            _args.as_tuple(carry_argnames, "carry_argnames", str),
        ),
        "rng": _args.resolve_refs(
            step_fn,
            _args.as_tuple(rng_argnums, "rng_argnums", int),
            _args.as_tuple(rng_argnames, "rng_argnames", str),
        ),
    }
    if not roles["batch"]:
        raise ValueError("no batch argument: give batch_argnums= or batch_argnames=.")
    _checks.check_disjoint(roles)
    return roles


@dataclasses.dataclass(frozen=True)
class Config:
    """``accumulate``'s checked options.

    Attributes:
      roles: the batch, carried and key arguments of the step.
      k: micro-batches per call.
      weight_fn: the micro-batch weight, or None.
      reduce: the ``reduce=`` spec (its members checked).
      split: how the batch is split.
      accum_dtype: the running sums' dtype, or None.
      unroll: micro-batches per loop iteration.
      in_axes: each batch argument's example axis.
      parallel: the device options, or None for one device.
      num_real: micro-batches that run (the rest skipped), or None for all k.
    """

    roles: dict[str, tuple[ArgRef, ...]]
    k: int
    weight_fn: Callable[..., Any] | None
    reduce: Any
    split: Split
    accum_dtype: np.dtype | None
    unroll: int | bool
    in_axes: tuple[int, ...]
    parallel: _parallel.Options | None = None
    num_real: Any = None
