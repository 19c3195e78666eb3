"""What :func:`jaxaccum.multi_steps` returns, with ``optax.MultiSteps``' methods, and flush.

:class:`MultiStepsTransformation` is an Optax transformation that knows its inner optimizer;
:func:`flush` closes a partial window (the remainder at the end of the data) with either the
transformation or its inner optimizer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxaccum import _checks, _equinox
from jaxaccum._multisteps import window as _window
from jaxaccum._multisteps.state import MultiStepsState


class MultiStepsTransformation(optax.GradientTransformationExtraArgs):  # type: ignore[misc]
    """What :func:`multi_steps` returns: an Optax transformation that knows its inner one.

    It also answers ``optax.MultiSteps``' calls: :meth:`has_updated`,
    :meth:`gradient_transformation` and :attr:`inner_opt`.

    Attributes:
      inner: the wrapped optimizer.
      use_grad_mean: whether windows apply their mean (True) or sum (False).
    """

    inner: optax.GradientTransformation
    use_grad_mean: bool

    def flush(self, state: MultiStepsState, params: Any = None, **extra_args: Any) -> Any:
        """:func:`flush` with this transformation."""
        return flush(self, state, params, **extra_args)

    @property
    def inner_opt(self) -> optax.GradientTransformation:
        """The wrapped optimizer, under ``optax.MultiSteps``' attribute name."""
        return self.inner

    def has_updated(self, state: MultiStepsState) -> jax.Array:
        """Whether the call that returned ``state`` applied the inner update.

        ``optax.MultiSteps``' method, read from ``state.emitted``: unlike optax's
        ``mini_step == 0 and gradient_step > 0``, it stays False after a call of weight 0
        or a skipped call that follows an update.

        Example:
          >>> import jax.numpy as jnp, optax, jaxaccum
          >>> opt = jaxaccum.multi_steps(optax.sgd(1.0), every_k_schedule=2)
          >>> state = opt.init(jnp.zeros(2))
          >>> for _ in range(2):
          ...     _, state = opt.update(jnp.ones(2), state)
          ...     print(bool(opt.has_updated(state)))
          False
          True
        """
        if not isinstance(state, MultiStepsState):
            raise TypeError(
                "state must be the MultiStepsState this transformation's init or update "
                f"returned, got {type(state).__name__}; convert an optax state with "
                "MultiStepsState.from_optax."
            )
        return state.emitted

    def gradient_transformation(self) -> MultiStepsTransformation:
        """``optax.MultiSteps``' method: the transformation itself, already an Optax one."""
        return self


def flush(
    optimizer: optax.GradientTransformation,
    state: MultiStepsState,
    params: Any = None,
    **extra_args: Any,
) -> tuple[Any, MultiStepsState]:
    """Applies the inner optimizer to a partial window now, dividing by its real weight.

    For the remainder at the end of the data: after m < k calls, the update is the
    inner optimizer's on ``sum_i w_i g_i / sum_i w_i`` over those m calls (without
    weights, the sum divided by m, not k), as a whole step on their examples would be.
    The window then closes as at its k-th call: ``mini_step`` 0, ``gradient_step`` + 1,
    ``emitted`` True. With the transformation itself, a window-sum one
    (``use_grad_mean=False``) applies the partial window's sum.

    Args:
      optimizer: the transformation :func:`multi_steps` returned (its window sum or mean
        setting is used), or the inner optimizer given to it (a mean is applied).
      state: the :class:`MultiStepsState` after the window's last call.
      params: the current params, if the inner optimizer needs them. The mean gradient
        is cast to their dtypes (to ``state.acc_grads``'s, without params).
      **extra_args: passed to the inner optimizer's ``update``.

    Returns:
      ``(updates, new_state)``.

    Raises:
      ValueError: with a concrete state, when nothing is accumulated (``mini_step`` is
        0: no call since the last update). Under ``jax.jit`` the state is traced, and
        such a flush is a no-op instead: zero updates, the state unchanged apart from
        ``emitted``, which is False. Also for a state that does not fit ``optimizer``
        or ``params`` (as in ``update``).
      TypeError: for a non-Optax ``optimizer`` or a state that is not a
        :class:`MultiStepsState`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import jaxaccum
      >>> inner = optax.sgd(1.0)
      >>> opt, params = jaxaccum.multi_steps(inner, every_k_schedule=4), jnp.zeros(2)
      >>> state = opt.init(params)
      >>> for g in ([1.0, 0.0], [0.0, 2.0], [2.0, 4.0]):
      ...     _, state = opt.update(jnp.array(g), state, params)
      >>> updates, state = jaxaccum.flush(inner, state, params)
      >>> updates.tolist(), bool(state.emitted), int(state.mini_step)  # mean of 3 calls
      ([-1.0, -2.0], True, 0)
      >>> jaxaccum.flush(inner, state, params)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: flush: nothing accumulated since the last update (mini_step=0)...
    """
    mean = True
    if isinstance(optimizer, MultiStepsTransformation):
        optimizer, mean = optimizer.inner, optimizer.use_grad_mean
    inner = _window.as_inner(optimizer)
    params = _equinox.trained(params)
    like = getattr(state, "acc_grads", None) if params is None else params
    source = "the params" if params is not None else "state.acc_grads"
    _checks.multi_steps_state(state, MultiStepsState, inner, like, source)
    _checks.flush_window(state.mini_step)
    dtypes = jax.tree.map(lambda x: jnp.asarray(x).dtype, like)
    with jax.named_scope(_window.SCOPE):
        return _window.close(inner, state, state.mini_step > 0, dtypes, params, extra_args, mean)
