"""Trees: arrays where arrays are expected, params that can be differentiated, what a loss
returns, and one check of a tree against the layout it must keep (``check_layout``).

Leaf paths in messages start with the name the user reaches the tree by, e.g.
``state.opt_state[0].mu['b']``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum import _split

_SHOWN = 5  # mismatched leaves listed before "and N more"


def _describe(x: Any) -> str:
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)} item(s)"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"a {x.dtype} array of shape {tuple(x.shape)}"
    name = type(x).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def split_loss(out: Any, has_aux: bool) -> tuple[Any, Any]:
    """``loss_fn``'s output as ``(loss, aux)``; raises at trace time if it does not fit.

    Args:
      out: what ``loss_fn`` returned for one micro-batch.
      has_aux: whether the step was built with ``has_aux=True``.

    Returns:
      The loss and the auxiliary output (None without ``has_aux``).
    """
    if has_aux:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(
                "loss_fn must return a pair (loss, aux) when has_aux=True, but it returned "
                f"{_describe(out)}; return (loss, aux), or build the step with has_aux=False "
                "if loss_fn returns the loss alone."
            )
        loss, aux = out
    elif isinstance(out, (tuple, list)):
        raise TypeError(
            f"loss_fn returned {_describe(out)}, but with has_aux=False it must return the "
            "scalar loss alone; to return (loss, aux), build the step with has_aux=True."
        )
    else:
        loss, aux = out, None
    if not (hasattr(loss, "shape") or isinstance(loss, (int, float))) or np.shape(loss) != ():
        where = " (the first item of (loss, aux))" if has_aux else ""
        raise TypeError(
            f"loss_fn's loss{where} must be a scalar, got {_describe(loss)}; return the mean "
            "over the micro-batch's examples, e.g. jnp.mean(per_example_losses)."
        )
    if not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        where = " (the first item of (loss, aux))" if has_aux else ""
        raise TypeError(
            f"loss_fn's loss{where} must be a real floating scalar to be differentiated, got "
            f"{_describe(loss)} of dtype {jnp.result_type(loss)}; compute it in floating point, "
            "e.g. jnp.mean(errors.astype(jnp.float32))."
        )
    return loss, aux


def _state_kinds(tree: Any) -> list[str]:
    """The Optax state types in ``tree`` (NamedTuples such as ``ScaleByAdamState``), in order."""

    def is_state(x: Any) -> bool:
        return isinstance(x, tuple) and hasattr(x, "_fields")

    return [type(x).__name__ for x in jax.tree.leaves(tree, is_leaf=is_state) if is_state(x)]


def _short(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _leaf_difference(actual: Any, expected: Any, names: tuple[str, str], root: str) -> str:
    """Which leaf paths only one of two trees has, e.g. ``state.opt_state[0].mu['b']``."""
    where, source = names
    have = [path for path, _ in _split.leaves_with_paths(actual, root)]
    want = [path for path, _ in _split.leaves_with_paths(expected, root)]
    parts = []
    for side, paths, other in ((where, have, want), (source, want, have)):
        only = [path for path in paths if path not in other]
        if only:
            more = f" and {len(only) - _SHOWN} more" if len(only) > _SHOWN else ""
            parts.append(f"only {side} has {', '.join(only[:_SHOWN])}{more}")
    return "; ".join(parts) or "the same leaf paths sit in different containers"


def check_opt_state(
    opt_state: Any, init: Callable[[Any], Any], params: Any, names: tuple[str, str], fix: str
) -> None:
    """Raises at trace time unless ``opt_state`` has the layout ``init(params)`` would give.

    Args:
      opt_state: the optimizer state the step was given.
      init: the optimizer's ``init``.
      params: the params being trained.
      names: how the user reaches ``opt_state`` and ``init(params)``, e.g.
        ``("state.opt_state", "optimizer.init(state.params)")``.
      fix: the sentence that tells how to build a matching state.
    """
    check_layout(opt_state, jax.eval_shape(init, params), names, fix)


class Wording(NamedTuple):
    """How a layout check says what went wrong: ``structure`` when the trees differ,
    ``shapes`` when leaves do (``{source}`` in either is filled in)."""

    structure: str
    shapes: str


STATE_WORDING = Wording(
    "was made for another optimizer or other params",
    "was made for params of other shapes than {source}",
)


def check_layout(
    actual: Any,
    expected: Any,
    names: tuple[str, str],
    fix: str,
    *,
    dtypes: bool = False,
    wording: Wording = STATE_WORDING,
    shape_fix: str | None = None,
    root: str | None = None,
) -> None:
    """Raises ``ValueError`` unless ``actual`` has the tree structure and leaf shapes (and,
    with ``dtypes``, leaf dtypes) of ``expected``.

    The one check of a tree against the layout it must keep: optimizer state against what
    its ``init`` would give (a state made for another optimizer, or for other params, fails
    here instead of deep inside Optax), carried state and Flax collections against what
    the micro-batch received (``lax.scan`` needs a fixed carry).

    Args:
      actual: the tree given (or returned).
      expected: the tree whose layout it must have.
      names: how the user reaches both, e.g. ``("state.opt_state",
        "optimizer.init(state.params)")``; leaf paths start with the first.
      fix: the sentence that says how to mend a different structure.
      dtypes: compare leaf dtypes too.
      wording: what the message says went wrong.
      shape_fix: the sentence for different shapes or dtypes (default ``fix``).
      root: where leaf paths start (default ``names[0]``), e.g. ``state`` in
        ``state['count']``.
    """
    where, source = names
    root = where if root is None else root
    # PyTreeDef comes from jaxlib without annotations that mypy can resolve.
    s_actual: Any = jax.tree.structure(actual)
    s_expected: Any = jax.tree.structure(expected)
    if s_actual != s_expected:
        kinds, want = _state_kinds(actual), _state_kinds(expected)
        if kinds != want:
            differ = (
                f"it holds the Optax states ({', '.join(kinds)}) but {source} has "
                f"({', '.join(want)})"
            )
        else:
            differ = (
                f"it has the structure\n  {_short(str(s_actual))}\nbut {source} has\n  "
                f"{_short(str(s_expected))}\n" + _leaf_difference(actual, expected, names, root)
            )
        raise ValueError(f"{where} {wording.structure.format(source=source)}: {differ}; {fix}")

    def kind(x: Any) -> str:
        return f"{np.shape(x)} {_split.leaf_dtype(x)}" if dtypes else f"{np.shape(x)}"

    changed = [
        f"{path} has {'' if dtypes else 'shape '}{kind(a)}, not {kind(e)}"
        for path, a, e in _split.changed_leaves(actual, expected, root, dtypes=dtypes)
    ]
    if changed:
        more = f"; and {len(changed) - _SHOWN} more" if len(changed) > _SHOWN else ""
        raise ValueError(
            f"{where} {wording.shapes.format(source=source)}: "
            f"{'; '.join(changed[:_SHOWN])}{more}; {shape_fix or fix}"
        )


ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, bool, int, float, complex)


def _non_array(tree: Any) -> tuple[str, Any] | None:
    """The first leaf of ``tree`` that is neither an array nor a number, with its path."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not isinstance(leaf, ARRAY_TYPES):
            return jax.tree_util.keystr(path), leaf
    return None


