"""Data parallelism: a batch split over mesh axes, and one reduction of each output per step.

:func:`placement` chooses, per call, how the micro-batch loop of
:func:`jaxaccum.accumulate` relates to devices; the loop calls the placement's hooks at
fixed points (:class:`~jaxaccum._parallel.base.Placement`):

========================  ==================================================================
``Placement``             one device, or no data axes: the loop as written
``Typed`` (``typed``)     ``data_axis=`` on Explicit mesh axes: global types; replicated
                          parameters typed ``reduced``, gradients ``unreduced``, one
                          ``reshard`` after the loop
``Pinned`` (``pinned``)   ``data_axis=`` on Auto mesh axes: micro-batches and accumulators
                          pinned with sharding constraints; the compiler places reductions
``Bound`` (``bound``)     ``axis_name=``: inside the caller's ``shard_map``/``pmap``; each
                          device's loop, combined over the axes after it
========================  ==================================================================
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, PartitionSpec

from jaxaccum import _split
from jaxaccum._args import ArgRef, BoundCall, plain_refs
from jaxaccum._parallel import base
from jaxaccum._parallel.base import Placement, Totals, mesh_of, typed_like
from jaxaccum._parallel.bound import Bound, gather
from jaxaccum._parallel.options import FSDP, DataAxis, Options, options
from jaxaccum._parallel.pinned import Pinned
from jaxaccum._parallel.typed import Typed, all_finite, times

__all__ = [
    "FSDP",
    "Bound",
    "DataAxis",
    "Options",
    "Pinned",
    "Placement",
    "Totals",
    "Typed",
    "all_finite",
    "gather",
    "mesh_of",
    "options",
    "placement",
    "times",
    "typed_like",
]


def placement(
    opts: Options | None,
    call: BoundCall,
    roles: dict[str, tuple[ArgRef, ...]],
    *,
    k: int,
    split: str,
    in_axes: dict[str, int],
) -> Placement:
    """The placement of one call of the accumulated step (checked).

    Raises:
      ValueError: for a mesh without the data axes, data axes of mixed kinds, a batch not
        placed on them or not divisible by k times their size, a contiguous split over
        them, or ``in_specs`` that do not fit the call or the mesh.
    """
    plain = plain_refs(call, roles)
    if opts is None:
        return Placement()
    if opts.bound:
        return Bound.of(opts.axes, plain)
    mesh = _mesh(opts, call)
    kinds = {mesh.axis_types[mesh.axis_names.index(a)] for a in opts.axes}
    if len(kinds) > 1:
        raise ValueError(
            f"data_axis={opts.axes!r} mixes Explicit and Auto mesh axes ({dict(mesh.shape)}, "
            f"axis_types={mesh.axis_types}); make the data axes all Explicit or all Auto."
        )
    explicit = kinds == {AxisType.Explicit}
    _check_batch(opts, mesh, call, roles, k=k, split=split, in_axes=in_axes, explicit=explicit)
    given = _given_specs(opts, call, roles, plain, mesh)
    if explicit:
        _check_given_against_types(given, call, opts.specs_name)
        return Typed(opts.axes, mesh, opts.fsdp, plain)
    known = {ref: _known_specs(call.get(ref, "argument"), given.get(ref)) for ref in plain}
    return Pinned(opts.axes, mesh, opts.fsdp, known, pin_batches=split != "contiguous")


def _mesh(opts: Options, call: BoundCall) -> Any:
    """The mesh given, else the one the arguments' types or ``jax.set_mesh`` name."""
    mesh = opts.mesh
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        arrays = (x for x in jax.tree.leaves((call.args, call.kwargs)) if isinstance(x, jax.Array))
        mesh = next((m for x in arrays if (m := base.type_mesh(x)) is not None), mesh)
    names = tuple(getattr(mesh, "axis_names", ()))
    if not names:
        raise ValueError(
            f"data_axis={opts.axes!r} needs a device mesh: place the batch on one "
            "(jax.device_put(batch, NamedSharding(mesh, P('data')))), pass "
            "mesh=jax.make_mesh(...), or call the step inside `with jax.set_mesh(mesh):`."
        )
    missing = [a for a in opts.axes if a not in names]
    if missing:
        raise ValueError(
            f"data_axis names {missing} are not axes of the mesh {dict(mesh.shape)}; pass "
            f"data_axis= one or more of {list(names)}."
        )
    return getattr(mesh, "abstract_mesh", mesh)


