"""The core transform: run a step function over k micro-batches in one ``lax.scan``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum import _args, _checks, _cpu_conv, _devices, _layouts, _reduce, _sharding, _split
from jaxaccum._args import ArgRef, BoundCall
from jaxaccum._devices import Local
from jaxaccum._sharding import FSDP, DataAxis
from jaxaccum._split import Split

F = TypeVar("F", bound=Callable[..., Any])

SCOPE = "jaxaccum.accumulate"


def _check_carry(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Raises if the carried state coming out of step_fn differs in structure or type.

    Both maps go from a carried argument's label to its (abstract) value.
    """
    # PyTreeDef comes from jaxlib without annotations that mypy can resolve.
    s_before: Any = jax.tree.structure(before)
    s_after: Any = jax.tree.structure(after)
    if s_before != s_after:
        raise ValueError(
            "step_fn returned carried state with a different structure from what it "
            f"received:\n  received: {s_before}\n  returned: {s_after}\nReturn "
            "(outputs, new_state) where new_state has the structure of the carried argument(s)."
        )
    changed = [
        f"{path}: {a.shape} {a.dtype} -> {b.shape} {b.dtype}"
        for label in before
        for path, a, b in _split.changed_leaves(before[label], after[label], label)
    ]
    if changed:
        raise ValueError(
            "carried state changed shape or dtype between micro-batches (lax.scan needs a "
            "fixed carry): " + "; ".join(changed) + ". Cast the new state back in step_fn, "
            "e.g. new.astype(old.dtype)."
        )


