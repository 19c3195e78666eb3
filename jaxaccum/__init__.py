"""Exact, fast gradient accumulation for JAX."""

from jaxaccum._accumulate import accumulate as accumulate
from jaxaccum._batching import ScalingRule as ScalingRule
from jaxaccum._batching import accumulation_steps as accumulation_steps
from jaxaccum._batching import effective_batch_size as effective_batch_size
from jaxaccum._batching import scale_learning_rate as scale_learning_rate
from jaxaccum._collectives import Collective as Collective
from jaxaccum._collectives import CollectiveReport as CollectiveReport
from jaxaccum._collectives import collectives as collectives
from jaxaccum._loss_scale import DynamicLossScale as DynamicLossScale
from jaxaccum._loss_scale import LossScaleState as LossScaleState
from jaxaccum._memory import MemoryStats as MemoryStats
from jaxaccum._memory import compiled_memory as compiled_memory
from jaxaccum._multisteps import MultiStepsState as MultiStepsState
from jaxaccum._multisteps import flush as flush
from jaxaccum._multisteps import multi_steps as multi_steps
from jaxaccum._planner import MicrobatchPlan as MicrobatchPlan
from jaxaccum._planner import plan_microbatches as plan_microbatches
from jaxaccum._reduce import Reduce as Reduce
from jaxaccum._reduce import ReduceContext as ReduceContext
from jaxaccum._reduce import Reduction as Reduction
from jaxaccum._sharding import FSDP as FSDP
from jaxaccum._sharding import DataAxis as DataAxis
from jaxaccum._split import Split as Split
from jaxaccum._split import pad_batch as pad_batch
from jaxaccum._train import NonFinite as NonFinite
from jaxaccum._train import TrainMetrics as TrainMetrics
from jaxaccum._train import TrainState as TrainState
from jaxaccum._train import TrainStep as TrainStep
from jaxaccum._train import train_step as train_step

__version__ = "0.1.0"

__all__ = [
    "FSDP",
    "Collective",
    "CollectiveReport",
    "DataAxis",
    "DynamicLossScale",
    "LossScaleState",
    "MemoryStats",
    "MicrobatchPlan",
    "MultiStepsState",
    "NonFinite",
    "Reduce",
    "ReduceContext",
    "Reduction",
    "ScalingRule",
    "Split",
    "TrainMetrics",
    "TrainState",
    "TrainStep",
    "accumulate",
    "accumulation_steps",
    "collectives",
    "compiled_memory",
    "effective_batch_size",
    "flush",
    "multi_steps",
    "pad_batch",
    "plan_microbatches",
    "scale_learning_rate",
    "train_step",
]
