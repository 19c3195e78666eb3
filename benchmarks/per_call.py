"""Mode ``multisteps``: one call of accumulation across calls, against a gradient-only step.

Every row times one jitted call on one micro-batch of the MLP (``workloads.mlp``) trained
with AdamW:

* ``gradient only``: ``jax.value_and_grad(loss)``, the work any accumulation needs.
* ``grad + adamw``: the gradient, ``adamw.update`` and ``optax.apply_updates``: one
  plain optimizer step, for scale.
* ``optax.MultiSteps``: the gradient, ``optax.MultiSteps(adamw, k).update`` and
  ``optax.apply_updates``, on a non-emitting and on an emitting call.
* ``jaxaccum multi_steps``: the same with ``multi_steps(adamw, k)``, on a non-emitting
  and an emitting call, without and with a per-call weight (a traced argument), and
  with a weight but ``runtime_checks=False`` (no host callback checking it).

A non-emitting call starts from the state after ``init``, an emitting one from the
state after k - 1 calls; inputs are the same at every repetition, so each row always
runs the same branch. Params and optimizer state are donated (``donate_argnums``), as
in a training loop, so outputs can reuse their buffers; each timed call gets fresh
copies, made before the clock starts (``--no-donate`` turns donation off). Rows are
timed in one process, interleaved (in a fresh random order every repetition), and the
median is reported with its ratio to the median of ``gradient only``. Persistent state
bytes are the summed ``nbytes`` of the optimizer state's leaves. Compilation is never
timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxaccum
from benchmarks import UsageError
from benchmarks.common import print_machine, time_round_robin
from benchmarks.workloads import MLP_WIDTHS, Batch, init_mlp, mlp_batch, mlp_loss

Params = list[tuple[jax.Array, jax.Array]]
BASE = "gradient only"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure.

    Attributes:
      sizes: layer widths from input features to classes.
      micro_batch: examples per call.
      k: calls per optimizer update.
      reps: timed repetitions per row.
      warmup: untimed calls per row after compilation.
      donate: whether the steps donate params and optimizer state.
    """

    sizes: tuple[int, ...]
    micro_batch: int
    k: int
    reps: int
    warmup: int
    donate: bool


@dataclasses.dataclass(frozen=True)
class Row:
    """One timed call.

    Attributes:
      method: ``gradient only``, ``grad + adamw``, ``optax.MultiSteps`` or
        ``jaxaccum multi_steps``.
      call: which call of a window: ``-``, ``non-emitting`` or ``emitting``.
      fn: the jitted function.
      args: makes fresh arguments for one call of ``fn`` (untimed; donated ones are
        consumed by the call).
      state_bytes: persistent optimizer-state bytes (0 for the gradient-only step).
      pending: the arguments :meth:`prepare` made for the next :meth:`step`.
    """

    method: str
    call: str
    fn: Callable[..., Any]
    args: Callable[[], tuple[Any, ...]]
    state_bytes: int
    pending: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.method if self.call == "-" else f"{self.method} ({self.call})"

    def prepare(self) -> None:
        """Makes fresh arguments for the next call (before the clock starts)."""
        self.pending[:] = [self.args()]

    def step(self) -> Any:
        """Runs the call once on fresh arguments; returns its outputs, maybe not computed."""
        if not self.pending:
            self.prepare()
        return self.fn(*self.pending.pop())


def tree_bytes(tree: Any) -> int:
    """Summed ``nbytes`` of a pytree's array leaves."""
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))


def fresh(*trees: Any) -> tuple[Any, ...]:
    """Copies of ``trees`` with every copy computed, for a call that may donate them."""
    return jax.block_until_ready(tuple(jax.tree.map(jnp.copy, t) for t in trees))


def accumulating_rows(
    method: str, opt: Any, params: Params, mb: Batch, k: int, donate: bool
) -> list[Row]:
    """A non-emitting and an emitting call of a jitted step around ``opt``.

    A ``weighted`` method passes the micro-batch size as a traced per-call weight.
    """
    weighted = "weighted" in method

    def step(p: Params, s: Any, mb: Batch, w: jax.Array) -> tuple[Params, Any, jax.Array]:
        loss, grads = jax.value_and_grad(mlp_loss)(p, mb)
        updates, s = opt.update(grads, s, p, **({"weight": w} if weighted else {}))
        return optax.apply_updates(p, updates), s, loss

    fn = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    w = jnp.float32(mb["y"].shape[0])
    first = opt.init(params)
    last = first
    for _ in range(k - 1):  # the state that makes the next call emit
        _, last, _ = fn(*fresh(params, last), mb, w)
    return [
        Row(method, "non-emitting", fn, lambda: (*fresh(params, first), mb, w), tree_bytes(first)),
        Row(method, "emitting", fn, lambda: (*fresh(params, last), mb, w), tree_bytes(last)),
    ]


