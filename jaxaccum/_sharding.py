"""Data-parallel accumulation: a local scan per device, one collective per output after it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxaccum._reduce import Reduce

DataAxis = str | Sequence[str]
"""A mesh axis name, or several, over which the batch's leading axis is sharded."""

FSDP = Literal["per_microbatch", "gather_once"]
"""How parameters sharded over the data axis (FSDP) are handled by ``data_axis=``.

* ``"per_microbatch"`` (default): inside the loop each micro-batch gathers the parameters
  where they are used and reduce-scatters its gradient into a float32 accumulator that
  stays sharded; no device holds a full gradient or accumulator across micro-batches.
  k all-gathers and k reduce-scatters per step, all inside the loop. Per-device memory
  falls with k; the choice when the model state dominates memory.
* ``"gather_once"``: the parameters are gathered once before the loop, every device
  accumulates a full float32 gradient locally and one reduce-scatter after the loop
  leaves it sharded. One all-gather and one reduce-scatter per step (the fewest bytes
  moved), but a full copy of the parameters and of the accumulator per device; the
  choice when activations dominate memory.

Either way the gradient comes back in the parameters' sharding.
"""


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Where the batch is sharded: mesh axis names, the mesh, and how sharded params go.

    ``bound`` marks axes bound by the caller (``axis_name=``: inside its ``shard_map`` or
    ``pmap``), where jaxaccum only reduces over them; otherwise jaxaccum runs its own
    ``shard_map`` over ``mesh``.
    """

    axes: tuple[str, ...]
    mesh: Any  # jax.sharding.Mesh | AbstractMesh | None (then the context mesh)
    bound: bool = False
    fsdp: FSDP = "per_microbatch"
    in_specs: Any = None

    @property
    def spec(self) -> PartitionSpec:
        """The partition of a batch leaf's leading axis."""
        return PartitionSpec(self.axes[0] if len(self.axes) == 1 else self.axes)

    def resolve_mesh(self) -> Any:
        """The mesh given, else the one set with ``jax.set_mesh``; checked for the axes."""
        mesh = self.mesh if self.mesh is not None else jax.sharding.get_abstract_mesh()
        names = tuple(getattr(mesh, "axis_names", ()))
        if not names:
            raise ValueError(
                f"data_axis={self.axes!r} needs a device mesh: pass mesh=jax.make_mesh(...) to "
                "jaxaccum, or call the step inside `with jax.set_mesh(mesh):`."
            )
        missing = [a for a in self.axes if a not in names]
        if missing:
            raise ValueError(
                f"data_axis names {missing} are not axes of the mesh {dict(mesh.shape)}; pass "
                f"data_axis= one or more of {list(names)}."
            )
        return mesh

    def size(self, mesh: Any) -> int:
        """The number of batch shards (product of the data axes' sizes)."""
        return math.prod(int(mesh.shape[a]) for a in self.axes)


def _axis_names(value: Any, option: str) -> tuple[str, ...]:
    if isinstance(value, str):
        axes: tuple[Any, ...] = (value,)
    elif isinstance(value, Sequence):
        axes = tuple(value)
    else:
        axes = ()
    if not axes or not all(isinstance(a, str) and a for a in axes):
        raise TypeError(f"{option} must be a mesh axis name or a sequence of them, got {value!r}.")
    if len(set(axes)) != len(axes):
        raise ValueError(f"{option} names repeat: {axes}.")
    return axes


