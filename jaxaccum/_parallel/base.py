"""What every placement shares: the hooks the loop calls, and reading layouts off types."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec

from jaxaccum import _checks
from jaxaccum._args import ArgRef, BoundCall


@dataclasses.dataclass(frozen=True)
class Totals:
    """What the loop knows after its last micro-batch.

    Attributes:
      count: micro-batches that ran (an int, or traced after an early stop).
      weight_sum: the sum of the positive weights, or None without ``weight_fn``.
      weights: each micro-batch's weight, shape ``(k,)`` (only kept for :class:`Bound`).
      state: the carried state after the last micro-batch.
    """

    count: Any
    weight_sum: Any
    weights: Any
    state: Any


class Placement:
    """One device, or no data axes: the loop as written.

    The loop calls these hooks in order: :meth:`prepare` on the call before tracing the
    step, :meth:`retype` after the first trace (new argument leaves for a second trace, or
    None), :meth:`keys` and :meth:`microbatch` while tracing, :meth:`targets` with the
    step's output types, :meth:`before` and :meth:`pin` in the loop body, :meth:`finish`
    after it. The placements for data axes override them.
    """

    weights_kept = False  # whether finish needs every micro-batch's weight

    def prepare(self, call: BoundCall) -> BoundCall:
        """The call with its plain arguments as the step gets them."""
        return call

    def retype(self, leaves: list[Any], jaxpr: Any) -> list[Any] | None:
        """Argument leaves for a second trace of the step, or None to keep the first.

        ``leaves`` are the plain arguments' array leaves, the first inputs of ``jaxpr``,
        the first trace.
        """
        return None

    def keys(self, keys: tuple[Any, ...]) -> tuple[Any, ...]:
        """The PRNG keys the micro-batches' keys are folded from."""
        return keys

    def microbatch(self, mb: dict[str, Any], axes: dict[str, int]) -> dict[str, Any]:
        """A micro-batch as the step gets it (``axes``: each argument's example axis)."""
        return mb

    def targets(self, out: Any, linear: Sequence[bool], call: BoundCall) -> list[Any]:
        """Per output leaf, the layout its accumulator leaves the loop in (None: as is).

        Args:
          out: the step's output types.
          linear: per output leaf, whether its reduction is a sum.
          call: the call as it was made.
        """
        return [None] * len(linear)

    def before(self, x: Any, aval: Any) -> Any:
        """An output leaf of type ``aval`` before a reduction that is not a sum takes it."""
        return x

    def value_aval(self, aval: Any) -> Any:
        """The type :meth:`before` gives an output leaf of type ``aval``."""
        return aval

    def pin(self, acc: Any, target: Any) -> Any:
        """An accumulator as the loop carries it."""
        return acc

    def finish(
        self, leaves: Sequence[Any], accs: list[Any], totals: Totals
    ) -> tuple[list[Any], Any]:
        """The reduced outputs and the carried state, from the accumulators after the loop."""
        return [finalize(leaf, acc, totals) for leaf, acc in zip(leaves, accs, strict=True)], (
            totals.state
        )


def finalize(leaf: Any, acc: Any, totals: Totals) -> Any:
    """A leaf's result from its accumulator (``leaf.r`` its reduction, ``leaf.info`` what
    the reduction is told about the leaf)."""
    result = leaf.r.finalize(acc, leaf.info, totals.count, totals.weight_sum)
    return _checks.returned_arrays(result, "reduce='s Reduction.finalize", leaf.path)


def names(entry: Any) -> set[str]:
    """The mesh axes one entry of a partition spec names."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return set()
    return set(entry) if isinstance(entry, tuple) else {entry}


def type_mesh(x: Any) -> Any:
    """The mesh an array's type is laid out on, or None."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return None if mesh is None or mesh.empty else mesh


def axes_of_type(mesh: Any, kind: Any) -> set[str]:
    return {n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == kind}


