"""The documentation site builds without warnings, documents the whole API, and its code runs.

* ``sphinx-build -W --keep-going -b html docs <tmp>`` succeeds (warnings are errors);
* every name in the ``__all__`` of ``jaxaccum``, ``jaxaccum.flax``, ``jaxaccum.inspect`` and
  ``jaxaccum.optax_compat`` has an entry on that module's API page of the built site;
* every Python code block of every page under ``docs/`` runs: a page's blocks run in order
  in one fresh interpreter, so a block sees what the blocks above it defined, as a reader
  pasting them would. A page whose front matter says ``jaxaccum-devices: 8`` runs with 8
  XLA:CPU devices. A block whose first line is ``# not run: <reason>`` is shown, not run;
  ``text``, ``bash`` and other languages are never run.

The build and the pages' code take well over 20 s on 2 cores, so those tests are marked
``slow`` (``.ci/run`` runs them); the extractor's own test is not.
"""

from __future__ import annotations

import dataclasses
import html.parser
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGES = {
    "jaxaccum": "api/jaxaccum.html",
    "jaxaccum.flax": "api/flax.html",
    "jaxaccum.inspect": "api/inspect.html",
    "jaxaccum.optax_compat": "api/optax_compat.html",
}
PYTHON = {"python", "py", "python3"}
CODE_DIRECTIVES = {"{code-block}", "{code}", "{sourcecode}"}
NOT_RUN = re.compile(r"#\s*not run:\s*\S")
DEVICES = re.compile(r"^jaxaccum-devices:\s*(\S+)\s*$", re.M)
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the block's first code line in the page
    code: str
    run: bool


def front_matter(text: str) -> str:
    """The YAML front matter of a MyST page (between ``---`` lines at its top), or ''."""
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    return match.group(1) if match else ""


def devices(text: str) -> int | None:
    """The page's ``jaxaccum-devices:`` front-matter value, if it declares one."""
    found = DEVICES.search(front_matter(text))
    if found is None:
        return None
    value = found.group(1)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"jaxaccum-devices: {value!r} is not a positive integer")
    return int(value)


def _is_python(info: str) -> bool:
    words = info.split()
    if not words:
        return False
    if words[0] in CODE_DIRECTIVES:
        return len(words) > 1 and words[1] in PYTHON
    return words[0] in PYTHON


def _strip_options(body: list[str]) -> tuple[int, list[str]]:
    """Drops a MyST directive's leading ``:key: value`` lines or ``---`` YAML block."""
    start = 0
    if body and body[0].strip() == "---":
        end = next((i for i in range(1, len(body)) if body[i].strip() == "---"), None)
        if end is None:
            raise ValueError("a directive's '---' option block is not closed")
        start = end + 1
    else:
        while start < len(body) and re.match(r"\s*:[\w-]+:", body[start]):
            start += 1
    if start < len(body) and start > 0 and not body[start].strip():
        start += 1
    return start, body[start:]


def code_blocks(text: str) -> list[Block]:
    """Every ``python`` fenced block and ``{code-block} python`` directive, in page order.

    Fences of other directives (``{note}``, tabs) are looked into, so a code block nested
    in them is found; a code block's own content is read verbatim up to its closing fence.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None or not opening.group("info").strip():
            i += 1
            continue
        info = opening.group("info").strip()
        directive = info.split()[0]
        if directive.startswith("{") and directive not in CODE_DIRECTIVES:
            i += 1  # a container directive: its content is scanned like the page
            continue
        indent, fence = len(opening.group("indent")), opening.group("fence")
        closing = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
        if end is None:
            raise ValueError(f"the code block opened on line {i + 1} is not closed")
        if _is_python(info):
            body = [
                line[indent:] if line[:indent].isspace() else line for line in lines[i + 1 : end]
            ]
            skipped, body = (0, body) if directive in PYTHON else _strip_options(body)
            first = next((line for line in body if line.strip()), "")
            blocks.append(
                Block(
                    line=i + 2 + skipped, code="\n".join(body) + "\n", run=not NOT_RUN.match(first)
                )
            )
        i = end + 1
    return blocks


def pages() -> list[pathlib.Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts)


# Runs the blocks given as JSON on stdin in one namespace. Each block is compiled with the
# page as its file name and padded to its line there, so a traceback points at the page's
# own line (and shows it).
DRIVER = """
import json, sys
page, blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for number, line, code in blocks:
    print(f"--- {page}: block {number}, line {line}", flush=True)
    exec(compile("\\n" * (line - 1) + code, page, "exec"), namespace)
"""


def run_page(path: pathlib.Path, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """Runs the page's runnable blocks, in order, in one fresh interpreter in ``cwd``."""
    text = path.read_text()
    runnable = [
        (number, b.line, b.code) for number, b in enumerate(code_blocks(text), start=1) if b.run
    ]
    env = dict(os.environ)
    count = devices(text)
    if count is not None:
        flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
        env["XLA_FLAGS"] = flags.strip()
        env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps([str(path), runnable]),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_code_blocks_run(path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    if not any(b.run for b in code_blocks(path.read_text())):
        return
    done = run_page(path, tmp_path)
    marks = re.findall(r"^--- .*$", done.stdout, re.M)
    where = marks[-1].removeprefix("--- ") if marks else str(path)
    if done.returncode != 0:
        pytest.fail(
            f"{where} failed:\n{done.stderr[-6000:]}\n--- stdout ---\n{done.stdout[-3000:]}",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("docs")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-b",
            "html",
            "-d",
            str(out / "doctrees"),
            str(DOCS),
            str(out / "html"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"sphinx-build failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}", pytrace=False
        )
    return out / "html"


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors(site: pathlib.Path) -> None:
    assert (site / "index.html").is_file()
    for page in API_PAGES.values():
        assert (site / page).is_file(), page


class _Entries(html.parser.HTMLParser):
    """The ids of the object descriptions (``<dt id="jaxaccum.accumulate">``) of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "dt":
            self.ids.update(value for key, value in attrs if key == "id" and value)


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(API_PAGES))
def test_api_page_documents_all_of_dunder_all(site: pathlib.Path, module: str) -> None:
    parser = _Entries()
    parser.feed((site / API_PAGES[module]).read_text())
    public = importlib.import_module(module).__all__
    missing = [name for name in public if f"{module}.{name}" not in parser.ids]
    assert not missing, f"{API_PAGES[module]} has no entry for {missing}"


# The extractor itself, on a page that holds every case it distinguishes.
SAMPLE = """\
---
jaxaccum-devices: 8
---
# Title

```python
a = 1
```

````{note}
```python
b = a + 1
```
````

```{code-block} python
:caption: with an option

c = b + 1
```

```text
not code
```

```python
# not run: needs a TPU
d = 1 / 0
```

- in a list:

  ```python
  e = c + 1
  ```
"""


def test_code_block_extraction_on_a_sample_page() -> None:
    blocks = code_blocks(SAMPLE)
    assert [(b.line, b.code, b.run) for b in blocks] == [
        (7, "a = 1\n", True),
        (12, "b = a + 1\n", True),
        (19, "c = b + 1\n", True),
        (27, "# not run: needs a TPU\nd = 1 / 0\n", False),
        (34, "e = c + 1\n", True),
    ]
    assert devices(SAMPLE) == 8
    assert devices("# no front matter\n") is None
