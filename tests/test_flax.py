"""Flax linen: collections carried through the micro-batches, BatchNorm modes, dropout keys.

References are written out here with plain Flax and Optax: a Python loop of ``apply`` calls
with ``mutable=["batch_stats"]``, or one full-batch step. Tolerances: 1e-6 where the
reference does the same float32 operations up to the summation order of the gradient, 1e-5
for merged statistics and for normalisations without batch statistics. The optimizer is SGD:
a bias right before a normalisation layer has a gradient of pure round-off (the layer removes
its effect), which Adam would blow up to the full learning rate.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax.training import train_state
from flax.training.dynamic_scale import DynamicScale
from helpers import assert_trees_close, digits_batch, trees_equal

import jaxaccum
import jaxaccum.flax as jf

K = 4
N = 64


class BNNet(nn.Module):
    """Dense -> BatchNorm -> ReLU -> Dense, or BatchNorm first with ``bn_first``."""

    bn_first: bool = False
    norm: str = "batch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.bn_first:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dense(32)(x)
        if self.norm == "batch":
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        elif self.norm == "group":
            x = nn.GroupNorm(num_groups=4)(x)
        else:
            x = nn.LayerNorm()(x)
        return nn.Dense(10)(nn.relu(x))


def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def loss_fn(apply: Any, mb: dict[str, jax.Array]) -> jax.Array:
    return xent(apply(mb["x"], train=True), mb["y"])


def make_state(model: nn.Module, tx: Any = None, key: Any = None) -> jf.TrainState:
    variables = model.init(jax.random.key(0), jnp.zeros((2, 64)), train=False)
    return jf.TrainState.from_variables(model.apply, variables, tx or optax.sgd(0.1), key=key)


def strided(batch: dict[str, jax.Array], j: int) -> dict[str, jax.Array]:
    return jax.tree.map(lambda x: x[j::K], batch)


@pytest.fixture(scope="module")
def batch() -> dict[str, jax.Array]:
    return digits_batch(N)


def test_sequential_equals_python_loop_of_mutable_applies(batch):
    model = BNNet()
    state = make_state(model)
    step = jax.jit(jf.train_step(loss_fn, K))
    got, metrics = step(state, batch)

    # Reference: k apply(..., mutable=["batch_stats"]) calls in order, mean gradient, one step.
    stats, grads = state.collections["batch_stats"], []
    for j in range(K):

        def micro_loss(params, stats=stats, j=j):
            logits, new = model.apply(
                {"params": params, "batch_stats": stats},
                strided(batch, j)["x"],
                train=True,
                mutable=["batch_stats"],
            )
            return xent(logits, strided(batch, j)["y"]), new["batch_stats"]

        (_, stats), g = jax.value_and_grad(micro_loss, has_aux=True)(state.params)
        grads.append(g)
    mean = jax.tree.map(lambda *g: sum(g) / K, *grads)
    want = state.apply_gradients(grads=mean)

    assert bool(metrics.applied) and int(got.step) == 1
    assert_trees_close(got.params, want.params, rtol=1e-6, atol=1e-6)
    assert_trees_close(got.collections["batch_stats"], stats, rtol=1e-6, atol=1e-6)


def test_exact_running_statistics_equal_the_full_batch_step(batch):
    model = BNNet(bn_first=True)
    state = make_state(model)
    got, _ = jax.jit(jf.train_step(loss_fn, K, batch_norm="exact"))(state, batch)

    _, full = model.apply(
        {"params": state.params, **state.collections}, batch["x"], train=True,
        mutable=["batch_stats"],
    )  # fmt: skip
    first = "BatchNorm_0"  # sees the raw input: its statistics do not depend on the params
    want = full["batch_stats"][first]
    assert_trees_close(got.collections["batch_stats"][first], want, rtol=1e-5, atol=1e-5)

    # Negative control: sequential mode takes k momentum updates from micro-batch stats.
    seq, _ = jax.jit(jf.train_step(loss_fn, K))(state, batch)
    gap = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), seq.collections["batch_stats"][first], want
    )
    assert max(jax.tree.leaves(gap)) > 1e-3, gap


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_group_and_layer_norm_equal_the_full_batch_with_a_plain_train_state(batch, norm):
    model = BNNet(norm=norm)
    params = model.init(jax.random.key(0), jnp.zeros((2, 64)), train=False)["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
    step = jax.jit(jf.train_step(loss_fn, K))
    want = state
    for _ in range(3):
        state, _ = step(state, batch)
        g = jax.grad(
            lambda p: xent(model.apply({"params": p}, batch["x"], train=True), batch["y"])
        )(want.params)
        want = want.apply_gradients(grads=g)
    assert_trees_close(state.params, want.params, rtol=1e-5, atol=1e-5)


class Counter(nn.Module):
    """Counts calls and records each call's input mean, in collection ``stats``."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        calls = self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
        seen = self.variable("stats", "mean", lambda: jnp.zeros((), jnp.float32))
        calls.value += 1
        seen.value = x.mean()
        return nn.Dense(1)(x)[:, 0]


