"""Docstring text shared by the train-step builders, written once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

SHARED_STEP_ARGS = """\
aux_reduce: how the leaves of ``loss_fn``'s aux combine over the micro-batches. None
  (default): floating leaves are weighted like the loss, integer leaves summed, bool
  leaves counted. Otherwise, as :func:`jaxaccum.accumulate`'s ``reduce=``, a
  :class:`jaxaccum.Reduce` (or its string), a :class:`jaxaccum.Reduction` or a pytree
  prefix of the aux with one of those or None (the default) at each node: for an aux
  ``{"logits": ..., "accuracy": ...}``, ``{"logits": "concat", "accuracy": None}`` gives
  every example's logits in the batch's order, to compute metrics after the step, and the
  weighted mean accuracy. Needs ``has_aux``.
data_axis: mesh axis name(s) the batch's example axis is sharded over. The step runs
  in global view (the model's own ``reshard``, ``reduced`` annotations and sharding
  constraints keep working) and equals one device's; on Explicit mesh axes the params'
  gradients are added up unreduced wherever the model takes ``reduced`` params, and
  reduced once per step, after the loop (see :func:`jaxaccum.accumulate`). The update
  runs on the reduced gradient, in the params' own layout.
mesh: the mesh for ``data_axis`` (default: the mesh of the arguments' types, or the
  one set with ``jax.set_mesh``).
axis_name: axis name(s) bound by the caller (inside its ``jax.shard_map`` or
  ``jax.pmap``, e.g. Flax's ImageNet example's ``"batch"``): each device accumulates
  its own micro-batches and every output (and BatchNorm statistic) is combined over the
  axes once, after the loop. Exclusive with ``data_axis``.
fsdp: with ``data_axis``, what happens to params sharded over the data axes:
  ``"per_microbatch"`` (the default: jaxaccum gathers nothing) or ``"gather_once"``;
  see :data:`jaxaccum.FSDP`. Refused without ``data_axis``.
param_specs: with ``data_axis`` on Auto mesh axes, the params' ``PartitionSpec`` (a
  pytree prefix of the params), which traced arrays there do not carry: the
  gradient's accumulator is kept in that layout. On Explicit axes the params' types
  carry their layout, and a spec given must agree with it.
"""

_MARK = "<shared step args>"


def shared_step_args(fn: F) -> F:
    """Puts :data:`SHARED_STEP_ARGS` where ``fn``'s docstring has the marker line."""
    doc = fn.__doc__ or ""
    line = next((ln for ln in doc.splitlines() if ln.strip() == _MARK), None)
    if line is None:
        raise AssertionError(f"{fn.__qualname__}'s docstring has no {_MARK} line")
    indent = line[: len(line) - len(line.lstrip())]
    text = "\n".join(indent + ln if ln else ln for ln in SHARED_STEP_ARGS.splitlines())
    fn.__doc__ = doc.replace(line, text)
    return fn
