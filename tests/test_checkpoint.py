"""Save a TrainState with orbax-checkpoint, restore it, continue: bitwise the same run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from helpers import digits_batch, init_params, mean_loss, trees_equal

import jaxaccum


def _dropout_loss(params, batch, key):
    keep = jax.random.bernoulli(key, 0.8, batch["x"].shape)
    return mean_loss(params, batch | {"x": jnp.where(keep, batch["x"] / 0.8, 0.0)})


def test_resume_from_checkpoint_is_bitwise_identical(tmp_path):
    schedule = optax.cosine_decay_schedule(1e-2, 20)
    step = jaxaccum.train_step(
        _dropout_loss,
        optax.adamw(schedule),
        4,
        with_key=True,
        loss_scale=jaxaccum.DynamicLossScale(),
    )
    update = jax.jit(step.update)
    batches = [digits_batch(64, offset=64 * i) for i in range(10)]

    def run(state, batches):
        for batch in batches:
            state, _ = update(state, batch)
        return state

    def fresh():
        return step.init(init_params(), key=jax.random.key(0))

    uninterrupted = run(fresh(), batches)
    half = run(fresh(), batches[:5])
    # Typed PRNG keys are stored as their raw uint32 data and re-wrapped on restore.
    saveable = half._replace(key=jax.random.key_data(half.key))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "step5", saveable)
        ckpt.wait_until_finished()
        restored = ckpt.restore(
            tmp_path / "step5", jax.tree.map(ocp.utils.to_shape_dtype_struct, saveable)
        )
    restored = jaxaccum.TrainState(*restored)._replace(key=jax.random.wrap_key_data(restored[4]))
    assert restored.step.dtype == jnp.int32 and restored.skipped.dtype == jnp.int32
    resumed = run(restored, batches[5:])
    as_data = lambda s: s._replace(key=jax.random.key_data(s.key))  # noqa: E731
    assert trees_equal(as_data(resumed), as_data(uninterrupted))
