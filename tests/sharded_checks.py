"""Data-parallel accumulation on 8 devices: equivalence with one device, and communication.

Not collected by the default run (the name does not start with ``test_``): it needs eight
devices, which XLA:CPU only creates when the process starts with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. ``tests/test_sharding.py`` runs this
file in such a subprocess, so CI runs it on every push.

References are single-device programs in the same process (plain jitted functions run on
device 0): the full-batch gradient, a hand-written Optax loop, or hand-written per-shard
BatchNorm. Tolerances: 1e-6 abs / 1e-5 rel (float32 round-off of summing in another order).
Communication is read from the compiled HLO with ``jaxaccum.inspect.collectives``.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import (
    MLP,
    BNNet,
    assert_trees_close,
    digits_batch,
    init_params,
    mean_loss,
    require_devices,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxaccum
import jaxaccum.flax as jf

DEVICES = 8
N = 128
KS = (1, 2, 4, 8, 16)
# Collectives that would move batch data between devices.
MOVERS = ("all-gather", "all-to-all", "collective-permute", "ragged-all-to-all")


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    require_devices(DEVICES)
    return jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    return jax.device_put(batch, NamedSharding(mesh, P("data")))


def fsdp(params: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shards every matrix's first axis over the data axis (FSDP); biases replicated."""

    def place(x: jax.Array) -> jax.Array:
        spec = P("data") if x.ndim == 2 and x.shape[0] % DEVICES == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(place, params)


def grad_bytes(params: Any) -> int:
    return sum(x.size * 4 for x in jax.tree.leaves(params))


@pytest.mark.parametrize("k", KS)
def test_gradient_equals_one_device_and_all_reduces_once_after_the_loop(mesh, k):
    params, batch = init_params(), digits_batch(N)
    reference = jax.jit(jax.value_and_grad(mean_loss))(params, batch)
    grad_fn = jax.jit(
        jaxaccum.accumulate(jax.value_and_grad(mean_loss), k, data_axis="data", mesh=mesh)
    )
    sharded = shard_batch(batch, mesh)
    assert_trees_close(grad_fn(params, sharded), reference)

    report = jaxaccum.inspect.collectives(grad_fn, params, sharded)
    assert report.in_loop == ()
    assert not any(c.op in MOVERS for c in report.collectives), report
    reduced = sum(c.bytes for c in report.outside_loop if c.op == "all-reduce")
    # every gradient leaf and the loss reduced exactly once, nothing else
    assert reduced == grad_bytes(params) + 4, report


@pytest.mark.parametrize("k", KS[1:])
def test_naive_gspmd_loop_all_reduces_inside_the_loop(mesh, k):
    """Negative control: the same accumulation left to the compiler communicates k times."""
    params, batch = init_params(), shard_batch(digits_batch(N), mesh)
    naive = jax.jit(jaxaccum.accumulate(jax.value_and_grad(mean_loss), k))
    report = jaxaccum.inspect.collectives(naive, params, batch)
    assert report.counts(in_loop=True).get("all-reduce", 0) >= 1, report


def test_naive_contiguous_split_moves_the_batch(mesh):
    """Negative control: a (k, N/k) split under the compiler gathers the batch."""
    params, batch = init_params(), shard_batch(digits_batch(N), mesh)
    naive = jax.jit(jaxaccum.accumulate(jax.value_and_grad(mean_loss), 4, split="contiguous"))
    report = jaxaccum.inspect.collectives(naive, params, batch)
    assert any(c.op in MOVERS for c in report.collectives), report
    sharded = jax.jit(
        jaxaccum.accumulate(
            jax.value_and_grad(mean_loss), 4, split="contiguous", data_axis="data", mesh=mesh
        )
    )
    assert not any(
        c.op in MOVERS for c in jaxaccum.inspect.collectives(sharded, params, batch).collectives
    )