def _check_batch(
    opts: Options,
    mesh: Any,
    call: BoundCall,
    roles: dict[str, tuple[ArgRef, ...]],
    *,
    k: int,
    split: str,
    in_axes: dict[str, int],
    explicit: bool,
) -> None:
    """Raises unless every batch leaf can be split over the data axes k ways each."""
    batch = {ref.label: call.get(ref, "batch") for ref in roles["batch"]}
    _split.leading_size(batch, axes=in_axes)  # names leaves that are no arrays first
    shards = math.prod(int(mesh.shape[a]) for a in opts.axes)
    data = opts.axes[0] if len(opts.axes) == 1 else opts.axes
    if split == "contiguous" and explicit:
        raise ValueError(
            f"split='contiguous' cannot split a batch sharded over data_axis={opts.axes!r} "
            "on Explicit mesh axes: each contiguous block of examples lives on some of the "
            "devices only, so every micro-batch would be moved between them. Use "
            "split='strided' (the default: each device keeps its own examples) or "
            "split='presplit'."
        )
    presplit = split == "presplit"
    for ref in roles["batch"]:
        dim = in_axes.get(ref.label, 0) + presplit
        for path, x in jax.tree_util.tree_flatten_with_path(call.get(ref, "batch"))[0]:
            where = ref.label + jax.tree_util.keystr(path)
            if not hasattr(x, "shape") or np.ndim(x) <= dim:
                continue  # the split names such leaves
            size = int(np.shape(x)[dim])
            per = size if presplit else size // k if size % k == 0 else None
            if per is not None and per % shards:
                raise ValueError(
                    f"batch leaf {where} has {size} examples on axis {dim}, which do not "
                    f"split into {'' if presplit else f'k={k} micro-batches of '}a multiple "
                    f"of the {shards} devices of data_axis={opts.axes!r}; make the batch a "
                    f"multiple of {shards if presplit else k * shards} (jaxaccum.pad_batch), "
                    "or choose k so that N / k is a multiple of the devices."
                )
            _check_placed(x, where, dim, data, shards, explicit)


def _check_placed(x: Any, where: str, dim: int, data: Any, shards: int, explicit: bool) -> None:
    target = "P(" + "None, " * dim + f"{data!r})"
    placed = getattr(x, "sharding", None)
    if isinstance(placed, jax.sharding.SingleDeviceSharding) and shards > 1:
        raise ValueError(
            f"batch leaf {where} sits on one device, but data_axis={data!r} splits it over "
            f"{shards} devices; place it on the mesh first: jax.device_put(batch, "
            f"NamedSharding(mesh, {target}))."
        )
    if not explicit or not isinstance(x, jax.Array):
        return
    entry = base.spec_of(x).partitions[dim] if dim < len(base.spec_of(x).partitions) else None
    if base.names(entry) != set(data if isinstance(data, tuple) else (data,)):
        raise ValueError(
            f"batch leaf {where} is placed as {base.spec_of(x)}, but data_axis={data!r} needs "
            f"its example axis (axis {dim}) sharded over {data!r}: jax.device_put(batch, "
            f"NamedSharding(mesh, {target})), or jax.sharding.reshard(batch, {target}) "
            "inside jit."
        )


def _given_specs(
    opts: Options,
    call: BoundCall,
    roles: dict[str, tuple[ArgRef, ...]],
    plain: tuple[ArgRef, ...],
    mesh: Any,
) -> dict[ArgRef, list[Any]]:
    """``in_specs`` as a spec (or None) per leaf of each plain positional argument."""
    if opts.in_specs is None:
        return {}
    given = tuple(opts.in_specs)
    keyword = [r.name for r in plain if r.num is None]
    if keyword:
        raise ValueError(
            f"{opts.specs_name} gives specs by position, but {keyword} were passed by "
            "keyword; pass them positionally so that their specs apply."
        )
    if len(given) > len(call.args):
        raise ValueError(
            f"{opts.specs_name} has {len(given)} entries but the step got {len(call.args)} "
            "positional argument(s); give one PartitionSpec prefix per positional argument."
        )
    found = {}
    for ref in plain:
        if ref.num is not None and ref.num < len(given) and given[ref.num] is not None:
            value = call.get(ref, "argument")
            found[ref] = _leaf_specs(value, given[ref.num], ref.label, mesh, opts.specs_name)
    return found


