"""Starts the 8-device checks in the background as soon as collection selects one of them.

They run in their own interpreter for a few minutes, mostly compiling on one core; started
at collection they overlap the rest of the suite instead of running after it. Each check
is an item of ``tests/test_eight_devices.py``, which waits for the run and reports the
check's own cases.
"""

from __future__ import annotations

import pytest
from helpers import EightDeviceRun

EIGHT_DEVICES = pytest.StashKey[EightDeviceRun]()
RUNNER = "test_eight_devices.py::"


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(RUNNER in item.nodeid for item in session.items):
        session.config.stash[EIGHT_DEVICES] = EightDeviceRun()
