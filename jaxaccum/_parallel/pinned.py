"""``data_axis=`` on Auto mesh axes: the compiler partitions the step, jaxaccum pins layouts.

On Auto axes no type says where a value lives, so jaxaccum states it with sharding
constraints: each micro-batch on the data axes (its example axis sharded over them), each
gradient's accumulator in its parameter's layout (from ``in_specs=``/``param_specs=``, or
the placement of arguments passed outside ``jax.jit``). The compiler places every
reduction: it reduces each micro-batch's gradient inside the loop (an all-reduce, or a
reduce-scatter into a sharded accumulator), since no compiler defers a reduction from one
loop iteration to after the loop. For one reduction per step, make the data axes Explicit
(``jax.make_mesh``'s default), where jaxaccum writes it in the types.

A contiguous split puts each micro-batch on some devices only; its micro-batches are not
pinned, and the compiler places them (for weights sharded over the data axes and used
whole, it may then run each layer tensor-parallel instead of gathering the weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxaccum._args import ArgRef, BoundCall
from jaxaccum._parallel import base
from jaxaccum._parallel.options import FSDP


@dataclasses.dataclass(frozen=True)
class Pinned(base.Placement):
    """``data_axis=`` on Auto mesh axes.

    Attributes:
      axes: the data axes.
      mesh: the mesh (abstract).
      fsdp: what happens to parameters sharded over the data axes.
      specs: per plain argument with known layouts, a spec (or None) per leaf.
      pin_batches: whether each micro-batch is pinned to the data axes (not after a
        contiguous split, whose micro-batches the compiler places).
    """

    axes: tuple[str, ...]
    mesh: Any
    fsdp: FSDP
    specs: dict[ArgRef, list[Any]]
    pin_batches: bool = True

    def _constrain(self, x: Any, spec: PartitionSpec | None) -> Any:
        if spec is None or not hasattr(x, "dtype") or np.ndim(x) < len(spec.partitions):
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def prepare(self, call: BoundCall) -> BoundCall:
        gather = self.fsdp == FSDP.GATHER_ONCE
        values = {}
        for ref, specs in self.specs.items():
            leaves, structure = jax.tree.flatten(call.get(ref, "argument"))
            placed = [
                self._constrain(x, base.without(s, self.axes) if gather and s is not None else s)
                for x, s in zip(leaves, specs, strict=True)
            ]
            values[ref] = jax.tree.unflatten(structure, placed)
        return call.with_values(values)

    def microbatch(self, mb: dict[str, Any], axes: dict[str, int]) -> dict[str, Any]:
        if not self.pin_batches:
            return mb
        data = self.axes[0] if len(self.axes) == 1 else self.axes
        return {
            label: jax.tree.map(
                lambda x, a=axes[label]: self._constrain(x, PartitionSpec(*[None] * a, data)),
                tree,
            )
            for label, tree in mb.items()
        }

    def targets(self, out: Any, linear: Sequence[bool], call: BoundCall) -> list[Any]:
        specs = base.match(out, base.candidates(call, self.specs))
        return [s if summed else None for s, summed in zip(specs, linear, strict=True)]

    def pin(self, acc: Any, target: Any) -> Any:
        return self._constrain(acc, target)