def returned_arrays(tree: Any, who: str, where: str, *, empty: bool = True) -> Any:
    """``tree`` if every leaf is an array or a number; else a ``TypeError`` naming ``who``.

    Args:
      tree: what a user function returned.
      who: the function, as the user wrote it, e.g. ``"Reduction(init=...)"``.
      where: the root of the leaf paths shown, e.g. ``"output['loss']"``.
      empty: whether a tree without arrays (None, ``()``) is allowed.
    """
    if not empty and not jax.tree.leaves(tree):
        raise TypeError(
            f"{who} returned {tree!r} at {where}, which holds no arrays; it must return the "
            "carry to accumulate into, e.g. jnp.zeros(out.shape, jnp.float32)."
        )
    found = _non_array(tree)
    if found is not None:
        path, leaf = found
        raise TypeError(
            f"{who} returned {_describe(leaf)} at {where}{path}; "
            "it must return arrays (a pytree of them) or numbers."
        )
    return tree


def given_arrays(tree: Any, name: str) -> Any:
    """``tree`` if every leaf is an array or a number; else a ``TypeError`` naming the leaf."""
    found = _non_array(tree)
    if found is not None:
        path, leaf = found
        raise TypeError(
            f"{name} must be a pytree of arrays, but {name}{path} is {_describe(leaf)}."
        )
    return tree


def trainable(tree: Any, name: str) -> Any:
    """``tree`` if every leaf is a floating or complex array (or number): what ``jax.grad``
    differentiates. Otherwise a ``TypeError`` naming the leaf and the fix."""
    given_arrays(tree, name)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} has dtype {dtype}, but the params are "
                "differentiated and gradients need floating (or complex) leaves; cast it, "
                "e.g. .astype(jnp.float32), or keep integer buffers out of the params (in "
                "the batch, or closed over by the loss)."
            )
    return tree


def step_outputs(out: Any) -> Any:
    """``step_fn``'s outputs as arrays; Python numbers and bools become constants."""

    found = _non_array(out)
    if found is not None:
        path, leaf = found
        raise TypeError(
            f"step_fn returned a {type(leaf).__name__} at output{path}; "
            "every output leaf must be an array or a number. Return strings and other "
            "Python objects from a function outside the accumulated step."
        )
    return jax.tree.map(jnp.asarray, out)


