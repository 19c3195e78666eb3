"""Which arguments of a step function are batches, carried state or PRNG keys."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from jaxaccum import _checks

# The roles' check, reached here too (tests/test_args.py); it lives with the other checks.
from jaxaccum._checks.arguments import check_disjoint as check_disjoint

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@dataclasses.dataclass(frozen=True)
class ArgRef:
    """One argument of the step function, addressable by position, by name or both."""

    num: int | None
    name: str | None

    @property
    def label(self) -> str:
        """The argument's name, e.g. ``batch`` or ``argument 1``; leaf paths start with it."""
        return self.name if self.name is not None else f"argument {self.num}"

    def describe(self, role: str) -> str:
        """The argument in a sentence: ``the batch argument x`` or ``... at position 2``,
        with the option that gave it its role: ``the rng argument key (rng_argnums=0)``."""
        where = self.name if self.name is not None else f"at position {self.num}"
        if not role:
            return f"the argument {where}"
        option = f"{role}_argnums={self.num}" if self.num is not None else f"{role}_argnames"
        return f"the {role} argument {where} ({option})"


class NamedItems(tuple[Any, ...]):
    """The items of one option, such as ``batch_argnums``, and the option's name."""

    name: str

    def __new__(cls, items: Sequence[Any], name: str) -> NamedItems:
        option = super().__new__(cls, items)
        option.name = name
        return option


def as_tuple(value: Any, option: str, kind: type) -> tuple[Any, ...]:
    """Normalises an ``int | Sequence[int]`` (or str) option to a tuple, checking types.

    The result is a :class:`NamedItems`, so later checks can name the option it came from.
    """
    return NamedItems(_checks.option_items(value, option, kind), option)


def resolve_refs(
    fn: Callable[..., Any], nums: Sequence[int], names: Sequence[str]
) -> tuple[ArgRef, ...]:
    """Pairs positions with names using ``fn``'s signature where it has one (like jax.jit).

    Raises:
      ValueError: if ``fn`` has a signature without ``*args`` and a position in ``nums``
        is past its positional parameters.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    else:
        _checks.check_in_range(nums, params)
    positional = [p for p in params if p.kind in _POSITIONAL]
    refs: list[ArgRef] = []
    for num in nums:
        param = positional[num] if num < len(positional) else None
        name = param.name if param is not None and param.kind in _KEYWORD else None
        refs.append(ArgRef(num, name))
    for name in names:
        if any(ref.name == name for ref in refs):
            continue
        index = next((i for i, p in enumerate(positional) if p.name == name), None)
        refs.append(ArgRef(index, name))
    return tuple(refs)


class BoundCall:
    """The positional and keyword arguments of one call, readable and replaceable by ref."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.args = list(args)
        self.kwargs = dict(kwargs)

    def _where(self, ref: ArgRef, role: str) -> tuple[str, Any]:
        if ref.num is not None and ref.num < len(self.args):
            return "args", ref.num
        if ref.name is not None and ref.name in self.kwargs:
            return "kwargs", ref.name
        got = f"{len(self.args)} positional argument(s) and keywords {sorted(self.kwargs)}"
        raise TypeError(
            f"{ref.describe(role)} was not passed (got {got}); pass it, or point "
            f"jaxaccum.accumulate at it with {role}_argnums=/{role}_argnames=."
        )

    def with_values(self, values: dict[ArgRef, Any]) -> BoundCall:
        """A new call with the given arguments swapped for new values."""
        args, kwargs = self.replaced(values)
        return BoundCall(tuple(args), kwargs)

    def refs(self) -> list[ArgRef]:
        """One ref per argument passed: positions first, then keywords."""
        return [ArgRef(i, None) for i in range(len(self.args))] + [
            ArgRef(None, name) for name in self.kwargs
        ]

    def locate(self, ref: ArgRef, role: str) -> ArgRef:
        """The argument ``ref`` points at, as a ref by position or by keyword only."""
        where, key = self._where(ref, role)
        return ArgRef(key, None) if where == "args" else ArgRef(None, key)

    def get(self, ref: ArgRef, role: str) -> Any:
        where, key = self._where(ref, role)
        return self.args[key] if where == "args" else self.kwargs[key]

    def replaced(self, values: dict[ArgRef, Any]) -> tuple[list[Any], dict[str, Any]]:
        """A copy of the call with the given arguments swapped for new values."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for ref, value in values.items():
            where, key = self._where(ref, "")
            if where == "args":
                args[key] = value
            else:
                kwargs[key] = value
        return args, kwargs


def plain_refs(call: BoundCall, roles: dict[str, tuple[ArgRef, ...]]) -> tuple[ArgRef, ...]:
    """The arguments of ``call`` that have no role (neither batch, carried state nor key)."""
    taken = {call.locate(ref, role) for role, refs in roles.items() for ref in refs}
    return tuple(ref for ref in call.refs() if ref not in taken)
