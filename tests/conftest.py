"""Starts the 8-device checks in the background as soon as collection selects one of them.

They run in their own interpreter for a few minutes, mostly compiling on one core; started
at collection they overlap the rest of the suite (and, with pytest-xdist, its workers)
instead of running after it. Each check
is an item of ``tests/test_eight_devices.py``, which waits for the run and reports the
check's own cases.
"""

from __future__ import annotations

import pathlib
import tempfile

import pytest
from helpers import EightDeviceRun

EIGHT_DEVICES = pytest.StashKey[EightDeviceRun]()
RUNNER = "test_eight_devices.py::"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Starts the run; with pytest-xdist, worker gw0 starts it in a folder named by the
    test run's id and the other workers read the same folder's results."""
    if not any(RUNNER in item.nodeid for item in session.items):
        return
    worker = getattr(session.config, "workerinput", None)
    if worker is None:
        run = EightDeviceRun()
    else:
        folder = pathlib.Path(tempfile.gettempdir()) / f"jaxaccum-8dev-{worker['testrunuid']}"
        run = EightDeviceRun(folder, start=worker["workerid"] == "gw0")
    session.config.stash[EIGHT_DEVICES] = run
