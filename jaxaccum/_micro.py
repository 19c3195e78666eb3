"""One micro-batch's contribution to a train step, and what the step makes of their sums.

Each micro-batch gives its gradient, loss and auxiliary output multiplied by its counted
weight (float32 sums); :func:`finish_step` divides the sums once (the one weighted mean)
and decides whether the update applies. :class:`NonFinite` says what a non-finite
micro-batch does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxaccum import _checks, _options, _parallel, _reduce
from jaxaccum._reduce import Reduce

if TYPE_CHECKING:
    from jaxaccum._engine import Engine


class NonFinite(_options.Option):
    """What a non-finite micro-batch gradient does to a step (a member or its string).

    Attributes:
      SKIP: ``"skip"`` (default): the whole update is skipped; params, optimizer state,
        step count, carried collections and key are left bitwise unchanged and the skip
        counter increments.
      DROP: ``"drop"``: only the bad micro-batches are left out, and the others are
        averaged by their own total weight (the dropped weight leaves the denominator).
        If every micro-batch is bad the update is skipped as above.
    """

    SKIP = "skip"
    DROP = "drop"


class TrainMetrics(NamedTuple):
    """What one train step reports.

    Attributes:
      loss: the (weighted) mean loss of the step's counted micro-batches, float32.
      losses: each micro-batch's own loss, shape ``(k,)``, float32 (unscaled).
      grad_norm: global norm of the accumulated gradient (unscaled, before the optimizer,
        so before any clipping in the chain), float32.
      weight: total weight of the counted micro-batches: valid items with a ``weight_fn``,
        examples otherwise.
      applied: whether the optimizer update was applied (bool).
      aux: ``loss_fn``'s auxiliary output reduced over micro-batches (floating leaves
        weight-averaged like the loss, integer leaves summed, bool leaves counted), or None.
    """

    loss: jax.Array
    losses: jax.Array
    grad_norm: jax.Array
    weight: jax.Array
    applied: jax.Array
    aux: Any = None


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _weigh_aux(aux: Any, w: jax.Array) -> Any:
    def weigh(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.where(w > 0, x.astype(jnp.float32) * w, 0.0)
        return x.astype(jnp.int32) if x.dtype == jnp.bool_ else x

    return jax.tree.map(weigh, aux)


def micro_weight(weight_fn: Callable[[Any], Any] | None, mb: Any) -> jax.Array:
    """A micro-batch's weight: ``weight_fn(mb)``, or its number of examples."""
    size = jax.tree.leaves(mb)[0].shape[0]
    w = size if weight_fn is None else _checks.check_weight(weight_fn(mb))
    return jnp.asarray(w, jnp.float32)


def micro_outputs(
    loss: jax.Array, aux: Any, grads: Any, w: jax.Array, engine: Engine
) -> tuple[dict[str, Any], jax.Array]:
    """One micro-batch's contribution, reduced with :func:`micro_spec`.

    Returns the outputs (gradient, loss and floating aux pre-multiplied by the counted
    weight, in float32) and whether the micro-batch is counted (under ``"drop"``, a
    non-finite one is not).
    """
    # Under "skip" a non-finite gradient makes the summed gradient non-finite, which
    # finish_step sees; only "drop" needs each micro-batch's own verdict (one scalar
    # reduction per micro-batch where the gradient is unreduced).
    finite = jnp.isfinite(loss) & jnp.isfinite(w)  # a NaN or infinite weight: not finite
    if engine.nonfinite == NonFinite.DROP:
        finite = finite & _parallel.all_finite(grads)
    keep = finite | (engine.nonfinite == NonFinite.SKIP)
    counted = jnp.where(keep & (w > 0), w, 0.0)

    def weigh(g: jax.Array) -> jax.Array:
        # float32 sums; complex gradients (complex params, as optax takes) stay complex
        scaled = _parallel.times(g.astype(jnp.promote_types(g.dtype, jnp.float32)), counted)
        return jnp.where(counted > 0, scaled, jnp.zeros_like(scaled))

    outputs = {
        "grads": jax.tree.map(weigh, grads),
        "loss_sum": jnp.where(counted > 0, loss.astype(jnp.float32) * counted, 0.0),
        "weight": counted,
        "losses": loss.astype(jnp.float32),
        "ok": finite | (w <= 0),
    }
    # aux leaves aux_reduce names are reduced as it says; the others weighted like the loss
    specs = _reduce.per_leaf(engine.aux_reduce, aux, "aux_reduce", "loss_fn's aux")
    outputs["aux"] = _weigh_aux(_pick(specs, aux, lambda r: r is None), counted)
    outputs["aux_as_given"] = _pick(specs, aux, lambda r: r is not None)
    return outputs, keep


def _pick(specs: Any, tree: Any, keep: Callable[[Any], bool]) -> Any:
    """``tree`` with None at the leaves whose spec ``keep`` refuses."""
    return jax.tree.map(
        lambda r, x: x if keep(r) else None, specs, tree, is_leaf=lambda x: x is None
    )


def micro_spec(engine: Engine) -> dict[str, Any]:
    """How :func:`micro_outputs` are reduced over the micro-batches: weighted sums, divided
    once by :func:`finish_step`, and the aux leaves ``aux_reduce`` names."""
    return {
        "grads": Reduce.SUM,
        "loss_sum": Reduce.SUM,
        "weight": Reduce.SUM,
        "losses": Reduce.STACK,
        "ok": Reduce.MIN,
        "aux": Reduce.SUM if engine.has_aux else None,
        "aux_as_given": engine.aux_reduce,
    }


def finish_step(
    out: dict[str, Any], scale: jax.Array, params: Any, engine: Engine
) -> tuple[Any, jax.Array, TrainMetrics]:
    """Divides the weighted sums once (the one weighted mean) and decides on the update.

    Returns the mean gradient (unscaled, in the params' dtypes), whether every counted
    micro-batch and that gradient are finite, and the step's metrics.
    """
    total = out["weight"]
    mean_grads = jax.tree.map(lambda g: _reduce.weighted(g, total * scale, g.dtype), out["grads"])
    grads = jax.tree.map(lambda g, p: g.astype(jnp.asarray(p).dtype), mean_grads, params)
    finite = out["ok"] & _all_finite(grads)
    ok = finite if engine.nonfinite == NonFinite.SKIP else _all_finite(grads)
    aux = None
    if engine.has_aux:
        weighted = jax.tree.map(
            lambda x: (
                _reduce.weighted(x, total, x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x
            ),
            out["aux"],
        )
        aux = jax.tree.map(
            lambda w, given: given if w is None else w,
            weighted,
            out["aux_as_given"],
            is_leaf=lambda x: x is None,
        )
    metrics = TrainMetrics(
        loss=_reduce.weighted(out["loss_sum"], total, jnp.float32),
        losses=out["losses"],
        grad_norm=optax.tree.norm(mean_grads),
        weight=total,
        applied=(total > 0) & ok,
        aux=aux,
    )
    return grads, finite, metrics
