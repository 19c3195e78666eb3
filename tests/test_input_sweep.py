"""A generated sweep of malformed inputs over every public entry point.

Each entry point is run once with valid arguments, then with one option (found from its
signature, so a new option joins the sweep the day it is added) or one call argument
replaced by a value of a wrong kind. Whatever jaxaccum does with it must be one of:

- accept it (some odd values are valid: ``unroll=True``, ``k=2.0`` is not, ...), or
- raise ``TypeError``/``ValueError`` whose message names the argument, so the user can tell
  which of several arguments to fix.

Any other exception (``AttributeError``, ``IndexError``, ``ZeroDivisionError``, JAX's or
Optax's own errors from deep inside) or a message that does not name the argument fails the
sweep, unless it was raised by the user's own function that jaxaccum called with what it was
given (a loss indexing a batch of the wrong kind). Hypothesis draws the (argument, value)
pairs; the draws are derandomized so that a CI run is repeatable.
"""

from __future__ import annotations

import dataclasses
import inspect
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxaccum
import jaxaccum.flax as jf
from jaxaccum import optax_compat

K = 2
W = jnp.ones(3)
BATCH = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}

# Values of the wrong kind for almost any argument: numbers of other types and ranges,
# strings, containers, callables with the wrong signature or results, arrays.
BAD_VALUES: tuple[Any, ...] = (
    "banana",
    -1,
    0,
    1.5,
    2.5,
    True,
    np.float64(4.0),
    float("nan"),
    1j,
    None,
    (),
    [3],
    {"a": 1},
    object(),
    lambda: 0,
    lambda *a: "s",
    lambda *a: None,
    jnp.ones(3),
    jnp.ones((2, 2), jnp.int32),
)


def loss(w: Any, batch: Any, key: Any = None) -> Any:
    return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)


def _accumulate(**kw: Any) -> Any:
    step_fn = kw.pop("step_fn", jax.value_and_grad(loss))
    return jaxaccum.accumulate(step_fn, kw.pop("k", K), **kw)(W, BATCH)


def _train_step(**kw: Any) -> Any:
    loss_fn, optimizer = kw.pop("loss_fn", loss), kw.pop("optimizer", optax.sgd(0.1))
    step = jaxaccum.train_step(loss_fn, optimizer, kw.pop("k", K), **kw)
    return step.update(step.init(W, key=jax.random.key(0)), BATCH)


def _two_calls(opt: Any) -> Any:
    """Two accumulating calls of a MultiSteps-like transformation on ``W``."""
    state = opt.init(W)
    for _ in range(2):
        _, state = opt.update(W, state, W)
    return state


def _multi_steps(**kw: Any) -> Any:
    opt = jaxaccum.multi_steps(
        kw.pop("optimizer", optax.sgd(0.1)), kw.pop("every_k_schedule", K), **kw
    )
    return _two_calls(opt)


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.Dense(1)(x)[:, 0]


def _linen_step(**kw: Any) -> Any:
    model = Linear()
    state = jf.TrainState.from_variables(
        model.apply, model.init(jax.random.key(0), BATCH["x"]), optax.sgd(0.1)
    )

    def linen_loss(apply: Any, mb: Any) -> Any:
        return jnp.mean((apply(mb["x"]) - mb["y"]) ** 2)

    update = jf.train_step(kw.pop("loss_fn", linen_loss), kw.pop("k", K), **kw)
    return update(state, BATCH)


def _nnx_step(**kw: Any) -> Any:
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    def nnx_loss(m: Any, mb: Any) -> Any:
        return jnp.mean((m(mb["x"])[:, 0] - mb["y"]) ** 2)

    update = jf.nnx_train_step(kw.pop("loss_fn", nnx_loss), kw.pop("k", K), **kw)
    return update(model, optimizer, BATCH)


def _microbatch(**kw: Any) -> Any:
    fun = kw.pop("fun", jax.grad(loss))
    run = optax_compat.microbatch(fun, kw.pop("argnums", 1), kw.pop("microbatch_size", 4), **kw)
    return run(W, BATCH)


