"""``_args``: which arguments of a step function are batches, carried state or keys.

Positions and names are paired through the step's signature the way ``jax.jit`` pairs
``static_argnums`` with ``static_argnames``; a call then finds each argument whether it was
passed by position or by keyword. The references are the signatures written out by hand.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import jaxaccum
from jaxaccum import _args
from jaxaccum._args import ArgRef, BoundCall


def step(params, batch, state, key=None, *, scale=1.0):
    return params, batch, state, key, scale


def positional_only(params, batch, /, state):
    return params, batch, state


def star_args(*args, **kwargs):
    return args, kwargs


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (1, int, (1,)),
        ([0, 2], int, (0, 2)),
        ((), int, ()),
        ("batch", str, ("batch",)),
        (("a", "b"), str, ("a", "b")),
    ],
)
def test_as_tuple_normalises_and_remembers_the_option(value, kind, expected):
    got = _args.as_tuple(value, "opt", kind)
    assert tuple(got) == expected
    assert got.name == "opt"


@pytest.mark.parametrize(
    ("value", "kind", "message"),
    [
        (-1, int, r"batch_argnums must hold non-negative ints, got -1"),
        (True, int, r"batch_argnums must hold non-negative ints, got True"),
        ([0, 1.0], int, r"batch_argnums must hold non-negative ints, got 1.0"),
        (["0"], int, r"batch_argnums must hold non-negative ints, got '0'"),
        ("not a name", str, r"batch_argnums must hold argument names \(str\), got 'not a name'"),
        ([1], str, r"batch_argnums must hold argument names \(str\), got 1"),
    ],
)
def test_as_tuple_rejects_items_naming_the_option(value, kind, message):
    with pytest.raises(TypeError, match=message):
        _args.as_tuple(value, "batch_argnums", kind)


# --- pairing positions with names -----------------------------------------------------------


def refs(fn, nums=(), names=()):
    return _args.resolve_refs(fn, _args.as_tuple(nums, "carry_argnums", int), names)


def test_positions_get_the_names_of_their_parameters():
    assert refs(step, (1, 2)) == (ArgRef(1, "batch"), ArgRef(2, "state"))


def test_names_get_the_positions_of_their_parameters():
    assert refs(step, (), ("state", "scale")) == (ArgRef(2, "state"), ArgRef(None, "scale"))


def test_one_argument_given_by_position_and_by_name_is_one_ref():
    assert refs(step, (3,), ("key",)) == (ArgRef(3, "key"),)


def test_positional_only_parameters_have_no_name():
    assert refs(positional_only, (0, 1, 2)) == (
        ArgRef(0, None),
        ArgRef(1, None),
        ArgRef(2, "state"),
    )


def test_star_args_take_any_position_by_number_only():
    assert refs(star_args, (5,), ("x",)) == (ArgRef(5, None), ArgRef(None, "x"))


def test_callables_without_a_signature_are_not_range_checked():
    assert refs(max, (3,)) == (ArgRef(3, None),)


def test_position_past_the_signature_names_the_option_and_the_choices():
    message = (
        r"carry_argnums=4 is out of range: step_fn\(params, batch, state, key=None, \*, "
        r"scale=1.0\) takes positional parameters params at 0, batch at 1, state at 2, key at "
        r"3; give carry_argnums one of these positions, or name a keyword parameter with "
        r"carry_argnames=\."
    )
    with pytest.raises(ValueError, match=message):
        refs(step, (1, 4))


def test_default_batch_position_past_a_step_without_positional_parameters():
    def keyword_only(*, batch):
        return batch

    message = (
        r"batch_argnums=0 \(the default\) is out of range: step_fn\(\*, batch\) takes no "
        r"positional parameters; name a keyword parameter with batch_argnames=\."
    )
    with pytest.raises(ValueError, match=message):
        _args.resolve_refs(keyword_only, (0,), ())  # a plain tuple: the default


def test_annotations_are_left_out_of_the_signature_shown():
    def annotated(params: dict, batch: jnp.ndarray) -> float:
        return 0.0

    with pytest.raises(ValueError, match=r"step_fn\(params, batch\) takes"):
        refs(annotated, (2,))


# --- roles ---------------------------------------------------------------------------------


def test_disjoint_roles_pass():
    _args.check_disjoint(
        {"batch": (ArgRef(1, "batch"),), "carry": (ArgRef(2, "state"),), "rng": ()}
    )


@pytest.mark.parametrize(
    ("carry", "label"),
    [(ArgRef(1, None), "argument 1"), (ArgRef(None, "batch"), "batch")],
)
def test_one_argument_with_two_roles_is_refused(carry, label):
    with pytest.raises(ValueError, match=rf"{label} is marked both as batch and as carry"):
        _args.check_disjoint({"batch": (ArgRef(1, "batch"),), "carry": (carry,)})


def test_refs_describe_themselves_by_name_or_position():
    assert ArgRef(1, "batch").label == "batch"
    assert ArgRef(2, None).label == "argument 2"
    assert ArgRef(1, "batch").describe("batch") == "the batch argument batch (batch_argnums=1)"
    assert ArgRef(None, "x").describe("batch") == "the batch argument x (batch_argnames)"
    assert ArgRef(2, None).describe("carry") == "the carry argument at position 2 (carry_argnums=2)"
    assert ArgRef(2, None).describe("") == "the argument at position 2"


# --- one call --------------------------------------------------------------------------------


def test_a_call_finds_an_argument_by_position_or_by_keyword():
    ref = ArgRef(1, "batch")
    by_position = BoundCall(("p", "b"), {})
    by_keyword = BoundCall(("p",), {"batch": "b"})
    assert by_position.get(ref, "batch") == by_keyword.get(ref, "batch") == "b"
    assert by_position.locate(ref, "batch") == ArgRef(1, None)
    assert by_keyword.locate(ref, "batch") == ArgRef(None, "batch")


def test_replacing_arguments_leaves_the_call_unchanged():
    call = BoundCall(("p", "b"), {"state": "s", "scale": 2.0})
    new = call.with_values({ArgRef(1, "batch"): "b0", ArgRef(2, "state"): "s0"})
    assert (new.args, new.kwargs) == (["p", "b0"], {"state": "s0", "scale": 2.0})
    assert (call.args, call.kwargs) == (["p", "b"], {"state": "s", "scale": 2.0})
    assert call.refs() == [
        ArgRef(0, None),
        ArgRef(1, None),
        ArgRef(None, "state"),
        ArgRef(None, "scale"),
    ]


def test_missing_argument_names_its_role_and_the_options():
    message = (
        r"the carry argument state \(carry_argnums=2\) was not passed \(got 2 positional "
        r"argument\(s\) and "
        r"keywords \['scale'\]\); pass it, or point jaxaccum.accumulate at it with "
        r"carry_argnums=/carry_argnames=\."
    )
    with pytest.raises(TypeError, match=message):
        BoundCall(("p", "b"), {"scale": 1.0}).get(ArgRef(2, "state"), "carry")


# --- through accumulate ----------------------------------------------------------------------


def test_accumulate_binds_batch_and_carry_by_position_or_keyword():
    """Sum of a running counter's increments: the same whichever way arguments are passed."""

    def counter(scale, batch, total):
        return jnp.sum(batch) * scale, total + 1

    x = jnp.arange(8.0)
    f = jaxaccum.accumulate(counter, 4, batch_argnums=1, carry_argnames="total")
    expected = (jnp.sum(x) / 4 * 2.0, 4)
    for args, kwargs in [
        ((2.0, x, 0), {}),
        ((2.0,), {"batch": x, "total": 0}),
        ((), {"scale": 2.0, "batch": x, "total": 0}),
    ]:
        out, total = f(*args, **kwargs)
        assert (float(out), int(total)) == expected
