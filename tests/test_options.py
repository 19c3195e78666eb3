"""``_options``: every option is a string enum whose members equal their strings.

Each option parameter takes a member or its plain string; anything else raises a
``ValueError`` naming the parameter and listing the choices.
"""

from __future__ import annotations

import pytest

import jaxaccum
from jaxaccum import _options

OPTIONS = [
    jaxaccum.Split,
    jaxaccum.NonFinite,
    jaxaccum.FSDP,
    jaxaccum.Reduce,
    jaxaccum.inspect.ScalingRule,
]


@pytest.mark.parametrize("option", OPTIONS)
def test_members_equal_their_strings_and_parse_from_either(option):
    assert issubclass(option, _options.Option)
    for member in option:
        assert member == member.value and str(member) == member.value
        assert option.parse(member, "opt") is member
        assert option.parse(member.value, "opt") is member


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("bad", ["nonsense", None, 3, ""])
def test_other_values_name_the_parameter_and_the_choices(option, bad):
    choices = tuple(m.value for m in option)
    message = rf"my_param={bad!r} is not one of {choices!r}".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=message) as info:
        option.parse(bad, "my_param")
    assert f"jaxaccum {option.__name__} member" in str(info.value)
