"""Which collectives a compiled program runs, and whether they sit inside a loop."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax

# Collective HLO opcodes. Asynchronous pairs are counted once, at their "-start".
_OPS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)
_OPCODE = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+)\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>" + "|".join(re.escape(op) for op in _OPS) + r")(?:-start)?\("
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+)\s*\(.*\{\s*$")
_CALLEE = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%(?P<name>[^\s,)}]+)"
)
_BRANCHES = re.compile(r"\bbranch_computations=\{(?P<names>[^}]*)\}")
_WHILE = re.compile(r"\bwhile\(.*\bcondition=%(?P<cond>[^\s,]+), body=%(?P<body>[^\s,]+)")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[sufc]\d+|bf16|f8\w*|f4\w*)\[(?P<dims>[\d,]*)\]")
_SOURCE = re.compile(r'op_name="(?P<source>[^"]*)"')
_BITS = {"pred": 8, "bf16": 16}


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
      shape: the instruction's result shape as HLO prints it.
      bytes: bytes of that result (for an all-gather, the gathered size).
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
        """Parses the text of a compiled HLO module (``compiled.as_text()``)."""
        bodies: dict[str, list[str]] = {}
        entry = ""
        current: list[str] | None = None
        for line in text.splitlines():
            head = _COMPUTATION.match(line)
            if head:
                current = bodies.setdefault(head["name"], [])
                if line.startswith("ENTRY"):
                    entry = head["name"]
            elif line.startswith("}"):
                current = None
            elif current is not None:
                current.append(line)
        depth = _loop_depths(bodies, entry)
        found = []
        for name, lines in bodies.items():
            for line in lines:
                m = _OPCODE.match(line)
                if m and name in depth:
                    source = _SOURCE.search(line)
                    found.append(
                        Collective(
                            op=m["op"],
                            shape=m["shape"],
                            bytes=_shape_bytes(m["shape"]),
                            loop_depth=depth[name],
                            computation=name,
                            source=source["source"] if source else "",
                        )
                    )
        return cls(tuple(found))

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


def _loop_depths(bodies: dict[str, list[str]], entry: str) -> dict[str, int]:
    """Deepest while-loop nesting at which each computation reachable from ``entry`` runs."""
    depth = {entry: 0}
    stack = [entry]
    while stack:
        name = stack.pop()
        for line in bodies.get(name, ()):
            loop = _WHILE.search(line)
            loop_parts = {loop["cond"], loop["body"]} if loop else set()
            callees = {m["name"] for m in _CALLEE.finditer(line)}
            for branches in _BRANCHES.finditer(line):
                callees |= {b.strip().lstrip("%") for b in branches["names"].split(",")}
            for callee in callees:
                d = depth[name] + (1 if callee in loop_parts else 0)
                if callee in bodies and depth.get(callee, -1) < d:
                    depth[callee] = d
                    stack.append(callee)
    return depth


def collectives(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CollectiveReport:
    """Compiles ``fn`` for the given arguments and lists its collectives, in loops or not.

    Use it to check that a sharded training step communicates once per step: with
    ``jaxaccum.accumulate(..., data_axis=...)`` the gradient all-reduce runs after the
    micro-batch loop, so ``report.counts(in_loop=True)`` is empty. Nothing runs; arguments
    may be ``jax.ShapeDtypeStruct`` values with shardings.

    Args:
      fn: a function, jitted or not (it is jitted if needed).
      *args: its arguments (arrays, or abstract values with a ``sharding``).
      **kwargs: keyword arguments, likewise.

    Returns:
      A :class:`CollectiveReport`.

    Examples:
      On one device there is nothing to communicate:

      >>> import jax, jax.numpy as jnp, jaxaccum
      >>> report = jaxaccum.collectives(lambda x: jnp.sin(x).sum(), jnp.ones(8))
      >>> report.counts(), report.in_loop
      ({}, ())

      The parser reads any compiled HLO text, e.g. from a multi-device program:

      >>> hlo = '''
      ... %body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
      ...   %ar = f32[4]{0} all-reduce(%x), replica_groups={}, to_apply=%add
      ... }
      ... ENTRY %main (a: f32[4]) -> f32[4] {
      ...   %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body
      ...   %ag = f32[32]{0} all-gather(%a), dimensions={0}
      ... }
      ... '''
      >>> report = jaxaccum.CollectiveReport.from_hlo(hlo)
      >>> report.counts(in_loop=True), report.counts(in_loop=False)
      ({'all-reduce': 1}, {'all-gather': 1})
      >>> [c.bytes for c in report.collectives]
      [16, 128]
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return CollectiveReport.from_hlo(jitted.lower(*args, **kwargs).compile().as_text())
