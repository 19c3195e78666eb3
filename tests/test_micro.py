"""``_micro``: one micro-batch's weighted contribution, and the one weighted mean of the sums.

The reference is written out with numpy: the weighted mean of the finite micro-batches.
Tolerance: float32 means at rtol 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum import _engine, _micro


def test_finish_step_is_the_weighted_mean_with_zero_weights_left_out():
    engine = _engine.configure(
        lambda p, b: 0.0,
        ("params", "batch"),
        3,
        weight_fn=None,
        has_aux=True,
        nonfinite="drop",
        split="strided",
        unroll=1,
        data_axis=None,
        mesh=None,
        axis_name=None,
        fsdp=None,
        param_specs=None,
    )
    grads = [np.array([1.0, 2.0]), np.array([np.nan, 0.0]), np.array([3.0, -1.0])]
    losses = [0.5, np.nan, 1.5]
    weights = [2.0, 5.0, 6.0]
    outs = [
        _micro.micro_outputs(jnp.float32(x), {"a": jnp.float32(x)}, jnp.asarray(g), w, engine)
        for g, x, w in zip(grads, losses, map(jnp.float32, weights), strict=True)
    ]
    assert [bool(counted) for _, counted in outs] == [True, False, True]
    summed = jax.tree.map(lambda *x: sum(x), *[o for o, _ in outs])
    summed["losses"] = jnp.stack([o["losses"] for o, _ in outs])
    result = _micro.finish_step(summed, jnp.float32(1.0), jnp.zeros(2), engine)
    grads_mean, _, metrics = result
    expected = (2.0 * grads[0] + 6.0 * grads[2]) / 8.0
    np.testing.assert_allclose(grads_mean, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics.loss, (2.0 * 0.5 + 6.0 * 1.5) / 8.0, rtol=1e-6)
    np.testing.assert_allclose(metrics.aux["a"], metrics.loss, rtol=1e-6)
    assert float(metrics.weight) == 8.0 and bool(metrics.applied)
