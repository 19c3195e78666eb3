"""The core transform: run a step function over k micro-batches in one ``lax.scan``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxaccum import _args, _checks, _equinox, _parallel, _reduce, _split
from jaxaccum._args import ArgRef, BoundCall
from jaxaccum._internal import cpu_conv as _cpu_conv
from jaxaccum._parallel import FSDP, DataAxis, Placement, Totals
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
    split = _split.check_split(split)
    unroll = _checks.check_unroll(unroll)
    accum = _checks.check_accum_dtype(accum_dtype)
    spec = _reduce.spec_members(reduce)
    roles = _roles(
        step_fn,
        batch_argnums,
        batch_argnames,
        carry_argnums,
        carry_argnames,
        rng_argnums,
        rng_argnames,
    )
    if weight_fn is not None:
        batches = ", ".join(ref.label for ref in roles["batch"])
        n = len(roles["batch"])
        _checks.function(
            weight_fn, "weight_fn", f"weight_fn({batches})", n, fix=_checks.WEIGHT_FN_FIX
        )
    opts = _parallel.options(data_axis, mesh, axis_name, fsdp, in_specs)
    axes = _checks.check_in_axes(in_axes, len(roles["batch"]))
    num_real = _checks.check_num_real(num_real_microbatches, k)
    plain = all(r is None or _reduce.is_builtin(r, *_reduce.PER_STEP) for r in spec)
    if k == 1 and plain and opts is None and num_real is None and not roles["rng"]:
        return step_fn
    config = _Config(roles, k, weight_fn, reduce, split, accum, unroll, axes)

    @_equinox.wraps(step_fn)
    def accumulated(*args: Any, **kwargs: Any) -> Any:
        call = BoundCall(args, kwargs)
        with _parallel.mesh_of((args, kwargs)), jax.named_scope(SCOPE):
            batch_axes = _split.axes_of({r.label: None for r in roles["batch"]}, axes)
            place = _parallel.placement(opts, call, roles, k=k, split=split, in_axes=batch_axes)
            return _run(step_fn, call, config, place, num_real)

    return accumulated  # type: ignore[return-value]


def _roles(
    step_fn: Callable[..., Any],
    batch_argnums: Any,
    batch_argnames: Any,
    carry_argnums: Any,
    carry_argnames: Any,
    rng_argnums: Any,
    rng_argnames: Any,
) -> dict[str, tuple[ArgRef, ...]]:
    """The batch, carried and key arguments of ``step_fn`` (checked)."""
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
class _Config:
    """``accumulate``'s checked options."""

    roles: dict[str, tuple[ArgRef, ...]]
    k: int
    weight_fn: Callable[..., Any] | None
    reduce: Any
    split: Split
    accum_dtype: np.dtype | None
    unroll: int | bool
    in_axes: tuple[int, ...]


class _Leaf(NamedTuple):
    """One output leaf: how it is reduced, and where its accumulator goes after the loop.

    Attributes:
      r: its reduction.
      ctx: the reduction's context; ``ctx.out`` is the type ``update`` is given.
      path: ``output['loss']`` and the like, for messages.
      aval: the leaf's type as the step returns it.
      linear: whether the reduction is a sum (which takes ``unreduced`` values).
      target: the layout the placement gives its accumulator after the loop, or None.
    """

    r: _reduce.Reduction
    ctx: _reduce.ReduceContext
    path: str
    aval: Any
    linear: bool
    target: Any


