"""Flax NNX: state carried through the micro-batches, BatchNorm modes, dropout keys, skips.

References are written out here with plain NNX and Optax: a Python loop of ``nnx.grad``
calls on a copy of the model (which updates its BatchNorm statistics in place), or one
full-batch step. Tolerances: 1e-6 where the reference does the same float32 operations up
to the summation order of the gradient, 1e-5 for merged statistics and for normalisations
without batch statistics. The optimizer is SGD where results are compared: a bias right
before a normalisation layer has a gradient of pure round-off, which Adam would blow up.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from helpers import assert_trees_close, digits_batch, trees_equal

import jaxaccum
import jaxaccum.flax as jf

K = 4
N = 64


class Net(nnx.Module):
    """Linear -> norm -> ReLU -> Linear, with optional BatchNorm first and dropout."""

    def __init__(
        self, rngs: nnx.Rngs, norm: str = "batch", bn_first: bool = False, rate: float = 0.0
    ) -> None:
        self.first = nnx.BatchNorm(64, momentum=0.9, rngs=rngs) if bn_first else None
        self.dropout = nnx.Dropout(rate, rngs=rngs) if rate else None
        self.inner = nnx.Linear(64, 32, rngs=rngs)
        if norm == "batch":
            self.norm: nnx.Module = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        else:
            self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.outer = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.first is not None:
            x = self.first(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.outer(nnx.relu(self.norm(self.inner(x))))


def loss_fn(model: Net, mb: dict[str, jax.Array]) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(mb["x"]), mb["y"]).mean()


def make(tx: Any = None, **kwargs: Any) -> tuple[Net, nnx.Optimizer[Net]]:
    model = Net(nnx.Rngs(0, dropout=1), **kwargs)
    model.train()
    return model, nnx.Optimizer(model, tx or optax.sgd(0.1), wrt=nnx.Param)


def strided(batch: dict[str, jax.Array], j: int) -> dict[str, jax.Array]:
    return jax.tree.map(lambda x: x[j::K], batch)


def pure(node: Any) -> Any:
    """A graph node's whole state as plain arrays (PRNG keys as their key data)."""
    state = nnx.state(node)
    return jax.tree.map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
        state,
    )


@pytest.fixture(scope="module")
def batch() -> dict[str, jax.Array]:
    return digits_batch(N)


def test_sequential_equals_python_loop_of_model_calls(batch):
    model, optimizer = make()
    ref_model, ref_opt = nnx.clone(model), nnx.clone(optimizer)
    metrics = nnx.jit(jf.nnx_train_step(loss_fn, K))(model, optimizer, batch)

    # Reference: k calls in train mode, in order (each updates the running statistics),
    # the mean gradient, one optimizer step.
    grads = [nnx.grad(loss_fn)(ref_model, strided(batch, j)) for j in range(K)]
    ref_opt.update(ref_model, jax.tree.map(lambda *g: sum(g) / K, *grads))

    assert bool(metrics.applied) and int(optimizer.step[...]) == 1
    assert_trees_close(nnx.state(model), nnx.state(ref_model), rtol=1e-6, atol=1e-6)
    stats = nnx.state(model, nnx.BatchStat)
    assert not trees_equal(stats, nnx.state(make()[0], nnx.BatchStat))  # they did move


def test_exact_running_statistics_equal_the_full_batch_step(batch):
    model, optimizer = make(bn_first=True)
    full = nnx.clone(model)
    seq_model, seq_opt = nnx.clone(model), nnx.clone(optimizer)
    nnx.jit(jf.nnx_train_step(loss_fn, K, batch_norm="exact"))(model, optimizer, batch)

    full(batch["x"])  # one train-mode call on the whole batch: one momentum update
    # The first BatchNorm sees the raw input: its statistics do not depend on the params.
    want = nnx.state(full.first, nnx.BatchStat)
    assert_trees_close(nnx.state(model.first, nnx.BatchStat), want, rtol=1e-5, atol=1e-5)

    # Negative control: sequential mode takes k momentum updates from micro-batch stats.
    nnx.jit(jf.nnx_train_step(loss_fn, K))(seq_model, seq_opt, batch)
    gap = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))),
        nnx.state(seq_model.first, nnx.BatchStat),
        want,
    )
    assert max(jax.tree.leaves(gap)) > 1e-3, gap


