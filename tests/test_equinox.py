"""Equinox models in the train step and ``multi_steps``, against Equinox's own loops.

References: ``eqx.filter_value_and_grad`` on the whole batch followed by a plain Optax
update (``eqx.apply_updates``), a Python loop over the micro-batches that threads the
``eqx.nn.State`` by hand, and ``optax.MultiSteps`` on ``eqx.filter(model,
eqx.is_inexact_array)``; all jitted with ``eqx.filter_jit``. Tolerances: float32 round-off
(``helpers.RTOL``, ``helpers.ATOL``).
"""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, digits_batch, strided_micro, trees_equal

import jaxaccum
from jaxaccum import _equinox

N = 64


class Classifier(eqx.Module):
    """An MLP over the 64 pixels, holding an integer buffer the optimizer must not touch."""

    mlp: eqx.nn.MLP
    classes: jax.Array  # int32: what each output means, used by the loss

    def __init__(self, key: jax.Array) -> None:
        self.mlp = eqx.nn.MLP(64, 10, 16, 1, key=key)
        self.classes = jnp.arange(10, dtype=jnp.int32)


def loss(model: Classifier, batch: dict[str, jax.Array]) -> jax.Array:
    logits = jax.vmap(model.mlp)(batch["x"])
    target = batch["y"][:, None] == model.classes  # one-hot from the integer buffer
    return optax.softmax_cross_entropy(logits, target).mean()


class BNNet(eqx.Module):
    """Linear -> BatchNorm -> ReLU -> Linear; the statistics live in an ``eqx.nn.State``."""

    first: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    last: eqx.nn.Linear

    def __init__(self, mode: str, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.first = eqx.nn.Linear(64, 16, key=k1)
        self.norm = eqx.nn.BatchNorm(16, axis_name="batch", momentum=0.9, mode=mode)
        self.last = eqx.nn.Linear(16, 10, key=k2)

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        h, state = self.norm(self.first(x), state)
        return self.last(jax.nn.relu(h)), state


def stateful_loss(model: BNNet, state: eqx.nn.State, batch: dict[str, jax.Array]) -> Any:
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    logits, state = batched(batch["x"], state)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), state


def batches(steps: int) -> list[dict[str, jax.Array]]:
    return [digits_batch(N, offset=i * N) for i in range(steps)]


def inexact(model: Any) -> Any:
    return eqx.filter(model, eqx.is_inexact_array)


def run_step(step: jaxaccum.TrainStep, model: Any, data: list[Any], **init: Any) -> Any:
    update = eqx.filter_jit(step.update)
    state = step.init(model, **init)
    for batch in data:
        state, _ = update(state, batch)
    return state


def test_import_jaxaccum_leaves_equinox_unimported():
    code = "import sys, jaxaccum, jaxaccum.inspect; print('equinox' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "False"


@functools.cache
def equinox_full_batch(steps: int) -> tuple[Classifier, Any]:
    """The reference: Equinox's own gradient of the whole batch, then one Adam update."""
    model, optimizer = Classifier(jax.random.key(0)), optax.adam(1e-2)

    @eqx.filter_jit
    def full_step(model, opt_state, batch):
        _, grads = eqx.filter_value_and_grad(loss)(model, batch)
        updates, opt_state = optimizer.update(grads, opt_state, inexact(model))
        return eqx.apply_updates(model, updates), opt_state

    opt_state = optimizer.init(inexact(model))
    for batch in batches(steps):
        model, opt_state = full_step(model, opt_state, batch)
    return model, opt_state


@pytest.mark.parametrize("k", [1, 4])
def test_train_step_on_a_module_matches_equinox_full_batch(k):
    model, optimizer, data = Classifier(jax.random.key(0)), optax.adam(1e-2), batches(3)
    expected, opt_state = equinox_full_batch(len(data))
    state = run_step(jaxaccum.train_step(loss, optimizer, k), model, data)
    assert isinstance(state.params, Classifier)
    assert_trees_close(inexact(state.params), inexact(expected))
    assert_trees_close(state.opt_state, opt_state)
    # Everything but the inexact arrays passes through: the buffer, the activation.
    assert trees_equal(state.params.classes, model.classes)
    assert state.params.mlp.activation is model.mlp.activation
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(optimizer.init(inexact(model)))


