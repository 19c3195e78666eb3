"""Per-device memory and collectives of sharded train steps, from the compiled programs.

One Adam step of an MLP (widths 512-2048-2048-512, MSE loss, batch 2048 sharded over the
mesh axis ``data``) on 8 devices, compiled and never run. Layouts:

* ``replicated DP``: params replicated, ``jaxaccum.train_step(..., data_axis="data")``;
* ``FSDP per micro-batch``: every weight matrix sharded ``P("data")`` on its first axis,
  ``fsdp="per_microbatch"`` (gathered in the loop, gradient reduce-scattered per micro-batch);
* ``FSDP gather once``: the same params, ``fsdp="gather_once"``;
* ``tensor parallel``: a 4 × 2 mesh ("data", "model"), matrices ``P(None, "model")``, the
  batch over "data" with ``data_axis="data"``, the model axis left to the compiler;
* ``FSDP, no accumulation``: ``jax.jit`` of the full-batch gradient and Adam on the FSDP
  params, the layout left to the compiler (the step accumulation has to beat).

Memory is XLA's compiled memory analysis per device (the state donated, as in training);
the accumulator is the loop's carry per device (``plan_microbatches``' column); collectives
are read from the compiled HLO with ``jaxaccum.inspect.collectives``. Run it as
``python benchmarks/fsdp_memory.py``; it re-executes itself with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` when it has fewer devices.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from children import json_from_child

DEVICES = 8
WIDTHS = (512, 2048, 2048, 512)


def _rows(ks: Sequence[int], n: int) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxaccum
    from jaxaccum._planner import accumulator_bytes

    auto = jax.sharding.AxisType.Auto
    flat = jax.make_mesh((DEVICES,), ("data",), axis_types=(auto,))
    grid = jax.make_mesh((DEVICES // 2, 2), ("data", "model"), axis_types=(auto, auto))
    keys = jax.random.split(jax.random.key(0), len(WIDTHS) - 1)
    params = [
        {"w": jax.random.normal(kk, (a, b)) / a**0.5, "b": jnp.zeros(b)}
        for kk, a, b in zip(keys, WIDTHS[:-1], WIDTHS[1:], strict=True)
    ]
    batch = {"x": jnp.ones((n, WIDTHS[0])), "y": jnp.ones((n, WIDTHS[-1]))}
    tx = optax.adam(1e-3)

    def loss(p: Any, b: Any) -> jax.Array:
        h = b["x"]
        for layer in p[:-1]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        return jnp.mean((h @ p[-1]["w"] + p[-1]["b"] - b["y"]) ** 2)

    def specs(w: P) -> Any:
        return [{"w": w, "b": P()} for _ in params]

    def place(mesh: Any, tree: Any, spec: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, spec)

    def plain(state: Any, b: Any) -> Any:
        p, opt = state
        updates, opt = tx.update(jax.grad(loss)(p, b), opt, p)
        return optax.apply_updates(p, updates), opt

    def layouts(k: int) -> dict[str, tuple[Any, Any, Callable[..., Any], Any]]:
        def step(mesh: Any, spec: Any, **kw: Any) -> tuple[Any, Any, Callable[..., Any], Any]:
            built = jaxaccum.train_step(loss, tx, k, data_axis="data", param_specs=spec, **kw)
            return mesh, built.init(place(mesh, params, spec)), built.update, None

        fsdp = specs(P("data"))
        p_fsdp = place(flat, params, fsdp)
        return {
            "replicated DP": step(flat, specs(P())),
            "FSDP per micro-batch": step(flat, fsdp, fsdp="per_microbatch"),
            "FSDP gather once": step(flat, fsdp, fsdp="gather_once"),
            "tensor parallel (4 x 2)": step(grid, specs(P(None, "model"))),
            "FSDP, no accumulation": (flat, (p_fsdp, tx.init(p_fsdp)), plain, None),
        }

    rows = []
    for k in ks:
        for name, (mesh, state, fn, _) in layouts(k).items():
            if name == "FSDP, no accumulation" and k != ks[0]:
                continue
            b = jax.device_put(batch, NamedSharding(mesh, P("data")))
            with jax.set_mesh(mesh):
                traced = jax.jit(fn, donate_argnums=0).trace(state, b)
                compiled = traced.lower().compile()
            memory = compiled.memory_analysis()
            report = jaxaccum.inspect.CollectiveReport.from_hlo(compiled.as_text())
            peak = (
                memory.argument_size_in_bytes
                + memory.output_size_in_bytes
                + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes
            )
            rows.append(
                {
                    "layout": name,
                    "k": 1 if name == "FSDP, no accumulation" else k,
                    "argument_bytes": int(memory.argument_size_in_bytes),
                    "output_bytes": int(memory.output_size_in_bytes),
                    "temp_bytes": int(memory.temp_size_in_bytes),
                    "alias_bytes": int(memory.alias_size_in_bytes),
                    "accumulator_bytes": accumulator_bytes(traced.jaxpr.jaxpr),
                    "peak_bytes": int(peak),
                    "collectives": [
                        {"op": c.op, "bytes": c.bytes, "in_loop": c.in_loop}
                        for c in report.collectives
                    ],
                }
            )
    return rows


def collect(ks: Sequence[int], n: int) -> dict[str, Any]:
    """Runs in this process if it has 8 devices, else in a child process that does."""
    import jax

    if jax.device_count() >= DEVICES:
        return {"devices": DEVICES, "batch": n, "widths": WIDTHS, "rows": _rows(ks, n)}
    args = ["--ks", ",".join(map(str, ks)), "--batch", str(n)]
    return json_from_child(str(pathlib.Path(__file__).resolve()), args, DEVICES, 1800)


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


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**16 else f"{n} B"


def markdown(result: dict[str, Any]) -> str:
    """The table: per-device memory (MiB) and collectives of each layout."""
    rows = result["rows"]
    base = next(r["peak_bytes"] for r in rows if r["layout"] == "FSDP, no accumulation")
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="8")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--json", default="", help="write JSON here ('-': stdout only)")
    args = parser.parse_args(argv)
    result = collect([int(k) for k in args.ks.split(",")], args.batch)
    if args.json == "-":
        print(json.dumps(result))
    else:
        print(markdown(result))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
