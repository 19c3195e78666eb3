"""Mode ``collectives``: collectives per training step against k, from the compiled HLO.

Every method computes the gradient of the MLP's mean loss (``workloads.mlp_loss``) over a
batch sharded along the mesh axis ``data`` of 8 devices (params replicated), split into k
micro-batches:

* ``jaxaccum data_axis``: ``jaxaccum.accumulate(..., data_axis="data")``;
* ``jit scan (strided)``: the same ``jaxaccum.accumulate`` without ``data_axis``, left to
  the compiler (GSPMD), which is what a hand-written scan over a sharded batch gets;
* ``jit scan (contiguous)``: likewise with the ``(k, N/k)`` split;
* ``optax.microbatch``: ``optax.microbatch`` under ``jax.jit``;
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


def _rows(ks: Sequence[int], n: int) -> list[dict[str, Any]]:
    """One row per (method, k), counted on this process's first 8 devices."""
    mesh = jax.make_mesh(
        (DEVICES,),
        ("data",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:DEVICES],
    )
    params = init_mlp(jax.random.key(0), MLP_WIDTHS)
    sharding = NamedSharding(mesh, P("data"))
    batch = {
        "x": jax.ShapeDtypeStruct((n, MLP_WIDTHS[0]), jnp.float32, sharding=sharding),
        "y": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
    }
    vg = jax.value_and_grad(mlp_loss)

    def split(k: int) -> Any:  # one micro-batch, for the Python loop's k calls
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((n // k, *s.shape[1:]), s.dtype, sharding=sharding),
            batch,
        )

    # name -> k -> (function, batch argument, calls per step)
    methods: dict[str, Callable[[int], tuple[Any, Any, int]]] = {
        "jaxaccum data_axis": lambda k: (
            jaxaccum.accumulate(vg, k, data_axis="data", mesh=mesh),
            batch,
            1,
        ),
        "jit scan (strided)": lambda k: (jaxaccum.accumulate(vg, k), batch, 1),
        "jit scan (contiguous)": lambda k: (
            jaxaccum.accumulate(vg, k, split="contiguous"),
            batch,
            1,
        ),
        "optax.microbatch": lambda k: (
            optax.microbatching.microbatch(
                vg,
                argnums=1,
                microbatch_size=n // k,
                accumulator=optax.microbatching.AccumulationType.MEAN,
            ),
            batch,
            1,
        ),
        "python loop": lambda k: (vg, split(k), k),
    }
    rows = []
    for name, build in methods.items():
        for k in ks:
            fn, args, calls = build(k)
            report = jaxaccum.inspect.collectives(fn, params, args)
            loops = 1 if calls > 1 else k
            runs = [(c, (loops if c.in_loop else 1) * calls) for c in report.collectives]
            rows.append(
                {
                    "method": name,
                    "k": k,
                    "in_loop": report.counts(in_loop=True),
                    "outside_loop": report.counts(in_loop=False),
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
        "| method | k | in loop | outside loop | run per step | MiB moved per step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        inside = ", ".join(f"{op} {n}" for op, n in r["in_loop"].items()) or "none"
        outside = ", ".join(f"{op} {n}" for op, n in r["outside_loop"].items()) or "none"
        lines.append(
            f"| {r['method']} | {r['k']} | {inside} | {outside} | {r['per_step']} | "
            f"{r['bytes_per_step'] / 2**20:.2f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the mode: prints the machine and the table, or with ``--json -`` only JSON."""
    return run_sharded(args, DEVICES, collect, lambda result: markdown(result["rows"]))