def _check_weight(shape: Any) -> None:
    if not (
        hasattr(shape, "shape") and shape.shape == () and jnp.issubdtype(shape.dtype, jnp.number)
    ):
        got = f"shape {shape.shape} dtype {shape.dtype}" if hasattr(shape, "shape") else shape
        raise ValueError(
            f"weight_fn must return one real scalar per micro-batch (e.g. mask.sum()), got {got}."
        )


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
    fsdp: FSDP | str = FSDP.PER_MICROBATCH,
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

    The loop body calls ``step_fn`` on the micro-batch as a hand-written ``lax.scan``
    would, with the micro-batch's whole abstract type (its sharding on Explicit mesh
    axes, its varying axes inside ``shard_map``); ``step_fn`` is traced twice per
    compilation (once for the output types, once in the loop; ``data_axis`` with sharded
    arguments adds an abstract pass that finds the gradients' output specs, and a CPU
    convolution rewrite one more trace). When the default backend is the CPU,
    convolutions XLA:CPU would run slowly inside a loop (those not in NHWC/HWIO layout,
    such as the weight gradient of an ordinary convolution) are compiled in that layout
    between transposes for the CPU only; what other backends compile is the plain loop.

    Args:
      step_fn: the function to run per micro-batch, typically ``jax.value_and_grad(loss)``.
      k: the number of micro-batches (static). ``k == 1`` returns ``step_fn`` itself,
        unless a ``STACK``/``CONCAT`` or user-defined reduction, ``num_real_microbatches``,
        devices (``data_axis``, ``axis_name``) or keys (``rng_argnums``: micro-batch 0
        gets ``fold_in(key, 0)`` for every k) need the loop's bookkeeping.
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
      data_axis: mesh axis name(s) over which the batch's leading axis is sharded. The
        accumulation then runs under ``jax.shard_map``: each device scans its own k
        micro-batches of N/(k·devices) examples with no communication, and every output
        is combined over the devices once, after the loop (one all-reduce per step
        instead of one per micro-batch). Floating outputs are averaged over devices like
        micro-batches (weighted with ``weight_fn``), SUM and integer outputs summed,
        MAX/MIN taken over devices; carried floating state is averaged over devices after
        the loop; micro-batch j's key is also folded with the device index. Arguments
        replicated over the data axes stay so. Arguments sharded over them (FSDP params)
        are gathered as ``fsdp`` says, and an output with the structure and shapes of
        such an argument (its gradient) is reduce-scattered back into its sharding.
        Other mesh axes (tensor parallelism) stay under the compiler's control.
      mesh: the ``jax.sharding.Mesh`` for ``data_axis``; default: the mesh set with
        ``jax.set_mesh``.
      axis_name: axis name(s) already bound by the caller: ``accumulate`` is called
        inside the caller's ``jax.shard_map`` or ``jax.pmap`` over them. Each device
        runs its own loop and the outputs are combined over the axes once, after it,
        with the semantics of ``data_axis``; non-batch arguments are marked varying so
        that ``jax.grad`` inside the step does not sum them at every micro-batch.
        Exclusive with ``data_axis``.
      fsdp: with ``data_axis``, how arguments sharded over the data axes are gathered:
        ``"per_microbatch"`` (default) or ``"gather_once"``; see :data:`jaxaccum.FSDP`.
      in_specs: with ``data_axis``, a ``PartitionSpec`` prefix per positional argument
        (batch positions ignored), saying which arguments are sharded over the data
        axes. Default: read from each argument's type, which carries it on meshes with
        Explicit axes (``jax.make_mesh``'s default); traced arrays on Auto axes carry no
        placement and are taken as replicated unless given here.
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
    k = _checks.check_k(k)
    split = _split.check_split(split)
    unroll = _checks.check_unroll(unroll)
    accum = _checks.check_accum_dtype(accum_dtype)
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be callable, got {type(weight_fn).__name__}.")
    spec = _reduce.spec_members(reduce)
    nums = _args.as_tuple(() if batch_argnums is None else batch_argnums, "batch_argnums", int)
    if batch_argnums is None and not batch_argnames:
        nums = (1,)
    roles = {
        "batch": _args.resolve_refs(
            step_fn, nums, _args.as_tuple(batch_argnames, "batch_argnames", str)
        ),
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
    _args.check_disjoint(roles)
    dp = _sharding.data_parallel(data_axis, mesh, axis_name, fsdp, in_specs)
    axes = _checks.check_in_axes(in_axes, len(roles["batch"]))
    num_real = _checks.check_num_real(num_real_microbatches, k)
    plain = all(r is None or _reduce.is_builtin(r, *_reduce.PER_STEP) for r in spec)
    if k == 1 and plain and dp is None and num_real is None and not roles["rng"]:
        return step_fn
    run = functools.partial(
        _run,
        step_fn,
        roles=roles,
        k=k,
        weight_fn=weight_fn,
        reduce=reduce,
        split=split,
        accum_dtype=accum,
        unroll=unroll,
        in_axes=axes,
    )

    @functools.wraps(step_fn)
    def accumulated(*args: Any, **kwargs: Any) -> Any:
        call = BoundCall(args, kwargs)
        if dp is not None and not dp.bound:
            return _devices.run_sharded(run, call, roles, k, split, dp, SCOPE, axes, num_real)
        with jax.named_scope(SCOPE):
            if dp is None:
                return run(call, num_real=num_real)
            local = _devices.bound(dp)
            return run(_devices.varying(call, roles, dp.axes), local=local, num_real=num_real)

    return accumulated  # type: ignore[return-value]


def _typed(x: jax.Array, aval: Any) -> jax.Array:
    """``x`` with the sharding type (Explicit axes) and varying axes of ``aval``."""
    sharding = getattr(aval, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    spec = getattr(sharding, "spec", None)
    if mesh is not None and not mesh.empty and _layouts.explicit_in(spec, mesh):
        x = jax.sharding.reshard(x, sharding)
    return _join_varying(x, aval)


def _check_outputs(out: Any) -> Any:
    """The step's outputs as arrays; Python numbers and bools become constants."""

    def one(path: Any, x: Any) -> Any:
        if isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex)):
            return jnp.asarray(x)
        raise TypeError(
            f"step_fn returned a {type(x).__name__} at output{jax.tree_util.keystr(path)}; "
            "every output leaf must be an array or a number. Return strings and other "
            "Python objects from a function outside the accumulated step."
        )

    return jax.tree_util.tree_map_with_path(one, out)


def _run(
    step_fn: Callable[..., Any],
    call: BoundCall,
    *,
    roles: dict[str, tuple[ArgRef, ...]],
    k: int,
    weight_fn: Callable[..., Any] | None,
    reduce: Any,
    split: Split,
    accum_dtype: np.dtype | None,
    unroll: int | bool,
    in_axes: tuple[int, ...],
    num_real: Any,
    local: Local | None = None,
) -> Any:
    """The micro-batch loop; with ``local`` it runs per device and combines after the loop."""
    batch_refs, carry_refs, rng_refs = roles["batch"], roles["carry"], roles["rng"]
    batch = {ref.label: call.get(ref, "batch") for ref in batch_refs}
    state = tuple(call.get(ref, "carry") for ref in carry_refs)
    keys = tuple(call.get(ref, "rng") for ref in rng_refs)
    for ref, key in zip(rng_refs, keys, strict=True):
        _checks.check_key(key, ref.describe("rng"))
    views, axes = _split.microbatches(batch, k, split, _split.axes_of(batch, in_axes))
    if local is not None and keys:
        device = _sharding.device_index(local.axes)
        keys = tuple(jax.random.fold_in(key, device) for key in keys)
    gather_in_loop = local is not None and local.splits() and not local.gathered

    def one(views: Any, state: tuple[Any, ...], j: Any) -> tuple[Any, Any, Any]:
        """Micro-batch j: the user's step called on it, as a hand-written loop would."""
        # Views pass through jax tracing as a dict, which sorts its keys: read by label.
        index = _split.index(views, j, axes)
        mb = [index[ref.label] for ref in batch_refs]
        step_call = local.gather(call, j) if gather_in_loop and local is not None else call
        values = dict(zip(batch_refs, mb, strict=True))
        values.update(zip(carry_refs, state, strict=True))
        values.update(
            (ref, jax.random.fold_in(key, j)) for ref, key in zip(rng_refs, keys, strict=True)
        )
        args, kwargs = step_call.replaced(values)
        result = step_fn(*args, **kwargs)
        if carry_refs:
            out, new_state = _unpack_state(result, len(carry_refs))
        else:
            out, new_state = result, ()
        out = _check_outputs(out)
        w = None if weight_fn is None else weight_fn(*mb)
        return out, new_state, w

    # The step's output types, traced on micro-batch 0 with its whole abstract type.
    closed, shapes = jax.make_jaxpr(one, return_shape=True)(views, state, jnp.int32(0))
    avals = jax.tree.unflatten(jax.tree.structure(shapes), closed.out_avals)
    out_avals, state_avals, w_aval = avals
    labels = [ref.label for ref in carry_refs]
    _check_carry(
        dict(zip(labels, jax.eval_shape(lambda s: s, state), strict=True)),
        dict(zip(labels, state_avals, strict=True)),
    )
    if weight_fn is not None:
        _check_weight(w_aval)
    state = jax.tree.map(_join_varying, state, state_avals)
    base = _reduce.ReduceContext(None, k, accum_dtype, split, weight_fn is not None)
    reductions = _reduce.resolve(reduce, out_avals, base)
    treedef: Any
    is_r = lambda x: isinstance(x, _reduce.Reduction)  # noqa: E731
    flat_r, treedef = jax.tree.flatten(reductions, is_leaf=is_r)
    flat_avals = treedef.flatten_up_to(out_avals)
    paths = [
        "output" + jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(reductions, is_leaf=is_r)[0]
    ]
    ctxs = [base._replace(out=a) for a in flat_avals]
    flat_lay = _devices.out_layouts(local, call, out_avals, flat_r, treedef)
    scatter_now = [lay is not None and lay.split and gather_in_loop for lay in flat_lay]
    accs = [
        _layouts.constrain(
            jax.tree.map(
                lambda x, a=a: _typed_carry(x, a),
                r.init(_devices.shard_shape(a, lay if now else None), c),
            ),
            lay,
        )
        for r, a, c, lay, now in zip(flat_r, flat_avals, ctxs, flat_lay, scatter_now, strict=True)
    ]
    for r, a, c, acc, path in zip(flat_r, flat_avals, ctxs, accs, paths, strict=True):
        _check_reduction_carry(r, a, c, acc, path)
    w_dtype = _reduce.weight_dtype(accum_dtype, flat_avals)
    w_init = jnp.zeros((), w_dtype) if w_aval is None else _typed(jnp.zeros((), w_dtype), w_aval)
    # Every micro-batch's weight, for combining outputs over devices (LAST, STACK).
    keep_ws = w_aval is not None and local is not None
    ws_init = _typed(jnp.zeros((k,), w_dtype), w_aval) if keep_ws else None
    # XLA:CPU runs convolutions slowly inside a loop unless they are in one layout; the
    # CPU backend gets the loop body with them rewritten (see _cpu_conv). Elsewhere, and
    # for every step without such convolutions, the body calls the step as it is.
    rewrite = k > 1 and jax.default_backend() == "cpu" and _cpu_conv.needs_rewrite(closed.jaxpr)

    def body(carry: Any) -> Any:
        # The micro-batch index j is carried (not scanned over an arange): the slices
        # fused into the step's ops then read it directly, as a scan over xs would.
        accs, state, w_sum, ws, j = carry
        if rewrite:
            out, new_state, w = _cpu_conv.call(one, views, state, j)
        else:
            out, new_state, w = one(views, state, j)
        w = None if w is None else jnp.asarray(w).astype(w_dtype)
        flat_out = treedef.flatten_up_to(out)
        accs = [
            _layouts.constrain(
                _devices.update(r, a, x, c._replace(index=j, weight=w), lay if now else None),
                lay,
            )
            for r, a, x, c, lay, now in zip(
                flat_r, accs, flat_out, ctxs, flat_lay, scatter_now, strict=True
            )
        ]
        if w is not None:
            w_sum = w_sum + jnp.where(w > 0, w, 0)
        if ws is not None:
            ws = jax.lax.dynamic_update_index_in_dim(ws, w, j, 0)
        return accs, new_state, w_sum, ws, j + 1

    carry = (accs, state, w_init, ws_init, jnp.int32(0))
    count: Any = k if num_real is None else num_real
    if isinstance(count, jax.Array):
        # Early stop at a traced m (possibly batched under vmap): a while loop with a
        # dynamic bound, as lax.fori_loop builds. Not reverse-differentiable, like any.
        count = jnp.clip(count.astype(jnp.int32), 0, k)
        carry = jax.lax.while_loop(lambda c: c[-1] < count, body, carry)
    elif count == 1:  # no loop at all: a length-1 scan can cost more than the step itself
        carry = body(carry)
    elif count > 1:  # all k, or a concrete m < k: a scan of that length
        carry = jax.lax.scan(
            lambda c, _: (body(c), None), carry, None, length=count, unroll=unroll
        )[0]
    accs, state, w_sum, ws, _ = carry
    # An output reduced without ``combine`` is finished per device and aggregated here.
    done: dict[int, Any] = {}
    if local is not None:
        devices = local.devices
        for i, (r, a, c, lay, now) in enumerate(
            zip(flat_r, accs, ctxs, flat_lay, scatter_now, strict=True)
        ):
            dev = c._replace(weights=ws, axes=local.axes, count=count)
            if now:
                accs[i] = _devices.replicas(a, lay, local.axes)
            elif r.combine is not None:
                accs[i] = _devices.combine(r, a, dev, lay)
            else:
                mine = r.finalize(a, c._replace(count=count, weight_sum=w_sum))
                done[i] = _devices.aggregate(r, mine, local.axes, paths[i])
        # Devices inside a caller's shard_map may each have run their own number.
        traced = isinstance(count, jax.Array)
        count = jax.lax.psum(count, local.axes) if traced else count * devices
        if weight_fn is not None:
            w_sum = jax.lax.psum(w_sum, local.axes)
        state = _sharding.combine_state(state, local.axes)
    out_flat = [
        done[i] if i in done else r.finalize(a, c._replace(count=count, weight_sum=w_sum))
        for i, (r, a, c) in enumerate(zip(flat_r, accs, ctxs, strict=True))
    ]
    out = treedef.unflatten(out_flat)
    result = out if not carry_refs else (out, state[0] if len(carry_refs) == 1 else state)
    if local is not None:
        state_leaves = len(jax.tree.leaves(result)) - len(out_flat)
        local.out_layouts = list(flat_lay) + [None] * state_leaves
    return result


def _typed_carry(x: jax.Array, aval: Any) -> jax.Array:
    """A reduction's carry leaf typed like the output it reduces: the output's sharding
    for a leaf of its shape, with a leading unsharded axis for a stacked ``(k, ...)``
    buffer, and only the varying axes for anything else."""
    if x.shape == aval.shape:
        return _typed(x, aval)
    sharding: Any = getattr(aval, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if x.shape[1:] == aval.shape and spec is not None:
        stacked = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *spec))
        return _typed(x, aval.update(shape=x.shape, sharding=stacked))
    return _join_varying(x, aval)


