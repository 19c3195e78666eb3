"""What a user installs: the sdist and the wheel, checked and installed outside the tree.

``python -m build`` builds the sdist and, from it, the wheel (so a file missing from the sdist
fails the wheel too); ``twine check --strict`` reads their metadata as PyPI would. A fresh
virtual environment in a temporary directory then installs the wheel with the lowest versions
of jax, jaxlib, optax and flax that ``pyproject.toml`` declares, pinned exactly, and runs the
README quickstart, one example and the core tests there, importing jaxaccum from the wheel.

The build's isolated environment and the fresh virtual environment are filled by ``uv``
(a dev dependency) from the package index, as pip would fill them but with parallel
downloads: the same index, the same resolution of the wheel's requirements and the pins,
in a fraction of pip's minutes.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

import jaxaccum

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE_TESTS = ("test_accumulate.py", "test_multisteps.py")
TOOLS = {"ruff", "mypy", "build", "twine", "uv"}  # dev tools the core tests do not import
UV = [sys.executable, "-m", "uv"]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: pathlib.Path, timeout: int = 900) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def floors() -> dict[str, str]:
    """The lowest version each runtime dependency declares (``name>=version``)."""
    declared = (
        PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["flax"]
    )
    found = dict(re.fullmatch(r"([a-z0-9_-]+)>=([0-9.]+)", d).groups() for d in declared)  # type: ignore[union-attr]
    assert set(found) == {"jax", "jaxlib", "optax", "flax"}, found
    return found


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    out = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "build", "--installer", "uv", "--outdir", str(out), str(ROOT)]
    _run(build, cwd=out)
    version = jaxaccum.__version__
    return {
        "sdist": out / f"jaxaccum-{version}.tar.gz",
        "wheel": out / f"jaxaccum-{version}-py3-none-any.whl",
    }


def test_metadata_passes_twine_check(dist: dict[str, pathlib.Path]) -> None:
    _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.values())], ROOT)
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        meta = wheel.read(f"jaxaccum-{jaxaccum.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    assert f"Version: {jaxaccum.__version__}" in meta
    assert "Classifier: Programming Language :: Python :: 3.11" in meta
    for name, version in floors().items():
        assert re.search(rf"Requires-Dist: {name}>={re.escape(version)}", meta), name


def test_artifacts_hold_the_package_license_and_changelog(dist: dict[str, pathlib.Path]) -> None:
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "jaxaccum").rglob("*.py")}
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
    assert modules | {"jaxaccum/py.typed"} <= names, modules - names
    assert f"jaxaccum-{jaxaccum.__version__}.dist-info/licenses/LICENSE" in names
    with tarfile.open(dist["sdist"]) as sdist:
        top = f"jaxaccum-{jaxaccum.__version__}/"
        inside = {m.name.removeprefix(top) for m in sdist.getmembers()}
    for needed in ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "jaxaccum/py.typed"):
        assert needed in inside, needed


def _quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S)
    assert block is not None
    return block.group(1)


def test_the_wheel_installs_and_runs_outside_the_tree(
    dist: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    """The wheel with the declared floors, pinned, in a new venv: quickstart, an example,
    and the core tests, all importing jaxaccum from the installed wheel."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = str(venv / "bin" / "python")
    pins = [f"{name}=={version}" for name, version in floors().items()]
    test_deps = [
        dep
        for dep in PYPROJECT["project"]["optional-dependencies"]["dev"]
        if not dep.startswith("jaxaccum") and re.split(r"[<>=]", dep)[0] not in TOOLS
    ]
    wheel = f"{dist['wheel']}[examples]"
    _run([*UV, "pip", "install", "-q", "--python", python, wheel, *pins, *test_deps], tmp_path)
    where = _run(
        [python, "-c", "import jaxaccum, jax, optax, flax; print(jaxaccum.__file__)"], tmp_path
    )
    assert pathlib.Path(where.strip()).is_relative_to(venv), where
    versions = _run(
        [
            python,
            "-c",
            "import jax, jaxlib, optax, flax; print(jax.__version__, "
            "jaxlib.__version__, optax.__version__, flax.__version__)",
        ],
        tmp_path,
    ).split()
    assert versions == [floors()[n] for n in ("jax", "jaxlib", "optax", "flax")], versions
    # The README quickstart, as a user pastes it.
    (tmp_path / "quickstart.py").write_text(_quickstart())
    out = _run([python, "quickstart.py"], tmp_path)
    assert "same gradient as the full batch: True" in out, out
    # One example, copied out of the tree with the modules the examples share.
    examples = tmp_path / "examples"
    shutil.copytree(
        ROOT / "examples", examples, ignore=shutil.ignore_patterns("__pycache__", "*.png")
    )
    flags = ["--steps", "3", "--ks", "2", "--builder-ks", "2", "--batch-size", "64"]
    out = _run([python, str(examples / "mlp_digits" / "main.py"), *flags], tmp_path)
    assert "accumulate k=2" in out, out
    # The core tests against the installed wheel (the tree's package is not on the path).
    tests = [str(ROOT / "tests" / name) for name in CORE_TESTS]
    out = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], tmp_path)
    assert re.search(r"\d+ passed", out) and "failed" not in out, out[-2000:]
