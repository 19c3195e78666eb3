"""``data_axis=``: argument checks on one device, and the 8-device checks in a subprocess.

XLA:CPU fixes its device count when the backend starts, so the 8-device equivalence and
communication checks (``tests/*_checks.py``) run in a fresh interpreter started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (see ``helpers.EightDeviceRun``); its
pytest output is shown on failure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from conftest import EIGHT_DEVICES
from helpers import EightDeviceRun, assert_trees_close, digits_batch, init_params, mean_loss

import jaxaccum


def test_eight_device_checks_pass_in_a_subprocess(request: pytest.FixtureRequest) -> None:
    """``sharded_checks.py``, ``collectives_checks.py`` and ``mesh_checks.py`` on 8 devices;
    started at collection by ``conftest.py`` (or here, if collection did not)."""
    run = request.config.stash.get(EIGHT_DEVICES, None) or EightDeviceRun()
    code, output = run.result(timeout=900)
    assert code == 0, output[-12000:]
    assert " passed" in output and "skipped" not in output, output[-2000:]


def one_device_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_one_device_mesh_equals_plain_accumulate():
    params, batch = init_params(), digits_batch(64)
    expected = jax.value_and_grad(mean_loss)(params, batch)
    for k in (1, 4):
        fn = jaxaccum.accumulate(
            jax.value_and_grad(mean_loss), k, data_axis="data", mesh=one_device_mesh()
        )
        assert_trees_close(jax.jit(fn)(params, batch), expected)


def test_mesh_from_set_mesh():
    params, batch = init_params(), digits_batch(64)
    fn = jaxaccum.accumulate(jax.value_and_grad(mean_loss), 4, data_axis="data")
    with jax.set_mesh(one_device_mesh()):
        out = jax.jit(fn)(params, batch)
    assert_trees_close(out, jax.value_and_grad(mean_loss)(params, batch))


def test_missing_mesh_names_the_fix():
    fn = jaxaccum.accumulate(jax.value_and_grad(mean_loss), 4, data_axis="data")
    with pytest.raises(ValueError, match=r"needs a device mesh.*jax\.set_mesh"):
        fn(init_params(), digits_batch(64))


def test_unknown_axis_lists_the_mesh_axes():
    fn = jaxaccum.accumulate(
        jax.value_and_grad(mean_loss), 4, data_axis="batch", mesh=one_device_mesh()
    )
    with pytest.raises(ValueError, match=r"\['batch'\] are not axes.*\['data'\]"):
        fn(init_params(), digits_batch(64))


def test_batch_not_divisible_by_k_times_devices_names_the_leaf():
    fn = jaxaccum.accumulate(
        jax.value_and_grad(mean_loss), 8, data_axis="data", mesh=one_device_mesh()
    )
    with pytest.raises(ValueError, match=r"batch size 60 at leaf batch\['x'\].*k × devices"):
        fn(init_params(), digits_batch(60))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"data_axis": ""}, TypeError, "mesh axis name"),
        ({"data_axis": 3}, TypeError, "mesh axis name"),
        ({"data_axis": ("data", "data")}, ValueError, "repeat"),
        ({"mesh": "mesh"}, ValueError, "only used with data_axis"),
        ({"data_axis": "data", "mesh": "mesh"}, TypeError, "jax.sharding.Mesh"),
    ],
)
def test_bad_options_fail_when_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        jaxaccum.accumulate(jax.value_and_grad(mean_loss), 4, **kwargs)


def test_collectives_on_one_device_are_empty():
    fn = jaxaccum.accumulate(
        jax.value_and_grad(mean_loss), 4, data_axis="data", mesh=one_device_mesh()
    )
    report = jaxaccum.inspect.collectives(fn, init_params(), digits_batch(64))
    assert report.in_loop == ()
    assert "in loops: none" in str(report)
    assert jnp.ndim(report.counts().get("all-reduce", 0)) == 0


def test_non_array_batch_leaf_gets_the_batch_message():
    fn = jaxaccum.accumulate(
        jax.value_and_grad(mean_loss), 4, data_axis="data", mesh=one_device_mesh()
    )
    batch = {**digits_batch(64), "name": "digits"}
    with pytest.raises(
        TypeError, match=r"leaf batch\['name'\] of the batch is a str, not an array"
    ):
        fn(init_params(), batch)
