"""The README's two commands lead the page, CI runs the test command verbatim, the
quickstart runs as written, and the README's links point at files in the repository."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEMO = (
    'python3 -m venv .venv && .venv/bin/pip install -q -e ".[examples]" && '
    ".venv/bin/python examples/cnn_batchnorm/main.py"
)
TESTS = (
    'python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]" && .venv/bin/ruff check . && '
    ".venv/bin/ruff format --check . && .venv/bin/mypy && .venv/bin/pytest"
)
DOCS_BUILD = ".venv/bin/python -m sphinx -W -b html docs docs/_build/html"


def _fenced() -> list[list[str]]:
    """The README's fenced blocks, in order, as lists of lines."""
    blocks: list[list[str]] = []
    inside = False
    for line in README.splitlines():
        if line.startswith("```"):
            inside = not inside
            if inside:
                blocks.append([])
            continue
        if inside:
            blocks[-1].append(line)
    return blocks


def test_readme_leads_with_demo_and_test_commands():
    demo, tests = _fenced()[:2]
    assert demo == [DEMO]
    assert tests == [TESTS]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TESTS in ci_lines


def test_readme_gives_the_docs_build_command_and_ignores_its_output():
    assert [DOCS_BUILD] in _fenced()
    assert "docs/_build/" in (ROOT / ".gitignore").read_text().splitlines()


def test_readme_stays_short():
    assert len(README.splitlines()) <= 200


def test_readme_links_point_at_files_in_the_repository():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert local, "the README links no file"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing


def test_readme_and_changelog_show_the_version():
    import jaxaccum

    assert f"jaxaccum {jaxaccum.__version__} (`jaxaccum.__version__`)" in README
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{jaxaccum.__version__}] - " in changelog
    assert "## [Unreleased]" in changelog


def test_quickstart_runs_as_written(capsys):
    block = re.search(r"## Quickstart\s+```python\n(.*?)```", README, re.S)
    assert block is not None
    exec(compile(block.group(1), "README.md quickstart", "exec"), {"__name__": "__main__"})
    assert "same gradient as the full batch: True" in capsys.readouterr().out
