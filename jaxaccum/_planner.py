"""Choosing k ahead of time: the fewest micro-batches whose compiled program fits a budget."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

from jaxaccum import _args, _checks, _split
from jaxaccum._accumulate import SCOPE
from jaxaccum._memory import MemoryStats
from jaxaccum._parallel import FSDP


@dataclasses.dataclass(frozen=True)
class Candidate:
    """XLA's memory estimate for one candidate k, from the compiled program.

    Attributes:
      k: micro-batches per step.
      strategy: the FSDP strategy compiled (see :data:`jaxaccum.FSDP`), or None when
        the plan was made without ``strategies``.
      micro_batch_size: examples per micro-batch, N / k.
      argument_bytes: input buffers (params, optimizer state, the whole batch).
      output_bytes: output buffers.
      temp_bytes: temporaries (activations, residuals, the running sums).
      alias_bytes: output bytes written into donated input buffers.
      accumulator_bytes: the accumulation loop's carry per device (the float32 running
        sums and any carried state: a shard of the gradient for FSDP per micro-batch, the
        whole gradient when gathered once); already inside the figures above, shown to
        explain them. 0 when the program has no ``jaxaccum.accumulate`` loop (k = 1).
      peak_bytes: ``argument_bytes + output_bytes + temp_bytes - alias_bytes``.
      fits: ``peak_bytes <= budget``.
    """

    k: int
    strategy: FSDP | None
    micro_batch_size: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    accumulator_bytes: int
    peak_bytes: int
    fits: bool


_COLUMNS = (
    "k",
    "strategy",
    "micro-batch",
    "arguments",
    "outputs",
    "temporaries",
    "aliased",
    "accumulator",
    "peak",
    "fits",
)


@dataclasses.dataclass(frozen=True)
class MicrobatchPlan:
    """The k chosen by :func:`plan_microbatches`, with the candidates it compiled.

    Attributes:
      k: the chosen number of micro-batches: the smallest candidate that fits.
      strategy: the chosen FSDP strategy, or None without ``strategies``.
      micro_batch_size: examples per micro-batch at that k.
      budget_bytes: the budget in bytes.
      candidates: every compiled candidate, by increasing k.
    """

    k: int
    strategy: FSDP | None
    micro_batch_size: int
    budget_bytes: int
    candidates: tuple[Candidate, ...]

    def table(self) -> str:
        """A Markdown table of the candidates (sizes in KiB/MiB/GiB), chosen row marked."""
        return _table(self.candidates, self.budget_bytes, chosen=(self.k, self.strategy))

    def __str__(self) -> str:
        return self.table()


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.2f} {unit}"


def _table(candidates: Sequence[Candidate], budget: int, chosen: Any) -> str:
    rows = [
        [
            str(c.k),
            c.strategy or "-",
            str(c.micro_batch_size),
            *map(_size, (c.argument_bytes, c.output_bytes, c.temp_bytes, c.alias_bytes)),
            _size(c.accumulator_bytes),
            _size(c.peak_bytes),
            ("yes (chosen)" if (c.k, c.strategy) == chosen else "yes") if c.fits else "no",
        ]
        for c in candidates
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(_COLUMNS)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    head = f"budget {_size(budget)}; peak = arguments + outputs + temporaries - aliased"
    return "\n".join([head, line(_COLUMNS), rule, *map(line, rows)])


def _budget_bytes(budget: Any) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"budget must be bytes (an int, e.g. 16 * 2**30) or a fraction of the device's "
            f"memory (a float in (0, 1]), got {type(budget).__name__}."
        )
    if isinstance(budget, (int, np.integer)):
        if budget <= 0:
            raise ValueError(f"budget must be a positive number of bytes, got {budget}.")
        return int(budget)
    if not 0 < budget <= 1:
        raise ValueError(
            f"a float budget is a fraction of the device's memory in (0, 1], got {budget}; "
            "pass bytes as an int, e.g. budget=16 * 2**30."
        )
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if not limit:
        raise ValueError(
            f"budget={budget} is a fraction of the device's memory, but {device} reports no "
            "memory limit (memory_stats() has no 'bytes_limit', as on CPU); pass the budget "
            "in bytes instead, e.g. budget=8 * 2**30."
        )
    return int(budget * limit)


def _candidate_ks(args: tuple[Any, ...], batch_argnums: Any, ks: Any) -> tuple[int, list[int]]:
    """The batch size N and the sorted candidate k values, each checked to divide N."""
    nums = _args.as_tuple(batch_argnums, "batch_argnums", int)
    missing = [i for i in nums if i >= len(args)]
    if not nums or missing:
        raise ValueError(
            f"batch_argnums={batch_argnums!r} must name positions among the {len(args)} "
            "arguments given after make_step (the batch is usually argument 1)."
        )
    batch = {f"argument {i}": args[i] for i in nums}
    n = _split.leading_size(batch)
    if ks is None:
        return n, _split.divisors(n)
    if isinstance(ks, int):
        raise TypeError(f"ks must be a sequence of k values, e.g. ks=({ks},), got {ks!r}.")
    chosen = sorted({_checks.check_k(k) for k in ks})
    if not chosen:
        raise ValueError("ks is empty; give candidate k values, or ks=None for every divisor.")
    first = next(p for label, t in batch.items() for p, _ in _split.leaves_with_paths(t, label))
    for k in chosen:
        _split.check_divisible(n, k, first)
    return n, chosen


def _nbytes(aval: Any, sharding: Any = None) -> int:
    """Bytes of one device's part of ``aval`` (laid out by ``sharding`` or its type)."""
    shape = list(aval.shape)
    sharding = sharding if sharding is not None else getattr(aval, "sharding", None)
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None) or ()
    if mesh is not None:
        manual = jax.sharding.AxisType.Manual  # inside shard_map: shapes are per device
        sizes = {
            n: int(size)
            for n, size, t in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types, strict=True)
            if t != manual
        }
        for dim, entry in enumerate(getattr(spec, "partitions", spec)):
            names = entry if isinstance(entry, tuple) else (entry,)
            shape[dim] //= math.prod(sizes.get(n, 1) for n in names if isinstance(n, str))
    return math.prod(shape) * int(aval.dtype.itemsize)


