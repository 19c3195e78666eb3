"""Real data and a real tiny model shared by the tests."""

from __future__ import annotations

import ast
import functools
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any
from xml.etree import ElementTree

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

# Tolerances for "equals the full batch up to float32 round-off".
RTOL = 1e-5
ATOL = 1e-6


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int32)


def digits_batch(n: int, offset: int = 0) -> dict[str, jax.Array]:
    """``n`` consecutive examples of scikit-learn's digits: features in [0, 1], labels."""
    x, y = _digits()
    return {"x": jnp.asarray(x[offset : offset + n]), "y": jnp.asarray(y[offset : offset + n])}


class MLP(nn.Module):
    """A two-layer perceptron over the 64 pixel features."""

    width: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.width, dtype=self.dtype, param_dtype=self.dtype)(x))
        return nn.Dense(10, dtype=self.dtype, param_dtype=self.dtype)(x)


def init_params(width: int = 32, dtype: Any = jnp.float32) -> Any:
    return MLP(width, dtype).init(jax.random.key(0), jnp.zeros((1, 64), dtype))


def mean_loss(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean softmax cross-entropy of the MLP (dtype follows the params)."""
    dtype = jax.tree.leaves(params)[0].dtype
    logits = MLP(params["params"]["Dense_0"]["kernel"].shape[1], dtype).apply(
        params, batch["x"].astype(dtype)
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["y"][:, None], axis=1)[:, 0]
    return jnp.mean(nll).astype(dtype)


def masked_mean_loss(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Cross-entropy averaged over the examples whose ``mask`` is 1 (token-mean style).

    With no valid example the mean is 0/0; the tests rely on accumulate ignoring it.
    """
    logits = MLP(params["params"]["Dense_0"]["kernel"].shape[1]).apply(params, batch["x"])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["y"][:, None], axis=1)[:, 0]
    return jnp.sum(nll * batch["mask"]) / jnp.sum(batch["mask"])


def strided_micro(batch: Any, j: int, k: int) -> Any:
    """Micro-batch ``j`` of ``k`` under the strided split, sliced by hand."""
    return jax.tree.map(lambda x: x[j::k], batch)


def assert_trees_close(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL) -> None:
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol
        ),
        actual,
        expected,
    )


def trees_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two pytrees of arrays."""
    same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(same))


class BNNet(nn.Module):
    """Dense → BatchNorm → ReLU → Dense; ``axis_name`` synchronises BatchNorm's statistics."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)
        return nn.Dense(10)(nn.relu(x))


def require_devices(n: int) -> int:
    """Fails (never skips) a multi-device check started without ``n`` devices."""
    if jax.device_count() < n:
        pytest.fail(
            f"needs {n} devices, found {jax.device_count()}: run through "
            "tests/test_sharding.py, or with XLA_FLAGS=--xla_force_host_platform_device_count=8."
        )
    return n


EIGHT_DEVICE_CHECKS = (
    "data_axis_checks.py",
    "fsdp_checks.py",
    "mesh_checks.py",
    "collectives_checks.py",
)
HERE = pathlib.Path(__file__).resolve().parent


def eight_device_checks() -> list[str]:
    """``file::function`` of every check in the 8-device files, read without importing them
    (importing would start XLA:CPU with the wrong device count)."""
    found = []
    for name in EIGHT_DEVICE_CHECKS:
        tree = ast.parse((HERE / name).read_text())
        found += [
            f"{name}::{node.name}"
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
        ]
    return found


# Runs the command after the folder argument, its output to ``output.txt`` in that folder,
# then writes its exit code to ``exit_code`` there: whoever holds the folder can wait for it.
_RECORDING = """
import pathlib, subprocess, sys
folder = pathlib.Path(sys.argv[1])
with open(folder / "output.txt", "w") as log:
    code = subprocess.call(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
(folder / "exit_code").write_text(str(code))
"""


class EightDeviceRun:
    """The 8-device check files, running in their own interpreter in the background.

    XLA:CPU fixes its device count when the backend starts, so these files run in a fresh
    interpreter started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Their
    output goes to a file in ``folder`` (a pipe could fill up and stall them), the outcome
    of every case to a JUnit XML report there, read back per check by :meth:`wait`. With
    pytest-xdist, one worker starts the run in a folder the workers share and the others
    (``start=False``) wait for the same folder's results.
    """

    def __init__(self, folder: pathlib.Path | None = None, start: bool = True) -> None:
        self.dir = tempfile.TemporaryDirectory() if folder is None else None
        self.folder = pathlib.Path(self.dir.name) if self.dir is not None else folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.report = self.folder / "report.xml"
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            env = dict(os.environ)
            env["XLA_FLAGS"] = (
                env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
            ).strip()
            env["JAX_PLATFORMS"] = "cpu"
            env.pop("PYTEST_XDIST_WORKER", None)
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0"]
            cmd += ["--junitxml", str(self.report), "-o", "junit_family=xunit1"]
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _RECORDING, str(self.folder), *cmd, *EIGHT_DEVICE_CHECKS],
                cwd=HERE,
                env=env,
            )
        self.done: tuple[int, str, dict[str, list[tuple[str, str]]]] | None = None

    def wait(self, timeout: float) -> tuple[int, str, dict[str, list[tuple[str, str]]]]:
        """Waits for the run (killing it after ``timeout`` s, where this process started
        it) once; then returns its exit code, its output, and per ``file::function`` each
        case's ``(name, failure)`` (failure "" when the case passed, "skipped" when it was
        skipped)."""
        if self.done is None:
            exit_code = self.folder / "exit_code"
            deadline = time.monotonic() + timeout
            while not exit_code.is_file() and time.monotonic() < deadline:
                time.sleep(1.0)
            if exit_code.is_file():
                code = int(exit_code.read_text() or -1)
            else:
                if self.proc is not None:
                    self.proc.kill()
                code = -1
            log = self.folder / "output.txt"
            output = log.read_text() if log.is_file() else ""
            self.done = code, output, self._cases()
        return self.done

    def _cases(self) -> dict[str, list[tuple[str, str]]]:
        cases: dict[str, list[tuple[str, str]]] = {}
        if not self.report.is_file():
            return cases
        for case in ElementTree.parse(self.report).getroot().iter("testcase"):
            module = case.get("file") or (case.get("classname", "") + ".py")
            name = case.get("name", "")
            check = f"{pathlib.Path(module).name}::{name.split('[')[0]}"
            failure = next(
                (
                    "skipped"
                    if child.tag == "skipped"
                    else (child.text or child.get("message", ""))
                    for child in case
                    if child.tag in ("failure", "error", "skipped")
                ),
                "",
            )
            cases.setdefault(check, []).append((name, failure))
        return cases
