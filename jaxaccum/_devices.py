"""One device's micro-batch loop among many: data axes, sharded arguments, axes bound by the caller.

:func:`run_sharded` runs the loop under ``jax.shard_map`` over the data axes
(``data_axis=``); :func:`bound` describes a loop inside the caller's own ``shard_map`` or
``pmap`` (``axis_name=``). Either way the loop gets a :class:`Local`: the axes to combine
outputs over after the loop, and the layouts of arguments sharded over them (FSDP), which
are gathered per micro-batch or once, and whose gradients leave reduce-scattered.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum import _layouts, _reduce, _sharding, _split
from jaxaccum._args import ArgRef, BoundCall
from jaxaccum._layouts import (
    Sharded,
    check_batch_placed,
    constrain,
    gather,
    in_spec,
    match_outputs,
    scatter,
)
from jaxaccum._sharding import DataParallel
from jaxaccum._split import Split


def bound(dp: DataParallel) -> Local:
    """The loop's relation to axes the caller bound (its ``shard_map`` or ``pmap``)."""
    try:
        devices = math.prod(jax.lax.axis_size(a) for a in dp.axes)
    except NameError as err:
        raise ValueError(
            f"axis_name={dp.axes!r} is not bound here ({err}); call the step inside the "
            "jax.shard_map or jax.pmap that binds it, or use data_axis= to let jaxaccum "
            "run its own shard_map over a mesh."
        ) from None
    return Local(dp.axes, devices)


@dataclasses.dataclass
class Local:
    """How one device's loop relates to the data axes (inside ``shard_map`` or ``pmap``).

    Attributes:
      axes: the data axes the outputs are combined over after the loop.
      devices: the number of devices along them.
      layouts: per argument (a ref by position or keyword), a pytree of
        ``Sharded`` or None leaves: which leaves arrive as shards.
      gathered: whether those leaves were already gathered before the loop.
      out_layouts: set by the loop: per result leaf, the layout it leaves in.
    """

    axes: tuple[str, ...]
    devices: int
    layouts: dict[ArgRef, Any] = dataclasses.field(default_factory=dict)
    gathered: bool = False
    out_layouts: list[Any] = dataclasses.field(default_factory=list)

    def splits(self) -> bool:
        """Whether any argument leaf arrives as shards over the data axes."""
        leaves = jax.tree.leaves(list(self.layouts.values()), is_leaf=_none)
        return any(lay is not None and lay.split for lay in leaves)

    def gather(self, call: BoundCall, j: Any = None) -> BoundCall:
        """The call with every sharded argument leaf gathered in full.

        Given the loop index ``j``, the shards are tied to it first, so that the compiler
        cannot hoist the all-gathers out of the loop (which would keep every gathered
        parameter alive across all micro-batches).
        """
        refs = list(self.layouts)
        shards = [call.get(ref, "argument") for ref in refs]
        if j is not None:
            shards, _ = jax.lax.optimization_barrier((shards, j))
        values = {
            ref: jax.tree.map(gather, x, self.layouts[ref], is_leaf=_none)
            for ref, x in zip(refs, shards, strict=True)
        }
        return call.with_values(values)

    def candidates(self, call: BoundCall) -> list[tuple[Any, Any]]:
        """``(full-size shapes, layouts)`` of each argument, for matching its gradient."""

        def full(x: Any, lay: Sharded | None) -> jax.ShapeDtypeStruct | None:
            if x is None:
                return None
            shape = list(np.shape(x))
            if lay is not None and lay.dim is not None and not self.gathered:
                shape[lay.dim] *= math.prod(jax.lax.axis_size(a) for a in lay.axes)
            return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)

        return [
            (jax.tree.map(full, call.get(ref, "argument"), tree, is_leaf=_none), tree)
            for ref, tree in self.layouts.items()
        ]


def _none(x: Any) -> bool:
    return x is None