@dataclasses.dataclass(frozen=True)
class _Traced:
    """The step on one micro-batch, traced once; calling it evaluates the trace.

    Attributes:
      closed: the trace, taking the plain arguments' array leaves, the views of the batch,
        the carried state and the micro-batch index.
      tree: the structure of its outputs ``(outputs, new_state, weight)``.
      leaves: the plain arguments' array leaves it was traced with.
      rewrite: whether the CPU gets its convolutions in canonical layout.
    """

    closed: Any
    tree: Any
    leaves: list[Any]
    rewrite: bool

    @property
    def avals(self) -> Any:
        return jax.tree.unflatten(self.tree, self.closed.out_avals)

    @property
    def constant(self) -> Any:
        """Per output leaf, whether the trace holds it as a constant, the same for every
        micro-batch (a Python number the step returns, an array it closes over)."""
        consts = {id(v) for v in self.closed.jaxpr.constvars}
        flags = [isinstance(v, jcore.Literal) or id(v) in consts for v in self.closed.jaxpr.outvars]
        return jax.tree.unflatten(self.tree, flags)

    def __call__(self, views: Any, state: Any, j: Any) -> Any:
        operands = [*self.leaves, *jax.tree.leaves((views, state, j))]
        if self.rewrite:
            outs = _cpu_conv.evaluate(self.closed, operands)
        else:
            outs = jcore.jaxpr_as_fun(self.closed)(*operands)
        # An output the trace holds as a constant comes back as a Python number.
        return jax.tree.unflatten(self.tree, [jnp.asarray(x) for x in outs])


def _trace(
    step_fn: Callable[..., Any],
    config: _Config,
    call: BoundCall,
    place: Placement,
    inputs: tuple[Any, ...],
) -> _Traced:
    """Traces the step on micro-batch 0, then again with the placement's retyped leaves.

    ``inputs`` are the views of the batch, their index axes, each batch argument's example
    axis, the keys and the carried state.
    """
    views, axes, examples, keys, state = inputs
    plain = _args.plain_refs(call, config.roles)
    values = [call.get(ref, "argument") for ref in plain]
    flat, structure = jax.tree.flatten(values)
    dynamic = [i for i, x in enumerate(flat) if isinstance(x, jax.Array)]

    def one(leaves: list[Any], views: Any, state: Any, j: Any) -> Any:
        """Micro-batch j: the user's step called on it, as a hand-written loop would."""
        full = list(flat)
        for i, x in zip(dynamic, leaves, strict=True):
            full[i] = x
        given = dict(zip(plain, jax.tree.unflatten(structure, full), strict=True))
        inputs = (views, axes, examples, keys, state, j)
        return _call_step(step_fn, config, call, place, given, inputs)

    def traced(leaves: list[Any]) -> _Traced:
        closed, shapes = jax.make_jaxpr(one, return_shape=True)(leaves, views, state, jnp.int32(0))
        rewrite = (
            config.k > 1
            and jax.default_backend() == "cpu"
            and _cpu_conv.needs_rewrite(closed.jaxpr)
        )
        return _Traced(closed, jax.tree.structure(shapes), leaves, rewrite)

    try:
        first = traced([flat[i] for i in dynamic])
    except Exception as e:
        batches = [call.get(ref, "batch") for ref in config.roles["batch"]]
        hint = _checks.unsplit_hint(config.k, config.in_axes, batches, call, plain)
        if hint:
            e.add_note(hint)
        raise
    retyped = place.retype(first.leaves, first.closed.jaxpr)
    if retyped is None:
        return first
    try:
        return traced(retyped)
    except Exception:  # a type the step does not take after all: its gradients as traced
        return first


def _call_step(
    step_fn: Callable[..., Any],
    config: _Config,
    call: BoundCall,
    place: Placement,
    given: dict[ArgRef, Any],
    inputs: tuple[Any, ...],
) -> tuple[Any, tuple[Any, ...], Any]:
    """``step_fn`` on micro-batch ``j``: ``(outputs, new_state, weight)``."""
    views, axes, examples, keys, state, j = inputs
    refs = config.roles
    # Views pass through jax tracing as a dict, which sorts its keys: read by label.
    index = place.microbatch(_split.index(views, j, axes), examples)
    mb = [index[ref.label] for ref in refs["batch"]]
    values: dict[ArgRef, Any] = dict(given)
    values.update(zip(refs["batch"], mb, strict=True))
    values.update(zip(refs["carry"], state, strict=True))
    values.update(
        (ref, jax.random.fold_in(key, j)) for ref, key in zip(refs["rng"], keys, strict=True)
    )
    args, kwargs = call.replaced(values)
    result = step_fn(*args, **kwargs)
    if refs["carry"]:
        out, new_state = _checks.unpack_state(result, len(refs["carry"]))
    else:
        out, new_state = result, ()
    w = None if config.weight_fn is None else _checks.check_weight(config.weight_fn(*mb))
    return _checks.step_outputs(out), new_state, w