def _micro_vmap(**kw: Any) -> Any:
    fun = kw.pop("fun", lambda x: x.sum())
    return optax_compat.micro_vmap(fun, **{"microbatch_size": 4, **kw})(BATCH["x"])


def _micro_grad(**kw: Any) -> Any:
    fun = kw.pop("fun", loss)
    return optax_compat.micro_grad(fun, **{"microbatch_size": 4, **kw})(W, BATCH)


def _optax_multisteps(**kw: Any) -> Any:
    opt = optax_compat.MultiSteps(
        kw.pop("opt", optax.sgd(0.1)), kw.pop("every_k_schedule", K), **kw
    )
    return _two_calls(opt)


def _reduction(**kw: Any) -> Any:
    fields = {
        "init": lambda info: jnp.zeros(info.out.shape, jnp.float32),
        "update": lambda acc, x, index, weight: acc + x,
        "finalize": lambda acc, info, count, weight_sum: acc,
        **kw,
    }
    reduce = jaxaccum.Reduction(**fields)
    return jaxaccum.accumulate(lambda b: b["x"].sum(), K, batch_argnums=0, reduce=reduce)(BATCH)


def _loss_scale(**kw: Any) -> Any:
    step = jaxaccum.train_step(loss, optax.sgd(0.1), K, loss_scale=jaxaccum.DynamicLossScale(**kw))
    return step.update(step.init(W), BATCH)


def _pad_batch(**kw: Any) -> Any:
    return jaxaccum.pad_batch(kw.pop("batch", BATCH), kw.pop("multiple", 3))


def _scale_learning_rate(**kw: Any) -> Any:
    args = {"learning_rate": 0.1, "base_batch": 8, "new_batch": 32, "rule": "linear", **kw}
    return jaxaccum.inspect.scale_learning_rate(**args)


def _accumulation_steps(**kw: Any) -> Any:
    args = {"target_batch": 32, "per_device_batch": 8, "num_devices": 1, **kw}
    return jaxaccum.inspect.accumulation_steps(**args)


def _train_call(**kw: Any) -> Any:
    step = jaxaccum.train_step(loss, optax.sgd(0.1), K, with_key=True)
    state = step.init(kw.get("params", W), key=kw.get("key", jax.random.key(0)))
    return step.update(kw.get("state", state), kw.get("batch", BATCH))


def _multi_steps_call(**kw: Any) -> Any:
    opt = jaxaccum.multi_steps(optax.sgd(0.1), K)
    state = opt.init(kw.get("params", W))
    return opt.update(kw.get("updates", W), kw.get("state", state), kw.get("params", W))


def _linen_call(**kw: Any) -> Any:
    model = Linear()
    variables = model.init(jax.random.key(0), BATCH["x"])
    state = jf.TrainState.from_variables(
        model.apply, kw.get("variables", variables), optax.sgd(0.1)
    )

    def linen_loss(apply: Any, mb: Any) -> Any:
        return jnp.mean((apply(mb["x"]) - mb["y"]) ** 2)

    return jf.train_step(linen_loss, K)(kw.get("state", state), kw.get("batch", BATCH))


