"""``_devices``: one device's loop among many, checked with one device.

A named ``jax.vmap`` axis binds an axis name the way a ``shard_map`` or ``pmap`` does, with
collectives over it, so combining per-device results is checked here against numpy over
the mapped rows. ``jax.shard_map`` over a one-device mesh checks the argument layouts and
the varying marks. The 8-device equivalence checks live in ``tests/sharded_checks.py`` and
``tests/mesh_checks.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ATOL, RTOL
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxaccum import _devices, _reduce, _sharding
from jaxaccum._args import ArgRef, BoundCall
from jaxaccum._layouts import Sharded
from jaxaccum._reduce import BUILTIN, Reduce, ReduceContext, Reduction
from jaxaccum._split import Split

RNG = np.random.default_rng(0)


def one_device_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))


def data_parallel(mesh, **kwargs) -> _sharding.DataParallel:
    dp = _sharding.data_parallel("data", mesh, **kwargs)
    assert dp is not None
    return dp


BATCH, STATE = ArgRef(1, "batch"), ArgRef(2, "state")
ROLES = {"batch": (BATCH,), "carry": (STATE,), "rng": ()}


# --- axes bound by the caller -----------------------------------------------------------------


def test_bound_counts_the_devices_along_the_callers_axes():
    dp = _sharding.DataParallel(("d",), None, bound=True)
    seen = []
    jax.vmap(lambda x: seen.append(_devices.bound(dp)) or x, axis_name="d")(jnp.zeros(3))
    assert seen == [_devices.Local(("d",), 3)]


def test_an_axis_name_that_is_not_bound_names_the_fix():
    dp = _sharding.DataParallel(("batch",), None, bound=True)
    message = (
        r"axis_name=\('batch',\) is not bound here .*; call the step inside the jax.shard_map "
        r"or jax.pmap that binds it, or use data_axis="
    )
    with pytest.raises(ValueError, match=message):
        _devices.bound(dp)


def test_combine_over_devices_matches_numpy_over_the_devices():
    """MEAN carries a running sum: the devices' sums are added, then divided by every
    micro-batch of every device; MAX takes the maximum over devices."""
    sums = RNG.normal(size=(4, 3)).astype(np.float32)  # one row per device
    ctx = ReduceContext(None, 2, None, "strided", False, axes=("d",))

    def per_device(acc):
        mean = _devices.combine(BUILTIN[Reduce.MEAN], acc, ctx, None)
        return mean, _devices.combine(BUILTIN[Reduce.MAX], acc, ctx, None)

    total, top = jax.vmap(per_device, axis_name="d")(sums)
    np.testing.assert_allclose(
        np.asarray(total), np.broadcast_to(sums.sum(0), (4, 3)), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_array_equal(np.asarray(top), np.broadcast_to(sums.max(0), (4, 3)))


def test_aggregate_gathers_every_devices_result():
    results = RNG.normal(size=(4, 3)).astype(np.float32)
    agg = jax.vmap(
        lambda v: _devices.aggregate(BUILTIN[Reduce.MEAN], v, ("d",), "output['x']"),
        axis_name="d",
    )(results)
    np.testing.assert_allclose(
        np.asarray(agg), np.broadcast_to(results.mean(0), (4, 3)), rtol=RTOL, atol=ATOL
    )


def test_a_reduction_without_combine_or_aggregate_is_refused_by_name():
    r = Reduction(lambda o, c: 0, lambda a, x, c: a, lambda a, c: a, name="median")
    message = (
        r"reduction median at output\['m'\] has neither combine nor aggregate, so its "
        r"per-device results cannot be combined over the data axes \('d',\)"
    )
    with pytest.raises(TypeError, match=message):
        _devices.aggregate(r, jnp.zeros(2), ("d",), "output['m']")


def test_a_sharded_gradient_is_scattered_then_summed_over_its_replicas():
    """Hybrid sharding: data over (replica, fsdp), the gradient sharded over fsdp only."""
    g = RNG.normal(size=(2, 3, 6)).astype(np.float32)  # (replica, fsdp, full gradient)
    lay = Sharded(0, ("fsdp",))

    def per_device(x):
        return _devices.replicas(_devices.scatter(x, lay), lay, ("replica", "fsdp"))

    got = jax.vmap(jax.vmap(per_device, axis_name="fsdp"), axis_name="replica")(g)
    total = g.sum((0, 1))  # every device's gradient added once
    for r in range(2):
        for f in range(3):
            np.testing.assert_allclose(
                np.asarray(got[r, f]), total[2 * f : 2 * f + 2], rtol=RTOL, atol=ATOL
            )


def test_shard_shape_divides_the_sharded_dimension_by_the_devices():
    aval = jax.ShapeDtypeStruct((8, 3), jnp.float32)
    assert _devices.shard_shape(aval, None) == aval
    seen = []
    jax.vmap(
        lambda x: seen.append(_devices.shard_shape(aval, Sharded(0, ("d",)))) or x,
        axis_name="d",
    )(jnp.zeros(4))
    assert seen == [jax.ShapeDtypeStruct((2, 3), jnp.float32)]


def test_update_without_a_layout_is_the_reductions_own():
    ctx = ReduceContext(None, 2, None, "strided", False, index=jnp.int32(0))
    acc, x = jnp.ones(3), jnp.arange(3.0)
    np.testing.assert_array_equal(
        np.asarray(_devices.update(BUILTIN[Reduce.SUM], acc, x, ctx, None)), [1.0, 2.0, 3.0]
    )


# --- which arguments are sharded ---------------------------------------------------------------


def test_local_splits_only_with_a_leaf_sharded_over_the_data_axes():
    assert not _devices.Local(("data",), 8).splits()
    rest_only = {ArgRef(0, None): {"w": Sharded(None, ("data",), P("model")), "b": None}}
    assert not _devices.Local(("data",), 8, rest_only).splits()
    fsdp = {ArgRef(0, None): {"w": Sharded(0, ("data",)), "b": None}}
    assert _devices.Local(("data",), 8, fsdp).splits()


def test_arg_layouts_reads_each_non_batch_argument():
    mesh = one_device_mesh()
    w = jax.device_put(np.zeros((4, 2)), NamedSharding(mesh, P("data")))
    call = BoundCall(({"w": w, "b": np.zeros(2)}, np.zeros(4), np.zeros(())), {"scale": 2.0})
    got = _devices.arg_layouts(call, ROLES, data_parallel(mesh), mesh)
    assert got == {
        ArgRef(0, None): {"w": Sharded(0, ("data",)), "b": None},
        ArgRef(None, "scale"): None,
    }


def test_carried_state_sharded_over_the_data_axes_is_refused():
    mesh = one_device_mesh()
    state = jax.device_put(np.zeros(4), NamedSharding(mesh, P("data")))
    call = BoundCall((np.zeros(2), np.zeros(4), state), {})
    message = (
        r"the carry argument (state|at position 2) is sharded over the data axes "
        r"\('data',\), but carried state and keys are replicated over them; replicate it"
    )
    with pytest.raises(ValueError, match=message):
        _devices.arg_layouts(call, ROLES, data_parallel(mesh), mesh)


def test_in_specs_longer_than_the_positional_arguments_are_refused():
    mesh = one_device_mesh()
    dp = data_parallel(mesh, in_specs=(P(), P(), P(), P()))
    call = BoundCall((np.zeros(2), np.zeros(4), np.zeros(())), {})
    with pytest.raises(ValueError, match=r"in_specs has 4 entries but the step got 3 positional"):
        _devices.arg_layouts(call, ROLES, dp, mesh)


def test_in_specs_with_arguments_passed_by_keyword_are_refused():
    mesh = one_device_mesh()
    dp = data_parallel(mesh, in_specs=(P("data"),))
    call = BoundCall((np.zeros(4), np.zeros(4), np.zeros(())), {"scale": 2.0})
    with pytest.raises(ValueError, match=r"in_specs gives specs by position, but \['scale'\]"):
        _devices.arg_layouts(call, ROLES, dp, mesh)


def test_given_in_specs_apply_by_position():
    mesh = one_device_mesh()
    dp = data_parallel(mesh, in_specs=({"w": P("data"), "b": None},))
    call = BoundCall(({"w": np.zeros((4, 2)), "b": np.zeros(2)}, np.zeros(4), np.zeros(())), {})
    got = _devices.arg_layouts(call, ROLES, dp, mesh)
    assert got == {ArgRef(0, None): {"w": Sharded(0, ("data",)), "b": None}}


# --- varying marks ---------------------------------------------------------------------------


def test_plain_arguments_are_marked_varying_and_role_arguments_are_not():
    seen = {}

    def local(params, batch, state):
        call = _devices.varying(BoundCall((params, batch, state), {}), ROLES, ("data",))
        for name, x in zip(("params", "batch", "state"), call.args, strict=True):
            seen[name] = _devices.varying_axes(jax.typeof(x))
        return batch

    auto = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
    jax.shard_map(
        local, mesh=auto, in_specs=(P(), P("data"), P()), out_specs=P("data"), check_vma=True
    )(jnp.zeros(2), jnp.zeros(4), jnp.zeros(()))
    assert seen == {"params": ("data",), "batch": ("data",), "state": ()}
    assert _devices.varying_axes(jax.typeof(jnp.zeros(2))) == ()
    assert _devices.vary(1.5, ("data",)) == 1.5


# --- the loop under shard_map -----------------------------------------------------------------


def test_run_sharded_on_one_device_gives_the_loops_result():
    x = RNG.normal(size=(8, 3)).astype(np.float32)
    roles = {"batch": (ArgRef(0, "x"),), "carry": (), "rng": ()}
    seen = []

    def run(call, local, num_real):
        seen.append((local.axes, local.devices, num_real))
        local.out_layouts = [None]  # the loop says how each result leaf leaves
        return jax.lax.psum(jnp.sum(call.get(ArgRef(0, "x"), "batch"), 0), local.axes)

    mesh = one_device_mesh()
    placed = jax.device_put(x, NamedSharding(mesh, P("data")))
    got = _devices.run_sharded(
        run,
        BoundCall((placed,), {}),
        roles,
        4,
        Split.STRIDED,
        data_parallel(mesh),
        "jaxaccum.accumulate",
    )
    np.testing.assert_allclose(np.asarray(got), x.sum(0), rtol=RTOL, atol=ATOL)
    assert seen == [(("data",), 1, None)]


def test_run_sharded_names_the_leaf_whose_size_does_not_split():
    roles = {"batch": (ArgRef(0, "x"),), "carry": (), "rng": ()}
    mesh = one_device_mesh()
    placed = jax.device_put(np.zeros(6), NamedSharding(mesh, P("data")))
    with pytest.raises(
        ValueError,
        match=r"batch size 6 at leaf x must be divisible by k × "
        r"devices = 4 × 1 = 4",
    ):
        _devices.run_sharded(
            lambda *a, **k: 0,
            BoundCall((placed,), {}),
            roles,
            4,
            Split.STRIDED,
            data_parallel(mesh),
            "scope",
        )


def test_out_layouts_without_sharded_arguments_are_none():
    treedef = jax.tree.structure({"a": 0, "b": 0})
    got = _devices.out_layouts(None, BoundCall((), {}), None, [None, None], treedef)
    assert got == [None, None]
    assert _reduce.is_builtin(BUILTIN[Reduce.MEAN], Reduce.MEAN)
