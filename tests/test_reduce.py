"""``_reduce``: the ``Reduction`` protocol, naming reductions and resolving ``reduce=``.

How each built-in record computes is tested in ``test_builtin_reductions.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import pytest

import jaxaccum
from jaxaccum import _reduce
from jaxaccum._reduce import BUILTIN, LeafInfo, Reduce, Reduction

# --- naming reductions --------------------------------------------------------------------


@pytest.mark.parametrize("member", list(Reduce))
def test_as_reduction_takes_members_and_their_strings(member):
    assert _reduce.as_reduction(member) is BUILTIN[member]
    assert _reduce.as_reduction(member.value) is BUILTIN[member]
    assert Reduction.builtin(member.value) is BUILTIN[member]


def test_as_reduction_passes_none_and_custom_reductions_through():
    custom = Reduction(lambda i: 0, lambda a, x, j, w: a, lambda a, i, n, s: a, name="mine")
    assert _reduce.as_reduction(None) is None
    assert _reduce.as_reduction(custom) is custom
    assert repr(custom) == "Reduction(mine)"


@pytest.mark.parametrize("bad", ["median", "MEAN", 3, [], 1.5])
def test_as_reduction_rejects_other_values_listing_the_choices(bad):
    with pytest.raises(ValueError, match=r"unknown reduction .* in reduce=.*'weighted_mean'"):
        _reduce.as_reduction(bad)


def test_builtin_needs_a_name():
    with pytest.raises(ValueError, match=r"Reduction.builtin needs a Reduce member"):
        Reduction.builtin(None)


def test_spec_members_validates_every_leaf_of_a_nested_spec():
    spec = {"a": "sum", "b": [Reduce.MAX, None]}
    assert _reduce.spec_members(spec) == [BUILTIN[Reduce.SUM], BUILTIN[Reduce.MAX], None]
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        _reduce.spec_members({"a": "sum", "b": ["avg"]})


# --- the protocol ---------------------------------------------------------------------------


def test_the_loop_gives_each_phase_what_it_needs():
    """``init(info)``, ``update(carry, value, index, weight)``, ``finalize(carry, info,
    count, weight_sum)``: a record that writes down what it is given."""
    infos = []

    def init(info: LeafInfo) -> jax.Array:
        infos.append(info)
        return jnp.zeros((info.k, 3), jnp.float32)

    def update(carry: jax.Array, value: jax.Array, index: jax.Array, weight: jax.Array) -> Any:
        return carry.at[index].set(jnp.stack([index.astype(jnp.float32), value, weight]))

    def finalize(carry: jax.Array, info: LeafInfo, count: Any, weight_sum: Any) -> jax.Array:
        return jnp.concatenate([carry.ravel(), jnp.stack([jnp.float32(count), weight_sum])])

    recorder = Reduction(init, update, finalize, name="recorder")
    f = jaxaccum.accumulate(
        lambda b: b.sum(), 3, batch_argnums=0, weight_fn=lambda b: b.sum() / 2, reduce=recorder
    )
    got = f(jnp.arange(6.0))  # strided: micro-batch j holds rows j and j + 3
    sums = [3.0, 5.0, 7.0]
    rows = [[j, s, s / 2] for j, s in enumerate(sums)]
    assert got.tolist() == [*(x for row in rows for x in row), 3.0, sum(sums) / 2]
    (info,) = {(i.out.shape, i.out.dtype, i.k, i.split, i.weighted) for i in infos}
    assert info == ((), jnp.float32, 3, "strided", True)


@pytest.mark.parametrize(
    ("field", "old", "call"),
    [
        ("init", lambda out, ctx: 0, r"init\(info\)"),
        ("update", lambda acc, x, ctx: acc, r"update\(carry, value, index, weight\)"),
        ("finalize", lambda acc, ctx: acc, r"finalize\(carry, info, count, weight_sum\)"),
        ("combine", lambda acc, ctx: acc, r"combine\(carry, info, axes, count, weights\)"),
        ("check", lambda out, path, ctx: None, r"check\(info, path\)"),
    ],
)
def test_a_function_with_another_signature_is_refused_naming_its_call(field, old, call):
    fields = {"init": lambda i: 0, "update": lambda a, x, j, w: a, "finalize": lambda a, *_: a}
    with pytest.raises(TypeError, match=rf"Reduction\({field}=...\) is called as {call}"):
        Reduction(**{**fields, field: old})


# --- resolve ------------------------------------------------------------------------------


def shapes(**leaves: Any) -> dict[str, jax.ShapeDtypeStruct]:
    return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in leaves.items()}


def test_resolve_defaults_follow_the_leaf_dtype():
    out = shapes(loss=((), jnp.float32), n=((), jnp.int32), bad=((), jnp.bool_))
    plain = _reduce.resolve(None, out, LeafInfo(None, 2, None, "strided", False))
    assert plain == {
        "loss": BUILTIN[Reduce.MEAN],
        "n": BUILTIN[Reduce.SUM],
        "bad": BUILTIN[Reduce.MAX],
    }
    weighted = _reduce.resolve(None, out, LeafInfo(None, 2, None, "strided", True))
    assert weighted["loss"] is BUILTIN[Reduce.WEIGHTED_MEAN]


def test_resolve_spreads_a_prefix_spec_over_its_subtree():
    out = {
        "grads": shapes(w=((2,), jnp.float32), b=((), jnp.float32)),
        "n": jax.ShapeDtypeStruct((), jnp.int32),
    }
    tree = _reduce.resolve(
        {"grads": "sum", "n": None}, out, LeafInfo(None, 2, None, "strided", False)
    )
    assert tree == {
        "grads": {"w": BUILTIN[Reduce.SUM], "b": BUILTIN[Reduce.SUM]},
        "n": BUILTIN[Reduce.SUM],
    }


LOOP = LeafInfo(None, 2, None, "strided", False)


@pytest.mark.parametrize(
    ("spec", "leaf", "error", "message"),
    [
        (
            "mean",
            ((), jnp.int32),
            TypeError,
            r"Reduce.MEAN needs a floating output, but leaf "
            r"output\['x'\]\['y'\] has dtype int32; use Reduce.SUM",
        ),
        (
            "weighted_mean",
            ((), jnp.float32),
            ValueError,
            r"Reduce.WEIGHTED_MEAN at output "
            r"leaf output\['x'\]\['y'\] needs weights; pass weight_fn=",
        ),
        (
            "concat",
            ((), jnp.float32),
            ValueError,
            r"Reduce.CONCAT needs outputs with a "
            r"leading example axis, but leaf output\['x'\]\['y'\] is a scalar",
        ),
        (
            "max",
            ((2,), jnp.complex64),
            TypeError,
            r"Reduce.MAX is undefined for complex leaf "
            r"output\['x'\]\['y'\]",
        ),
        (
            None,
            ((2,), jax.dtypes.float0),
            TypeError,
            r"output leaf output\['x'\]\['y'\] has "
            r"dtype float0",
        ),
    ],
)
def test_resolve_errors_name_the_leaf_path(spec, leaf, error, message):
    out = {"x": {"y": jax.ShapeDtypeStruct(*leaf)}}
    with pytest.raises(error, match=message):
        _reduce.resolve(spec, out, LOOP)


def test_resolve_refuses_prng_key_outputs():
    out = {"key": jax.eval_shape(lambda: jax.random.key(0))}
    with pytest.raises(TypeError, match=r"output leaf output\['key'\] has dtype key<fry>"):
        _reduce.resolve(None, out, LOOP)


def test_resolve_refuses_a_spec_that_is_no_prefix_of_the_outputs():
    out = shapes(a=((), jnp.float32), b=((), jnp.float32))
    with pytest.raises(ValueError, match=r"reduce= must be a prefix of step_fn's output tree"):
        _reduce.resolve({"a": "sum", "c": "sum"}, out, LOOP)


def test_resolve_runs_a_custom_check_with_the_leaf_path_and_its_type():
    seen = []

    def check(info: LeafInfo, path: str) -> None:
        seen.append((path, info.out.shape, info.k))

    custom = Reduction(lambda i: 0, lambda a, x, j, w: a, lambda a, i, n, s: a, check=check)
    _reduce.resolve({"a": [custom]}, {"a": [jax.ShapeDtypeStruct((3,), jnp.float32)]}, LOOP)
    assert seen == [("output['a'][0]", (3,), 2)]


def test_reduce_members_equal_their_strings():
    assert jaxaccum.Reduce.WEIGHTED_MEAN == "weighted_mean"
    assert [m.value for m in Reduce] == [
        "mean",
        "weighted_mean",
        "sum",
        "max",
        "min",
        "last",
        "stack",
        "concat",
    ]
