"""Dynamic loss scaling for float16 training."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxaccum import _checks


class DynamicLossScale(NamedTuple):
    """Settings of dynamic loss scaling (float16 compute).

    Each micro-batch's loss is multiplied by the current scale before differentiation, so
    small float16 gradients do not flush to zero; the accumulated gradient is divided by
    the scale once. A non-finite gradient (overflow) skips the update and multiplies the
    scale by ``backoff_factor``; ``growth_interval`` finite steps in a row multiply it by
    ``growth_factor``.

    Attributes:
      init_scale: the first scale.
      growth_interval: finite steps in a row before the scale grows.
      growth_factor: factor applied after ``growth_interval`` finite steps.
      backoff_factor: factor applied after an overflow.
      min_scale: the scale never falls below this.
    """

    init_scale: float = 2.0**15
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    min_scale: float = 1.0


class LossScaleState(NamedTuple):
    """The evolving part of dynamic loss scaling.

    Attributes:
      scale: the current loss scale (float32 scalar).
      good_steps: finite steps since the last change of scale (int32 scalar).
    """

    scale: jax.Array
    good_steps: jax.Array


def check_config(config: DynamicLossScale) -> None:
    """Raises unless ``config`` is a :class:`DynamicLossScale` with usable settings."""
    _checks.loss_scale_config(config, DynamicLossScale)


def init(config: DynamicLossScale) -> LossScaleState:
    return LossScaleState(jnp.asarray(config.init_scale, jnp.float32), jnp.zeros((), jnp.int32))


def adjust(config: DynamicLossScale, state: LossScaleState, finite: jax.Array) -> LossScaleState:
    """The next scale after a step whose gradient was (not) finite."""
    grown = state.good_steps + 1 >= config.growth_interval
    bigger = state.scale * config.growth_factor
    # Past float32's largest power of two the grown scale would be inf: stay put instead.
    up = jnp.where(grown & jnp.isfinite(bigger), bigger, state.scale)
    down = jnp.maximum(state.scale * config.backoff_factor, config.min_scale)
    return LossScaleState(
        scale=jnp.where(finite, up, down).astype(jnp.float32),
        good_steps=jnp.where(finite & ~grown, state.good_steps + 1, 0).astype(jnp.int32),
    )


def adjust_flax(dynamic_scale: Any, finite: jax.Array) -> Any:
    """Flax's ``DynamicScale`` after a step whose gradient was (not) finite, by Flax's rules.

    They differ from :func:`adjust`'s in three ways: a finite step grows the scale when it
    finds ``fin_steps`` already at ``growth_interval`` (so the (growth_interval + 1)-th
    finite step in a row grows it); growth stops at float32's largest value; and the
    floor is ``minimum_scale``, none when it is None.
    """
    ds = dynamic_scale
    scale = jnp.asarray(ds.scale, jnp.float32)
    due = jnp.asarray(ds.fin_steps) == ds.growth_interval
    top = jnp.finfo(jnp.float32).max
    up = jnp.where(due, jnp.minimum(scale * ds.growth_factor, top), scale)
    down = scale * ds.backoff_factor
    if ds.minimum_scale is not None:
        down = jnp.maximum(down, ds.minimum_scale)
    return ds.replace(
        scale=jnp.where(finite, up, down).astype(jnp.float32),
        fin_steps=jnp.where(finite & ~due, ds.fin_steps + 1, 0).astype(jnp.int32),
    )
