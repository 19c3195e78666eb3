"""Edges of the train steps and of accumulate's argument options, each with a teaching error.

The three train steps (Optax, linen, NNX) share their checks, so each check is run through
all three: a function that is not callable fails at construction; a loss_fn whose output
does not fit ``has_aux``, or an optimizer state made for another optimizer, fails at trace
time, before Optax or JAX would fail with a message about their own internals.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from flax.training import train_state
from helpers import MLP, digits_batch, init_params, mean_loss

import jaxaccum
import jaxaccum.flax as jf

K = 4
N = 64
FRONT_ENDS = ("optax", "linen", "nnx")
LOSS_CALLS = {
    "optax": "loss_fn(params, batch)",
    "linen": "loss_fn(apply, micro_batch)",
    "nnx": "loss_fn(model, micro_batch)",
}


def xent(logits: jax.Array, mb: dict[str, jax.Array]) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, mb["y"]).mean()


def build(front: str, loss_fn: Any, **kwargs: Any) -> Any:
    """``front``'s train step around ``loss_fn``, built with SGD where the step takes one."""
    if front == "optax":
        return jaxaccum.train_step(loss_fn, optax.sgd(0.1), K, **kwargs)
    if front == "linen":
        return jf.train_step(loss_fn, K, **kwargs)
    return jf.nnx_train_step(loss_fn, K, **kwargs)


def run_step(front: str, shape_loss: Callable[[jax.Array, Any], Any], **kwargs: Any) -> None:
    """Builds ``front``'s step with ``loss_fn`` returning ``shape_loss(logits, mb)``; runs it."""
    batch = digits_batch(N)
    if front == "optax":
        step = build(front, lambda p, mb: shape_loss(MLP().apply(p, mb["x"]), mb), **kwargs)
        jax.jit(step.update)(step.init(init_params()), batch)
    elif front == "linen":
        update = build(front, lambda apply, mb: shape_loss(apply(mb["x"]), mb), **kwargs)
        state = jf.TrainState.from_variables(MLP().apply, init_params(), optax.sgd(0.1))
        jax.jit(update)(state, batch)
    else:
        model = nnx.Linear(64, 10, rngs=nnx.Rngs(0))
        update = build(front, lambda m, mb: shape_loss(m(mb["x"]), mb), **kwargs)
        nnx.jit(update)(model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), batch)


# 1: functions that are not callable fail at construction, with the call they need.
@pytest.mark.parametrize("front", FRONT_ENDS)
def test_loss_fn_not_callable_fails_at_construction(front):
    msg = (
        rf"loss_fn must be callable as {re.escape(LOSS_CALLS[front])}, got float; "
        r"pass the function itself \(not its result\) as the first argument\."
    )
    with pytest.raises(TypeError, match=msg):
        build(front, 0.5)


