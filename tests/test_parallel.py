"""``_parallel``: data-parallel options, placements and the ``reduced`` analysis, on one device.

One-device meshes of both kinds run the placements' code paths (a batch placed on a mesh of
one device is split over it like over eight); a named ``jax.vmap`` axis binds an axis name
the way a ``shard_map`` or ``pmap`` does. The 8-device equivalence and communication checks
are ``tests/*_checks.py``, run by ``tests/test_eight_devices.py``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, digits_batch, init_params, mean_loss
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxaccum
from jaxaccum import _parallel
from jaxaccum._args import ArgRef, BoundCall
from jaxaccum._parallel import base, typed


def one_device_mesh(kind: AxisType = AxisType.Explicit, names: tuple[str, ...] = ("data",)) -> Any:
    return jax.make_mesh((1,) * len(names), names, axis_types=(kind,) * len(names))


def grad_fn(k: int = 4, **kwargs: Any) -> Any:
    return jaxaccum.accumulate(jax.value_and_grad(mean_loss), k, **kwargs)


def placed(mesh: Any) -> tuple[Any, Any]:
    params = jax.device_put(init_params(), NamedSharding(mesh, P()))
    return params, jax.device_put(digits_batch(64), NamedSharding(mesh, P("data")))


# --- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"data_axis": ""}, TypeError, "mesh axis name"),
        ({"data_axis": 3}, TypeError, "mesh axis name"),
        ({"data_axis": ("data", "data")}, ValueError, "repeat"),
        ({"mesh": "mesh"}, ValueError, "mesh only applies with data_axis=; pass data_axis="),
        ({"fsdp": "gather_once"}, ValueError, "fsdp only applies with data_axis="),
        ({"in_specs": (P(),)}, ValueError, "in_specs only applies with data_axis="),
        ({"axis_name": "b", "fsdp": "gather_once"}, ValueError, "your shard_map or pmap"),
        ({"data_axis": "data", "axis_name": "data"}, ValueError, "not both"),
        ({"data_axis": "data", "mesh": "mesh"}, TypeError, "jax.sharding.Mesh"),
        ({"data_axis": "data", "fsdp": "zero3"}, ValueError, "fsdp='zero3' is not one of"),
    ],
)
def test_bad_options_fail_when_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        grad_fn(**kwargs)


def test_train_steps_name_their_own_specs_option():
    import optax

    with pytest.raises(ValueError, match="param_specs only applies with data_axis="):
        jaxaccum.train_step(mean_loss, optax.sgd(0.1), 2, param_specs=P())


# --- which placement ---------------------------------------------------------------------


def test_a_mesh_of_each_kind_picks_its_placement():
    roles = {"batch": (ArgRef(1, "batch"),), "carry": (), "rng": ()}
    for kind, cls in ((AxisType.Explicit, _parallel.Typed), (AxisType.Auto, _parallel.Pinned)):
        mesh = one_device_mesh(kind)
        batch = {"x": jax.device_put(jnp.zeros((4, 2)), NamedSharding(mesh, P("data")))}
        call = BoundCall((1.0, batch), {})
        opts = _parallel.options("data", mesh)
        place = _parallel.placement(opts, call, roles, k=2, split="strided", in_axes={"batch": 0})
        assert type(place) is cls
    assert type(_parallel.placement(None, call, roles, k=2, split="strided", in_axes={})) is (
        _parallel.Placement
    )


def test_the_mesh_comes_from_the_arguments_types_without_a_mesh_context():
    params, batch = placed(one_device_mesh())
    expected = jax.jit(jax.value_and_grad(mean_loss))(init_params(), digits_batch(64))
    assert_trees_close(jax.jit(grad_fn(data_axis="data"))(params, batch), expected)


def test_missing_mesh_names_the_fix():
    with pytest.raises(ValueError, match=r"needs a device mesh.*jax\.set_mesh"):
        grad_fn(data_axis="data")(init_params(), digits_batch(64))


def test_unknown_axis_lists_the_mesh_axes():
    fn = grad_fn(data_axis="batch", mesh=one_device_mesh())
    with pytest.raises(ValueError, match=r"\['batch'\] are not axes.*\['data'\]"):
        fn(*placed(one_device_mesh()))


def test_data_axes_of_two_kinds_are_refused():
    mesh = jax.make_mesh((1, 1), ("a", "b"), axis_types=(AxisType.Explicit, AxisType.Auto))
    batch = jax.device_put(digits_batch(64), NamedSharding(mesh, P(("a", "b"))))
    with pytest.raises(ValueError, match="mixes Explicit and Auto mesh axes"):
        grad_fn(data_axis=("a", "b"), mesh=mesh)(init_params(), batch)


def test_a_batch_placed_otherwise_on_explicit_axes_names_the_fix():
    mesh = one_device_mesh()
    params, _ = placed(mesh)
    batch = jax.device_put(digits_batch(64), NamedSharding(mesh, P()))
    with pytest.raises(ValueError, match=r"batch leaf batch\['x'\] is placed as.*device_put"):
        jax.jit(grad_fn(data_axis="data"))(params, batch)


def test_contiguous_split_is_refused_on_explicit_axes_and_left_to_the_compiler_on_auto():
    with pytest.raises(ValueError, match="split='contiguous' cannot split"):
        jax.jit(grad_fn(data_axis="data", split="contiguous"))(*placed(one_device_mesh()))
    auto = one_device_mesh(AxisType.Auto)
    out = jax.jit(grad_fn(data_axis="data", split="contiguous"))(*placed(auto))
    expected = jax.jit(jax.value_and_grad(mean_loss))(init_params(), digits_batch(64))
    assert_trees_close(out, expected)


def test_a_non_array_batch_leaf_gets_the_batch_message():
    fn = grad_fn(data_axis="data", mesh=one_device_mesh())
    batch = {**digits_batch(64), "name": "digits"}
    with pytest.raises(
        TypeError, match=r"leaf batch\['name'\] of the batch is a str, not an array"
    ):
        fn(init_params(), batch)


# --- in_specs ------------------------------------------------------------------------------


def auto_specs(**kwargs: Any) -> Any:
    specs = jax.tree.map(lambda _: P(), init_params())
    specs["params"]["Dense_0"]["kernel"] = kwargs.get("kernel", P())
    return (specs,)


@pytest.mark.parametrize(
    ("in_specs", "match"),
    [
        (
            auto_specs(kernel=P("data", None, None)),
            r"in_specs gives .*3 entries but the leaf has shape",
        ),
        (
            auto_specs(kernel=P("model")),
            r"in_specs gives .*names \['model'\], not axes of the mesh",
        ),
        ((P(), P(), P()), "in_specs has 3 entries"),
        (({"params": P(), "extra": P()},), "in_specs for argument 0 are not a pytree prefix"),
    ],
)
def test_spec_mistakes_name_the_leaf_and_the_fix(in_specs, match):
    fn = grad_fn(data_axis="data", in_specs=in_specs)
    with pytest.raises(ValueError, match=match):
        jax.jit(fn)(*placed(one_device_mesh(AxisType.Auto)))


def test_specs_of_arguments_passed_by_keyword_are_refused():
    fn = grad_fn(data_axis="data", in_specs=(P(),))
    params, batch = placed(one_device_mesh(AxisType.Auto))
    with pytest.raises(ValueError, match="passed by keyword"):
        jax.jit(fn)(params=params, batch=batch)


def test_a_spec_the_devices_do_not_divide_is_refused():
    with pytest.raises(ValueError, match=r"\['kernel'\].*dimension 1 does not split into 3"):
        _parallel._check_spec(P(None, "x"), np.zeros((64, 32)), "p['kernel']", FakeMesh())


class FakeMesh:
    """A mesh's names and sizes only: ``x`` of size 3 (no 3 devices needed)."""

    axis_names = ("data", "x")
    shape: ClassVar[dict[str, int]] = {"data": 1, "x": 3}


