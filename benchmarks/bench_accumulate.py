"""Step time and compiled memory of gradient accumulation methods on an MLP.

Every method computes the gradient of the mean cross-entropy over the same batch of N
examples, split into k micro-batches:

* ``full batch``: ``jax.jit(jax.value_and_grad(loss))`` on all N examples (no accumulation).
* ``jaxaccum.accumulate``: ``jax.jit(jaxaccum.accumulate(jax.value_and_grad(loss), k))``.
* ``optax.microbatch``: ``jax.jit(optax.microbatch(value_and_grad, argnums=1,
  microbatch_size=N // k, accumulator=MEAN))``.
* ``optax.MultiSteps``: k calls of a jitted step (micro-batch gradient, ``MultiSteps.update``
  around ``optax.sgd(1.0)``, ``optax.apply_updates``), one per micro-batch, params and
  optimizer state donated.
* ``python loop``: k calls of a jitted micro-batch ``value_and_grad``, summed with a jitted
  add and divided by k.
* ``jaxaccum.train_step``: ``jax.jit(jaxaccum.train_step(loss, optax.sgd(1.0), k).update)``:
  the k micro-batches and one SGD update in one call, state donated (the update is extra work
  the gradient-only methods do not do; compare it with the MultiSteps rows, which also update).
* ``jaxaccum.multi_steps``: as ``optax.MultiSteps`` but with ``jaxaccum.multi_steps``.

For each k the methods are timed in one process, interleaved round-robin over the
repetitions (in a fresh random order every repetition). Methods that donate their state get fresh
copies of it before the clock starts. Each method's time is divided by the
full-batch time of the same repetition, a few steps away in time, and the median of those
ratios is reported next to the median step time; paired ratios stay meaningful when the
machine's speed drifts during the run. Compilation is timed separately and never counted
in step times. Before timing, each method's gradient is compared with the full-batch one.

Run ``python benchmarks/bench_accumulate.py`` (full) or ``... --quick`` (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxaccum

# benchmarks/ holds scripts, not a package: make its shared modules importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import methods
import workloads
from common import Method, compiled, machine_info, max_abs_diff, paired_ratios, time_round_robin
from methods import FULL
from workloads import Workload

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out" / "accumulate.json"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure.

    Attributes:
      sizes: layer widths from input features to classes.
      batch: N, the examples in one effective step.
      ks: the numbers of micro-batches to compare.
      reps: timed repetitions per method and k.
      warmup: untimed calls per method after compilation.
    """

    sizes: tuple[int, ...]
    batch: int
    ks: tuple[int, ...]
    reps: int
    warmup: int


def jaxaccum_multi_steps(w: Workload, k: int) -> Method:
    """k calls of a jitted train step with ``jaxaccum.multi_steps(optax.sgd(1.0), k)``."""
    opt = jaxaccum.multi_steps(optax.sgd(1.0), every_k_schedule=k)
    return methods.across_calls("jaxaccum.multi_steps", opt, w, k)


def jaxaccum_train_step(w: Workload, k: int) -> Method:
    """``jaxaccum.train_step(loss, optax.sgd(1.0), k).update``, jitted with the state donated.

    k micro-batches and one SGD update in one call; fresh copies of the state are made
    before the clock starts. The gradient is read back as ``params - new_params``.
    """
    built = jaxaccum.train_step(w.loss, optax.sgd(1.0), k)
    state0 = built.init(w.params)
    fn, memory, compile_s, _ = compiled(built.update, state0, w.batch, donate_argnums=0)
    fresh: list[Any] = []

    def prepare() -> None:
        fresh[:] = [jax.block_until_ready(jax.tree.map(jnp.copy, state0))]

    def step() -> tuple[jaxaccum.TrainState, jaxaccum.TrainMetrics]:
        if not fresh:
            prepare()
        return fn(fresh.pop(), w.batch)

    def result() -> Any:
        state, metrics = step()
        return (metrics.loss, jax.tree.map(jnp.subtract, w.params, state.params)), None

    return Method("jaxaccum.train_step", step, result, memory, compile_s, prepare)