def threaded_loop(model, state, batch, k, optimizer, opt_state, order=None):
    """One update by hand: the strided micro-batches in ``order`` (all k in turn by
    default), the state threaded from each into the next, their gradients averaged."""
    grad_fn = eqx.filter_value_and_grad(stateful_loss, has_aux=True)
    grads = []
    for j in order or range(k):
        (_, state), g = grad_fn(model, state, strided_micro(batch, j, k))
        grads.append(g)
    mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
    updates, opt_state = optimizer.update(mean, opt_state, inexact(model))
    return eqx.apply_updates(model, updates), state, opt_state


def max_float_gap(a: Any, b: Any) -> float:
    """The largest absolute difference between the floating leaves of two trees."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs if x.dtype.kind == "f")


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_batchnorm_state_threads_through_micro_batches_like_a_loop(mode):
    k, optimizer, data = 4, optax.sgd(0.1), batches(2)
    model, model_state = eqx.nn.make_with_state(BNNet)(mode, jax.random.key(0))
    loop = eqx.filter_jit(functools.partial(threaded_loop, k=k, optimizer=optimizer))
    step = jaxaccum.train_step(stateful_loss, optimizer, k, has_state=True)
    update = eqx.filter_jit(step.update)

    expected_opt_state = optimizer.init(inexact(model))
    expected = (model, model_state, expected_opt_state)
    state, states = step.init(model, model_state=model_state), []
    for batch in data:
        expected = loop(*expected[:2], batch, opt_state=expected[2])
        state, _ = update(state, batch)
        assert_trees_close(inexact(state.params), inexact(expected[0]))
        assert_trees_close(state.model_state, expected[1])
        states.append(state.model_state)
    assert isinstance(state.model_state, eqx.nn.State)

    # Negative control: the same micro-batches threaded in reverse order (micro-batch j
    # of `reordered` is micro-batch k - 1 - j of the batch) give other statistics, far
    # beyond the tolerance above.
    i = np.arange(N)
    reordered = jax.tree.map(lambda x: x[i + k - 1 - 2 * (i % k)], data[0])
    _, reversed_state, _ = loop(model, model_state, reordered, opt_state=expected_opt_state)
    assert max_float_gap(states[0], reversed_state) > 1e-3


def test_skipped_and_dropped_micro_batches_leave_the_state_as_they_found_it():
    k, optimizer, batch = 4, optax.sgd(0.1), digits_batch(N)
    model, model_state = eqx.nn.make_with_state(BNNet)("ema", jax.random.key(0))
    poisoned = {**batch, "x": batch["x"].at[0].set(jnp.nan)}  # micro-batch 0 only
    nan = {**batch, "x": batch["x"] * jnp.nan}

    step = jaxaccum.train_step(stateful_loss, optimizer, k, has_state=True, nonfinite="drop")
    update, start = eqx.filter_jit(step.update), step.init(model, model_state=model_state)

    # Every micro-batch bad: the update is skipped, the state kept bitwise.
    skipped, _ = update(start, nan)
    assert int(skipped.skipped) == 1 and trees_equal(skipped.model_state, model_state)

    # Micro-batch 0 dropped: it leaves the state alone, so micro-batch 1 starts from the
    # initial state, as in a loop over micro-batches 1, 2 and 3.
    dropped, metrics = update(start, poisoned)
    assert bool(metrics.applied) and float(metrics.weight) == N - N // k
    loop = eqx.filter_jit(functools.partial(threaded_loop, k=k, optimizer=optimizer))
    _, expected, _ = loop(
        model, model_state, batch, opt_state=optimizer.init(inexact(model)), order=(1, 2, 3)
    )
    assert_trees_close(dropped.model_state, expected)
    assert max_float_gap(dropped.model_state, model_state) > 1e-3


def test_multi_steps_with_a_module_matches_optax_multisteps():
    model, data = Classifier(jax.random.key(1)), batches(2)
    ours, theirs = jaxaccum.multi_steps(optax.adam(1e-2), 4), optax.MultiSteps(optax.adam(1e-2), 4)

    @eqx.filter_jit
    def call(opt, model, opt_state, micro, whole):
        grads = eqx.filter_grad(loss)(model, micro)
        updates, opt_state = opt.update(grads, opt_state, model if whole else inexact(model))
        return eqx.apply_updates(model, updates), opt_state

    runs = {}
    for name, opt, whole in (("ours", ours, True), ("theirs", theirs, False)):
        m, s = model, opt.init(model if whole else inexact(model))
        for batch in data:
            for j in range(4):
                m, s = call(opt, m, s, strided_micro(batch, j, 4), whole)
        runs[name] = m
    assert_trees_close(inexact(runs["ours"]), inexact(runs["theirs"]))
    assert trees_equal(runs["ours"].classes, model.classes)
    assert not trees_equal(inexact(runs["ours"]), inexact(model))


def test_filter_jit_of_accumulate_raises_no_warning_and_keeps_the_signature():
    model, batch = Classifier(jax.random.key(0)), digits_batch(N)
    grad_fn = eqx.filter_value_and_grad(loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accumulated = eqx.filter_jit(jaxaccum.accumulate(grad_fn, 4))
        value, grads = accumulated(model, batch)
    assert not caught, [str(w.message) for w in caught]
    expected_value, expected = eqx.filter_jit(grad_fn)(model, batch)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    assert_trees_close(grads, expected)
    plain = jaxaccum.accumulate(grad_fn, 4)
    assert plain.__name__ == "loss" and not hasattr(plain, "__wrapped__")
    assert inspect.signature(plain) == inspect.signature(loss)


def test_a_wrapper_linking_to_the_gradient_function_would_warn():
    # The control: Equinox's check fires for a plain function whose __wrapped__ leads to
    # filter_value_and_grad, which is what a functools.wraps wrapper looks like.
    linked = functools.wraps(eqx.filter_value_and_grad(loss))(lambda *args: None)
    with pytest.warns(UserWarning, match="JAX-transformed callable"):
        eqx.filter_jit(linked)
    unlinked = _equinox.wraps(eqx.filter_value_and_grad(loss))(lambda *args: None)
    eqx.filter_jit(unlinked)


def test_plain_pytrees_are_trained_whole():
    params = {"w": jnp.ones(3), "n": jnp.int32(2)}
    trained, rest = _equinox.split(params)
    assert trained is params and rest is None
    assert _equinox.merge(trained, rest) is params
    assert _equinox.holds_module([params, Classifier(jax.random.key(0))])


def test_has_state_misuse_is_named():
    model, model_state = eqx.nn.make_with_state(BNNet)("ema", jax.random.key(0))
    step = jaxaccum.train_step(stateful_loss, optax.sgd(0.1), 2, has_state=True)
    with pytest.raises(TypeError, match=r"has_state=True\) needs init\(params, model_state="):
        step.init(model)
    plain = jaxaccum.train_step(loss, optax.sgd(0.1), 2)
    with pytest.raises(TypeError, match="built without has_state=True"):
        plain.init(Classifier(jax.random.key(0)), model_state=model_state)
    with pytest.raises(TypeError, match="has_state must be a bool"):
        jaxaccum.train_step(loss, optax.sgd(0.1), 2, has_state="yes")

    def forgets_state(model, state, batch):
        return stateful_loss(model, state, batch)[0]

    def changes_state(model, state, batch):
        return stateful_loss(model, state, batch)[0], {"other": jnp.zeros(2)}

    for bad, error, match in (
        (forgets_state, TypeError, r"must return \(loss, model_state\)"),
        (changes_state, ValueError, "the model_state loss_fn returned is not laid out as"),
    ):
        step = jaxaccum.train_step(bad, optax.sgd(0.1), 2, has_state=True)
        with pytest.raises(error, match=match):
            step.update(step.init(model, model_state=model_state), digits_batch(8))