def accumulator_bytes(jaxpr: Any) -> int:
    """Per-device bytes carried by the ``jaxaccum.accumulate`` loops of a jaxpr.

    Nested loops count too. Inside ``shard_map`` the carry's shapes are already per
    device; a carry laid out by its type (Explicit axes) or by a sharding constraint
    (tensor-parallel gradients on Auto axes) counts one device's shard.
    """
    constrained = {
        eqn.outvars[0]: eqn.params["sharding"]
        for eqn in jaxpr.eqns
        if eqn.primitive.name == "sharding_constraint"
    }
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and SCOPE in str(eqn.source_info.name_stack):
            start = eqn.params["num_consts"]
            carry = eqn.invars[start : start + eqn.params["num_carry"]]
            total += sum(
                _nbytes(v.aval, None if isinstance(v, jex_core.Literal) else constrained.get(v))
                for v in carry
            )
            continue
        total += sum(accumulator_bytes(sub) for sub in jex_core.jaxprs_in_params(eqn.params))
    return total


def _estimate(
    fn: Callable[..., Any], args: tuple[Any, ...], donate: Any
) -> tuple[MemoryStats, int]:
    traced = jax.jit(fn, donate_argnums=donate).trace(*args)
    analysis = traced.lower().compile().memory_analysis()
    stats = MemoryStats(
        argument_bytes=int(analysis.argument_size_in_bytes),
        output_bytes=int(analysis.output_size_in_bytes),
        temp_bytes=int(analysis.temp_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes),
        code_bytes=int(analysis.generated_code_size_in_bytes),
    )
    return stats, accumulator_bytes(traced.jaxpr.jaxpr)