def test_layer_norm_equals_the_full_batch(batch):
    model, optimizer = make(norm="layer")
    ref_model, ref_opt = nnx.clone(model), nnx.clone(optimizer)
    step = nnx.jit(jf.nnx_train_step(loss_fn, K))
    for _ in range(3):
        step(model, optimizer, batch)
        ref_opt.update(ref_model, nnx.grad(loss_fn)(ref_model, batch))
    assert int(optimizer.step[...]) == 3
    assert_trees_close(nnx.state(model), nnx.state(ref_model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", [jax.random.key(7), None], ids=["key", "model_rngs"])
def test_dropout_differs_per_micro_batch_and_reproduces(batch, key):
    same = jax.tree.map(lambda x: jnp.concatenate([x[:16]] * K), batch)  # identical micro-batches
    model, optimizer = make(norm="layer", rate=0.5)
    again = nnx.clone(model), nnx.clone(optimizer)
    step = nnx.jit(jf.nnx_train_step(loss_fn, K, split="contiguous"))
    first = step(model, optimizer, same, key)
    repeat = step(*again, same, key)
    assert len(set(first.losses.tolist())) == K  # a different mask in every micro-batch
    assert bool(jnp.array_equal(first.losses, repeat.losses))
    assert trees_equal(pure(model), pure(again[0]))
    after = step(model, optimizer, same, key)
    assert not bool(jnp.array_equal(after.losses[0], first.losses[0]))  # new step, new key


def test_key_reseeds_every_micro_batch_as_documented(batch):
    micro = jax.tree.map(lambda x: x[: N // K], batch)
    same = jax.tree.map(lambda x: jnp.concatenate([x] * K), micro)
    model, optimizer = make(norm="layer", rate=0.5)
    ref = nnx.clone(model)
    key = jax.random.key(3)
    metrics = jf.nnx_train_step(loss_fn, K, split="contiguous")(model, optimizer, same, key)
    for j in range(K):
        micro_key = jax.random.fold_in(jax.random.fold_in(key, 0), j)
        m = nnx.clone(ref)
        m.dropout.rngs.key[...] = jax.random.fold_in(micro_key, 0)  # the model's only key
        m.dropout.rngs.count[...] = ref.dropout.rngs.count[...] + j
        assert float(loss_fn(m, micro)) == pytest.approx(float(metrics.losses[j]), rel=1e-6)
    # The model's own key is restored; its counter advanced once per micro-batch.
    keys = [jax.random.key_data(m.dropout.rngs.key[...]) for m in (model, ref)]
    assert trees_equal(*keys)
    assert int(model.dropout.rngs.count[...]) == K


def test_nonfinite_skips_and_leaves_everything_unchanged(batch):
    model, optimizer = make(tx=optax.adam(1e-3), rate=0.5)
    optimizer.skipped = nnx.OptState(jnp.zeros((), jnp.int32))
    before_model, before_opt = pure(model), pure(optimizer)
    bad = {"x": batch["x"].at[5].set(jnp.nan), "y": batch["y"]}
    metrics = nnx.jit(jf.nnx_train_step(loss_fn, K))(model, optimizer, bad, jax.random.key(0))
    assert not bool(metrics.applied)
    assert int(optimizer.skipped[...]) == 1 and int(optimizer.step[...]) == 0
    assert trees_equal(pure(model), before_model)
    optimizer.skipped[...] = jnp.zeros((), jnp.int32)
    assert trees_equal(pure(optimizer), before_opt)


def test_bad_input_is_named():
    model, optimizer = make()
    with pytest.raises(ValueError, match="batch_norm='mean'"):
        jf.nnx_train_step(loss_fn, K, batch_norm="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonfinite='drop' cannot"):
        jf.nnx_train_step(loss_fn, K, batch_norm="exact", nonfinite="drop")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        jf.nnx_train_step("loss", K)  # type: ignore[arg-type]
    step = jf.nnx_train_step(loss_fn, K, batch_norm="exact")
    with pytest.raises(TypeError, match=r"nnx\.Optimizer"):
        step(model, optax.sgd(0.1), digits_batch(8))
    model.eval()
    with pytest.raises(ValueError, match=r"model\.train\(\)"):
        step(model, optimizer, digits_batch(8))


def test_aux_reduce_concat_gives_every_example_logits(batch):
    def with_logits(model: Net, mb: dict[str, jax.Array]) -> Any:
        logits = model(mb["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, mb["y"]).mean(), logits

    model, optimizer = make(norm="layer")
    full = model(batch["x"])
    step = jf.nnx_train_step(with_logits, K, has_aux=True, aux_reduce="concat")
    metrics = nnx.jit(step.update)(model, optimizer, batch)
    assert metrics.aux.shape == (N, 10)
    assert float(jnp.max(jnp.abs(metrics.aux - full))) < 1e-5


# --- loss scaling (float16 compute) ---------------------------------------------------------
#
# As in test_flax.py: float16 compute with float32 params; the underflow test weights the loss
# by 2**-22 (its gradient falls below float16's smallest subnormal in the float16 layers) and
# the learning rate by 2**22. Tolerance against the float32 full-batch reference: 5e-3
# relative (measured 4e-4).

TINY = 2.0**-22


class HalfNet(nnx.Module):
    """Linear -> (BatchNorm) -> ReLU -> Linear, computed in ``dtype``, float32 params."""

    def __init__(self, dtype: Any = jnp.float16, batch_norm: bool = False) -> None:
        rngs = nnx.Rngs(0)
        self.inner = nnx.Linear(64, 32, dtype=dtype, rngs=rngs)
        self.norm = nnx.BatchNorm(32, momentum=0.9, dtype=dtype, rngs=rngs) if batch_norm else None
        self.outer = nnx.Linear(32, 10, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.inner(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.outer(nnx.relu(x))


def tiny_loss(model: HalfNet, mb: dict[str, jax.Array]) -> jax.Array:
    logits = model(mb["x"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, mb["y"]).mean() * TINY


def half_loss(model: HalfNet, mb: dict[str, jax.Array]) -> jax.Array:
    """Cross-entropy in float16: a scale beyond 65504 overflows it."""
    return optax.softmax_cross_entropy_with_integer_labels(model(mb["x"]), mb["y"]).mean()


def test_loss_scale_recovers_gradients_that_underflow_in_float16(batch):
    lr = 1 / TINY
    ref = nnx.grad(tiny_loss)(HalfNet(jnp.float32), batch)
    want = jax.tree.map(lambda g: -lr * g, nnx.state(ref, nnx.Param))  # float32 SGD update
    before = nnx.state(HalfNet(), nnx.Param)

    def delta(**options: Any) -> Any:
        model = HalfNet()
        step = jf.nnx_train_step(tiny_loss, K, **options)
        optimizer = step.init(model, optax.sgd(lr))
        assert bool(nnx.jit(step.update)(model, optimizer, batch).applied)
        return jax.tree.map(lambda a, b: a - b, nnx.state(model, nnx.Param), before), optimizer

    def rel_err(tree: Any) -> float:
        diff = jax.tree.map(lambda a, b: a - b, tree, want)
        return float(optax.tree.norm(diff) / optax.tree.norm(want))

    scaled, optimizer = delta(loss_scale=jaxaccum.DynamicLossScale())
    assert rel_err(scaled) < 5e-3
    state = optimizer.loss_scale.get_value()  # type: ignore[attr-defined]
    assert float(state.scale) == 2.0**15 and int(state.good_steps) == 1
    unscaled, _ = delta()  # negative control: float16 flushes the gradient to zero
    assert rel_err(unscaled) > 0.5


def test_an_overflow_skips_the_update_lowers_the_scale_and_finite_steps_raise_it(batch):
    """2**16 overflows the float16 loss, 2**15 does not: with growth_interval=2 the scale
    cycles 2**16 (skip) -> 2**15, 2**15 (applied) -> grown to 2**16 -> skip ..."""
    model = HalfNet(batch_norm=True)
    model.train()
    scaling = jaxaccum.DynamicLossScale(init_scale=2.0**16, growth_interval=2)
    step = jf.nnx_train_step(half_loss, K, loss_scale=scaling)
    optimizer = step.init(model, optax.sgd(0.1, momentum=0.9))
    update = nnx.jit(step.update)
    applied, scales = [], []
    for _ in range(6):
        before_model, before_opt = pure(model), pure(optimizer.opt_state)
        applied.append(bool(update(model, optimizer, batch).applied))
        scales.append(float(optimizer.loss_scale.get_value().scale))  # type: ignore[attr-defined]
        if not applied[-1]:  # the model, BatchNorm statistics included, and opt_state kept
            assert trees_equal(pure(model), before_model)
            assert trees_equal(pure(optimizer.opt_state), before_opt)
    assert applied == [False, True, True, False, True, True]
    assert scales == [2.0**15, 2.0**15, 2.0**16, 2.0**15, 2.0**15, 2.0**16]
    assert int(optimizer.skipped[...]) == 2 and int(optimizer.step[...]) == 4  # type: ignore[attr-defined]


def test_loss_scale_input_is_checked_by_name(batch):
    with pytest.raises(TypeError, match=r"loss_scale must be a jaxaccum\.DynamicLossScale"):
        jf.nnx_train_step(half_loss, K, loss_scale=2.0**15)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_scale needs nonfinite='skip'"):
        jf.nnx_train_step(half_loss, K, nonfinite="drop", loss_scale=jaxaccum.DynamicLossScale())
    scaled = jf.nnx_train_step(half_loss, K, loss_scale=jaxaccum.DynamicLossScale())
    model = HalfNet()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)  # built by hand
    with pytest.raises(ValueError, match=r"optimizer\.loss_scale, which this optimizer"):
        scaled(model, optimizer, batch)
    # The fix the message gives works.
    optimizer.loss_scale = nnx.OptState(  # type: ignore[attr-defined]
        jaxaccum.LossScaleState(jnp.float32(2.0**15), jnp.int32(0))
    )
    assert bool(scaled(model, optimizer, batch).applied)
    with pytest.raises(ValueError, match=r"step was built without loss_scale="):
        jf.nnx_train_step(half_loss, K)(model, optimizer, batch)


def test_batchnorm_with_an_axis_name_runs_on_one_device(batch):
    """``nnx.BatchNorm(axis_name="batch")``, written for ``pmap``, called on one device: the
    step binds the axis its layer declares with size 1, and the result is bitwise the one of
    the same model without an axis name (a mean over one device is the value itself)."""
    results = []
    for axis_name in ("batch", None):
        model, optimizer = make()
        model.norm.axis_name = axis_name
        metrics = jf.nnx_train_step(loss_fn, K).update(model, optimizer, batch)
        results.append((metrics.loss, pure(model)))
    assert trees_equal(*results)
