"""Flax: the linen train step and its ``TrainState``, the NNX train step, BatchNorm modes.

Import it as ``import jaxaccum.flax`` (it needs ``flax``; the rest of jaxaccum does not).
The linen step is in ``_linen`` (its state in ``_state``, the model inside the loop in
``_model``), the NNX step in ``_nnx``, and the exact merge of BatchNorm statistics both use
in ``_batch_norm``.
"""

from jaxaccum.flax._batch_norm import BatchNormMode as BatchNormMode
from jaxaccum.flax._linen import train_step as train_step
from jaxaccum.flax._nnx import nnx_train_step as nnx_train_step
from jaxaccum.flax._state import CollectionMode as CollectionMode
from jaxaccum.flax._state import TrainState as TrainState

__all__ = [
    "BatchNormMode",
    "CollectionMode",
    "TrainState",
    "nnx_train_step",
    "train_step",
]
