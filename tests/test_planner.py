"""plan_microbatches: the smallest k whose compiled memory fits, chosen ahead of time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import ATOL, RTOL, digits_batch, init_params, mean_loss

import jaxaccum

WIDTH, N = 256, 1024
KS = (1, 2, 4, 8, 16)


def tanh_loss(params, x):
    """Three tanh layers of width 256: activations (N x 256 floats each) dominate memory."""
    for w in params:
        x = jnp.tanh(x @ w)
    return jnp.mean(x**2)


def grad_step(k):
    return jaxaccum.accumulate(jax.value_and_grad(tanh_loss), k)


def shapes(dtype=jnp.float32):
    params = [jax.ShapeDtypeStruct((WIDTH, WIDTH), dtype)] * 3
    return params, jax.ShapeDtypeStruct((N, WIDTH), dtype)


@pytest.fixture(scope="module")
def every_k():
    """Every candidate in KS compiled: the reference estimates."""
    return jaxaccum.inspect.plan_microbatches(
        grad_step, *shapes(), budget=2**40, ks=KS, compile_all=True
    )


def test_chosen_k_fits_and_the_next_smaller_does_not(every_k):
    by_k = {c.k: c for c in every_k.candidates}
    budget = (by_k[2].peak_bytes + by_k[4].peak_bytes) // 2
    plan = jaxaccum.inspect.plan_microbatches(grad_step, *shapes(), budget=budget)
    assert (plan.k, plan.micro_batch_size, plan.budget_bytes) == (4, N // 4, budget)
    chosen, smaller = plan.candidates[-1], plan.candidates[-2]
    assert chosen.k == 4 and chosen.fits and chosen.peak_bytes <= budget
    assert smaller.k == 2 and not smaller.fits and smaller.peak_bytes > budget
    # It stops at the first fit: every candidate up to the chosen one, no further.
    assert [c.k for c in plan.candidates] == [1, 2, 4]
    assert chosen == by_k[4]


def test_estimates_fall_as_k_grows(every_k):
    cands = every_k.candidates
    assert [c.k for c in cands] == list(KS)
    assert all(c.fits for c in cands) and every_k.k == 1
    temps = [c.temp_bytes for c in cands]
    peaks = [c.peak_bytes for c in cands]
    assert temps[:4] == sorted(set(temps[:4]), reverse=True), temps  # strictly, k = 1..8
    assert peaks == sorted(peaks, reverse=True), peaks
    assert peaks[3] < 0.6 * peaks[0], peaks
    for c in cands:
        assert c.peak_bytes == c.argument_bytes + c.output_bytes + c.temp_bytes - c.alias_bytes
        assert c.micro_batch_size == N // c.k
    # Arguments are the same program inputs whatever k is.
    assert len({c.argument_bytes for c in cands}) == 1


def test_accumulator_is_the_float32_sums():
    f32 = jaxaccum.inspect.plan_microbatches(
        grad_step, *shapes(), budget=2**40, ks=(1, 4), compile_all=True
    )
    bf16 = jaxaccum.inspect.plan_microbatches(
        grad_step, *shapes(jnp.bfloat16), budget=2**40, ks=(4,), compile_all=True
    )
    grad_bytes = 3 * WIDTH * WIDTH * 4
    assert f32.candidates[0].accumulator_bytes == 0  # k = 1: no loop
    assert grad_bytes <= f32.candidates[1].accumulator_bytes <= grad_bytes + 64
    # bfloat16 gradients still accumulate in float32.
    assert bf16.candidates[0].accumulator_bytes == f32.candidates[1].accumulator_bytes


def test_table_lists_every_column_and_marks_the_choice(every_k):
    text = str(every_k)
    assert text == every_k.table()
    lines = text.splitlines()
    header = [h.strip() for h in lines[1].strip("|").split("|")]
    assert header == [
        "k",
        "strategy",
        "micro-batch",
        "arguments",
        "outputs",
        "temporaries",
        "aliased",
        "accumulator",
        "peak",
        "fits",
    ]
    assert len(lines) == 3 + len(KS)
    assert "yes (chosen)" in lines[3] and "MiB" in text
    assert all(line.count("|") == len(header) + 1 for line in lines[1:])


def test_train_step_with_donated_state():
    params, batch = shapes()
    optimizer = optax.adam(1e-3)

    def update(k):
        return jaxaccum.train_step(tanh_loss, optimizer, k).update

    state = jax.eval_shape(jaxaccum.train_step(tanh_loss, optimizer, 1).init, params)
    kept, donated = (
        jaxaccum.inspect.plan_microbatches(
            update, state, batch, budget=2**40, ks=(1, 4), donate_argnums=d, compile_all=True
        )
        for d in ((), 0)
    )
    state_bytes = 3 * 3 * WIDTH * WIDTH * 4  # params, Adam's mu and nu
    for a, b in zip(kept.candidates, donated.candidates, strict=True):
        assert a.alias_bytes == 0 and b.alias_bytes >= state_bytes
        assert a.peak_bytes - b.peak_bytes >= 0.99 * state_bytes  # the state is updated in place
    assert donated.candidates[1].peak_bytes < donated.candidates[0].peak_bytes
    assert donated.candidates[1].accumulator_bytes >= 3 * WIDTH * WIDTH * 4


def test_planned_k_runs_and_gives_the_full_batch_gradient():
    params, batch = init_params(width=512), digits_batch(512)

    def step(k):
        return jaxaccum.accumulate(jax.value_and_grad(mean_loss), k)

    ks = (1, 2, 4, 8)
    every = jaxaccum.inspect.plan_microbatches(
        step, params, batch, budget=2**40, ks=ks, compile_all=True
    )
    budget = every.candidates[2].peak_bytes
    plan = jaxaccum.inspect.plan_microbatches(step, params, batch, budget=budget, ks=ks)
    assert plan.k > 1 and plan.candidates[-1].peak_bytes <= budget
    value, grads = jax.jit(step(plan.k))(params, batch)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(mean_loss))(params, batch)
    assert jnp.allclose(value, ref_value, rtol=RTOL, atol=ATOL)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert jnp.allclose(g, r, rtol=RTOL, atol=ATOL)


def test_nothing_fits_shows_the_estimates_and_the_ways_out():
    with pytest.raises(ValueError, match="no k fits the budget of 1 B") as info:
        jaxaccum.inspect.plan_microbatches(grad_step, *shapes(), budget=1, ks=(2, 4))
    message = str(info.value)
    assert "at k=4" in message and "| temporaries |" in message
    for way_out in ("jax.checkpoint", "shard", "jaxaccum.pad_batch"):
        assert way_out in message


def test_fraction_budget_needs_a_device_memory_limit():
    if (jax.devices()[0].memory_stats() or {}).get("bytes_limit"):
        pytest.skip("this device reports a memory limit")
    with pytest.raises(ValueError, match="pass the budget in bytes"):
        jaxaccum.inspect.plan_microbatches(grad_step, *shapes(), budget=0.5)


@pytest.mark.parametrize(
    ("budget", "error", "match"),
    [
        (0, ValueError, "positive number of bytes"),
        (-(2**20), ValueError, "positive number of bytes"),
        (1.5, ValueError, r"fraction of the device's memory in \(0, 1\]"),
        (0.0, ValueError, r"fraction of the device's memory in \(0, 1\]"),
        (True, TypeError, "budget must be bytes"),
        ("8GB", TypeError, "budget must be bytes"),
    ],
)
def test_bad_budget(budget, error, match):
    with pytest.raises(error, match=match):
        jaxaccum.inspect.plan_microbatches(grad_step, *shapes(), budget=budget)


@pytest.mark.parametrize(
    ("ks", "match"),
    [
        ((2, 3), r"batch size 1024 at leaf argument 1 is not divisible by k=3.*pad_batch"),
        ((2048,), "larger than the batch size 1024"),
        ((), "ks is empty"),
        ((0,), "k must be a positive int"),
    ],
)
def test_bad_ks(ks, match):
    with pytest.raises(ValueError, match=match):
        jaxaccum.inspect.plan_microbatches(grad_step, *shapes(), budget=2**30, ks=ks)


def test_bad_batch_argnums_and_make_step():
    with pytest.raises(ValueError, match="batch_argnums=2 must name positions among the 2"):
        jaxaccum.inspect.plan_microbatches(grad_step, *shapes(), budget=2**30, batch_argnums=2)
    with pytest.raises(TypeError, match=r"ks must be a sequence of k values, e.g. ks=\(4,\)"):
        jaxaccum.inspect.plan_microbatches(grad_step, *shapes(), budget=2**30, ks=4)
    with pytest.raises(TypeError, match="make_step must be a function of k"):
        jaxaccum.inspect.plan_microbatches(None, *shapes(), budget=2**30)


@pytest.mark.parametrize(
    ("strategies", "error", "match"),
    [
        ("gather_once", TypeError, "must be a sequence"),
        ((), ValueError, "one or more of"),
        (("all_at_once",), ValueError, "one or more of"),
    ],
)
def test_bad_strategies_name_the_choices(strategies, error, match):
    with pytest.raises(error, match=match):
        jaxaccum.inspect.plan_microbatches(
            grad_step, *shapes(), budget=2**30, strategies=strategies
        )