def reducible(leaf: Any, path: str) -> None:
    """Raises for an output leaf (its shape and dtype) that no reduction can take."""
    dtype = leaf.dtype
    if dtype == jax.dtypes.float0:
        raise TypeError(
            f"output leaf {path} has dtype float0 (the gradient of an integer or bool input "
            "under allow_int=True), which has no values to reduce; differentiate with "
            "respect to floating leaves only, or drop such leaves from step_fn's outputs."
        )
    if jnp.issubdtype(dtype, jax.dtypes.extended):
        raise TypeError(
            f"output leaf {path} has dtype {dtype}, which jaxaccum cannot reduce; return "
            "jax.random.key_data(...) of it instead."
        )


_CARRY_WORDING = Wording(
    "is not laid out as {source}",
    "changed between micro-batches (lax.scan needs a fixed carry)",
)


def carried_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Raises if the carried state coming out of ``step_fn`` differs in structure or type.

    Both maps go from a carried argument's label to its (abstract) value.
    """
    for label in before:
        check_layout(
            after[label],
            before[label],
            (f"step_fn's new state for {label}", f"the {label} it received"),
            "return (outputs, new_state) where new_state has the structure of the carried "
            "argument(s).",
            dtypes=True,
            wording=_CARRY_WORDING,
            shape_fix="cast the new state back in step_fn, e.g. new.astype(old.dtype).",
            root=label,
        )


def reduction_carry(r: Any, info: Any, path: str, carry: Any) -> None:
    """Raises unless a user-defined reduction's ``update`` keeps its carry's type.

    ``r`` is the ``Reduction``, ``info`` its ``LeafInfo`` (``info.out``: the type of the
    output leaf at ``path``), ``carry`` what its ``init`` made.
    """
    weight = jnp.float32(1) if info.weighted else None
    who = "reduce='s Reduction.update"
    after = jax.eval_shape(
        lambda c, x: returned_arrays(r.update(c, x, jnp.int32(0), weight), who, path),
        carry,
        info.out,
    )
    before = jax.eval_shape(lambda c: c, carry)
    types = lambda t: jax.tree.map(lambda v: (v.shape, v.dtype), t)  # noqa: E731
    s_after: Any = jax.tree.structure(after)  # PyTreeDef: no annotations mypy resolves
    if s_after != jax.tree.structure(before) or types(after) != types(before):
        raise TypeError(
            f"reduction {r.name} at {path}: update returned a carry of type "
            f"{types(after)}, but init made {types(before)}; the carry must keep its "
            "structure, shapes and dtypes (cast in update, e.g. new.astype(old.dtype))."
        )


_MODEL_STATE_WORDING = Wording(
    "is not laid out as {source}", "changed between micro-batches (lax.scan needs a fixed carry)"
)


def returned_model_state(out: Any, before: Any) -> tuple[Any, Any]:
    """``loss_fn``'s ``(output, model_state)`` with ``has_state``, checked to keep the layout
    of the state it was given (``before``)."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(
            "with has_state=True, loss_fn must return (loss, model_state), or "
            f"((loss, aux), model_state) with has_aux, but it returned a {type(out).__name__}; "
            "return the state the model gave back, e.g. `y, model_state = model(x, "
            "model_state)`."
        )
    out, after = out
    check_layout(
        after,
        before,
        ("the model_state loss_fn returned", "state.model_state"),
        "the state threaded through the micro-batches must keep the structure, shapes and "
        "dtypes it was given: return the state the model gave back.",
        dtypes=True,
        wording=_MODEL_STATE_WORDING,
        root="model_state",
    )
    return out, after


_COLLECTION_WORDING = Wording(
    "changed structure during a micro-batch",
    "changed shape or dtype between micro-batches",
)


def collection_layout(name: str, new: Any, old: Any) -> None:
    """Raises if a linen collection changed structure, shape or dtype within one
    micro-batch's call."""
    check_layout(
        new,
        old,
        (f"collection {name!r}", "what it held before"),
        "a collection carried through the micro-batches must keep its layout. For sown "
        "values, overwrite instead of appending: self.sow(..., reduce_fn=lambda a, b: b, "
        "init_fn=lambda: jnp.zeros(shape)), and create the state from model.init(key, x, "
        "mutable=True) so the collection exists from the start.",
        dtypes=True,
        wording=_COLLECTION_WORDING,
        shape_fix="variables that depend on the batch size must be initialised with a "
        "micro-batch: model.init(key, x[: N // k]), and must not grow with the batch.",
        root=name,
    )
