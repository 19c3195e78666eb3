"""Running a benchmark script again in a child process that has N forced CPU devices.

XLA:CPU fixes its device count when the backend starts, so a script that needs 8 devices
and finds fewer re-executes itself with ``--xla_force_host_platform_device_count`` set and
reads the JSON the child prints. Only the standard library is imported here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any


def json_from_child(script: str, args: Sequence[str], devices: int, timeout: int) -> Any:
    """Runs ``python script --json - *args`` on ``devices`` CPU devices; returns its JSON."""
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, script, "--json", "-", *args]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode:
        raise RuntimeError(
            f"{os.path.basename(script)} child failed:\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout)
