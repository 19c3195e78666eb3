"""What a configuration costs and which k to choose, before and after compiling it.

Import it as ``import jaxaccum.inspect``. Nothing here is needed inside a training loop:

* :func:`collectives` lists the cross-device collectives XLA compiled into a step, so a
  data-parallel step can be checked to all-reduce once per step, not once per micro-batch.
* :func:`compiled_memory` reads XLA's memory analysis of a compiled step.
* :func:`plan_microbatches` compiles candidate micro-batch sizes and picks the fastest
  that fits a memory budget.
* :func:`accumulation_steps`, :func:`effective_batch_size` and :func:`scale_learning_rate`
  are the batch-size arithmetic of per-device batch × devices × k.
"""

from jaxaccum._batch_sizes import ScalingRule as ScalingRule
from jaxaccum._batch_sizes import accumulation_steps as accumulation_steps
from jaxaccum._batch_sizes import effective_batch_size as effective_batch_size
from jaxaccum._batch_sizes import scale_learning_rate as scale_learning_rate
from jaxaccum._collectives import Collective as Collective
from jaxaccum._collectives import CollectiveReport as CollectiveReport
from jaxaccum._collectives import collectives as collectives
from jaxaccum._memory import MemoryStats as MemoryStats
from jaxaccum._memory import compiled_memory as compiled_memory
from jaxaccum._planner import MicrobatchPlan as MicrobatchPlan
from jaxaccum._planner import plan_microbatches as plan_microbatches

__all__ = [
    "Collective",
    "CollectiveReport",
    "MemoryStats",
    "MicrobatchPlan",
    "ScalingRule",
    "accumulation_steps",
    "collectives",
    "compiled_memory",
    "effective_batch_size",
    "plan_microbatches",
    "scale_learning_rate",
]
