"""Mode ``fsdp-memory``: per-device memory and collectives of FSDP models on 8 devices.

Two models, compiled and never run, on 8 devices over one mesh axis ``data``:

* **Scan over layers** (both mesh kinds): ``--layers`` stacked ``--width`` × ``--width``
  weights sharded ``P(None, None, "data")``, scanned over, each layer under
  ``jax.checkpoint`` gathering its own weight where it uses it (the MaxText way: on Explicit
  axes ``jax.sharding.reshard`` to a ``reduced`` spec, on Auto axes a sharding constraint,
  with the activations pinned to ``data``). Mean squared error on a batch of ``--batch``
  rows. Rows: the unaccumulated FSDP gradient (``jax.jit(jax.value_and_grad(loss))``), and
  ``jaxaccum.accumulate(..., data_axis="data")`` with each ``fsdp=`` strategy at each k.
* **Weights used whole** (Auto axes): as many separate weights sharded ``P(None, "data")``,
  used as they are (the compiler decides the gathers), batch ``--batch`` / 8, at the largest
  k: the unaccumulated gradient, jaxaccum with the strided (default) and contiguous splits,
  and for reference a hand-written ``lax.scan`` whose accumulator is pinned to the
  parameters' sharding with ``with_sharding_constraint``, with either split.

Memory is XLA's compiled memory analysis per device, read with
:func:`jaxaccum.inspect.plan_microbatches` (one candidate k): the peak (arguments + outputs +
temporaries − aliased) and the accumulator, the loop's carry per device. Collectives are
read from the compiled HLO with :func:`jaxaccum.inspect.collectives`: kind, count and bytes
per device, inside the micro-batch loop or outside it. With fewer than 8 devices the mode
runs in a child process on 8 forced CPU devices (``common.json_from_child``).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxaccum
from benchmarks.common import json_from_child, machine_info, run_sharded

DEVICES = 8
KINDS = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
STRATEGIES = ("per_microbatch", "gather_once")


def _whole(w: jax.Array) -> jax.Array:
    """One layer's weight, gathered where it is used."""
    mesh = jax.typeof(w).sharding.mesh
    if AxisType.Explicit in mesh.axis_types:
        return jax.sharding.reshard(w, NamedSharding(mesh, P(None, None, reduced={"data"})))
    return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))


def _pin(h: jax.Array) -> jax.Array:
    mesh = jax.typeof(h).sharding.mesh
    if AxisType.Explicit in mesh.axis_types:
        return h
    return jax.lax.with_sharding_constraint(h, NamedSharding(mesh, P("data")))


