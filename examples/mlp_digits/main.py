"""Runs the MLP-on-digits example: ``python examples/mlp_digits/main.py [--help]``.

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

from common import cli

from mlp_digits import train

PLOT = pathlib.Path(__file__).resolve().parent / "plot.png"


def integers(text: str) -> tuple[int, ...]:
    """``"2,4,8"`` as ``(2, 4, 8)``; ``""`` as ``()``."""
    try:
        return tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        message = f"comma-separated integers such as 2,4,8, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def parse_args(argv: Sequence[str] | None) -> tuple[train.Config, pathlib.Path]:
    """The settings and the plot's path; every k must divide the batch size."""
    default = train.Config()
    ks = ",".join(map(str, default.ks))
    parser = cli.parser_for(train)
    parser.add_argument("--steps", type=int, default=default.steps, help="updates per run")
    parser.add_argument("--ks", type=integers, default=ks, help="k of the accumulate runs")
    parser.add_argument(
        "--builder-ks",
        type=integers,
        default=",".join(map(str, default.builder_ks)),
        help="k of the train_step and multi_steps runs, comma-separated (empty: none)",
    )
    parser.add_argument("--batch-size", type=int, default=default.batch_size, help="N")
    parser.add_argument("--lr", type=float, default=default.lr, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=default.seed, help="split, init, order")
    parser.add_argument("--out", type=pathlib.Path, default=PLOT, help="PNG path")
    args = vars(parser.parse_args(argv))
    n = args["batch_size"]
    bad = [k for k in args["ks"] + args["builder_ks"] if k < 1 or n % k]
    if bad:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        parser.error(
            f"k values {bad} (--ks, --builder-ks) do not divide --batch-size {n}; "
            f"use some of {divisors}"
        )
    if args["steps"] < 1:
        parser.error(f"--steps must be at least 1, got {args['steps']}")
    out = args.pop("out")
    return train.Config(**args), out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trains every run, prints the table, saves the plot; returns one row per run."""
    config, out = parse_args(argv)
    return cli.run(train, config, out)


if __name__ == "__main__":
    main()
