"""Convolutions inside the micro-batch loop, in the layout XLA:CPU's fast kernels take.

XLA:CPU runs a convolution through its Eigen kernels only when the input is laid out as
(batch, spatial..., feature) and the kernel as (spatial..., in, out). A pass rewrites every
other convolution into that form with transposes around it, but it visits only the
program's entry computation: a convolution inside a ``while`` body (the rolled
``lax.scan`` of :func:`jaxaccum.accumulate`) keeps its layout and falls back to a naive
loop nest. The backward pass of an ordinary NHWC convolution is exactly such a
convolution: its weight gradient contracts over the batch with batch and feature swapped.
In ``benchmarks/suite.py`` (CNN with BatchNorm, k = 4, 2 CPU cores) a rolled loop without
the rewrite took 3.2 × the full-batch step at the quick size and 13.6 × at the full size; with
it, 0.64 × and 0.62 ×.

:class:`Traced` does the rewrite before XLA sees the loop: the step, traced once to a
jaxpr, is evaluated in the loop body with every such convolution replaced by transpose →
convolution in canonical form → transpose. A transpose only moves values, so results are
those of the same convolution kernels XLA:CPU uses outside loops. The replacement sits in
``jax.lax.platform_dependent``: GPU and TPU programs keep the original convolution, which
their compilers lay out themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.extend import source_info_util
from jax.extend.core import primitives

_CONV = primitives.conv_general_dilated_p
# Primitives that call a jaxpr once with their own operands: their body is inlined.
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
# Primitives rebound with rewritten sub-jaxprs (rematerialisation and control flow).
_REBIND = frozenset({primitives.remat_p.name, "cond", "while", "scan"})


def _canonical_spec(rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Dimension numbers of a canonical convolution of ``rank`` dimensions.

    Returns ``(activation_spec, kernel_spec)`` in ``ConvDimensionNumbers`` order
    (batch, feature, spatial...) and (out, in, spatial...).
    """
    spatial = tuple(range(1, rank - 1))
    return (0, rank - 1, *spatial), (rank - 1, rank - 2, *range(rank - 2))


def _is_canonical(params: dict[str, Any]) -> bool:
    lhs, rhs, out = params["dimension_numbers"]
    act, ker = _canonical_spec(len(lhs))
    return tuple(lhs) == act and tuple(out) == act and tuple(rhs) == ker


def _canonical_conv(lhs: jax.Array, rhs: jax.Array, params: dict[str, Any]) -> jax.Array:
    """The convolution of ``params`` computed in canonical layout between transposes."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    rank = len(lhs_spec)
    act, ker = _canonical_spec(rank)
    # Canonical position i holds the original dimension order[i].
    lhs_order = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
    rhs_order = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
    out_order = (out_spec[0], *out_spec[2:], out_spec[1])
    dnums = jax.lax.ConvDimensionNumbers(act, ker, act)
    out = _CONV.bind(
        jnp.transpose(lhs, lhs_order),
        jnp.transpose(rhs, rhs_order),
        **(params | {"dimension_numbers": dnums}),
    )
    return jnp.transpose(out, tuple(int(i) for i in np.argsort(out_order)))


def _conv(lhs: jax.Array, rhs: jax.Array, params: dict[str, Any]) -> jax.Array:
    """The convolution, canonical on CPU and as written on every other platform."""
    return jax.lax.platform_dependent(
        lhs,
        rhs,
        cpu=lambda a, b: _canonical_conv(a, b, params),
        default=lambda a, b: _CONV.bind(a, b, **params),
    )


def _sub_jaxprs(value: Any) -> list[Any]:
    """The (open) jaxprs held by one parameter value, looking into tuples and lists."""
    if isinstance(value, jcore.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jcore.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def needs_rewrite(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` holds a non-canonical convolution this module would rewrite."""
    for eqn in jaxpr.eqns:
        if eqn.primitive is _CONV:
            if not _is_canonical(eqn.params):
                return True
        elif eqn.primitive.name in _CALLS | _REBIND and any(
            needs_rewrite(j) for v in eqn.params.values() for j in _sub_jaxprs(v)
        ):
            return True
    return False


