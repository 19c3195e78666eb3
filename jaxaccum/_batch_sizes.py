"""Batch-size arithmetic (per device x accumulation x devices) and learning-rate scaling."""

from __future__ import annotations

import math

import jax
import numpy as np

from jaxaccum import _checks, _options


class ScalingRule(_options.Option):
    """How the learning rate follows the effective batch size (a member or its string).

    These are heuristics to start a search from, not guarantees.

    Attributes:
      LINEAR: ``"linear"``: ``lr * new / base``. The usual rule for SGD with momentum
        (Goyal et al., 2017, "Accurate, Large Minibatch SGD"), which pairs it with a
        warm-up and finds it breaks down past some batch size.
      SQRT: ``"sqrt"``: ``lr * sqrt(new / base)``. The usual starting point for Adam-like
        optimizers, whose update size does not grow with the gradient's scale (Malladi et
        al., 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms").
      NONE: ``"none"``: unchanged.
    """

    LINEAR = "linear"
    SQRT = "sqrt"
    NONE = "none"


def effective_batch_size(per_device_batch: int, k: int, num_devices: int | None = None) -> int:
    """Examples per optimizer update: ``per_device_batch * k * num_devices``.

    Args:
      per_device_batch: examples one device processes per micro-batch.
      k: micro-batches accumulated per update.
      num_devices: data-parallel devices; defaults to ``jax.device_count()``.

    Returns:
      The effective batch size.

    Raises:
      ValueError: if an argument is not a positive int.

    Examples:
      >>> import jaxaccum
      >>> jaxaccum.inspect.effective_batch_size(per_device_batch=8, k=4, num_devices=8)
      256
    """
    devices = jax.device_count() if num_devices is None else num_devices
    return (
        _checks.positive_int(per_device_batch, "per_device_batch")
        * _checks.positive_int(k, "k")
        * _checks.positive_int(devices, "num_devices")
    )


def accumulation_steps(
    target_batch: int, per_device_batch: int, num_devices: int | None = None
) -> int:
    """The k that turns ``per_device_batch`` on ``num_devices`` into ``target_batch``.

    Args:
      target_batch: the effective batch size wanted per optimizer update.
      per_device_batch: the largest micro-batch one device can hold.
      num_devices: data-parallel devices; defaults to ``jax.device_count()``.

    Returns:
      ``k = target_batch / (per_device_batch * num_devices)``.

    Raises:
      ValueError: if an argument is not a positive int, or the target is not a multiple of
        ``per_device_batch * num_devices`` (the message lists the nearest targets that are).

    Examples:
      >>> import jaxaccum
      >>> jaxaccum.inspect.accumulation_steps(target_batch=1024, per_device_batch=16, num_devices=8)
      8
    """
    devices = jax.device_count() if num_devices is None else num_devices
    per_step = _checks.positive_int(per_device_batch, "per_device_batch") * _checks.positive_int(
        devices, "num_devices"
    )
    target = _checks.positive_int(target_batch, "target_batch")
    if target % per_step:
        below, above = (target // per_step) * per_step, (target // per_step + 1) * per_step
        options = f"target_batch={above}" + (f" or {below}" if below else "")
        if target % devices == 0:
            fits = [d for d in range(1, per_device_batch + 1) if (target // devices) % d == 0]
            options += f", or per_device_batch in {fits}"
        raise ValueError(
            f"target_batch={target} is not a multiple of per_device_batch x num_devices = "
            f"{per_device_batch} x {devices} = {per_step}; use {options}."
        )
    return target // per_step


def scale_learning_rate(
    learning_rate: float, base_batch: int, new_batch: int, rule: ScalingRule | str
) -> float:
    """Rescales a learning rate tuned at ``base_batch`` for ``new_batch`` examples per update.

    Accumulation itself changes nothing: replacing a batch of N with k micro-batches of N/k
    keeps the same gradient, so keep the learning rate. Rescale only when the effective
    batch per update changes (see :data:`ScalingRule` for the rules and their caveats).

    Args:
      learning_rate: the rate tuned at ``base_batch``.
      base_batch: effective batch size the rate was tuned for.
      new_batch: the new effective batch size.
      rule: ``"linear"``, ``"sqrt"`` or ``"none"``.

    Returns:
      The rescaled learning rate.

    Raises:
      ValueError: for an unknown rule, a learning rate that is not a finite number > 0, or
        non-positive batch sizes.

    Examples:
      >>> import jaxaccum
      >>> jaxaccum.inspect.scale_learning_rate(0.1, base_batch=256, new_batch=1024, rule="linear")
      0.4
      >>> jaxaccum.inspect.scale_learning_rate(1e-3, base_batch=256, new_batch=1024, rule="sqrt")
      0.002
    """
    rule = ScalingRule.parse(rule, "rule")
    if isinstance(learning_rate, bool) or not (
        isinstance(learning_rate, (int, float, np.number)) and 0 < learning_rate < math.inf
    ):
        raise ValueError(
            f"learning_rate must be a finite number > 0, got {learning_rate!r}; e.g. 0.1."
        )
    new, base = (
        _checks.positive_int(new_batch, "new_batch"),
        _checks.positive_int(base_batch, "base_batch"),
    )
    ratio = new / base
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]
    return learning_rate * factor
