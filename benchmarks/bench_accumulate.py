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
repetitions (the order rotates every repetition). Methods that donate their state get fresh
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
import functools
import gc
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxaccum

# benchmarks/ holds scripts, not a package: make its shared module importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import machine_info

Params = list[tuple[jax.Array, jax.Array]]
Batch = dict[str, jax.Array]
LossAndGrads = tuple[jax.Array, Params]

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out" / "accumulate.json"
FULL = "full batch"


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


@dataclasses.dataclass(frozen=True)
class Method:
    """One way to get the full-batch gradient, ready to run.

    Attributes:
      name: the label in the table.
      step: runs one effective step (all k micro-batches) and returns its outputs,
        possibly not yet computed.
      result: runs one effective step and returns ``(loss, grads)`` of the full batch.
      memory: compiled memory of the jitted program (for methods that call a jitted
        micro-step k times, that micro-step's program).
      compile_s: seconds to trace and compile that program.
      prepare: run before each timed step, untimed: makes fresh copies of the buffers
        that ``step`` donates. None for methods that donate nothing.
    """

    name: str
    step: Callable[[], Any]
    result: Callable[[], LossAndGrads]
    memory: jaxaccum.MemoryStats
    compile_s: float
    prepare: Callable[[], None] | None = None


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
    """He-initialised weights and zero biases for a ReLU MLP.

    Args:
      key: a PRNG key.
      sizes: layer widths, input features first, classes last.

    Returns:
      A list of ``(W, b)`` per layer.
    """
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m), jnp.zeros(n))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mean_loss(params: Params, batch: Batch) -> jax.Array:
    """Mean softmax cross-entropy of the MLP over the examples of ``batch``."""
    x = batch["x"]
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    logp = jax.nn.log_softmax(x @ w + b)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def synthetic_batch(key: jax.Array, n: int, features: int, classes: int) -> Batch:
    """Gaussian features and uniform integer labels for ``n`` examples."""
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (n, features)),
        "y": jax.random.randint(ky, (n,), 0, classes),
    }


def _compiled(fn: Callable[..., Any], *args: Any) -> tuple[Any, jaxaccum.MemoryStats, float]:
    """Jits ``fn``, compiles it for ``args`` and reads its memory; returns the jitted fn."""
    jitted = jax.jit(fn)
    start = time.perf_counter()
    memory = jaxaccum.compiled_memory(jitted, *args)
    return jitted, memory, time.perf_counter() - start


def full_batch(params: Params, batch: Batch) -> Method:
    """The baseline: one ``value_and_grad`` over the whole batch."""
    fn, memory, compile_s = _compiled(jax.value_and_grad(mean_loss), params, batch)
    step = functools.partial(fn, params, batch)
    return Method(FULL, step, step, memory, compile_s)


def jaxaccum_scan(params: Params, batch: Batch, k: int) -> Method:
    """``jaxaccum.accumulate`` of ``value_and_grad`` over k micro-batches, jitted."""
    fn, memory, compile_s = _compiled(
        jaxaccum.accumulate(jax.value_and_grad(mean_loss), k), params, batch
    )
    step = functools.partial(fn, params, batch)
    return Method("jaxaccum.accumulate", step, step, memory, compile_s)


def optax_microbatch(params: Params, batch: Batch, k: int) -> Method:
    """``optax.microbatch`` of ``value_and_grad`` with the mean accumulator, jitted."""
    grad_fn = optax.microbatching.microbatch(
        jax.value_and_grad(mean_loss),
        argnums=1,
        microbatch_size=len(batch["y"]) // k,
        accumulator=optax.microbatching.AccumulationType.MEAN,
    )
    fn, memory, compile_s = _compiled(grad_fn, params, batch)
    step = functools.partial(fn, params, batch)
    return Method("optax.microbatch", step, step, memory, compile_s)


def micro_batches(batch: Batch, k: int) -> list[Batch]:
    """The k strided micro-batches (examples j, j+k, ...), sliced ahead of time."""

    def micro(j: int) -> Batch:
        return jax.tree.map(lambda x: x[j::k], batch)

    return jax.block_until_ready([micro(j) for j in range(k)])


def across_calls(
    name: str, opt: optax.GradientTransformation, params: Params, batch: Batch, k: int
) -> Method:
    """k calls of a jitted train step whose optimizer ``opt`` applies one update per k calls.

    Params and optimizer state are donated, as in a training loop (fresh copies are made
    before the clock starts). ``opt`` wraps ``optax.sgd(1.0)``: the one update after k calls
    is minus the mean gradient, so the gradient is read back as ``params - new_params``.
    """
    state0 = opt.init(params)
    mbs = micro_batches(batch, k)

    def train_step(p: Params, s: Any, mb: Batch) -> tuple[Params, Any, jax.Array]:
        loss, grads = jax.value_and_grad(mean_loss)(p, mb)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    fn = jax.jit(train_step, donate_argnums=(0, 1))
    start = time.perf_counter()
    memory = jaxaccum.compiled_memory(fn, params, state0, mbs[0])
    compile_s = time.perf_counter() - start
    fresh: list[Any] = []

    def prepare() -> None:
        fresh[:] = [jax.block_until_ready(jax.tree.map(jnp.copy, (params, state0)))]

    def step() -> tuple[Params, list[jax.Array]]:
        if not fresh:
            prepare()
        (p, s), losses = fresh.pop(), []
        for mb in mbs:
            p, s, loss = fn(p, s, mb)
            losses.append(loss)
        return p, losses

    def result() -> LossAndGrads:
        new_params, losses = step()
        grads = jax.tree.map(jnp.subtract, params, new_params)
        return jnp.mean(jnp.stack(losses)), grads

    return Method(name, step, result, memory, compile_s, prepare)