def sgd_reference(params: Any, batches: list[Any], tx: optax.GradientTransformation) -> Any:
    """Ten full-batch Optax steps on one device, written out."""
    opt_state = tx.init(params)
    losses = []
    step = jax.jit(jax.value_and_grad(mean_loss))
    for batch in batches:
        loss, grads = step(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(loss)
    return params, jnp.stack(losses)


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
@pytest.mark.parametrize("k", [2, 8])
def test_ten_train_steps_equal_one_device(mesh, layout, k):
    tx = optax.sgd(0.1, momentum=0.9)
    params = init_params()
    batches = [digits_batch(N, offset=i * N) for i in range(10)]
    ref_params, ref_losses = sgd_reference(params, batches, tx)

    step = jaxaccum.train_step(mean_loss, tx, k, data_axis="data", mesh=mesh)
    placed = fsdp(params, mesh) if layout == "fsdp" else params
    state = step.init(placed)
    update = jax.jit(step.update, donate_argnums=0)
    losses = []
    for batch in batches:
        state, metrics = update(state, shard_batch(batch, mesh))
        losses.append(metrics.loss)
    assert_trees_close(jnp.stack(losses), ref_losses)
    assert_trees_close(state.params, ref_params)
    if layout == "fsdp":
        kernel = state.params["params"]["Dense_0"]["kernel"]
        assert kernel.sharding.spec == P("data")

    report = jaxaccum.inspect.collectives(update, state, shard_batch(batches[0], mesh))
    assert report.in_loop == (), report
    gathered = [c for c in report.collectives if c.op in MOVERS]
    if layout == "replicated":
        assert gathered == [], report
    else:  # FSDP: params gathered once before the loop, no batch data moved
        assert all(c.op == "all-gather" for c in gathered), report
        assert sum(c.bytes for c in gathered) <= grad_bytes(params), report


def test_token_weights_are_exact_across_devices(mesh):
    """Devices with different numbers of valid examples: the global weighted mean."""
    params, batch = init_params(), digits_batch(N)
    rng = np.random.default_rng(0)
    mask = (rng.random(N) < np.linspace(0.1, 0.9, N)).astype(np.float32)  # uneven per shard
    batch["mask"] = jnp.asarray(mask)

    def masked(p: Any, b: Any) -> jax.Array:
        logp = jax.nn.log_softmax(MLP().apply(p, b["x"]))
        nll = -jnp.take_along_axis(logp, b["y"][:, None], axis=1)[:, 0]
        return jnp.sum(nll * b["mask"]) / jnp.maximum(jnp.sum(b["mask"]), 1.0)

    reference = jax.jit(jax.value_and_grad(masked))(params, batch)
    grad_fn = jax.jit(
        jaxaccum.accumulate(
            jax.value_and_grad(masked),
            4,
            weight_fn=lambda b: b["mask"].sum(),
            data_axis="data",
            mesh=mesh,
        )
    )
    assert_trees_close(grad_fn(params, shard_batch(batch, mesh)), reference)
    # negative control: the unweighted mean over devices and micro-batches is off
    naive = jax.jit(jaxaccum.accumulate(jax.value_and_grad(masked), 4, data_axis="data", mesh=mesh))
    loss, _ = naive(params, shard_batch(batch, mesh))
    assert abs(float(loss) - float(reference[0])) > 1e-3


def test_reductions_and_keys_across_devices(mesh):
    ids = {"i": jnp.arange(N)}

    def stats(key: jax.Array, b: Any) -> Any:
        i = b["i"]
        return {
            "sum": i.sum(),  # int: summed over micro-batches and devices
            "max": i.max(),
            "stack": i.astype(jnp.float32).mean(),  # per micro-batch, averaged over devices
            "draw": jax.random.uniform(key),
        }

    k = 4
    fn = jax.jit(
        jaxaccum.accumulate(
            stats,
            k,
            rng_argnums=0,
            reduce={"sum": None, "max": "max", "stack": "stack", "draw": "sum"},
            data_axis="data",
            mesh=mesh,
        )
    )
    key = jax.random.key(3)
    out = fn(key, shard_batch(ids, mesh))
    assert int(out["sum"]) == N * (N - 1) // 2
    assert int(out["max"]) == N - 1
    # strided micro-batch j holds examples j, j+k, ... on every device: global mean j + (N-k)/2
    np.testing.assert_allclose(out["stack"], np.arange(k) + (N - k) / 2, rtol=1e-6)
    draws = [
        jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, d), j))
        for d in range(DEVICES)
        for j in range(k)
    ]
    np.testing.assert_allclose(out["draw"], np.sum(draws), rtol=1e-6)


def test_two_dimensional_mesh_with_a_model_axis(mesh):
    """Data over one axis, the other left to the compiler (params sharded on it)."""
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    params, batch = init_params(), digits_batch(N)
    reference = jax.jit(jax.value_and_grad(mean_loss))(params, batch)
    placed = jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh2, P(None, "model") if x.ndim == 2 else P())),
        params,
    )
    grad_fn = jax.jit(
        jaxaccum.accumulate(jax.value_and_grad(mean_loss), 4, data_axis="data", mesh=mesh2)
    )
    out = grad_fn(placed, jax.device_put(batch, NamedSharding(mesh2, P("data"))))
    assert_trees_close(out, reference)


