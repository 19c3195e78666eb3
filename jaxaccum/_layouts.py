"""Where a step's arguments live on the mesh: shards over the data axes, other axes' layouts.

An argument leaf of a data-parallel step is replicated over the data axes, or sharded over
them in one dimension (FSDP), and may be laid out over other mesh axes too (tensor
parallelism). The layout is read from the leaf's type on Explicit mesh axes or given by the
user; this module checks it, gathers and reduce-scatters by it, finds the outputs that are
gradients of sharded arguments, and checks that a batch is placed where the data axes are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from jaxaccum._sharding import DataParallel


@dataclasses.dataclass(frozen=True)
class Sharded:
    """How a non-batch argument leaf is laid out over the mesh.

    Attributes:
      dim: the dimension sharded over the data axes (FSDP), or None.
      axes: those data axes, in the order of the spec.
      rest: the leaf's spec over the other mesh axes (tensor parallelism, left to the
        compiler inside the loop), or None when it has none.
    """

    dim: int | None
    axes: tuple[str, ...]
    rest: PartitionSpec | None = None

    @property
    def split(self) -> bool:
        """Whether the leaf arrives as shards over the data axes."""
        return self.dim is not None


def _axes_of_type(mesh: Any, kind: Any) -> set[str]:
    return {n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == kind}


def _explicit_axes(mesh: Any) -> set[str]:
    return _axes_of_type(mesh, jax.sharding.AxisType.Explicit)


def explicit_in(spec: Any, mesh: Any) -> bool:
    """Whether ``spec`` names an Explicit axis of ``mesh`` (so a type carries it)."""
    explicit = _explicit_axes(mesh)
    return any(_names(entry) & explicit for entry in spec)


def explicit_entry(x: Any, dim: int) -> Any:
    """The mesh axes an array's type (Explicit axes) shards dimension ``dim`` over, or None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or mesh.empty or spec is None or len(spec) <= dim:
        return None
    return spec[dim] if explicit_in((spec[dim],), mesh) else None


def _type_spec(x: Any) -> PartitionSpec | None:
    """The partition spec an array's type (Explicit axes) or placement carries, if any."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    if spec is not None and mesh is not None and not mesh.empty and explicit_in(spec, mesh):
        return PartitionSpec(*spec)
    placed = getattr(x, "sharding", None)  # a concrete array outside jit
    if isinstance(placed, jax.sharding.NamedSharding):
        return PartitionSpec(*placed.spec)
    return None


def _names(entry: Any) -> set[str]:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return set()
    return set(entry) if isinstance(entry, tuple) else {entry}


def leaf_layout(spec: Any, axes: tuple[str, ...], where: str) -> Sharded | None:
    """Which dimension of a leaf with partition ``spec`` is sharded over the data axes.

    Raises:
      ValueError: for layouts a data-parallel loop cannot gather and scatter: the data
        axes over two dimensions, or mixed with another mesh axis in one dimension.
    """
    if spec is None:
        return None
    dims = [(d, e) for d, e in enumerate(spec) if _names(e) & set(axes)]
    others = [None if _names(e) & set(axes) else e for e in spec]
    rest = PartitionSpec(*others) if any(_names(e) for e in others) else None
    if not dims:
        return None if rest is None else Sharded(None, axes, rest)
    fix = (
        f"shard it over one dimension with exactly the data axes, e.g. P({axes[0]!r}, None), "
        "or replicate it over them"
    )
    if len(dims) > 1:
        raise ValueError(
            f"{where} is sharded as {spec}: the data axes {axes} appear in more than one "
            f"dimension, which jaxaccum cannot gather and reduce-scatter; {fix}."
        )
    dim, entry = dims[0]
    used = tuple(entry) if isinstance(entry, tuple) else (entry,)
    if set(used) - set(axes):
        raise ValueError(
            f"{where} is sharded as {spec}: dimension {dim} mixes the data axes {axes} with "
            f"other mesh axes ({entry!r}); {fix}, and keep other axes (tensor parallelism) "
            "on other dimensions."
        )
    return Sharded(dim, used, rest)


def arg_layouts(tree: Any, given: Any, axes: tuple[str, ...], label: str, mesh: Any) -> Any:
    """A pytree like ``tree`` holding a :class:`Sharded` (or None) per leaf.

    ``given`` is the user's spec prefix for this argument (None: read each leaf's type).
    Leaves that are not arrays (Python numbers, strings) have no layout.

    Raises:
      ValueError: for specs that are no prefix of the argument, a spec with more entries
        than its leaf has dimensions, a dimension the data axes do not divide, or a
        layout :func:`leaf_layout` rejects.
    """
    treedef: Any
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if given is None:
        specs = [_type_spec(x) if hasattr(x, "dtype") else None for _, x in flat]
    else:
        try:
            boxed = jax.tree.map(
                lambda s, sub: jax.tree.map(lambda _: _Given(s), sub),
                given,
                tree,
                is_leaf=lambda s: s is None or isinstance(s, PartitionSpec),
            )
            specs = [box.spec for box in treedef.flatten_up_to(boxed)]
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"the specs given for {label} are not a pytree prefix of it ({err}); give one "
                "PartitionSpec per leaf or subtree (param_specs= for train steps, in_specs= "
                "for accumulate), e.g. jax.tree.map(lambda x: x.sharding.spec, params)."
            ) from None
    layouts = []
    for (path, x), spec in zip(flat, specs, strict=True):
        where = label + jax.tree_util.keystr(path)
        if spec is not None and len(spec) > np.ndim(x):
            raise ValueError(
                f"the spec {spec} given for {where} has {len(spec)} entries but the leaf has "
                f"shape {np.shape(x)}; give a spec with at most {np.ndim(x)} entries, or "
                "P() to replicate it."
            )
        layout = leaf_layout(spec, axes, where)
        if layout is not None and layout.dim is not None:
            ways = math.prod(int(mesh.shape[a]) for a in layout.axes)
            if np.shape(x)[layout.dim] % ways:
                raise ValueError(
                    f"{where} has shape {np.shape(x)} and is sharded as {spec}, but its "
                    f"dimension {layout.dim} does not split into {ways} devices over "
                    f"{layout.axes}; pad it to a multiple of {ways} or replicate it."
                )
        layouts.append(layout)
    return treedef.unflatten(layouts)


@dataclasses.dataclass(frozen=True)
class _Given:
    """A spec given for a leaf (a box, so that a None spec stays a pytree leaf)."""

    spec: PartitionSpec | None


def in_spec(layout: Sharded | None, ndim: int) -> PartitionSpec:
    """The ``shard_map`` in/out spec of a leaf: only its data-axes dimension."""
    if layout is None or layout.dim is None:
        return PartitionSpec()
    entries: list[Any] = [None] * ndim
    entries[layout.dim] = layout.axes[0] if len(layout.axes) == 1 else layout.axes
    return PartitionSpec(*entries)


def gather(x: jax.Array, layout: Sharded | None) -> jax.Array:
    """The whole leaf from this device's shard (an all-gather over the data axes)."""
    if layout is None or layout.dim is None:
        return x
    return jax.lax.all_gather(x, layout.axes, axis=layout.dim, tiled=True)