def optax_multisteps(params: Params, batch: Batch, k: int) -> Method:
    """k calls of a jitted train step with ``optax.MultiSteps(optax.sgd(1.0), k)``."""
    opt = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=k)
    return across_calls("optax.MultiSteps", opt, params, batch, k)


def jaxaccum_multi_steps(params: Params, batch: Batch, k: int) -> Method:
    """k calls of a jitted train step with ``jaxaccum.multi_steps(optax.sgd(1.0), k)``."""
    opt = jaxaccum.multi_steps(optax.sgd(1.0), every_k_schedule=k)
    return across_calls("jaxaccum.multi_steps", opt, params, batch, k)


def jaxaccum_train_step(params: Params, batch: Batch, k: int) -> Method:
    """``jaxaccum.train_step(loss, optax.sgd(1.0), k).update``, jitted with the state donated.

    k micro-batches and one SGD update in one call; fresh copies of the state are made
    before the clock starts. The gradient is read back as ``params - new_params``.
    """
    built = jaxaccum.train_step(mean_loss, optax.sgd(1.0), k)
    state0 = built.init(params)
    fn = jax.jit(built.update, donate_argnums=0)
    start = time.perf_counter()
    memory = jaxaccum.compiled_memory(fn, state0, batch)
    compile_s = time.perf_counter() - start
    fresh: list[Any] = []

    def prepare() -> None:
        fresh[:] = [jax.block_until_ready(jax.tree.map(jnp.copy, state0))]

    def step() -> tuple[jaxaccum.TrainState, jaxaccum.TrainMetrics]:
        if not fresh:
            prepare()
        return fn(fresh.pop(), batch)

    def result() -> LossAndGrads:
        state, metrics = step()
        return metrics.loss, jax.tree.map(jnp.subtract, params, state.params)

    return Method("jaxaccum.train_step", step, result, memory, compile_s, prepare)


def python_loop(params: Params, batch: Batch, k: int) -> Method:
    """k calls of a jitted micro-batch ``value_and_grad``, a jitted sum, then / k."""
    mbs = micro_batches(batch, k)
    fn, memory, compile_s = _compiled(jax.value_and_grad(mean_loss), params, mbs[0])
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
    mean = jax.jit(lambda t: jax.tree.map(lambda x: x / k, t))

    def step() -> LossAndGrads:
        total = fn(params, mbs[0])
        for mb in mbs[1:]:
            total = add(total, fn(params, mb))
        return mean(total)

    return Method("python loop", step, step, memory, compile_s)


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest absolute elementwise difference between two pytrees of arrays."""
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


def time_round_robin(methods: Sequence[Method], reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per effective step of each method, interleaved over repetitions.

    Repetition r runs the methods in the order rotated by r, so each method takes every
    position in turn and none always runs first. Garbage collection is paused while timing.
    """
    for method in methods:
        for _ in range(warmup):
            if method.prepare is not None:
                method.prepare()
            jax.block_until_ready(method.step())
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            shift = r % len(methods)
            for method in [*methods[shift:], *methods[:shift]]:
                if method.prepare is not None:
                    method.prepare()
                start = time.perf_counter()
                jax.block_until_ready(method.step())
                times[method.name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def run_k(full: Method, params: Params, batch: Batch, k: int, s: Settings) -> list[dict[str, Any]]:
    """Builds, checks and times every method at one k; returns one row per method.

    ``ratio_to_full`` is the median over repetitions of the method's time divided by the
    full-batch time of the same repetition; ``ratio_p25_p75`` gives its spread.
    """
    methods = [
        full,
        jaxaccum_scan(params, batch, k),
        optax_microbatch(params, batch, k),
        optax_multisteps(params, batch, k),
        python_loop(params, batch, k),
        jaxaccum_train_step(params, batch, k),
        jaxaccum_multi_steps(params, batch, k),
    ]
    ref_loss, ref_grads = full.result()
    checks = {}
    for m in methods:
        loss, grads = m.result()
        checks[m.name] = (max_abs_diff(grads, ref_grads), abs(float(loss) - float(ref_loss)))
    times = time_round_robin(methods, s.reps, s.warmup)
    base = np.asarray(times[FULL])
    rows = []
    for m in methods:
        t = np.asarray(times[m.name])
        ratios = t / base
        rows.append(
            {
                "k": k,
                "method": m.name,
                "median_ms": 1e3 * float(np.median(t)),
                "ratio_to_full": float(np.median(ratios)),
                "ratio_p25_p75": [float(np.percentile(ratios, q)) for q in (25, 75)],
                "ratio_of_medians": float(np.median(t) / np.median(base)),
                "temp_bytes": m.memory.temp_bytes,
                "memory": m.memory._asdict(),
                "compile_s": m.compile_s,
                "grad_max_abs_diff": checks[m.name][0],
                "loss_abs_diff": checks[m.name][1],
                "times_ms": [1e3 * t for t in times[m.name]],
            }
        )
    return rows


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
    params = init_mlp(jax.random.key(0), s.sizes)
    batch = synthetic_batch(jax.random.key(1), s.batch, s.sizes[0], s.sizes[-1])
    full = full_batch(params, batch)
    rows = []
    for k in s.ks:
        start = time.perf_counter()
        rows += run_k(full, params, batch, k, s)
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
