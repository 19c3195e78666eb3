"""optax's own tests for microbatching and MultiSteps, run against jaxaccum.optax_compat.

The two test modules optax ships in its wheel are loaded from the installed optax (not
copied) under a private name, and the names they test are pointed at
``jaxaccum.optax_compat``: ``microbatching`` in ``_microbatching_test.py`` and
``_accumulation`` in ``_accumulation_test.py``. Every case is then run as optax wrote
it, with optax's tolerances. Excluded cases, each with its reason, are in ``EXCLUDED``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import types
import unittest

import optax
import pytest

from jaxaccum import optax_compat

OPTAX = pathlib.Path(optax.__file__).parent

EXCLUDED = {
    "AccumulationTest.test_ema": (
        "tests optax.ema, an exponential moving average of updates over steps, which is "
        "not gradient accumulation and not part of the compatibility module"
    ),
    "AccumulationTest.test_ema_debias": "as test_ema: optax.ema with bias correction",
}


def _load(relative: str, name: str, replacement: object) -> types.ModuleType:
    """optax's test module at ``relative``, with its module global ``name`` replaced."""
    path = OPTAX / relative
    spec = importlib.util.spec_from_file_location(f"_optax_suite_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, name), f"{relative} no longer imports {name}"
    setattr(module, name, replacement)
    return module


SUITES = {
    "microbatching": _load("microbatching/_microbatching_test.py", "microbatching", optax_compat),
    "accumulation": _load("transforms/_accumulation_test.py", "_accumulation", optax_compat),
}


def _cases() -> list[tuple[str, unittest.TestCase]]:
    loader = unittest.TestLoader()
    found = []
    for suite, module in SUITES.items():
        for group in loader.loadTestsFromModule(module):
            for case in group:  # type: ignore[union-attr]
                found.append((f"{suite}:{type(case).__name__}.{case._testMethodName}", case))
    return found


ALL = _cases()
CASES = [(c, case) for c, case in ALL if c.split(":", 1)[1] not in EXCLUDED]


def test_the_suites_are_optax_own_and_complete():
    # As shipped with optax 0.2.8: 39 microbatching cases and 12 accumulation cases, of
    # which the two in EXCLUDED are left out; every other case runs below.
    counts = {s: sum(c.startswith(s + ":") for c, _ in ALL) for s in SUITES}
    assert counts["microbatching"] >= 39 and counts["accumulation"] >= 12, counts
    names = {c.split(":", 1)[1] for c, _ in ALL}
    assert set(EXCLUDED) <= names
    assert len(CASES) == len(ALL) - len(EXCLUDED)


@pytest.mark.parametrize(("case_id", "case"), CASES, ids=[c for c, _ in CASES])
def test_optax_case(case_id: str, case: unittest.TestCase):
    result = unittest.TestResult()
    case.run(result)
    problems = result.failures + result.errors
    assert not problems, "\n".join(text for _, text in problems)
    assert result.testsRun == 1 and not result.skipped
