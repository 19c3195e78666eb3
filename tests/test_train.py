"""train_step against hand-written full-batch Optax loops.

The reference for every test is the plain loop a user would write without accumulation:
``jax.grad`` on the whole batch, ``optimizer.update`` once, ``optax.apply_updates``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    digits_batch,
    init_params,
    masked_mean_loss,
    mean_loss,
    strided_micro,
    trees_equal,
)

import jaxaccum

N = 64


def full_batch_run(optimizer, params, batches, loss=mean_loss):
    """The reference: one full-batch gradient and one optimizer update per batch."""

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for batch in batches:
        params, opt_state = step(params, opt_state, batch)
    return params, opt_state


def accumulated_run(step, params, batches, **init):
    update = jax.jit(step.update)
    state = step.init(params, **init)
    metrics = []
    for batch in batches:
        state, m = update(state, batch)
        metrics.append(m)
    return state, metrics


def digits_batches(steps: int, n: int = N) -> list[dict[str, jax.Array]]:
    return [digits_batch(n, offset=(i * n) % (1700 - n)) for i in range(steps)]


# 2 and 12: trajectory equivalence over 50 adamw steps, with one compile.
@pytest.mark.parametrize("k", [2, 4, 8])
def test_adamw_trajectory_matches_full_batch(k):
    optimizer = optax.adamw(1e-2, weight_decay=1e-3)
    params, batches = init_params(), digits_batches(50)
    traces = []

    def counted_loss(p, b):
        traces.append(1)
        return mean_loss(p, b)

    state, _ = accumulated_run(jaxaccum.train_step(counted_loss, optimizer, k), params, batches)
    ref_params, ref_opt_state = full_batch_run(optimizer, params, batches)
    assert_trees_close(state.params, ref_params, rtol=1e-5, atol=1e-5)
    assert int(state.step) == 50 and int(state.skipped) == 0
    assert int(state.opt_state[0].count) == int(ref_opt_state[0].count) == 50
    # One compile for 50 steps: the loss is traced a fixed number of times at the first call.
    first = len(traces)
    jax.jit(jaxaccum.train_step(counted_loss, optimizer, k).update)(state, batches[0])
    assert first == len(traces) // 2  # a new build (or a new k) costs exactly one more trace set


def test_no_retrace_over_steps_and_one_compile_per_new_k():
    params, batch = init_params(), digits_batch(N)
    optimizer = optax.sgd(0.1)
    compiles: dict[int, int] = {}

    for k in (2, 4):
        step = jaxaccum.train_step(mean_loss, optimizer, k)
        update = jax.jit(step.update)
        state = step.init(params)
        for _ in range(50):
            state, _ = update(state, batch)
        compiles[k] = update._cache_size()
    assert compiles == {2: 1, 4: 1}


# 1: one call = one update, with metrics.
def test_metrics_against_per_microbatch_loop():
    k, params, batch = 4, init_params(), digits_batch(N)
    step = jaxaccum.train_step(mean_loss, optax.sgd(0.1), k)
    state = step.init(jax.tree.map(jnp.copy, params))  # donated below
    state, metrics = jax.jit(step.update, donate_argnums=0)(state, batch)
    ref_losses = [float(mean_loss(params, strided_micro(batch, j, k))) for j in range(k)]
    np.testing.assert_allclose(metrics.losses, ref_losses, rtol=1e-6)
    np.testing.assert_allclose(metrics.loss, mean_loss(params, batch), rtol=1e-6)
    ref_norm = optax.tree.norm(jax.grad(mean_loss)(params, batch))
    np.testing.assert_allclose(metrics.grad_norm, ref_norm, rtol=1e-5)
    assert float(metrics.weight) == N and bool(metrics.applied)
    assert_trees_close(state.params, full_batch_run(optax.sgd(0.1), params, [batch])[0])


def test_aux_is_reduced_like_the_loss():
    def loss_with_aux(p, b):
        logits_ok = jnp.mean(b["y"] == 3)
        return mean_loss(p, b), {"frac3": logits_ok.astype(jnp.float32), "n3": jnp.sum(b["y"] == 3)}

    step = jaxaccum.train_step(loss_with_aux, optax.sgd(0.1), 4, has_aux=True)
    batch = digits_batch(N)
    _, metrics = step.update(step.init(init_params()), batch)
    np.testing.assert_allclose(metrics.aux["frac3"], jnp.mean(batch["y"] == 3), rtol=1e-6)
    assert int(metrics.aux["n3"]) == int(jnp.sum(batch["y"] == 3))


@pytest.mark.parametrize("weighted", [False, True])
def test_aux_reduce_chooses_per_leaf_and_keeps_the_default_elsewhere(weighted):
    """Per-example outputs in example order; leaves left None keep the weighted mean."""
    params, batch, k = init_params(), digits_batch(N), 4
    batch["mask"] = (jnp.arange(N) % 3 != 0).astype(jnp.float32)

    def loss_with_outputs(p, b):
        logits = b["x"] @ p["params"]["Dense_0"]["kernel"]
        rows = jnp.sum(b["mask"])
        loss = jnp.sum(jnp.mean(logits**2, -1) * b["mask"]) / rows
        return loss, {"logits": logits, "loss": loss, "rows": rows.astype(jnp.int32)}

    kwargs = {"weight_fn": lambda b: b["mask"].sum()} if weighted else {}
    spec = {"logits": "concat", "loss": None, "rows": "stack"}
    step = jaxaccum.train_step(
        loss_with_outputs, optax.sgd(0.1), k, has_aux=True, aux_reduce=spec, **kwargs
    )
    _, metrics = jax.jit(step.update)(step.init(params), batch)
    full_loss, full = loss_with_outputs(params, batch)
    np.testing.assert_allclose(metrics.aux["logits"], full["logits"], rtol=1e-6, atol=1e-6)
    micro_rows = [int(strided_micro(batch, j, k)["mask"].sum()) for j in range(k)]
    assert metrics.aux["rows"].tolist() == micro_rows
    if weighted:  # the exact item mean, as the loss itself
        np.testing.assert_allclose(metrics.aux["loss"], full_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics.aux["loss"], metrics.loss, rtol=1e-6)


def test_aux_reduce_refuses_what_it_cannot_do():
    params = init_params()

    def with_aux(p, b):
        return mean_loss(p, b), {"a": jnp.float32(1.0)}

    with pytest.raises(ValueError, match=r"aux_reduce=.*has_aux is False"):
        jaxaccum.train_step(mean_loss, optax.sgd(0.1), 4, aux_reduce="concat")
    with pytest.raises(ValueError, match="unknown reduction 'glue' in aux_reduce="):
        jaxaccum.train_step(with_aux, optax.sgd(0.1), 4, has_aux=True, aux_reduce="glue")
    with pytest.raises(ValueError, match="aux_reduce names 'weighted_mean'"):
        jaxaccum.train_step(with_aux, optax.sgd(0.1), 4, has_aux=True, aux_reduce="weighted_mean")
    step = jaxaccum.train_step(with_aux, optax.sgd(0.1), 4, has_aux=True, aux_reduce={"b": "sum"})
    with pytest.raises(ValueError, match=r"aux_reduce= must be a prefix"):
        step.update(step.init(params), digits_batch(N))


# 3: clipping acts once, on the accumulated gradient.
def test_clip_by_global_norm_after_accumulation():
    k, params, batch = 8, init_params(), digits_batch(N)
    optimizer = optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(1.0))
    state, _ = jaxaccum.train_step(mean_loss, optimizer, k).update(
        jaxaccum.train_step(mean_loss, optimizer, k).init(params), batch
    )
    ref_params, _ = full_batch_run(optimizer, params, [batch])
    assert_trees_close(state.params, ref_params)
    # Negative control: clipping each micro-batch's gradient before averaging differs.
    clip = optax.clip_by_global_norm(0.05)
    clipped = [
        clip.update(jax.grad(mean_loss)(params, strided_micro(batch, j, k)), clip.init(params))[0]
        for j in range(k)
    ]
    wrong = jax.tree.map(lambda p, *g: p - sum(g) / k, params, *clipped)
    diff = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(*map(jax.tree.leaves, (wrong, ref_params)), strict=True)
    )
    assert diff > 1e-3


# 4: schedules see optimizer-update indices.
def test_schedule_counts_updates_not_microsteps():
    k, steps = 4, 5
    schedule = optax.linear_schedule(0.5, 0.0, transition_steps=10)
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    step = jaxaccum.train_step(mean_loss, optimizer, k)
    update, state, seen = jax.jit(step.update), step.init(init_params()), []
    for t in range(steps):
        state, _ = update(state, digits_batch(N, offset=t * N))
        seen.append(float(state.opt_state.hyperparams["learning_rate"]))
    np.testing.assert_allclose(seen, [float(schedule(t)) for t in range(steps)], rtol=1e-6)


# 6a: remainders padded with zero weight give the same result as whole-batch steps.
def test_epoch_of_100_with_padded_remainder_matches_whole_batch_steps():
    k, micro = 8, 4
    data = digits_batch(100)
    groups = [jax.tree.map(lambda x, s=s: x[s : s + k * micro], data) for s in range(0, 100, 32)]
    assert [g["x"].shape[0] for g in groups] == [32, 32, 32, 4]
    optimizer = optax.adam(1e-2)
    traces = []

    def loss(p, b):
        traces.append(1)
        return masked_mean_loss(p, b)

    step = jaxaccum.train_step(loss, optimizer, k, weight_fn=lambda mb: mb["mask"].sum())
    padded = []
    for g in groups:
        pb, mask = jaxaccum.pad_batch(g, k * micro)
        padded.append(pb | {"mask": mask.astype(jnp.float32)})
    state, metrics = accumulated_run(step, init_params(), padded)
    ref_params, _ = full_batch_run(optimizer, init_params(), groups)
    assert_trees_close(state.params, ref_params, rtol=1e-5, atol=1e-6)
    assert [float(m.weight) for m in metrics] == [32, 32, 32, 4]
    first_trace = len(traces)
    assert first_trace > 0 and all(bool(m.applied) for m in metrics)
    assert len(traces) == first_trace  # the short last batch did not recompile


# 9: non-finite micro-batches.
def _poisoned(batch, k, bad):
    x = np.array(batch["x"])
    for j in bad:
        x[j::k] = np.nan
    return batch | {"x": jnp.asarray(x)}


@pytest.mark.parametrize(
    "bad", [[0], [3], [7], list(range(8))], ids=["first", "middle", "last", "all"]
)
def test_nonfinite_skips_and_leaves_state_bitwise_unchanged(bad):
    k = 8
    optimizer = optax.adam(1e-2)
    step = jaxaccum.train_step(_dropout_loss, optimizer, k, with_key=True)
    update = jax.jit(step.update)
    state, _ = update(step.init(init_params(), key=jax.random.key(1)), digits_batch(N))
    new, metrics = update(state, _poisoned(digits_batch(N, offset=N), k, bad))
    assert not bool(metrics.applied)
    assert int(new.skipped) == int(state.skipped) + 1
    same = (new.params, new.opt_state, new.step, jax.random.key_data(new.key))
    assert trees_equal(
        same, (state.params, state.opt_state, state.step, jax.random.key_data(state.key))
    )


@pytest.mark.parametrize("bad", [[0], [3], [7]], ids=["first", "middle", "last"])
def test_nonfinite_drop_renormalises_by_remaining_weight(bad):
    k, params = 8, init_params()
    batch = digits_batch(N)
    step = jaxaccum.train_step(mean_loss, optax.sgd(0.5), k, nonfinite="drop")
    state, metrics = step.update(step.init(params), _poisoned(batch, k, bad))
    keep = np.array([j % k not in bad for j in range(N)])
    kept = jax.tree.map(lambda x: x[keep], batch)
    ref_params, _ = full_batch_run(optax.sgd(0.5), params, [kept])
    assert bool(metrics.applied) and float(metrics.weight) == keep.sum()
    assert_trees_close(state.params, ref_params)


def test_nonfinite_drop_with_all_bad_skips():
    step = jaxaccum.train_step(mean_loss, optax.sgd(0.5), 8, nonfinite="drop")
    state = step.init(init_params())
    new, metrics = step.update(state, _poisoned(digits_batch(N), 8, range(8)))
    assert not bool(metrics.applied) and int(new.skipped) == 1
    assert trees_equal(new.params, state.params)


# 11: determinism and key derivation.
def _dropout_loss(params, batch, key):
    keep = jax.random.bernoulli(key, 0.8, batch["x"].shape)
    return mean_loss(params, batch | {"x": jnp.where(keep, batch["x"] / 0.8, 0.0)})


def test_same_seed_same_data_is_bitwise_reproducible():
    step = jaxaccum.train_step(_dropout_loss, optax.adam(1e-2), 4, with_key=True)
    batches = digits_batches(10)
    a, _ = accumulated_run(step, init_params(), batches, key=jax.random.key(7))
    b, _ = accumulated_run(step, init_params(), batches, key=jax.random.key(7))
    c, _ = accumulated_run(step, init_params(), batches, key=jax.random.key(8))
    assert trees_equal(a.params, b.params)
    assert not trees_equal(a.params, c.params)


def test_microbatch_keys_derive_from_base_key_step_and_index():
    k, params, batch = 4, init_params(), digits_batch(N)
    step = jaxaccum.train_step(_dropout_loss, optax.sgd(0.1), k, with_key=True)
    base = jax.random.key(3)
    state, _ = step.update(step.init(params, key=base), batch)
    _, metrics = step.update(state, batch)  # step index 1
    step_key = jax.random.fold_in(base, 1)
    ref = [
        float(
            _dropout_loss(state.params, strided_micro(batch, j, k), jax.random.fold_in(step_key, j))
        )
        for j in range(k)
    ]
    np.testing.assert_allclose(metrics.losses, ref, rtol=1e-6)


# Bad input.
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match=r"optimizer must be an optax\.GradientTransformation"):
        jaxaccum.train_step(mean_loss, "adam", 2)
    with pytest.raises(ValueError, match=r"nonfinite='ignore' is not one of \('skip', 'drop'\)"):
        jaxaccum.train_step(mean_loss, optax.sgd(0.1), 2, nonfinite="ignore")
    with pytest.raises(ValueError, match="loss_scale needs nonfinite='skip'"):
        jaxaccum.train_step(
            mean_loss, optax.sgd(0.1), 2, nonfinite="drop", loss_scale=jaxaccum.DynamicLossScale()
        )
    with pytest.raises(TypeError, match=r"needs init\(params, key=...\)"):
        jaxaccum.train_step(_dropout_loss, optax.sgd(0.1), 2, with_key=True).init(init_params())
    with pytest.raises(ValueError, match="k must be a positive int"):
        jaxaccum.train_step(mean_loss, optax.sgd(0.1), 0)


def test_state_is_a_pytree_that_jit_can_donate():
    step = jaxaccum.train_step(mean_loss, optax.adam(1e-3), 2)
    state = step.init(init_params())
    leaves: list[Any] = jax.tree.leaves(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    new, _ = jax.jit(step.update, donate_argnums=0)(state, digits_batch(N))
    assert int(new.step) == 1


def test_model_state_threads_through_micro_batches_like_a_loop():
    # has_state with a plain pytree: a count of micro-batches and a running input mean
    # that the loss reads, so each micro-batch's gradient depends on the state before it.
    def loss(params, running, mb):
        running = {
            "calls": running["calls"] + 1,
            "mean": 0.9 * running["mean"] + 0.1 * mb["x"].mean(0),
        }
        shifted = {**mb, "x": mb["x"] - running["mean"]}
        return mean_loss(params, shifted), running

    k, params, batch, optimizer = 4, init_params(), digits_batch(N), optax.sgd(0.1)
    running = {"calls": jnp.int32(0), "mean": jnp.zeros(64)}
    step = jaxaccum.train_step(loss, optimizer, k, has_state=True)
    state, _ = jax.jit(step.update)(step.init(params, model_state=running), batch)

    grads, expected = [], running
    for j in range(k):  # the hand-written loop over micro-batches
        g, expected = jax.grad(loss, has_aux=True)(params, expected, strided_micro(batch, j, k))
        grads.append(g)
    mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
    updates, _ = optimizer.update(mean, optimizer.init(params), params)
    assert int(state.model_state["calls"]) == k
    assert_trees_close(state.model_state, expected)
    assert_trees_close(state.params, optax.apply_updates(params, updates))
