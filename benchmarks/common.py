"""What every benchmark script records about the machine it ran on."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform
from typing import Any

import jax
import optax


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Platform, CPU, core count and library versions, for the record."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "optax": optax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }
