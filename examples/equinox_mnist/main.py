"""Runs the Equinox CNN example: ``python examples/equinox_mnist/main.py [--help]``.

Only the command line lives here; the model, the runs and the training loop are in
``train.py``. The progress bars go to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

# examples/, so that this example and the modules the examples share import by name.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from equinox_mnist import train

PLOT = pathlib.Path(__file__).resolve().parent / "plot.png"


def parse_args(argv: Sequence[str] | None) -> tuple[train.Config, pathlib.Path]:
    """The settings and the plot's path; k must divide the batch size."""
    default = train.Config()
    parser = argparse.ArgumentParser(description=train.__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=default.steps, help="batches of N per run")
    parser.add_argument("--batch-size", type=int, default=default.batch_size, help="N")
    parser.add_argument("--k", type=int, default=default.k, help="micro-batches per batch")
    parser.add_argument("--lr", type=float, default=default.lr, help="AdamW learning rate")
    parser.add_argument("--eval-every", type=int, default=default.eval_every, help="in batches")
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--out", type=pathlib.Path, default=PLOT, help="PNG path")
    args = vars(parser.parse_args(argv))
    if args["k"] < 1 or args["batch_size"] % args["k"]:
        parser.error(f"--k {args['k']} must divide --batch-size {args['batch_size']}")
    if args["steps"] < 1 or args["eval_every"] < 1:
        parser.error("--steps and --eval-every must be at least 1")
    out = args.pop("out")
    return train.Config(**args), out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trains the five runs, prints the table, saves the plot; returns one row per run."""
    config, out = parse_args(argv)
    rows = train.train_and_evaluate(config)
    train.print_table(rows)
    train.plot(rows, out)
    return rows


if __name__ == "__main__":
    main()
