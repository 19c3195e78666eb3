"""Mode ``fsdp-memory``: per-device memory and collectives of sharded train steps.

One Adam step of the MLP (``workloads.mlp_apply``, widths 512-2048-2048-512, mean squared
error ``workloads.mlp_mse_loss``, batch 2048 sharded over the mesh axis ``data``) on 8
devices, compiled and never run. Layouts:

* ``replicated DP``: params replicated, ``jaxaccum.train_step(..., data_axis="data")``;
* ``FSDP per micro-batch``: every weight matrix sharded ``P("data")`` on its first axis,
  ``fsdp="per_microbatch"`` (gathered in the loop, gradient reduce-scattered per micro-batch);
* ``FSDP gather once``: the same params, ``fsdp="gather_once"``;
* ``tensor parallel``: a 4 × 2 mesh ("data", "model"), matrices ``P(None, "model")``, the
  batch over "data" with ``data_axis="data"``, the model axis left to the compiler;
* ``FSDP, no accumulation``: ``jax.jit`` of the full-batch gradient and Adam on the FSDP
  params, the layout left to the compiler (the step accumulation has to beat).

Memory is XLA's compiled memory analysis per device, the state donated as in training, read
with :func:`jaxaccum.inspect.plan_microbatches` (one candidate k): arguments, outputs,
temporaries, aliased bytes, and the accumulator, the loop's carry per device. Collectives are
read from the compiled HLO with :func:`jaxaccum.inspect.collectives`. With fewer than 8
devices the mode runs in a child process on 8 forced CPU devices (``common.json_from_child``).
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
from benchmarks.workloads import init_mlp, mlp_mse_loss

DEVICES = 8
WIDTHS = (512, 2048, 2048, 512)
UNACCUMULATED = "FSDP, no accumulation"
Layout = tuple[Any, Any, Callable[..., Any]]  # (mesh, train state, step function)


def _layouts(k: int, n: int) -> dict[str, Layout]:
    """Every layout at ``k``: its mesh, its (sharded) train state and its step function."""
    auto = jax.sharding.AxisType.Auto
    devices = jax.devices()[:DEVICES]
    flat = jax.make_mesh((DEVICES,), ("data",), axis_types=(auto,), devices=devices)
    grid = jax.make_mesh(
        (DEVICES // 2, 2), ("data", "model"), axis_types=(auto, auto), devices=devices
    )
    params = init_mlp(jax.random.key(0), WIDTHS)
    tx = optax.adam(1e-3)

    def specs(w: P) -> Any:  # one (weight, bias) spec per layer; biases replicated
        return [(w, P()) for _ in params]

    def place(mesh: Any, tree: Any, spec: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, spec)

    def plain(state: Any, b: Any) -> Any:
        p, opt = state
        updates, opt = tx.update(jax.grad(mlp_mse_loss)(p, b), opt, p)
        return optax.apply_updates(p, updates), opt

    def step(mesh: Any, spec: Any, **kw: Any) -> Layout:
        built = jaxaccum.train_step(mlp_mse_loss, tx, k, data_axis="data", param_specs=spec, **kw)
        return mesh, built.init(place(mesh, params, spec)), built.update

    fsdp = specs(P("data"))
    p_fsdp = place(flat, params, fsdp)
    return {
        "replicated DP": step(flat, specs(P())),
        "FSDP per micro-batch": step(flat, fsdp, fsdp="per_microbatch"),
        "FSDP gather once": step(flat, fsdp, fsdp="gather_once"),
        "tensor parallel (4 x 2)": step(grid, specs(P(None, "model"))),
        UNACCUMULATED: (flat, (p_fsdp, tx.init(p_fsdp)), plain),
    }


def _row(name: str, k: int, layout: Layout, n: int) -> dict[str, Any]:
    """The memory and collectives of one layout's compiled step at ``k``."""
    mesh, state, fn = layout
    batch = {"x": jnp.ones((n, WIDTHS[0])), "y": jnp.ones((n, WIDTHS[-1]))}
    b = jax.device_put(batch, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        plan = jaxaccum.inspect.plan_microbatches(
            lambda _: fn, state, b, budget=2**62, ks=[k], donate_argnums=0
        )
        report = jaxaccum.inspect.collectives(jax.jit(fn, donate_argnums=0), state, b)
    c = plan.candidates[0]
    return {
        "layout": name,
        "k": k,
        "argument_bytes": c.argument_bytes,
        "output_bytes": c.output_bytes,
        "temp_bytes": c.temp_bytes,
        "alias_bytes": c.alias_bytes,
        "accumulator_bytes": c.accumulator_bytes,
        "peak_bytes": c.peak_bytes,
        "collectives": [
            {"op": x.op, "bytes": x.bytes, "in_loop": x.in_loop} for x in report.collectives
        ],
    }


def _rows(ks: Sequence[int], n: int) -> list[dict[str, Any]]:
    """Every layout at every k; the unaccumulated step once, at the first k (as k = 1)."""
    rows = []
    for k in ks:
        for name, layout in _layouts(k, n).items():
            if name != UNACCUMULATED:
                rows.append(_row(name, k, layout, n))
            elif k == ks[0]:
                rows.append(_row(name, 1, layout, n))
    return rows


def collect(ks: Sequence[int], n: int) -> dict[str, Any]:
    """Runs in this process if it has 8 devices, else in a child process that does."""
    if jax.device_count() < DEVICES:
        args = ["--ks", ",".join(map(str, ks)), "--batch", str(n)]
        return json_from_child("fsdp-memory", args, DEVICES, 1800)
    return {
        "machine": machine_info(),
        "devices": DEVICES,
        "batch": n,
        "widths": WIDTHS,
        "rows": _rows(ks, n),
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**16 else f"{n} B"


def _collectives(row: dict[str, Any]) -> str:
    """``op n × size`` per kind, inside and outside the loop."""
    parts = []
    for in_loop in (True, False):
        groups: dict[tuple[str, int], int] = {}
        for c in row["collectives"]:
            if c["in_loop"] == in_loop:
                key = (c["op"], c["bytes"])
                groups[key] = groups.get(key, 0) + 1
        text = ", ".join(
            f"{op} {count} × {_mib(size)}" for (op, size), count in sorted(groups.items())
        )
        parts.append(("in loop: " if in_loop else "after/before: ") + (text or "none"))
    return "; ".join(parts)


def markdown(result: dict[str, Any]) -> str:
    """The table: per-device memory (MiB) and collectives of each layout."""
    rows = result["rows"]
    base = next(r["peak_bytes"] for r in rows if r["layout"] == UNACCUMULATED)
    lines = [
        "| layout | k | arguments | outputs | temporaries | accumulator | peak | "
        "peak ÷ unaccumulated FSDP | collectives (per-device bytes) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [r[f"{c}_bytes"] / 2**20 for c in ("argument", "output", "temp", "accumulator")]
        lines.append(
            f"| {r['layout']} | {r['k']} | "
            + " | ".join(f"{c:.2f}" for c in cells)
            + f" | {r['peak_bytes'] / 2**20:.2f} | {r['peak_bytes'] / base:.2f} | "
            + f"{_collectives(r)} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the mode: prints the machine and the table, or with ``--json -`` only JSON."""
    return run_sharded(args, DEVICES, collect, markdown)
