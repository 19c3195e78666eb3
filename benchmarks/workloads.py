"""The models the benchmarks accumulate over: parameters, a loss and a synthetic batch.

The suite's three workloads, each a :class:`Workload`:

* ``mlp``: a ReLU MLP (784 → 1024 → 1024 → 10 at full size), mean softmax cross-entropy.
  The other modes use the same MLP (``builders``, ``multisteps``, ``collectives``;
  ``fsdp-memory`` has models of its own).
* ``cnn``: 3x3 convolutions, each followed by BatchNorm, ReLU and 2x2 max-pooling, then a
  dense classifier (flax linen). The BatchNorm running statistics (``batch_stats``) are
  state: the loss takes them and returns their update, so accumulation has to carry them
  from one micro-batch to the next.
* ``transformer``: a decoder-only language model (flax linen): token and position
  embeddings, pre-norm blocks of causal self-attention and an MLP, a dense head; the loss
  is the cross-entropy averaged over every token of the batch.

Batches are random (Gaussian images or features, uniform labels and tokens): the
benchmarks measure speed and exactness, not learning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
Batch = dict[str, jax.Array]
Scale = Literal["smoke", "quick", "full"]
MODELS = ("mlp", "cnn", "transformer")
MLP_WIDTHS = (784, 1024, 1024, 10)  # the MLP of every mode that has one

# Per scale and model: the model's shape and N, the examples in one effective step.
# "full" batches are divisible by 32 (the largest k); "quick" by 8; "smoke" by 2.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "mlp": {"batch": 16, "widths": (32, 32, 10)},
        "cnn": {"batch": 16, "image": (8, 8, 1), "channels": (4, 8)},
        "transformer": {"batch": 4, "seq": 8, "dim": 16, "heads": 2, "layers": 1, "vocab": 32},
    },
    "quick": {
        "mlp": {"batch": 256, "widths": MLP_WIDTHS},
        "cnn": {"batch": 128, "image": (28, 28, 1), "channels": (16, 32)},
        "transformer": {"batch": 32, "seq": 64, "dim": 128, "heads": 4, "layers": 2, "vocab": 256},
    },
    "full": {
        "mlp": {"batch": 2048, "widths": MLP_WIDTHS},
        "cnn": {"batch": 512, "image": (32, 32, 3), "channels": (32, 64, 64)},
        "transformer": {"batch": 256, "seq": 64, "dim": 128, "heads": 4, "layers": 2, "vocab": 256},
    },
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model, its loss and a batch.

    Attributes:
      name: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
      params: the parameters (the gradient is taken with respect to them).
      batch: the N examples of one effective step, a dict of arrays with leading axis N.
      loss: ``loss(params, batch) -> scalar`` when ``state`` is None, else
        ``loss(params, state, batch) -> (scalar, new_state)``; a mean over the examples.
      state: carried state (the CNN's BatchNorm statistics), or None.
      config: the sizes it was built with, for the record.
    """

    name: str
    params: Params
    batch: Batch
    loss: Callable[..., Any]
    state: Any = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def grad_step(self) -> Callable[[Params, Any, Batch], Any]:
        """``(params, state, batch) -> ((loss, grads), new_state)``, whether or not stateful.

        Without state, ``state`` is None and comes back unchanged: an empty pytree that
        adds nothing to a traced program.
        """
        if self.state is None:
            value_and_grad = jax.value_and_grad(self.loss)
            return lambda params, state, batch: (value_and_grad(params, batch), state)
        value_and_grad_aux = jax.value_and_grad(self.loss, has_aux=True)

        def step(params: Params, state: Any, batch: Batch) -> Any:
            (loss, new_state), grads = value_and_grad_aux(params, state, batch)
            return (loss, grads), new_state

        return step


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> list[tuple[jax.Array, jax.Array]]:
    """He-initialised weights and zero biases for a ReLU MLP.

    Args:
      key: a PRNG key.
      sizes: layer widths, input features first, classes last.

    Returns:
      A list of ``(W, b)`` per layer.
    """
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m), jnp.zeros(n))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_apply(params: list[tuple[jax.Array, jax.Array]], x: jax.Array) -> jax.Array:
    """The MLP's outputs: ReLU after every layer but the last."""
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def mlp_loss(params: list[tuple[jax.Array, jax.Array]], batch: Batch) -> jax.Array:
    """Mean softmax cross-entropy of the MLP over the examples of ``batch``."""
    logp = jax.nn.log_softmax(mlp_apply(params, batch["x"]))
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def mlp_batch(key: jax.Array, n: int, features: int, classes: int) -> Batch:
    """Gaussian features and uniform integer labels for ``n`` examples."""
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (n, features)),
        "y": jax.random.randint(ky, (n,), 0, classes),
    }


