"""``axis_name=``: the loop inside the caller's ``shard_map`` or ``pmap``, which binds the axes.

Each device runs its own loop over its own examples and every output is combined over the
axes once, after the loop. Plain arguments are marked varying first: under
``shard_map(check_vma=True)`` ``jax.grad`` would otherwise sum the gradient of an argument
that is the same on every device over the devices, at every micro-batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxaccum._args import ArgRef, BoundCall
from jaxaccum._parallel import base


def gather(x: jax.Array, axes: tuple[str, ...], axis: int = 0, tiled: bool = False) -> jax.Array:
    """Every device's ``x`` along ``axis``, typed the same on every device (invariant over
    ``axes`` inside ``shard_map(check_vma=True)``)."""
    varying = set(axes) <= set(base.varying_axes(jax.typeof(x)))
    return jax.lax.all_gather(
        x, axes, axis=axis, tiled=tiled, to="invarying" if varying else "varying"
    )


@dataclasses.dataclass(frozen=True)
class Bound(base.Placement):
    """The loop of one device among ``devices`` along the caller's ``axes``.

    Attributes:
      axes: the axes the caller's ``shard_map`` or ``pmap`` binds.
      devices: the number of devices along them.
      plain: the plain arguments (neither batch, carried state nor keys).
    """

    axes: tuple[str, ...]
    devices: int
    plain: tuple[ArgRef, ...]
    weights_kept = True

    @classmethod
    def of(cls, axes: tuple[str, ...], plain: tuple[ArgRef, ...]) -> Bound:
        """The placement inside the caller's map; raises if ``axes`` are not bound here."""
        try:
            devices = math.prod(jax.lax.axis_size(a) for a in axes)
        except NameError as err:
            raise ValueError(
                f"axis_name={axes!r} is not bound here ({err}); call the step inside the "
                "jax.shard_map or jax.pmap that binds it, or use data_axis= to split the batch "
                "over a mesh axis."
            ) from None
        return cls(axes, devices, plain)

    def prepare(self, call: BoundCall) -> BoundCall:
        values = {
            ref: jax.tree.map(lambda x: base.vary(x, self.axes), call.get(ref, "argument"))
            for ref in self.plain
        }
        return call.with_values(values)

    def keys(self, keys: tuple[Any, ...]) -> tuple[Any, ...]:
        index = jnp.zeros((), jnp.int32)
        for a in self.axes:
            index = index * jax.lax.axis_size(a) + jax.lax.axis_index(a)
        return tuple(jax.random.fold_in(key, index) for key in keys)

    def finish(
        self, leaves: Sequence[Any], accs: list[Any], totals: base.Totals
    ) -> tuple[list[Any], Any]:
        # Each device may have run its own number of micro-batches (early stop).
        traced = isinstance(totals.count, jax.Array)
        count = jax.lax.psum(totals.count, self.axes) if traced else totals.count * self.devices
        w_sum = totals.weight_sum
        overall = base.Totals(
            count, None if w_sum is None else jax.lax.psum(w_sum, self.axes), None, None
        )
        outs = []
        for leaf, acc in zip(leaves, accs, strict=True):
            r = leaf.r
            if r.combine is not None:
                combined = r.combine(acc, leaf.info, self.axes, totals.count, totals.weights)
                outs.append(base.finalize(leaf, combined, overall))
            else:
                outs.append(self._aggregate(leaf, base.finalize(leaf, acc, totals)))
        return outs, _mean_floats(totals.state, self.axes)

    def _aggregate(self, leaf: Any, value: Any) -> Any:
        """A reduction without ``combine``: every device's result, gathered and aggregated."""
        r = leaf.r
        if r.aggregate is None:
            raise TypeError(
                f"reduction {r.name} at {leaf.path} has neither combine nor aggregate, so its "
                f"per-device results cannot be combined over the axes {self.axes}; give the "
                "jaxaccum.Reduction an aggregate= (how to reduce results stacked on a leading "
                "axis) or a combine=."
            )
        return r.aggregate(jax.tree.map(lambda v: gather(v, self.axes), value))


def _mean_floats(state: Any, axes: tuple[str, ...]) -> Any:
    """Carried state after the loop: floating leaves averaged over the devices.

    Per-device statistics (BatchNorm running averages) become their mean over the axes,
    one all-reduce per leaf; integer and key leaves (counters, PRNG keys) evolve the same
    on every device and are returned as they are.
    """

    def one(x: Any) -> Any:
        dtype = getattr(x, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
            return jax.lax.pmean(x, axes)
        return x

    return jax.tree.map(one, state)
