"""The command line the examples share: settings from flags, then train, report, plot.

Each example's ``main.py`` names its flags' units and extra flags; the parsing, the checks
(k divides the batch size, counts are positive) and the run itself are written once here.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any


def parser_for(train: ModuleType) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the example's ``train.py``."""
    return argparse.ArgumentParser(description=(train.__doc__ or "").split("\n\n")[0])


def parse_single_k(
    train: ModuleType,
    argv: Sequence[str] | None,
    plot: pathlib.Path,
    *,
    optimizer: str,
    unit: str,
    extra: Sequence[tuple[str, type, str]] = (),
) -> tuple[Any, pathlib.Path]:
    """The settings of an example with one k, and the plot's path.

    Args:
      train: the example's ``train`` module (its ``Config`` gives the defaults).
      argv: the arguments, or None for ``sys.argv``.
      plot: the default path of the plot.
      optimizer: the optimizer's name, for ``--lr``'s help.
      unit: what ``--steps`` and ``--eval-every`` count, e.g. ``"updates"``.
      extra: more ``(flag, type, help)`` fields of ``Config``, e.g. ``("--length", int,
        "characters")``.
    """
    default = train.Config()
    parser = parser_for(train)
    parser.add_argument("--steps", type=int, default=default.steps, help=f"{unit} per run")
    parser.add_argument("--batch-size", type=int, default=default.batch_size, help="N")
    parser.add_argument("--k", type=int, default=default.k, help="micro-batches per batch")
    for flag, kind, help_text in extra:
        name = flag.removeprefix("--").replace("-", "_")
        parser.add_argument(flag, type=kind, default=getattr(default, name), help=help_text)
    parser.add_argument("--lr", type=float, default=default.lr, help=f"{optimizer} learning rate")
    parser.add_argument("--eval-every", type=int, default=default.eval_every, help=unit)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--out", type=pathlib.Path, default=plot, help="PNG path")
    args = vars(parser.parse_args(argv))
    if args["k"] < 1 or args["batch_size"] % args["k"]:
        parser.error(f"--k {args['k']} must divide --batch-size {args['batch_size']}")
    if args["steps"] < 1 or args["eval_every"] < 1:
        parser.error("--steps and --eval-every must be at least 1")
    out = args.pop("out")
    return train.Config(**args), out


def run(train: ModuleType, config: Any, out: pathlib.Path) -> list[dict[str, Any]]:
    """Trains every run of the example, prints the table, saves the plot; one row per run."""
    rows = train.train_and_evaluate(config)
    train.print_table(rows)
    train.plot(rows, out)
    return rows