def mlp(batch: int, widths: Sequence[int]) -> Workload:
    """The MLP workload with ``batch`` examples."""
    params = init_mlp(jax.random.key(0), widths)
    data = mlp_batch(jax.random.key(1), batch, widths[0], widths[-1])
    config = {"batch": batch, "widths": list(widths)}
    return Workload("mlp", params, data, mlp_loss, config=config)


class CNN(nn.Module):
    """Conv 3x3 -> BatchNorm -> ReLU -> max-pool 2x2 per width, then a dense classifier."""

    channels: Sequence[int]
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for width in self.channels:
            x = nn.Conv(width, (3, 3))(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(self.classes)(x.reshape(x.shape[0], -1))


def cnn(batch: int, image: Sequence[int], channels: Sequence[int]) -> Workload:
    """The CNN+BatchNorm workload: ``batch`` random images, ``batch_stats`` as state."""
    model = CNN(tuple(channels))
    kx, ky = jax.random.split(jax.random.key(1))
    data = {
        "x": jax.random.normal(kx, (batch, *image)),
        "y": jax.random.randint(ky, (batch,), 0, model.classes),
    }
    variables = model.init(jax.random.key(0), data["x"][:2], train=False)

    def loss(params: Params, batch_stats: Any, mb: Batch) -> tuple[jax.Array, Any]:
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            mb["x"],
            train=True,
            mutable=["batch_stats"],
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, mb["y"]).mean()
        return ce, updates["batch_stats"]

    config = {"batch": batch, "image": list(image), "channels": list(channels)}
    return Workload(
        "cnn", variables["params"], data, loss, state=variables["batch_stats"], config=config
    )


class Block(nn.Module):
    """Pre-norm causal self-attention and a 4x-wide GELU MLP, both residual."""

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
    """Token and learned position embeddings, ``layers`` blocks, a final norm and head."""

    vocab: int
    seq: int
    dim: int
    heads: int
    layers: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, self.dim)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.seq, self.dim))
        for _ in range(self.layers):
            x = Block(self.dim, self.heads)(x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def transformer(batch: int, seq: int, dim: int, heads: int, layers: int, vocab: int) -> Workload:
    """The language-model workload: ``batch`` random sequences of ``seq`` next-token targets.

    Every token counts, so the mean over examples of per-example token means is the token
    mean of the batch, and plain (unweighted) accumulation is exact.
    """
    model = TinyLM(vocab, seq, dim, heads, layers)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, vocab)
    data = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
    params = model.init(jax.random.key(0), data["x"][:1])["params"]

    def loss(params: Params, mb: Batch) -> jax.Array:
        logits = model.apply({"params": params}, mb["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, mb["y"]).mean()

    config = {
        "batch": batch,
        "seq": seq,
        "dim": dim,
        "heads": heads,
        "layers": layers,
        "vocab": vocab,
    }
    return Workload("transformer", params, data, loss, config=config)


def build(name: str, scale: Scale, batch_scale: int = 1) -> Workload:
    """The workload ``name`` at ``scale``, with its batch multiplied by ``batch_scale``."""
    sizes = dict(SIZES[scale][name])
    sizes["batch"] *= batch_scale
    builders: dict[str, Callable[..., Workload]] = {
        "mlp": mlp,
        "cnn": cnn,
        "transformer": transformer,
    }
    return builders[name](**sizes)
