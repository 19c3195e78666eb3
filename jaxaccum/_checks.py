"""Argument checks shared by every entry point: the transform's options and the train steps'.

Each raises ``ValueError``/``TypeError`` naming the argument, the leaf path where there is one,
and the fix. The train-step checks take each front-end's own names (``state.opt_state`` or
``optimizer.opt_state``), so a message reads in the terms of the call the user wrote.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum import _split

_SHOWN = 5  # mismatched leaves listed before "and N more"


def function(
    value: Any,
    name: str,
    call: str,
    nargs: int | None = None,
    keywords: tuple[str, ...] = (),
    fix: str = "pass the function itself (not its result).",
) -> None:
    """Raises ``TypeError`` at construction unless ``value`` can be called as ``call``.

    Args:
      value: what the user passed.
      name: the argument, e.g. ``"weight_fn"``.
      call: how jaxaccum calls it, e.g. ``"weight_fn(micro_batch)"``.
      nargs: the positional arguments each call passes; checked against the signature
        where one can be read (builtins and some C functions have none).
      keywords: the keyword arguments each call passes besides.
      fix: the sentence that says what to pass instead of a non-callable.
    """
    if not callable(value):
        raise TypeError(f"{name} must be callable as {call}, got {type(value).__name__}; {fix}")
    if nargs is None:
        return
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*range(nargs), **dict.fromkeys(keywords))
    except TypeError as e:
        raise TypeError(
            f"{name} is called as {call}, but its signature {signature} does not take that "
            f"call ({e}); change its parameters to match."
        ) from None


def check_functions(loss_fn: Any, weight_fn: Any, loss_call: str) -> None:
    """Raises at construction unless ``loss_fn`` and ``weight_fn`` take the calls they get.

    Args:
      loss_fn: the loss function given to the train step.
      weight_fn: the weight function given to the train step, or None.
      loss_call: how the step calls ``loss_fn``, e.g. ``"loss_fn(params, batch)"``.
    """
    args = loss_call[loss_call.index("(") + 1 : -1].split(", ")
    keywords = tuple(a.split("=")[0] for a in args if "=" in a)
    fix = "pass the function itself (not its result) as the first argument."
    function(loss_fn, "loss_fn", loss_call, len(args) - len(keywords), keywords, fix=fix)
    if weight_fn is not None:
        function(weight_fn, "weight_fn", "weight_fn(micro_batch)", 1, fix=WEIGHT_FN_FIX)


WEIGHT_FN_FIX = (
    "pass a function returning the micro-batch's number of valid items, e.g. "
    "weight_fn=lambda mb: mb['mask'].sum(), or None to count every example once."
)


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
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not isinstance(leaf, ARRAY_TYPES):
            raise TypeError(
                f"{who} returned {_describe(leaf)} at {where}{jax.tree_util.keystr(path)}; "
                "it must return arrays (a pytree of them) or numbers."
            )
    return tree


def given_arrays(tree: Any, name: str) -> Any:
    """``tree`` if every leaf is an array or a number; else a ``TypeError`` naming the leaf."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not isinstance(leaf, ARRAY_TYPES):
            raise TypeError(
                f"{name} must be a pytree of arrays, but {name}{jax.tree_util.keystr(path)} is "
                f"{_describe(leaf)}."
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


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(
            f"k must be a positive int (the number of micro-batches), got {k!r} of type "
            f"{type(k).__name__}; e.g. k=8. k is static: it fixes the scan length."
        )
    return int(k)


def positive_int(value: Any, name: str, hint: str = "") -> int:
    """``value`` if it is an int >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"{name} must be a positive int, got {value!r} of type {type(value).__name__}"
            + (f"; {hint}" if hint else ".")
        )
    return int(value)


def real_number(value: Any, name: str) -> float:
    """``value`` if it is one finite real number (a Python or NumPy int or float, not a bool)."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    if not number or not np.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}.")
    return float(value)


