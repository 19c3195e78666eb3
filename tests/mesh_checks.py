"""Accumulation on every kind of mesh, inside users' ``shard_map`` and ``pmap``, and FSDP.

Not collected by the default run (the name does not start with ``test_``): it needs eight
devices, which XLA:CPU only creates when the process starts with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. ``tests/test_sharding.py`` runs this
file in such a subprocess, so CI runs it on every push.

Meshes: axis types Explicit (``jax.make_mesh``'s default, where an array's type carries its
sharding) and Auto (the compiler decides), with the parameters replicated, sharded over the
data axis (FSDP: every matrix's first axis over 8 devices) or tensor-parallel (every
matrix's second axis over ``"model"`` of a 4 × 2 mesh). References are single-device
programs on unplaced arrays: the full-batch ``jax.value_and_grad``, or a hand-written Optax
loop. Tolerances: 1e-6 abs / 1e-5 rel (float32 round-off of summing in another order).
Communication and memory are read from compiled programs (``jaxaccum.inspect.collectives``,
``jaxaccum.inspect.compiled_memory``, ``jaxaccum.inspect.plan_microbatches``); those checks run
nothing.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils, nnx
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
K = 4
STEPS = 3
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
LAYOUTS = ("replicated", "fsdp", "tp")


@pytest.fixture(scope="module", autouse=True)
def devices() -> int:
    return require_devices(DEVICES)


def make_mesh(axis_type: str, layout: str) -> jax.sharding.Mesh:
    """8 devices over ``"data"``; for tensor parallelism 4 over ``"data"``, 2 over ``"model"``."""
    kind = AXIS_TYPES[axis_type]
    if layout == "tp":
        return jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
    return jax.make_mesh((DEVICES,), ("data",), axis_types=(kind,))


def layout_specs(tree: Any, layout: str) -> Any:
    """A ``PartitionSpec`` per leaf: replicated, FSDP (matrices' first axis over ``"data"``)
    or tensor-parallel (matrices' second axis over ``"model"``); vectors replicated."""

    def spec(x: Any) -> P:
        if layout == "fsdp" and x.ndim == 2 and x.shape[0] % DEVICES == 0:
            return P("data")
        if layout == "tp" and x.ndim == 2:
            return P(None, "model")
        return P()

    return jax.tree.map(spec, tree)


def place(tree: Any, mesh: jax.sharding.Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    return jax.device_put(batch, NamedSharding(mesh, P("data")))


def full_spec(x: jax.Array) -> tuple[Any, ...]:
    """The array's partition spec with an entry per dimension (P("data") is P("data", None))."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def assert_same_shardings(actual: Any, expected: Any) -> None:
    assert jax.tree.map(full_spec, actual) == jax.tree.map(full_spec, expected)


def _names(entry: Any) -> set[Any]:
    return set(entry) if isinstance(entry, tuple) else {entry}


def unsharded_over(x: jax.Array, axis: str) -> jax.Array:
    """``x`` resharded to be whole along ``axis`` where its type (Explicit axes) splits it.

    Explicit sharding makes the user say where data moves: a matmul whose contracting
    dimension is sharded, or a gather from a sharded axis, is a type error in JAX itself.
    On Auto axes the type carries no sharding and this does nothing.
    """
    spec = jax.typeof(x).sharding.spec
    if not any(axis in _names(e) for e in spec):
        return x
    return jax.sharding.reshard(x, P(*(None if axis in _names(e) else e for e in spec)))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def mesh_loss(params: Any, batch: Any) -> jax.Array:
    """``helpers.mean_loss`` as an explicit-sharding user writes it: FSDP params gathered
    before use, the logits' model axis gathered before the label lookup."""
    params = jax.tree.map(lambda w: unsharded_over(w, "data"), params)
    logits = MLP().apply(params, batch["x"])
    return cross_entropy(unsharded_over(logits, "model"), batch["y"])


def linen_loss(apply: Any, mb: Any) -> jax.Array:
    return cross_entropy(unsharded_over(apply(mb["x"]), "model"), mb["y"])


@functools.cache
def _params_on_host() -> Any:
    return jax.tree.map(np.asarray, init_params())


def fresh_params() -> Any:
    """``helpers.init_params()`` as new arrays (initialised once, outside any mesh context)."""
    return jax.tree.map(jnp.asarray, _params_on_host())


def batches() -> list[dict[str, jax.Array]]:
    return [digits_batch(N, offset=i * N) for i in range(STEPS)]


@pytest.fixture(scope="module")
def full_batch() -> tuple[jax.Array, Any]:
    """The full-batch loss and gradient on one device."""
    return jax.jit(jax.value_and_grad(mean_loss))(fresh_params(), digits_batch(N))


ADAM = optax.adam(1e-2)


@pytest.fixture(scope="module")
def adam_run() -> tuple[Any, jax.Array]:
    """Three full-batch Adam steps on one device, written out: final params and losses."""
    params, opt_state, losses = fresh_params(), ADAM.init(fresh_params()), []
    grad_fn = jax.jit(jax.value_and_grad(mean_loss))
    for batch in batches():
        loss, grads = grad_fn(params, batch)
        updates, opt_state = ADAM.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(loss)
    return params, jnp.stack(losses)


MESHES = [(a, layout) for a in AXIS_TYPES for layout in LAYOUTS]


# --- accumulate, train_step, flax and NNX steps on every mesh -------------------------


@pytest.mark.parametrize("data_axis", [None, "data"])
@pytest.mark.parametrize(("axis_type", "layout"), MESHES)
def test_accumulate_equals_one_device_on_every_mesh(full_batch, axis_type, layout, data_axis):
    """With ``data_axis`` jaxaccum runs its own ``shard_map``; without it the loop is left to
    the compiler under the params' and batch's sharding. Both equal one device."""
    mesh = make_mesh(axis_type, layout)
    specs = layout_specs(fresh_params(), layout)
    params, batch = place(fresh_params(), mesh, specs), shard_batch(digits_batch(N), mesh)
    kwargs: dict[str, Any] = {}
    if data_axis:
        kwargs["data_axis"] = data_axis
        if axis_type == "auto" and layout == "fsdp":  # traced Auto arrays carry no placement
            kwargs["in_specs"] = (specs,)
    with jax.set_mesh(mesh):
        grad_fn = jax.jit(jaxaccum.accumulate(jax.value_and_grad(mesh_loss), K, **kwargs))
        out = grad_fn(params, batch)
        # the loss as written also runs on the full batch on this mesh
        full = jax.jit(jax.value_and_grad(mesh_loss))(params, batch)
    assert_trees_close(out, full_batch)
    assert_trees_close(full, full_batch)
    if axis_type == "explicit" or (data_axis and layout == "fsdp"):
        assert_same_shardings(out[1], params)  # FSDP gradients come back sharded P("data")


def test_auto_fsdp_without_in_specs_is_exact_but_replicated(full_batch):
    """On Auto axes a traced array carries no placement: without ``in_specs`` the FSDP params
    are taken as replicated (gathered at the call), still exact, gradient replicated."""
    mesh = make_mesh("auto", "fsdp")
    params = place(fresh_params(), mesh, layout_specs(fresh_params(), "fsdp"))
    with jax.set_mesh(mesh):
        grad_fn = jax.jit(jaxaccum.accumulate(jax.value_and_grad(mesh_loss), K, data_axis="data"))
        loss, grads = grad_fn(params, shard_batch(digits_batch(N), mesh))
    assert_trees_close((loss, grads), full_batch)
    assert all(g.sharding.is_fully_replicated for g in jax.tree.leaves(grads))


# Flax's own layers cannot reshard FSDP kernels on Explicit axes (the full-batch Flax step
# fails in JAX itself there), so that one combination has no plain-loop case.
FLAX_CASES = [
    (a, layout, d)
    for a, layout in MESHES
    for d in ("data", None)
    if not (a == "explicit" and layout == "fsdp" and d is None)
]


@pytest.mark.parametrize(
    ("axis_type", "layout", "data_axis"), [(*m, d) for m in MESHES for d in ("data", None)]
)
def test_optax_train_step_equals_one_device_on_every_mesh(adam_run, axis_type, layout, data_axis):
    mesh = make_mesh(axis_type, layout)
    specs = layout_specs(fresh_params(), layout)
    params = place(fresh_params(), mesh, specs)
    kwargs: dict[str, Any] = {}
    if data_axis:
        kwargs["data_axis"] = data_axis
        if axis_type == "auto" and layout == "fsdp":
            kwargs["param_specs"] = specs
    step = jaxaccum.train_step(mesh_loss, ADAM, K, **kwargs)
    state, update, losses = step.init(params), jax.jit(step.update, donate_argnums=0), []
    with jax.set_mesh(mesh):
        for batch in batches():
            state, metrics = update(state, shard_batch(batch, mesh))
            losses.append(metrics.loss)
    ref_params, ref_losses = adam_run
    assert_trees_close(state.params, ref_params)
    assert_trees_close(jnp.stack(losses), ref_losses)
    if axis_type == "explicit" or (data_axis and layout == "fsdp"):
        assert_same_shardings(state.params, params)


@pytest.mark.parametrize(("axis_type", "layout", "data_axis"), FLAX_CASES)
def test_flax_train_step_equals_one_device_on_every_mesh(adam_run, axis_type, layout, data_axis):
    mesh = make_mesh(axis_type, layout)
    variables = fresh_params()
    specs = layout_specs(variables, layout)
    kwargs: dict[str, Any] = {"data_axis": data_axis} if data_axis else {}
    if data_axis and axis_type == "auto":
        kwargs["param_specs"] = specs["params"]
    update = jax.jit(jf.train_step(linen_loss, K, **kwargs), donate_argnums=0)
    placed = place(variables, mesh, specs)
    state = jf.TrainState.from_variables(MLP().apply, placed, ADAM)
    with jax.set_mesh(mesh):
        for batch in batches():
            state, _ = update(state, shard_batch(batch, mesh))
    assert_trees_close(state.params, adam_run[0]["params"])
    if axis_type == "explicit" or (data_axis and layout == "fsdp"):
        assert_same_shardings(state.params, placed["params"])


class NNXMLP(nnx.Module):
    """``helpers.MLP`` in NNX, starting from the same parameters."""

    def __init__(self, params: Any) -> None:
        rngs = nnx.Rngs(0)
        self.inner = nnx.Linear(64, 32, rngs=rngs)
        self.outer = nnx.Linear(32, 10, rngs=rngs)
        for layer, name in ((self.inner, "Dense_0"), (self.outer, "Dense_1")):
            layer.kernel[...] = params["params"][name]["kernel"]
            layer.bias[...] = params["params"][name]["bias"]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.outer(nnx.relu(self.inner(x)))

    def as_linen(self) -> Any:
        layers = {"Dense_0": self.inner, "Dense_1": self.outer}
        return {
            "params": {
                name: {"kernel": layer.kernel[...], "bias": layer.bias[...]}
                for name, layer in layers.items()
            }
        }


def nnx_loss(model: NNXMLP, mb: Any) -> jax.Array:
    return cross_entropy(unsharded_over(model(mb["x"]), "model"), mb["y"])


@pytest.mark.parametrize(("axis_type", "layout", "data_axis"), FLAX_CASES)
def test_nnx_train_step_equals_one_device_on_every_mesh(adam_run, axis_type, layout, data_axis):
    mesh = make_mesh(axis_type, layout)
    model = NNXMLP(fresh_params())
    state = nnx.state(model)
    specs = layout_specs(state, layout)
    kwargs: dict[str, Any] = {"data_axis": data_axis} if data_axis else {}
    if data_axis and axis_type == "auto":
        kwargs["param_specs"] = specs
    update = nnx.jit(jf.nnx_train_step(nnx_loss, K, **kwargs))
    nnx.update(model, place(state, mesh, specs))
    placed = model.as_linen()
    optimizer = nnx.Optimizer(model, ADAM, wrt=nnx.Param)
    with jax.set_mesh(mesh):
        for batch in batches():
            update(model, optimizer, shard_batch(batch, mesh))
    assert_trees_close(model.as_linen(), adam_run[0])
    if axis_type == "explicit" or (data_axis and layout == "fsdp"):
        assert_same_shardings(model.as_linen(), placed)


# --- inside the user's own shard_map ---------------------------------------------------


def pmeaned_loss(params: Any, batch: Any) -> jax.Array:
    return jax.lax.pmean(mean_loss(params, batch), "data")


@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
def test_step_that_pmeans_itself_inside_shard_map(full_batch, axis_type):
    """No option: a plain loop per device; the step's own pmean runs per micro-batch."""
    mesh = make_mesh(axis_type, "replicated")
    step = jaxaccum.accumulate(jax.value_and_grad(pmeaned_loss), K)
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
    params, batch = fresh_params(), shard_batch(digits_batch(N), mesh)
    with jax.set_mesh(mesh):
        out = fn(params, batch)
        report = jaxaccum.inspect.collectives(fn, params, batch)
    assert_trees_close(out, full_batch)
    assert report.counts(in_loop=True).get("all-reduce", 0) >= 1, report


@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
def test_axis_name_inside_shard_map_reduces_once_after_the_loop(full_batch, axis_type):
    """``axis_name=``: a plain loss; jaxaccum combines over the bound axis after the loop."""
    mesh = make_mesh(axis_type, "replicated")
    step = jaxaccum.accumulate(jax.value_and_grad(mean_loss), K, axis_name="data")
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
    params, batch = fresh_params(), shard_batch(digits_batch(N), mesh)
    with jax.set_mesh(mesh):
        out = fn(params, batch)
        report = jaxaccum.inspect.collectives(fn, params, batch)
    assert_trees_close(out, full_batch)
    assert report.in_loop == (), report
    reduced = sum(c.bytes for c in report.outside_loop if c.op == "all-reduce")
    assert reduced == nbytes(fresh_params()) + 4, report  # the gradient and the loss, once


def nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# --- Flax ImageNet-style pmap loop -----------------------------------------------------


def bn_loss(apply: Any, mb: Any) -> jax.Array:
    return cross_entropy(apply(mb["x"], train=True), mb["y"])


@functools.cache
def _bn_variables_on_host() -> Any:
    init = jax.jit(functools.partial(BNNet().init, train=False))
    return jax.tree.map(np.asarray, init(jax.random.key(0), jnp.zeros((2, 64))))


def bn_state(axis_name: str | None) -> Any:
    # SGD with momentum, not Adam: the first Dense's bias feeds a BatchNorm, so its true
    # gradient is 0 and Adam would blow its round-off up to full-size steps.
    variables = jax.tree.map(jnp.asarray, _bn_variables_on_host())
    return jf.TrainState.from_variables(
        BNNet(axis_name).apply, variables, optax.sgd(0.1, momentum=0.9)
    )


def per_device(batch: Any) -> Any:
    """The batch as ``pmap`` takes it: (devices, N / devices, ...), contiguous shards."""
    return jax.tree.map(lambda x: x.reshape(DEVICES, N // DEVICES, *x.shape[1:]), batch)


def first_replica(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[0], tree)


def replica_spread(tree: Any) -> float:
    return max(float(jnp.max(jnp.abs(x - x[:1]))) for x in jax.tree.leaves(tree))


def test_pmap_synchronised_batchnorm_three_steps_equal_one_device():
    """``BatchNorm(axis_name="batch")`` under ``pmap``: device d's strided micro-batch j is
    examples 16d + j + 4i, so micro-batch j over all devices is examples j, j+4, ... — one
    device's strided micro-batch j, whose statistics the synchronised BatchNorm computes."""
    one, update = bn_state(None), jax.jit(jf.train_step(bn_loss, K))
    many = jax_utils.replicate(bn_state("batch"))
    pupdate = jax.pmap(jf.train_step(bn_loss, K, axis_name="batch"), axis_name="batch")
    for batch in batches():
        one, metrics = update(one, batch)
        many, many_metrics = pupdate(many, per_device(batch))
    assert_trees_close(first_replica(many_metrics.loss), metrics.loss)
    assert_trees_close(first_replica(many.params), one.params)
    assert_trees_close(first_replica(many.collections), one.collections)
    assert replica_spread((many.params, many.collections)) == 0.0
    # negative control: without axis_name every replica follows its own gradient, and the
    # step says so
    naive = jax.pmap(jf.train_step(bn_loss, K), axis_name="batch")
    with pytest.warns(UserWarning, match=r"without naming them in axis_name="):
        naive_state, _ = naive(jax_utils.replicate(bn_state("batch")), per_device(batches()[0]))
    assert replica_spread(naive_state.params) > 1e-3


def test_pmap_flax_step_reduces_every_output_once_after_the_loop():
    state = jf.TrainState.from_variables(MLP().apply, fresh_params(), ADAM)
    pupdate = jax.pmap(jf.train_step(linen_loss, K, axis_name="batch"), axis_name="batch")
    report = jaxaccum.inspect.collectives(
        pupdate, jax_utils.replicate(state), per_device(digits_batch(N))
    )
    assert report.in_loop == (), report
    reduced = sum(c.bytes for c in report.outside_loop if c.op == "all-reduce")
    # gradient, loss sum, weight, the k per-micro-batch losses, the all-finite flag (int32)
    assert reduced == nbytes(fresh_params()) + 4 + 4 + 4 * K + 4, report


def test_pmap_optax_train_step_equals_one_device(adam_run):
    step = jaxaccum.train_step(mean_loss, ADAM, K, axis_name="batch")
    state = jax_utils.replicate(step.init(fresh_params()))
    pupdate = jax.pmap(step.update, axis_name="batch")
    losses = []
    for batch in batches():
        state, metrics = pupdate(state, per_device(batch))
        losses.append(metrics.loss[0])
    assert_trees_close(first_replica(state.params), adam_run[0])
    assert_trees_close(jnp.stack(losses), adam_run[1])
    assert replica_spread(state.params) == 0.0


def test_a_step_without_axis_name_warns_under_pmap_and_shard_map():
    """Built without ``axis_name=`` and mapped per device, each replica would apply its own
    gradient and drift apart: the step says so, naming the option. The same loops with
    ``axis_name=`` (the tests above) run under filterwarnings=error: silent, and exact."""
    step = jaxaccum.train_step(mean_loss, ADAM, K)
    batch = batches()[0]
    state = jax_utils.replicate(step.init(fresh_params()))
    with pytest.warns(UserWarning, match=r"without naming them in axis_name=.*'batch'"):
        jax.pmap(step.update, axis_name="batch")(state, per_device(batch))
    mesh = make_mesh("explicit", "replicated")
    local = jax.shard_map(
        lambda s, b: step.update(s, b)[1].loss,
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P(),
        check_vma=False,
    )
    with pytest.warns(UserWarning, match=r"axis_name='data'"):
        jax.jit(local)(step.init(fresh_params()), shard_batch(batch, mesh))


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_batch_not_on_the_mesh_names_the_leaf_and_the_fix(jit):
    """An unplaced batch on an Explicit mesh: a committed array outside jit, a replicated
    type inside it."""
    mesh = make_mesh("explicit", "replicated")
    fn = jaxaccum.accumulate(jax.value_and_grad(mean_loss), K, data_axis="data")
    fn = jax.jit(fn) if jit else fn
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"batch leaf \S*\['x'\].*device_put"):
        fn(fresh_params(), digits_batch(N))


def test_mesh_without_the_axis_lists_its_axes():
    mesh = make_mesh("explicit", "tp")
    fn = jaxaccum.accumulate(jax.value_and_grad(mean_loss), K, data_axis="batch", mesh=mesh)
    with pytest.raises(ValueError, match=r"\['batch'\] are not axes.*\['data', 'model'\]"):
        fn(fresh_params(), shard_batch(digits_batch(N), mesh))


def test_axis_name_outside_shard_map_or_pmap():
    fn = jaxaccum.accumulate(jax.value_and_grad(mean_loss), K, axis_name="data")
    with pytest.raises(ValueError, match=r"axis_name=\('data',\) is not bound.*shard_map"):
        fn(fresh_params(), digits_batch(N))


def test_data_axis_and_axis_name_together():
    with pytest.raises(ValueError, match="not both"):
        jaxaccum.accumulate(jax.value_and_grad(mean_loss), K, data_axis="data", axis_name="data")


@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
def test_nnx_step_inside_shard_map_with_axis_name_equals_one_device(adam_run, axis_type):
    """The NNX step under the caller's ``jax.shard_map`` with ``axis_name=``: model and
    optimizer replicated, the batch split over ``"data"``; three steps equal one device."""
    mesh = make_mesh(axis_type, "replicated")
    model = NNXMLP(fresh_params())
    optimizer = nnx.Optimizer(model, ADAM, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    step = jf.nnx_train_step(nnx_loss, K, axis_name="data")

    def local(state: Any, batch: Any) -> tuple[Any, jax.Array]:
        model, optimizer = nnx.merge(graphdef, state)
        metrics = step(model, optimizer, batch)
        return nnx.state((model, optimizer)), metrics.loss

    update = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P(), P()))
    )
    losses = []
    with jax.set_mesh(mesh):
        for batch in batches():
            state, loss = update(state, shard_batch(batch, mesh))
            losses.append(loss)
    model, _ = nnx.merge(graphdef, state)
    assert_trees_close(model.as_linen(), adam_run[0])
    assert_trees_close(jnp.stack(losses), adam_run[1])


@pytest.mark.parametrize("where", ["jit", "shard_map"])
def test_the_step_sees_the_micro_batch_with_its_whole_type(where):
    """The step's one trace (the loop runs it) gets a micro-batch typed like the batch:
    sharded over ``"data"`` on an Explicit mesh under ``jax.jit``, varying over ``"data"``
    inside the caller's ``shard_map``."""
    mesh = make_mesh("explicit", "replicated")
    seen: list[Any] = []

    def step(params: Any, batch: Any) -> Any:
        seen.append(jax.typeof(batch["x"]))
        loss = pmeaned_loss if where == "shard_map" else mean_loss
        return jax.value_and_grad(loss)(params, batch)

    fn = jaxaccum.accumulate(step, K)
    if where == "shard_map":
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    params = place(fresh_params(), mesh, layout_specs(fresh_params(), "replicated"))
    with jax.set_mesh(mesh):
        jax.jit(fn).trace(params, shard_batch(digits_batch(N), mesh))
    assert len(seen) == 1, seen
    for aval in seen:
        if where == "jit":
            assert aval.sharding.spec[0] == "data", aval
        else:
            assert "data" in aval.mat.varying, aval


# --- hybrid sharding, presplit batches, carried counters, spec mistakes -----------------


@pytest.mark.parametrize("fsdp", ["per_microbatch", "gather_once"])
@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
def test_hybrid_sharding_sums_the_replicas_once(full_batch, axis_type, fsdp):
    """Data over ("replica", "fsdp") (2 × 4), params sharded over "fsdp" only: the gradient
    is reduce-scattered over "fsdp" and summed over the two replicas, equal to one device
    and left in the params' sharding."""
    kind = AXIS_TYPES[axis_type]
    mesh = jax.make_mesh((2, 4), ("replica", "fsdp"), axis_types=(kind, kind))
    specs = jax.tree.map(lambda x: P("fsdp") if x.ndim == 2 else P(), fresh_params())
    params = place(fresh_params(), mesh, specs)
    batch = jax.device_put(digits_batch(N), NamedSharding(mesh, P(("replica", "fsdp"))))
    kwargs = {"in_specs": (specs,)} if axis_type == "auto" else {}
    grad_fn = jaxaccum.accumulate(
        jax.value_and_grad(mesh_loss), K, data_axis=("replica", "fsdp"), fsdp=fsdp, **kwargs
    )
    with jax.set_mesh(mesh):
        loss, grads = jax.jit(grad_fn)(params, batch)
    assert_trees_close((loss, grads), full_batch)
    assert_same_shardings(grads, params)


def test_presplit_batch_on_an_explicit_mesh(full_batch):
    """``split="presplit"``: the batch is (k, N/k, ...) sharded over its second axis."""
    mesh = make_mesh("explicit", "replicated")
    presplit = jax.tree.map(lambda x: x.reshape(K, N // K, *x.shape[1:]), digits_batch(N))
    batch = jax.device_put(presplit, NamedSharding(mesh, P(None, "data")))
    params = place(fresh_params(), mesh, layout_specs(fresh_params(), "replicated"))
    grad_fn = jaxaccum.accumulate(
        jax.value_and_grad(mean_loss), K, split="presplit", data_axis="data"
    )
    with jax.set_mesh(mesh):
        out = jax.jit(grad_fn)(params, batch)
    assert_trees_close(out, full_batch)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"axis 1\) sharded over"):
        jax.jit(grad_fn)(params, jax.device_put(presplit, NamedSharding(mesh, P())))


def test_axis_name_keeps_an_integer_counter_replicated():
    """A carried counter under ``axis_name=`` stays invariant: the caller's ``out_specs=P()``
    accepts it, and it counts the k micro-batches once."""
    mesh = make_mesh("explicit", "replicated")

    def step(params: Any, batch: Any, count: jax.Array) -> Any:
        return jax.value_and_grad(mean_loss)(params, batch), count + 1

    grad_fn = jaxaccum.accumulate(step, K, carry_argnums=2, axis_name="data")
    fn = jax.jit(jax.shard_map(grad_fn, mesh=mesh, in_specs=(P(), P("data"), P()), out_specs=P()))
    with jax.set_mesh(mesh):
        (_, _), count = fn(fresh_params(), shard_batch(digits_batch(N), mesh), jnp.int32(0))
    assert int(count) == K


def one_spec(layer: str, name: str, spec: P) -> Any:
    """Replicated specs for the test MLP's params, except ``spec`` at one leaf."""
    specs = layout_specs(fresh_params(), "replicated")
    specs["params"][layer][name] = spec
    return specs


@pytest.mark.parametrize(
    ("in_specs", "by_keyword", "match"),
    [
        ((one_spec("Dense_0", "kernel", P("data", None, None)),), False, "3 entries"),
        ((one_spec("Dense_1", "bias", P("data")),), False, "does not split into 8"),
        ((P(), P(), P()), False, "in_specs has 3 entries"),
        ((P(),), True, "passed by keyword"),
    ],
)
def test_spec_mistakes_name_the_leaf_and_the_fix(in_specs, by_keyword, match):
    mesh = make_mesh("auto", "replicated")
    grad_fn = jaxaccum.accumulate(
        jax.value_and_grad(mean_loss), K, data_axis="data", in_specs=in_specs
    )
    params, batch = fresh_params(), shard_batch(digits_batch(N), mesh)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=match):
        if by_keyword:
            jax.jit(grad_fn)(params=params, batch=batch)
        else:
            jax.jit(grad_fn)(params, batch)


def test_a_spec_that_contradicts_an_explicit_type_names_in_specs():
    """Replicated params on an Explicit mesh given ``in_specs=(P("data"), None)``: never
    shard_map's raw mismatch error, but one naming ``in_specs``, the leaf and the fix."""
    mesh = make_mesh("explicit", "replicated")
    params = jax.device_put(fresh_params(), NamedSharding(mesh, P()))
    specs = jax.tree.map(lambda x: P("data") if x.ndim == 2 else P(), params)
    grad_fn = jaxaccum.accumulate(
        jax.value_and_grad(mean_loss), K, data_axis="data", in_specs=(specs, None)
    )
    match = (
        r"in_specs gives P\('data',\) for argument 0\['params'\]\['Dense_0'\]\['kernel'\], "
        r"but its type is laid out as P\(None, None\); on Explicit mesh axes the type decides"
    )
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=match):
        jax.jit(grad_fn)(params, shard_batch(digits_batch(N), mesh))


# --- Parity features over devices: early stop, a batch axis other than 0, reductions ---


def _parity_step(params: Any, batch: Any) -> Any:
    logits = batch["x"] @ params
    return {"loss": jnp.mean(logits**2), "rows": logits, "top": jnp.max(logits)}


ROOT_SUM_SQUARES = jaxaccum.Reduction(
    init=lambda info: jnp.zeros(info.out.shape, jnp.float32),
    update=lambda acc, x, index, weight: acc + x.astype(jnp.float32) ** 2,
    finalize=lambda acc, info, count, weight_sum: jnp.sqrt(acc),
    aggregate=lambda v: jnp.sqrt(jnp.sum(v**2, axis=0)),
    name="root_sum_squares",
)


@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
def test_parity_features_with_data_axis_equal_one_device(axis_type):
    """``num_real_microbatches`` (traced), CONCAT (the batch's example order), a user
    reduction and ``in_axes=1`` under ``data_axis`` on 8 devices: in global view each is
    what one device computes."""
    mesh = make_mesh(axis_type, "replicated")
    batch = digits_batch(N)
    w = jax.random.normal(jax.random.key(0), (64,)) * 0.1
    reduce = {"loss": "mean", "rows": "concat", "top": ROOT_SUM_SQUARES}

    def run(m: Any, data_axis: Any) -> Any:
        f = jaxaccum.accumulate(
            _parity_step, K, reduce=reduce, data_axis=data_axis, num_real_microbatches=m
        )
        return jax.jit(f)(w, shard_batch(batch, mesh) if data_axis else batch)

    with jax.set_mesh(mesh):
        for m in (jnp.int32(K), jnp.int32(2)):
            assert_trees_close(run(m, "data"), run(m, None))
    assert_trees_close(run(jnp.int32(K), None)["rows"], batch["x"] @ w)
    tm = {"x": jnp.stack([batch["x"], batch["x"]]), "y": jnp.stack([batch["y"], batch["y"]])}
    with jax.set_mesh(mesh):
        tm = jax.device_put(tm, NamedSharding(mesh, P(None, "data")))
        g = jax.jit(
            jaxaccum.accumulate(
                lambda w, b: jnp.mean((b["x"] @ w) ** 2), K, data_axis="data", in_axes=1
            )
        )
        assert_trees_close(g(w, tm), jnp.mean((batch["x"] @ w) ** 2))


@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
@pytest.mark.parametrize("split", ["strided", "contiguous", "presplit"])
def test_concat_and_stack_keep_the_example_order_over_devices(axis_type, split):
    """CONCAT gives the batch's order with ``data_axis`` for every split it takes (a
    contiguous split over Explicit data axes is refused by name), and STACK/CONCAT carries
    follow the output's sharding type without ``data_axis``."""
    mesh = make_mesh(axis_type, "replicated")
    x = jnp.arange(N * 2, dtype=jnp.float32).reshape(N, 2)
    batch = x.reshape(K, N // K, 2) if split == "presplit" else x
    spec = P(None, "data") if split == "presplit" else P("data")
    step = lambda b: b * 10.0  # noqa: E731
    refused = split == "contiguous" and axis_type == "explicit"
    with jax.set_mesh(mesh):
        placed = jax.device_put(batch, NamedSharding(mesh, spec))
        for data_axis in ("data", None):
            f = jaxaccum.accumulate(
                step, K, batch_argnums=0, reduce="concat", split=split, data_axis=data_axis
            )
            if refused:
                with pytest.raises(ValueError, match="split='contiguous' cannot"):
                    jax.jit(f)(placed)
                continue
            assert np.array_equal(np.asarray(jax.jit(f)(placed)), np.asarray(x * 10.0))
        stack_split = "strided" if refused else split
        stacked = jax.jit(
            jaxaccum.accumulate(step, K, batch_argnums=0, reduce="stack", split=stack_split)
        )(placed)
    one = jaxaccum.accumulate(step, K, batch_argnums=0, reduce="stack", split=stack_split)(batch)
    assert np.array_equal(np.asarray(stacked), np.asarray(one))


@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
def test_last_with_weights_over_devices_equals_one_device(axis_type):
    """LAST with weights under ``data_axis``: the last micro-batch's output, computed over
    every device's part of it, as one device computes it."""
    mesh = make_mesh(axis_type, "replicated")
    x = jnp.arange(N, dtype=jnp.float32)
    m = jnp.ones(N).at[1::4].set(0.0)

    def step(b):
        return jnp.where(b["m"].sum() > 0, (b["x"] * b["m"]).sum() / b["m"].sum(), jnp.nan)

    kwargs = {"batch_argnums": 0, "reduce": "last", "weight_fn": lambda b: b["m"].sum()}
    one = jaxaccum.accumulate(step, 2, **kwargs)({"x": x, "m": m})
    with jax.set_mesh(mesh):
        f = jax.jit(jaxaccum.accumulate(step, 2, data_axis="data", **kwargs))
        got = f(jax.device_put({"x": x, "m": m}, NamedSharding(mesh, P("data"))))
    assert float(got) == pytest.approx(float(one), rel=1e-6)


@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
def test_concat_and_aggregated_reductions_come_out_invariant_under_check_vma(axis_type):
    """Inside a caller's ``shard_map`` with the default ``check_vma=True``: CONCAT and a
    user reduction with ``aggregate`` but no ``combine`` are the same on every device, so
    ``out_specs=P()`` takes them, and they equal one device's (the user reduction
    aggregates the devices' results); one with neither is refused by name."""
    mesh = make_mesh(axis_type, "replicated")
    batch = digits_batch(N)
    w = jax.random.normal(jax.random.key(0), (64,)) * 0.1
    reduce = {"loss": "mean", "rows": "concat", "top": ROOT_SUM_SQUARES}
    local = jaxaccum.accumulate(_parity_step, K, reduce=reduce, axis_name="data")
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
    with jax.set_mesh(mesh):
        out = fn(w, shard_batch(batch, mesh))
    assert_trees_close(out["loss"], jnp.mean((batch["x"] @ w) ** 2))
    assert_trees_close(out["rows"], batch["x"] @ w)  # every example, in the batch's order
    per = N // DEVICES
    tops = jnp.stack(
        [jnp.max(batch["x"][d * per :][j:per:K] @ w) for d in range(DEVICES) for j in range(K)]
    )
    assert_trees_close(out["top"], jnp.sqrt(jnp.sum(tops**2)))
    no_aggregate = jaxaccum.Reduction(
        init=ROOT_SUM_SQUARES.init,
        update=ROOT_SUM_SQUARES.update,
        finalize=ROOT_SUM_SQUARES.finalize,
    )
    bad = jaxaccum.accumulate(
        _parity_step, K, reduce={**reduce, "top": no_aggregate}, axis_name="data"
    )
    bad_fn = jax.jit(jax.shard_map(bad, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
    with jax.set_mesh(mesh), pytest.raises(TypeError, match="neither combine nor aggregate"):
        bad_fn(w, shard_batch(batch, mesh))


@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
def test_axis_name_with_a_count_per_device(axis_type):
    """Inside a caller's shard_map each device may run its own number of micro-batches;
    the mean divides by their sum over devices."""
    mesh = make_mesh(axis_type, "replicated")
    x = jnp.arange(N, dtype=jnp.float32)
    counts = jnp.array([K, 1, 2, 3, K, 0, 1, 2], jnp.int32)

    def local(b, m):
        mine = m[jax.lax.axis_index("data")]
        return jaxaccum.accumulate(
            lambda b: b.mean(), K, batch_argnums=0, axis_name="data", num_real_microbatches=mine
        )(b)

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P()), out_specs=P()))
    with jax.set_mesh(mesh):
        got = fn(jax.device_put(x, NamedSharding(mesh, P("data"))), counts)
    per = N // DEVICES
    means = [
        float(np.asarray(x)[d * per + j : (d + 1) * per : K].mean())
        for d in range(DEVICES)
        for j in range(int(counts[d]))
    ]
    assert float(got) == pytest.approx(sum(means) / len(means), rel=1e-6)
