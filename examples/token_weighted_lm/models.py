"""A tiny causal transformer over characters and its token-mean loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Params = Any
Batch = dict[str, jax.Array]


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    dim: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads)(h, h, mask=causal)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(h)))


class TinyLM(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final norm and an output layer."""

    vocab: int
    length: int
    dim: int = 64
    heads: int = 4
    layers: int = 2

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, self.dim)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.length, self.dim))
        for _ in range(self.layers):
            x = Block(self.dim, self.heads)(x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def make_loss(model: TinyLM) -> Callable[[Params, Batch], jax.Array]:
    """Mean cross-entropy over the real tokens of a batch (0 for a batch of padding only)."""

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        logits = model.apply({"params": params}, batch["x"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return jnp.sum(nll * batch["mask"]) / jnp.maximum(batch["mask"].sum(), 1.0)

    return loss_fn
