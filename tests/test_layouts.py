"""``_layouts``: reading and checking how a step's argument leaves lie on the mesh.

Layouts are worked out from partition specs and mesh shapes alone, so an abstract mesh of 8
devices stands in for a real one; placement checks use one real device. The gathers and
reduce-scatters themselves run on 8 devices in ``tests/sharded_checks.py`` and
``tests/mesh_checks.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxaccum import _layouts, _sharding
from jaxaccum._layouts import Sharded

EXPLICIT = AbstractMesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
AUTO = AbstractMesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def one_device_mesh(kind: AxisType) -> jax.sharding.Mesh:
    return jax.make_mesh((1,), ("data",), axis_types=(kind,))


# --- one leaf's layout ---------------------------------------------------------------------


D = ("data",)
RD = ("replica", "data")


@pytest.mark.parametrize(
    ("spec", "axes", "expected"),
    [
        (None, D, None),
        (P(), D, None),
        (P(None, None), D, None),
        (P("data"), D, Sharded(0, D)),
        (P(None, "data"), D, Sharded(1, D)),
        (P(("replica", "data")), RD, Sharded(0, RD)),
        (P("data", "model"), D, Sharded(0, D, P(None, "model"))),
        (P("model", None), RD, Sharded(None, RD, P("model", None))),
    ],
)
def test_leaf_layout_finds_the_dimension_sharded_over_the_data_axes(spec, axes, expected):
    got = _layouts.leaf_layout(spec, axes, "params['w']")
    assert got == expected
    assert (got is not None and got.split) == (expected is not None and expected.dim is not None)


def test_leaf_layout_keeps_the_order_of_the_spec():
    assert _layouts.leaf_layout(P(("b", "a")), ("a", "b"), "w") == Sharded(0, ("b", "a"))


def test_data_axes_over_two_dimensions_are_refused():
    message = (
        r"params\['w'\] is sharded as P\('data', 'replica'\): the data axes "
        r"\('replica', 'data'\) appear in more than one dimension.*e.g. P\('replica', None\)"
    )
    with pytest.raises(ValueError, match=message):
        _layouts.leaf_layout(P("data", "replica"), ("replica", "data"), "params['w']")


def test_data_axes_mixed_with_another_axis_in_one_dimension_are_refused():
    message = (
        r"params\['w'\] is sharded as P\(\('data', 'model'\),\): dimension 0 "
        r"mixes the data axes \('data',\) with other mesh axes"
    )
    with pytest.raises(ValueError, match=message):
        _layouts.leaf_layout(P(("data", "model")), ("data",), "params['w']")


# --- an argument's layouts -----------------------------------------------------------------


def params() -> dict[str, jax.ShapeDtypeStruct]:
    return {
        "w": jax.ShapeDtypeStruct((8, 6), jnp.float32),
        "b": jax.ShapeDtypeStruct((6,), jnp.float32),
    }


def test_given_specs_are_spread_over_each_subtree():
    tree = {"w": np.zeros((8, 6)), "sub": {"a": np.zeros((4, 2)), "b": np.zeros(4)}, "n": 3}
    got = _layouts.arg_layouts(
        tree, {"w": P(None, "model"), "sub": P("data"), "n": None}, ("data",), "params", EXPLICIT
    )
    assert got == {
        "w": Sharded(None, ("data",), P(None, "model")),
        "sub": {"a": Sharded(0, ("data",)), "b": Sharded(0, ("data",))},
        "n": None,
    }


def test_specs_that_are_no_prefix_of_the_argument_are_refused():
    with pytest.raises(ValueError, match=r"the specs given for params are not a pytree prefix"):
        _layouts.arg_layouts(params(), {"w": P("data")}, ("data",), "params", EXPLICIT)


def test_a_spec_longer_than_its_leaf_is_refused():
    message = (
        r"the spec P\('data', None\) given for params\['b'\] has 2 entries but "
        r"the leaf has shape \(6,\); give a spec with at most 1 entries"
    )
    with pytest.raises(ValueError, match=message):
        _layouts.arg_layouts(params(), P("data", None), ("data",), "params", EXPLICIT)


def test_a_dimension_the_data_axes_do_not_divide_is_refused():
    message = (
        r"params\['b'\] has shape \(6,\) and is sharded as P\('data',\), but its "
        r"dimension 0 does not split into 4 devices over \('data',\); pad it to a multiple of 4"
    )
    with pytest.raises(ValueError, match=message):
        _layouts.arg_layouts(params(), P("data"), ("data",), "params", EXPLICIT)


def test_layouts_are_read_from_a_placed_array():
    mesh = one_device_mesh(AxisType.Auto)
    x = jax.device_put(np.zeros((4, 2)), NamedSharding(mesh, P("data")))
    y = jax.device_put(np.zeros(3), NamedSharding(mesh, P()))
    got = _layouts.arg_layouts({"x": x, "y": y, "z": np.zeros(2)}, None, ("data",), "p", mesh)
    assert got == {"x": Sharded(0, ("data",)), "y": None, "z": None}


def test_in_spec_names_only_the_data_axes_dimension():
    assert _layouts.in_spec(None, 3) == P()
    assert _layouts.in_spec(Sharded(None, ("data",), P("model")), 2) == P()
    assert _layouts.in_spec(Sharded(1, ("data",), P("model")), 3) == P(None, "data", None)
    assert _layouts.in_spec(Sharded(0, ("a", "b")), 2) == P(("a", "b"), None)


# --- Explicit axes carried by types --------------------------------------------------------


def test_explicit_in_looks_for_explicit_axes_only():
    assert _layouts.explicit_in(P("data"), EXPLICIT)
    assert _layouts.explicit_in(P(None, ("data", "model")), EXPLICIT)
    assert not _layouts.explicit_in(P(None), EXPLICIT)
    assert not _layouts.explicit_in(P("data"), AUTO)


def test_explicit_entry_reads_the_type_of_an_array():
    mesh = one_device_mesh(AxisType.Explicit)
    x = jax.device_put(np.zeros((4, 2)), NamedSharding(mesh, P("data")))
    assert _layouts.explicit_entry(x, 0) == "data"
    assert _layouts.explicit_entry(x, 1) is None
    assert _layouts.explicit_entry(x, 5) is None
    assert _layouts.explicit_entry(jnp.zeros((4, 2)), 0) is None
    auto = jax.device_put(np.zeros(4), NamedSharding(one_device_mesh(AxisType.Auto), P("data")))
    assert _layouts.explicit_entry(auto, 0) is None


def test_constrain_without_other_axes_returns_the_value():
    x = jnp.arange(3.0)
    assert _layouts.constrain(x, None) is x
    assert _layouts.constrain(x, Sharded(0, ("data",))) is x


def test_gather_without_a_data_axes_dimension_returns_the_value():
    x = jnp.arange(3.0)
    assert _layouts.gather(x, None) is x
    assert _layouts.gather(x, Sharded(None, ("data",), P("model"))) is x


def test_gather_and_scatter_on_one_device_are_the_identity():
    mesh = one_device_mesh(AxisType.Explicit)
    lay = Sharded(0, ("data",))
    x = np.arange(8.0, dtype=np.float32).reshape(4, 2)
    placed = jax.device_put(x, NamedSharding(mesh, P("data")))

    def both(x):
        return _layouts.gather(x, lay), _layouts.scatter(x, lay)

    f = jax.shard_map(both, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    gathered, scattered = f(placed)
    np.testing.assert_array_equal(np.asarray(gathered), x)
    np.testing.assert_array_equal(np.asarray(scattered), x)


# --- gradients of sharded arguments ---------------------------------------------------------


def test_outputs_shaped_like_a_sharded_argument_get_its_layouts():
    p = params()
    lay = {"w": Sharded(0, ("data",)), "b": None}
    out = {"grads": params(), "loss": jax.ShapeDtypeStruct((), jnp.float32)}
    got = _layouts.match_outputs(out, [(p, lay), ({"s": np.zeros(2)}, {"s": None})])
    assert got == {"grads": lay, "loss": None}


def test_an_output_of_other_shapes_is_not_a_gradient():
    lay = {"w": Sharded(0, ("data",)), "b": None}
    other = {"w": jax.ShapeDtypeStruct((8, 5), jnp.float32), "b": params()["b"]}
    got = _layouts.match_outputs({"grads": other}, [(params(), lay)])
    assert got == {"grads": {"w": None, "b": None}}


# --- batch placement ------------------------------------------------------------------------


def data_parallel(mesh) -> _sharding.DataParallel:
    dp = _sharding.data_parallel("data", mesh)
    assert dp is not None
    return dp


def test_a_batch_on_one_device_is_refused_for_a_mesh_of_many():
    mesh = AbstractMesh((8,), ("data",), axis_types=(AxisType.Auto,))
    message = (
        r"batch leaf batch\['x'\] sits on one device, but data_axis=\('data',\) splits it over "
        r"8 devices; place it on the mesh first"
    )
    with pytest.raises(ValueError, match=message):
        _layouts.check_batch_placed({"batch": {"x": jnp.zeros(8)}}, data_parallel(mesh), mesh)


def test_a_batch_placed_over_the_data_axis_passes():
    mesh = one_device_mesh(AxisType.Explicit)
    x = jax.device_put(np.zeros((4, 2)), NamedSharding(mesh, P("data")))
    _layouts.check_batch_placed({"batch": {"x": x}}, data_parallel(mesh), mesh)
    t = jax.device_put(np.zeros((3, 4)), NamedSharding(mesh, P(None, "data")))
    _layouts.check_batch_placed({"seq": t}, data_parallel(mesh), mesh, axes={"seq": 1})
    _layouts.check_batch_placed({"pre": t}, data_parallel(mesh), mesh, presplit=True)


def test_a_batch_placed_otherwise_on_explicit_axes_names_the_fix():
    mesh = one_device_mesh(AxisType.Explicit)
    x = jax.device_put(np.zeros((4, 2)), NamedSharding(mesh, P(None, "data")))
    message = (
        r"batch leaf batch\['x'\] is placed as P\(None, 'data'\), but "
        r"data_axis=\('data',\) needs its example axis \(axis 0\) sharded over \('data',\): "
        r"jax.device_put\(batch, NamedSharding\(mesh, P\('data'\)\)\)"
    )
    with pytest.raises(ValueError, match=message):
        _layouts.check_batch_placed({"batch": {"x": x}}, data_parallel(mesh), mesh)
