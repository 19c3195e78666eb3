"""Functions and argument options: callables against the calls they get, positions and
names of arguments (``batch_argnums``, ``argnames``) and the roles they give, and the
options that name reductions or collections.

Nothing here imports the rest of jaxaccum: ``_args`` builds on these checks.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


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


def check_functions(
    loss_fn: Any, weight_fn: Any, args: Sequence[str], keywords: Sequence[str] = ()
) -> None:
    """Raises at construction unless ``loss_fn`` and ``weight_fn`` take the calls they get.

    Args:
      loss_fn: the loss function given to the train step.
      weight_fn: the weight function given to the train step, or None.
      args: the names of the positional arguments the step calls ``loss_fn`` with, e.g.
        ``("params", "batch")``.
      keywords: the arguments it passes by keyword, e.g. ``("params",)``.
    """
    shown = ", ".join([*args, *(f"{name}={name}" for name in keywords)])
    fix = "pass the function itself (not its result) as the first argument."
    call = f"loss_fn({shown})"
    function(loss_fn, "loss_fn", call, len(args), tuple(keywords), fix=fix)
    if weight_fn is not None:
        function(weight_fn, "weight_fn", "weight_fn(micro_batch)", 1, fix=WEIGHT_FN_FIX)


WEIGHT_FN_FIX = (
    "pass a function returning the micro-batch's number of valid items, e.g. "
    "weight_fn=lambda mb: mb['mask'].sum(), or None to count every example once."
)


def option_items(value: Any, option: str, kind: type) -> tuple[Any, ...]:
    """The items of an ``int | Sequence[int]`` (or str) option such as ``batch_argnums``:
    non-negative ints, or argument names."""
    if isinstance(value, (int, str)):
        items: tuple[Any, ...] = (value,)
    elif isinstance(value, Sequence):
        items = tuple(value)
    else:
        want = "a non-negative int or a tuple of them" if kind is int else "a str or a tuple of str"
        raise TypeError(f"{option} must be {want}, got {value!r} of type {type(value).__name__}.")
    for item in items:
        if kind is int:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise TypeError(f"{option} must hold non-negative ints, got {item!r}.")
            operator.index(item)
        elif not isinstance(item, str) or not item.isidentifier():
            raise TypeError(f"{option} must hold argument names (str), got {item!r}.")
    return items


def _plain_signature(params: list[inspect.Parameter]) -> inspect.Signature:
    """The signature without annotations, e.g. ``(params, batch, *, scale=1.0)``."""
    return inspect.Signature([p.replace(annotation=inspect.Parameter.empty) for p in params])


def check_in_range(nums: Sequence[int], params: list[inspect.Parameter]) -> None:
    """Raises if a position is past the positional ``params`` (unless there is ``*args``).

    ``nums`` names its option (``nums.name``) where it came from ``_args.as_tuple``; a plain
    tuple is accumulate's default batch position.
    """
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return
    positional = [p.name for p in params if p.kind in _POSITIONAL]
    bad = [num for num in nums if num >= len(positional)]
    if not bad:
        return
    named = getattr(nums, "name", None)
    option = "batch_argnums" if named is None else named
    given = f"{option}={bad[0]}" + ("" if named is not None else " (the default)")
    by_name = f"name a keyword parameter with {option.replace('argnums', 'argnames')}="
    if positional:
        places = ", ".join(f"{n} at {i}" for i, n in enumerate(positional))
        takes = f"positional parameters {places}; give {option} one of these positions, or "
    else:
        takes = "no positional parameters; "
    raise ValueError(
        f"{given} is out of range: step_fn{_plain_signature(params)} takes {takes}{by_name}."
    )


def check_disjoint(roles: Mapping[str, Sequence[Any]]) -> None:
    """Raises if one argument (an ``_args.ArgRef``) is given two roles (say both batch and
    carry)."""
    seen: dict[Any, str] = {}
    for role, refs in roles.items():
        for ref in refs:
            for key in (("num", ref.num), ("name", ref.name)):
                if key[1] is None:
                    continue
                if key in seen:
                    raise ValueError(
                        f"{ref.label} is marked both as {seen[key]} and as {role}; "
                        "each argument can have one role only."
                    )
                seen[key] = role


def check_reduction(r: Any, phases: Sequence[tuple[str, str, int]]) -> None:
    """Raises unless a ``Reduction``'s functions take the calls ``phases`` lists (field, call,
    argument count; ``init``, ``update`` and ``finalize`` required) and its name is a str."""
    for field, call, nargs in phases:
        value = getattr(r, field)
        if value is not None or field in ("init", "update", "finalize"):
            function(value, f"Reduction({field}=...)", call, nargs)
    if not isinstance(r.name, str):
        raise TypeError(f"Reduction(name=...) must be a str, got {r.name!r}.")


def check_aux_reduce(
    aux_reduce: Any,
    has_aux: bool,
    members: Callable[[Any, str], list[Any]],
    weighted_mean: Any,
) -> None:
    """Raises unless ``aux_reduce`` (None, or a ``reduce=`` spec that ``members`` reads) fits
    a step with ``has_aux`` and names no ``weighted_mean`` (the record given)."""
    if aux_reduce is None:
        return
    if not has_aux:
        raise ValueError(
            f"aux_reduce={aux_reduce!r} reduces loss_fn's auxiliary output, but has_aux is "
            "False; pass has_aux=True with a loss_fn that returns (loss, aux)."
        )
    if any(r is weighted_mean for r in members(aux_reduce, "aux_reduce")):
        raise ValueError(
            "aux_reduce names 'weighted_mean', which is already what the step does with "
            "floating aux leaves (weighted like the loss); leave those leaves None."
        )


def collection_options(
    collections: Any, rngs: Any, mode: Any
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The linen step's ``collections=`` as modes by name (each parsed by ``mode``, the
    ``CollectionMode`` option) and ``rngs=`` as a tuple of names, checked."""
    if collections is not None and not isinstance(collections, Mapping):
        raise TypeError(
            "collections must be a mapping from collection name to mode, got "
            f"{collections!r}; e.g. collections={{'intermediates': 'mean'}}."
        )
    if (
        isinstance(rngs, str)
        or not isinstance(rngs, Sequence)
        or not all(isinstance(name, str) for name in rngs)
    ):
        raise TypeError(
            f"rngs must be a sequence of PRNG stream names, got {rngs!r}; e.g. "
            "rngs=('dropout',), or rngs=() for a model that draws no random numbers."
        )
    modes = {
        name: mode.parse(value, f"collections[{name!r}]")
        for name, value in dict(collections or {}).items()
    }
    return modes, tuple(rngs)


_NAMES_NONE = {
    "argnums": "argnums names no argument to differentiate; e.g. argnums=0.",
    "batch_argnums": "batch_argnums names no argument; give the batch arguments' positions.",
    "argnums and argnames": "argnums and argnames name no batch argument; give at least one.",
}


def names_some(items: Sequence[Any], option: str) -> None:
    """Raises unless the option (one of ``optax_compat``'s, a key of ``_NAMES_NONE``) names
    at least one argument."""
    if not items:
        raise ValueError(_NAMES_NONE[option])
