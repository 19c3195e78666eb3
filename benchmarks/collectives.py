"""Collectives per training step vs k, read from the compiled HLO on 8 devices.

Every method computes the gradient of the MLP's mean loss over a batch sharded along the
mesh axis ``data`` (params replicated), split into k micro-batches:

* ``jaxaccum data_axis``: ``jaxaccum.accumulate(..., data_axis="data")``;
* ``jit scan (strided)``: the same ``jaxaccum.accumulate`` without ``data_axis``, left to
  the compiler (GSPMD), which is what a hand-written scan over a sharded batch gets;
* ``jit scan (contiguous)``: likewise with the ``(k, N/k)`` split;
* ``optax.microbatch``: ``optax.microbatch`` under ``jax.jit``;
* ``python loop``: k calls of a jitted micro-batch gradient (each call communicates once).

Counts come from :func:`jaxaccum.inspect.collectives`; ``per_step`` counts what runs per step: an
instruction inside the loop runs k times (k calls for the Python loop). The script needs 8
devices; run it as ``python benchmarks/collectives.py`` and it re-executes itself with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` when it has fewer (on a GPU host with
8 GPUs it uses them as they are).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from children import json_from_child

DEVICES = 8


def _rows(ks: Sequence[int], n: int) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxaccum

    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sizes = (784, 1024, 1024, 10)
    keys = jax.random.split(jax.random.key(0), len(sizes))
    params = [
        (jax.random.normal(kk, (a, b)) / a**0.5, jnp.zeros(b))
        for kk, a, b in zip(keys, sizes[:-1], sizes[1:], strict=False)
    ]

    def loss(p: Any, b: Any) -> jax.Array:
        h = b["x"]
        for w, c in p[:-1]:
            h = jax.nn.relu(h @ w + c)
        w, c = p[-1]
        logits = h @ w + c
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

    batch = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P("data"))),
        {
            "x": jax.ShapeDtypeStruct((n, sizes[0]), jnp.float32),
            "y": jax.ShapeDtypeStruct((n,), jnp.int32),
        },
    )
    vg = jax.value_and_grad(loss)
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
        "python loop": lambda k: (
            vg,
            jax.tree.map(
                lambda s: jax.ShapeDtypeStruct(
                    (s.shape[0] // k, *s.shape[1:]), s.dtype, sharding=s.sharding
                ),
                batch,
            ),
            k,
        ),
    }
    rows = []
    for name, build in methods.items():
        for k in ks:
            fn, args, calls = build(k)
            report = jaxaccum.inspect.collectives(fn, params, args)
            loops = 1 if calls > 1 else k
            per_step = sum(loops if c.in_loop else 1 for c in report.collectives) * calls
            moved = sum(
                c.bytes * (loops if c.in_loop else 1) * calls
                for c in report.collectives
                if c.op != "all-reduce"
            )
            rows.append(
                {
                    "method": name,
                    "k": k,
                    "in_loop": report.counts(in_loop=True),
                    "outside_loop": report.counts(in_loop=False),
                    "per_step": per_step,
                    "bytes_per_step": sum(
                        c.bytes * (loops if c.in_loop else 1) * calls for c in report.collectives
                    ),
                    "non_reduce_bytes_per_step": moved,
                }
            )
    return rows


def collect(ks: Sequence[int], n: int) -> dict[str, Any]:
    """Runs the count in this process if it has 8 devices, else in a child that does."""
    import jax

    if jax.device_count() >= DEVICES:
        return {"devices": [str(d) for d in jax.devices()[:DEVICES]], "rows": _rows(ks, n)}
    args = ["--ks", ",".join(map(str, ks)), "--batch", str(n)]
    return json_from_child(str(pathlib.Path(__file__).resolve()), args, DEVICES, 1200)


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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,2,4,8,16,32")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--json", default="", help="write JSON here ('-': stdout only)")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    result = collect(ks, args.batch)
    if args.json == "-":
        print(json.dumps(result))
    else:
        print(markdown(result["rows"]))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
