"""``_loss_scale``: dynamic loss scaling, step by step against a Python reference.

The reference is the rule written out as a loop over steps: a finite step counts towards
``growth_interval`` and, on reaching it, multiplies the scale by ``growth_factor`` and
restarts the count; a non-finite step multiplies the scale by ``backoff_factor`` (never
below ``min_scale``) and restarts the count. Scales are powers of two here, so the float32
state must equal the reference exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccum
from jaxaccum import _loss_scale
from jaxaccum._loss_scale import DynamicLossScale, LossScaleState


def reference(config: DynamicLossScale, finite: list[bool]) -> list[tuple[float, int]]:
    scale, good = float(config.init_scale), 0
    states = []
    for ok in finite:
        if ok and good + 1 >= config.growth_interval:
            scale, good = scale * config.growth_factor, 0
        elif ok:
            good += 1
        else:
            scale, good = max(scale * config.backoff_factor, config.min_scale), 0
        states.append((scale, good))
    return states


def run(config: DynamicLossScale, finite: list[bool]) -> list[tuple[float, int]]:
    adjust = jax.jit(lambda s, f: _loss_scale.adjust(config, s, f))
    state, states = _loss_scale.init(config), []
    for ok in finite:
        state = adjust(state, jnp.bool_(ok))
        assert state.scale.dtype == jnp.float32 and state.good_steps.dtype == jnp.int32
        states.append((float(state.scale), int(state.good_steps)))
    return states


def test_init_is_the_initial_scale_and_no_good_steps():
    state = _loss_scale.init(DynamicLossScale(init_scale=2.0**10))
    assert isinstance(state, LossScaleState)
    assert (state.scale.dtype, state.good_steps.dtype) == (jnp.float32, jnp.int32)
    assert (float(state.scale), int(state.good_steps)) == (1024.0, 0)


def test_scale_grows_after_each_growth_interval_of_finite_steps():
    config = DynamicLossScale(init_scale=8.0, growth_interval=3)
    states = run(config, [True] * 7)
    assert states == reference(config, [True] * 7)
    assert [s for s, _ in states] == [8, 8, 16, 16, 16, 32, 32]
    assert [g for _, g in states] == [1, 2, 0, 1, 2, 0, 1]


def test_overflow_halves_the_scale_and_restarts_the_count():
    config = DynamicLossScale(init_scale=64.0, growth_interval=3)
    finite = [True, True, False, True, True, True]
    states = run(config, finite)
    assert states == reference(config, finite)
    assert states[2] == (32.0, 0)  # the overflow came one step before growth: no growth
    assert states[-1] == (64.0, 0)  # three finite steps after it: grown again


def test_scale_never_falls_below_min_scale():
    config = DynamicLossScale(init_scale=16.0, min_scale=2.0, backoff_factor=0.25)
    states = run(config, [False] * 4)
    assert states == reference(config, [False] * 4)
    assert [s for s, _ in states] == [4.0, 2.0, 2.0, 2.0]


def test_a_random_sequence_follows_the_reference():
    config = DynamicLossScale(init_scale=2.0**15, growth_interval=4, min_scale=2.0**10)
    finite = list(np.random.default_rng(0).random(60) < 0.7)
    assert run(config, finite) == reference(config, finite)


def test_scale_stays_finite_at_the_top_of_float32():
    """Growth that would overflow float32 keeps the largest finite scale, so a later
    overflow can still lower it (a scale of inf would make every step non-finite, and
    inf times backoff_factor stays inf: training would stop for good)."""
    config = DynamicLossScale(init_scale=1.0, growth_interval=1)
    top = LossScaleState(jnp.float32(2.0**127), jnp.int32(0))
    grown = _loss_scale.adjust(config, top, jnp.bool_(True))
    assert np.isfinite(float(grown.scale)) and float(grown.scale) >= 2.0**127
    backed_off = _loss_scale.adjust(config, grown, jnp.bool_(False))
    assert float(backed_off.scale) < float(grown.scale)


def test_adjust_keeps_the_state_types_under_scan():
    config = DynamicLossScale(init_scale=4.0, growth_interval=2)
    finite = jnp.asarray([True, True, False, True, True])

    def body(state, ok):
        new = _loss_scale.adjust(config, state, ok)
        return new, new.scale

    _, scales = jax.lax.scan(body, _loss_scale.init(config), finite)
    assert [float(s) for s in scales] == [s for s, _ in reference(config, list(finite))]


# --- configuration checks ---------------------------------------------------------------------


def test_a_sound_configuration_passes():
    _loss_scale.check_config(DynamicLossScale())
    _loss_scale.check_config(DynamicLossScale(init_scale=1.0, growth_factor=1.0))
    assert jaxaccum.DynamicLossScale is DynamicLossScale


@pytest.mark.parametrize("bad", [2.0**15, {"init_scale": 2.0**15}, None])
def test_loss_scale_must_be_a_dynamic_loss_scale(bad):
    message = r"loss_scale must be a jaxaccum.DynamicLossScale, got .*; e.g. loss_scale="
    with pytest.raises(TypeError, match=message):
        _loss_scale.check_config(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_scale": 0.5}, r"init_scale >= min_scale > 0"),
        ({"min_scale": 0.0, "init_scale": 1.0}, r"init_scale >= min_scale > 0"),
        ({"min_scale": -1.0}, r"init_scale >= min_scale > 0"),
        ({"growth_interval": 0}, r"growth_interval must be a positive int, got 0"),
        ({"growth_interval": 2.5}, r"growth_interval must be a positive int, got 2.5"),
        ({"growth_factor": 0.5}, r"growth_factor >= 1"),
        ({"backoff_factor": 1.0}, r"0 < backoff_factor < 1"),
        ({"backoff_factor": 0.0}, r"0 < backoff_factor < 1"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    config = DynamicLossScale(**kwargs)
    with pytest.raises(ValueError, match=message) as info:
        _loss_scale.check_config(config)
    assert repr(config) in str(info.value)


# --- Flax's DynamicScale rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"growth_interval": 3},
        {"growth_interval": 1, "minimum_scale": None, "backoff_factor": 0.25},
        {"growth_interval": 2, "minimum_scale": 2.0**14, "scale": 2.0**15},
        {"growth_interval": 1, "scale": float(jnp.finfo(jnp.float32).max) / 2},
    ],
)
def test_adjust_flax_follows_flax_own_dynamic_scale(settings):
    """Step by step against what ``DynamicScale.value_and_grad`` returns for a gradient that
    is finite or not as a random sequence says (growth, the float32 cap, the floor)."""
    from flax.training.dynamic_scale import DynamicScale

    def loss(p, bad):
        return jnp.where(bad, jnp.inf, 1.0) * p

    flax_step = jax.jit(lambda ds, bad: ds.value_and_grad(loss)(jnp.float32(1.0), bad)[:2])
    ours = theirs = DynamicScale(**settings)
    adjust = jax.jit(_loss_scale.adjust_flax)
    for bad in np.random.default_rng(0).random(40) < 0.3:
        theirs, finite = flax_step(theirs, jnp.bool_(bad))
        assert bool(finite) == (not bad)
        ours = adjust(ours, finite)
        assert float(ours.scale) == float(theirs.scale)
        assert int(ours.fin_steps) == int(theirs.fin_steps)