def test_mesh_from_context_and_explicit_axes(mesh):
    explicit = jax.make_mesh((DEVICES,), ("data",))
    params, batch = init_params(), digits_batch(N)
    reference = jax.jit(jax.value_and_grad(mean_loss))(params, batch)
    with jax.set_mesh(explicit):
        grad_fn = jax.jit(jaxaccum.accumulate(jax.value_and_grad(mean_loss), 4, data_axis="data"))
        out = grad_fn(params, jax.device_put(batch, NamedSharding(explicit, P("data"))))
    assert_trees_close(out, reference)


# --- BatchNorm under data parallelism -------------------------------------------------


def bn_loss(apply: Any, mb: Any) -> jax.Array:
    logp = jax.nn.log_softmax(apply(mb["x"], train=True))
    return -jnp.mean(jnp.take_along_axis(logp, mb["y"][:, None], axis=1))


def bn_state(axis_name: str | None) -> Any:
    model = BNNet(axis_name)
    variables = BNNet().init(jax.random.key(0), jnp.zeros((2, 64)), train=False)
    return jf.TrainState.from_variables(model.apply, variables, optax.sgd(0.1))


def test_synchronised_batchnorm_equals_one_device(mesh):
    """BatchNorm(axis_name='data'): micro-batch j's statistics span all devices' part of it,
    so 8 devices x k equals one device x k (strided micro-batches are the same sets)."""
    k, batch = 4, digits_batch(N)
    one, one_metrics = jax.jit(jf.train_step(bn_loss, k))(bn_state(None), batch)
    step = jax.jit(jf.train_step(bn_loss, k, data_axis="data", mesh=mesh))
    many, metrics = step(bn_state("data"), shard_batch(batch, mesh))
    assert_trees_close(metrics.loss, one_metrics.loss)
    assert_trees_close(many.params, one.params)
    assert_trees_close(many.collections, one.collections)

    report = jaxaccum.inspect.collectives(step, bn_state("data"), shard_batch(batch, mesh))
    # statistics are all-reduced in the loop (forward and backward of each BatchNorm layer),
    # tiny (one feature vector each); the gradient once after it.
    assert report.counts(in_loop=True).get("all-reduce", 0) >= 1
    assert all(c.bytes <= 2 * 32 * 4 for c in report.in_loop), report
    assert not any(c.op in MOVERS for c in report.collectives)


def per_device_reference(batch: Any, k: int) -> tuple[Any, Any]:
    """Per-device BatchNorm written out: every device's micro-batch j normalised alone."""
    state = bn_state(None)
    shard = N // DEVICES
    grads_sum: Any = None
    stats = []
    for d in range(DEVICES):
        local = jax.tree.map(lambda x, d=d: x[d * shard : (d + 1) * shard], batch)
        cols = state.collections
        for j in range(k):
            mb = jax.tree.map(lambda x, j=j: x[j::k], local)

            def loss(p: Any, cols: Any = cols, mb: Any = mb) -> Any:
                def apply(x: jax.Array, train: bool) -> jax.Array:
                    return state.apply_fn({"params": p, **cols}, x, train, mutable=["batch_stats"])

                out: dict[str, Any] = {}

                def capture(x: jax.Array, train: bool) -> jax.Array:
                    y, new = apply(x, train)
                    out["cols"] = new
                    return y

                return bn_loss(capture, mb), out["cols"]

            (_, cols), g = jax.value_and_grad(loss, has_aux=True)(state.params)
            grads_sum = g if grads_sum is None else jax.tree.map(jnp.add, grads_sum, g)
        stats.append(cols)
    grads = jax.tree.map(lambda g: g / (DEVICES * k), grads_sum)
    mean_stats = jax.tree.map(lambda *s: sum(s) / DEVICES, *stats)
    return state.apply_gradients(grads=grads).params, mean_stats


def test_per_device_batchnorm_matches_hand_written_shards(mesh):
    """BatchNorm without axis_name: no communication in the loop; each device's running
    statistics follow its own micro-batches and are averaged once after the loop."""
    k, batch = 2, digits_batch(N)
    step = jax.jit(jf.train_step(bn_loss, k, data_axis="data", mesh=mesh))
    new, _ = step(bn_state(None), shard_batch(batch, mesh))
    ref_params, ref_stats = per_device_reference(batch, k)
    assert_trees_close(new.params, ref_params)
    assert_trees_close(new.collections, ref_stats)

    report = jaxaccum.inspect.collectives(step, bn_state(None), shard_batch(batch, mesh))
    assert report.in_loop == (), report


