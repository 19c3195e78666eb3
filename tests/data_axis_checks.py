"""``data_axis=`` on 8 devices, in global view: equal to one device, and one reduction per step.

Not collected by the default run (the name does not start with ``test_``): it needs eight
devices, which XLA:CPU only creates when the process starts with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. ``tests/test_eight_devices.py`` runs
it in such a subprocess, one test item per check, so CI runs it on every push.

Meshes of both kinds: Explicit (``jax.make_mesh``'s default: shardings are types, and the
gradients of parameters the step takes ``reduced`` are reduced once after the loop) and
Auto (the compiler places the reductions). References are single-device programs on
unplaced arrays in the same process: the full-batch gradient, a hand-written Optax loop,
hand-written loops over micro-batches. Tolerances: 1e-6 abs / 1e-5 rel (float32 round-off
of summing in another order). Communication is read from compiled programs with
``jaxaccum.inspect.collectives``; nothing runs for those checks.
"""

from __future__ import annotations

from collections.abc import Callable
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
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxaccum
import jaxaccum.flax as jf

DEVICES = 8
N = 128
KINDS = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
# Collectives that would move batch data between devices.
MOVERS = ("all-gather", "all-to-all", "collective-permute", "ragged-all-to-all")


@pytest.fixture(scope="module", autouse=True)
def devices() -> int:
    return require_devices(DEVICES)


def make_mesh(kind: str) -> jax.sharding.Mesh:
    return jax.make_mesh((DEVICES,), ("data",), axis_types=(KINDS[kind],))


def on_mesh(tree: Any, mesh: jax.sharding.Mesh, spec: P | None = None) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P() if spec is None else spec))


def full_spec(x: jax.Array) -> tuple[Any, ...]:
    """The array's partition spec with an entry per dimension (P() is P(None, None))."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def kernels_and_biases(params: Any) -> tuple[int, int]:
    """Bytes of the MLP's kernels (used by matmuls only) and of its biases."""
    leaves = jax.tree.leaves(params)
    return (
        sum(x.nbytes for x in leaves if x.ndim == 2),
        sum(x.nbytes for x in leaves if x.ndim == 1),
    )


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_explicit_axes_reduce_the_kernels_once_after_the_loop(k):
    """Explicit mesh: the kernels reach the step ``reduced`` (matmuls take that type), so
    their gradients are all-reduced once, after the loop; a bias added to the sharded
    activations cannot be ``reduced`` in jax 0.10, so its gradient (and the scalar loss)
    is reduced in the loop, as in a hand-written loop."""
    mesh = make_mesh("explicit")
    params, batch = init_params(), digits_batch(N)
    reference = jax.jit(jax.value_and_grad(mean_loss))(params, batch)
    grad_fn = jax.jit(jaxaccum.accumulate(jax.value_and_grad(mean_loss), k, data_axis="data"))
    args = on_mesh(params, mesh), on_mesh(batch, mesh, P("data"))
    loss, grads = grad_fn(*args)
    assert_trees_close((loss, grads), reference)
    assert all(g.sharding.is_fully_replicated for g in jax.tree.leaves(grads))
    report = jaxaccum.inspect.collectives(grad_fn, *args)
    kernels, biases = kernels_and_biases(params)
    assert not any(c.op in MOVERS for c in report.collectives), report
    after = [c for c in report.outside_loop if c.op == "all-reduce"]
    assert sum(c.bytes for c in after) == kernels, report
    assert sum(c.bytes for c in report.in_loop) == biases + 4, report  # and the loss


def test_the_same_loop_without_data_axis_reduces_every_kernel_in_the_loop():
    """Negative control: the batch sharded and the loop left as written (no ``data_axis``):
    every gradient, kernels included, is all-reduced in every micro-batch."""
    mesh = make_mesh("explicit")
    params = on_mesh(init_params(), mesh)
    naive = jax.jit(jaxaccum.accumulate(jax.value_and_grad(mean_loss), 4))
    report = jaxaccum.inspect.collectives(naive, params, on_mesh(digits_batch(N), mesh, P("data")))
    kernels, biases = kernels_and_biases(init_params())
    assert sum(c.bytes for c in report.in_loop) == kernels + biases + 4, report
    assert report.outside_loop == (), report


