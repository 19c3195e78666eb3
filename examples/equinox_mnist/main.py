"""Runs the Equinox CNN example: ``python examples/equinox_mnist/main.py [--help]``.

Only the command line lives here; the model, the runs and the training loop are in
``train.py``. The progress bars go to stderr, the table to stdout.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence
from typing import Any

# examples/, so that this example and the modules the examples share import by name.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common import cli

from equinox_mnist import train

PLOT = pathlib.Path(__file__).resolve().parent / "plot.png"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trains the five runs, prints the table, saves the plot; returns one row per run."""
    config, out = cli.parse_single_k(
        train,
        argv,
        PLOT,
        optimizer="AdamW",
        unit="batches of N",
    )
    return cli.run(train, config, out)


if __name__ == "__main__":
    main()