def _run(
    step_fn: Callable[..., Any],
    call: BoundCall,
    config: _Config,
    place: Placement,
    num_real: Any,
) -> Any:
    """The micro-batch loop: split, trace the step, reduce its outputs, finish."""
    refs = config.roles
    batch = {ref.label: call.get(ref, "batch") for ref in refs["batch"]}
    state = tuple(call.get(ref, "carry") for ref in refs["carry"])
    keys = tuple(call.get(ref, "rng") for ref in refs["rng"])
    for ref, key in zip(refs["rng"], keys, strict=True):
        _checks.check_key(key, ref.describe("rng"))
    examples = _split.axes_of(batch, config.in_axes)
    views, axes = _split.microbatches(batch, config.k, config.split, examples)
    # The views keep each device's examples where they are: (N/k, k) or (k, N/k) at the
    # example axis, with the N/k examples of a micro-batch laid out over the devices.
    presplit = config.split == Split.PRESPLIT
    views = place.microbatch(views, {label: a + presplit for label, a in examples.items()})
    inputs = (views, axes, examples, place.keys(keys), state)
    step = _trace(step_fn, config, place.prepare(call), place, inputs)
    out_avals, state_avals, w_aval = step.avals
    labels = [ref.label for ref in refs["carry"]]
    _checks.carried_state(
        dict(zip(labels, jax.eval_shape(lambda s: s, state), strict=True)),
        dict(zip(labels, state_avals, strict=True)),
    )
    if config.weight_fn is not None:
        _checks.check_weight(w_aval)
    state = jax.tree.map(_parallel.typed_like, state, state_avals)
    leaves, treedef = _plan(config, place, call, out_avals, step.constant[0])
    w_dtype = _reduce.weight_dtype(config.accum_dtype, [leaf.aval for leaf in leaves])
    keep_ws = w_aval is not None and place.weights_kept
    carry = (
        [_init(leaf, place) for leaf in leaves],
        state,
        _weight_zeros((), w_dtype, w_aval),
        _weight_zeros((config.k,), w_dtype, w_aval) if keep_ws else None,
        jnp.int32(0),
    )

    def body(carry: Any) -> Any:
        # The micro-batch index j is carried (not scanned over an arange): the slices
        # fused into the step's ops then read it directly, as a scan over xs would.
        accs, state, w_sum, ws, j = carry
        out, new_state, w = step(views, state, j)
        w = None if w is None else jnp.asarray(w).astype(w_dtype)
        accs = [
            place.pin(
                leaf.r.update(acc, _value(x, leaf, place), leaf.ctx._replace(index=j, weight=w)),
                leaf.target,
            )
            for leaf, acc, x in zip(leaves, accs, treedef.flatten_up_to(out), strict=True)
        ]
        if w is not None:
            w_sum = w_sum + jnp.where(_reduce.counts(w), w, 0)
        if ws is not None:
            ws = jax.lax.dynamic_update_index_in_dim(ws, w, j, 0)
        return accs, new_state, w_sum, ws, j + 1

    count, carry = _loop(body, carry, num_real, config)
    accs, state, w_sum, ws, _ = carry
    totals = Totals(count, w_sum if w_aval is not None else None, ws, state)
    outs, state = place.finish(leaves, accs, totals)
    out = treedef.unflatten(outs)
    if not refs["carry"]:
        return out
    return out, state[0] if len(refs["carry"]) == 1 else state


def _value(x: Any, leaf: _Leaf, place: Placement) -> Any:
    """A micro-batch's output leaf as its reduction takes it: a sum takes it in the layout
    of its accumulator, anything else reduced over the data axes first."""
    return place.pin(x, leaf.target) if leaf.linear else place.before(x, leaf.aval)


def _weight_zeros(shape: tuple[int, ...], dtype: Any, w_aval: Any) -> jax.Array:
    zeros = jnp.zeros(shape, dtype)
    if w_aval is None:
        return zeros
    return _parallel.typed_like(zeros, w_aval) if shape == () else _typed_carry(zeros, w_aval)


