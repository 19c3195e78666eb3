"""The 8-device checks, one test item per check, run in a subprocess with 8 CPU devices.

XLA:CPU fixes its device count when the backend starts, so the files of
``helpers.EIGHT_DEVICE_CHECKS`` (``*_checks.py``, not collected here) run in one fresh
interpreter started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; it starts
when collection ends (``conftest.py``). Each item below waits for that run and passes when
every case of its check passed; a failure shows that check's failing cases and output. Run
one file by hand with ``cd tests && XLA_FLAGS=--xla_force_host_platform_device_count=8
../.venv/bin/pytest mesh_checks.py``.
"""

from __future__ import annotations

import pytest
from conftest import EIGHT_DEVICES
from helpers import EightDeviceRun, eight_device_checks

TIMEOUT = 1200  # seconds for the whole 8-device run


@pytest.mark.parametrize("check", eight_device_checks())
def test_check_on_eight_devices(request: pytest.FixtureRequest, check: str) -> None:
    run = request.config.stash.get(EIGHT_DEVICES, None)
    if run is None:  # collected without the hook (a single item run by hand)
        run = request.config.stash[EIGHT_DEVICES] = EightDeviceRun()
    code, output, cases = run.wait(TIMEOUT)
    if check not in cases:
        pytest.fail(f"{check} did not run (exit code {code}); output:\n{output[-6000:]}")
    failed = [(name, why) for name, why in cases[check] if why]
    assert not failed, "\n\n".join(f"{name}:\n{why[-4000:]}" for name, why in failed)