def data_parallel(
    data_axis: Any,
    mesh: Any,
    axis_name: Any = None,
    fsdp: Any = "per_microbatch",
    in_specs: Any = None,
) -> DataParallel | None:
    """Validates the ``data_axis=``, ``axis_name=``, ``mesh=``, ``fsdp=`` and specs options.

    Returns None when there is no data parallelism.
    """
    if fsdp not in get_args(FSDP):
        raise ValueError(f"fsdp={fsdp!r} is not one of {get_args(FSDP)}.")
    if data_axis is not None and axis_name is not None:
        raise ValueError(
            "give data_axis= (jaxaccum runs its own shard_map over the mesh) or axis_name= "
            "(the axis is already bound by your shard_map or pmap), not both."
        )
    if axis_name is not None:
        if mesh is not None or in_specs is not None:
            raise ValueError(
                "mesh= and param_specs=/in_specs= go with data_axis=; with axis_name= the "
                "caller's shard_map or pmap already decided the layout."
            )
        return DataParallel(_axis_names(axis_name, "axis_name"), None, bound=True, fsdp=fsdp)
    if data_axis is None:
        if mesh is not None or in_specs is not None:
            raise ValueError(
                "mesh= and param_specs=/in_specs= are only used with data_axis=; pass "
                "data_axis='data' too."
            )
        return None
    axes = _axis_names(data_axis, "data_axis")
    if mesh is not None and not hasattr(mesh, "axis_names"):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    return DataParallel(axes, mesh, fsdp=fsdp, in_specs=in_specs)


def device_index(axes: tuple[str, ...]) -> jax.Array:
    """This device's linear index along the data axes (inside ``shard_map``)."""
    index = jnp.zeros((), jnp.int32)
    for a in axes:
        index = index * jax.lax.axis_size(a) + jax.lax.axis_index(a)
    return index


def _weighted(x: jax.Array, w: jax.Array | None, axes: tuple[str, ...]) -> jax.Array:
    """The mean over devices of ``x``, weighted by ``w`` (zero-weight devices left out)."""
    if w is None:
        return jax.lax.pmean(x.astype(jnp.float32), axes).astype(x.dtype)
    w = jnp.where(w > 0, w, 0).astype(jnp.promote_types(x.dtype, jnp.float32))
    w = w.reshape(w.shape + (1,) * (x.ndim - w.ndim))
    num = jax.lax.psum(jnp.where(w > 0, x.astype(w.dtype) * w, 0), axes)
    den = jax.lax.psum(w, axes)
    safe = jnp.where(den > 0, den, 1)
    return jnp.where(den > 0, num / safe, 0).astype(x.dtype)


def _extreme(x: jax.Array, axes: tuple[str, ...], largest: bool) -> jax.Array:
    op = jax.lax.pmax if largest else jax.lax.pmin
    if jnp.issubdtype(x.dtype, jnp.bool_):
        return op(x.astype(jnp.int32), axes).astype(jnp.bool_)
    return op(x, axes)


def combine(
    reduce: Reduce,
    acc: jax.Array,
    weights: jax.Array | None,
    axes: tuple[str, ...],
) -> jax.Array:
    """Combines one leaf's per-device result over the data axes, with one collective.

    Args:
      reduce: the leaf's reduction.
      acc: the device's accumulator after its local loop (the stacked outputs for STACK,
        the last output for LAST).
      weights: with a ``weight_fn``, every micro-batch's weight on this device (shape
        ``(k,)``), used to average LAST and STACK outputs over devices; else None.
      axes: the data axes.

    Returns:
      The combined accumulator, to be finished as on one device with ``k`` replaced by k
      times the number of devices and the weight sum by its sum over devices.
    """
    floating = jnp.issubdtype(acc.dtype, jnp.inexact)
    if reduce in (Reduce.MEAN, Reduce.SUM, Reduce.WEIGHTED_MEAN):
        return jax.lax.psum(acc, axes)
    if reduce in (Reduce.MAX, Reduce.MIN):
        return _extreme(acc, axes, reduce is Reduce.MAX)
    # LAST and STACK: the j-th global micro-batch is the union of every device's j-th one,
    # so floating values are averaged over devices (weighted), counts summed, flags or-ed.
    if floating:
        if weights is not None and reduce is Reduce.LAST:
            weights = weights[-1]
        return _weighted(acc, weights, axes)
    if jnp.issubdtype(acc.dtype, jnp.bool_):
        return _extreme(acc, axes, largest=True)
    return jax.lax.psum(acc, axes)


