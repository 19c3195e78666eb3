"""State a step is given: the Optax train step's ``TrainState``, ``multi_steps``'
``MultiStepsState``, Flax linen's ``TrainState`` and variables, NNX's model and optimizer.

The front-ends' classes are passed in (``kind``): this package imports none of them. The
optimizer-state checks take each front-end's own names (``state.opt_state`` or
``optimizer.opt_state``), so a message reads in the terms of the call the user wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from jaxaccum import _equinox
from jaxaccum._checks.arguments import function
from jaxaccum._checks.trees import check_layout, check_opt_state, trainable
from jaxaccum._checks.values import optimizer


def train_state(
    state: Any, kind: type[Any], opt: Any, with_key: bool, has_state: bool
) -> tuple[Any, Any]:
    """The trained part of ``state.params`` and the rest (see ``_equinox.split``); raises
    unless ``state`` is a ``kind`` (the Optax step's ``TrainState``) that fits the step
    built with ``opt``: its params, optimizer state, key and model state."""
    if not isinstance(state, kind):
        raise TypeError(
            "state must be the TrainState that this step's init(params) returned (or a "
            f"later update), got {type(state).__name__}."
        )
    trained, rest = _equinox.split(state.params)
    trainable(trained, "state.params")
    check_opt_state(
        state.opt_state,
        opt.init,
        trained,
        ("state.opt_state", "optimizer.init(state.params)"),
        "create the state with this step's own init, step.init(params), or to switch "
        "optimizers keep the params and start a new optimizer state: "
        "state._replace(opt_state=optimizer.init(state.params)).",
    )
    if with_key and state.key is None:
        raise TypeError("train_step(..., with_key=True) needs a TrainState with a key.")
    model_state_given(state.model_state, has_state, "a TrainState with a model_state")
    return trained, rest


def model_state_given(value: Any, has_state: bool, where: str) -> None:
    """Raises unless a model state is given (``value`` not None) exactly when the step was
    built with ``has_state``; ``where`` says where it is missing from."""
    if has_state and value is None:
        raise TypeError(
            f"train_step(..., has_state=True) needs {where}: the model's mutable state, e.g. "
            "the eqx.nn.State of `model, model_state = eqx.nn.make_with_state(Model)(...)`."
        )
    if not has_state and value is not None:
        raise TypeError(
            "got a model_state, but the step was built without has_state=True; build it with "
            "has_state=True and a loss_fn(params, model_state, batch) that returns "
            "(loss, model_state)."
        )


def multi_steps_state(
    state: Any, kind: type[Any], inner: Any, like_params: Any, source: str, params: Any = None
) -> None:
    """Raises unless ``state`` is a ``kind`` (``MultiStepsState``) for ``inner`` and params
    like ``like_params`` (``source`` names them), and ``params``, where given, have the
    shapes of its accumulator."""
    if isinstance(state, optax.MultiStepsState):
        raise TypeError(
            "got an optax.MultiStepsState (from optax.MultiSteps); jaxaccum's multi_steps "
            "keeps a weighted sum and needs its own state: convert it once with "
            "jaxaccum.MultiStepsState.from_optax(state) (use_grad_mean= as optax was "
            "given), or start from multi_steps(optimizer, k).init(params)."
        )
    if not isinstance(state, kind):
        raise TypeError(
            "state must be the MultiStepsState from multi_steps(optimizer, k).init(params), "
            f"got {type(state).__name__}."
        )
    fix = (
        "initialise the state with the same inner optimizer and params: "
        "multi_steps(optimizer, k).init(params)."
    )
    check_layout(state.acc_grads, like_params, ("state.acc_grads", source), fix)
    if params is not None:
        again = "pass the params the state was initialised with, or init a state for these."
        check_layout(state.acc_grads, params, ("state.acc_grads", "the params"), again)
    check_opt_state(
        state.inner_opt_state,
        inner.init,
        like_params,
        ("state.inner_opt_state", "optimizer.init(params)"),
        fix,
    )


def flush_window(mini_step: Any) -> None:
    """Raises for a concrete ``state.mini_step`` of 0: no partial window to flush."""
    if not isinstance(mini_step, jax.core.Tracer) and int(mini_step) == 0:
        raise ValueError(
            "flush: nothing accumulated since the last update (mini_step=0), so there is no "
            "partial window to apply; flush only after calls that did not close a window, "
            "e.g. `if state.mini_step > 0: flush(...)`."
        )


def flax_variables(apply_fn: Any, variables: Any, tx: Any) -> None:
    """Raises unless ``TrainState.from_variables`` got a model's apply function, the
    collections ``model.init`` returns (``params`` among them) and an Optax ``tx``."""
    function(apply_fn, "apply_fn", "apply_fn(variables, x)", fix="pass model.apply.")
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"variables must be the dict of collections that model.init(key, x) returns, "
            f"got {type(variables).__name__}."
        )
    optimizer(tx, "tx", example=True)
    if "params" not in variables:
        raise ValueError(
            f"variables has no 'params' collection (it has {sorted(variables)}); pass what "
            "model.init(key, x) returned."
        )


def flax_state(state: Any) -> None:
    """Raises unless a linen ``state`` can run the step: a callable model and a matching
    opt_state."""
    if not callable(getattr(state, "apply_fn", None)):
        raise TypeError(
            f"state.apply_fn must be the model's apply function, got "
            f"{type(getattr(state, 'apply_fn', None)).__name__}; build the state with "
            "jaxaccum.flax.TrainState.from_variables(model.apply, model.init(key, x), tx)."
        )
    trainable(state.params, "state.params")
    check_opt_state(
        state.opt_state,
        state.tx.init,
        state.params,
        ("state.opt_state", "state.tx.init(state.params)"),
        "build the state with its optimizer, TrainState.from_variables(model.apply, "
        "variables, tx), or to switch optimizers start a new optimizer state: "
        "state.replace(tx=tx, opt_state=tx.init(state.params)).",
    )


def dynamic_scale(dynamic: Any, kind: type[Any], loss_scale: Any, skips: bool) -> None:
    """Raises unless ``state.dynamic_scale`` is a ``kind`` (Flax's ``DynamicScale``) in a
    step built without ``loss_scale=`` whose non-finite micro-batches skip (``skips``)."""
    if not isinstance(dynamic, kind):
        raise TypeError(
            "state.dynamic_scale must be a flax.training.dynamic_scale.DynamicScale or "
            f"None, got {type(dynamic).__name__}."
        )
    if loss_scale is not None:
        raise ValueError(
            f"the step was built with loss_scale={loss_scale} and the state holds "
            "a Flax DynamicScale in state.dynamic_scale: use one. Build the step without "
            "loss_scale= to let state.dynamic_scale drive the scaling (Flax's rules), or "
            "keep loss_scale= and build the state with dynamic_scale=None."
        )
    if not skips:
        raise ValueError(
            "state.dynamic_scale needs nonfinite='skip': with loss scaling a non-finite "
            "micro-batch is an overflow, so the step is skipped and the scale lowered."
        )


def nnx_init(model: Any, tx: Any, module: type[Any]) -> None:
    """Raises unless the NNX step's ``init(model, tx)`` got a ``module`` (``nnx.Module``) and
    an Optax ``tx``."""
    if not isinstance(model, module):
        raise TypeError(
            f"init(model, tx) needs an nnx.Module as model, got {type(model).__name__}."
        )
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            "init(model, tx) needs an optax.GradientTransformation as tx (e.g. "
            f"optax.adam(1e-3)), got {type(tx).__name__}."
        )


def nnx_objects(model: Any, opt: Any, module: type[Any], optimizer_kind: type[Any]) -> None:
    """Raises unless the NNX step's ``update`` got a ``module`` (``nnx.Module``) and an
    ``optimizer_kind`` (``nnx.Optimizer``)."""
    if not isinstance(model, module):
        raise TypeError(
            f"model must be a flax.nnx.Module, got {type(model).__name__}; call "
            "update(model, optimizer, batch)."
        )
    if not isinstance(opt, optimizer_kind):
        raise TypeError(
            f"optimizer must be a flax.nnx.Optimizer, got {type(opt).__name__}; build "
            "it with nnx.Optimizer(model, optax_transform, wrt=nnx.Param), or step.init(model, "
            "optax_transform)."
        )
