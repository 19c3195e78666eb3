"""Convolutions in a loop body, in the layout XLA:CPU's fast kernels take.

XLA:CPU runs a convolution through its Eigen kernels only when the input is laid out as
(batch, spatial..., feature) and the kernel as (spatial..., in, out). A pass
(``ConvCanonicalization`` in ``xla/service/cpu/conv_canonicalization.cc``) rewrites every
other convolution into that form with transposes around it, but it visits only the
program's entry computation: a convolution inside a ``while`` body (a rolled ``lax.scan``,
such as the micro-batch loop of :func:`jaxaccum.accumulate`) keeps its layout and runs as a
naive loop nest. The backward pass of an ordinary NHWC convolution is exactly such a
convolution: its weight gradient contracts over the batch with batch and feature swapped
(``f01b_i01o->01bf`` in the compiled HLO). For the CNN of ``python -m benchmarks suite`` this
makes a rolled loop several times slower than the full-batch step; the figures are in
``benchmarks/RESULTS.md``.

:func:`call` is the whole interface. Called in a loop body in place of ``fn(*args)``, it
traces ``fn`` and, when the trace holds such convolutions, binds one primitive,
:data:`cpu_layout_p`, that carries two jaxprs: the trace as it is, and a copy with every
non-canonical convolution replaced by transpose → convolution in canonical form →
transpose. A transpose only moves values, so the copy computes what the kernels XLA:CPU
uses outside loops compute. Only the CPU lowering rule uses the copy; every other backend
lowers the trace as it is, so a GPU or TPU program holds exactly the operations of
``fn(*args)`` written in the loop by hand. Differentiation and ``vmap`` apply to the trace
as it is (GPU and TPU lose nothing; the CPU loses only this speed-up).

Calls (``jit``), rematerialisation and control flow (``cond``, ``while``, ``scan``) are
rewritten inside and kept as they are, with their shardings and names. A convolution in
anything else (``custom_jvp``, ``custom_vjp``, a ``shard_map`` inside ``fn``), a trace with
effects, or a rewrite that fails makes :func:`call` call ``fn(*args)`` plainly.
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
from jax.interpreters import ad, batching, mlir
from jax.interpreters import partial_eval as pe

__all__ = ["call", "cpu_layout_p", "evaluate", "needs_rewrite"]

_CONV = primitives.conv_general_dilated_p
# Primitives rebound with their jaxpr parameters rewritten (calls, remat, control flow).
_NESTED = frozenset(
    {
        primitives.jit_p,
        primitives.closed_call_p,
        primitives.call_p,
        primitives.remat_p,
        primitives.cond_p,
        primitives.while_p,
        primitives.scan_p,
    }
)

cpu_layout_p = jcore.Primitive("jaxaccum_cpu_layout")
"""Evaluates ``jaxpr``; the CPU lowering evaluates ``cpu_jaxpr`` (same values) instead."""
cpu_layout_p.multiple_results = True


def _canonical_spec(rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(activation, kernel)`` dimension numbers of a canonical convolution of ``rank``."""
    spatial = tuple(range(1, rank - 1))
    return (0, rank - 1, *spatial), (rank - 1, rank - 2, *range(rank - 2))


def _is_slow_conv(eqn: Any) -> bool:
    """Whether ``eqn`` is a convolution XLA:CPU would run as a naive loop in a loop body."""
    if eqn.primitive is not _CONV:
        return False
    lhs, rhs, out = eqn.params["dimension_numbers"]
    act, ker = _canonical_spec(len(lhs))
    return not (tuple(lhs) == act and tuple(out) == act and tuple(rhs) == ker)