def _loop(
    body: Callable[[Any], Any], carry: Any, num_real: Any, config: _Config
) -> tuple[Any, Any]:
    """Runs ``body`` over the micro-batches that run; returns their count and the carry.

    All k (or a concrete m < k) run as a scan, a traced m as a while loop, one without a
    loop at all (a length-1 scan can cost more than the step itself).
    """
    count: Any = config.k if num_real is None else num_real
    if isinstance(count, jax.Array):
        # Early stop at a traced m (possibly batched under vmap): a while loop with a
        # dynamic bound, as lax.fori_loop builds. Not reverse-differentiable, like any.
        count = jnp.clip(count.astype(jnp.int32), 0, config.k)
        return count, jax.lax.while_loop(lambda c: c[-1] < count, body, carry)
    if count == 1:
        return count, body(carry)
    if count > 1:
        scanned = jax.lax.scan(
            lambda c, _: (body(c), None), carry, None, length=count, unroll=config.unroll
        )
        carry = scanned[0]
    return count, carry


def _plan(
    config: _Config, place: Placement, call: BoundCall, out_avals: Any, constant: Any
) -> tuple[list[_Leaf], Any]:
    """One :class:`_Leaf` per output leaf, and the structure to flatten outputs with.

    A constant output that ``reduce=`` does not name comes back once, as it is: the dtype
    default would add up an integer constant k times.
    """
    base = _reduce.ReduceContext(
        None, config.k, config.accum_dtype, config.split, config.weight_fn is not None
    )
    reductions = _reduce.resolve(config.reduce, out_avals, base)
    named = _reduce.per_leaf(config.reduce, out_avals, "reduce", "step_fn's output tree")
    is_r = lambda x: isinstance(x, _reduce.Reduction)  # noqa: E731
    treedef: Any
    flat, treedef = jax.tree_util.tree_flatten_with_path(reductions, is_leaf=is_r)
    out_def: Any = jax.tree.structure(out_avals)  # PyTreeDef: no annotations mypy reads
    unnamed = [r is None for r in out_def.flatten_up_to(named)]
    last = _reduce.BUILTIN[_reduce.Reduce.LAST]
    flat = [
        (path, last if free and fixed else r)
        for (path, r), free, fixed in zip(flat, unnamed, jax.tree.leaves(constant), strict=True)
    ]
    avals = treedef.flatten_up_to(out_avals)
    linear = [_reduce.is_builtin(r, *_reduce.LINEAR) for _, r in flat]
    targets = place.targets(out_avals, linear, call)
    leaves = []
    for (path, r), aval, summed, target in zip(flat, avals, linear, targets, strict=True):
        value = aval if summed else place.value_aval(aval)
        leaf = _Leaf(
            r, base._replace(out=value), "output" + jax.tree_util.keystr(path), aval, summed, target
        )
        leaves.append(leaf)
    return leaves, treedef


def _init(leaf: _Leaf, place: Placement) -> Any:
    """A leaf's accumulator before the first micro-batch, typed like what it holds."""
    made = _checks.returned_arrays(
        leaf.r.init(leaf.ctx.out, leaf.ctx), "reduce='s Reduction.init", leaf.path, empty=False
    )
    acc = jax.tree.map(lambda x: _typed_carry(jnp.asarray(x), leaf.ctx.out), made)
    if not any(leaf.r is b for b in _reduce.BUILTIN.values()):
        _checks.reduction_carry(leaf.r, leaf.ctx, leaf.path, acc)
    return place.pin(acc, leaf.target)


def _typed_carry(x: jax.Array, aval: Any) -> jax.Array:
    """A reduction's carry leaf typed like the output it reduces: the output's sharding
    for a leaf of its shape, with a leading unsharded axis for a stacked ``(k, ...)``
    buffer, and only the varying axes for anything else."""
    if x.shape == aval.shape:
        return _parallel.typed_like(x, aval)
    sharding: Any = getattr(aval, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if x.shape[1:] == aval.shape and spec is not None:
        stacked = jax.sharding.NamedSharding(
            sharding.mesh, spec.update(partitions=(None, *spec.partitions))
        )
        return _parallel.typed_like(x, aval.update(shape=x.shape, sharding=stacked))
    return _parallel.base.vary(x, _parallel.base.varying_axes(aval))