def test_optimizer_and_loss_fn_swapped_names_loss_fn():
    msg = r"loss_fn must be callable as loss_fn\(params, batch, key\), got GradientTransformation"
    with pytest.raises(TypeError, match=msg):
        jaxaccum.train_step(optax.sgd(0.1), mean_loss, K, with_key=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("front", FRONT_ENDS)
def test_weight_fn_not_callable_fails_at_construction(front):
    msg = (
        r"weight_fn must be callable as weight_fn\(micro_batch\), got str; pass a function "
        r"returning the micro-batch's number of valid items, e\.g\. "
        r"weight_fn=lambda mb: mb\['mask'\]\.sum\(\), or None"
    )
    with pytest.raises(TypeError, match=msg):
        build(front, (lambda apply, mb: 0.0) if front == "linen" else mean_loss, weight_fn="mask")


def test_linen_state_without_apply_fn():
    state = train_state.TrainState.create(apply_fn=None, params=init_params(), tx=optax.sgd(0.1))
    update = jf.train_step(lambda apply, mb: xent(apply(mb["x"]), mb), K)
    msg = (
        r"state\.apply_fn must be the model's apply function, got NoneType; build the state "
        r"with jaxaccum\.flax\.TrainState\.from_variables\(model\.apply"
    )
    with pytest.raises(TypeError, match=msg):
        update(state, digits_batch(N))


# 2: an optimizer state made for another optimizer, or other params, fails at trace time.
def test_optax_state_from_another_optimizer():
    sgd_state = jaxaccum.train_step(mean_loss, optax.sgd(0.1), K).init(init_params())
    adam = jaxaccum.train_step(mean_loss, optax.adam(1e-3), K)
    msg = (
        r"state\.opt_state was made for another optimizer or other params: it holds the Optax "
        r"states \(EmptyState, EmptyState\) but optimizer\.init\(state\.params\) has "
        r"\(ScaleByAdamState, EmptyState\); create the state with this step's own init, "
        r"step\.init\(params\)"
    )
    with pytest.raises(ValueError, match=msg):
        jax.jit(adam.update)(sgd_state, digits_batch(N))
    # The fix the message gives runs.
    fixed = sgd_state._replace(opt_state=optax.adam(1e-3).init(sgd_state.params))
    new, _ = jax.jit(adam.update)(fixed, digits_batch(N))
    assert int(new.step) == 1


def test_optax_state_for_other_params_lists_the_leaves():
    step = jaxaccum.train_step(mean_loss, optax.adam(1e-3), K)
    state = step.init(init_params())._replace(opt_state=optax.adam(1e-3).init(init_params(16)))
    msg = (
        r"state\.opt_state was made for params of other shapes than optimizer\.init\(state\."
        r"params\): state\.opt_state\[0\]\.mu\['params'\]\['Dense_0'\]\['bias'\] has "
        r"shape \(16,\), not \(32,\);.*; and 1 more; create the state"
    )
    with pytest.raises(ValueError, match=msg):
        jax.jit(step.update)(state, digits_batch(N))


def test_optax_state_for_a_params_tree_of_another_structure():
    step = jaxaccum.train_step(lambda p, mb: mean_loss(p["mlp"], mb), optax.adam(1e-3), K)
    state = step.init({"mlp": init_params()})
    state = state._replace(opt_state=optax.adam(1e-3).init({"mlp": init_params(), "scale": 1.0}))
    msg = (
        r"(?s)state\.opt_state was made for another optimizer or other params: it has the "
        r"structure\n  PyTreeDef.*'scale'.*\nbut optimizer\.init\(state\.params\) has\n  "
        r"PyTreeDef.*\nonly state\.opt_state has state\.opt_state\[0\]\.mu\['scale'\], "
        r"state\.opt_state\[0\]\.nu\['scale'\]; create the state with this step's own init"
    )
    with pytest.raises(ValueError, match=msg):
        jax.jit(step.update)(state, digits_batch(N))


def test_linen_state_with_a_replaced_tx():
    state = jf.TrainState.from_variables(MLP().apply, init_params(), optax.sgd(0.1))
    state = state.replace(tx=optax.adam(1e-3))
    update = jax.jit(jf.train_step(lambda apply, mb: xent(apply(mb["x"]), mb), K))
    msg = (
        r"state\.opt_state was made for another optimizer or other params: it holds the Optax "
        r"states \(EmptyState, EmptyState\) but state\.tx\.init\(state\.params\) has "
        r"\(ScaleByAdamState, EmptyState\);.*"
        r"state\.replace\(tx=tx, opt_state=tx\.init\(state\.params\)\)"
    )
    with pytest.raises(ValueError, match=msg):
        update(state, digits_batch(N))
    tx = optax.adam(1e-3)
    new, _ = update(state.replace(tx=tx, opt_state=tx.init(state.params)), digits_batch(N))
    assert int(new.step) == 1


def test_nnx_optimizer_built_for_another_model():
    model = nnx.Linear(64, 10, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(nnx.Linear(64, 5, rngs=nnx.Rngs(0)), optax.adam(1e-3), wrt=nnx.Param)
    step = jf.nnx_train_step(lambda m, mb: xent(m(mb["x"]), mb), K)
    msg = (
        r"optimizer\.opt_state was made for params of other shapes than optimizer\.tx\.init"
        r"\(params\): optimizer\.opt_state\[0\]\.mu\['bias'\] has shape \(5,\), not "
        r"\(10,\);.*build the optimizer for this model and the variables it trains: "
        r"nnx\.Optimizer\(model, tx, wrt=nnx\.Param\)\."
    )
    with pytest.raises(ValueError, match=msg):
        step(model, optimizer, digits_batch(N))


# 3: loss_fn's output must fit has_aux, and its loss must be a scalar.
@pytest.mark.parametrize("front", FRONT_ENDS)
def test_has_aux_with_a_loss_alone(front):
    msg = (
        r"loss_fn must return a pair \(loss, aux\) when has_aux=True, but it returned a "
        r"float32 array of shape \(\); return \(loss, aux\), or build the step with "
        r"has_aux=False"
    )
    with pytest.raises(TypeError, match=msg):
        run_step(front, xent, has_aux=True)


@pytest.mark.parametrize("front", FRONT_ENDS)
def test_a_pair_without_has_aux(front):
    msg = (
        r"loss_fn returned a tuple of 2 item\(s\), but with has_aux=False it must return the "
        r"scalar loss alone; to return \(loss, aux\), build the step with has_aux=True\."
    )
    with pytest.raises(TypeError, match=msg):
        run_step(front, lambda logits, mb: (xent(logits, mb), {"logits": logits}))


@pytest.mark.parametrize("front", FRONT_ENDS)
def test_per_example_loss_is_not_a_scalar(front):
    def per_example(logits: jax.Array, mb: Any) -> Any:
        return optax.softmax_cross_entropy_with_integer_labels(logits, mb["y"]), {}

    msg = (
        r"loss_fn's loss \(the first item of \(loss, aux\)\) must be a scalar, got a float32 "
        r"array of shape \(16,\); return the mean over the micro-batch's examples"
    )
    with pytest.raises(TypeError, match=msg):
        run_step(front, per_example, has_aux=True)


# 4: init keeps the caller's arrays, so a donated step deletes them; a copy keeps them.
def test_donated_step_deletes_the_arrays_given_to_init_unless_copied():
    step = jaxaccum.train_step(mean_loss, optax.adam(1e-3), K)
    update = jax.jit(step.update, donate_argnums=0)

    params = init_params()
    update(step.init(params), digits_batch(N))
    assert all(x.is_deleted() for x in jax.tree.leaves(params))

    params = init_params()
    update(step.init(jax.tree.map(jnp.copy, params)), digits_batch(N))
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))
    assert jnp.isfinite(mean_loss(params, digits_batch(N)))


