"""Mode ``collectives``: collectives per training step against k, from the compiled HLO.

Every method computes the gradient of the MLP's mean loss (``workloads.mlp_loss``: weight
matrices and biases) over a batch sharded along the mesh axis ``data`` of 8 devices (params
replicated), split into k micro-batches, on an Explicit mesh (``jax.make_mesh``'s default)
unless the name says Auto:

* ``jaxaccum data_axis``: ``jaxaccum.accumulate(..., data_axis="data")``: the weight
  matrices' gradients reduced once after the loop, the biases' (added to the sharded
  activations, which cannot be ``reduced`` in jax 0.10) and the loss inside it;
* ``jaxaccum data_axis (Auto)``: the same on Auto axes, where the compiler reduces;
* ``jit scan (strided)``: the same ``jaxaccum.accumulate`` without ``data_axis``, which is
  what a hand-written scan over a sharded batch gets;
* ``jit scan (contiguous, Auto)``: likewise with the ``(k, N/k)`` split, on Auto axes (on
  Explicit ones the split is refused);
* ``optax.microbatch (Auto)``: ``optax.microbatch`` under ``jax.jit``;
* ``python loop``: k calls of a jitted micro-batch gradient (each call communicates once).

Counts come from :func:`jaxaccum.inspect.collectives`; nothing runs. ``per_step`` counts
what runs per step: an instruction inside the loop runs k times (k calls for the Python
loop). With fewer than 8 devices the count runs in a child process on 8 forced CPU devices
(``common.json_from_child``); on a host with 8 GPUs it uses them as they are.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxaccum
from benchmarks.common import json_from_child, machine_info, run_sharded
from benchmarks.workloads import MLP_WIDTHS, init_mlp, mlp_loss

DEVICES = 8


def _inputs(kind: jax.sharding.AxisType, n: int) -> tuple[Any, Any, Any]:
    """The mesh, replicated params and the abstract sharded batch on 8 devices."""
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(kind,), devices=jax.devices()[:DEVICES])
    params = init_mlp(jax.random.key(0), MLP_WIDTHS)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    sharding = NamedSharding(mesh, P("data"))
    batch = {
        "x": jax.ShapeDtypeStruct((n, MLP_WIDTHS[0]), jnp.float32, sharding=sharding),
        "y": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
    }
    return mesh, params, batch


def _methods(n: int) -> dict[str, tuple[Any, Callable[[int, Any], tuple[Any, Any, int]]]]:
    """name -> (mesh kind, k -> (function, batch argument, calls per step))."""
    vg = jax.value_and_grad(mlp_loss)
    explicit, auto = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto

    def split(k: int, batch: Any) -> Any:  # one micro-batch, for the Python loop's k calls
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((n // k, *s.shape[1:]), s.dtype, sharding=s.sharding),
            batch,
        )

    def microbatch(k: int, batch: Any) -> tuple[Any, Any, int]:
        mean = optax.microbatching.AccumulationType.MEAN
        fn = optax.microbatching.microbatch(vg, argnums=1, microbatch_size=n // k, accumulator=mean)
        return fn, batch, 1

    return {
        "jaxaccum data_axis": (
            explicit,
            lambda k, b: (jaxaccum.accumulate(vg, k, data_axis="data"), b, 1),
        ),
        "jaxaccum data_axis (Auto)": (
            auto,
            lambda k, b: (jaxaccum.accumulate(vg, k, data_axis="data"), b, 1),
        ),
        "jit scan (strided)": (explicit, lambda k, b: (jaxaccum.accumulate(vg, k), b, 1)),
        "jit scan (contiguous, Auto)": (
            auto,
            lambda k, b: (jaxaccum.accumulate(vg, k, split="contiguous"), b, 1),
        ),
        "optax.microbatch (Auto)": (auto, microbatch),
        "python loop": (explicit, lambda k, b: (vg, split(k, b), k)),
    }


def _rows(ks: Sequence[int], n: int) -> list[dict[str, Any]]:
    """One row per (method, k), counted on this process's first 8 devices."""
    rows = []
    for name, (kind, build) in _methods(n).items():
        mesh, params, batch = _inputs(kind, n)
        for k in ks:
            fn, args, calls = build(k, batch)
            with jax.set_mesh(mesh):
                report = jaxaccum.inspect.collectives(fn, params, args)
            loops = 1 if calls > 1 else k
            runs = [(c, (loops if c.in_loop else 1) * calls) for c in report.collectives]
            rows.append(
                {
                    "method": name,
                    "k": k,
                    "in_loop": report.counts(in_loop=True),
                    "outside_loop": report.counts(in_loop=False),
                    "bytes_in_loop": sum(c.bytes for c in report.in_loop),
                    "bytes_outside_loop": sum(c.bytes for c in report.outside_loop),
                    "per_step": sum(times for _, times in runs),
                    "bytes_per_step": sum(c.bytes * times for c, times in runs),
                    "non_reduce_bytes_per_step": sum(
                        c.bytes * times for c, times in runs if c.op != "all-reduce"
                    ),
                }
            )
    return rows


def collect(ks: Sequence[int], n: int) -> dict[str, Any]:
    """Counts in this process if it has 8 devices, else in a child process that does.

    Returns:
      ``{"machine": ..., "devices": [...], "rows": [...]}`` of the process that counted.
    """
    if jax.device_count() < DEVICES:
        args = ["--ks", ",".join(map(str, ks)), "--batch", str(n)]
        return json_from_child("collectives", args, DEVICES, 1200)
    devices = [str(d) for d in jax.devices()[:DEVICES]]
    return {"machine": machine_info(), "devices": devices, "rows": _rows(ks, n)}


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A table: method, k, collectives in the loop / outside it, collectives run per step."""
    lines = [
        "| method | k | in loop (bytes) | outside loop (bytes) | run per step | "
        "MiB moved per step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        inside = ", ".join(f"{op} {n}" for op, n in r["in_loop"].items()) or "none"
        outside = ", ".join(f"{op} {n}" for op, n in r["outside_loop"].items()) or "none"
        lines.append(
            f"| {r['method']} | {r['k']} | {inside} ({r['bytes_in_loop']}) | {outside} "
            f"({r['bytes_outside_loop']}) | {r['per_step']} | {r['bytes_per_step'] / 2**20:.2f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the mode: prints the machine and the table, or with ``--json -`` only JSON."""
    return run_sharded(args, DEVICES, collect, lambda result: markdown(result["rows"]))
