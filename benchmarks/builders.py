"""Mode ``builders``: jaxaccum's three builders against the peers on the MLP.

Every method computes the gradient of the mean cross-entropy of the suite's MLP
(``workloads.mlp``) over the same batch of N examples, split into k micro-batches; the
methods are those of ``methods.py``:

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

For each k the methods are timed in one process, interleaved over the repetitions (in a
fresh random order every repetition). Methods that donate their state get fresh copies of
it before the clock starts. Each method's time is divided by the full-batch time of the
same repetition, and the median of those ratios is reported next to the median step time;
paired ratios stay meaningful when the machine's speed drifts during the run. Compilation
is timed separately and never counted in step times. Before timing, each method's gradient
is compared with the full-batch one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import UsageError, methods
from benchmarks.common import (
    Method,
    load_average,
    max_abs_diff,
    paired_ratios,
    parse_ks,
    print_machine,
    time_round_robin,
)
from benchmarks.methods import FULL
from benchmarks.workloads import MLP_WIDTHS, Workload, mlp


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


def settings(args: argparse.Namespace) -> Settings:
    """The settings the command line asks for (``--quick``: a tiny MLP, k in {1, 2, 4}).

    Raises:
      UsageError: for bad ``--ks``, fewer than one repetition or a batch not divisible by
        every k.
    """
    if args.quick:
        s = Settings(sizes=(64, 128, 128, 10), batch=64, ks=(1, 2, 4), reps=2, warmup=1)
    else:
        s = Settings(sizes=MLP_WIDTHS, batch=1024, ks=(1, 2, 4, 8, 16), reps=40, warmup=2)
    s = dataclasses.replace(
        s,
        ks=tuple(parse_ks(args.ks)) if args.ks else s.ks,
        reps=args.reps or s.reps,
        batch=args.batch or s.batch,
    )
    if s.reps < 1 or any(s.batch % k for k in s.ks):
        raise UsageError(f"--reps must be >= 1 and --batch divisible by every k in {s.ks}")
    return s


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
        methods.jaxaccum_train_step(w, k),
        methods.jaxaccum_multi_steps(w, k),
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the mode: prints the machine and the table, writes the JSON to ``args.out``.

    Returns:
      What was written: machine, settings, load averages and one row per (k, method).
    """
    s = settings(args)
    started, load_before = time.perf_counter(), load_average()
    machine = print_machine(dataclasses.asdict(s))
    w = mlp(s.batch, s.sizes)
    full = methods.full_batch(w)
    rows = []
    for k in s.ks:
        start = time.perf_counter()
        rows += run_k(w, full, k, s)
        print(f"k={k}: {time.perf_counter() - start:.1f} s", flush=True)
    load = load_average()
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report
