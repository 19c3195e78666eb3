"""The linen step's state: a Flax ``TrainState`` that holds every variable collection.

:class:`TrainState` keeps the collections in one field; a subclass of Flax's own
``TrainState`` that keeps each in a field of its name (the flax/examples pattern) is read
and written back the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from flax.training import train_state

from jaxaccum import _checks, _loss_scale, _options
from jaxaccum._loss_scale import DynamicLossScale, LossScaleState


class CollectionMode(_options.Option):
    """How a mutable collection is combined over the k micro-batches of a step.

    A member or its string.

    Attributes:
      SEQUENTIAL: ``"sequential"``: carried through the loop; micro-batch j+1 sees
        micro-batch j's value (and a second ``apply`` call in one micro-batch sees the
        first's).
      MEAN: ``"mean"``: every micro-batch starts from the step's value and the k values
        it produces are averaged (in float32), e.g. ``intermediates``.
      SUM: ``"sum"``: as MEAN, summed. Not for counters: a counter that adds 1 per call
        gives ``k * (old + 1)``; carry it with SEQUENTIAL.
      MAX: ``"max"``: as MEAN, the elementwise maximum (amax histories).
      LAST: ``"last"``: as MEAN, the last micro-batch's value.
    """

    SEQUENTIAL = "sequential"
    MEAN = "mean"
    SUM = "sum"
    MAX = "max"
    LAST = "last"


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` plus mutable collections, a key, a counter.

    Attributes:
      collections: every variable collection other than ``params``, e.g.
        ``{"batch_stats": ...}``; each is carried through the step's micro-batches.
      key: base PRNG key, or None. Step ``t`` uses ``fold_in(key, t)``, micro-batch ``j``
        ``fold_in(fold_in(key, t), j)``, and the i-th name in ``rngs`` (``"dropout"``)
        ``fold_in`` of that with i.
      skipped: updates skipped because a gradient was not finite.
      loss_scale: the dynamic loss-scale state of a step built with ``loss_scale=``
        (:class:`jaxaccum.LossScaleState`), or None.
    """

    collections: dict[str, Any] = struct.field(default_factory=dict)
    key: jax.Array | None = None
    skipped: jax.Array | int = 0
    loss_scale: LossScaleState | None = None

    @classmethod
    def from_variables(
        cls,
        apply_fn: Callable[..., Any],
        variables: Mapping[str, Any],
        tx: Any,
        *,
        key: jax.Array | None = None,
        loss_scale: DynamicLossScale | None = None,
    ) -> TrainState:
        """Builds the state from ``model.init``'s output: ``params`` and every other collection.

        Args:
          apply_fn: usually ``model.apply``.
          variables: what ``model.init(...)`` returned.
          tx: an Optax ``GradientTransformation``.
          key: base PRNG key for dropout and other ``rngs``, or None.
          loss_scale: the :class:`jaxaccum.DynamicLossScale` of a step built with
            ``loss_scale=``: the state starts at its ``init_scale``. None: no loss scaling.

        Returns:
          A :class:`TrainState` at step 0. It holds the very arrays in ``variables`` (no
          copy), so a step jitted with ``donate_argnums=0`` deletes them after its first
          call; pass ``jax.tree.map(jnp.copy, variables)`` to keep the originals usable.

        Raises:
          ValueError: if ``variables`` has no ``params`` collection, or for a bad
            ``loss_scale`` setting.
          TypeError: for a ``loss_scale`` that is not a :class:`jaxaccum.DynamicLossScale`.
        """
        if loss_scale is not None:
            _loss_scale.check_config(loss_scale)
        _checks.flax_variables(apply_fn, variables, tx)
        rest = dict(variables)
        params = rest.pop("params")
        return cls.create(
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            collections=rest,
            key=key,
            skipped=jnp.zeros((), jnp.int32),
            loss_scale=None if loss_scale is None else _loss_scale.init(loss_scale),
        )


_FLAX_FIELDS = {f.name for f in dataclasses.fields(train_state.TrainState)}


def collections_of(state: Any) -> tuple[dict[str, Any], Callable[[Any, dict[str, Any]], Any]]:
    """The state's variable collections, and how to put new ones back.

    jaxaccum's :class:`TrainState` keeps them in ``collections``; a subclass of Flax's own
    ``TrainState`` (the flax/examples pattern) keeps each in a field of its name, such as
    ``batch_stats``.
    """
    if isinstance(state, TrainState):
        cols = dict(state.collections or {})
        return cols, lambda s, new: s.replace(collections=new) if cols else s
    names = [
        f.name
        for f in (dataclasses.fields(state) if dataclasses.is_dataclass(state) else ())
        if f.name not in _FLAX_FIELDS and isinstance(getattr(state, f.name), Mapping)
    ]
    return {n: getattr(state, n) for n in names}, lambda s, new: s.replace(
        **{n: new[n] for n in names}
    )
