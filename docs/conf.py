"""Sphinx configuration for the jaxaccum documentation.

Build it from the repository root with
``.venv/bin/python -m sphinx -W -b html docs docs/_build/html``. Nothing here reaches the
network and nothing executes notebooks; the code blocks of the pages run in
``tests/test_docs.py`` instead.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
from typing import Any

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the checkout, installed or not

import jaxaccum  # noqa: E402

project = "jaxaccum"
author = "The jaxaccum authors"
copyright = "The jaxaccum authors"
version = release = jaxaccum.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: headings get anchors, so that ``[text](page.md#section)`` links resolve.
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# autodoc and napoleon: the docstrings are Google style; types go with the parameters.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

html_theme = "sphinx_book_theme"
html_title = f"jaxaccum {release}"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
}


# Repository files shown on the site: CHANGELOG.md, benchmarks/RESULTS.md and the examples'
# READMEs are pulled into pages under docs/ with MyST's ``{include}``. Their relative links
# are written for the repository (``[plot](plot.png)``, ``../../benchmarks/RESULTS.md``), and
# so are the guides' links to them. The two handlers below make those links point at the
# same things on the site: a link to an included file goes to the page that includes it, and
# any other link from an included file is made relative to the including page (an existing
# file outside the site becomes a download, as MyST makes of any local non-page file).

INCLUDE = re.compile(r"^[`~:]{3,}\{include\}\s+(\S+)", re.M)
LINK = re.compile(r"(!?\[[^\]\n]*\]\()([^)\s]+)(\))")
EXTERNAL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:|#|/")


def _site_pages() -> dict[pathlib.Path, pathlib.Path]:
    """Each repository file that a page under docs/ includes, and that page."""
    pages = {}
    for page in DOCS.rglob("*.md"):
        if "_build" in page.relative_to(DOCS).parts:
            continue
        for included in INCLUDE.findall(page.read_text()):
            pages[(page.parent / included).resolve()] = page
    return pages


SITE_PAGES = _site_pages()


def _relink(text: str, written_in: pathlib.Path, shown_in: pathlib.Path) -> str:
    """``text``'s relative links, written in file ``written_in``, for the page ``shown_in``."""

    def one(match: re.Match[str]) -> str:
        target = match.group(2)
        if EXTERNAL.match(target):
            return match.group(0)
        path, _, fragment = target.partition("#")
        resolved = (written_in.parent / path).resolve()
        if not resolved.exists():
            return match.group(0)  # not a file (code such as ``f[0](x)``): left as it is
        resolved = SITE_PAGES.get(resolved, resolved)
        new = os.path.relpath(resolved, shown_in.parent) + (f"#{fragment}" if fragment else "")
        return match.group(1) + new + match.group(3)

    return LINK.sub(one, text)


def _relink_page(app: Any, docname: str, source: list[str]) -> None:
    """A page's links to included repository files point at the pages that include them."""
    page = pathlib.Path(app.env.doc2path(docname))
    source[0] = _relink(source[0], page, page)


def _relink_include(app: Any, relative_path: Any, parent: str, content: list[str]) -> None:
    """An included file's links, rewritten for the page that includes it."""
    page = pathlib.Path(app.env.doc2path(app.env.docname))
    content[0] = _relink(content[0], pathlib.Path(app.srcdir, relative_path).resolve(), page)


def _public_path(obj: Any) -> str:
    """``optax.microbatching._microbatching.Accumulator`` -> ``optax.microbatching.Accumulator``."""
    parts = [p for p in obj.__module__.split(".") if not p.startswith("_")]
    return ".".join([*parts, obj.__qualname__])


def _foreign_docstring(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Say where a re-exported object of another library is documented.

    ``jaxaccum.optax_compat`` re-exports optax's own ``AccumulationType``, ``Accumulator``,
    ``MultiStepsState`` and ``ShouldSkipUpdateFunction`` so that values made with optax work
    unchanged. Their docstrings are optax's, written for optax's documentation build (one of
    them does not parse as reStructuredText here), so the page names the object instead of
    rendering optax's text.
    """
    module = getattr(obj, "__module__", None) or ""
    if name.startswith("jaxaccum.") and isinstance(obj, type) and module.startswith("optax."):
        lines[:] = [
            f"optax's own ``{_public_path(obj)}``, re-exported unchanged: values made with "
            "optax work here as they are. It is documented with optax."
        ]


def setup(app: Any) -> None:
    app.connect("source-read", _relink_page)
    app.connect("include-read", _relink_include)
    app.connect("autodoc-process-docstring", _foreign_docstring)