def _leaf_specs(value: Any, prefix: Any, label: str, mesh: Any, option: str) -> list[Any]:
    """A spec prefix expanded to one spec (or None) per leaf of ``value``, checked."""
    structure: Any = jax.tree.structure(value)  # PyTreeDef: no annotations mypy resolves
    try:
        boxed = jax.tree.map(
            lambda s, sub: jax.tree.map(lambda _: _Box(s), sub), prefix, value, is_leaf=base.is_spec
        )
        specs = [box.spec for box in structure.flatten_up_to(boxed)]
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{option} for {label} are not a pytree prefix of it ({err}); give one "
            "PartitionSpec per leaf or subtree (param_specs= for train steps, in_specs= for "
            "accumulate), e.g. jax.tree.map(lambda x: x.sharding.spec, params)."
        ) from None
    for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(value)[0], specs, strict=True):
        if spec is not None:
            _check_spec(
                spec, x, f"{option} gives {spec} for {label}{jax.tree_util.keystr(path)}", mesh
            )
    return specs


class _Box:
    """A spec given for a leaf (boxed, so that a None spec stays a pytree leaf)."""

    def __init__(self, spec: Any):
        if spec is not None and not isinstance(spec, PartitionSpec):
            raise TypeError(f"expected a PartitionSpec or None, got {type(spec).__name__}")
        self.spec = spec


def _check_spec(spec: PartitionSpec, x: Any, given: str, mesh: Any) -> None:
    """Raises unless ``spec`` fits the leaf ``x`` and the mesh; ``given`` says who gave it."""
    if len(spec) > np.ndim(x):
        raise ValueError(
            f"{given}, which has {len(spec)} entries but the leaf has "
            f"shape {np.shape(x)}; give a spec with at most {np.ndim(x)} entries, or P() to "
            "replicate it."
        )
    for dim, entry in enumerate(spec):
        unknown = [a for a in base.names(entry) if a not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"{given}, which names {unknown}, not axes of "
                f"the mesh {dict(mesh.shape)}; name axes among {list(mesh.axis_names)}."
            )
        ways = math.prod(int(mesh.shape[a]) for a in base.names(entry))
        if np.shape(x)[dim] % ways:
            raise ValueError(
                f"{given}, but that leaf has shape {np.shape(x)}: its dimension {dim} "
                f"does not split into {ways} devices; pad it to a multiple of {ways} or "
                "replicate it."
            )


def _known_specs(value: Any, given: list[Any] | None) -> list[Any]:
    """Per leaf, the spec given for it, else the placement of a concrete array."""
    specs = []
    for i, x in enumerate(jax.tree.leaves(value)):
        spec = given[i] if given is not None else None
        placed = getattr(x, "sharding", None)
        if spec is None and isinstance(placed, jax.sharding.NamedSharding):
            spec = placed.spec
        specs.append(spec)
    return specs


def _check_given_against_types(
    given: dict[ArgRef, list[Any]], call: BoundCall, option: str
) -> None:
    """On Explicit axes the arguments' types carry their layouts; specs given must agree."""
    for ref, specs in given.items():
        flat = jax.tree_util.tree_flatten_with_path(call.get(ref, "argument"))[0]
        for (path, x), spec in zip(flat, specs, strict=True):
            if spec is None or not isinstance(x, jax.Array):
                continue
            have = tuple(base.spec_of(x).partitions)
            want = tuple(spec.partitions) + (None,) * (len(have) - len(spec.partitions))
            if have != want:
                raise ValueError(
                    f"{option} gives {spec} for {ref.label}{jax.tree_util.keystr(path)}, but "
                    f"its type is laid out as {base.spec_of(x)}; on Explicit mesh axes the "
                    "type decides: drop the spec, or reshard the argument "
                    f"(jax.sharding.reshard(x, {spec}))."
                )
