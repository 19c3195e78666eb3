"""``_memory``: ``compiled_memory`` reports what XLA's memory analysis reports.

The reference is ``jax.jit(f).lower(...).compile().memory_analysis()`` read directly, and,
for input and output buffers, the byte counts of the arrays themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxaccum
from jaxaccum import _memory


def step(w, x, *, scale=1.0):
    return jnp.tanh(x @ w).sum(0) * scale, w * 2


W = jax.ShapeDtypeStruct((64, 32), jnp.float32)
X = jax.ShapeDtypeStruct((128, 64), jnp.float32)


def analysis(jitted, *args, **kwargs):
    return jitted.lower(*args, **kwargs).compile().memory_analysis()


def test_fields_are_xla_memory_analysis():
    got = _memory.compiled_memory(step, W, X, scale=2.0)
    ref = analysis(jax.jit(step), W, X, scale=2.0)
    assert got == _memory.MemoryStats(
        argument_bytes=ref.argument_size_in_bytes,
        output_bytes=ref.output_size_in_bytes,
        temp_bytes=ref.temp_size_in_bytes,
        alias_bytes=ref.alias_size_in_bytes,
        code_bytes=ref.generated_code_size_in_bytes,
    )
    assert all(type(v) is int for v in got)


def test_argument_and_output_bytes_are_the_buffers_sizes():
    got = _memory.compiled_memory(lambda w, x: jnp.tanh(x @ w), W, X)
    assert got.argument_bytes == (64 * 32 + 128 * 64) * 4
    assert got.output_bytes == 128 * 32 * 4
    # Several outputs: their buffers plus XLA's table of them (a pointer each).
    pair = _memory.compiled_memory(step, W, X)
    assert (32 + 64 * 32) * 4 <= pair.output_bytes <= (32 + 64 * 32) * 4 + 2 * 8


def test_concrete_arrays_give_the_figures_of_their_shapes():
    w, x = np.zeros(W.shape, np.float32), np.zeros(X.shape, np.float32)
    assert _memory.compiled_memory(step, w, x) == _memory.compiled_memory(step, W, X)


def test_a_jitted_function_is_compiled_as_it_is_with_its_donations():
    donating = jax.jit(lambda w, x: w - 0.1 * jnp.tanh(x @ w).sum() * w, donate_argnums=0)
    got = _memory.compiled_memory(donating, W, X)
    ref = analysis(donating, W, X)
    assert (got.alias_bytes, got.output_bytes) == (
        ref.alias_size_in_bytes,
        ref.output_size_in_bytes,
    )
    assert got.alias_bytes == 64 * 32 * 4  # the update reuses the donated weights


def test_nothing_runs():
    """Inputs too large for the host are fine: only shapes reach XLA."""
    huge = jax.ShapeDtypeStruct((2**20, 2**16), jnp.float32)  # 256 GiB
    got = _memory.compiled_memory(lambda x: x[:2].sum(), huge)
    assert got.argument_bytes == 2**20 * 2**16 * 4
    assert got.output_bytes == 4


def test_exported_from_inspect():
    assert jaxaccum.inspect.compiled_memory is _memory.compiled_memory
    assert jaxaccum.inspect.MemoryStats is _memory.MemoryStats
