"""The one train-step engine behind the Optax, linen and NNX entry points.

References are written out by hand: the key each micro-batch must receive under the one key
scheme (``fold_in(fold_in(fold_in(key, t), j), i)``), and weighted means computed with numpy.
Tolerances: keys and draws are compared exactly; float32 means at rtol 1e-6.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxaccum
import jaxaccum.flax as jf
from jaxaccum import _engine

N = 8
BATCH = {"x": jnp.arange(N * 2, dtype=jnp.float32).reshape(N, 2), "y": jnp.ones(N)}
KEY = jax.random.key(7)


def draw(key):
    return jax.random.uniform(key)


# The loss of each entry point is a uniform draw from the key its micro-batch gets (plus a
# zero times the params, so there is a gradient); metrics.losses shows every draw.
def optax_loss(w, batch, key):
    return draw(key) + 0.0 * jnp.sum(batch["x"] @ w)


class Draw(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.zeros, (2,))
        return draw(self.make_rng("dropout")) + 0.0 * jnp.sum(x @ w)


def linen_loss(apply, batch):
    return apply(batch["x"])


class NnxDraw(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros(2))
        self.rngs = nnx.Rngs(dropout=0)

    def __call__(self, x):
        return draw(self.rngs.dropout()) + 0.0 * jnp.sum(x @ self.w[...])


def nnx_loss(model, batch):
    return model(batch["x"])


def optax_losses(k, steps=1):
    step = jaxaccum.train_step(optax_loss, optax.sgd(0.1), k, with_key=True)
    state = step.init(jnp.zeros(2), key=KEY)
    for _ in range(steps):
        state, metrics = step(state, BATCH)
    return metrics.losses


def linen_losses(k, steps=1):
    step = jf.train_step(linen_loss, k)
    variables = Draw().init({"params": KEY, "dropout": KEY}, BATCH["x"])
    state = step.init(Draw().apply, variables, optax.sgd(0.1), key=KEY)
    for _ in range(steps):
        state, metrics = step(state, BATCH)
    return metrics.losses


def nnx_losses(k, steps=1):
    step = jf.nnx_train_step(nnx_loss, k)
    model = NnxDraw()
    optimizer = step.init(model, optax.sgd(0.1))
    for _ in range(steps):
        metrics = step(model, optimizer, BATCH, KEY)
    return metrics.losses


def micro_key(t, j):
    return jax.random.fold_in(jax.random.fold_in(KEY, t), j)


def test_every_builder_returns_one_train_step_record():
    steps = [
        jaxaccum.train_step(optax_loss, optax.sgd(0.1), 2, with_key=True),
        jf.train_step(linen_loss, 2),
        jf.nnx_train_step(nnx_loss, 2),
    ]
    for step in steps:
        assert isinstance(step, jaxaccum.TrainStep)
        assert callable(step.init) and callable(step.update)
        with pytest.raises(TypeError):
            iter(step)  # a record of two functions, not a pair to unpack
    # Called, it is its update; jitted, too.
    state = steps[0].init(jnp.zeros(2), key=KEY)
    direct, _ = steps[0].update(state, BATCH)
    jitted, _ = jax.jit(steps[0])(state, BATCH)
    np.testing.assert_array_equal(direct.params, jitted.params)


@pytest.mark.parametrize("t", [0, 1])
def test_optax_micro_batch_keys_follow_the_scheme(t):
    losses = optax_losses(4, steps=t + 1)
    expected = [draw(micro_key(t, j)) for j in range(4)]
    np.testing.assert_array_equal(losses, np.array(expected))


@pytest.mark.parametrize("t", [0, 1])
def test_linen_stream_keys_follow_the_scheme(t):
    losses = linen_losses(4, steps=t + 1)
    # The step passes rngs={"dropout": fold_in(micro_key, 0)}; make_rng folds in its own
    # count once more, as Flax does for a stream's first draw in a module.
    expected = []
    for j in range(4):
        stream = jax.random.fold_in(micro_key(t, j), 0)
        variables = Draw().init({"params": KEY, "dropout": KEY}, BATCH["x"])
        expected.append(Draw().apply(variables, BATCH["x"][:1], rngs={"dropout": stream}))
    np.testing.assert_array_equal(losses, np.array(expected))


@pytest.mark.parametrize("losses_of", [optax_losses, linen_losses, nnx_losses])
def test_micro_batch_zero_keeps_its_key_from_k_1_to_k_2(losses_of):
    one, two, four = losses_of(1), losses_of(2), losses_of(4)
    assert one[0] == two[0] == four[0]
    assert two[1] == four[1]
    assert len(set(np.asarray(four).tolist())) == 4  # every micro-batch draws its own


def test_nnx_keys_are_replaced_by_the_scheme():
    # With a key, NNX's i-th PRNG key in state order becomes fold_in(micro_key, i): the
    # draw equals a fresh model whose stream key is set to that value. The stream's count
    # is state like any other, carried from micro-batch to micro-batch: j draws before.
    losses = nnx_losses(2)
    for j in range(2):
        model = NnxDraw()
        model.rngs.dropout.key[...] = jax.random.fold_in(micro_key(0, j), 0)
        model.rngs.dropout.count[...] = j
        np.testing.assert_array_equal(losses[j], model(BATCH["x"][:1]))


def test_accumulate_folds_the_key_for_every_k_including_1():
    fn = lambda key, batch: jax.random.uniform(key) + 0.0 * batch.sum()  # noqa: E731
    for k in (1, 2):
        got = jaxaccum.accumulate(fn, k, batch_argnums=1, rng_argnums=0, reduce="stack")(
            KEY, jnp.ones(4)
        )
        np.testing.assert_array_equal(got[0], draw(jax.random.fold_in(KEY, 0)))


def test_options_take_members_or_strings_and_name_the_choices():
    assert (
        jaxaccum.NonFinite.DROP == "drop" and jaxaccum.Split("presplit") is jaxaccum.Split.PRESPLIT
    )
    by_member = jaxaccum.train_step(
        optax_loss, optax.sgd(0.1), 2, with_key=True, nonfinite=jaxaccum.NonFinite.DROP
    )
    by_string = jaxaccum.train_step(optax_loss, optax.sgd(0.1), 2, with_key=True, nonfinite="drop")
    assert type(by_member) is type(by_string)
    with pytest.raises(
        ValueError, match=r"batch_norm='full' is not one of \('sequential', 'exact'\)"
    ):
        jf.nnx_train_step(nnx_loss, 2, batch_norm="full")
    with pytest.raises(ValueError, match=r"collections\['cache'\]='avg' is not one of"):
        jf.train_step(linen_loss, 2, collections={"cache": "avg"})
    with pytest.raises(ValueError, match=r"fsdp='zero3' is not one of"):
        jaxaccum.train_step(optax_loss, optax.sgd(0.1), 2, with_key=True, fsdp="zero3")


def test_linen_step_runs_the_states_own_apply_gradients():
    # A TrainState subclass that overrides apply_gradients (an EMA, a counter) keeps it.
    from typing import Any

    from flax.training import train_state

    class Counting(train_state.TrainState):
        updates: Any = 0

        def apply_gradients(self, *, grads, **kwargs):
            return super().apply_gradients(grads=grads, **kwargs).replace(updates=self.updates + 1)

    class Lin(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(x)

    variables = Lin().init(KEY, BATCH["x"])
    state = Counting.create(apply_fn=Lin().apply, params=variables["params"], tx=optax.sgd(0.1))
    step = jf.train_step(lambda apply, b: jnp.mean(apply(b["x"]) ** 2), 2)
    state, metrics = jax.jit(step)(state, BATCH)
    assert bool(metrics.applied) and int(state.updates) == 1 and int(state.step) == 1


def test_declared_axes_are_read_from_the_modules_in_a_pytree():
    """The axis names a model's layers declare (an Equinox ``BatchNorm(axis_name=...)``),
    found in the params pytree without calling anything."""
    model = [
        eqx.nn.BatchNorm(3, axis_name="batch", mode="batch"),
        {"w": jnp.zeros(2)},
        eqx.nn.BatchNorm(3, axis_name=("data", "model"), mode="batch"),
    ]
    assert _engine.declared_axes(model) == ["batch", "data", "model"]
    assert _engine.declared_axes({"w": jnp.zeros(2)}) == []
