"""Options that are one value: counts, numbers, flags, dtypes, keys, axes, weights, loss-scale
settings, schedules and optimizers.

Each returns the value in the form jaxaccum uses (an ``int``, an ``np.dtype``) or raises
``TypeError``/``ValueError`` naming the option and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaccum._checks.arguments import function


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(
            f"k must be a positive int (the number of micro-batches), got {k!r} of type "
            f"{type(k).__name__}; e.g. k=8. k is static: it fixes the scan length."
        )
    return int(k)


def positive_int(value: Any, name: str, hint: str = "") -> int:
    """``value`` if it is an int >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"{name} must be a positive int, got {value!r} of type {type(value).__name__}"
            + (f"; {hint}" if hint else ".")
        )
    return int(value)


def real_number(value: Any, name: str) -> float:
    """``value`` if it is one finite real number (a Python or NumPy int or float, not a bool)."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    if not number or not np.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}.")
    return float(value)


def flag(value: Any, name: str) -> bool:
    """``value`` if it is a bool: a string such as "no" is not taken as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}.")
    return bool(value)


def check_unroll(unroll: Any) -> int | bool:
    if isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1):
        return unroll
    raise ValueError(f"unroll must be a positive int or a bool, got {unroll!r}.")


def check_accum_dtype(accum_dtype: Any, name: str = "accum_dtype") -> np.dtype | None:
    """A floating dtype, or None (each leaf's own dtype: no widening); ``name`` is the
    argument as the user wrote it."""
    if accum_dtype is None:
        return None
    try:
        dtype = np.dtype(accum_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating dtype such as float32, or None for each leaf's "
            f"own dtype, got {accum_dtype!r}."
        )
    return dtype


RAW_KEY_LENGTHS = {2, 4}  # threefry2x32 / rbg key data, as jax.random.PRNGKey makes them


def check_key(key: Any, label: str) -> None:
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape == ():
            return
    elif dtype == jnp.uint32 and np.ndim(key) == 1:
        if np.shape(key)[0] in RAW_KEY_LENGTHS:
            return
        raise TypeError(
            f"{label} is a uint32 array of shape {np.shape(key)}, which is not a "
            "legacy PRNG key (jax.random.PRNGKey(seed) has shape (2,)); pass "
            "jax.random.key(seed), and split batches of keys "
            "before the call."
        )
    got = f"shape {getattr(key, 'shape', None)} dtype {dtype}" if dtype else type(key).__name__
    raise TypeError(
        f"{label} must be one PRNG key (jax.random.key(seed), or a legacy "
        f"uint32 jax.random.PRNGKey(seed)), got {got}; split batches of keys before the call "
        "or pass the key array as a batch argument instead."
    )


def check_in_axes(in_axes: Any, n_batch: int) -> tuple[int, ...]:
    """One example axis for all batch arguments, or one per batch argument."""
    given = (in_axes,) if isinstance(in_axes, (int, np.integer)) else in_axes
    try:
        axes = tuple(given)
    except TypeError:
        axes = ()
    ok = all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) and a >= 0 for a in axes)
    if not axes or not ok or len(axes) not in (1, n_batch):
        raise ValueError(
            f"in_axes must be a non-negative int (the example axis of every batch argument) "
            f"or one per batch argument ({n_batch}: batch_argnums, then batch_argnames), "
            f"got {in_axes!r}; e.g. in_axes=1 for time-major (T, N, ...) batches."
        )
    return tuple(int(a) for a in axes)


def check_num_real(num_real: Any, k: int) -> Any:
    """None, a concrete count in [0, k], or a traced integer scalar (clipped when run)."""
    if num_real is None:
        return None
    if isinstance(num_real, jax.core.Tracer):
        dtype = num_real.dtype
        if np.shape(num_real) != () or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"num_real_microbatches must be an integer scalar, got shape "
                f"{np.shape(num_real)} dtype {dtype}; e.g. jnp.int32(m)."
            )
        return num_real
    value = np.asarray(num_real)
    if value.shape != () or not np.issubdtype(value.dtype, np.integer) or not 0 <= value <= k:
        raise ValueError(
            f"num_real_microbatches must be an integer in [0, k={k}] (how many of the k "
            f"micro-batches run), got {num_real!r}."
        )
    return int(value)


def check_weight(w: Any) -> Any:
    """``weight_fn``'s value (or its shape and dtype), if it is one real scalar."""
    if isinstance(w, (bool, int, float)):
        return w
    real = hasattr(w, "dtype") and jnp.issubdtype(w.dtype, jnp.number)
    if real and w.shape == () and not jnp.issubdtype(w.dtype, jnp.complexfloating):
        return w
    got = f"shape {w.shape} dtype {w.dtype}" if hasattr(w, "dtype") else f"a {type(w).__name__}"
    error = ValueError if real and not jnp.issubdtype(w.dtype, jnp.complexfloating) else TypeError
    raise error(
        f"weight_fn must return one real scalar per micro-batch (e.g. mask.sum()), got {got}."
    )


def loss_scale_config(config: Any, kind: type[Any]) -> None:
    """Raises unless ``config`` is a ``kind`` (``DynamicLossScale``) with usable settings."""
    if not isinstance(config, kind):
        raise TypeError(
            f"loss_scale must be a jaxaccum.DynamicLossScale, got {type(config).__name__}; "
            "e.g. loss_scale=jaxaccum.DynamicLossScale(init_scale=2.0**15)."
        )
    positive_int(config.growth_interval, "DynamicLossScale.growth_interval", f"in {config}")
    for field in ("init_scale", "growth_factor", "backoff_factor", "min_scale"):
        real_number(getattr(config, field), f"DynamicLossScale.{field}")
    if not (config.init_scale >= config.min_scale > 0):
        raise ValueError(f"loss scale needs init_scale >= min_scale > 0, got {config}.")
    if config.growth_interval < 1 or config.growth_factor < 1 or not 0 < config.backoff_factor < 1:
        raise ValueError(
            "loss scale needs growth_interval >= 1, growth_factor >= 1 and 0 < "
            f"backoff_factor < 1, got {config}."
        )


def schedule(every_k_schedule: Any) -> int | Callable[[jax.Array], Any]:
    """``multi_steps``' ``every_k_schedule``: a constant k (validated) or the schedule
    function itself (its values are checked as it returns them, see ``steps.calls_per_update``)."""
    if callable(every_k_schedule):
        function(every_k_schedule, "every_k_schedule", "every_k_schedule(gradient_step)", 1)
        return every_k_schedule
    k = every_k_schedule
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(
            f"every_k_schedule must be a positive int (calls per update) or a function of "
            f"the update count returning one, got {k!r}; e.g. every_k_schedule=4."
        )
    return int(k)


def optimizer(value: Any, name: str, example: bool = False) -> None:
    """Raises unless ``value`` is an ``optax.GradientTransformation``; ``name`` is the
    argument, ``example`` adds one (``optax.adam(1e-3)``) to the message."""
    if not isinstance(value, optax.GradientTransformation):
        hint = " (e.g. optax.adam(1e-3))" if example else ""
        raise TypeError(
            f"{name} must be an optax.GradientTransformation{hint}, got {type(value).__name__}."
        )


def out_axes(value: Any) -> None:
    """``micro_vmap``'s ``out_axes``: 0 only."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        raise NotImplementedError(f"micro_vmap supports out_axes=0 only, got {value!r}.")
