"""The README's two commands lead the page and CI runs the test command verbatim."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    fenced, inside = [], False
    for line in lines:
        if line.startswith("```"):
            inside = not inside
            if not inside and len(fenced) == 2:
                break
            continue
        if inside:
            fenced.append(line)
    return fenced


def test_readme_leads_with_demo_and_test_commands():
    demo, tests = _commands()
    assert demo.startswith("python3 -m venv .venv && ")
    assert "examples/digits_cnn_batchnorm.py" in demo
    assert tests.startswith("python3 -m venv .venv && ") and "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci_lines


def test_readme_and_changelog_show_the_version():
    import jaxaccum

    readme = (ROOT / "README.md").read_text()
    assert f"jaxaccum {jaxaccum.__version__} (`jaxaccum.__version__`)" in readme
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{jaxaccum.__version__}] - " in changelog
    assert "## [Unreleased]" in changelog


def test_quickstart_runs_as_written(capsys):
    import re

    block = re.search(
        r"## Quickstart\s+```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S
    )
    assert block is not None
    exec(compile(block.group(1), "README.md quickstart", "exec"), {"__name__": "__main__"})
    assert "same gradient as the full batch: True" in capsys.readouterr().out
