"""The architecture page (docs/guides/architecture.md) matches the package.

Its module table names every module and subpackage of ``jaxaccum`` once, and nothing else;
every module the flow table names exists.
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "guides" / "architecture.md").read_text()


def package_modules() -> set[str]:
    """``_accumulate``, ``_parallel/``, ``flax/``...: modules, subpackages with a slash."""
    found = set()
    for path in (ROOT / "jaxaccum").iterdir():
        if path.suffix == ".py" and path.name != "__init__.py":
            found.add(path.stem)
        elif (path / "__init__.py").is_file():
            found.add(f"{path.name}/")
    return found


def section(title: str) -> str:
    start = PAGE.index(f"## {title}")
    end = PAGE.find("\n## ", start + 1)
    return PAGE[start : end if end != -1 else None]


def named(text: str) -> set[str]:
    """Names in backticks: ``_engine``, ``_parallel/``, ``flax/_nnx``, ``_engine.run``."""
    return set(re.findall(r"`(_?[a-z][a-z_]*(?:/(?:_?[a-z_]+)?)?(?:\.[a-z_]+)?)`", text))


def test_the_module_table_names_every_module_once():
    rows = [
        line for line in section("Which module owns what").splitlines() if line.startswith("| `")
    ]
    listed = [name for row in rows for name in named(row.split("|")[1])]
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == package_modules()


def test_the_flow_table_names_modules_that_exist():
    modules = package_modules()
    subpackage_parts = {
        f"{pkg}{p.stem}"
        for pkg in modules
        if pkg.endswith("/")
        for p in (ROOT / "jaxaccum" / pkg).glob("*.py")
    }
    rows = [line for line in section("The flow").splitlines() if line.startswith("| ")][2:]
    for row in rows:
        for name in named(row.split("|")[3]):
            base = name.split(".")[0]
            assert base in modules | subpackage_parts, f"{name} in the flow table"
