"""Data axes: the `data_axis=`/`axis_name=` options, and combining per-device results over them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxaccum import _options

DataAxis = str | Sequence[str]
"""A mesh axis name, or several, over which the batch's leading axis is sharded."""


class FSDP(_options.Option):
    """How parameters sharded over the data axis (FSDP) are handled by ``data_axis=``.

    Either way the gradient comes back in the parameters' sharding.

    Attributes:
      PER_MICROBATCH: ``"per_microbatch"`` (default): inside the loop each micro-batch
        gathers the parameters where they are used and reduce-scatters its gradient into a
        float32 accumulator that stays sharded; no device holds a full gradient or
        accumulator across micro-batches. k all-gathers and k reduce-scatters per step, all
        inside the loop. Per-device memory falls with k; the choice when the model state
        dominates memory.
      GATHER_ONCE: ``"gather_once"``: the parameters are gathered once before the loop,
        every device accumulates a full float32 gradient locally and one reduce-scatter
        after the loop leaves it sharded. One all-gather and one reduce-scatter per step
        (the fewest bytes moved), but a full copy of the parameters and of the accumulator
        per device; the choice when activations dominate memory.
    """

    PER_MICROBATCH = "per_microbatch"
    GATHER_ONCE = "gather_once"


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
    fsdp: FSDP = FSDP.PER_MICROBATCH
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
    fsdp = FSDP.parse(fsdp, "fsdp")
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


def batch_spec(dp: DataParallel, presplit: bool, axis: int = 0) -> PartitionSpec:
    """The in-spec of a batch leaf: its example axis sharded over the data axes."""
    return PartitionSpec(*[None] * (axis + presplit), *dp.spec)


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