@pytest.mark.parametrize(
    ("mode", "expect"),
    [
        ("mean", lambda ms: sum(ms) / K),
        ("sum", lambda ms: sum(ms)),
        ("max", lambda ms: max(ms)),
        ("last", lambda ms: ms[-1]),
    ],
)
def test_collection_modes(batch, mode, expect):
    model = Counter()
    state = make_state(model)
    step = jf.train_step(
        lambda apply, mb: jnp.mean(apply(mb["x"]) ** 2), K, collections={"stats": mode}
    )
    got, _ = jax.jit(step)(state, batch)
    means = [float(strided(batch, j)["x"].mean()) for j in range(K)]
    # Sequential: one call per micro-batch, after the one that init made.
    assert int(got.collections["counters"]["calls"]) == 1 + K
    assert float(got.collections["stats"]["mean"]) == pytest.approx(expect(means), rel=1e-6)


class Dropper(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(10)(x)


def test_dropout_keys_differ_per_micro_batch_and_reproduce(batch):
    same = jax.tree.map(lambda x: jnp.concatenate([x[:16]] * K), batch)  # identical micro-batches
    state = make_state(Dropper(), key=jax.random.key(7))
    step = jax.jit(jf.train_step(loss_fn, K, split="contiguous"))
    a, ma = step(state, same)
    b, mb = step(state, same)
    assert len(set(ma.losses.tolist())) == K  # a different mask in every micro-batch
    assert trees_equal(a.params, b.params) and bool(jnp.array_equal(ma.losses, mb.losses))
    _, next_metrics = step(a, same)
    assert not bool(jnp.array_equal(next_metrics.losses[0], ma.losses[0]))  # new step, new key


def test_dropout_without_a_key_explains_the_fix(batch):
    state = make_state(Dropper())  # no key
    with pytest.raises(TypeError, match=r"key=jax.random.key\(0\)"):
        jf.train_step(loss_fn, K)(state, batch)


def test_mode_for_a_missing_collection(batch):
    state = make_state(BNNet())
    with pytest.raises(ValueError, match=r"names \['stats'\].*holds \['batch_stats'\]"):
        jf.train_step(loss_fn, K, collections={"stats": "mean"})(state, batch)


def test_nonfinite_skips_the_update_and_keeps_the_collections(batch):
    state = make_state(BNNet())
    bad = {"x": batch["x"].at[5].set(jnp.nan), "y": batch["y"]}
    got, metrics = jax.jit(jf.train_step(loss_fn, K))(state, bad)
    assert not bool(metrics.applied) and int(got.skipped) == 1 and int(got.step) == 0
    assert trees_equal(got.params, state.params)
    assert trees_equal(got.collections, state.collections)


def test_no_collections_given_shows_the_corrected_call(batch):
    model = BNNet()
    params = model.init(jax.random.key(0), jnp.zeros((2, 64)), train=False)["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]") as info:
        jf.train_step(loss_fn, K)(state, batch)
    assert "TrainState.from_variables(model.apply, model.init(key, x), tx)" in str(info.value)


class Appender(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        self.sow("intermediates", "h", x.mean())
        return nn.Dense(1)(x)[:, 0]


def test_collection_changing_structure_is_explained(batch):
    model = Appender()
    variables = model.init(jax.random.key(0), jnp.zeros((2, 64)), mutable=True)
    state = jf.TrainState.from_variables(model.apply, variables, optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"(?s)intermediates.*reduce_fn=lambda a, b: b"):
        jf.train_step(lambda apply, mb: jnp.mean(apply(mb["x"])), K)(state, batch)


class Cache(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        cache = self.variable("cache", "rows", lambda: jnp.zeros(x.shape[0]))
        cache.value = x.mean(axis=1)  # sized by the batch: wrong for micro-batches
        return nn.Dense(1)(x)[:, 0]


def test_collection_changing_shape_names_the_leaf_and_the_fix(batch):
    state = make_state(Cache())  # initialised with 2 rows, micro-batches have 16
    with pytest.raises(ValueError, match=r"cache\['Cache_0'\]|cache\['rows'\]") as info:
        jf.train_step(lambda apply, mb: jnp.mean(apply(mb["x"])), K)(state, batch)
    assert "has (16,) float32, not (2,) float32" in str(info.value)
    assert "model.init(key, x[: N // k])" in str(info.value)


class NotBatchNorm(nn.Module):
    """Writes the input mean into ``batch_stats`` without being a BatchNorm."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        seen = self.variable("batch_stats", "mean", lambda: jnp.zeros((), jnp.float32))
        seen.value = x.mean()
        return nn.Dense(1)(x)[:, 0]


def test_exact_mode_rejects_statistics_of_other_modules(batch):
    state = make_state(NotBatchNorm())
    step = jf.train_step(lambda apply, mb: jnp.mean(apply(mb["x"])), K, batch_norm="exact")
    with pytest.raises(ValueError, match=r"batch_stats\['mean'\] is not the running mean"):
        step(state, batch)


def test_contradicting_collection_options_are_refused_when_the_step_is_built():
    with pytest.raises(ValueError, match=r"collections names 'batch_stats'.*batch_norm="):
        jf.train_step(loss_fn, K, collections={"batch_stats": "mean"})
    with pytest.raises(ValueError, match=r"nonfinite='drop'.*'batch_stats'"):
        jf.train_step(loss_fn, K, batch_norm="exact", nonfinite="drop")
    with pytest.raises(ValueError, match=r"nonfinite='drop'.*'stats': 'mean'"):
        jf.train_step(loss_fn, K, collections={"stats": "mean"}, nonfinite="drop")
    with pytest.raises(ValueError, match=r"collections\['stats'\]='exact'"):
        jf.train_step(loss_fn, K, collections={"stats": "exact"})  # batch_norm= says exact


def test_bad_options():
    with pytest.raises(ValueError, match="batch_norm='running'"):
        jf.train_step(loss_fn, K, batch_norm="running")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"collections\['stats'\]='avg'"):
        jf.train_step(loss_fn, K, collections={"stats": "avg"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="k"):
        jf.train_step(loss_fn, 0)
    with pytest.raises(TypeError, match="collections must be a mapping"):
        jf.train_step(loss_fn, K, collections="batch_stats")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"rngs must be a sequence of PRNG stream names.*\('dropout',\)"
    ):
        jf.train_step(loss_fn, K, rngs="dropout")


def test_a_state_without_the_collection_says_it_is_absent(batch):
    model = BNNet()
    params = model.init(jax.random.key(0), jnp.zeros((2, 64)), train=False)["params"]
    state = jf.TrainState.from_variables(model.apply, {"params": params}, optax.sgd(0.1))
    with pytest.raises(ValueError, match="uses a variable collection the state does not hold"):
        jf.train_step(loss_fn, K)(state, batch)


def test_errors_name_the_batch_as_the_loss_receives_it(batch):
    state = make_state(BNNet())
    with pytest.raises(ValueError, match=r"batch size 64 at leaf batch\['x'\] is not divisible"):
        jf.train_step(loss_fn, 5)(state, batch)


def two_view_loss(apply: Any, mb: dict[str, jax.Array]) -> jax.Array:
    """Two apply calls in one loss (two views of the micro-batch)."""
    return 0.5 * (loss_fn(apply, mb) + loss_fn(apply, mb | {"x": mb["x"][::-1]}))


def test_two_apply_calls_thread_sequential_collections(batch):
    """Sequential collections: the second call sees the first call's update, as two
    mutable applies threaded by hand do; nothing is dropped."""
    state = make_state(BNNet())
    got, _ = jf.train_step(two_view_loss, 1, batch_norm="sequential")(state, batch)
    variables = {"params": state.params, **state.collections}
    _, first = state.apply_fn(variables, batch["x"], train=True, mutable=["batch_stats"])
    _, second = state.apply_fn(
        {"params": state.params, **first}, batch["x"][::-1], train=True, mutable=["batch_stats"]
    )
    assert_trees_close(got.collections["batch_stats"], second["batch_stats"])


def test_two_apply_calls_with_exact_statistics_raise(batch):
    state = make_state(BNNet())
    with pytest.raises(ValueError, match=r"called apply 2 times in one micro-batch.*batch_stats"):
        jf.train_step(two_view_loss, K, batch_norm="exact")(state, batch)


class PmapBNNet(nn.Module):
    """``BNNet`` written for pmap, as Flax's ImageNet example is: BatchNorm over "batch"."""

    axis_name: str | None = "batch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)
        return nn.Dense(10)(nn.relu(x))


@pytest.mark.parametrize("batch_norm", ["sequential", "exact"])
def test_batchnorm_with_an_axis_name_runs_on_one_device(batch, batch_norm):
    """No pmap, no axis_name=: the model's "batch" axis is bound with size 1, and the step
    equals the same model without an axis name."""
    step = jax.jit(jf.train_step(loss_fn, K, batch_norm=batch_norm))
    pmap_style, _ = step(make_state(PmapBNNet()), batch)
    plain, _ = step(make_state(PmapBNNet(axis_name=None)), batch)
    assert trees_equal(pmap_style.params, plain.params)
    assert trees_equal(pmap_style.collections, plain.collections)


def test_the_loss_can_reach_the_params(batch):
    """Weight decay written in the loss: ``loss_fn(apply, batch, params)`` gets the params
    being differentiated; the step equals the full batch with the same loss."""

    def decayed(apply: Any, mb: dict[str, jax.Array], params: Any) -> jax.Array:
        l2 = sum(jnp.sum(w**2) for w in jax.tree.leaves(params))
        return loss_fn(apply, mb) + 1e-2 * l2

    model = BNNet(norm="layer")  # nothing depends on other examples: exact at any k
    state = make_state(model)
    got, _ = jf.train_step(decayed, K)(state, batch)
    full, _ = jf.train_step(decayed, 1)(state, batch)
    assert_trees_close(got.params, full.params)
    plain, _ = jf.train_step(loss_fn, 1)(state, batch)
    assert not trees_equal(plain.params, full.params)  # the decay term took effect


class FlaxExampleState(train_state.TrainState):
    """The flax/examples pattern: Flax's own TrainState with a ``batch_stats`` field."""

    batch_stats: Any = None


@pytest.mark.parametrize("batch_norm", ["sequential", "exact"])
def test_flax_own_train_state_with_a_batch_stats_field(batch, batch_norm):
    """Flax's TrainState subclassed as flax/examples do: the step reads and writes
    ``state.batch_stats`` and equals the same step on jaxaccum's TrainState."""
    model = BNNet()
    variables = model.init(jax.random.key(0), jnp.zeros((2, 64)), train=False)
    theirs = FlaxExampleState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(0.1),
        batch_stats=variables["batch_stats"],
    )
    step = jax.jit(jf.train_step(loss_fn, K, batch_norm=batch_norm))
    got, _ = step(theirs, batch)
    want, _ = step(make_state(model), batch)
    assert isinstance(got, FlaxExampleState)
    assert trees_equal(got.params, want.params)
    assert trees_equal(got.batch_stats, want.collections["batch_stats"])
    assert not trees_equal(got.batch_stats, variables["batch_stats"])  # updated


def test_aux_reduce_concat_gives_every_example_logits_for_metrics_after_the_step(batch):
    """The ImageNet example's pattern: logits come back as aux; metrics are computed after."""
    model = BNNet(norm="group")  # per-example normalisation: logits equal the full batch's

    def with_logits(apply: Any, mb: dict[str, jax.Array]) -> Any:
        logits = apply(mb["x"], train=True)
        return xent(logits, mb["y"]), {"logits": logits, "loss": xent(logits, mb["y"])}

    state = make_state(model)
    spec = {"logits": "concat", "loss": None}
    step = jax.jit(jf.train_step(with_logits, K, has_aux=True, aux_reduce=spec))
    _, metrics = step(state, batch)
    full = model.apply({"params": state.params}, batch["x"], train=True)
    assert metrics.aux["logits"].shape == (N, 10)
    assert_trees_close(metrics.aux["logits"], full, rtol=1e-5, atol=1e-6)
    accuracy = jnp.mean(jnp.argmax(metrics.aux["logits"], -1) == batch["y"])
    assert float(accuracy) == float(jnp.mean(jnp.argmax(full, -1) == batch["y"]))
    assert abs(float(metrics.aux["loss"]) - float(xent(full, batch["y"]))) < 1e-5
    # negative control: the default averages the logits over micro-batches
    _, default = jax.jit(jf.train_step(with_logits, K, has_aux=True))(state, batch)
    assert default.aux["logits"].shape == (N // K, 10)


# --- loss scaling (float16 compute) ---------------------------------------------------------
#
# The model computes in float16 with float32 params, as Flax's ImageNet example does in half
# precision. The underflow tests weight the loss by 2**-22: the gradient then falls below
# float16's smallest subnormal (6e-8) on its way back through the float16 layers, and the
# learning rate of 2**22 makes the update the size of the plain loss's. Tolerance against the
# float32 full-batch reference: 5e-3 relative (measured 4e-4 with float16 compute).


class HalfNet(nn.Module):
    """Dense -> (BatchNorm) -> ReLU -> Dense, computed in ``dtype`` with float32 params."""

    dtype: Any = jnp.float16
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(32, dtype=self.dtype)(x)
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
        return nn.Dense(10, dtype=self.dtype)(nn.relu(x))


TINY = 2.0**-22


def tiny_loss(apply: Any, mb: dict[str, jax.Array]) -> jax.Array:
    return xent(apply(mb["x"], train=True).astype(jnp.float32), mb["y"]) * TINY


def half_loss(apply: Any, mb: dict[str, jax.Array]) -> jax.Array:
    """Cross-entropy in float16: a scale beyond 65504 overflows it."""
    return optax.softmax_cross_entropy_with_integer_labels(
        apply(mb["x"], train=True), mb["y"]
    ).mean()


def rel_err(tree: Any, ref: Any) -> float:
    diff = jax.tree.map(lambda a, b: a - b, tree, ref)
    return float(optax.tree.norm(diff) / optax.tree.norm(ref))


class HalfExampleState(train_state.TrainState):
    """Flax's ImageNet example's state in half precision: a DynamicScale field."""

    dynamic_scale: Any = None


def test_loss_scale_recovers_gradients_that_underflow_in_float16(batch):
    """With ``loss_scale=`` or a Flax DynamicScale in the state, the update equals the
    float32 full-batch one within 5e-3 (measured: 4e-4); without, it is all zeros."""
    variables = HalfNet().init(jax.random.key(0), batch["x"][:2], train=False)
    lr = 1 / TINY
    ref = jax.grad(
        lambda p: tiny_loss(
            lambda x, train: HalfNet(jnp.float32).apply({"params": p}, x, train=train), batch
        )
    )(variables["params"])
    want = jax.tree.map(lambda g: -lr * g, ref)  # the float32 full-batch SGD update

    def update(state: Any, **options: Any) -> tuple[Any, Any]:
        new, metrics = jax.jit(jf.train_step(tiny_loss, K, **options))(state, batch)
        assert bool(metrics.applied)
        return new, jax.tree.map(lambda a, b: a - b, new.params, variables["params"])

    def ours(**options: Any) -> jf.TrainState:
        copy = jax.tree.map(jnp.copy, variables)
        return jf.TrainState.from_variables(HalfNet().apply, copy, optax.sgd(lr), **options)

    scaling = jaxaccum.DynamicLossScale()
    new, delta = update(ours(loss_scale=scaling), loss_scale=scaling)
    assert rel_err(delta, want) < 5e-3
    assert float(new.loss_scale.scale) == 2.0**15 and int(new.loss_scale.good_steps) == 1
    theirs = HalfExampleState.create(
        apply_fn=HalfNet().apply,
        params=jax.tree.map(jnp.copy, variables["params"]),
        tx=optax.sgd(lr),
        dynamic_scale=DynamicScale(scale=2.0**15),
    )
    new, delta = update(theirs)
    assert rel_err(delta, want) < 5e-3
    assert int(new.dynamic_scale.fin_steps) == 1
    _, unscaled = update(ours())  # negative control: float16 flushes the gradient to zero
    assert rel_err(unscaled, want) > 0.5


def test_an_overflow_skips_the_update_lowers_the_scale_and_finite_steps_raise_it(batch):
    """2**16 overflows the float16 loss, 2**15 does not: with growth_interval=2 the scale
    cycles 2**16 (skip) -> 2**15, 2**15 (applied) -> grown to 2**16 -> skip ..."""
    variables = HalfNet(batch_norm=True).init(jax.random.key(0), batch["x"][:2], train=False)
    scaling = jaxaccum.DynamicLossScale(init_scale=2.0**16, growth_interval=2)
    step = jf.train_step(half_loss, K, loss_scale=scaling)
    state = step.init(HalfNet(batch_norm=True).apply, variables, optax.sgd(0.1, momentum=0.9))
    update = jax.jit(step)
    applied, scales = [], []
    for _ in range(6):
        before = state
        state, metrics = update(state, batch)
        applied.append(bool(metrics.applied))
        scales.append(float(state.loss_scale.scale))
        if not applied[-1]:  # everything but the counters and the scale is kept
            kept = ("params", "opt_state", "step", "collections")
            assert trees_equal(*[[getattr(s, f) for f in kept] for s in (state, before)])
    assert applied == [False, True, True, False, True, True]
    assert scales == [2.0**15, 2.0**15, 2.0**16, 2.0**15, 2.0**15, 2.0**16]
    assert int(state.skipped) == 2 and int(state.step) == 4


def flax_dynamic_scale_step(state: HalfExampleState, batch: dict[str, jax.Array]) -> Any:
    """Flax's own full-batch step: DynamicScale.value_and_grad, apply_gradients, and the
    update kept only where the gradient is finite (the ImageNet example's jnp.where)."""

    def loss(params: Any) -> jax.Array:
        return half_loss(lambda x, train: state.apply_fn({"params": params}, x, train=train), batch)

    dynamic_scale, finite, _, grads = state.dynamic_scale.value_and_grad(loss)(state.params)
    new = state.apply_gradients(grads=grads)
    keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)  # noqa: E731
    return new.replace(
        params=keep(new.params, state.params),
        opt_state=keep(new.opt_state, state.opt_state),
        dynamic_scale=dynamic_scale,
    ), finite


def test_a_flax_dynamic_scale_drives_the_scaling_as_flax_own_step_does(batch):
    """Flax's default scale, 2**16, overflows the float16 loss; growth_interval=2 then grows
    it back on the third finite step, which overflows again: every rule is exercised."""
    variables = HalfNet().init(jax.random.key(0), batch["x"][:2], train=False)
    ours = theirs = HalfExampleState.create(
        apply_fn=HalfNet().apply,
        params=variables["params"],
        tx=optax.sgd(0.1, momentum=0.9),
        dynamic_scale=DynamicScale(growth_interval=2),
    )
    step, reference = jax.jit(jf.train_step(half_loss, K)), jax.jit(flax_dynamic_scale_step)
    applied = []
    for _ in range(6):
        ours, metrics = step(ours, batch)
        theirs, finite = reference(theirs, batch)
        applied.append(bool(metrics.applied))
        assert applied[-1] == bool(finite)
        assert isinstance(ours.dynamic_scale, DynamicScale)
        assert float(ours.dynamic_scale.scale) == float(theirs.dynamic_scale.scale)
        assert int(ours.dynamic_scale.fin_steps) == int(theirs.dynamic_scale.fin_steps)
        # float16 compute: 4 micro-batches against one full batch
        assert_trees_close(ours.params, theirs.params, rtol=1e-3, atol=1e-4)
        assert_trees_close(ours.opt_state, theirs.opt_state, rtol=1e-3, atol=1e-4)
    assert applied == [False, True, True, True, False, True]
    assert int(ours.dynamic_scale.fin_steps) == 1  # counted, not left at 0


def test_loss_scale_input_is_checked_by_name(batch):
    with pytest.raises(TypeError, match=r"loss_scale must be a jaxaccum\.DynamicLossScale"):
        jf.train_step(half_loss, K, loss_scale=2.0**15)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_scale needs nonfinite='skip'"):
        jf.train_step(half_loss, K, nonfinite="drop", loss_scale=jaxaccum.DynamicLossScale())
    with pytest.raises(TypeError, match=r"loss_scale must be a jaxaccum\.DynamicLossScale"):
        jf.TrainState.from_variables(
            HalfNet().apply, {"params": {}}, optax.sgd(0.1), loss_scale=1.0
        )  # type: ignore[arg-type]
    variables = HalfNet().init(jax.random.key(0), batch["x"][:2], train=False)
    scaled = jf.train_step(half_loss, K, loss_scale=jaxaccum.DynamicLossScale())
    plain = jf.train_step(half_loss, K)
    with pytest.raises(ValueError, match=r"state\.loss_scale, which this TrainState does not hold"):
        scaled(plain.init(HalfNet().apply, variables, optax.sgd(0.1)), batch)
    with pytest.raises(ValueError, match=r"step was built without loss_scale="):
        plain(scaled.init(HalfNet().apply, variables, optax.sgd(0.1)), batch)
    theirs = HalfExampleState.create(
        apply_fn=HalfNet().apply, params=variables["params"], tx=optax.sgd(0.1)
    )
    with pytest.raises(ValueError, match=r"give it a dynamic_scale field holding"):
        scaled(theirs, batch)  # Flax's state has no place for it: the message says what does
    with_scale = theirs.replace(dynamic_scale=DynamicScale())
    with pytest.raises(
        ValueError, match=r"holds a Flax DynamicScale in state\.dynamic_scale: use one"
    ):
        scaled(with_scale, batch)
    with pytest.raises(ValueError, match=r"state\.dynamic_scale needs nonfinite='skip'"):
        jf.train_step(half_loss, K, nonfinite="drop")(with_scale, batch)
    with pytest.raises(TypeError, match=r"state\.dynamic_scale must be a flax.training"):
        plain(theirs.replace(dynamic_scale=2.0**15), batch)
