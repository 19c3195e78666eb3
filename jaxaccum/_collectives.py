"""Which collectives a compiled program runs, and whether they sit inside a loop."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax

# Collective HLO opcodes. An asynchronous pair ("all-reduce-start" and "all-reduce-done")
# is reported once, at its start, with the result shape of its done.
_OPS = frozenset(
    {
        "all-reduce",
        "all-gather",
        "reduce-scatter",
        "all-to-all",
        "ragged-all-to-all",
        "collective-permute",
        "collective-broadcast",
    }
)
_HEADER = re.compile(r"^HloModule\s+(?P<attrs>.*)$", re.MULTILINE)
# A computation starts at column 0: "ENTRY %main (p: f32[4]) -> f32[4] {", "%body (...) -> ... {",
# or, in HLO printed before compilation, "ENTRY main.1 {".
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[^\s(%{]+)\s*(?:\(.*)?\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s+(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<shape>.*?)\s+(?P<op>[a-z][\w-]*)\((?P<rest>.*)$"
)
_CALLEES = re.compile(
    r"\b(?P<key>calls|to_apply|body|condition|true_computation|false_computation"
    r"|branch_computations|called_computations)=(?P<names>\{[^}]*\}|[^\s,)}]+)"
)
_MLIR = re.compile(r"^\s*module\b|\bfunc\.func\b|\bstablehlo\.|\bmhlo\.", re.MULTILINE)
_OPERAND = re.compile(r"%?(?P<name>[A-Za-z_][\w.\-]*)")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[sufc]\d+|bf16|f8\w*|f4\w*)\[(?P<dims>[\d,]*)\]")
_SOURCE = re.compile(r'op_name="(?P<source>[^"]*)"')
_BITS = {"pred": 8, "bf16": 16}
_HOW = (
    "pass the compiled program's text, jax.jit(f).lower(*args).compile().as_text(), "
    "or simply call jaxaccum.inspect.collectives(f, *args)"
)


def _bits(dtype: str) -> int:
    if dtype in _BITS:
        return _BITS[dtype]
    if dtype.startswith(("f8", "f4")):
        return int(dtype[1])
    return int(re.sub(r"\D", "", dtype))


def _shape_bytes(shape: str) -> int:
    total = 0
    for m in _ARRAY.finditer(shape):
        dims = [int(d) for d in m["dims"].split(",") if d]
        total += math.ceil(math.prod(dims) * _bits(m["dtype"]) / 8)
    return total


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program.

    Attributes:
      op: the HLO opcode, e.g. ``"all-reduce"`` (asynchronous ``-start``/``-done`` pairs are
        reported once, under the synchronous name).
      shape: the instruction's result shape as HLO prints it, on one device (for an
        asynchronous pair, the shape its ``-done`` returns).
      bytes: bytes of that result on one device (for an all-gather, the gathered size; for a
        reduce-scatter, the scattered piece).
      loop_depth: how many ``while`` loops enclose it (0: runs once per call).
      computation: the HLO computation holding it.
      source: the JAX operation it came from (the ``op_name`` metadata), if recorded.
    """

    op: str
    shape: str
    bytes: int
    loop_depth: int
    computation: str
    source: str

    @property
    def in_loop(self) -> bool:
        """Whether it runs once per loop iteration rather than once per call."""
        return self.loop_depth > 0