def run_sharded(
    run: Callable[..., Any],
    call: BoundCall,
    roles: dict[str, tuple[ArgRef, ...]],
    k: int,
    split: Split,
    dp: DataParallel,
    scope: str,
    in_axes: tuple[int, ...] = (0,),
    num_real: Any = None,
) -> Any:
    """``run`` under ``shard_map``: a local scan per device, outputs combined after it."""
    mesh = dp.resolve_mesh()
    shards = dp.size(mesh)
    batch_refs = roles["batch"]
    batch = {ref.label: call.get(ref, "batch") for ref in batch_refs}
    presplit = split == "presplit"
    axes = _split.axes_of(batch, in_axes)
    n = _split.leading_size(batch, axes=axes)  # checks the leaves first
    check_batch_placed(batch, dp, mesh, presplit, axes)
    first = next(p for label, t in batch.items() for p, _ in _split.leaves_with_paths(t, label))
    if presplit:
        n = _split.presplit_size(batch, k, axes)
    _sharding.check_shards(n, 1 if presplit else k, shards, first)
    layouts = arg_layouts(call, roles, dp, mesh)
    specs: dict[ArgRef, Any] = {
        ref: jax.tree.map(
            lambda x, lay: in_spec(lay, np.ndim(x)),
            call.get(ref, "argument"),
            tree,
            is_leaf=_none,
        )
        for ref, tree in layouts.items()
    }
    specs.update({ref: _sharding.batch_spec(dp, presplit, axes[ref.label]) for ref in batch_refs})
    replicated = jax.sharding.PartitionSpec()
    arg_specs, kwarg_specs = BoundCall(
        tuple(replicated for _ in call.args), dict.fromkeys(call.kwargs, replicated)
    ).replaced(specs)
    if not any(jax.tree.leaves(list(layouts.values()), is_leaf=_none)):
        layouts = {}  # nothing laid out over the mesh: no gradient to match
    sharded = Local(dp.axes, shards, layouts).splits()
    found: list[Any] = []

    def local(args: tuple[Any, ...], kwargs: dict[str, Any], num_real: Any) -> Any:
        where = Local(dp.axes, shards, layouts)
        inner = BoundCall(args, kwargs)
        with jax.named_scope(scope):
            if sharded and dp.fsdp == "gather_once":
                inner, where.gathered = where.gather(inner), True
            result = run(inner, local=where, num_real=num_real)
        treedef: Any
        flat, treedef = jax.tree.flatten(result)
        specs = [in_spec(lay, np.ndim(x)) for x, lay in zip(flat, where.out_layouts, strict=True)]
        found[:] = [treedef.unflatten(specs)]
        return result

    def mapped(out_specs: Any) -> Callable[..., Any]:
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(tuple(arg_specs), kwarg_specs, replicated),
            out_specs=out_specs,
            axis_names=set(dp.axes),
            check_vma=False,
        )

    # A traced count of micro-batches to run enters as a replicated argument: shard_map
    # cannot close over values typed on Explicit axes.
    args = (
        _sharding.as_array_tree(tuple(call.args)),
        _sharding.as_array_tree(call.kwargs),
        num_real,
    )
    if not sharded:
        return mapped(replicated)(*args)
    # Gradients of sharded arguments leave sharded; which outputs they are is known once
    # the step has been traced, so the specs are found by an abstract trace first.
    jax.eval_shape(mapped(replicated), *args)
    return mapped(found[0])(*args)


def arg_layouts(
    call: BoundCall, roles: dict[str, tuple[ArgRef, ...]], dp: DataParallel, mesh: Any
) -> dict[ArgRef, Any]:
    """Per non-batch argument passed, which leaves are sharded over the data axes.

    Raises:
      ValueError: for carried state or keys sharded over the data axes, a layout the loop
        cannot gather and reduce-scatter, or ``in_specs`` that do not fit the call.
    """
    role_of = {call.locate(ref, role): role for role, refs in roles.items() for ref in refs}
    given = _check_in_specs(dp.in_specs, call, role_of)
    layouts = {}
    for ref in call.refs():
        role = role_of.get(ref, "argument")
        if role == "batch":
            continue
        spec = given[ref.num] if given and ref.num is not None else None
        tree = _layouts.arg_layouts(call.get(ref, role), spec, dp.axes, ref.label, mesh)
        if role != "argument":
            if any(lay is not None for lay in jax.tree.leaves(tree, is_leaf=_none)):
                raise ValueError(
                    f"{ref.describe(role)} is sharded over the data axes {dp.axes}, "
                    "but carried state and keys are replicated over them; replicate it: "
                    "jax.device_put(value, NamedSharding(mesh, P()))."
                )
            continue
        layouts[ref] = tree
    return layouts


def _check_in_specs(given: Any, call: BoundCall, role_of: dict[ArgRef, str]) -> Any:
    """``in_specs`` as a tuple with one entry per positional argument (checked)."""
    if given is None:
        return None
    given = tuple(given)
    by_keyword = [r.name for r in call.refs() if r.num is None and role_of.get(r) is None]
    if by_keyword:
        raise ValueError(
            f"in_specs gives specs by position, but {by_keyword} were passed by keyword; "
            "pass them positionally so their specs apply."
        )
    if len(given) > len(call.args):
        raise ValueError(
            f"in_specs has {len(given)} entries but the step got {len(call.args)} positional "
            "argument(s); give one PartitionSpec prefix per positional argument."
        )
    return given + (None,) * (len(call.args) - len(given))