def combine_state(state: Any, axes: tuple[str, ...]) -> Any:
    """Carried state after the loop: floating leaves averaged over devices, others kept.

    Per-device statistics (BatchNorm running averages, say) become their mean over the
    data axes, one all-reduce per leaf after the loop. Integer and key leaves (counters,
    PRNG keys) evolve identically on every device and are returned as they are.
    """

    def one(x: Any) -> Any:
        dtype = getattr(x, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
            return jax.lax.pmean(x, axes)
        return x

    return jax.tree.map(one, state)


def batch_spec(dp: DataParallel, presplit: bool) -> PartitionSpec:
    """The in-spec of a batch leaf: its example axis sharded over the data axes."""
    return PartitionSpec(None, *dp.spec) if presplit else dp.spec


def check_shards(n: int, k: int, shards: int, where: str) -> None:
    """Raises unless N splits into ``shards`` devices times k micro-batches."""
    if n % (k * shards):
        per_device = [m for m in range(1, n // max(shards, 1) + 1) if n % (m * shards) == 0]
        raise ValueError(
            f"batch size {n} at leaf {where} must be divisible by k × devices = {k} × {shards} "
            f"= {k * shards} (each device runs k micro-batches of its N/{shards} examples); "
            f"choose k from {per_device} or pad the batch with jaxaccum.pad_batch."
        )


def as_array_tree(tree: Any) -> Any:
    """Python numbers become arrays so that ``shard_map`` accepts them."""
    return jax.tree.map(lambda x: x if hasattr(x, "dtype") else np.asarray(x), tree)


# --- Arguments sharded over the data axes (FSDP) ---------------------------------------


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


def _explicit_axes(mesh: Any) -> set[str]:
    return {
        n
        for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if t == jax.sharding.AxisType.Explicit
    }


def explicit_in(spec: Any, mesh: Any) -> bool:
    """Whether ``spec`` names an Explicit axis of ``mesh`` (so a type carries it)."""
    explicit = _explicit_axes(mesh)
    return any(_names(entry) & explicit for entry in spec)


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
    if set(used) - set(axes) or not set(used) <= set(axes):
        raise ValueError(
            f"{where} is sharded as {spec}: dimension {dim} mixes the data axes {axes} with "
            f"other mesh axes ({entry!r}); {fix}, and keep other axes (tensor parallelism) "
            "on other dimensions."
        )
    return Sharded(dim, used, rest)


def arg_layouts(tree: Any, given: Any, axes: tuple[str, ...], label: str) -> Any:
    """A pytree like ``tree`` holding a :class:`Sharded` (or None) per leaf.

    ``given`` is the user's spec prefix for this argument (None: read each leaf's type).
    """
    treedef: Any
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if given is None:
        specs = [_type_spec(x) for _, x in flat]
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
                "PartitionSpec per leaf or subtree, e.g. param_specs=jax.tree.map(lambda x: "
                "x.sharding.spec, params)."
            ) from None
    return treedef.unflatten(
        [
            leaf_layout(spec, axes, label + jax.tree_util.keystr(path))
            for (path, _), spec in zip(flat, specs, strict=True)
        ]
    )


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
    if layout.dim is None:
        raise ValueError("scatter needs a leaf sharded over the data axes")
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
    auto = {
        n
        for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if t == jax.sharding.AxisType.Auto
    }
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


def check_batch_placed(batch: dict[str, Any], dp: DataParallel, mesh: Any) -> None:
    """Raises unless every batch leaf is sharded over the data axes where that is visible.

    A concrete array on one device cannot be split over a mesh of many. On a mesh whose
    data axes are Explicit, the batch's type says how it is placed and must shard its
    leading axis over them. A traced batch on Auto axes carries no placement and is split
    as it stands.
    """
    explicit = bool(set(dp.axes) & _explicit_axes(mesh))
    for label, tree in batch.items():
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
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
            first = spec[0] if len(spec) else None
            if set(_names(first)) != set(dp.axes):
                raise ValueError(
                    f"batch leaf {where} is placed as {spec}, but data_axis={dp.axes!r} needs "
                    f"its leading (example) axis sharded over {dp.axes!r}: "
                    f"jax.device_put(batch, NamedSharding(mesh, P({dp.spec[0]!r}))), or "
                    f"jax.sharding.reshard(batch, P({dp.spec[0]!r})) inside jit."
                )
