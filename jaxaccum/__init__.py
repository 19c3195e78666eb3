"""Exact, fast gradient accumulation for JAX."""

from jaxaccum._accumulate import accumulate as accumulate
from jaxaccum._memory import MemoryStats as MemoryStats
from jaxaccum._memory import compiled_memory as compiled_memory
from jaxaccum._reduce import Reduce as Reduce
from jaxaccum._split import Split as Split
from jaxaccum._split import pad_batch as pad_batch

__version__ = "0.1.0"

__all__ = [
    "MemoryStats",
    "Reduce",
    "Split",
    "accumulate",
    "compiled_memory",
    "pad_batch",
]