def test_auto_axes_leave_the_reductions_to_the_compiler():
    """Auto mesh: equal to one device, every gradient reduced by the compiler inside the
    loop, and no batch data moved (each micro-batch stays on its devices)."""
    mesh = make_mesh("auto")
    params, batch = init_params(), digits_batch(N)
    reference = jax.jit(jax.value_and_grad(mean_loss))(params, batch)
    grad_fn = jax.jit(jaxaccum.accumulate(jax.value_and_grad(mean_loss), 4, data_axis="data"))
    args = on_mesh(params, mesh), on_mesh(batch, mesh, P("data"))
    assert_trees_close(grad_fn(*args), reference)
    report = jaxaccum.inspect.collectives(grad_fn, *args)
    assert not any(c.op in MOVERS for c in report.collectives), report
    assert sum(c.bytes for c in report.in_loop) == nbytes(params) + 4, report


def sgd_reference(params: Any, batches: list[Any], tx: optax.GradientTransformation) -> Any:
    """Full-batch Optax steps on one device, written out: final params and losses."""
    opt_state = tx.init(params)
    losses = []
    step = jax.jit(jax.value_and_grad(mean_loss))
    for batch in batches:
        loss, grads = step(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(loss)
    return params, jnp.stack(losses)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("k", [2, 8])
def test_ten_train_steps_equal_one_device(kind, k):
    tx = optax.sgd(0.1, momentum=0.9)
    batches = [digits_batch(N, offset=i * N) for i in range(10)]
    ref_params, ref_losses = sgd_reference(init_params(), batches, tx)
    mesh = make_mesh(kind)
    step = jaxaccum.train_step(mean_loss, tx, k, data_axis="data")
    state = step.init(on_mesh(init_params(), mesh))
    update = jax.jit(step.update, donate_argnums=0)
    losses = []
    for batch in batches:
        state, metrics = update(state, on_mesh(batch, mesh, P("data")))
        losses.append(metrics.loss)
    assert_trees_close(jnp.stack(losses), ref_losses)
    assert_trees_close(state.params, ref_params)


def test_token_weights_are_exact_across_devices():
    """Micro-batches with different numbers of valid examples: the global token mean."""
    params, batch = init_params(), digits_batch(N)
    k = 4
    # strided micro-batch j holds examples j, j+4, ...: valid fractions 1/8, 1/4, 1/2, 1
    keep = np.array([1 / 8, 1 / 4, 1 / 2, 1.0])[np.arange(N) % k]
    batch["mask"] = jnp.asarray((np.arange(N) // k % 8 < keep * 8).astype(np.float32))

    def masked(p: Any, b: Any) -> jax.Array:
        logp = jax.nn.log_softmax(MLP().apply(p, b["x"]))
        nll = -jnp.take_along_axis(logp, b["y"][:, None], axis=1)[:, 0]
        return jnp.sum(nll * b["mask"]) / jnp.maximum(jnp.sum(b["mask"]), 1.0)

    reference = jax.jit(jax.value_and_grad(masked))(params, batch)
    mesh = make_mesh("explicit")
    args = on_mesh(params, mesh), on_mesh(batch, mesh, P("data"))
    weighted = jaxaccum.accumulate(
        jax.value_and_grad(masked), k, weight_fn=lambda b: b["mask"].sum(), data_axis="data"
    )
    assert_trees_close(jax.jit(weighted)(*args), reference)
    # negative control: the mean of the micro-batches' means is off
    naive = jaxaccum.accumulate(jax.value_and_grad(masked), k, data_axis="data")
    loss, _ = jax.jit(naive)(*args)
    assert abs(float(loss) - float(reference[0])) > 1e-3


@pytest.mark.parametrize("kind", list(KINDS))
def test_reductions_and_keys_equal_one_device(kind):
    """In global view every output, key included, is what one device computes."""
    ids = {"i": jnp.arange(N)}

    def stats(key: jax.Array, b: Any) -> Any:
        i = b["i"]
        return {
            "sum": i.sum(),
            "max": i.max(),
            "stack": i.astype(jnp.float32).mean(),
            "rows": i * 2,
            "draw": jax.random.uniform(key),
        }

    reduce = {"sum": None, "max": "max", "stack": "stack", "rows": "concat", "draw": "sum"}
    k, key = 4, jax.random.key(3)
    one = jaxaccum.accumulate(stats, k, rng_argnums=0, reduce=reduce)(key, ids)
    mesh = make_mesh(kind)
    many = jax.jit(jaxaccum.accumulate(stats, k, rng_argnums=0, reduce=reduce, data_axis="data"))(
        key, on_mesh(ids, mesh, P("data"))
    )
    assert jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), many, one) == jax.tree.map(
        lambda _: True, one
    )
    assert np.array_equal(np.asarray(many["rows"]), np.arange(N) * 2)


def bn_loss(apply: Any, mb: Any) -> jax.Array:
    logp = jax.nn.log_softmax(apply(mb["x"], train=True))
    return -jnp.mean(jnp.take_along_axis(logp, mb["y"][:, None], axis=1))


def bn_state(axis_name: str | None) -> Any:
    variables = BNNet().init(jax.random.key(0), jnp.zeros((2, 64)), train=False)
    return jf.TrainState.from_variables(BNNet(axis_name).apply, variables, optax.sgd(0.1))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("axis_name", [None, "data"])
def test_batchnorm_statistics_span_the_devices_and_equal_one_device(kind, axis_name):
    """In global view a micro-batch's BatchNorm statistics are its statistics over every
    device (a BatchNorm written for pmap, ``axis_name="data"``, gets the name bound with
    size 1): 8 devices equal one device, parameters and running statistics."""
    k, batch = 4, digits_batch(N)
    one, one_metrics = jax.jit(jf.train_step(bn_loss, k))(bn_state(None), batch)
    mesh = make_mesh(kind)
    step = jax.jit(jf.train_step(bn_loss, k, data_axis="data"))
    many, metrics = step(bn_state(axis_name), on_mesh(batch, mesh, P("data")))
    assert_trees_close(metrics.loss, one_metrics.loss)
    assert_trees_close(many.params, one.params)
    assert_trees_close(many.collections, one.collections)


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


@pytest.mark.parametrize("kind", list(KINDS))
def test_nnx_batchnorm_three_steps_equal_one_device(kind):
    runs = {}
    mesh = make_mesh(kind)
    for where in ("one", "many"):
        model = NNXNet(None)
        optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        kwargs = {"data_axis": "data"} if where == "many" else {}
        update = nnx.jit(jf.nnx_train_step(nnx_loss, 4, **kwargs))
        for i in range(3):
            batch = digits_batch(N, offset=i * N)
            update(model, optimizer, on_mesh(batch, mesh, P("data")) if where == "many" else batch)
        runs[where] = nnx.state(model)
    assert_trees_close(runs["many"], runs["one"])


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_dimensional_mesh_with_a_model_axis(kind):
    """Data over one axis, params tensor-parallel over the other; the logits gathered over
    the model axis before the label lookup, as an explicit-sharding user writes it."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(KINDS[kind],) * 2)
    params, batch = init_params(), digits_batch(N)
    reference = jax.jit(jax.value_and_grad(mean_loss))(params, batch)
    placed = jax.tree.map(
        lambda x: on_mesh(x, mesh, P(None, "model") if x.ndim == 2 else P()), params
    )

    def loss(p: Any, b: Any) -> jax.Array:
        logits = MLP().apply(p, b["x"])
        if jax.typeof(logits).sharding.spec[1:] == ("model",):
            logits = jax.sharding.reshard(logits, P("data", None))
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], axis=1))

    grad_fn = jax.jit(jaxaccum.accumulate(jax.value_and_grad(loss), 4, data_axis="data"))
    loss_value, grads = grad_fn(placed, on_mesh(batch, mesh, P("data")))
    assert_trees_close((loss_value, grads), reference)
    if kind == "explicit":  # the gradient comes back in the params' layout
        assert jax.tree.map(full_spec, grads) == jax.tree.map(full_spec, placed)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_train_steps_need_no_mesh_context():
    """Params and batch placed on an Explicit mesh, no ``jax.set_mesh``, an optax loss:
    the Optax, linen and NNX steps run as ``jax.jit(jax.value_and_grad(loss))`` does, with
    and without ``data_axis``, and equal one device."""
    mesh = make_mesh("explicit")
    tx, batch = optax.sgd(0.1), digits_batch(N)

    def loss(params: Any, b: Any) -> jax.Array:
        return cross_entropy(MLP().apply(params, b["x"]), b["y"])

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(init_params(), batch)
    expected = optax.apply_updates(init_params(), jax.tree.map(lambda g: -0.1 * g, ref_grads))
    sharded = on_mesh(batch, mesh, P("data"))
    for kwargs in ({}, {"data_axis": "data"}):
        step = jaxaccum.train_step(loss, tx, 4, **kwargs)
        state, metrics = jax.jit(step.update)(step.init(on_mesh(init_params(), mesh)), sharded)
        assert_trees_close((metrics.loss, state.params), (ref_loss, expected))
        linen = jax.jit(
            jf.train_step(lambda apply, b: cross_entropy(apply(b["x"]), b["y"]), 4, **kwargs)
        )
        lstate = jf.TrainState.from_variables(MLP().apply, on_mesh(init_params(), mesh), tx)
        lstate, _ = linen(lstate, sharded)
        assert_trees_close(lstate.params, expected["params"])
        model = NNXNet(None)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        nnx.update(model, on_mesh(nnx.state(model), mesh))
        nnx.jit(jf.nnx_train_step(nnx_loss, 4, **kwargs))(model, optimizer, sharded)


def counting(fn: Callable[..., Any], seen: list[int]) -> Callable[..., Any]:
    def step(*args: Any, **kwargs: Any) -> Any:
        seen.append(1)
        return fn(*args, **kwargs)

    return step


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_step_is_traced_at_most_twice_per_compilation(kind):
    """Plain loop, ``data_axis`` on either mesh kind (with FSDP params gathered once, too),
    ``axis_name`` inside the caller's ``shard_map``, and the three train steps."""
    mesh = make_mesh(kind)
    params, batch = on_mesh(init_params(), mesh), on_mesh(digits_batch(N), mesh, P("data"))
    fsdp = jax.tree.map(
        lambda x: on_mesh(x, mesh, P("data") if x.shape[0] % 8 == 0 else P()), init_params()
    )
    paths: dict[str, Callable[[list[int]], Any]] = {
        "plain": lambda seen: jax.jit(
            jaxaccum.accumulate(counting(jax.value_and_grad(mean_loss), seen), 4)
        ).trace(params, batch),
        "data_axis": lambda seen: jax.jit(
            jaxaccum.accumulate(counting(jax.value_and_grad(mean_loss), seen), 4, data_axis="data")
        ).trace(params, batch),
        "gather_once": lambda seen: jax.jit(
            jaxaccum.accumulate(
                counting(jax.value_and_grad(mean_loss), seen),
                4,
                data_axis="data",
                fsdp="gather_once",
                in_specs=(jax.tree.map(lambda x: x.sharding.spec, fsdp),)
                if kind == "auto"
                else None,
            )
        ).trace(fsdp, batch),
        "axis_name": lambda seen: jax.jit(
            jax.shard_map(
                jaxaccum.accumulate(
                    counting(jax.value_and_grad(mean_loss), seen), 4, axis_name="data"
                ),
                mesh=mesh,
                in_specs=(P(), P("data")),
                out_specs=P(),
            )
        ).trace(params, batch),
        "train_step": lambda seen: jax.jit(
            jaxaccum.train_step(counting(mean_loss, seen), optax.sgd(0.1), 4, data_axis="data")
        ).trace(jaxaccum.train_step(mean_loss, optax.sgd(0.1), 4).init(params), batch),
        "linen": lambda seen: jax.jit(
            jf.train_step(
                counting(lambda apply, b: cross_entropy(apply(b["x"]), b["y"]), seen),
                4,
                data_axis="data",
            )
        ).trace(jf.TrainState.from_variables(MLP().apply, params, optax.sgd(0.1)), batch),
    }
    counts = {}
    for name, trace in paths.items():
        seen: list[int] = []
        trace(seen)
        counts[name] = len(seen)
    limit = {"data_axis": 2, "gather_once": 2, "train_step": 2, "linen": 2}
    expected = {n: (limit.get(n, 1) if kind == "explicit" else 1) for n in paths}
    assert counts == expected


def test_contiguous_split_over_the_data_axes_is_refused_by_name():
    mesh = make_mesh("explicit")
    fn = jaxaccum.accumulate(jax.value_and_grad(mean_loss), 4, data_axis="data", split="contiguous")
    with pytest.raises(ValueError, match=r"split='contiguous' cannot split.*split='strided'"):
        jax.jit(fn)(on_mesh(init_params(), mesh), on_mesh(digits_batch(N), mesh, P("data")))
