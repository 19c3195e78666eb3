"""optax's ``MultiSteps`` and its skip predicates, on :func:`jaxaccum.multi_steps`.

Re-exported by :mod:`jaxaccum.optax_compat`, where users import them. ``MultiSteps`` keeps
optax's state (an ``optax.MultiStepsState`` holding the window's running mean), so
checkpoints move between it and ``optax.MultiSteps`` in both directions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxaccum import _checks, _reduce
from jaxaccum._multisteps import MultiStepsState, multi_steps


def skip_not_finite(updates: Any, gradient_step: Any, params: Any) -> tuple[jax.Array, Any]:
    """Skip a call whose gradients hold an inf or a NaN (``optax.skip_not_finite``).

    Returns:
      ``(skip, {"should_skip": skip, "num_not_finite": count})``.
    """
    del gradient_step, params
    count = sum(
        (jnp.sum(~jnp.isfinite(u)) for u in jax.tree.leaves(updates)), jnp.zeros((), jnp.int32)
    )
    skip = count > 0
    return skip, {"should_skip": skip, "num_not_finite": count}


def skip_large_updates(
    updates: Any, gradient_step: Any, params: Any, max_squared_norm: Any
) -> tuple[jax.Array, Any]:
    """Skip a call whose gradients' squared global norm is not below the bound.

    A NaN norm is skipped too (``optax.skip_large_updates``).

    Returns:
      ``(skip, {"should_skip": skip, "norm_squared": norm_squared})``.
    """
    del gradient_step, params
    norm_sq = sum(
        (jnp.sum(jnp.square(u)) for u in jax.tree.leaves(updates)), jnp.zeros((), jnp.float32)
    )
    skip = ~(norm_sq < max_squared_norm)
    return skip, {"should_skip": skip, "norm_squared": norm_sq}


class MultiSteps:
    """``optax.MultiSteps`` on :func:`jaxaccum.multi_steps`, with optax's state.

    The state is an ``optax.MultiStepsState`` holding the window's running mean (its
    sum with ``use_grad_mean=False``), so checkpoints move between this class and
    ``optax.MultiSteps`` in both directions. Each call converts it to jaxaccum's state
    (:meth:`jaxaccum.MultiStepsState.from_optax`), runs :func:`jaxaccum.multi_steps`'
    update and converts back.

    Args:
      opt: the inner optimizer.
      every_k_schedule: calls per update, an int or a function of the update count.
      use_grad_mean: apply the window's mean (True) or sum (False).
      should_skip_update_fn: ``(updates, gradient_step, params) -> (skip, skip_state)``.
      accumulator_dtype: dtype of the accumulated gradients; None: the params' dtype.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from jaxaccum import optax_compat
      >>> opt = optax_compat.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
      >>> params = jnp.zeros(2)
      >>> state = opt.init(params)
      >>> _, state = opt.update(jnp.array([1.0, 2.0]), state, params)
      >>> updates, state = opt.update(jnp.array([3.0, 0.0]), state, params)
      >>> updates.tolist(), bool(opt.has_updated(state))
      ([-2.0, -1.0], True)
    """

    def __init__(
        self,
        opt: optax.GradientTransformation,
        every_k_schedule: int | Callable[[jax.Array], Any],
        use_grad_mean: bool = True,
        should_skip_update_fn: Callable[..., Any] | None = None,
        accumulator_dtype: Any = jnp.float32,
    ):
        _checks.optimizer(opt, "opt", example=True)
        self._dtype = _checks.check_accum_dtype(accumulator_dtype, "accumulator_dtype")
        self._ours = multi_steps(
            opt,
            every_k_schedule,
            accum_dtype=self._dtype,
            use_grad_mean=use_grad_mean,
            should_skip_update_fn=should_skip_update_fn,
        )
        self._opt = optax.with_extra_args_support(opt)
        self._mean = use_grad_mean

    @property
    def inner_opt(self) -> optax.GradientTransformationExtraArgs:
        """The wrapped optimizer."""
        return self._opt

    def _to_optax(self, state: MultiStepsState, like: Any) -> Any:
        """optax's form of jaxaccum's state: the window's running mean (or sum)."""
        weight = state.acc_weight

        def mean(a: jax.Array, d: Any) -> jax.Array:
            value = _reduce.weighted(a, weight, a.dtype) if self._mean else a
            return value.astype(d)

        dtypes = jax.tree.map(lambda x: jnp.asarray(x).dtype, like)
        return optax.MultiStepsState(
            mini_step=state.mini_step,
            gradient_step=state.gradient_step,
            inner_opt_state=state.inner_opt_state,
            acc_grads=jax.tree.map(mean, state.acc_grads, dtypes),
            skip_state=state.skip_state,
        )

    def init(self, params: Any) -> Any:
        """optax's initial state for ``params``."""
        like = jax.tree.map(
            lambda p: jnp.zeros(jnp.shape(p), self._dtype or jnp.asarray(p).dtype), params
        )
        return self._to_optax(self._ours.init(params), like)

    def update(
        self, updates: Any, state: Any, params: Any = None, **extra_args: Any
    ) -> tuple[Any, Any]:
        """Accumulates ``updates``; every k-th counted call applies the inner optimizer."""
        ours = MultiStepsState.from_optax(state, use_grad_mean=self._mean)
        new_updates, new_state = self._ours.update(updates, ours, params, **extra_args)
        return new_updates, self._to_optax(new_state, state.acc_grads)

    def has_updated(self, state: Any) -> jax.Array:
        """Whether the call that returned ``state`` applied an update."""
        return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)

    def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
        """``(init, update)`` as an Optax transformation."""
        return optax.GradientTransformationExtraArgs(self.init, self.update)