@jax.checkpoint
def _layer(h: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
    return jnp.tanh(_pin(h) @ _whole(w)), None


def stack_loss(params: Any, batch: Any) -> jax.Array:
    """The scan-over-layers model's mean squared error."""
    h, _ = jax.lax.scan(_layer, batch["x"], params["w"])
    return jnp.mean((h - batch["y"]) ** 2)


def whole_weights_loss(params: Any, batch: Any) -> jax.Array:
    """Separate weights used whole: the compiler decides where to gather them."""
    h = batch["x"]
    for w in params:
        h = jnp.tanh(h @ w)
    return jnp.mean((h - batch["y"]) ** 2)


def pinned_scan(k: int, split: str, specs: Any) -> Callable[..., Any]:
    """The hand-written reference: a scan whose accumulator is pinned to the params' specs."""
    vg = jax.value_and_grad(whole_weights_loss)

    def step(params: Any, batch: Any) -> Any:
        def micro(b: jax.Array) -> jax.Array:
            if split == "contiguous":
                return b.reshape(k, b.shape[0] // k, *b.shape[1:])
            return jnp.swapaxes(b.reshape(b.shape[0] // k, k, *b.shape[1:]), 0, 1)

        def body(acc: Any, mb: Any) -> tuple[Any, None]:
            loss, grads = vg(params, mb)
            acc = jax.tree.map(lambda a, g: a + g, acc, (loss, grads))
            return jax.tree.map(jax.lax.with_sharding_constraint, acc, specs), None

        zeros = jax.tree.map(jnp.zeros_like, (jnp.float32(0), params))
        acc, _ = jax.lax.scan(body, zeros, jax.tree.map(micro, batch))
        return jax.tree.map(lambda a: a / k, acc)

    return step


def _abstract(shape: tuple[int, ...], mesh: Any, spec: P) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))


def _row(name: str, k: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> dict[str, Any]:
    """The memory and collectives of ``fn``'s compiled program at ``k``."""
    plan = jaxaccum.inspect.plan_microbatches(lambda _: fn, *args, budget=2**62, ks=[k])
    report = jaxaccum.inspect.collectives(jax.jit(fn), *args)
    c = plan.candidates[0]
    return {
        "layout": name,
        "k": k,
        "peak_bytes": c.peak_bytes,
        "accumulator_bytes": c.accumulator_bytes,
        "argument_bytes": c.argument_bytes,
        "output_bytes": c.output_bytes,
        "temp_bytes": c.temp_bytes,
        "alias_bytes": c.alias_bytes,
        "collectives": [
            {"op": x.op, "bytes": x.bytes, "in_loop": x.in_loop} for x in report.collectives
        ],
    }


def _stack_rows(kind: str, ks: Sequence[int], n: int, layers: int, width: int) -> list[Any]:
    mesh = jax.make_mesh(
        (DEVICES,), ("data",), axis_types=(KINDS[kind],), devices=jax.devices()[:DEVICES]
    )
    params = {"w": _abstract((layers, width, width), mesh, P(None, None, "data"))}
    row = _abstract((n, width), mesh, P("data"))
    args = (params, {"x": row, "y": row})
    vg = jax.value_and_grad(stack_loss)
    specs = {} if kind == "explicit" else {"in_specs": ({"w": P(None, None, "data")},)}
    rows = [_row(f"{kind}: FSDP, no accumulation", 1, vg, args)]
    for strategy in STRATEGIES:
        for k in ks:
            fn = jaxaccum.accumulate(vg, k, data_axis="data", fsdp=strategy, **specs)
            rows.append(_row(f"{kind}: {strategy}", k, fn, args))
    return rows


def _whole_rows(k: int, n: int, layers: int, width: int) -> list[Any]:
    mesh = jax.make_mesh(
        (DEVICES,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:DEVICES]
    )
    spec = P(None, "data")
    params = [_abstract((width, width), mesh, spec)] * layers
    row = _abstract((n, width), mesh, P("data"))
    args = (params, {"x": row, "y": row})
    vg = jax.value_and_grad(whole_weights_loss)
    rows = [_row("auto, used whole: FSDP, no accumulation", 1, vg, args)]
    for split in ("strided", "contiguous"):
        fn = jaxaccum.accumulate(vg, k, data_axis="data", split=split, in_specs=([spec] * layers,))
        rows.append(_row(f"auto, used whole: {split} split", k, fn, args))
    specs = (NamedSharding(mesh, P()), [NamedSharding(mesh, spec)] * layers)
    for split in ("strided", "contiguous"):
        fn = pinned_scan(k, split, specs)
        rows.append(_row(f"auto, used whole: hand-written pinned scan, {split}", k, fn, args))
    return rows


def collect(ks: Sequence[int], n: int, layers: int = 16, width: int = 1024) -> dict[str, Any]:
    """Runs in this process if it has 8 devices, else in a child process that does."""
    if jax.device_count() < DEVICES:
        args = ["--ks", ",".join(map(str, ks)), "--batch", str(n)]
        args += ["--layers", str(layers), "--width", str(width)]
        return json_from_child("fsdp-memory", args, DEVICES, 1800)
    whole_batch = max(n // 8, DEVICES * max(ks))
    return {
        "machine": machine_info(),
        "devices": DEVICES,
        "batch": n,
        "layers": layers,
        "width": width,
        "param_bytes": layers * width * width * 4,
        "whole_weights_batch": whole_batch,
        "rows": [r for kind in KINDS for r in _stack_rows(kind, ks, n, layers, width)]
        + _whole_rows(max(ks), whole_batch, layers, width),
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
        parts.append(("in loop: " if in_loop else "outside: ") + (text or "none"))
    return "; ".join(parts)


def markdown(result: dict[str, Any]) -> str:
    """The table: per-device peak against the unaccumulated step and the whole params."""
    rows, whole = result["rows"], result["param_bytes"]
    lines = [
        "| model and mesh: strategy | k | peak (MiB) | ÷ unaccumulated | ÷ whole params | "
        "accumulator (MiB) | collectives (per device; in the micro-batch loop or outside) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = 0
    for r in rows:
        if "no accumulation" in r["layout"]:
            base = r["peak_bytes"]
        lines.append(
            f"| {r['layout']} | {r['k']} | {r['peak_bytes'] / 2**20:.2f} | "
            f"{r['peak_bytes'] / base:.2f} | {r['peak_bytes'] / whole:.2f} | "
            f"{r['accumulator_bytes'] / 2**20:.2f} | {_collectives(r)} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the mode: prints the machine and the table, or with ``--json -`` only JSON."""
    collect_here = functools.partial(collect, layers=args.layers, width=args.width)
    return run_sharded(args, DEVICES, collect_here, markdown)
