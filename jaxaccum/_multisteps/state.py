"""The state of :func:`jaxaccum.multi_steps`, and its conversion from optax's."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxaccum import _reduce


class MultiStepsState(NamedTuple):
    """State of :func:`multi_steps`.

    The first five fields have the names, order and meaning of
    ``optax.MultiStepsState``'s, so code that reads ``state.gradient_step`` or looks into
    ``state.inner_opt_state`` (for example ``optax.tree.get(state, "count")``) works
    unchanged. Unlike optax's, ``acc_grads`` holds a weighted sum, not a running mean;
    :meth:`from_optax` converts an optax state (a restored checkpoint) in one call.

    Attributes:
      mini_step: calls accumulated in the current window (int32, from 0 to k - 1). Calls
        of weight 0 and skipped calls do not count.
      gradient_step: inner optimizer updates applied so far (int32). ``every_k_schedule``
        is called with it, and the inner optimizer's own counters (its learning-rate
        schedule) also advance once per update, never once per call.
      inner_opt_state: the wrapped optimizer's state.
      acc_grads: ``sum_i w_i g_i`` over the window's calls, shaped like the params, in
        ``accum_dtype`` (promoted with each param's dtype; the params' dtype for None).
      skip_state: what ``should_skip_update_fn`` returned for the last call (``()``
        without one).
      acc_weight: ``sum_i w_i`` over the window (float32 scalar); without weights, the
        number of calls.
      emitted: whether the call that returned this state applied an update (bool scalar;
        False after ``init``).
    """

    mini_step: jax.Array
    gradient_step: jax.Array
    inner_opt_state: Any
    acc_grads: Any
    skip_state: Any
    acc_weight: jax.Array
    emitted: jax.Array

    @classmethod
    def from_optax(cls, state: Any, *, use_grad_mean: bool = True) -> MultiStepsState:
        """This state from an ``optax.MultiStepsState`` (e.g. a restored checkpoint).

        optax keeps the running mean of the window's ``mini_step`` gradients (their sum
        with ``use_grad_mean=False``); this state keeps their sum and count, so training
        resumed with :func:`multi_steps` on the same inner optimizer continues the
        window where optax left it. Give :func:`multi_steps` the same
        ``should_skip_update_fn`` (its ``skip_state`` is kept) and ``use_grad_mean``;
        ``acc_grads`` keep optax's accumulator dtype (float32 by default, as here).

        Args:
          state: an ``optax.MultiStepsState``, or anything with its five fields.
          use_grad_mean: what the ``optax.MultiSteps`` that made it was given.

        Returns:
          The equivalent :class:`MultiStepsState` (weights 1 per call); a
          :class:`MultiStepsState` is returned as it is.

        Raises:
          TypeError: for a ``state`` without the five fields of ``optax.MultiStepsState``.

        Examples:
          >>> import jax.numpy as jnp, optax, jaxaccum
          >>> theirs = optax.MultiSteps(optax.sgd(1.0), 4)
          >>> params, state = jnp.zeros(2), theirs.init(jnp.zeros(2))
          >>> for g in ([1.0, 0.0], [3.0, 2.0]):
          ...     _, state = theirs.update(jnp.array(g), state, params)
          >>> ours = jaxaccum.MultiStepsState.from_optax(state)
          >>> ours.acc_grads.tolist(), float(ours.acc_weight)
          ([4.0, 2.0], 2.0)
        """
        if isinstance(state, cls):  # already this state: its sums are not means
            return state
        fields = ("mini_step", "gradient_step", "inner_opt_state", "acc_grads")
        if not all(hasattr(state, f) for f in fields):
            raise TypeError(
                "from_optax(state) needs the optax.MultiStepsState that optax.MultiSteps' "
                f"init or update returned (fields {', '.join(fields)}, skip_state), got "
                f"{type(state).__name__}."
            )
        mini = jnp.asarray(state.mini_step, jnp.int32)
        step = jnp.asarray(state.gradient_step, jnp.int32)
        count = mini.astype(_reduce.weight_dtype(None, jax.tree.leaves(state.acc_grads)))
        acc = state.acc_grads
        if use_grad_mean:
            acc = jax.tree.map(lambda a: (a * count.astype(a.dtype)).astype(a.dtype), acc)
        return cls(
            mini_step=mini,
            gradient_step=step,
            inner_opt_state=state.inner_opt_state,
            acc_grads=acc,
            skip_state=getattr(state, "skip_state", ()),
            acc_weight=count,
            emitted=(mini == 0) & (step > 0),
        )
