"""One call of an accumulated function: trace the step once, loop, reduce, finish.

:func:`run` is what the function :func:`jaxaccum.accumulate` returns does on each call,
given the checked :class:`~jaxaccum._accumulate.Config` and the call's placement over the
devices: the batch split into k views, the step traced on micro-batch 0, every output leaf
folded into its reduction's carry inside one ``lax.scan``, and the carries finalized (and
combined over the devices) after it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jaxaccum import _args, _checks, _parallel, _reduce, _split
from jaxaccum._args import ArgRef, BoundCall
from jaxaccum._internal import cpu_conv as _cpu_conv
from jaxaccum._parallel import Placement, Totals
from jaxaccum._split import Split

if TYPE_CHECKING:
    from jaxaccum._accumulate import Config


class _Leaf(NamedTuple):
    """One output leaf: how it is reduced, and where its accumulator goes after the loop.

    Attributes:
      r: its reduction.
      info: what the reduction is told about the leaf; ``info.out`` is the type of the
        value ``update`` is given.
      path: ``output['loss']`` and the like, for messages.
      aval: the leaf's type as the step returns it.
      linear: whether the reduction is a sum (which takes ``unreduced`` values).
      target: the layout the placement gives its accumulator after the loop, or None.
    """

    r: _reduce.Reduction
    info: _reduce.LeafInfo
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
    config: Config,
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
    config: Config,
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


def run(
    step_fn: Callable[..., Any],
    call: BoundCall,
    config: Config,
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
            place.pin(leaf.r.update(acc, _value(x, leaf, place), j, w), leaf.target)
            for leaf, acc, x in zip(leaves, accs, treedef.flatten_up_to(out), strict=True)
        ]
        if w is not None:
            w_sum = w_sum + jnp.where(_reduce.counts(w), w, 0)
        if ws is not None:
            ws = jax.lax.dynamic_update_index_in_dim(ws, w, j, 0)
        return accs, new_state, w_sum, ws, j + 1

    count, carry = _iterate(body, carry, num_real, config)
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


def _iterate(
    body: Callable[[Any], Any], carry: Any, num_real: Any, config: Config
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
    config: Config, place: Placement, call: BoundCall, out_avals: Any, constant: Any
) -> tuple[list[_Leaf], Any]:
    """One :class:`_Leaf` per output leaf, and the structure to flatten outputs with.

    A constant output that ``reduce=`` does not name comes back once, as it is: the dtype
    default would add up an integer constant k times.
    """
    base = _reduce.LeafInfo(
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
        leaf.r.init(leaf.info), "reduce='s Reduction.init", leaf.path, empty=False
    )
    acc = jax.tree.map(lambda x: _typed_carry(jnp.asarray(x), leaf.info.out), made)
    if not any(leaf.r is b for b in _reduce.BUILTIN.values()):
        _checks.reduction_carry(leaf.r, leaf.info, leaf.path, acc)
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
