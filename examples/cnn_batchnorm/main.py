"""Runs the CNN + BatchNorm example: ``python examples/cnn_batchnorm/main.py [--help]``.

Only the command line lives here; the model, the steps and the training loop are in
``train.py``.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence
from typing import Any

# examples/, so that this example and the modules the examples share import by name.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common import cli

from cnn_batchnorm import train

PLOT = pathlib.Path(__file__).resolve().parent / "plot.png"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trains the four runs, prints the table, saves the plot; returns one row per run."""
    config, out = cli.parse_single_k(
        train,
        argv,
        PLOT,
        optimizer="Adam",
        unit="batches of N",
    )
    return cli.run(train, config, out)


if __name__ == "__main__":
    main()