def _canonical_conv(lhs: jax.Array, rhs: jax.Array, params: dict[str, Any]) -> jax.Array:
    """The convolution of ``params`` computed in canonical layout between transposes."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    act, ker = _canonical_spec(len(lhs_spec))
    # Canonical position i holds the original dimension order[i].
    lhs_order = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
    rhs_order = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
    out_order = (out_spec[0], *out_spec[2:], out_spec[1])
    out = _CONV.bind(
        jnp.transpose(lhs, lhs_order),
        jnp.transpose(rhs, rhs_order),
        **(params | {"dimension_numbers": jax.lax.ConvDimensionNumbers(act, ker, act)}),
    )
    return jnp.transpose(out, tuple(int(i) for i in np.argsort(out_order)))


def needs_rewrite(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` holds a non-canonical convolution this module would rewrite.

    Args:
      jaxpr: an open ``jax.extend.core.Jaxpr``.

    Returns:
      True if a non-canonical convolution sits in ``jaxpr`` or, at any depth, in the body
      of a ``jit``, ``closed_call``, remat, ``cond``, ``while`` or ``scan`` in it.
    """
    return any(
        _is_slow_conv(eqn)
        or (
            eqn.primitive in _NESTED
            and any(needs_rewrite(j) for j in jcore.jaxprs_in_params(eqn.params))
        )
        for eqn in jaxpr.eqns
    )


def _holds_slow_conv(jaxpr: Any) -> bool:
    """Whether a non-canonical convolution sits anywhere in ``jaxpr``."""
    return any(
        _is_slow_conv(eqn) or any(_holds_slow_conv(j) for j in jcore.jaxprs_in_params(eqn.params))
        for eqn in jaxpr.eqns
    )


def _out_of_reach(jaxpr: Any) -> bool:
    """Whether a non-canonical convolution sits in a primitive the rewrite leaves alone."""
    return any(
        any(
            _out_of_reach(j) if eqn.primitive in _NESTED else _holds_slow_conv(j)
            for j in jcore.jaxprs_in_params(eqn.params)
        )
        for eqn in jaxpr.eqns
    )


def _rewrite_closed(closed: Any) -> Any:
    """A ClosedJaxpr computing what ``closed`` does, with its convolutions rewritten.

    It is traced on ``closed``'s own abstract values, so shardings and varying manual
    axes (inside ``shard_map``) are kept.
    """
    if not needs_rewrite(closed.jaxpr):
        return closed
    new = jax.make_jaxpr(lambda *xs: _evaluate(closed.jaxpr, closed.consts, xs))(*closed.in_avals)
    if new.out_avals != closed.out_avals:
        raise TypeError(f"rewrite changed the output types: {new.out_avals}")
    return new


def _rewrite_param(value: Any) -> Any:
    """``value`` with the jaxprs in it rewritten (a parameter of a nested primitive)."""
    if isinstance(value, jcore.ClosedJaxpr):
        return _rewrite_closed(value)
    if isinstance(value, jcore.Jaxpr):
        new = _rewrite_closed(jcore.ClosedJaxpr(value, ()))
        if new.consts:
            raise TypeError("an open jaxpr cannot hold the rewrite's constants")
        return new.jaxpr
    if isinstance(value, tuple):
        return tuple(_rewrite_param(v) for v in value)
    return value


def _apply(eqn: Any, invals: list[Any]) -> list[Any]:
    """One equation with non-canonical convolutions replaced at any depth."""
    prim, params = eqn.primitive, eqn.params
    if _is_slow_conv(eqn):
        lhs, rhs = invals
        return [_canonical_conv(lhs, rhs, params)]
    if prim in _NESTED:
        params = {name: _rewrite_param(v) for name, v in params.items()}
    out = prim.bind(*invals, **prim.get_bind_params(params))
    return list(out) if prim.multiple_results else [out]