def test_specs_on_explicit_axes_must_agree_with_the_types():
    mesh = one_device_mesh()
    fn = grad_fn(data_axis="data", in_specs=auto_specs(kernel=P("data")))
    with pytest.raises(ValueError, match="on Explicit mesh axes the type decides"):
        jax.jit(fn)(*placed(mesh))
    agreeing = grad_fn(data_axis="data", in_specs=auto_specs())
    jax.jit(agreeing)(*placed(mesh))


# --- the reduced analysis ----------------------------------------------------------------


def analysed(fn: Any, *args: Any) -> set[int]:
    closed = jax.make_jaxpr(fn)(*args)
    return typed.reducible(closed.jaxpr, set(range(len(args))))


def test_matmul_operands_can_be_reduced_and_elementwise_operands_cannot():
    w, b, x = jnp.ones((4, 3)), jnp.ones(3), jnp.ones((8, 4))

    def dense(w: Any, b: Any) -> Any:
        return jax.grad(lambda w, b: jnp.sum(jnp.tanh(x @ w.T.T + b)), argnums=(0, 1))(w, b)

    assert analysed(dense, w, b) == {0}


def test_a_scan_over_checkpointed_layers_keeps_its_weights_reducible():
    stacked, x = jnp.ones((3, 4, 4)), jnp.ones((8, 4))

    @jax.checkpoint
    def layer(h: Any, w: Any) -> Any:
        return jnp.tanh(h @ w), None

    def loss(stacked: Any) -> Any:
        return jnp.sum(jax.lax.scan(layer, x, stacked)[0])

    assert analysed(jax.grad(loss), stacked) == {0}


def test_convolutions_carries_and_returned_values_are_not_reducible():
    kernel, images = jnp.ones((3, 3, 1, 2)), jnp.ones((2, 5, 5, 1))

    def conv(kernel: Any) -> Any:
        dn = ("NHWC", "HWIO", "NHWC")
        return jnp.sum(
            jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME", dimension_numbers=dn)
        )

    assert analysed(conv, kernel) == set()
    assert (
        analysed(lambda w: jax.lax.scan(lambda c, _: (c @ w, None), w, None, 2)[0], jnp.eye(2))
        == set()
    )
    assert analysed(lambda w: w, jnp.ones(2)) == set()