class NNXNet(nnx.Module):
    def __init__(self, axis_name: str | None) -> None:
        rngs = nnx.Rngs(0)
        self.inner = nnx.Linear(64, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, momentum=0.9, axis_name=axis_name, rngs=rngs)
        self.outer = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.outer(nnx.relu(self.norm(self.inner(x))))


def nnx_loss(model: NNXNet, mb: Any) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(mb["x"]), mb["y"]).mean()


def test_nnx_synchronised_batchnorm_three_steps_equal_one_device(mesh):
    k = 4
    runs = {}
    for axis_name in (None, "data"):
        model = NNXNet(axis_name)
        optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        kwargs = {"data_axis": "data", "mesh": mesh} if axis_name else {}
        update = nnx.jit(jf.nnx_train_step(nnx_loss, k, **kwargs))
        for i in range(3):
            batch = digits_batch(N, offset=i * N)
            update(model, optimizer, shard_batch(batch, mesh) if axis_name else batch)
        runs[axis_name] = nnx.state(model)
    assert_trees_close(runs["data"], runs[None])


# --- Choosing the FSDP strategy and k under a budget -------------------------------------


def test_planner_chooses_strategy_and_k_and_counts_sharded_accumulators(mesh):
    """``strategies=``: at each k the listed order is tried; the accumulator column is the
    per-device carry, a shard of the float32 gradient per micro-batch, all of it gathered
    once (both plus the same small scalars)."""
    widths = (128, 512, 128)
    keys = jax.random.split(jax.random.key(0), len(widths) - 1)
    params = [
        jax.random.normal(kk, (a, b)) / a**0.5
        for kk, a, b in zip(keys, widths[:-1], widths[1:], strict=True)
    ]
    specs = [P("data")] * len(params)
    placed = [jax.device_put(p, NamedSharding(mesh, s)) for p, s in zip(params, specs, strict=True)]
    batch = shard_batch({"x": jnp.ones((512, widths[0])), "y": jnp.ones((512, widths[-1]))}, mesh)

    def loss(p: Any, b: Any) -> jax.Array:
        h = b["x"]
        for w in p[:-1]:
            h = jnp.tanh(h @ w)
        return jnp.mean((h @ p[-1] - b["y"]) ** 2)

    tx = optax.adam(1e-3)

    def make(k: int, strategy: Any) -> Any:
        return jaxaccum.train_step(
            loss, tx, k, data_axis="data", mesh=mesh, fsdp=strategy, param_specs=specs
        ).update

    state = jaxaccum.train_step(loss, tx, 2).init(placed)
    every = jaxaccum.inspect.plan_microbatches(
        make,
        state,
        batch,
        budget=2**40,
        ks=(2, 8),
        strategies=("gather_once", "per_microbatch"),
        donate_argnums=0,
        compile_all=True,
    )
    rows = {(c.k, c.strategy): c for c in every.candidates}
    assert list(rows) == [
        (2, "gather_once"),
        (2, "per_microbatch"),
        (8, "gather_once"),
        (8, "per_microbatch"),
    ]
    assert (every.k, every.strategy) == (2, "gather_once")
    full = sum(a * b * 4 for a, b in itertools.pairwise(widths))
    small = rows[(2, "gather_once")].accumulator_bytes - full
    assert 0 < small < 64, rows  # loss sum, weight, ok flag: a few scalars
    assert rows[(2, "per_microbatch")].accumulator_bytes == full // DEVICES + small
    assert rows[(8, "per_microbatch")].peak_bytes < rows[(8, "gather_once")].peak_bytes
    # a budget only the per-micro-batch loop meets
    budget = (rows[(2, "per_microbatch")].peak_bytes + rows[(2, "gather_once")].peak_bytes) // 2
    plan = jaxaccum.inspect.plan_microbatches(
        make,
        state,
        batch,
        budget=budget,
        ks=(2, 8),
        strategies=("gather_once", "per_microbatch"),
        donate_argnums=0,
    )
    assert (plan.k, plan.strategy) == (2, "per_microbatch"), plan
    assert "per_microbatch" in plan.table() and "yes (chosen)" in plan.table()