def test_donated_linen_step_deletes_the_variables_unless_copied():
    update = jax.jit(jf.train_step(lambda apply, mb: xent(apply(mb["x"]), mb), K), donate_argnums=0)

    variables = init_params()
    update(jf.TrainState.from_variables(MLP().apply, variables, optax.sgd(0.1)), digits_batch(N))
    assert all(x.is_deleted() for x in jax.tree.leaves(variables))

    variables = init_params()
    copied = jax.tree.map(jnp.copy, variables)
    update(jf.TrainState.from_variables(MLP().apply, copied, optax.sgd(0.1)), digits_batch(N))
    assert not any(x.is_deleted() for x in jax.tree.leaves(variables))


# 5: argument positions past step_fn's parameters fail at construction, naming the option.
def loss(params: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    return jnp.mean(batch["x"] @ params)


GRAD = jax.value_and_grad(loss)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"batch_argnums": 2}, "batch_argnums=2"),
        ({"batch_argnums": (1, 3)}, "batch_argnums=3"),
        ({"carry_argnums": 2}, "carry_argnums=2"),
        ({"rng_argnums": 5}, "rng_argnums=5"),
    ],
)
def test_argnums_past_the_signature_fail_at_construction(kwargs, option):
    msg = (
        rf"{option} is out of range: step_fn\(params, batch\) takes positional parameters "
        rf"params at 0, batch at 1; give {option.split('=')[0]} one of these positions, or "
        rf"name a keyword parameter with {option.split('_')[0]}_argnames=\."
    )
    with pytest.raises(ValueError, match=msg):
        jaxaccum.accumulate(GRAD, 2, **kwargs)


def test_default_batch_position_past_a_one_argument_step_fn():
    msg = (
        r"batch_argnums=1 \(the default\) is out of range: step_fn\(batch\) takes positional "
        r"parameters batch at 0; give batch_argnums one of these positions"
    )
    with pytest.raises(ValueError, match=msg):
        jaxaccum.accumulate(lambda batch: jnp.sum(batch["x"]), 2)


def test_keyword_only_batch_is_named_with_argnames():
    def step(params: jax.Array, *, batch: dict[str, jax.Array]) -> jax.Array:
        return loss(params, batch)

    msg = r"step_fn\(params, \*, batch\) takes positional parameters params at 0;.*batch_argnames="
    with pytest.raises(ValueError, match=msg):
        jaxaccum.accumulate(step, 2, batch_argnums=1)
    acc = jaxaccum.accumulate(step, 2, batch_argnames="batch")
    batch = {"x": jnp.arange(12.0).reshape(4, 3)}
    assert jnp.allclose(acc(jnp.ones(3), batch=batch), loss(jnp.ones(3), batch))


def test_star_args_step_fn_is_checked_at_call_time_in_plain_words():
    acc = jaxaccum.accumulate(lambda *args: loss(*args[:2]), 2, batch_argnums=2)
    msg = (
        r"the batch argument at position 2 \(batch_argnums=2\) was not passed \(got 2 "
        r"positional argument\(s\) "
        r"and keywords \[\]\); pass it, or point jaxaccum\.accumulate at it with "
        r"batch_argnums=/batch_argnames=\."
    )
    with pytest.raises(TypeError, match=msg):
        acc(jnp.ones(3), {"x": jnp.ones((4, 3))})