def _evaluate(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluates ``jaxpr`` like ``jax.extend.core.jaxpr_as_fun``, rewriting convolutions.

    Name stacks (for profiles) and tracebacks (for errors) are kept; outputs that the
    jaxpr holds as literals come back as arrays.
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
        env.update((v, x) for v, x in zip(eqn.outvars, outs, strict=True))
    return [jnp.asarray(v.val) if isinstance(v, jcore.Literal) else env[v] for v in jaxpr.outvars]


def _lift_consts(closed: Any) -> Any:
    """``closed`` with its constants turned into leading inputs (they may be tracers)."""
    jaxpr = closed.jaxpr
    names = jaxpr.debug_info.arg_names
    info = jaxpr.debug_info._replace(
        arg_names=None if names is None else ("",) * len(jaxpr.constvars) + tuple(names)
    )
    lifted = jaxpr.replace(constvars=[], invars=[*jaxpr.constvars, *jaxpr.invars], debug_info=info)
    return jcore.ClosedJaxpr(lifted, ())


def _has_effects(closed: Any) -> bool:
    """Whether ``closed`` has effects other than using a named axis.

    jax marks each use of a named axis (a ``psum`` inside ``shard_map`` or ``vmap``) with
    an effect that only checks, while tracing, that the name is bound.
    """
    return any(type(e).__name__ != "NamedAxisEffect" for e in closed.effects)


def _cpu_version(plain: Any, args: Sequence[Any]) -> Any | None:
    """The rewritten copy of ``plain`` (traced on ``args``), or None where it cannot be."""
    if _has_effects(plain) or not needs_rewrite(plain.jaxpr) or _out_of_reach(plain.jaxpr):
        return None
    try:
        cpu = jax.make_jaxpr(lambda *xs: _evaluate(plain.jaxpr, (), xs))(*args)
    except Exception:  # the rewrite is an optimisation: any failure means the plain call
        return None
    same = cpu.out_avals == plain.out_avals and cpu.effects == plain.effects
    return cpu if same else None


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with convolutions in canonical layout when lowered for XLA:CPU.

    Meant for a loop body (``lax.scan``, ``lax.while_loop``), where XLA:CPU does not
    canonicalise convolutions itself. ``fn`` is traced to a jaxpr; if that holds a
    non-canonical convolution the rewrite reaches, the result is computed by one
    :data:`cpu_layout_p` equation holding it, otherwise the trace's own equations are
    evaluated (``fn`` runs once in Python either way). Outside any trace it is just
    ``fn(*args)``.

    Args:
      fn: the function, as it would be called in the loop body.
      *args: pytrees; tracers among their leaves are the traced inputs, other leaves
        reach ``fn`` unchanged.

    Returns:
      What ``fn(*args)`` returns, with every leaf an array on the rewritten path.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> w = jnp.ones((3, 3, 1, 2))
      >>> def loss(w, x):
      ...     y = jax.lax.conv_general_dilated(
      ...         x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      ...     return jnp.mean(y**2)
      >>> def body(w, x):
      ...     return w, call(jax.grad(loss), w, x)
      >>> _, g = jax.jit(lambda w, xs: jax.lax.scan(body, w, xs))(w, jnp.ones((2, 4, 5, 5, 1)))
      >>> g.shape
      (2, 3, 3, 1, 2)
    """
    leaves, tree = jax.tree.flatten(args)
    where = [i for i, x in enumerate(leaves) if isinstance(x, jax.core.Tracer)]
    if not where:
        return fn(*args)

    def flat_fn(*traced: Any) -> Any:
        full = list(leaves)
        for i, x in zip(where, traced, strict=True):
            full[i] = x
        return fn(*jax.tree.unflatten(tree, full))

    dynamic = [leaves[i] for i in where]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*dynamic)
    outs = evaluate(closed, dynamic)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def evaluate(closed: Any, operands: Sequence[Any]) -> list[Any]:
    """What ``closed`` computes on ``operands``, with convolutions in canonical layout when
    lowered for XLA:CPU (one :data:`cpu_layout_p` equation), or the plain equations where
    the rewrite does not reach."""
    inputs = [*closed.consts, *operands]
    plain = _lift_consts(closed)
    cpu = _cpu_version(plain, inputs)
    if cpu is None:
        return list(jcore.jaxpr_as_fun(closed)(*operands))
    return list(cpu_layout_p.bind(*inputs, jaxpr=plain, cpu_jaxpr=cpu))


def _impl(*args: Any, jaxpr: Any, cpu_jaxpr: Any) -> list[Any]:
    del cpu_jaxpr
    outs = jcore.jaxpr_as_fun(jaxpr)(*args)
    return [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in outs]


def _abstract_eval(*avals: Any, jaxpr: Any, cpu_jaxpr: Any) -> tuple[list[Any], Any]:
    del avals, cpu_jaxpr
    return list(jaxpr.out_avals), jaxpr.effects


def _lowering(use_cpu_jaxpr: bool) -> Callable[..., Any]:
    """A lowering rule that inlines ``cpu_jaxpr`` or ``jaxpr`` where the equation sits."""

    def rule(ctx: Any, *args: Any, jaxpr: Any, cpu_jaxpr: Any) -> Any:
        closed = cpu_jaxpr if use_cpu_jaxpr else jaxpr
        consts = [
            mlir.ir_constant(c, const_lowering=ctx.const_lowering, aval=v.aval)
            for c, v in zip(closed.consts, closed.jaxpr.constvars, strict=True)
        ]
        out, tokens = mlir.jaxpr_subcomp(
            ctx.module_context,
            closed.jaxpr,
            ctx.name_stack,
            ctx.tokens_in,
            consts,
            *args,
            dim_var_values=ctx.dim_var_values,
            const_lowering=ctx.const_lowering,
            outer_traceback=ctx.traceback,
        )
        ctx.set_tokens_out(tokens)
        return out

    return rule


def _jvp(primals: Any, tangents: Any, *, jaxpr: Any, cpu_jaxpr: Any) -> Any:
    del cpu_jaxpr
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(jcore.jaxpr_as_fun(jaxpr), list(primals), tangents)


def _batch(axis: Any, args: Any, dims: Any, *, jaxpr: Any, cpu_jaxpr: Any) -> Any:
    del cpu_jaxpr
    batched = jax.vmap(
        jcore.jaxpr_as_fun(jaxpr),
        in_axes=tuple(dims),
        axis_size=axis.size,
        axis_name=axis.name,
        spmd_axis_name=axis.spmd_name,
    )(*args)
    return batched, [0] * len(batched)


def _dce(used_outputs: list[bool], eqn: Any) -> tuple[list[bool], Any]:
    """Dead-code elimination in both jaxprs, as a loop body written by hand gets it."""
    if not any(used_outputs):
        return [False] * len(eqn.invars), None
    plain, cpu = eqn.params["jaxpr"], eqn.params["cpu_jaxpr"]
    _, plain_used = pe.dce_jaxpr(plain.jaxpr, used_outputs)
    _, cpu_used = pe.dce_jaxpr(cpu.jaxpr, used_outputs)
    used = [a or b for a, b in zip(plain_used, cpu_used, strict=True)]

    def pruned(closed: Any) -> Any:  # both keep the inputs either of them uses
        jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, used_outputs, instantiate=used)
        return jcore.ClosedJaxpr(jaxpr, closed.consts)

    plain, cpu = pruned(plain), pruned(cpu)
    new = eqn.replace(
        invars=[v for v, u in zip(eqn.invars, used, strict=True) if u],
        outvars=[v for v, u in zip(eqn.outvars, used_outputs, strict=True) if u],
        params={"jaxpr": plain, "cpu_jaxpr": cpu},
        effects=plain.effects,
    )
    return used, new


cpu_layout_p.def_impl(_impl)
cpu_layout_p.def_effectful_abstract_eval(_abstract_eval)
mlir.register_lowering(cpu_layout_p, _lowering(False))
mlir.register_lowering(cpu_layout_p, _lowering(True), platform="cpu")
ad.primitive_jvps[cpu_layout_p] = _jvp
batching.fancy_primitive_batchers[cpu_layout_p] = _batch
pe.dce_rules[cpu_layout_p] = _dce
