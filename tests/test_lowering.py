"""What other backends compile: the accumulated loop is a hand-written ``lax.scan``.

``jax.jit(f).trace(*args).lower(lowering_platforms=(p,))`` lowers for a platform this
machine does not have. For ``"cuda"`` and ``"tpu"`` the accumulated loop must hold exactly
the step's operations, as a hand-written ``lax.scan`` calling the step lowers them: no
platform ``case``, no convolution rewrite, no custom calls. The CPU lowering of a CNN is
the one that differs (the convolution layout rewrite of ``jaxaccum._internal.cpu_conv``), which
shows which path each platform takes. Operations are compared by name and count in the
StableHLO text; bookkeeping that the hand-written scan spends on indexing (an ``iota`` to
scan over, negative-index normalisation) is the only difference allowed, in its favour.
"""

from __future__ import annotations

import collections
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from helpers import digits_batch, init_params, mean_loss

import jaxaccum

K = 4
OP = re.compile(r"\b((?:stablehlo|mhlo|chlo)\.[a-z_]+)\b")
# Operations a step computes with: these must match the hand-written scan one for one.
COMPUTE = (
    "stablehlo.convolution",
    "stablehlo.dot_general",
    "stablehlo.transpose",
    "stablehlo.reduce",
    "stablehlo.gather",
    "stablehlo.scatter",
    "stablehlo.exponential",
    "stablehlo.log",
    "stablehlo.while",
)
# What may never appear in the loop for another backend.
FORBIDDEN = ("stablehlo.case", "stablehlo.custom_call", "platform_index", "jaxaccum")


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def cnn_loss(params: Any, batch: Any) -> jax.Array:
    logp = jax.nn.log_softmax(CNN().apply(params, batch["x"]))
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def cnn_case() -> tuple[Any, Any, Any]:
    batch = digits_batch(32)
    batch = {"x": batch["x"].reshape(-1, 8, 8, 1), "y": batch["y"]}
    return cnn_loss, CNN().init(jax.random.key(0), batch["x"][:2]), batch


def mlp_case() -> tuple[Any, Any, Any]:
    return mean_loss, init_params(), digits_batch(32)


def hand_written(step: Any, k: int) -> Any:
    """The loop a user writes: strided micro-batches, summed outputs, one divide."""

    def run(params: Any, batch: Any) -> Any:
        views = jax.tree.map(lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]), batch)

        def body(total: Any, j: jax.Array) -> tuple[Any, None]:
            mb = jax.tree.map(lambda v: jax.lax.dynamic_index_in_dim(v, j, 1, False), views)
            return jax.tree.map(jnp.add, total, step(params, mb)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(step, params, batch))
        total, _ = jax.lax.scan(body, zeros, jnp.arange(k))
        return jax.tree.map(lambda t: t / k, total)

    return run


def ops(fn: Any, params: Any, batch: Any, platform: str) -> tuple[collections.Counter, str]:
    text = jax.jit(fn).trace(params, batch).lower(lowering_platforms=(platform,)).as_text()
    return collections.Counter(OP.findall(text)), text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("case", [mlp_case, cnn_case], ids=["mlp", "cnn"])
def test_other_backends_compile_the_hand_written_loop(case, platform):
    loss, params, batch = case()
    step = jax.value_and_grad(loss)
    ours, text = ops(jaxaccum.accumulate(step, K), params, batch, platform)
    theirs, _ = ops(hand_written(step, K), params, batch, platform)
    assert {op: ours[op] for op in COMPUTE} == {op: theirs[op] for op in COMPUTE}
    assert ours["stablehlo.while"] == 1
    assert not [word for word in FORBIDDEN if word in text]
    # the rest is indexing and accumulating bookkeeping, never more than the hand-written
    assert sum(ours.values()) <= sum(theirs.values()), (ours - theirs, theirs - ours)


def test_the_cpu_lowering_is_where_convolutions_are_rewritten():
    """Which path: the CPU lowering of the CNN loop transposes around its convolutions;
    the same trace lowered for cuda does not; an MLP has nothing to rewrite anywhere."""
    loss, params, batch = cnn_case()
    fn = jaxaccum.accumulate(jax.value_and_grad(loss), K)
    jaxpr = str(jax.make_jaxpr(fn)(params, batch))
    assert "jaxaccum_cpu_layout" in jaxpr
    cpu, _ = ops(fn, params, batch, "cpu")
    cuda, _ = ops(fn, params, batch, "cuda")
    assert cpu["stablehlo.convolution"] == cuda["stablehlo.convolution"]
    assert cpu["stablehlo.transpose"] > cuda["stablehlo.transpose"]
    mlp_loss, mlp_params, mlp_batch = mlp_case()
    plain = jaxaccum.accumulate(jax.value_and_grad(mlp_loss), K)
    assert "jaxaccum_cpu_layout" not in str(jax.make_jaxpr(plain)(mlp_params, mlp_batch))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_early_stop_and_concat_lower_for_accelerators(platform):
    """A traced early stop (a while loop) and per-example CONCAT outputs: the CNN's step
    lowered for an accelerator holds the step's convolutions once, in one while loop, and
    nothing of the CPU rewrite."""
    loss, params, batch = cnn_case()

    def step(p, b):
        value, grads = jax.value_and_grad(loss)(p, b)
        return value, grads, b["y"]

    def run(p, b, m):
        f = jaxaccum.accumulate(
            step, K, reduce=(None, None, jaxaccum.Reduce.CONCAT), num_real_microbatches=m
        )
        return f(p, b)

    text = jax.jit(run).trace(params, batch, 2).lower(lowering_platforms=(platform,)).as_text()
    ops = collections.Counter(OP.findall(text))
    plain, _ = ops_of_step(step, params, batch, platform)
    assert ops["stablehlo.while"] == 1
    assert ops["stablehlo.convolution"] == plain["stablehlo.convolution"]
    assert not [word for word in FORBIDDEN if word in text]


def ops_of_step(step: Any, params: Any, batch: Any, platform: str) -> tuple[Any, str]:
    """The operations of the step itself on one micro-batch, lowered for ``platform``."""
    mb = jax.tree.map(lambda x: x[: x.shape[0] // K], batch)
    return ops(step, params, mb, platform)
