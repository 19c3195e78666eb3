"""Batch arithmetic (per device x k x devices) and learning-rate scaling rules."""

from __future__ import annotations

import math

import jax
import pytest

import jaxaccum


@pytest.mark.parametrize(("per_device", "k", "devices"), [(8, 4, 8), (1, 1, 1), (32, 16, 2)])
def test_effective_batch_and_solving_for_k_are_inverse(per_device, k, devices):
    n = jaxaccum.inspect.effective_batch_size(per_device, k, devices)
    assert n == per_device * k * devices
    assert jaxaccum.inspect.accumulation_steps(n, per_device, devices) == k


def test_defaults_to_this_process_device_count():
    assert jaxaccum.inspect.effective_batch_size(4, 2) == 8 * jax.device_count()


def test_target_that_does_not_divide_names_the_alternatives():
    msg = r"target_batch=1000 is not a multiple of .* 16 x 8 = 128; use target_batch=1024 or 896"
    with pytest.raises(ValueError, match=msg):
        jaxaccum.inspect.accumulation_steps(1000, 16, 8)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_non_positive_ints_are_rejected(bad):
    with pytest.raises(ValueError, match=r"must be a positive int"):
        jaxaccum.inspect.effective_batch_size(bad, 2, 1)


def test_learning_rate_rules():
    assert jaxaccum.inspect.scale_learning_rate(0.1, 256, 1024, "linear") == pytest.approx(0.4)
    assert jaxaccum.inspect.scale_learning_rate(1e-3, 256, 1024, "sqrt") == pytest.approx(2e-3)
    assert jaxaccum.inspect.scale_learning_rate(1e-3, 256, 512, "sqrt") == pytest.approx(
        1e-3 * math.sqrt(2)
    )
    assert jaxaccum.inspect.scale_learning_rate(1e-3, 256, 1024, "none") == 1e-3
    with pytest.raises(ValueError, match=r"rule='cubic' is not one of"):
        jaxaccum.inspect.scale_learning_rate(1e-3, 256, 1024, "cubic")
