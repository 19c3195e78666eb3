"""``jaxaccum.inspect.collectives`` on hand-written 8-device steps: pmap, shard_map, FSDP.

Not collected by the default run (the name does not start with ``test_``): it needs eight
devices, which XLA:CPU only creates when the process starts with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. ``tests/test_sharding.py`` runs this
file in such a subprocess, so CI runs it on every push.

Each step is what a user would write without jaxaccum: a ``lax.scan`` over K micro-batches
of a small MLP (plain ``jax.numpy``) on scikit-learn's digits, with the gradient averaged
over devices either once after the scan or (the negative control) in every iteration. The
report must place each collective where the compiled program runs it. Each step's gradient
is also checked against the one-device full-batch gradient (1e-6 abs / 1e-5 rel), so the
programs whose communication is read are correct ones.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import pytest
from helpers import assert_trees_close, digits_batch, require_devices
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxaccum

DEVICES = 8
K = 4  # micro-batches per step
N = 256  # examples per step: 8 per device and micro-batch
HIDDEN = 32

Params = dict[str, jax.Array]
Batch = dict[str, jax.Array]


@pytest.fixture(scope="module")
def devices() -> int:
    return require_devices(DEVICES)


@pytest.fixture(scope="module", params=["explicit", "auto"])
def mesh(request: pytest.FixtureRequest, devices: int) -> jax.sharding.Mesh:
    if request.param == "explicit":
        return jax.make_mesh((devices,), ("data",))
    return jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def init_mlp() -> Params:
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (64, HIDDEN)) / 8.0,
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, 10)) / HIDDEN**0.5,
        "b2": jnp.zeros(10),
    }


def loss(params: Params, batch: Batch) -> jax.Array:
    hidden = jax.nn.relu(batch["x"] @ params["w1"] + params["b1"])
    logp = jax.nn.log_softmax(hidden @ params["w2"] + params["b2"])
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def reference_grad() -> Params:
    return jax.jit(jax.grad(loss))(init_mlp(), digits_batch(N))


def scan_grads(
    params: Params, batches: Batch, init: Params, reduce: Callable[[Params], Params]
) -> Params:
    """Sum over micro-batches (leading axis) of ``reduce(grad)``, divided by their number."""

    def body(acc: Params, batch: Batch) -> tuple[Params, None]:
        return jax.tree.map(jnp.add, acc, reduce(jax.grad(loss)(params, batch))), None

    total, _ = lax.scan(body, init, batches)
    return jax.tree.map(lambda g: g / K, total)


def no_reduce(grads: Params) -> Params:
    return grads


# --- jax.pmap -------------------------------------------------------------------------


def pmap_step(reduce_in_loop: bool) -> Callable[[Params, Batch], Params]:
    def step(params: Params, batches: Batch) -> Params:
        zeros = jax.tree.map(jnp.zeros_like, params)
        if reduce_in_loop:
            return scan_grads(params, batches, zeros, lambda g: lax.pmean(g, "batch"))
        return lax.pmean(scan_grads(params, batches, zeros, no_reduce), "batch")

    return jax.pmap(step, axis_name="batch", in_axes=(None, 0))


def per_device(batch: Batch) -> Batch:
    """(N, ...) -> (devices, K, N / (devices K), ...): device d, micro-batch j."""
    return jax.tree.map(lambda a: a.reshape(DEVICES, K, -1, *a.shape[1:]), batch)


def test_pmap_all_reduces_once_after_the_scan(devices):
    step, batches = pmap_step(reduce_in_loop=False), per_device(digits_batch(N))
    report = jaxaccum.inspect.collectives(step, init_mlp(), batches)
    assert report.in_loop == (), report
    assert report.counts(in_loop=False) == {"all-reduce": 1}, report
    assert report.outside_loop[0].bytes == sum(p.nbytes for p in init_mlp().values())
    assert_trees_close(jax.tree.map(lambda g: g[0], step(init_mlp(), batches)), reference_grad())


def test_pmap_with_pmean_in_the_scan_all_reduces_in_the_loop(devices):
    step, batches = pmap_step(reduce_in_loop=True), per_device(digits_batch(N))
    report = jaxaccum.inspect.collectives(step, init_mlp(), batches)
    assert report.counts(in_loop=True) == {"all-reduce": 1}, report
    assert report.in_loop[0].loop_depth == 1
    assert report.outside_loop == (), report
    assert_trees_close(jax.tree.map(lambda g: g[0], step(init_mlp(), batches)), reference_grad())


# --- jax.shard_map (jitted, and not yet jitted) ---------------------------------------


def micro_batches(batch: Batch, mesh: jax.sharding.Mesh) -> Batch:
    """(N, ...) -> (K, N / K, ...), each micro-batch split over the data axis."""
    stacked = jax.tree.map(lambda a: a.reshape(K, -1, *a.shape[1:]), batch)
    return jax.device_put(stacked, NamedSharding(mesh, P(None, "data")))


def shard_map_step(mesh: jax.sharding.Mesh, reduce_in_loop: bool) -> Callable[..., Params]:
    def step(params: Params, batches: Batch) -> Params:
        # Replicated parameters enter device-invariant, and JAX all-reduces the gradient of
        # an invariant value where it is taken (test_invariant_params_...). Marked varying,
        # each device keeps its own gradient until the explicit pmean.
        local = lax.pcast(params, "data", to="varying")
        if reduce_in_loop:
            zeros = jax.tree.map(jnp.zeros_like, params)
            return scan_grads(local, batches, zeros, lambda g: lax.pmean(g, "data"))
        zeros = jax.tree.map(jnp.zeros_like, local)
        return lax.pmean(scan_grads(local, batches, zeros, no_reduce), "data")

    return jax.shard_map(step, mesh=mesh, in_specs=(P(), P(None, "data")), out_specs=P())


def replicated(params: Params, mesh: jax.sharding.Mesh) -> Params:
    return jax.device_put(params, NamedSharding(mesh, P()))


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "bare"])
def test_shard_map_all_reduces_once_after_the_scan(mesh, jit):
    step = shard_map_step(mesh, reduce_in_loop=False)
    step = jax.jit(step) if jit else step
    args = replicated(init_mlp(), mesh), micro_batches(digits_batch(N), mesh)
    report = jaxaccum.inspect.collectives(step, *args)
    assert report.in_loop == (), report
    assert report.counts(in_loop=False) == {"all-reduce": 1}, report
    assert report.outside_loop[0].bytes == sum(p.nbytes for p in init_mlp().values())
    if jit:  # the bare function would run op by op; its program is the jitted one
        assert_trees_close(step(*args), reference_grad())


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "bare"])
def test_shard_map_with_pmean_in_the_scan_all_reduces_in_the_loop(mesh, jit):
    step = shard_map_step(mesh, reduce_in_loop=True)
    step = jax.jit(step) if jit else step
    args = replicated(init_mlp(), mesh), micro_batches(digits_batch(N), mesh)
    report = jaxaccum.inspect.collectives(step, *args)
    assert report.counts(in_loop=True) == {"all-reduce": 1}, report
    assert report.outside_loop == (), report
    if jit:  # the bare function would run op by op; its program is the jitted one
        assert_trees_close(step(*args), reference_grad())


def test_invariant_params_have_their_gradient_all_reduced_in_the_loop(mesh):
    """Without the pcast, the pmean is written after the scan, but JAX's transpose of the
    implicit broadcast of the replicated parameters all-reduces every micro-batch's gradient
    (and the result is the devices' sum): the report shows where it really happens."""

    def step(params: Params, batches: Batch) -> Params:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return lax.pmean(scan_grads(params, batches, zeros, no_reduce), "data")

    mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(None, "data")), out_specs=P())
    args = replicated(init_mlp(), mesh), micro_batches(digits_batch(N), mesh)
    report = jaxaccum.inspect.collectives(jax.jit(mapped), *args)
    assert report.counts(in_loop=True).get("all-reduce", 0) >= 1, report
    summed = jax.tree.map(lambda g: g * DEVICES, reference_grad())
    assert_trees_close(jax.jit(mapped)(*args), summed)


