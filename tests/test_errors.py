"""Bad input raises a clear error at trace time, naming the argument, leaf and fix."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxaccum
import jaxaccum.flax as jf
from jaxaccum import optax_compat


def loss(params, batch):
    return jnp.mean(batch["x"] @ params)


GRAD = jax.value_and_grad(loss)
W = jnp.ones(3)


def batch_of(n: int) -> dict[str, jax.Array]:
    return {"x": jnp.ones((n, 3))}


@pytest.mark.parametrize("k", [0, -2, 2.0, True, "4", None])
def test_k_must_be_positive_int(k):
    with pytest.raises(ValueError, match=r"k must be a positive int .*got " + re.escape(repr(k))):
        jaxaccum.accumulate(GRAD, k)


def test_numpy_int_k_is_accepted():
    out = jaxaccum.accumulate(GRAD, np.int64(2))(W, batch_of(4))
    np.testing.assert_allclose(out[0], GRAD(W, batch_of(4))[0])


def test_not_divisible_lists_the_ks_that_work_and_padding():
    msg = (
        r"batch size 10 at leaf batch\['x'\] is not divisible by k=4; "
        r"choose k from \[1, 2, 5, 10\].*jaxaccum.pad_batch.*weight_fn"
    )
    with pytest.raises(ValueError, match=msg):
        jax.jit(jaxaccum.accumulate(GRAD, 4))(W, batch_of(10))


def test_k_larger_than_batch():
    with pytest.raises(ValueError, match=r"k=8 is larger than the batch size 4 at batch\['x'\]"):
        jaxaccum.accumulate(GRAD, 8)(W, batch_of(4))


def test_leaves_with_different_leading_sizes_are_listed():
    bad = {"x": jnp.ones((8, 3)), "y": jnp.ones(6), "z": jnp.ones((8,))}
    msg = r"disagree .*batch\['x'\]: 8, batch\['y'\]: 6, batch\['z'\]: 8"
    with pytest.raises(ValueError, match=msg):
        jaxaccum.accumulate(GRAD, 2)(W, bad)


def test_scalar_leaf_has_no_leading_axis():
    with pytest.raises(ValueError, match=r"leaf batch\['t'\] .* scalar with no leading example"):
        jaxaccum.accumulate(GRAD, 2)(W, {"x": jnp.ones((4, 3)), "t": jnp.float32(1.0)})


def test_empty_batch():
    with pytest.raises(ValueError, match=r"no array leaves \(batch is an empty pytree\)"):
        jaxaccum.accumulate(lambda params, batch: 0.0, 2)(W, {})
    with pytest.raises(ValueError, match=r"empty: its leading axis has size 0 at batch\['x'\]"):
        jaxaccum.accumulate(GRAD, 2)(W, batch_of(0))


def test_non_array_leaf():
    with pytest.raises(TypeError, match=r"leaf batch\['name'\] .* is a str, not an array"):
        jaxaccum.accumulate(GRAD, 2)(W, {"x": jnp.ones((4, 3)), "name": "digits"})


def test_weight_fn_must_return_a_scalar():
    acc = jaxaccum.accumulate(GRAD, 2, weight_fn=lambda mb: mb["x"].sum(axis=0))
    with pytest.raises(ValueError, match=r"weight_fn must return one real scalar .*shape \(3,\)"):
        acc(W, batch_of(4))


def test_carry_changing_structure():
    def step(state, batch):
        return batch["x"].sum(), {"count": state["count"] + 1, "extra": 0.0}

    acc = jaxaccum.accumulate(step, 2, carry_argnums=0)
    with pytest.raises(
        ValueError,
        match=r"(?s)new state for state is not laid out as the state it received.*"
        r"only step_fn's new state for state has state\['extra'\]",
    ):
        acc({"count": jnp.int32(0)}, batch_of(4))


def test_carry_changing_dtype_names_the_leaf():
    def step(state, batch):
        return batch["x"].sum(), {"count": state["count"] + 0.5}

    acc = jaxaccum.accumulate(step, 2, carry_argnums=0)
    msg = r"state\['count'\] has \(\) float32, not \(\) int32; cast .*astype"
    with pytest.raises(ValueError, match=msg):
        jax.jit(acc)({"count": jnp.int32(0)}, batch_of(4))


def test_carry_step_must_return_a_pair():
    acc = jaxaccum.accumulate(lambda s, b: b["x"].sum(), 2, carry_argnums=0)
    with pytest.raises(ValueError, match=r"must return \(outputs, new_state\)"):
        acc(jnp.zeros(()), batch_of(4))


@pytest.mark.parametrize(
    "key", [jnp.float32(1.0), jnp.zeros((2, 2), jnp.uint32), jax.random.split(jax.random.key(0))]
)
def test_rng_argument_must_be_one_prng_key(key):
    acc = jaxaccum.accumulate(lambda key, b: b["x"].sum(), 2, rng_argnums=0)
    with pytest.raises(
        TypeError, match=r"the rng argument key \(rng_argnums=0\) must be one PRNG key"
    ):
        acc(key, batch_of(4))


def test_missing_batch_argument():
    with pytest.raises(TypeError, match=r"batch argument batch \(batch_argnums=1\) was not passed"):
        jaxaccum.accumulate(GRAD, 2)(W)


def test_one_argument_two_roles():
    with pytest.raises(ValueError, match=r"batch is marked both as batch and as carry"):
        jaxaccum.accumulate(GRAD, 2, carry_argnames="batch")


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"split": "random"}, r"split='random' is not one of \('strided', 'contiguous'"),
        ({"unroll": 0}, r"unroll must be a positive int or a bool"),
        ({"accum_dtype": jnp.int32}, r"accum_dtype must be a floating dtype"),
        ({"reduce": "average"}, r"unknown reduction 'average'.*'weighted_mean'"),
        ({"batch_argnums": -1}, r"batch_argnums must hold non-negative ints"),
        ({"batch_argnums": (), "batch_argnames": ()}, r"no batch argument"),
    ],
)
def test_bad_options(kwargs, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        jaxaccum.accumulate(GRAD, 2, **kwargs)


def test_weight_fn_must_be_callable():
    with pytest.raises(TypeError, match=r"weight_fn must be callable"):
        jaxaccum.accumulate(GRAD, 2, weight_fn=3)


def test_reduce_spec_must_fit_the_outputs():
    acc = jaxaccum.accumulate(GRAD, 2, reduce={"loss": "sum"})
    with pytest.raises(ValueError, match=r"reduce= must be a prefix of step_fn's output tree"):
        acc(W, batch_of(4))


def test_mean_of_integer_output_suggests_sum():
    acc = jaxaccum.accumulate(lambda p, b: jnp.int32(1), 2, reduce="mean")
    with pytest.raises(TypeError, match=r"needs a floating output, .*int32; use Reduce.SUM"):
        acc(W, batch_of(4))


def test_weighted_mean_needs_weight_fn():
    acc = jaxaccum.accumulate(GRAD, 2, reduce=jaxaccum.Reduce.WEIGHTED_MEAN)
    with pytest.raises(ValueError, match=r"WEIGHTED_MEAN at output leaf output\[0\] needs weights"):
        acc(W, batch_of(4))


def test_pad_batch_rejects_bad_multiple():
    with pytest.raises(ValueError, match=r"multiple must be a positive int, got 0"):
        jaxaccum.pad_batch(batch_of(4), 0)


# Inputs that were accepted with a wrong result: each is now right, or refused by name.
def test_a_constant_output_comes_back_once_whatever_its_type():
    x = jnp.arange(8.0)
    for constant in (7, 7.0, True, np.int32(7)):
        out = jaxaccum.accumulate(lambda b, c=constant: c, 4, batch_argnums=0)(x)
        assert out == constant and jnp.asarray(out).dtype == jnp.asarray(constant).dtype
    # reduce= named explicitly still does what it says
    assert int(jaxaccum.accumulate(lambda b: 7, 4, batch_argnums=0, reduce="sum")(x)) == 28
    # an output computed from the micro-batch is reduced as before
    assert int(jaxaccum.accumulate(lambda b: jnp.sum(b >= 0), 4, batch_argnums=0)(x)) == 8


def test_complex_params_train_as_optax_trains_them():
    w, b = jnp.array([1 + 2j]), jnp.ones((4, 1))

    def complex_loss(w, b):
        return jnp.mean(jnp.abs(b @ w) ** 2)

    step = jaxaccum.train_step(complex_loss, optax.sgd(0.1), 2)
    state, metrics = step.update(step.init(w), b)
    grads = jax.grad(complex_loss)(w, b)
    updates, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(w))
    np.testing.assert_allclose(state.params, optax.apply_updates(w, updates), rtol=1e-6)
    np.testing.assert_allclose(metrics.grad_norm, optax.tree.norm(grads), rtol=1e-6)
    assert complex(state.params[0]).imag != 2.0  # the imaginary part of the gradient applied


def test_from_optax_keeps_its_own_state_and_refuses_others():
    opt = jaxaccum.multi_steps(optax.sgd(1.0), 4)
    state = opt.init(jnp.zeros(2))
    for _ in range(3):
        _, state = opt.update(jnp.ones(2), state)
    assert jaxaccum.MultiStepsState.from_optax(state) is state
    assert state.acc_grads.tolist() == [3.0, 3.0]
    with pytest.raises(TypeError, match=r"from_optax\(state\) needs the optax.MultiStepsState"):
        jaxaccum.MultiStepsState.from_optax(None)


@pytest.mark.parametrize("weight", [lambda mb: 1j * jax.tree.leaves(mb)[0].sum(), lambda mb: "3"])
def test_weights_must_be_real_numbers(weight):
    with pytest.raises(TypeError, match=r"weight_fn must return one real scalar"):
        jaxaccum.accumulate(lambda mb: mb.sum(), 2, batch_argnums=0, weight_fn=weight)(
            jnp.arange(4.0)
        )
    step = jaxaccum.train_step(loss, optax.sgd(0.1), 2, weight_fn=weight)
    with pytest.raises(TypeError, match=r"weight_fn must return one real scalar"):
        step.update(step.init(W), batch_of(4))


def test_multi_steps_refuses_params_of_other_shapes_than_its_state():
    opt = jaxaccum.multi_steps(optax.sgd(1.0), 2)
    state = opt.init(jnp.zeros(2))
    with pytest.raises(ValueError, match=r"state.acc_grads .* the params.*\(5,\)"):
        opt.update(jnp.ones(2), state, jnp.zeros(5))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_weight_shows_as_nan_and_a_train_step_skips(bad):
    x = jnp.arange(4.0)

    def weight(mb):
        return jnp.where(mb[0] == 0, bad, 1.0)

    out = jaxaccum.accumulate(lambda mb: mb.mean(), 2, batch_argnums=0, weight_fn=weight)(x)
    assert np.isnan(float(out))  # never the other micro-batch's mean alone

    def rows(mb):  # every micro-batch of batch_of(4) gets the bad weight
        return weight(mb["x"][:, 0] - 1)

    step = jaxaccum.train_step(loss, optax.sgd(0.1), 2, weight_fn=rows)
    state, metrics = step.update(step.init(W), batch_of(4))
    assert not bool(metrics.applied) and int(state.skipped) == 1
    dropping = jaxaccum.train_step(loss, optax.sgd(0.1), 2, weight_fn=rows, nonfinite="drop")
    assert float(dropping.update(dropping.init(W), batch_of(4))[1].weight) == 0.0


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: jaxaccum.train_step(
                loss, optax.sgd(0.1), 2, loss_scale=jaxaccum.DynamicLossScale(growth_interval=2.5)
            ),
            r"DynamicLossScale.growth_interval must be a positive int, got 2.5",
        ),
        (
            lambda: jaxaccum.multi_steps(optax.sgd(0.1), 2, runtime_checks="no"),
            r"runtime_checks must be a bool \(True or False\), got 'no'",
        ),
        (
            lambda: jaxaccum.inspect.scale_learning_rate(-0.1, 256, 1024, "linear"),
            r"learning_rate must be a finite number > 0, got -0.1",
        ),
    ]
    + [
        (
            lambda size=size: optax_compat.microbatch(lambda x: x, 0, microbatch_size=size),
            rf"microbatch_size must be a positive int, got {re.escape(repr(size))}",
        )
        for size in (True, 0, -1, "4", np.float64(4.0))
    ],
)
def test_numbers_of_the_wrong_kind_are_refused_by_name(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build()


# --- Refused, and by name: each kind the input sweep of issue reports listed ---------------

SGD = optax.sgd(0.1)
PLAIN = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}


def sq_loss(w, batch):
    return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)


def run_train(step, params=W, batch=PLAIN, **init_kw):
    return step.update(step.init(params, **init_kw), batch)


def run_multi(opt, params=W):
    state = opt.init(params)
    for _ in range(2):
        _, state = opt.update(params, state, params)


CONSTANT_INIT = {
    "update": lambda acc, x, index, weight: acc + x,
    "finalize": lambda acc, info, count, weight_sum: acc,
}


@pytest.mark.parametrize(
    ("build", "match"),
    [
        # Callables, checked at construction.
        (lambda: jaxaccum.accumulate(3, 4), r"step_fn must be callable .* got int"),
        (lambda: jaxaccum.accumulate(None, 4), r"step_fn must be callable .* got NoneType"),
        (
            lambda: jaxaccum.accumulate(GRAD, 2, weight_fn=lambda a, c: 1.0),
            r"weight_fn is called as weight_fn\(batch\), but its signature \(a, c\)",
        ),
        (
            lambda: jaxaccum.Reduction(init=None, **CONSTANT_INIT),
            r"Reduction\(init=...\) must be callable as init\(info\), got NoneType",
        ),
        (
            lambda: jaxaccum.Reduction(init=3, **CONSTANT_INIT),
            r"Reduction\(init=...\) must be callable as init\(info\), got int",
        ),
        (lambda: optax_compat.MultiSteps(None, 2), r"opt must be an optax\.GradientTransformation"),
        (
            lambda: jf.TrainState.from_variables(lambda *a: 0, {"params": {}}, tx="sgd"),
            r"tx must be an optax\.GradientTransformation .* got str",
        ),
        (
            lambda: jf.nnx_train_step(lambda m, b: 0.0, 2).init(
                nnx.Linear(3, 1, rngs=nnx.Rngs(0)), "sgd"
            ),
            r"init\(model, tx\) needs an optax\.GradientTransformation as tx",
        ),
        (
            lambda: jaxaccum.train_step(sq_loss, SGD, 2, with_key=True),
            r"loss_fn is called as loss_fn\(params, batch, key\), but its signature "
            r"\(w, batch\) does not take that call",
        ),
        (
            lambda: jf.train_step(lambda params, apply, batch: 0.0, 2),
            r"loss_fn is called as loss_fn\(apply, micro_batch, params=params\).*multiple "
            r"values for argument 'params'",
        ),
        # Return values, checked where they come back.
        (
            lambda: run_train(
                jaxaccum.train_step(sq_loss, SGD, 2, weight_fn=lambda mb: mb["x"][:, 0] > 0)
            ),
            r"weight_fn must return one real scalar per micro-batch .* got shape \(4,\)",
        ),
        (
            lambda: jaxaccum.accumulate(
                lambda b: b.sum(), 2, batch_argnums=0, weight_fn=lambda mb: "all"
            )(jnp.ones(4)),
            r"weight_fn must return one real scalar per micro-batch .* got a str",
        ),
        (
            lambda: jaxaccum.accumulate(
                lambda b: b.sum(),
                2,
                batch_argnums=0,
                reduce=jaxaccum.Reduction(init=lambda info: "zero", **CONSTANT_INIT),
            )(jnp.ones(4)),
            r"reduce='s Reduction\.init returned a str at output",
        ),
        (
            lambda: jaxaccum.accumulate(
                lambda b: b.sum(),
                2,
                batch_argnums=0,
                reduce=jaxaccum.Reduction(
                    init=lambda info: jnp.zeros(()),
                    update=lambda acc, x, index, weight: acc + x,
                    finalize=lambda acc, info, count, weight_sum: "done",
                ),
            )(jnp.ones(4)),
            r"reduce='s Reduction\.finalize returned a str at output",
        ),
        (
            lambda: run_multi(jaxaccum.multi_steps(SGD, lambda step: "2")),
            r"every_k_schedule must return an integer scalar, got '2'",
        ),
        (
            lambda: run_multi(jaxaccum.multi_steps(SGD, lambda step: None)),
            r"every_k_schedule must return an integer scalar, got None",
        ),
        (
            lambda: run_multi(
                optax_compat.MultiSteps(SGD, 2, should_skip_update_fn=lambda u, s, p: True)
            ),
            r"should_skip_update_fn must return a pair \(skip, skip_state\), got True",
        ),
        (
            lambda: run_train(jaxaccum.train_step(lambda p, b: 3, SGD, 2)),
            r"loss_fn's loss must be a real floating scalar .* dtype int32",
        ),
        # Numbers and options of the wrong kind.
        (
            lambda: jaxaccum.accumulate(GRAD, 2, batch_argnums=1.0),
            r"batch_argnums must be a non-negative int or a tuple of them, got 1\.0",
        ),
        *(
            (
                lambda size=size: optax_compat.microbatch(
                    jax.grad(sq_loss), argnums=1, microbatch_size=size
                ),
                r"microbatch_size must be a positive int",
            )
            for size in (0, "4", np.float64(4.0), -1)
        ),
        (
            lambda: optax_compat.microbatch(jax.grad(sq_loss), argnums=5, microbatch_size=2)(
                W, PLAIN
            ),
            r"argnums=5 is out of range: the call passed 2 positional argument\(s\)",
        ),
        (
            lambda: optax_compat.microbatch(
                jax.grad(sq_loss), argnums=1, microbatch_size=2, in_axes=3
            )(W, PLAIN),
            r"in_axes=3 for argument 1 does not name an axis of its leaf argument 1\['x'\]",
        ),
        (
            lambda: optax_compat.micro_vmap(lambda x: x, microbatch_size=2, in_axes=(0, 0))(
                PLAIN["x"]
            ),
            r"in_axes has 2 entries but the call passed 1 positional argument",
        ),
        (
            lambda: optax_compat.MultiSteps(SGD, 2, accumulator_dtype="banana"),
            r"accumulator_dtype must be a floating dtype .* got 'banana'",
        ),
        (
            lambda: optax_compat.micro_grad(sq_loss, accumulator="sum"),
            r"accumulator must be an optax\.microbatching\.AccumulationType member",
        ),
        (
            lambda: (
                jaxaccum.DynamicLossScale(init_scale="big").__class__
                and jaxaccum.train_step(
                    sq_loss, SGD, 2, loss_scale=jaxaccum.DynamicLossScale(init_scale="big")
                )
            ),
            r"DynamicLossScale\.init_scale must be a finite real number, got 'big'",
        ),
        # State, params and keys.
        (
            lambda: jaxaccum.train_step(sq_loss, SGD, 2).update((W, 0), PLAIN),
            r"state must be the TrainState .* got tuple",
        ),
        (
            lambda: jaxaccum.train_step(sq_loss, SGD, 2).update({"params": W}, PLAIN),
            r"state must be the TrainState .* got dict",
        ),
        (
            lambda: run_train(jaxaccum.train_step(sq_loss, SGD, 2), params=jnp.ones(3, jnp.int32)),
            r"state\.params has dtype int32, but the params are differentiated",
        ),
        (
            lambda: run_train(
                jaxaccum.train_step(sq_loss, SGD, 2), params={"w": W, "on": jnp.array(True)}
            ),
            r"state\.params\['on'\] has dtype bool",
        ),
        (
            lambda: run_train(
                jaxaccum.train_step(lambda p, b, key: sq_loss(p, b), SGD, 2, with_key=True), key=0
            ),
            r"init\(params, key=...\)'s key must be one PRNG key",
        ),
        (
            lambda: run_train(
                jaxaccum.train_step(lambda p, b, key: sq_loss(p, b), SGD, 2, with_key=True),
                key=jax.random.split(jax.random.key(0)),
            ),
            r"init\(params, key=...\)'s key must be one PRNG key .* shape \(2,\)",
        ),
        (
            lambda: jf.train_step(lambda apply, b: 0.0, 2, collections=["batch_stats"]),
            r"collections=",
        ),
        (
            lambda: jf.train_step(lambda apply, b: 0.0, 2, rngs=[3]),
            r"rngs=",
        ),
        (
            lambda: jaxaccum.MultiStepsState.from_optax(None),
            r"from_optax\(state\) needs the optax\.MultiStepsState .* got NoneType",
        ),
        (
            lambda: run_multi(jaxaccum.multi_steps(SGD, 2), params={"w": "weights"}),
            r"params must be a pytree of arrays, but params\['w'\] is a str",
        ),
        (
            lambda: jf.TrainState.from_variables(lambda *a: 0, [("params", {})], SGD),
            r"variables must be the dict of collections that model\.init\(key, x\) returns",
        ),
    ],
)
def test_each_kind_of_malformed_input_is_refused_by_name(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build()


def test_a_batch_argument_left_whole_is_named_when_the_step_fails():
    """``loss(w, x, y)`` with the default ``batch_argnums=1`` splits ``x`` only: the step fails
    inside the loss with a shape error, and a note names ``y`` as the likely cause."""

    def loss3(w, x, y):
        return jnp.mean((x @ w - y) ** 2)

    grad_fn = jaxaccum.accumulate(jax.grad(loss3), 4)
    with pytest.raises(TypeError, match="incompatible shapes") as info:
        grad_fn(W, PLAIN["x"], PLAIN["y"])
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "argument at position 2 has leading size 8, the batch's, but is not split" in notes
    fixed = jaxaccum.accumulate(jax.grad(loss3), 4, batch_argnums=(1, 2))
    np.testing.assert_allclose(
        fixed(W, PLAIN["x"], PLAIN["y"]), jax.grad(loss3)(W, PLAIN["x"], PLAIN["y"]), rtol=1e-6
    )


def test_a_linen_collection_that_changes_layout_is_named_with_its_leaf():
    """The one layout check (``_checks.check_layout``) serves Flax collections too: a value
    sown with Flax's default (appending) reduce grows a tuple within the micro-batch."""
    import flax.linen as nn

    class Sows(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(1)(x)
            self.sow("intermediates", "h", h)
            return h[:, 0]

    model = Sows()
    variables = model.init(jax.random.key(0), PLAIN["x"][:4], mutable=True)
    state = jf.TrainState.from_variables(model.apply, variables, SGD)
    update = jf.train_step(lambda apply, mb: jnp.mean((apply(mb["x"]) - mb["y"]) ** 2), 2)
    match = r"collection 'intermediates' changed structure during a micro-batch: it has the"
    with pytest.raises(ValueError, match=match):
        update(state, PLAIN)