# --- placements end to end on one device --------------------------------------------------


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("fsdp", ["per_microbatch", "gather_once"])
def test_data_axis_on_one_device_equals_plain_accumulate(kind, fsdp):
    expected = jax.jit(jax.value_and_grad(mean_loss))(init_params(), digits_batch(64))
    for k in (1, 4):
        out = jax.jit(grad_fn(k, data_axis="data", fsdp=fsdp))(*placed(one_device_mesh(kind)))
        assert_trees_close(out, expected)


def test_explicit_axes_give_the_kernels_reduced_and_reduce_them_after_the_loop():
    """The kernels' gradients leave the step unreduced (its one trace over them shows the
    type) and leave ``accumulate`` plain."""
    seen = []

    def step(params: Any, batch: Any) -> Any:
        value, grads = jax.value_and_grad(mean_loss)(params, batch)
        seen.append(jax.tree.map(lambda g: jax.typeof(g).sharding.spec.unreduced, grads))
        return value, grads

    out = jax.jit(jaxaccum.accumulate(step, 4, data_axis="data"))(*placed(one_device_mesh()))
    kernel = seen[-1]["params"]["Dense_0"]
    assert kernel == {"kernel": frozenset({"data"}), "bias": frozenset()}
    assert all(not jax.typeof(g).sharding.spec.unreduced for g in jax.tree.leaves(out))


def test_times_and_all_finite_take_unreduced_values():
    mesh = one_device_mesh()
    w = jax.device_put(jnp.ones((4, 3)), NamedSharding(mesh, P()))
    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("data")))

    def check(w: Any, x: Any, bad: Any) -> Any:
        r = jax.sharding.reshard(w, NamedSharding(mesh.abstract_mesh, P(reduced={"data"})))
        g = jax.grad(lambda r: jnp.sum(x @ r) * bad)(r)
        return _parallel.all_finite(g), _parallel.times(g, jnp.float32(2.0))

    with jax.set_mesh(mesh):
        ok, doubled = jax.jit(check)(w, x, jnp.float32(1.0))
        nan, _ = jax.jit(check)(w, x, jnp.float32(jnp.nan))
    assert bool(ok) and not bool(nan)
    assert jnp.allclose(jax.sharding.reshard(doubled, NamedSharding(mesh, P())), 16.0)


def test_match_finds_the_outputs_shaped_like_an_argument():
    call = BoundCall(({"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)},), {})
    spec = [P("data"), None]
    out = (jnp.zeros(()), {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}, jnp.zeros((4, 2)))
    found = base.match(out, base.candidates(call, {ArgRef(0, None): spec}))
    # leaves in order: the loss, b, w (dicts sort), then a lone (4, 2) output
    assert found == [None, P("data"), None, None] or found == [None, None, P("data"), None]


def test_without_and_data_dims_read_specs():
    assert base.without(P(("replica", "data"), "model"), ("data",)) == P("replica", "model")
    assert base.without(P("data", None), ("data",)) == P(None, None)
    assert base.data_dims(P(None, ("a", "data")), ("data",)) == [1]


def test_explicit_entry_reads_the_type_of_an_array():
    x = jax.device_put(np.zeros((4, 2)), NamedSharding(one_device_mesh(), P("data")))
    assert base.explicit_entry(x, 0) == "data"
    assert base.explicit_entry(x, 1) is None
    assert base.explicit_entry(jnp.zeros((4, 2)), 0) is None
    auto = jax.device_put(np.zeros(4), NamedSharding(one_device_mesh(AxisType.Auto), P("data")))
    assert base.explicit_entry(auto, 0) is None


# --- axes bound by the caller -----------------------------------------------------------


def test_bound_counts_the_devices_along_the_callers_axes():
    seen = []
    jax.vmap(lambda x: seen.append(_parallel.Bound.of(("d",), ())) or x, axis_name="d")(
        jnp.zeros(3)
    )
    assert seen == [_parallel.Bound(("d",), 3, ())]


def test_an_axis_name_that_is_not_bound_names_the_fix():
    with pytest.raises(ValueError, match=r"axis_name=\('batch',\) is not bound here .*shard_map"):
        grad_fn(axis_name="batch")(init_params(), digits_batch(64))


def test_bound_loops_combine_once_under_a_named_vmap():
    """Three "devices" under a named ``vmap``: the combined mean equals the whole batch's."""
    batch = jax.tree.map(lambda x: x.reshape(3, 16, *x.shape[1:]), digits_batch(48))
    fn = jax.vmap(grad_fn(4, axis_name="d"), in_axes=(None, 0), axis_name="d")
    loss, grads = fn(init_params(), batch)
    expected = jax.value_and_grad(mean_loss)(init_params(), digits_batch(48))
    assert_trees_close((loss[0], jax.tree.map(lambda g: g[0], grads)), expected)