def flag(value: Any, name: str) -> bool:
    """``value`` if it is a bool: a string such as "no" is not taken as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}.")
    return bool(value)


def check_unroll(unroll: Any) -> int | bool:
    if isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1):
        return unroll
    raise ValueError(f"unroll must be a positive int or a bool, got {unroll!r}.")


def check_accum_dtype(accum_dtype: Any, name: str = "accum_dtype") -> np.dtype | None:
    """A floating dtype, or None (each leaf's own dtype: no widening); ``name`` is the
    argument as the user wrote it."""
    if accum_dtype is None:
        return None
    try:
        dtype = np.dtype(accum_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating dtype such as float32, or None for each leaf's "
            f"own dtype, got {accum_dtype!r}."
        )
    return dtype


RAW_KEY_LENGTHS = {2, 4}  # threefry2x32 / rbg key data, as jax.random.PRNGKey makes them


def check_key(key: Any, label: str) -> None:
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape == ():
            return
    elif dtype == jnp.uint32 and np.ndim(key) == 1:
        if np.shape(key)[0] in RAW_KEY_LENGTHS:
            return
        raise TypeError(
            f"{label} is a uint32 array of shape {np.shape(key)}, which is not a "
            "legacy PRNG key (jax.random.PRNGKey(seed) has shape (2,)); pass "
            "jax.random.key(seed), and split batches of keys "
            "before the call."
        )
    got = f"shape {getattr(key, 'shape', None)} dtype {dtype}" if dtype else type(key).__name__
    raise TypeError(
        f"{label} must be one PRNG key (jax.random.key(seed), or a legacy "
        f"uint32 jax.random.PRNGKey(seed)), got {got}; split batches of keys before the call "
        "or pass the key array as a batch argument instead."
    )


def check_in_axes(in_axes: Any, n_batch: int) -> tuple[int, ...]:
    """One example axis for all batch arguments, or one per batch argument."""
    given = (in_axes,) if isinstance(in_axes, (int, np.integer)) else in_axes
    try:
        axes = tuple(given)
    except TypeError:
        axes = ()
    ok = all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) and a >= 0 for a in axes)
    if not axes or not ok or len(axes) not in (1, n_batch):
        raise ValueError(
            f"in_axes must be a non-negative int (the example axis of every batch argument) "
            f"or one per batch argument ({n_batch}: batch_argnums, then batch_argnames), "
            f"got {in_axes!r}; e.g. in_axes=1 for time-major (T, N, ...) batches."
        )
    return tuple(int(a) for a in axes)


def check_num_real(num_real: Any, k: int) -> Any:
    """None, a concrete count in [0, k], or a traced integer scalar (clipped when run)."""
    if num_real is None:
        return None
    if isinstance(num_real, jax.core.Tracer):
        dtype = num_real.dtype
        if np.shape(num_real) != () or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"num_real_microbatches must be an integer scalar, got shape "
                f"{np.shape(num_real)} dtype {dtype}; e.g. jnp.int32(m)."
            )
        return num_real
    value = np.asarray(num_real)
    if value.shape != () or not np.issubdtype(value.dtype, np.integer) or not 0 <= value <= k:
        raise ValueError(
            f"num_real_microbatches must be an integer in [0, k={k}] (how many of the k "
            f"micro-batches run), got {num_real!r}."
        )
    return int(value)


def check_weight(w: Any) -> Any:
    """``weight_fn``'s value (or its shape and dtype), if it is one real scalar."""
    if isinstance(w, (bool, int, float)):
        return w
    real = hasattr(w, "dtype") and jnp.issubdtype(w.dtype, jnp.number)
    if real and w.shape == () and not jnp.issubdtype(w.dtype, jnp.complexfloating):
        return w
    got = f"shape {w.shape} dtype {w.dtype}" if hasattr(w, "dtype") else f"a {type(w).__name__}"
    error = ValueError if real and not jnp.issubdtype(w.dtype, jnp.complexfloating) else TypeError
    raise error(
        f"weight_fn must return one real scalar per micro-batch (e.g. mask.sum()), got {got}."
    )
