"""The data-parallel options (``data_axis=``, ``axis_name=``, ``mesh=``, ``fsdp=``, specs)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxaccum import _options

DataAxis = str | Sequence[str]
"""A mesh axis name, or several, over which the batch's example axis is sharded."""


class FSDP(_options.Option):
    """What ``data_axis=`` does with parameters sharded over the data axes (FSDP).

    Either way the gradient comes back in the parameters' sharding.

    Attributes:
      PER_MICROBATCH: ``"per_microbatch"`` (the default): jaxaccum gathers nothing. The
        step gets the sharded parameters as they are and gathers them where it uses them
        (on Explicit axes with ``jax.sharding.reshard`` to a ``reduced`` spec, one layer at
        a time inside a scan over layers; on Auto axes where the compiler chooses). Each
        micro-batch's gradient comes back sharded into a float32 accumulator that stays
        sharded, so no device holds the whole model or its whole gradient: the choice
        when parameters and optimizer state dominate memory.
      GATHER_ONCE: ``"gather_once"``: the parameters are gathered once before the loop
        (typed ``reduced`` over the data axes where the step allows it, so that each
        micro-batch's gradient is this device's partial sum), every device adds them into
        a whole float32 accumulator, and one reduce-scatter after the loop leaves the
        gradient sharded. One all-gather and one reduce-scatter per step instead of one
        of each per micro-batch (and per layer), for a whole copy of the parameters and
        of the accumulator on every device: the choice when the model is small beside
        the activations and the devices' links are slow. On Auto mesh axes, where the
        compiler reduces each micro-batch's gradient in the loop, the parameters are
        gathered once and the accumulator stays sharded.
    """

    PER_MICROBATCH = "per_microbatch"
    GATHER_ONCE = "gather_once"


@dataclasses.dataclass(frozen=True)
class Options:
    """The checked data-parallel options.

    Attributes:
      axes: the data axes.
      mesh: the mesh given with ``mesh=``, or None (the mesh of the arguments' types, or
        of ``jax.set_mesh``).
      bound: whether the axes are bound by the caller (``axis_name=``).
      fsdp: what happens to parameters sharded over the data axes.
      in_specs: the partition specs given per positional argument, or None.
      specs_name: the option the specs came from, for messages (``in_specs`` or
        ``param_specs``).
    """

    axes: tuple[str, ...]
    mesh: Any = None
    bound: bool = False
    fsdp: FSDP = FSDP.PER_MICROBATCH
    in_specs: Any = None
    specs_name: str = "in_specs"


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


def options(
    data_axis: Any,
    mesh: Any = None,
    axis_name: Any = None,
    fsdp: Any = None,
    in_specs: Any = None,
    *,
    specs_name: str = "in_specs",
) -> Options | None:
    """Checks the data-parallel options together; None when there are no data axes.

    Args:
      data_axis: ``data_axis=`` as given.
      mesh: ``mesh=`` as given.
      axis_name: ``axis_name=`` as given.
      fsdp: ``fsdp=`` as given (None: not given).
      in_specs: the partition specs as given.
      specs_name: what the caller calls the specs (``param_specs`` in the train steps).

    Raises:
      ValueError: for ``data_axis=`` with ``axis_name=``, or an option that goes with
        ``data_axis=`` given without it.
      TypeError: for an axis name that is not a str, or a ``mesh`` that is not a mesh.
    """
    chosen = FSDP.PER_MICROBATCH if fsdp is None else FSDP.parse(fsdp, "fsdp")
    if data_axis is not None and axis_name is not None:
        raise ValueError(
            "give data_axis= (the batch is split over mesh axes, in global view) or "
            "axis_name= (the axes are bound by your own shard_map or pmap), not both."
        )
    if data_axis is None:
        options = (("mesh", mesh), ("fsdp", fsdp), (specs_name, in_specs))
        given = [name for name, value in options if value is not None]
        if given:
            fix = (
                "with axis_name= your shard_map or pmap already decides every layout"
                if axis_name is not None
                else "pass data_axis= (the mesh axis the batch is sharded over) too"
            )
            verb = "only apply" if len(given) > 1 else "only applies"
            raise ValueError(f"{' and '.join(given)} {verb} with data_axis=; {fix}.")
        if axis_name is None:
            return None
        return Options(_axis_names(axis_name, "axis_name"), bound=True)
    axes = _axis_names(data_axis, "data_axis")
    if mesh is not None and not hasattr(mesh, "axis_names"):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    return Options(axes, mesh, fsdp=chosen, in_specs=in_specs, specs_name=specs_name)
