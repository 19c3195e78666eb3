"""Reading XLA's compiled memory analysis of a jitted function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax


class MemoryStats(NamedTuple):
    """Bytes XLA reserves for one compiled program, from ``memory_analysis()``.

    Attributes:
      argument_bytes: input buffers.
      output_bytes: output buffers.
      temp_bytes: temporaries (activations, residuals, scratch). On XLA:CPU this leaves out
        scratch that XLA places inside output buffers, so compare programs whose
        temporaries are dominated by activations.
      alias_bytes: output bytes that reuse donated input buffers.
      code_bytes: generated code.
    """

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    code_bytes: int


def compiled_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> MemoryStats:
    """Compiles ``fn`` for the given (possibly abstract) arguments and reads its memory use.

    Nothing runs: the figures come from XLA's analysis of the compiled program, so they
    can be taken for inputs that would not fit on the device.

    Args:
      fn: a function, jitted or not (it is jitted if needed).
      *args: arrays or ``jax.ShapeDtypeStruct`` values.
      **kwargs: keyword arguments, likewise.

    Returns:
      A :class:`MemoryStats`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxaccum
      >>> x = jax.ShapeDtypeStruct((1024, 256), jnp.float32)
      >>> stats = jaxaccum.inspect.compiled_memory(lambda x: jnp.tanh(x @ x.T).sum(), x)
      >>> stats.argument_bytes
      1048576
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
    return MemoryStats(
        argument_bytes=int(analysis.argument_size_in_bytes),
        output_bytes=int(analysis.output_size_in_bytes),
        temp_bytes=int(analysis.temp_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes),
        code_bytes=int(analysis.generated_code_size_in_bytes),
    )