def varying_axes(aval: Any) -> tuple[str, ...]:
    """The manual axes an abstract value varies over (empty outside ``shard_map``)."""
    return tuple(getattr(getattr(aval, "mat", None), "varying", ()) or ())


def vary(x: Any, axes: Sequence[str]) -> Any:
    """``x`` marked as varying over ``axes`` (no-op outside ``check_vma`` tracing)."""
    if not hasattr(x, "dtype"):
        return x
    have = set(varying_axes(jax.typeof(x)))
    extra = tuple(a for a in axes if a not in have)
    return jax.lax.pcast(x, extra, to="varying") if extra else x


def varying(
    call: BoundCall, roles: dict[str, tuple[ArgRef, ...]], axes: Sequence[str]
) -> BoundCall:
    """Plain arguments (not batch, carried state or keys) marked varying over the axes.

    Under ``shard_map(check_vma=True)`` the gradient with respect to an argument that is
    the same on every device is summed over the devices by ``jax.grad`` itself, at every
    micro-batch. Marked varying, each device keeps its own gradient and the loop
    combines them once, after the last micro-batch. Carried state becomes varying only
    where the step makes it so.
    """
    taken = {call.locate(ref, role) for role, refs in roles.items() for ref in refs}
    values = {
        ref: jax.tree.map(lambda x: vary(x, axes), call.get(ref, "argument"))
        for ref in call.refs()
        if ref not in taken
    }
    return call.with_values(values)


def out_layouts(
    local: Local | None, call: BoundCall, out_avals: Any, flat_r: list[Any], treedef: Any
) -> list[Any]:
    """Per output leaf, the layout of the sharded argument it is the gradient of, or None.

    Only floating outputs that are averaged or summed are kept sharded (reduce-scattered).
    """
    if local is None or not local.layouts:
        return [None] * len(flat_r)
    flat = treedef.flatten_up_to(match_outputs(out_avals, local.candidates(call)))
    return [
        lay if isinstance(r, _reduce._Summed) and jnp.issubdtype(a.dtype, jnp.inexact) else None
        for lay, r, a in zip(flat, flat_r, treedef.flatten_up_to(out_avals), strict=True)
    ]


def shard_shape(aval: Any, layout: Sharded | None) -> jax.ShapeDtypeStruct:
    shape = list(aval.shape)
    if layout is not None and layout.dim is not None:
        shape[layout.dim] //= math.prod(jax.lax.axis_size(a) for a in layout.axes)
    return jax.ShapeDtypeStruct(tuple(shape), aval.dtype)


def update(r: Any, acc: Any, x: Any, ctx: Any, layout: Any) -> Any:
    """Folds one micro-batch in; a sharded gradient is reduce-scattered into its shard."""
    if layout is None:
        return r.update(acc, x, ctx)
    return acc + scatter(r.contribution(x, ctx, acc.dtype), layout)


def replicas(acc: jax.Array, layout: Sharded, axes: tuple[str, ...]) -> jax.Array:
    """A reduce-scattered gradient summed over the data axes it is replicated on.

    Hybrid sharding (data over ``("replica", "fsdp")``, params sharded over ``"fsdp"``
    only) scatters over ``"fsdp"``; the replicas' shards still add up, once.
    """
    rest = tuple(a for a in axes if a not in layout.axes)
    return jax.lax.psum(acc, rest) if rest else acc


def combine(r: Any, acc: Any, ctx: Any, layout: Any) -> Any:
    """After the loop: one collective per output (a reduce-scatter for sharded gradients)."""
    if layout is None or not layout.split:
        return constrain(r.combine(acc, ctx), layout)
    return replicas(scatter(acc, layout), layout, ctx.axes)


def aggregate(r: Any, value: Any, axes: tuple[str, ...], path: str) -> Any:
    """A reduction without ``combine``: every device's result gathered and aggregated."""
    if r.aggregate is None:
        raise TypeError(
            f"reduction {r.name} at {path} has neither combine nor aggregate, so its "
            f"per-device results cannot be combined over the data axes {axes}; give the "
            "jaxaccum.Reduction an aggregate= (how to reduce results stacked on a leading "
            "axis) or a combine=."
        )
    return r.aggregate(jax.tree.map(lambda v: jax.lax.all_gather(v, axes), value))
