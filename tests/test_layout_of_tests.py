"""The tests mirror the package: ``jaxaccum/_<name>.py`` (or the subpackage
``jaxaccum/_<name>/``) is tested in ``tests/test_<name>.py``.

A reader looking for the tests of a module finds them by its name. Modules that cannot have
a test module of their own are listed in ``COVERED_ELSEWHERE`` with the reason and the test
modules that cover them instead.
"""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

COVERED_ELSEWHERE: dict[str, tuple[str, tuple[str, ...]]] = {
    "inspect": (
        "re-exports only (no code of its own); its names are pinned in test_api.py and "
        "each is tested with the module that defines it",
        ("test_api.py",),
    ),
    "loop": (
        "one call of an accumulated function (trace, scan, reduce, finish): what "
        "jaxaccum.accumulate returns runs it on every call, so accumulate's tests are its tests",
        ("test_accumulate.py", "test_reduce.py", "test_split.py"),
    ),
    "optax_compat": (
        "drop-in replacements for optax.microbatch and optax.MultiSteps, tested by running "
        "Optax's own test suites against them and by parity with Optax",
        ("test_optax_suites.py", "test_parity.py"),
    ),
    "optax_multisteps": (
        "optax_compat's MultiSteps and skip predicates, re-exported there: tested as "
        "optax_compat.MultiSteps by Optax's own MultiSteps suite and jaxaccum's error and "
        "input checks",
        ("test_optax_suites.py", "test_errors.py", "test_input_sweep.py"),
    ),
}


def mirror(module: pathlib.Path) -> str:
    return f"test_{module.stem.removeprefix('_')}.py"


def modules() -> list[pathlib.Path]:
    """Every module of the package, a subpackage counting as one (by its folder)."""
    files = [p for p in (ROOT / "jaxaccum").glob("*.py") if p.name != "__init__.py"]
    packages = [p for p in (ROOT / "jaxaccum").iterdir() if (p / "__init__.py").is_file()]
    return sorted(files + packages)


def test_every_module_has_its_own_test_module():
    missing = [
        f"jaxaccum/{m.name} -> tests/{mirror(m)}"
        for m in modules()
        if m.stem.removeprefix("_") not in COVERED_ELSEWHERE
        and not (ROOT / "tests" / mirror(m)).is_file()
    ]
    assert not missing, f"modules without a test module: {missing}"


def test_exceptions_name_existing_modules_and_tests():
    names = {m.stem.removeprefix("_") for m in modules()}
    for name, (reason, tests) in COVERED_ELSEWHERE.items():
        assert name in names, f"{name} is no longer a module of jaxaccum: drop it here"
        assert reason
        for test in tests:
            assert (ROOT / "tests" / test).is_file(), test
        assert not (ROOT / "tests" / f"test_{name}.py").is_file(), (
            f"tests/test_{name}.py exists: {name} needs no exception any more"
        )


def test_no_two_modules_share_a_test_module():
    stems = [m.stem.removeprefix("_") for m in modules()]
    assert len(stems) == len(set(stems)), sorted(stems)
