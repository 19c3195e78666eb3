"""The one convention for options: a string enum whose members equal their values."""

from __future__ import annotations

import enum
from typing import Any, Self


class Option(enum.StrEnum):
    """Base of every option type: pass a member or its string value.

    ``Split.STRIDED == "strided"``, so code written with either form behaves the same, and
    a value that is neither raises a ``ValueError`` naming the parameter and the choices.
    """

    @classmethod
    def parse(cls, value: Any, name: str) -> Self:
        """``value`` as a member of this option, or a ``ValueError`` naming ``name``."""
        try:
            return cls(value)
        except ValueError:
            choices = tuple(member.value for member in cls)
            raise ValueError(
                f"{name}={value!r} is not one of {choices}; pass a jaxaccum {cls.__name__} "
                "member or its string."
            ) from None
