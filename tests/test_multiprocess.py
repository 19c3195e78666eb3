"""Accumulation across processes: 2 processes x 4 CPU devices train like one device.

The test starts ``multiprocess_worker.py`` twice on a free localhost port (JAX's own
multi-controller runtime through ``jax.distributed.initialize``, gloo collectives on CPU),
then trains the same model on the same data here, on one device, with the full-batch
gradient, and compares the losses, the first gradients and the final params.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Any

import jax
import multiprocess_worker as worker
import numpy as np
import pytest
from helpers import ATOL, RTOL, init_params, mean_loss

NUM_PROCESSES = 2
TIMEOUT_S = 240  # for both workers together; a passing run takes a few seconds
PORT_TRIES = 3  # a free port can be taken between choosing it and binding it
BIND_FAILED = "Failed to add port to server"  # what process 0 logs when the port is taken
# gRPC would route the coordinator's localhost traffic through a proxy.
PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "grpc_proxy"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def wait_all(procs: list[subprocess.Popen[bytes]]) -> str | None:
    """Waits for every process; returns what went wrong, or None if all exited with 0."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if any(code not in (None, 0) for code in codes):
            return f"a worker failed; exit codes {codes} (None: still running, then killed)"
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.05)
    return f"workers still running after {TIMEOUT_S} s; killed"


def run_once(port: int, out: pathlib.Path, logs: list[pathlib.Path]) -> str | None:
    """Runs one worker per log file on ``port``; kills any still running when it returns."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, log in enumerate(logs):
            args = [str(i), str(NUM_PROCESSES), str(port), str(out)]
            with log.open("wb") as f:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(worker.__file__), *args],
                        stdin=subprocess.DEVNULL,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        env=worker_env(),
                    )
                )
        return wait_all(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def run_workers(tmp_path: pathlib.Path) -> dict[str, np.ndarray]:
    """Runs the workers (on a fresh port if the first is taken); returns process 0's result."""
    out = tmp_path / "result.npz"
    for attempt in range(PORT_TRIES):
        port = free_port()
        logs = [tmp_path / f"worker{i}-try{attempt}.log" for i in range(NUM_PROCESSES)]
        failure = run_once(port, out, logs)
        if failure is None:
            with np.load(out) as result:
                return dict(result)
        if BIND_FAILED not in logs[0].read_text(errors="replace"):
            break
    output = "".join(
        f"\n----- {log.name} (last 4000 characters) -----\n"
        + log.read_text(errors="replace")[-4000:]
        for log in logs
    )
    pytest.fail(f"{failure} (port {port}, try {attempt + 1}){output}", pytrace=False)


def reference() -> dict[str, np.ndarray]:
    """The workers' training run on one device, with the full-batch gradient."""
    grad_fn = jax.jit(jax.value_and_grad(mean_loss))
    params: Any = init_params()
    losses, first_grads = [], None
    for batch in worker.batches():
        loss, grads = grad_fn(params, batch)
        params = jax.tree.map(lambda p, g: p - worker.LR * g, params, grads)
        losses.append(np.asarray(loss))
        first_grads = grads if first_grads is None else first_grads
    return {
        "losses": np.stack(losses),
        **worker.flatten(first_grads, "grads"),
        **worker.flatten(params, "params"),
    }


def test_two_processes_match_one_device(tmp_path: pathlib.Path) -> None:
    """Replicated params and FSDP params with both strategies, each equal to one device;
    FSDP gradients come back sharded like the params."""
    result = run_workers(tmp_path)
    one = reference()
    expected = {
        f"{layout}/{name}": value for layout in worker.LAYOUTS for name, value in one.items()
    }
    flags = {f"{layout}/sharded_like_params" for layout in worker.LAYOUTS}
    assert sorted(result) == sorted([*expected, *flags])
    assert all(bool(result[flag]) for flag in flags), {f: result[f] for f in flags}
    for layout in worker.LAYOUTS:
        losses = result[f"{layout}/losses"]
        assert losses.shape == (worker.STEPS,)
        assert losses[-1] < losses[0]  # it trained: the check is not vacuous
    for name, value in expected.items():
        np.testing.assert_allclose(result[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
