"""Runs the token-weighted LM example: ``python examples/token_weighted_lm/main.py [--help]``.

Only the command line lives here; the data are in ``data.py``, the model and its loss in
``models.py``, the runs and the training loop in ``train.py``.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence
from typing import Any

# examples/, so that this example and the modules the examples share import by name.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common import cli

from token_weighted_lm import train

PLOT = pathlib.Path(__file__).resolve().parent / "plot.png"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trains the three runs, prints the table, saves the plot; returns one row per run."""
    config, out = cli.parse_single_k(
        train,
        argv,
        PLOT,
        optimizer="AdamW",
        unit="updates",
        extra=[("--length", int, "characters")],
    )
    return cli.run(train, config, out)


if __name__ == "__main__":
    main()