def _rewrite_closed(closed: Any) -> Any:
    """A ClosedJaxpr computing what ``closed`` does, with its convolutions rewritten."""
    avals = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
        for a in closed.in_avals
    ]
    new = jax.make_jaxpr(lambda *xs: evaluate(closed.jaxpr, closed.consts, xs))(*avals)
    return new if new.out_avals == closed.out_avals else closed


def _rewrite_param(value: Any) -> Any:
    if isinstance(value, jcore.ClosedJaxpr):
        return _rewrite_closed(value) if needs_rewrite(value.jaxpr) else value
    if isinstance(value, jcore.Jaxpr):
        if not needs_rewrite(value):
            return value
        new = _rewrite_closed(jcore.ClosedJaxpr(value, ()))
        return new.jaxpr if not new.consts else value  # an open jaxpr cannot hold constants
    if isinstance(value, (tuple, list)):
        return type(value)(_rewrite_param(v) for v in value)
    return value


def _apply(eqn: Any, invals: list[Any]) -> list[Any]:
    """One equation, with non-canonical convolutions replaced at any depth."""
    prim, params = eqn.primitive, eqn.params
    if prim is _CONV and not _is_canonical(params):
        lhs, rhs = invals
        return [_conv(lhs, rhs, params)]
    if prim.name in _CALLS:
        body = params.get("jaxpr", params.get("call_jaxpr"))
        if isinstance(body, jcore.ClosedJaxpr) and needs_rewrite(body.jaxpr):
            return evaluate(body.jaxpr, body.consts, invals)
    elif prim.name in _REBIND:
        params = {name: _rewrite_param(v) for name, v in params.items()}
    out = prim.bind(*invals, **prim.get_bind_params(params))
    return list(out) if prim.multiple_results else [out]


def evaluate(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, rewriting convolutions on the way.

    Source information (name stacks for profiles, tracebacks for errors) is kept.
    """
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for eqn in jaxpr.eqns:
        stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
        with (
            source_info_util.user_context(eqn.source_info.traceback, name_stack=stack),
            eqn.ctx.manager,
        ):
            outs = _apply(eqn, [read(v) for v in eqn.invars])
        for var, val in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, jcore.DropVar):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


class Traced:
    """A function traced once to a jaxpr, then evaluated wherever it is called.

    :func:`jaxaccum.accumulate` traces the step once, reads the output shapes from the
    trace and evaluates the same jaxpr in the loop body, so the user's Python runs once
    per compilation (``jax.eval_shape`` followed by tracing the loop body would run it
    twice). Evaluating a jaxpr binds exactly the operations it recorded; the only change
    is the optional convolution rewrite.

    Attributes:
      out_shape: the outputs as ``jax.ShapeDtypeStruct`` leaves in the function's pytree.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        """Traces ``fn(*args)``; ``args`` are pytrees of arrays or ``ShapeDtypeStruct``."""
        self._closed, self.out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        self._out_tree = jax.tree.structure(self.out_shape)

    def __call__(self, *args: Any, canonical_convolutions: bool = False) -> Any:
        """Evaluates the trace on ``args`` (same pytree structure and shapes as traced).

        With ``canonical_convolutions`` and the CPU as default backend, non-canonical
        convolutions are rewritten (see the module docstring).
        """
        flat = jax.tree.leaves(args)
        closed = self._closed
        if (
            canonical_convolutions
            and jax.default_backend() == "cpu"
            and needs_rewrite(closed.jaxpr)
        ):
            out = evaluate(closed.jaxpr, closed.consts, flat)
        else:
            out = jcore.jaxpr_as_fun(closed)(*flat)
        return jax.tree.unflatten(self._out_tree, out)
