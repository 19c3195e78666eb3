"""``data_axis=`` on Explicit mesh axes: one reduction per step, written in the types.

The step sees global types, as under ``jax.jit`` without jaxaccum. A parameter replicated
over the data axes is given to it typed ``reduced`` over them (a free cast), so
``jax.grad`` returns its gradient ``unreduced``: each device's partial sum, with no
communication. The loop adds those up locally and one ``reshard`` after it reduces them:
an all-reduce into a replicated layout, a reduce-scatter into a sharded one. See JAX's
"Autodiff and sharding" guide.

``reduced`` values take part only in operations with a rule for them. In jax 0.10 that
includes ``dot_general`` and shape and dtype changes, but not an elementwise operation
with an operand sharded over the same axes (a bias added to a batch of activations),
``conv_general_dilated``, ``gather`` or ``integer_pow``. :func:`reducible` finds, in the
step's first trace, the parameters whose every use takes the type; the others stay as
they are, and their gradients are reduced where the step computes them (inside the loop),
as in a hand-written loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore
from jax.extend.core import primitives
from jax.sharding import NamedSharding, PartitionSpec

from jaxaccum._args import ArgRef, BoundCall
from jaxaccum._parallel import base
from jaxaccum._parallel.options import FSDP

# Operations through which a value keeps its role: its uses after them are what count.
_PASS_THROUGH = frozenset(
    {
        "convert_element_type",
        "reshape",
        "transpose",
        "squeeze",
        "expand_dims",
        "copy",
        "copy_p",
        "reshard",
        "slice",
        "dynamic_slice",
        "reduce_precision",
    }
)
# Calls whose body sees the operands as its inputs, one for one: the parameter holding it.
_CALLS = {
    primitives.jit_p: "jaxpr",
    primitives.closed_call_p: "call_jaxpr",
    primitives.call_p: "call_jaxpr",
    primitives.remat_p: "jaxpr",
    primitives.custom_jvp_call_p: "call_jaxpr",
    primitives.custom_vjp_call_p: "call_jaxpr",
}


def reducible(jaxpr: Any, wanted: set[int]) -> set[int]:
    """The inputs among ``wanted`` (positions in ``jaxpr.invars``) that can be ``reduced``.

    An input qualifies when each of its uses, followed through shape and dtype changes and
    into calls, scans over layers and rematerialised blocks, is an operand of
    ``dot_general``. The analysis is conservative: an input it keeps may still work typed
    ``reduced``; one it passes is used only where jax 0.10 has a rule for the type.
    """
    bad: set[int] = set()
    _walk(jaxpr, {jaxpr.invars[i]: {i} for i in wanted}, bad)
    return wanted - bad


def _walk(jaxpr: Any, sources: dict[Any, set[int]], bad: set[int]) -> None:
    """Marks in ``bad`` the sources of every value of ``jaxpr`` used where ``reduced`` is not
    known to be taken. ``sources`` maps a variable to the inputs it derives from."""
    for eqn in jaxpr.eqns:
        used = [
            (k, sources[v])
            for k, v in enumerate(eqn.invars)
            if not isinstance(v, jcore.Literal) and v in sources
        ]
        if not used:
            continue
        name = eqn.primitive.name
        if name == "dot_general":
            continue
        if name in _PASS_THROUGH and len(eqn.outvars) == 1:
            sources[eqn.outvars[0]] = set().union(*(s for _, s in used))
            continue
        inner = _body(eqn)
        if inner is None:
            bad.update(*(s for _, s in used))
            continue
        body, positions = inner
        mapped = {body.invars[positions[k]]: s for k, s in used if k in positions}
        bad.update(*(s for k, s in used if k not in positions))
        _walk(body, mapped, bad)
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal) and v in sources:
            bad.update(sources[v])


def _body(eqn: Any) -> tuple[Any, dict[int, int]] | None:
    """The jaxpr an equation runs its operands through, with operand → input positions
    (carried values of a scan are left out: a carry is not one parameter's value)."""
    param = _CALLS.get(eqn.primitive)
    if param is not None and param in eqn.params:
        body = eqn.params[param]
        body = getattr(body, "jaxpr", body)
        return body, {k: k for k in range(len(eqn.invars))}
    if eqn.primitive is primitives.scan_p:
        body = eqn.params["jaxpr"].jaxpr
        consts, carry = eqn.params["num_consts"], eqn.params["num_carry"]
        keep = [k for k in range(len(eqn.invars)) if not consts <= k < consts + carry]
        return body, {k: k for k in keep}
    return None


@dataclasses.dataclass(frozen=True)
class Typed(base.Placement):
    """``data_axis=`` on Explicit mesh axes.

    Attributes:
      axes: the data axes.
      mesh: the mesh (abstract), whose data axes are Explicit.
      fsdp: what happens to arguments sharded over the data axes.
      plain: the plain arguments (neither batch, carried state nor keys).
    """

    axes: tuple[str, ...]
    mesh: Any
    fsdp: FSDP
    plain: tuple[ArgRef, ...]

    def prepare(self, call: BoundCall) -> BoundCall:
        if self.fsdp != FSDP.GATHER_ONCE:
            return call
        values = {ref: jax.tree.map(self._gather, call.get(ref, "argument")) for ref in self.plain}
        return call.with_values(values)

    def _gather(self, x: Any) -> Any:
        spec = base.spec_of(x)
        if not (base.inexact_array(x) and base.data_dims(spec, self.axes)):
            return x
        return jax.sharding.reshard(x, NamedSharding(self.mesh, base.without(spec, self.axes)))

    def retype(self, leaves: list[Any], jaxpr: Any) -> list[Any] | None:
        wanted = {i: axes for i, x in enumerate(leaves) if (axes := self._replicated_over(x))}
        ok = reducible(jaxpr, set(wanted))
        if not ok:
            return None
        new = list(leaves)
        for i in ok:
            spec = base.spec_of(leaves[i])
            typed = NamedSharding(self.mesh, spec.update(reduced=spec.reduced | wanted[i]))
            new[i] = jax.sharding.reshard(leaves[i], typed)
        return new

    def _replicated_over(self, x: Any) -> frozenset[str]:
        """The data axes a floating leaf is replicated over (and not reduced over yet)."""
        if not base.inexact_array(x):
            return frozenset()
        spec = base.spec_of(x)
        taken = {a for e in spec.partitions for a in base.names(e)} | spec.reduced | spec.unreduced
        return frozenset(a for a in self.axes if a not in taken)

    def _mixed(self, spec: PartitionSpec) -> bool:
        """Whether a type is reduced or unreduced over a data axis."""
        return bool((spec.unreduced | spec.reduced) & set(self.axes))

    def _plain_spec(self, spec: PartitionSpec) -> PartitionSpec:
        axes = frozenset(self.axes)
        return spec.update(unreduced=spec.unreduced - axes, reduced=spec.reduced - axes)

    def targets(self, out: Any, linear: Sequence[bool], call: BoundCall) -> list[Any]:
        gathered: list[Any] = [None] * len(linear)
        if self.fsdp == FSDP.GATHER_ONCE:
            specs = {
                ref: [
                    spec if base.inexact_array(x) and base.data_dims(spec, self.axes) else None
                    for x in jax.tree.leaves(call.get(ref, "argument"))
                    for spec in [base.spec_of(x)]
                ]
                for ref in self.plain
            }
            gathered = base.match(out, base.candidates(call, specs))
        found: list[Any] = []
        for aval, summed, spec in zip(jax.tree.leaves(out), linear, gathered, strict=True):
            own = aval.sharding.spec
            if summed and spec is not None:
                found.append(spec)  # a gathered parameter's gradient: reduce-scattered
            elif summed and self._mixed(own):
                found.append(self._plain_spec(own))
            else:
                found.append(None)
        return found

    def before(self, x: Any, aval: Any) -> Any:
        spec = aval.sharding.spec
        if not self._mixed(spec):
            return x
        return jax.sharding.reshard(x, NamedSharding(self.mesh, self._plain_spec(spec)))

    def value_aval(self, aval: Any) -> Any:
        spec = aval.sharding.spec
        if not self._mixed(spec):
            return aval
        return aval.update(sharding=NamedSharding(self.mesh, self._plain_spec(spec)))

    def finish(
        self, leaves: Sequence[Any], accs: list[Any], totals: base.Totals
    ) -> tuple[list[Any], Any]:
        reduced = [
            acc
            if leaf.target is None
            else jax.sharding.reshard(acc, NamedSharding(self.mesh, leaf.target))
            for leaf, acc in zip(leaves, accs, strict=True)
        ]
        return super().finish(leaves, reduced, totals)


def times(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x * w`` for a scalar ``w``, which is cast to ``reduced`` where ``x`` is unreduced."""
    axes = _unreduced(x)
    if axes:
        mesh = jax.typeof(x).sharding.mesh
        w = jax.sharding.reshard(w, NamedSharding(mesh, PartitionSpec(reduced=axes)))
    return x * w


def all_finite(tree: Any) -> jax.Array:
    """Whether every leaf is finite; an unreduced leaf is reduced as one scalar first.

    ``sum(x * 0)`` is 0 for finite ``x`` and NaN where an element is infinite or NaN; it
    is linear, so each device computes it on its partial sums and one scalar is reduced.
    """
    flags = []
    for x in jax.tree.leaves(tree):
        if _unreduced(x):
            probe = jnp.sum(times(x, jnp.zeros((), x.dtype)))
            sharding = jax.typeof(probe).sharding
            spec = sharding.spec.update(unreduced=frozenset())
            x = jax.sharding.reshard(probe, NamedSharding(sharding.mesh, spec))
        flags.append(jnp.all(jnp.isfinite(x)))
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def _unreduced(x: Any) -> frozenset[str]:
    return frozenset(base.spec_of(x).unreduced) if isinstance(x, jax.Array) else frozenset()
