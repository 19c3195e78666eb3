"""Exact, fast gradient accumulation for JAX."""

from jaxaccum import inspect as inspect
from jaxaccum._accumulate import accumulate as accumulate
from jaxaccum._engine import TrainStep as TrainStep
from jaxaccum._loss_scale import DynamicLossScale as DynamicLossScale
from jaxaccum._loss_scale import LossScaleState as LossScaleState
from jaxaccum._multisteps import MultiStepsState as MultiStepsState
from jaxaccum._multisteps import flush as flush
from jaxaccum._multisteps import multi_steps as multi_steps
from jaxaccum._parallel import FSDP as FSDP
from jaxaccum._parallel import DataAxis as DataAxis
from jaxaccum._reduce import LeafInfo as LeafInfo
from jaxaccum._reduce import Reduce as Reduce
from jaxaccum._reduce import Reduction as Reduction
from jaxaccum._split import Split as Split
from jaxaccum._split import pad_batch as pad_batch
from jaxaccum._train import NonFinite as NonFinite
from jaxaccum._train import TrainMetrics as TrainMetrics
from jaxaccum._train import TrainState as TrainState
from jaxaccum._train import train_step as train_step

__version__ = "0.1.0"

__all__ = [
    "FSDP",
    "DataAxis",
    "DynamicLossScale",
    "LeafInfo",
    "LossScaleState",
    "MultiStepsState",
    "NonFinite",
    "Reduce",
    "Reduction",
    "Split",
    "TrainMetrics",
    "TrainState",
    "TrainStep",
    "accumulate",
    "flush",
    "multi_steps",
    "pad_batch",
    "train_step",
]