def _check_reduction_carry(r: Any, out: Any, ctx: Any, carry: Any, path: str) -> None:
    """Raises unless a user-defined reduction's ``update`` keeps its carry's type."""
    if isinstance(r, _reduce._Summed) or any(r is b for b in _reduce.BUILTIN.values()):
        return
    step = ctx._replace(index=jnp.int32(0), weight=jnp.float32(1))
    after = jax.eval_shape(lambda c, x: r.update(c, x, step), carry, out)
    before = jax.eval_shape(lambda c: c, carry)
    types = lambda t: jax.tree.map(lambda v: (v.shape, v.dtype), t)  # noqa: E731
    s_after: Any = jax.tree.structure(after)  # PyTreeDef: no annotations mypy resolves
    if s_after != jax.tree.structure(before) or types(after) != types(before):
        raise TypeError(
            f"reduction {r.name} at {path}: update returned a carry of type {types(after)}, "
            f"but init made {types(before)}; the carry must keep its structure, shapes and "
            "dtypes (cast in update, e.g. new.astype(old.dtype))."
        )


def _join_varying(x: Any, aval: Any) -> Any:
    """``x`` made as varying as ``aval`` (e.g. initial carried state as the returned one)."""
    return _devices.vary(x, _devices.varying_axes(aval))


def _unpack_state(result: Any, n: int) -> tuple[Any, tuple[Any, ...]]:
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError(
            "with carried arguments, step_fn must return (outputs, new_state); got "
            f"{type(result).__name__}."
        )
    out, new_state = result
    if n == 1:
        return out, (new_state,)
    if not (isinstance(new_state, tuple) and len(new_state) == n):
        raise ValueError(
            f"step_fn carries {n} arguments, so it must return (outputs, (state_1, ..., "
            f"state_{n})); got new_state of type {type(new_state).__name__}."
        )
    return out, new_state
