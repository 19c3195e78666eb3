"""Starts the 8-device checks in the background as soon as collection selects one of them.

They run in their own interpreter for a few minutes, mostly compiling on one core; started
at collection they overlap the rest of the suite (and, with pytest-xdist, its workers)
instead of running after it. Each check
is an item of ``tests/test_eight_devices.py``, which waits for the run and reports the
check's own cases.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

# XLA:CPU compiles with LLVM's -O0 code generation here: the suite's programs are tiny and
# most of its time is compiling them, which this shortens by a quarter to a half. XLA's own
# passes (fusion, layouts, buffer assignment, collectives) are unchanged, so what the tests
# read from compiled programs (convolution layouts, temporaries, collectives) and every
# result they compare is the same; only the machine code is less optimised. Set before JAX
# starts, in this process and so in the workers and subprocesses it starts (the 8-device
# run, the docs pages, the examples, the benchmarks, the release venv). A flag given in
# XLA_FLAGS already wins.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import pytest
from helpers import EightDeviceRun

EIGHT_DEVICES = pytest.StashKey[EightDeviceRun]()
NICE = 5  # the test processes' niceness once the 8-device run has started
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
    # The 8-device run is the longest single chain of the suite and its report comes last:
    # once it has started, this process and what it starts from now on (pages, examples,
    # benchmarks, the release venv) yield the cores to it first, and fill the rest.
    os.nice(NICE)


# The files that took longest in a measured run on 2 cores, longest first.
# pytest-xdist hands whole files to its workers in collection order (``--dist loadfile``),
# so starting these first keeps a long file from being the last one left running while the
# other worker idles. The 8-device report goes last: its items wait for the background run,
# which by then has had the whole suite's duration to finish.
LONGEST_FIRST = (
    "test_benchmarks.py",  # python -m benchmarks all --smoke, two modes at a time
    "test_release.py",  # build, a fresh venv, the core tests against the wheel
    "test_docs.py",
    "test_flax.py",
    "test_internal.py",
    "test_train.py",
    "test_accumulate.py",
    "test_multisteps.py",
    "test_parity.py",
    "test_examples.py",
    "test_optax_suites.py",
    "test_input_sweep.py",
    "test_parallel.py",
    "test_multiprocess.py",
)
LAST = "test_eight_devices.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Runs the files of ``LONGEST_FIRST`` first, in that order, and the 8-device report
    last; every other file keeps its place, every item its place within its file."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        if name == LAST:
            return len(LONGEST_FIRST) + 1
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a rank is the collection order