@dataclasses.dataclass(frozen=True)
class CollectiveReport:
    """The collectives of one compiled program, split by whether they run inside a loop.

    Counts are static: an all-reduce inside a ``lax.scan`` of length k is listed once but
    runs k times per call.

    Attributes:
      collectives: every collective instruction, in program order.
    """

    collectives: tuple[Collective, ...]

    @classmethod
    def from_hlo(cls, text: str) -> CollectiveReport:
        """Reads the collectives of a compiled HLO module, and the loops around them.

        Only the compiled program is final: XLA's SPMD partitioner inserts the collectives
        of a sharded ``jax.jit``, and its optimisations combine them or move them out of
        loops (a loop-invariant all-gather is hoisted). So the text must be what
        ``compiled.as_text()`` prints: an ``HloModule`` header with ``is_scheduled=true`` and
        an ``ENTRY`` computation. Anything else raises rather than reporting no collectives.

        Asynchronous pairs (``all-reduce-start``/``-done``, ``all-gather-start``,
        ``collective-permute-start``, ...) count once; collectives in fusions, calls,
        conditional branches and asynchronous computations count at the loop depth of the
        instruction that runs them.

        Args:
          text: the compiled program, ``jax.jit(f).lower(*args).compile().as_text()``.

        Returns:
          A :class:`CollectiveReport`.

        Raises:
          TypeError: if ``text`` is not a string (e.g. a ``Compiled`` object: pass its
            ``as_text()``).
          ValueError: if ``text`` is not a compiled HLO module: StableHLO/MLIR text (what
            ``lowered.as_text()`` prints), HLO before compilation
            (``lowered.as_text(dialect="hlo")``, no schedule), or anything else.

        Examples:
          >>> import jaxaccum
          >>> hlo = '''
          ... HloModule jit_f, is_scheduled=true, entry_computation_layout={(f32[4]{0})->f32[32]{0}}
          ...
          ... %body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
          ...   %ar = f32[4]{0} all-reduce(%x), replica_groups={}, to_apply=%add
          ... }
          ... ENTRY %main (a: f32[4]) -> f32[32] {
          ...   %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body
          ...   %ag = f32[32]{0} all-gather(%a), dimensions={0}
          ... }
          ... '''
          >>> report = jaxaccum.inspect.CollectiveReport.from_hlo(hlo)
          >>> report.counts(in_loop=True), report.counts(in_loop=False)
          ({'all-reduce': 1}, {'all-gather': 1})
          >>> [c.bytes for c in report.collectives]
          [16, 128]

          The lowered program (StableHLO) is refused, since compilation may still add,
          merge or move its collectives:

          >>> import jax, jax.numpy as jnp
          >>> lowered = jax.jit(jnp.sin).lower(jnp.ones(4))
          >>> jaxaccum.inspect.CollectiveReport.from_hlo(lowered.as_text())
          Traceback (most recent call last):
          ...
          ValueError: CollectiveReport.from_hlo got StableHLO/MLIR text ...
          >>> report = jaxaccum.inspect.CollectiveReport.from_hlo(lowered.compile().as_text())
          >>> report.collectives
          ()
        """
        if not isinstance(text, str):
            raise TypeError(
                f"CollectiveReport.from_hlo takes HLO text, got {type(text).__name__}; {_HOW}"
            )
        _check_compiled(text)
        return cls._parse(text)

    @classmethod
    def _parse(cls, text: str) -> CollectiveReport:
        bodies = _computations(text)
        entry = next(name for name, (is_entry, _) in bodies.items() if is_entry)
        depth = _loop_depths({name: lines for name, (_, lines) in bodies.items()}, entry)
        found: dict[str, Collective] = {}
        for name, (_, lines) in bodies.items():
            for line in lines:
                m = _INSTRUCTION.match(line)
                if not m or name not in depth:
                    continue
                op = m["op"].removesuffix("-start")
                if op in _OPS:
                    source = _SOURCE.search(line)
                    found[m["name"]] = Collective(
                        op=op,
                        shape=m["shape"],
                        bytes=_shape_bytes(m["shape"]),
                        loop_depth=depth[name],
                        computation=name,
                        source=source["source"] if source else "",
                    )
                elif m["op"].removesuffix("-done") in _OPS:
                    _take_done_shape(found, m["rest"], m["shape"])
        return cls(tuple(found.values()))

    @property
    def in_loop(self) -> tuple[Collective, ...]:
        """Collectives inside a ``while`` loop (a scan, fori_loop or while_loop)."""
        return tuple(c for c in self.collectives if c.in_loop)

    @property
    def outside_loop(self) -> tuple[Collective, ...]:
        """Collectives that run once per call."""
        return tuple(c for c in self.collectives if not c.in_loop)

    def counts(self, *, in_loop: bool | None = None) -> dict[str, int]:
        """Number of instructions per opcode; ``in_loop`` selects one side (None: both)."""
        out: dict[str, int] = {}
        for c in self.collectives:
            if in_loop is None or c.in_loop == in_loop:
                out[c.op] = out.get(c.op, 0) + 1
        return out

    def table(self) -> str:
        """A Markdown table: one row per collective, loop depth, bytes and source op."""
        rows = ["| op | in loop | depth | bytes | shape | source |", "|---|---|---|---|---|---|"]
        for c in self.collectives:
            rows.append(
                f"| {c.op} | {'yes' if c.in_loop else 'no'} | {c.loop_depth} | {c.bytes} | "
                f"`{c.shape}` | {c.source[-60:]} |"
            )
        if not self.collectives:
            rows.append("| (none) | | | | | |")
        return "\n".join(rows)

    def __str__(self) -> str:
        inside, outside = self.counts(in_loop=True), self.counts(in_loop=False)
        return f"in loops: {inside or 'none'}; outside loops: {outside or 'none'}\n" + self.table()