def build_rows(params: Params, mb: Batch, k: int, donate: bool) -> list[Row]:
    """Every timed row, ready to run."""
    inner = optax.adamw(1e-3)

    def plain(p: Params, s: Any, mb: Batch) -> tuple[Params, Any]:
        _, grads = jax.value_and_grad(mlp_loss)(p, mb)
        updates, s = inner.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    donated = (0, 1) if donate else ()
    grad, plain_fn = jax.jit(jax.value_and_grad(mlp_loss)), jax.jit(plain, donate_argnums=donated)
    inner_state = inner.init(params)
    rows = [
        Row(BASE, "-", grad, lambda: (params, mb), 0),
        Row(
            "grad + adamw",
            "-",
            plain_fn,
            lambda: (*fresh(params, inner_state), mb),
            tree_bytes(inner_state),
        ),
    ]
    for method, opt in [
        ("optax.MultiSteps", optax.MultiSteps(inner, k)),
        ("jaxaccum multi_steps", jaxaccum.multi_steps(inner, k)),
        ("jaxaccum multi_steps, weighted", jaxaccum.multi_steps(inner, k)),
        (
            "jaxaccum multi_steps, weighted, runtime_checks=False",
            jaxaccum.multi_steps(inner, k, runtime_checks=False),
        ),
    ]:
        rows += accumulating_rows(method, opt, params, mb, k, donate)
    return rows


def check_rows(rows: Sequence[Row], params: Params) -> dict[str, float]:
    """Checks that params move on emitting calls only and that every method agrees.

    Returns:
      For each accumulating method, the largest absolute difference between the params
      after its emitting call and those after ``optax.MultiSteps``'s.
    """
    emitted = {}
    for row in rows:
        if row.call == "-":
            continue
        new_params = jax.block_until_ready(row.step())[0]
        moved = any(
            bool(jnp.any(a != b))
            for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True)
        )
        if moved != (row.call == "emitting"):
            raise RuntimeError(f"{row.name} did not behave as a {row.call} call")
        if row.call == "emitting":
            emitted[row.method] = new_params
    ref = emitted["optax.MultiSteps"]
    diff = lambda a, b: float(jnp.max(jnp.abs(a - b)))  # noqa: E731
    return {m: max(jax.tree.leaves(jax.tree.map(diff, p, ref))) for m, p in emitted.items()}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table, one line per row."""
    lines = [
        "| method | call | median ms | × gradient only | state bytes | max Δparams vs optax |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['call']} | {r['median_ms']:.2f} | {r['ratio_to_grad']:.2f} "
            f"| {r['state_bytes']:,} | {_fmt(r['params_max_abs_diff_vs_optax'])} |"
        )
    return "\n".join(lines)


def settings(args: argparse.Namespace) -> Settings:
    """The settings the command line asks for (``--quick``: a tiny MLP, 3 repetitions).

    Raises:
      UsageError: for fewer than one repetition or k below 2.
    """
    if args.quick:
        s = Settings(sizes=(64, 128, 10), micro_batch=16, k=args.k, reps=3, warmup=1, donate=True)
    else:
        s = Settings(sizes=MLP_WIDTHS, micro_batch=64, k=args.k, reps=200, warmup=3, donate=True)
    s = dataclasses.replace(s, reps=args.reps or s.reps, donate=not args.no_donate)
    if s.reps < 1 or s.k < 2:
        raise UsageError("--reps must be >= 1 and --k >= 2 (k = 1 has no non-emitting call)")
    return s


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the mode: prints the machine and the table, writes the JSON to ``args.out``.

    Returns:
      What was written: machine, settings, param bytes and one entry per row.
    """
    s = settings(args)
    machine = print_machine(dataclasses.asdict(s))
    params = init_mlp(jax.random.key(0), s.sizes)
    mb = mlp_batch(jax.random.key(1), s.micro_batch, s.sizes[0], s.sizes[-1])
    rows = build_rows(params, mb, s.k, s.donate)
    diffs = check_rows(rows, params)
    times = time_round_robin(rows, s.reps, s.warmup)
    base_ms = 1e3 * statistics.median(times[BASE])
    results = []
    for row in rows:
        median_ms = 1e3 * statistics.median(times[row.name])
        results.append(
            {
                "method": row.method,
                "call": row.call,
                "median_ms": median_ms,
                "ratio_to_grad": median_ms / base_ms,
                "state_bytes": row.state_bytes,
                "params_max_abs_diff_vs_optax": diffs.get(row.method),
                "times_ms": [1e3 * t for t in times[row.name]],
            }
        )
    print(markdown_table(results))
    report = {
        "machine": machine,
        "settings": dataclasses.asdict(s),
        "param_bytes": tree_bytes(params),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nparams: {tree_bytes(params) / 2**20:.2f} MiB\nwrote {args.out}")
    return report
