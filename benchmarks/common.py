"""What every benchmark mode shares: the machine record, methods, checks and timing.

Also the child process for the modes that need 8 devices: XLA:CPU fixes its device count
when the backend starts, so a mode that finds fewer devices runs itself again in a child
started with ``--xla_force_host_platform_device_count=8`` and reads the JSON it prints.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxaccum
from benchmarks import UsageError


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


ROOT = pathlib.Path(__file__).resolve().parents[1]  # the folder holding benchmarks/


def machine_info() -> dict[str, Any]:
    """Platform, CPU, core count, backend and library versions, for the record."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def print_machine(settings: dict[str, Any]) -> dict[str, Any]:
    """Prints the machine record and the settings; returns the record."""
    machine = machine_info()
    print("\n".join(f"{key}: {value}" for key, value in machine.items()))
    print(f"settings: {settings}\n", flush=True)
    return machine


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: how busy the machine was."""
    return [round(x, 2) for x in os.getloadavg()]


def parse_ks(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``.

    Raises:
      UsageError: for anything but comma-separated positive integers.
    """
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        raise UsageError(f"--ks must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise UsageError(f"every k in --ks must be >= 1, got {text!r}")
    return ks


def run_sharded(
    args: Any,
    devices: int,
    collect: Callable[[list[int], int], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """What the 8-device modes do with ``--ks``, ``--batch`` and ``--json``.

    Checks that ``devices`` × k divides the batch, collects the result (in this process or
    a child, see :func:`json_from_child`), then prints it as JSON only (``--json -``, what a
    child does) or prints the counting process's machine and the table, and writes the
    JSON to ``--json`` if given.

    Raises:
      UsageError: for bad ``--ks`` or a batch that ``devices`` × k does not divide.
    """
    ks = parse_ks(args.ks)
    if bad := [k for k in ks if args.batch % (devices * k)]:
        raise UsageError(f"--batch {args.batch} is not divisible by {devices} × k for k in {bad}")
    result = collect(ks, args.batch)
    if args.json == "-":
        print(json.dumps(result))
        return result
    print("\n".join(f"{key}: {value}" for key, value in result["machine"].items()))
    print(f"settings: {{'ks': {ks}, 'batch': {args.batch}}}\n")
    print(table(result))
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {path}")
    return result


def json_from_child(mode: str, args: Sequence[str], devices: int, timeout: int) -> Any:
    """Runs ``python -m benchmarks MODE --json - ARGS`` on ``devices`` CPU devices.

    The child sees ``devices`` forced CPU devices (``JAX_PLATFORMS=cpu``, so on a GPU host
    with fewer GPUs it counts the CPU's compiled programs) and prints its result as JSON.

    Returns:
      The child's result, parsed.

    Raises:
      RuntimeError: if the child fails, with the end of its output.
    """
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "benchmarks", mode, "--json", "-", *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode:
        raise RuntimeError(
            f"{' '.join(cmd[1:])} failed on {devices} devices:\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout)


@dataclasses.dataclass(frozen=True)
class Method:
    """One way to get the full-batch gradient, ready to run.

    Attributes:
      name: the label in the table.
      step: runs one effective step (all k micro-batches) and returns its outputs,
        possibly not yet computed.
      result: runs one effective step and returns its gradient-step outputs, e.g.
        ``(loss, grads)`` of the full batch.
      memory: compiled memory of the jitted program (for methods that call a jitted
        micro-step k times, that micro-step's program).
      compile_s: seconds to trace and compile that program.
      prepare: run before each timed step, untimed: makes fresh copies of the buffers
        that ``step`` donates. None for methods that donate nothing.
      one_call: whether one effective step is one call of the compiled program (False
        for the methods that call a jitted micro-step k times).
      flops: FLOPs of that program from XLA's cost analysis, if known.
    """

    name: str
    step: Callable[[], Any]
    result: Callable[[], Any]
    memory: jaxaccum.inspect.MemoryStats
    compile_s: float
    prepare: Callable[[], None] | None = None
    one_call: bool = True
    flops: float | None = None


class Compiled(NamedTuple):
    """A jitted function compiled for given arguments.

    Attributes:
      fn: the jitted function; its compilation is cached, so calling it with arguments
        like the ones it was compiled for does not compile again.
      memory: the compiled program's ``MemoryStats``.
      compile_s: seconds to trace, lower and compile it.
      flops: FLOPs from XLA's cost analysis of the program (a loop body counts once),
        or None where the backend gives none.
    """

    fn: Any
    memory: jaxaccum.inspect.MemoryStats
    compile_s: float
    flops: float | None


def compiled(
    fn: Callable[..., Any], *args: Any, donate_argnums: int | tuple[int, ...] = ()
) -> Compiled:
    """Jits ``fn``, compiles it for ``args`` (timed) and reads its memory and FLOPs."""
    jitted = jax.jit(fn, donate_argnums=donate_argnums)
    start = time.perf_counter()
    executable = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    cost = executable.cost_analysis()
    flops = cost.get("flops") if isinstance(cost, dict) else None
    memory = jaxaccum.inspect.compiled_memory(jitted, *args)  # the compilation above is cached
    return Compiled(jitted, memory, compile_s, None if flops is None else float(flops))


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest absolute elementwise difference between two pytrees of arrays."""
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs), default=0.0)


def random_orders(n: int, reps: int, seed: int = 0) -> Iterator[list[int]]:
    """``reps`` seeded random permutations of ``range(n)``, one per timed repetition.

    A fixed or merely rotated order would make each timed item always follow the same
    neighbour, and what that neighbour leaves behind (caches, freed memory that the
    allocator hands back to the system) biases the follower: rotated, a jaxaccum step
    always ran right after the full-batch step, which frees some hundred MiB, and measured
    up to 7 % slower than in a random order. Seeded, so a rerun uses the same orders.
    """
    rng = np.random.default_rng(seed)
    for _ in range(reps):
        yield [int(i) for i in rng.permutation(n)]


class Timed(Protocol):
    """What :func:`time_round_robin` times: a named step, with untimed preparation."""

    @property
    def name(self) -> str: ...

    @property
    def step(self) -> Callable[[], Any]: ...

    @property
    def prepare(self) -> Callable[[], None] | None: ...


def time_round_robin(
    methods: Sequence[Timed], reps: int, warmup: int, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per step of each method, interleaved over repetitions.

    Every repetition runs all methods in a fresh random order (see :func:`random_orders`);
    each method's ``prepare`` (if any) runs before its clock starts. Garbage collection is
    paused while timing.
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
        for order in random_orders(len(methods), reps, seed):
            for i in order:
                method = methods[i]
                if method.prepare is not None:
                    method.prepare()
                start = time.perf_counter()
                jax.block_until_ready(method.step())
                times[method.name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def paired_ratios(times: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    """Step time and its ratio to ``base``, paired repetition by repetition.

    Returns:
      ``median_ms``; ``ratio_to_full``, the median over repetitions of ``times[r] /
      base[r]``; ``ratio_p25_p75``, the quartiles of those ratios; ``ratio_of_medians``.
    """
    t, b = np.asarray(times), np.asarray(base)
    ratios = t / b
    return {
        "median_ms": 1e3 * float(np.median(t)),
        "ratio_to_full": float(np.median(ratios)),
        "ratio_p25_p75": [float(np.percentile(ratios, q)) for q in (25, 75)],
        "ratio_of_medians": float(np.median(t) / np.median(b)),
    }