def _check_compiled(text: str, *, require_schedule: bool = True) -> None:
    """Raises unless ``text`` is an HLO module with an ENTRY computation (and a schedule)."""
    header = _HEADER.search(text)
    has_entry = any(is_entry for is_entry, _ in _computations(text).values())
    if header is None or not has_entry:
        if _MLIR.search(text):
            raise ValueError(
                "CollectiveReport.from_hlo got StableHLO/MLIR text (module @..., func.func, "
                "stablehlo.* ops): that is the lowered program, before compilation, and its "
                "collectives are only final after compilation (XLA's SPMD partitioner adds "
                "them for sharded arrays, and its passes merge them or move them out of "
                f"loops); {_HOW}"
            )
        preview = text.strip()[:80]
        raise ValueError(
            "CollectiveReport.from_hlo expects the text of a compiled HLO module (an "
            f"'HloModule ...' header line and an 'ENTRY' computation), got {preview!r}; {_HOW}"
        )
    if require_schedule and "is_scheduled=true" not in header["attrs"]:
        raise ValueError(
            "CollectiveReport.from_hlo got an HLO module without a schedule (no "
            "is_scheduled=true in its header): that is the program before compilation, e.g. "
            "lowered.as_text(dialect='hlo'), and its collectives are only final after "
            f"compilation; {_HOW}"
        )


