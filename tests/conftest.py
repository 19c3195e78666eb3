"""Starts the 8-device checks in the background as soon as collection selects them.

They run in their own interpreter for a few minutes, mostly compiling on one core; started
at collection they overlap the rest of the suite instead of running after it.
``tests/test_sharding.py::test_eight_device_checks_pass_in_a_subprocess`` waits for them.
"""

from __future__ import annotations

import pytest
from helpers import EightDeviceRun

EIGHT_DEVICES = pytest.StashKey[EightDeviceRun]()
WAITING_TEST = "test_sharding.py::test_eight_device_checks_pass_in_a_subprocess"


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(item.nodeid.endswith(WAITING_TEST) for item in session.items):
        session.config.stash[EIGHT_DEVICES] = EightDeviceRun()