# --- FSDP: parameters sharded, gathered and scattered in every micro-batch ------------


def fsdp_spec(x: jax.Array) -> P:
    return P("data") if x.shape[0] % DEVICES == 0 else P()


def fsdp_step(mesh: jax.sharding.Mesh, tie_to_batch: bool) -> Callable[..., Params]:
    """Gathers each sharded parameter (tiled all-gather) in the loop body and scatters its
    gradient (tiled psum_scatter); ``b2`` (10 rows) stays replicated and is averaged after.

    XLA hoists a loop-invariant all-gather out of the loop (the full parameters then live
    through the whole scan); ``tie_to_batch`` makes the gather depend on the micro-batch
    through an optimization barrier, which keeps it in the loop."""
    specs = {name: fsdp_spec(x) for name, x in init_mlp().items()}

    def step(params: Params, batches: Batch) -> Params:
        params = {
            k: v if specs[k] == P("data") else lax.pcast(v, "data", to="varying")
            for k, v in params.items()
        }

        def body(acc: Params, batch: Batch) -> tuple[Params, None]:
            shards = params
            if tie_to_batch:
                shards, batch = lax.optimization_barrier((params, batch))
            full = {
                k: lax.all_gather(v, "data", tiled=True) if specs[k] == P("data") else v
                for k, v in shards.items()
            }
            grads = jax.grad(loss)(full, batch)
            grads = {
                k: lax.psum_scatter(g, "data", tiled=True) if specs[k] == P("data") else g
                for k, g in grads.items()
            }
            return jax.tree.map(jnp.add, acc, grads), None

        total, _ = lax.scan(body, jax.tree.map(jnp.zeros_like, params), batches)
        grads = {k: g / K for k, g in total.items()}
        # The scattered gradients are sums over devices; the replicated one is averaged here.
        return {
            k: g / DEVICES if specs[k] == P("data") else lax.pmean(g, "data")
            for k, g in grads.items()
        }

    return jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(specs, P(None, "data")), out_specs=specs)
    )