def _computations(text: str) -> dict[str, tuple[bool, list[str]]]:
    """Each computation's name, whether it is the ENTRY, and its instruction lines."""
    bodies: dict[str, tuple[bool, list[str]]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        head = None if line.startswith("HloModule") else _COMPUTATION.match(line)
        if head:
            current = []
            bodies[head["name"]] = (head["entry"] is not None, current)
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return bodies


def _take_done_shape(found: dict[str, Collective], operands: str, shape: str) -> None:
    """Gives the start a ``-done`` completes the done's shape: the result, without the
    operands and scratch that an ``all-gather-start`` or ``collective-permute-start`` holds."""
    for m in _OPERAND.finditer(operands):
        start = found.get(m["name"])
        if start is not None:
            found[m["name"]] = dataclasses.replace(start, shape=shape, bytes=_shape_bytes(shape))
            return


def _loop_depths(bodies: dict[str, list[str]], entry: str) -> dict[str, int]:
    """Deepest while-loop nesting at which each computation reachable from ``entry`` runs."""
    depth = {entry: 0}
    stack = [entry]
    while stack:
        name = stack.pop()
        for line in bodies.get(name, ()):
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            for callee in _CALLEES.finditer(m["rest"]):
                enters_loop = m["op"] == "while" and callee["key"] in ("body", "condition")
                d = depth[name] + (1 if enters_loop else 0)
                for child in callee["names"].strip("{}").split(","):
                    child = child.strip().lstrip("%")
                    if child in bodies and depth.get(child, -1) < d:
                        depth[child] = d
                        stack.append(child)
    return depth


def collectives(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CollectiveReport:
    """Compiles ``fn`` for the given arguments and lists its collectives, in loops or not.

    Use it to check that a sharded training step communicates once per step: with
    ``jaxaccum.accumulate(..., data_axis=...)`` the gradient all-reduce runs after the
    micro-batch loop, so ``report.counts(in_loop=True)`` is empty. Nothing runs; arguments
    may be ``jax.ShapeDtypeStruct`` values with shardings.

    Any function JAX can lower works: a plain or ``jax.jit``-ed function, a ``jax.pmap``-ed
    one (give it arrays with the leading device axis), a ``jax.shard_map``-ped one, jitted or
    not. A ``jax.stages.Lowered`` or ``jax.stages.Compiled`` is read as it is.

    Args:
      fn: a function, jitted or not (it is jitted if needed), or a lowered or compiled
        program (then no arguments).
      *args: its arguments (arrays, or abstract values with a ``sharding``).
      **kwargs: keyword arguments, likewise.

    Returns:
      A :class:`CollectiveReport`.

    Raises:
      TypeError: if ``fn`` is HLO text (use :meth:`CollectiveReport.from_hlo`), is not
        callable, or is a lowered or compiled program given arguments.
      ValueError: if the backend does not print the compiled program as HLO text.

    Examples:
      On one device a jitted function has nothing to communicate:

      >>> import jax, jax.numpy as jnp, jaxaccum
      >>> report = jaxaccum.inspect.collectives(lambda x: jnp.sin(x).sum(), jnp.ones(8))
      >>> report.counts(), report.in_loop
      ({}, ())

      A ``pmap``-ed step with a ``pmean`` inside its micro-batch loop all-reduces once per
      micro-batch (here over the one device there is):

      >>> from jax import lax
      >>> def step(w, xs):
      ...     body = lambda acc, x: (acc + lax.pmean(x @ w, "batch"), None)
      ...     return lax.scan(body, jnp.zeros(3), xs)[0]
      >>> report = jaxaccum.inspect.collectives(
      ...     jax.pmap(step, axis_name="batch"), jnp.ones((1, 4, 3)), jnp.ones((1, 2, 4))
      ... )
      >>> report.counts(in_loop=True), report.in_loop[0].bytes
      ({'all-reduce': 1}, 12)
    """
    if isinstance(fn, str):
        raise TypeError(
            "jaxaccum.inspect.collectives takes the function, not its HLO text; for text use "
            "jaxaccum.inspect.CollectiveReport.from_hlo(compiled.as_text())"
        )
    if isinstance(fn, jax.stages.Lowered | jax.stages.Compiled):
        if args or kwargs:
            raise TypeError(
                f"a {type(fn).__name__} program is already specialised to its arguments: call "
                "jaxaccum.inspect.collectives(it) without arguments, or pass the function and "
                "arguments"
            )
        compiled = fn.compile() if isinstance(fn, jax.stages.Lowered) else fn
    elif callable(fn):
        jitted: Any = fn if hasattr(fn, "lower") else jax.jit(fn)
        compiled = jitted.lower(*args, **kwargs).compile()
    else:
        raise TypeError(
            f"jaxaccum.inspect.collectives takes a function (plain, jax.jit, jax.pmap or "
            f"jax.shard_map) and its arguments, got {type(fn).__name__}"
        )
    text = compiled.as_text()
    if text is None:
        raise ValueError(
            f"the {jax.default_backend()} backend does not print its compiled programs as HLO "
            "text, so their collectives cannot be read"
        )
    _check_compiled(text, require_schedule=False)
    return CollectiveReport._parse(text)
