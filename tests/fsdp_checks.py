"""FSDP through the types on 8 devices: models that gather their own weights, memory, strategies.

Not collected by the default run (the name does not start with ``test_``): it needs eight
devices, which XLA:CPU only creates when the process starts with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. ``tests/test_eight_devices.py`` runs
it in such a subprocess, one test item per check, so CI runs it on every push.

The model (``sharded_models``) is written the MaxText way: stacked layers sharded over the
data axis, scanned over, each checkpointed layer gathering its own weight where it uses it
(a ``reshard`` to a ``reduced`` spec on Explicit axes, a sharding constraint on Auto axes,
where the activations are pinned too). References are the same functions on unplaced arrays
on one device. Tolerances: 1e-6 abs / 1e-5 rel. Memory is XLA's compiled memory analysis
per device (arguments + outputs + temporaries - aliased), read without running anything.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
import sharded_models as sm
from flax import nnx
from helpers import assert_trees_close, require_devices
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxaccum
import jaxaccum.flax as jf

DEVICES = 8
KINDS = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
L, D, N, K = 4, 64, 128, 4  # the small model the equivalence checks run
MiB = 2**20


@pytest.fixture(scope="module", autouse=True)
def devices() -> int:
    return require_devices(DEVICES)


def make_mesh(kind: str) -> jax.sharding.Mesh:
    return jax.make_mesh((DEVICES,), ("data",), axis_types=(KINDS[kind],))


def placed(kind: str) -> tuple[jax.sharding.Mesh, Any, Any, Any, Any]:
    """The mesh, the params and batch on one device, and both placed on the mesh."""
    mesh = make_mesh(kind)
    params = sm.init(jax.random.key(0), L, D)
    batch = sm.batch(jax.random.key(1), N, D)
    on_mesh = {"w": jax.device_put(params["w"], NamedSharding(mesh, sm.SPEC["w"]))}
    return mesh, params, batch, on_mesh, jax.device_put(batch, NamedSharding(mesh, P("data")))


def specs_kwargs(kind: str, name: str = "in_specs") -> dict[str, Any]:
    """On Auto axes traced params carry no layout: FSDP specs are given."""
    if kind == "explicit":
        return {}
    return {name: (sm.SPEC,) if name == "in_specs" else sm.SPEC}


@pytest.mark.parametrize("fsdp", ["per_microbatch", "gather_once"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_model_that_gathers_its_own_weights_equals_one_device(kind, fsdp):
    """``accumulate`` with ``data_axis``: the model's own ``reshard``/``reduced`` annotations,
    scan over layers and checkpoints work, and the gradient comes back sharded like the
    params."""
    _, params, batch, p, b = placed(kind)
    reference = jax.jit(jax.value_and_grad(sm.loss))(params, batch)
    grad_fn = jaxaccum.accumulate(
        jax.value_and_grad(sm.loss), K, data_axis="data", fsdp=fsdp, **specs_kwargs(kind)
    )
    loss, grads = jax.jit(grad_fn)(p, b)
    assert_trees_close((loss, grads), reference)
    assert grads["w"].sharding.spec == sm.SPEC["w"]


ADAM = optax.adam(1e-2)


def adam_reference(params: Any, batch: Any, steps: int = 3) -> Any:
    opt_state = ADAM.init(params)
    grad_fn = jax.jit(jax.grad(sm.loss))
    for _ in range(steps):
        updates, opt_state = ADAM.update(grad_fn(params, batch), opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_three_train_steps_on_that_model_equal_one_device(kind):
    """Three Adam steps through the Optax, linen and NNX steps with ``data_axis``."""
    _, params, batch, p, b = placed(kind)
    expected = adam_reference(params, batch)
    step = jaxaccum.train_step(
        sm.loss, ADAM, K, data_axis="data", **specs_kwargs(kind, "param_specs")
    )
    state, update = step.init(p), jax.jit(step.update)
    for _ in range(3):
        state, _ = update(state, b)
    assert_trees_close(state.params, expected)
    assert state.params["w"].sharding.spec == sm.SPEC["w"]

    def linen_loss(apply: Any, mb: Any) -> jax.Array:
        return jnp.mean((apply(mb["x"]) - mb["y"]) ** 2)

    linen = jax.jit(
        jf.train_step(linen_loss, K, data_axis="data", **specs_kwargs(kind, "param_specs"))
    )
    lstate = jf.TrainState.from_variables(sm.Stack(L, D).apply, {"params": p}, ADAM)
    for _ in range(3):
        lstate, _ = linen(lstate, b)
    assert_trees_close(lstate.params, expected)

    model = sm.NNXStack(params["w"])
    nnx.update(
        model, jax.device_put(nnx.state(model), NamedSharding(p["w"].sharding.mesh, sm.SPEC["w"]))
    )
    optimizer = nnx.Optimizer(model, ADAM, wrt=nnx.Param)
    nnx_step = nnx.jit(
        jf.nnx_train_step(
            lambda m, mb: jnp.mean((m(mb["x"]) - mb["y"]) ** 2),
            K,
            data_axis="data",
            **({} if kind == "explicit" else {"param_specs": nnx.State({"w": sm.SPEC["w"]})}),
        )
    )
    for _ in range(3):
        nnx_step(model, optimizer, b)
    assert_trees_close(model.w[...], expected["w"])


def peak(fn: Any, *args: Any) -> int:
    stats = jaxaccum.inspect.compiled_memory(jax.jit(fn), *args)
    return stats.argument_bytes + stats.output_bytes + stats.temp_bytes - stats.alias_bytes


@pytest.mark.parametrize("kind", list(KINDS))
def test_fsdp_never_holds_the_whole_model(kind):
    """16 layers of 1024 × 1024 (64 MiB of params, 8 MiB per device), batch 4096, k = 8:
    the accumulated step peaks at no more than 0.75 × the unaccumulated FSDP step and
    below the whole params; gathering once holds the whole params (and more)."""
    mesh = make_mesh(kind)
    params, batch = sm.abstract(mesh, 16, 1024, 4096)
    vg = jax.value_and_grad(sm.loss)
    plain = peak(vg, params, batch)
    default = peak(
        jaxaccum.accumulate(vg, 8, data_axis="data", **specs_kwargs(kind)), params, batch
    )
    once = peak(
        jaxaccum.accumulate(vg, 8, data_axis="data", fsdp="gather_once", **specs_kwargs(kind)),
        params,
        batch,
    )
    whole_params = 64 * MiB
    assert default <= 0.75 * plain, (default / MiB, plain / MiB)
    assert default < whole_params, default / MiB
    assert once > whole_params, once / MiB


def test_weights_used_whole_on_auto_axes_cost_what_a_hand_written_loop_does():
    """16 separate 1024 × 1024 weights sharded ``P(None, "data")`` and used whole (the
    compiler decides the gathers), batch 512, k = 8, on Auto axes, against a hand-written
    scan whose accumulator is pinned to the params' layout, with either split.

    Micro-batches that stay on their devices (the strided split, jaxaccum's default) make
    the compiler gather the weights, whole, in the loop and in the hand-written loop alike
    (about the unaccumulated step's peak). A contiguous split puts each micro-batch on one
    device; the compiler then replicates it and runs the layers tensor-parallel, and the
    peak falls below the whole params plus one micro-batch's activations: jaxaccum leaves
    the micro-batches of a contiguous split to the compiler on Auto axes and gets the same
    program."""
    mesh = make_mesh("auto")
    spec = P(None, "data")
    sharded = NamedSharding(mesh, spec)
    params = [jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=sharded)] * 16
    row = jax.ShapeDtypeStruct((512, 1024), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    batch = {"x": row, "y": row}
    vg = jax.value_and_grad(sm.whole_weights_loss)

    def hand(split: str) -> Any:  # the loop DESIGN.md measures, with either split
        def scan(p: Any, b: Any) -> Any:
            if split == "strided":
                xs = jax.tree.map(lambda x: x.reshape(64, 8, 1024).swapaxes(0, 1), b)
            else:
                xs = jax.tree.map(lambda x: x.reshape(8, 64, 1024), b)

            def body(acc: Any, mb: Any) -> Any:
                value, g = vg(p, mb)
                g = [jax.lax.with_sharding_constraint(x, sharded) for x in g]
                return jax.tree.map(jnp.add, acc, (value, g)), None

            zeros = [jax.lax.with_sharding_constraint(jnp.zeros(x.shape), sharded) for x in p]
            (value, g), _ = jax.lax.scan(body, (jnp.zeros(()), zeros), xs)
            return value / 8, [x / 8 for x in g]

        return scan

    def ours(split: str) -> Any:
        return jaxaccum.accumulate(vg, 8, data_axis="data", in_specs=([spec] * 16,), split=split)

    peaks = {
        (who, split): peak(fn(split), params, batch)
        for who, fn in (("hand", hand), ("jaxaccum", ours))
        for split in ("strided", "contiguous")
    }
    activations = 512 // 8 * 1024 * 4 * 16  # one micro-batch, every layer, whole
    for split in ("strided", "contiguous"):
        assert peaks["jaxaccum", split] <= 1.01 * peaks["hand", split], peaks
    assert peaks["jaxaccum", "strided"] <= peak(vg, params, batch), peaks
    assert peaks["jaxaccum", "contiguous"] < 64 * MiB + activations, peaks


def top_level_reshards(jaxpr: Any) -> list[tuple[Any, Any]]:
    """``(input type, output type)`` of the ``reshard`` equations outside every loop."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "reshard":
            found.append((eqn.invars[0].aval, eqn.outvars[0].aval))
        elif eqn.primitive.name in ("pjit", "jit"):
            found += top_level_reshards(eqn.params["jaxpr"].jaxpr)
    return found


@pytest.mark.parametrize("fsdp", ["per_microbatch", "gather_once"])
def test_each_strategy_moves_what_it_says(fsdp):
    """Explicit axes. ``per_microbatch``: jaxaccum gathers nothing; the model's gathers run
    per layer inside the loop and the gradient leaves each micro-batch sharded.
    ``gather_once``: one all-gather of the params before the loop, nothing gathered in
    it, and one reduction after it asked for as a reduce-scatter (a ``reshard`` from
    ``unreduced`` to the params' sharded layout; XLA:CPU compiles it as an all-reduce and
    a slice)."""
    mesh = make_mesh("explicit")
    params, batch = sm.abstract(mesh, 4, 256, 512)
    grad_fn = jax.jit(
        jaxaccum.accumulate(jax.value_and_grad(sm.loss), 4, data_axis="data", fsdp=fsdp)
    )
    report = jaxaccum.inspect.collectives(grad_fn, params, batch)
    whole = 4 * 256 * 256 * 4
    gathers_in = [c for c in report.in_loop if c.op == "all-gather"]
    gathers_out = [c for c in report.outside_loop if c.op == "all-gather"]
    reshards = top_level_reshards(grad_fn.trace(params, batch).jaxpr.jaxpr)
    scattered = [
        (a, b)
        for a, b in reshards
        if a.sharding.spec.unreduced == {"data"} and b.sharding.spec == sm.SPEC["w"]
    ]
    if fsdp == "per_microbatch":
        assert gathers_in and not gathers_out, report
        assert all(c.loop_depth == 2 for c in gathers_in), report  # inside the layer scan
        assert scattered == [], reshards
    else:
        assert not gathers_in, report
        assert sum(c.bytes for c in gathers_out) == whole, report
        assert len(scattered) == 1 and scattered[0][0].shape == (4, 256, 256), reshards
        reduced_after = sum(
            c.bytes for c in report.outside_loop if c.op in ("all-reduce", "reduce-scatter")
        )
        assert reduced_after >= whole // DEVICES, report


def test_the_planner_chooses_between_the_strategies_and_counts_each_accumulator():
    """At each k the listed order is tried; the accumulator column is the loop's carry per
    device: a shard of the float32 gradient per micro-batch, all of it gathered once."""
    mesh = make_mesh("explicit")
    params, batch = sm.abstract(mesh, 4, 256, 1024)

    def make(k: int, strategy: Any) -> Any:
        return jaxaccum.accumulate(jax.value_and_grad(sm.loss), k, data_axis="data", fsdp=strategy)

    every = jaxaccum.inspect.plan_microbatches(
        make,
        params,
        batch,
        budget=2**40,
        ks=(2, 8),
        strategies=("gather_once", "per_microbatch"),
        compile_all=True,
    )
    rows = {(c.k, c.strategy): c for c in every.candidates}
    grads = 4 * 256 * 256 * 4
    small = rows[(2, "gather_once")].accumulator_bytes - grads
    assert 0 < small < 64, rows  # the loss, the weight sum, the index: scalars
    assert rows[(2, "per_microbatch")].accumulator_bytes == grads // DEVICES + small, rows
    assert rows[(8, "per_microbatch")].peak_bytes < rows[(8, "gather_once")].peak_bytes, rows
    budget = (rows[(2, "per_microbatch")].peak_bytes + rows[(2, "gather_once")].peak_bytes) // 2
    plan = jaxaccum.inspect.plan_microbatches(
        make, params, batch, budget=budget, ks=(2, 8), strategies=("gather_once", "per_microbatch")
    )
    assert (plan.k, plan.strategy) == (2, "per_microbatch"), plan


@pytest.mark.parametrize("fsdp", ["per_microbatch", "gather_once"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_hybrid_sharding_sums_the_replicas_once(kind, fsdp):
    """Data over ("replica", "data") (2 × 4), params sharded over "data" only: equal to one
    device, and the gradient left in the params' sharding."""
    mesh = jax.make_mesh((2, 4), ("replica", "data"), axis_types=(KINDS[kind],) * 2)
    params = sm.init(jax.random.key(0), L, D)
    batch = sm.batch(jax.random.key(1), N, D)
    reference = jax.jit(jax.value_and_grad(sm.loss))(params, batch)
    p = {"w": jax.device_put(params["w"], NamedSharding(mesh, sm.SPEC["w"]))}
    b = jax.device_put(batch, NamedSharding(mesh, P(("replica", "data"))))
    grad_fn = jaxaccum.accumulate(
        jax.value_and_grad(sm.loss),
        K,
        data_axis=("replica", "data"),
        fsdp=fsdp,
        **specs_kwargs(kind),
    )
    loss, grads = jax.jit(grad_fn)(p, b)
    assert_trees_close((loss, grads), reference)
    assert grads["w"].sharding.spec == sm.SPEC["w"]