def scatter(x: jax.Array, layout: Sharded) -> jax.Array:
    """The sum over devices of ``x``, keeping only this device's shard (reduce-scatter)."""
    return jax.lax.psum_scatter(x, layout.axes, scatter_dimension=layout.dim, tiled=True)


def constrain(x: jax.Array, layout: Sharded | None) -> jax.Array:
    """``x`` kept in the leaf's layout over the other (Auto) mesh axes, if it has one.

    An accumulator for the gradient of a tensor-parallel parameter is then as sharded as
    the parameter, instead of whatever layout the compiler picks for the loop's carry.
    On Explicit axes the accumulator's type already carries that layout.
    """
    if layout is None or layout.rest is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    auto = _axes_of_type(mesh, jax.sharding.AxisType.Auto)
    entries = [e if _names(e) and _names(e) <= auto else None for e in layout.rest]
    if not any(entries):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*entries))


def match_outputs(out_shapes: Any, args: Sequence[tuple[Any, Any]]) -> Any:
    """Marks the outputs that are gradients of sharded arguments with their layout.

    An output subtree with the structure and the (gathered) leaf shapes of a sharded
    argument (``(value, layouts)`` pairs in ``args``) is that argument's gradient: its
    leaves get the argument's layouts. Returns a tree shaped like the outputs holding a
    :class:`Sharded` or None per leaf.
    """
    candidates = []
    for value, layouts in args:
        if any(x is not None for x in jax.tree.leaves(layouts, is_leaf=_is_layout)):
            shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(value)]
            candidates.append((jax.tree.structure(value), shapes, layouts))

    def match(node: Any) -> Any:
        for treedef, shapes, layouts in candidates:
            structure: Any = jax.tree.structure(node)
            if structure == treedef and [tuple(x.shape) for x in jax.tree.leaves(node)] == shapes:
                return layouts
        return None

    return jax.tree.map(match, out_shapes, is_leaf=lambda node: match(node) is not None)


def _is_layout(x: Any) -> bool:
    return x is None or isinstance(x, Sharded)


def check_batch_placed(
    batch: dict[str, Any],
    dp: DataParallel,
    mesh: Any,
    presplit: bool = False,
    axes: dict[str, int] | None = None,
) -> None:
    """Raises unless every batch leaf is sharded over the data axes where that is visible.

    A concrete array on one device cannot be split over a mesh of many. On a mesh whose
    data axes are Explicit, the batch's type says how it is placed and must shard its
    leading axis (the second one for a presplit batch) over them. A traced batch on Auto
    axes carries no placement and is split as it stands.
    """
    explicit = bool(set(dp.axes) & _explicit_axes(mesh))
    for label, tree in batch.items():
        example_dim = (axes or {}).get(label, 0) + presplit
        wanted = "P(" + "None, " * example_dim
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not hasattr(x, "dtype"):
                continue  # not an array: _split.leading_size names it
            where = label + jax.tree_util.keystr(path)
            placed = getattr(x, "sharding", None)
            if isinstance(placed, jax.sharding.SingleDeviceSharding) and dp.size(mesh) > 1:
                raise ValueError(
                    f"batch leaf {where} sits on one device, but data_axis={dp.axes!r} splits "
                    f"it over {dp.size(mesh)} devices; place it on the mesh first: "
                    f"jax.device_put(batch, NamedSharding(mesh, P({dp.spec[0]!r}))), or call "
                    "the step inside jax.jit."
                )
            spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
            if not explicit or spec is None:
                continue
            entry = spec[example_dim] if len(spec) > example_dim else None
            if set(_names(entry)) != set(dp.axes):
                target = f"{wanted}{dp.spec[0]!r})"
                raise ValueError(
                    f"batch leaf {where} is placed as {spec}, but data_axis={dp.axes!r} needs "
                    f"its example axis (axis {example_dim}) sharded over {dp.axes!r}: "
                    f"jax.device_put(batch, NamedSharding(mesh, {target})), or "
                    f"jax.sharding.reshard(batch, {target}) inside jit."
                )