def fsdp_params(mesh: jax.sharding.Mesh) -> Params:
    return {k: jax.device_put(v, NamedSharding(mesh, fsdp_spec(v))) for k, v in init_mlp().items()}


def test_fsdp_gathers_and_scatters_in_the_loop_with_per_device_bytes(mesh):
    step = fsdp_step(mesh, tie_to_batch=True)
    args = fsdp_params(mesh), micro_batches(digits_batch(N), mesh)
    report = jaxaccum.inspect.collectives(step, *args)
    sharded = [p for p in init_mlp().values() if fsdp_spec(p) == P("data")]
    assert report.counts(in_loop=True) == {"all-gather": 3, "reduce-scatter": 3}, report
    assert report.counts(in_loop=False) == {"all-reduce": 1}, report
    gathered = sorted(c.bytes for c in report.in_loop if c.op == "all-gather")
    scattered = sorted(c.bytes for c in report.in_loop if c.op == "reduce-scatter")
    assert gathered == sorted(p.nbytes for p in sharded)  # the whole parameter, per device
    assert scattered == sorted(p.nbytes // DEVICES for p in sharded)  # one shard
    assert all(c.loop_depth == 1 for c in report.in_loop)
    assert report.outside_loop[0].bytes == init_mlp()["b2"].nbytes
    assert_trees_close(step(*args), reference_grad())


def test_fsdp_gather_of_loop_invariant_params_is_hoisted_out_of_the_loop(mesh):
    """Written in the loop body, compiled outside it: the report follows the compiled
    program (loop depth 0) while the source op still names the body."""
    step = fsdp_step(mesh, tie_to_batch=False)
    args = fsdp_params(mesh), micro_batches(digits_batch(N), mesh)
    report = jaxaccum.inspect.collectives(step, *args)
    gathers = [c for c in report.collectives if c.op == "all-gather"]
    assert len(gathers) == 3 and not any(c.in_loop for c in gathers), report
    assert all("while/body" in c.source for c in gathers), report
    assert report.counts(in_loop=True) == {"reduce-scatter": 3}, report
    assert_trees_close(step(*args), reference_grad())