def plan_microbatches(
    make_step: Callable[..., Callable[..., Any]],
    *args: Any,
    budget: int | float,
    batch_argnums: int | Sequence[int] = 1,
    ks: Sequence[int] | None = None,
    donate_argnums: int | Sequence[int] = (),
    compile_all: bool = False,
    strategies: Sequence[FSDP] | None = None,
) -> MicrobatchPlan:
    """Chooses the fewest micro-batches whose compiled step fits a memory budget.

    For each candidate k, by increasing k, ``make_step(k)`` is jitted, traced and
    compiled for ``args`` (nothing runs, so the arguments may be ``jax.ShapeDtypeStruct``
    values for a batch that would not fit) and XLA's memory analysis of the compiled
    program gives its peak: arguments + outputs + temporaries - aliased (donated) bytes.
    The plan's k is the first candidate whose peak is at most ``budget``: the largest
    micro-batch that fits, so the fewest, fastest loop iterations. There is no
    out-of-memory trial and error.

    The figures are those of the compiled program on the default backend. They leave out
    arrays alive outside the call, the allocator's fragmentation and reserved pools,
    library workspaces (cuDNN, cuBLAS) and generated code, and XLA:CPU's temporaries
    leave out scratch placed inside output buffers; leave headroom, and plan on the
    backend you train on, since layouts and fusions differ between backends.

    Args:
      make_step: ``make_step(k)`` returns the step to compile for k micro-batches, called
        with ``args``; e.g. ``lambda k: jaxaccum.accumulate(grad_fn, k)`` or
        ``lambda k: jaxaccum.train_step(loss_fn, optimizer, k).update``.
      *args: the step's positional arguments: pytrees of ``jax.ShapeDtypeStruct`` or
        arrays, e.g. ``jax.eval_shape(step.init, params)`` for a train state.
      budget: bytes (an int), or a fraction in (0, 1] of the default device's memory
        limit (``memory_stats()["bytes_limit"]``; on GPU that is already the share
        ``XLA_PYTHON_CLIENT_MEM_FRACTION`` gives JAX, 75% by default).
      batch_argnums: position(s) of the batch in ``args``; N is its leaves' shared
        leading size.
      ks: candidate k values, each dividing N; default: every divisor of N. With a
        batch sharded over devices (``data_axis``), give k values that divide N per device.
      donate_argnums: arguments donated as they will be when training (e.g. 0 for a
        train state): donated buffers can hold outputs, lowering the peak.
      compile_all: compile every candidate rather than stopping at the first that fits;
        the table then shows the whole trade-off.
      strategies: FSDP strategies to choose from as well (see :data:`jaxaccum.FSDP`),
        e.g. ``("gather_once", "per_microbatch")``; ``make_step(k, strategy)`` is then
        called for each. At each k the strategies are tried in the order given, so list
        the one you prefer when both fit first (``"gather_once"`` moves fewer bytes).

    Returns:
      A :class:`MicrobatchPlan`; ``print(plan)`` shows the table of candidates, and
      ``plan.strategy`` the chosen strategy when ``strategies`` were given.

    Raises:
      ValueError: for a bad budget, ``batch_argnums``, ``ks`` (a k that does not divide
        N) or strategy, or when no candidate fits (the message shows the estimates).
      TypeError: for a budget that is neither int nor float, or non-array batch leaves.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxaccum
      >>> def loss(params, x):
      ...     for w in params:
      ...         x = jnp.tanh(x @ w)
      ...     return jnp.mean(x**2)
      >>> params = [jax.ShapeDtypeStruct((256, 256), jnp.float32)] * 3
      >>> batch = jax.ShapeDtypeStruct((1024, 256), jnp.float32)  # nothing is allocated
      >>> plan = jaxaccum.inspect.plan_microbatches(
      ...     lambda k: jaxaccum.accumulate(jax.value_and_grad(loss), k),
      ...     params, batch, budget=9 * 2**20 // 2)
      >>> plan.k, plan.micro_batch_size
      (4, 256)
      >>> [c.k for c in plan.candidates], [c.fits for c in plan.candidates]
      ([1, 2, 4], [False, False, True])
      >>> print(plan)  # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
      budget 4.50 MiB; peak = arguments + outputs + temporaries - aliased
      | k | strategy | micro-batch | arguments | outputs | ... | accumulator | peak | fits |
      ...
      | 1 | - | 1024 | ... | no |
      | 2 | - |  512 | ... | no |
      | 4 | - |  256 | ... | yes (chosen) |
    """
    if not callable(make_step):
        raise TypeError(
            f"make_step must be a function of k returning the step, got "
            f"{type(make_step).__name__}; e.g. lambda k: jaxaccum.accumulate(grad_fn, k)."
        )
    budget_bytes = _budget_bytes(budget)
    n, candidate_ks = _candidate_ks(args, batch_argnums, ks)
    plans = [(k, s) for k in candidate_ks for s in _check_strategies(strategies)]
    candidates: list[Candidate] = []
    for k, strategy in plans:
        step = make_step(k) if strategy is None else make_step(k, strategy)
        stats, acc = _estimate(step, args, donate_argnums)
        peak = stats.argument_bytes + stats.output_bytes + stats.temp_bytes - stats.alias_bytes
        fits = peak <= budget_bytes
        candidates.append(
            Candidate(
                k=k,
                strategy=strategy,
                micro_batch_size=n // k,
                argument_bytes=stats.argument_bytes,
                output_bytes=stats.output_bytes,
                temp_bytes=stats.temp_bytes,
                alias_bytes=stats.alias_bytes,
                accumulator_bytes=acc,
                peak_bytes=peak,
                fits=fits,
            )
        )
        if fits and not compile_all:
            break
    chosen = next((c for c in candidates if c.fits), None)
    if chosen is None:
        best = min(candidates, key=lambda c: c.peak_bytes)
        raise ValueError(
            f"no k fits the budget of {_size(budget_bytes)}: the smallest estimate is "
            f"{_size(best.peak_bytes)} at k={best.k} (micro-batches of "
            f"{best.micro_batch_size}).\n{_table(candidates, budget_bytes, None)}\nDonate "
            "what the training loop donates (donate_argnums=0 for a train state), lower the "
            "memory per example with jax.checkpoint (remat), use a smaller model or shard "
            "it over devices, or pad the batch with jaxaccum.pad_batch to a size with more "
            "divisors and pass a larger k in ks."
        )
    return MicrobatchPlan(
        chosen.k, chosen.strategy, chosen.micro_batch_size, budget_bytes, tuple(candidates)
    )


def _check_strategies(strategies: Any) -> list[FSDP | None]:
    if strategies is None:
        return [None]
    if isinstance(strategies, str):
        raise TypeError(f"strategies must be a sequence, e.g. ({strategies!r},).")
    chosen = list(strategies)
    valid = tuple(member.value for member in FSDP)
    if not chosen or any(s not in valid for s in chosen):
        raise ValueError(f"strategies must hold one or more of {valid}, got {strategies!r}.")
    return [FSDP(s) for s in chosen]