def spec_of(x: Any) -> PartitionSpec:
    """The partition spec of an array's type (``P()`` on no mesh)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return PartitionSpec() if spec is None or type_mesh(x) is None else spec


def data_dims(spec: PartitionSpec, axes: Sequence[str]) -> list[int]:
    """The dimensions ``spec`` shards over any of ``axes``."""
    return [d for d, e in enumerate(spec.partitions) if names(e) & set(axes)]


def without(spec: PartitionSpec, axes: Sequence[str]) -> PartitionSpec:
    """``spec`` with ``axes`` taken out of its partitions (a gather over them)."""
    parts: list[Any] = []
    for entry in spec.partitions:
        kept = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a not in axes)
        parts.append(kept[0] if len(kept) == 1 else (kept or None))
    return spec.update(partitions=tuple(parts))


def inexact_array(x: Any) -> bool:
    return isinstance(x, jax.Array) and bool(jnp.issubdtype(x.dtype, jnp.inexact))


def explicit_entry(x: Any, dim: int) -> Any:
    """The Explicit mesh axes an array's type shards dimension ``dim`` over, or None."""
    mesh = type_mesh(x)
    spec = spec_of(x)
    if mesh is None or len(spec.partitions) <= dim:
        return None
    entry = spec.partitions[dim]
    return entry if names(entry) & axes_of_type(mesh, AxisType.Explicit) else None


@contextlib.contextmanager
def mesh_of(values: Any) -> Iterator[None]:
    """Enters the mesh the values' types are laid out on, when no mesh is set.

    Values made inside (``jnp.zeros``, a reduction's carry) are then typed on the mesh of
    the arguments, as under ``jax.set_mesh``; typed on no mesh they would be refused beside
    the arguments on Explicit axes.
    """
    if not jax.sharding.get_abstract_mesh().empty:
        yield
        return
    arrays = (x for x in jax.tree.leaves(values) if isinstance(x, jax.Array))
    found = next((m for x in arrays if (m := type_mesh(x)) is not None), None)
    if found is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(found):
        yield


def varying_axes(aval: Any) -> tuple[str, ...]:
    """The manual axes an abstract value varies over (empty outside ``shard_map``)."""
    return tuple(getattr(getattr(aval, "mat", None), "varying", ()) or ())


def vary(x: Any, axes: Sequence[str]) -> Any:
    """``x`` marked as varying over ``axes`` (no-op outside ``check_vma`` tracing)."""
    if not hasattr(x, "dtype"):
        return x
    have = set(varying_axes(jax.typeof(x)))
    manual = axes_of_type(jax.sharding.get_abstract_mesh(), AxisType.Manual)
    extra = tuple(a for a in axes if a not in have and a in manual)  # not under vmap
    return jax.lax.pcast(x, extra, to="varying") if extra else x


def typed_like(x: jax.Array, aval: Any) -> jax.Array:
    """``x`` with the type of ``aval``: its sharding on Explicit axes (its ``reduced`` and
    ``unreduced`` axes included) and its varying axes inside ``shard_map``."""
    sharding: Any = getattr(aval, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if (
        mesh is not None
        and not mesh.empty
        and axes_of_type(mesh, AxisType.Explicit)
        and x.shape == aval.shape
        and spec_of(x) != sharding.spec
    ):
        x = jax.sharding.reshard(x, sharding)
    return vary(x, varying_axes(aval))


def is_spec(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def match(out: Any, candidates: Sequence[tuple[Any, list[Any], list[Any]]]) -> list[Any]:
    """Per output leaf (in ``jax.tree.leaves`` order), the spec of the argument leaf it is
    the gradient of, or None.

    ``candidates`` hold ``(structure, leaf shapes, leaf specs)`` per argument: an output
    subtree with the structure and leaf shapes of one is taken for its gradient (the
    second output of ``jax.value_and_grad``, say).
    """
    found: list[Any] = []

    def visit(node: Any) -> None:
        structure: Any = jax.tree.structure(node)  # PyTreeDef: no annotations mypy resolves
        shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(node)]
        for want, want_shapes, specs in candidates:
            if structure == want and shapes == want_shapes:
                found.extend(specs)
                return
        if structure.num_nodes == 1:
            found.extend([None] * structure.num_leaves)
            return
        for child in jax.tree_util.tree_flatten(node, is_leaf=lambda c: c is not node)[0]:
            visit(child)

    visit(out)
    return found


def candidates(call: BoundCall, specs: dict[ArgRef, list[Any]]) -> list[Any]:
    """:func:`match`'s candidates: the arguments of ``specs`` (per ref, a spec or None per
    leaf) that have a spec on some leaf."""
    found = []
    for ref, leaf_specs in specs.items():
        if any(s is not None for s in leaf_specs):
            value = call.get(ref, "argument")
            shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(value)]
            found.append((jax.tree.structure(value), shapes, leaf_specs))
    return found
