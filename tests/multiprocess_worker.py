"""One process of the multi-process accumulation check (run by ``test_multiprocess.py``).

Usage: ``python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_PATH``.

Every process joins JAX's multi-controller runtime on ``127.0.0.1:PORT`` with
``LOCAL_DEVICES`` CPU devices of its own (cross-process collectives go through gloo), builds
the same digits batches, feeds only the rows its devices hold, and trains the tests' MLP
for ``STEPS`` SGD steps in each of the ``LAYOUTS``: parameters replicated, and parameters
sharded over the data axis (FSDP) with both of jaxaccum's strategies. The gradient comes
from :func:`make_grad_fn`: k-micro-batch accumulation over a global batch sharded along the
mesh axis ``"data"``. Process 0 writes, per layout, the per-step losses, the first step's
gradients, the final params and whether the gradients came back sharded like the params to
``OUT_PATH`` (``.npz``, flattened with :func:`flatten`, names prefixed by the layout).

Nothing runs at import time: pytest imports this module to collect doctests, and the
device count can only be set before JAX's backend starts.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import jax
import numpy as np
from helpers import digits_batch, init_params, mean_loss
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxaccum

LOCAL_DEVICES = 4
GLOBAL_BATCH = 64
K = 4
STEPS = 10
LR = 0.5
TIMEOUT_S = 60  # for joining, heartbeats and the shutdown barrier
LAYOUTS = ("replicated", "per_microbatch", "gather_once")


def param_specs(params: Any, layout: str, devices: int) -> Any:
    """Replicated, or every matrix's first axis sharded over ``"data"`` (FSDP)."""

    def spec(x: Any) -> P:
        fsdp = layout != "replicated" and np.ndim(x) == 2 and np.shape(x)[0] % devices == 0
        return P("data") if fsdp else P()

    return jax.tree.map(spec, params)


def make_grad_fn(k: int, mesh: Mesh, layout: str, specs: Any) -> Any:
    """``value_and_grad(mean_loss)`` accumulated over k micro-batches of a sharded batch,
    with jaxaccum's data-parallel path: one all-reduce per step after the loop, or for
    FSDP params reduce-scatters (per micro-batch, or once after gathering them once)."""
    grad_fn = jax.value_and_grad(mean_loss)
    if layout == "replicated":
        return jaxaccum.accumulate(grad_fn, k, data_axis="data", mesh=mesh)
    return jaxaccum.accumulate(
        grad_fn, k, data_axis="data", mesh=mesh, fsdp=layout, in_specs=(specs,)
    )


def batches(steps: int = STEPS, n: int = GLOBAL_BATCH) -> list[dict[str, np.ndarray]]:
    """The global batch of every step: consecutive, disjoint slices of the digits."""
    return [jax.tree.map(np.asarray, digits_batch(n, offset=s * n)) for s in range(steps)]


def flatten(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    """``{"prefix/params/Dense_0/kernel": array, ...}`` for saving a pytree in an ``.npz``."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        prefix + "".join(f"/{getattr(p, 'key', p)}" for p in path): np.asarray(leaf)
        for path, leaf in leaves
    }


def global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host copy of the whole value; each process fills its own shards."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def train(mesh: Mesh, layout: str) -> dict[str, np.ndarray]:
    """Runs the training steps; returns losses, first gradients and final params on host."""
    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P("data"))
    specs = param_specs(init_params(), layout, mesh.size)
    placed = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    grad_fn = make_grad_fn(K, mesh, layout, specs)

    @jax.jit
    def step(params: Any, batch: Any) -> tuple[Any, jax.Array, Any]:
        loss, grads = grad_fn(params, batch)
        new = jax.tree.map(lambda p, g: p - LR * g, params, grads)
        return jax.lax.with_sharding_constraint((new, loss, grads), (placed, replicated, placed))

    params = jax.tree.map(lambda x, s: global_array(np.asarray(x), s), init_params(), placed)
    losses, first_grads, kept = [], None, True
    for batch in batches():
        params, loss, grads = step(params, jax.tree.map(lambda x: global_array(x, sharded), batch))
        losses.append(np.asarray(loss))
        flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
        kept &= all(
            g.sharding.spec == s for g, s in zip(jax.tree.leaves(grads), flat_specs, strict=True)
        )
        first_grads = grads if first_grads is None else first_grads
    host = multihost_utils.process_allgather((first_grads, params), tiled=True)
    return {
        f"{layout}/losses": np.stack(losses),
        f"{layout}/sharded_like_params": np.asarray(kept),
        **flatten(host[0], f"{layout}/grads"),
        **flatten(host[1], f"{layout}/params"),
    }


def main(process_id: int, num_processes: int, port: int, out_path: str) -> None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        cluster_detection_method="deactivate",  # ignore SLURM/MPI variables a CI host may set
        initialization_timeout=TIMEOUT_S,
        heartbeat_timeout_seconds=TIMEOUT_S,
        shutdown_timeout_seconds=TIMEOUT_S,
        coordinator_bind_address=f"127.0.0.1:{port}",  # default: every interface
    )
    expected = num_processes * LOCAL_DEVICES
    if jax.device_count() != expected or jax.process_count() != num_processes:
        raise RuntimeError(
            f"expected {num_processes} processes x {LOCAL_DEVICES} devices, got "
            f"{jax.process_count()} processes and devices {jax.devices()}"
        )
    mesh = Mesh(np.array(jax.devices()), ("data",))
    result = {name: value for layout in LAYOUTS for name, value in train(mesh, layout).items()}
    if process_id == 0:
        np.savez(out_path, **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    try:
        main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        # Exit now: the runtime's exit hook would wait on the peers for the shutdown barrier.
        os._exit(1)
