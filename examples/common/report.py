"""What the examples measure and show: differences, Markdown tables, progress, figures."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from tqdm import tqdm


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest absolute elementwise difference between two pytrees of arrays."""
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def markdown_table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` (left) or ``r`` (right)."""
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def progress(total: int, desc: str, unit: str) -> tqdm[Any]:
    """A progress bar on stderr; redrawn rarely when stderr is a file or a pipe (logs)."""
    interval = 0.1 if sys.stderr.isatty() else 5.0
    return tqdm(total=total, desc=desc, unit=unit, mininterval=interval)


def two_panels() -> tuple[Figure, Axes, Axes]:
    """A figure 11 by 4 inches with two panels side by side."""
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    return fig, left, right


def loss_and_accuracy(
    rows: Sequence[Any], path: pathlib.Path, accuracy: str, styles: Sequence[Any] = ()
) -> None:
    """Training loss per batch (left, log scale) and test accuracy (right), one line per
    run (``row["losses"]``, ``row["eval_steps"]``, ``row["test_accs"]``), saved to ``path``;
    ``styles`` gives each run its line style where the runs overlap."""
    fig, left, right = two_panels()
    for i, r in enumerate(rows):
        style = {"ls": styles[i]} if styles else {}
        steps = list(range(1, len(r["losses"]) + 1))
        left.plot(steps, r["losses"], label=r["name"], lw=1.2, **style)
        right.plot(r["eval_steps"], r["test_accs"], label=r["name"], lw=1.2, **style)
    left.set(xlabel="batches of N seen", ylabel="training loss", yscale="log", title="loss")
    right.set(xlabel="batches of N seen", ylabel=accuracy, title="accuracy")
    left.legend()
    right.legend(loc="lower right")
    save(fig, path)


def save(fig: Figure, path: pathlib.Path) -> None:
    """Lays ``fig`` out, writes it to ``path`` (creating its folder) and says where."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {shown(path)}")


def shown(path: pathlib.Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    path, here = path.resolve(), pathlib.Path.cwd()
    return str(path.relative_to(here) if path.is_relative_to(here) else path)