def _nnx_call(**kw: Any) -> Any:
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    def nnx_loss(m: Any, mb: Any) -> Any:
        return jnp.mean((m(mb["x"])[:, 0] - mb["y"]) ** 2)

    update = jf.nnx_train_step(nnx_loss, K)
    return update(kw.get("model", model), kw.get("optimizer", optimizer), kw.get("batch", BATCH))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One public entry point: how to run it with some arguments replaced."""

    name: str
    fn: Callable[..., Any] | None  # whose signature lists the options
    run: Callable[..., Any]
    skip: tuple[str, ...] = ()  # options that take any value by design, with the reason below
    names: tuple[str, ...] = ()  # the call's arguments, for entries without a signature

    def options(self) -> list[str]:
        if self.fn is None:
            return list(self.names)
        params = inspect.signature(self.fn).parameters.values()
        kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        return [p.name for p in params if p.kind not in kinds and p.name not in self.skip]


ENTRIES = (
    Entry("accumulate", jaxaccum.accumulate, _accumulate),
    Entry("train_step", jaxaccum.train_step, _train_step),
    Entry("multi_steps", jaxaccum.multi_steps, _multi_steps),
    # rngs names the state's key streams: any sequence of strings is a valid choice.
    Entry("flax.train_step", jf.train_step, _linen_step),
    Entry("flax.nnx_train_step", jf.nnx_train_step, _nnx_step),
    Entry("optax_compat.microbatch", optax_compat.microbatch, _microbatch),
    # vmap_fn is any function with jax.vmap's signature; out_axes other than 0 is refused.
    Entry("optax_compat.micro_vmap", optax_compat.micro_vmap, _micro_vmap, skip=("vmap_fn",)),
    # transform_fn and metrics_fn are any functions of a gradient (their results are data).
    Entry(
        "optax_compat.micro_grad",
        optax_compat.micro_grad,
        _micro_grad,
        skip=("transform_fn", "metrics_fn"),
    ),
    Entry("optax_compat.MultiSteps", optax_compat.MultiSteps, _optax_multisteps),
    Entry("Reduction", jaxaccum.Reduction, _reduction),
    Entry("DynamicLossScale", jaxaccum.DynamicLossScale, _loss_scale),
    Entry("pad_batch", jaxaccum.pad_batch, _pad_batch),
    Entry(
        "inspect.scale_learning_rate", jaxaccum.inspect.scale_learning_rate, _scale_learning_rate
    ),
    Entry("inspect.accumulation_steps", jaxaccum.inspect.accumulation_steps, _accumulation_steps),
    # The calls of the built steps: state, params, keys and batches of the wrong kind.
    Entry("train_step calls", None, _train_call, names=("params", "key", "state", "batch")),
    Entry("multi_steps calls", None, _multi_steps_call, names=("params", "updates", "state")),
    Entry("flax.train_step calls", None, _linen_call, names=("variables", "state", "batch")),
    Entry("flax.nnx_train_step calls", None, _nnx_call, names=("model", "optimizer", "batch")),
)


# A position option that is valid in itself and points at an argument whose data does not
# fit: the message names that argument's leaf (``batch_argnums=0`` makes ``w`` a batch).
ALSO_NAMED = {("accumulate", "batch_argnums"): "at leaf w"}


def raised_in_user_code(error: BaseException) -> bool:
    """Whether ``error`` came from a function of this file that jaxaccum called (a loss that
    indexes a batch of the wrong kind fails in the user's code, which is the user's to
    read), rather than from jaxaccum's own code."""
    ours = [
        frame.filename
        for frame in traceback.extract_tb(error.__traceback__)
        if frame.filename == __file__ or "/jaxaccum/" in frame.filename
    ]
    return "/jaxaccum/" in "".join(ours) and ours[-1] == __file__


def outcome(entry: Entry, option: str, value: Any) -> str | None:
    """None if jaxaccum accepted ``value`` or refused it by name; else what went wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entry.run(**{option: value})
    except (TypeError, ValueError, NotImplementedError) as e:
        if option in str(e) or ALSO_NAMED.get((entry.name, option), "\0") in str(e):
            return None
        if raised_in_user_code(e):
            return None
        return f"{type(e).__name__} not naming {option}: {e}"
    except Exception as e:  # the sweep is after exactly these
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_the_valid_call_of_each_entry_runs(entry):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry.run()


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_a_malformed_argument_is_refused_by_name(entry, data):
    option = data.draw(st.sampled_from(entry.options()), label="argument")
    value = data.draw(st.sampled_from(BAD_VALUES), label="value")
    problem = outcome(entry, option, value)
    assert problem is None, f"{entry.name}({option}={value!r}): {problem}"