def run_k(w: Workload, full: Method, k: int, s: Settings) -> list[dict[str, Any]]:
    """Builds, checks and times every method at one k; returns one row per method.

    ``ratio_to_full`` is the median over repetitions of the method's time divided by the
    full-batch time of the same repetition; ``ratio_p25_p75`` gives its spread.
    """
    built = [
        full,
        methods.jaxaccum_accumulate(w, k),
        methods.optax_microbatch(w, k),
        methods.optax_multisteps(w, k),
        methods.python_loop(w, k),
        jaxaccum_train_step(w, k),
        jaxaccum_multi_steps(w, k),
    ]
    (ref_loss, ref_grads), _ = full.result()
    checks = {}
    for m in built:
        (loss, grads), _ = m.result()
        checks[m.name] = (max_abs_diff(grads, ref_grads), abs(float(loss) - float(ref_loss)))
    times = time_round_robin(built, s.reps, s.warmup)
    return [
        {"k": k, "method": m.name}
        | paired_ratios(times[m.name], times[FULL])
        | {
            "temp_bytes": m.memory.temp_bytes,
            "memory": m.memory._asdict(),
            "compile_s": m.compile_s,
            "grad_max_abs_diff": checks[m.name][0],
            "loss_abs_diff": checks[m.name][1],
            "times_ms": [1e3 * t for t in times[m.name]],
        }
        for m in built
    ]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table, one line per (k, method)."""
    lines = [
        "| k | method | median ms | × full batch | (p25–p75) | temp MiB | args+out+temp MiB "
        "| compile s | max abs grad diff |",
        "| ---: | --- | ---: | ---: | :---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        mem = r["memory"]
        lo, hi = r["ratio_p25_p75"]
        program = mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"]
        lines.append(
            f"| {r['k']} | {r['method']} | {r['median_ms']:.1f} | {r['ratio_to_full']:.2f} "
            f"| {lo:.2f}–{hi:.2f} "
            f"| {r['temp_bytes'] / 2**20:.2f} | {(program - mem['alias_bytes']) / 2**20:.2f} "
            f"| {r['compile_s']:.2f} | {r['grad_max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, pathlib.Path]:
    """Reads the command line into settings and the JSON output path."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, k in {1, 2, 4}")
    parser.add_argument("--reps", type=int, help="timed repetitions (default 40, quick 2)")
    parser.add_argument("--batch", type=int, help="examples per step (default 1024, quick 64)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON path")
    args = parser.parse_args(argv)
    if args.quick:
        s = Settings(sizes=(64, 128, 128, 10), batch=64, ks=(1, 2, 4), reps=2, warmup=1)
    else:
        s = Settings(
            sizes=(784, 1024, 1024, 10), batch=1024, ks=(1, 2, 4, 8, 16), reps=40, warmup=2
        )
    s = dataclasses.replace(s, reps=args.reps or s.reps, batch=args.batch or s.batch)
    if s.reps < 1 or any(s.batch % k for k in s.ks):
        parser.error(f"--reps must be >= 1 and --batch divisible by every k in {s.ks}")
    return s, args.out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the machine and the table, writes the JSON.

    Args:
      argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
      What was written to the JSON file: machine, settings and one row per (k, method).
    """
    started, load_before = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    s, out = parse_args(argv)
    machine = machine_info()
    print("\n".join(f"{key}: {value}" for key, value in machine.items()))
    print(f"settings: {dataclasses.asdict(s)}\n")
    w = workloads.mlp(s.batch, s.sizes)
    full = methods.full_batch(w)
    rows = []
    for k in s.ks:
        start = time.perf_counter()
        rows += run_k(w, full, k, s)
        print(f"k={k}: {time.perf_counter() - start:.1f} s", flush=True)
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average (1, 5, 15 min) before: {load_before}, after: {load}\n")
    print(markdown_table(rows))
    report = {
        "machine": machine,
        "settings": dataclasses.asdict(s),
        "elapsed_s": time.perf_counter() - started,
        "loadavg_before": load_before,
        "loadavg_after": load,
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
