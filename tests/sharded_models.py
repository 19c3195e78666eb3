"""Models written the way sharded JAX models are written, for the multi-device checks.

``loss`` is a stack of L layers of D × D weights, ``w`` shaped (L, D, D) and sharded
``P(None, None, "data")`` (FSDP), scanned over with each layer under ``jax.checkpoint``,
as MaxText writes its decoder: one layer's weight is gathered where it is used (on
Explicit axes a ``jax.sharding.reshard`` to a ``reduced`` spec, on Auto axes a sharding
constraint), so only one layer's whole weight is alive at a time, and on Auto axes the
activations are pinned to the data axis with ``with_sharding_constraint``, the GSPMD idiom.
On unplaced arrays (the one-device reference) every annotation is skipped.

``whole_weights_loss`` uses its weights as they are, each sharded ``P(None, "data")``,
leaving the gathers to the compiler (Auto axes only).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def _mesh(x: jax.Array) -> Any:
    mesh = jax.typeof(x).sharding.mesh
    return None if mesh.empty else mesh


def _explicit(mesh: Any) -> bool:
    return AxisType.Explicit in mesh.axis_types


def whole(w: jax.Array) -> jax.Array:
    """One layer's weight, whole, where it is used."""
    mesh = _mesh(w)
    if mesh is None:
        return w
    if _explicit(mesh):  # reduced over every axis the batch is split over
        batch_axes = {a for a in mesh.axis_names if a in (DATA, "replica")}
        return jax.sharding.reshard(w, NamedSharding(mesh, P(None, None, reduced=batch_axes)))
    return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))


def pin(h: jax.Array) -> jax.Array:
    """Activations pinned to the data axis on Auto axes (types carry it on Explicit ones)."""
    mesh = _mesh(h)
    if mesh is None or _explicit(mesh):
        return h
    return jax.lax.with_sharding_constraint(h, NamedSharding(mesh, P(DATA)))


@jax.checkpoint
def layer(h: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
    return jnp.tanh(pin(h) @ whole(w)), None


def forward(stacked: jax.Array, x: jax.Array) -> jax.Array:
    h, _ = jax.lax.scan(layer, x, stacked)
    return h


def loss(params: Any, batch: Any) -> jax.Array:
    return jnp.mean((forward(params["w"], batch["x"]) - batch["y"]) ** 2)


def init(key: jax.Array, layers: int, width: int) -> dict[str, jax.Array]:
    return {"w": jax.random.normal(key, (layers, width, width)) / width**0.5}


def batch(key: jax.Array, n: int, width: int) -> dict[str, jax.Array]:
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n, width)), "y": jax.random.normal(ky, (n, width)) * 0.5}


SPEC = {"w": P(None, None, DATA)}


def abstract(mesh: Any, layers: int, width: int, n: int) -> tuple[Any, Any]:
    """Abstract FSDP params and a sharded batch, for compiling without allocating."""
    w = jax.ShapeDtypeStruct(
        (layers, width, width), jnp.float32, sharding=NamedSharding(mesh, SPEC["w"])
    )
    x = jax.ShapeDtypeStruct((n, width), jnp.float32, sharding=NamedSharding(mesh, P(DATA)))
    return {"w": w}, {"x": x, "y": x}


class Stack(nn.Module):
    """``loss``'s layers as a Flax linen module: one stacked ``(L, D, D)`` parameter."""

    layers: int
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param(
            "w", nn.initializers.normal(self.width**-0.5), (self.layers, self.width, self.width)
        )
        return forward(w, x)


class NNXStack(nnx.Module):
    """``loss``'s layers as a Flax NNX module."""

    def __init__(self, w: jax.Array) -> None:
        self.w = nnx.Param(w)

    def __call__(self, x: jax.Array) -> jax.Array:
        return forward(self.w[...], x)


def whole_weights_loss(params: Any, batch: Any) -> jax.Array:
    """L separate D × D weights used whole; the compiler decides the gathers (Auto)."""
    h = batch["x"]
    for w in params:
        h = jnp.tanh(h @ w)
    return jnp.mean((h - batch["y"]) ** 2)
