"""``python -m benchmarks MODE [options]``: run one of jaxaccum's benchmarks, or all of them.

Modes (``python -m benchmarks MODE --help`` lists a mode's options):

* ``suite``: ``jaxaccum.accumulate`` against four peers on an MLP, a CNN with BatchNorm and a
  transformer: step time, compiled memory, compile time, unrolling, collectives (``suite.py``).
* ``builders``: ``jaxaccum.accumulate``, ``train_step`` and ``multi_steps`` against the peers
  on the MLP (``builders.py``).
* ``multisteps``: one call of ``jaxaccum.multi_steps`` against one of ``optax.MultiSteps``
  around AdamW (``per_call.py``).
* ``batchnorm``: how far accumulated BatchNorm statistics are from the full batch's, per
  layer and mode (``bn_deviation.py``).
* ``collectives``: collectives per step against k on 8 devices (``comm_counts.py``).
* ``fsdp-memory``: per-device memory and collectives of FSDP models (a scan over layers that
  gathers its weights where it uses them, on both mesh kinds; weights used whole) on 8
  devices (``fsdp_memory.py``).
* ``all``: every mode in turn, each in its own process, with the settings recorded in
  ``RESULTS.md`` (``--smoke``: the smallest settings, a minute or two).

The parser lives here so that it answers without importing JAX; each mode's module is
imported only when it runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import pathlib
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import UsageError

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
MODULES = {
    "suite": "benchmarks.suite",
    "builders": "benchmarks.builders",
    "multisteps": "benchmarks.per_call",
    "batchnorm": "benchmarks.bn_deviation",
    "collectives": "benchmarks.comm_counts",
    "fsdp-memory": "benchmarks.fsdp_memory",
}


def _all_argv(mode: str, out: pathlib.Path, smoke: bool) -> list[str]:
    """The options ``all`` runs ``mode`` with: those of RESULTS.md, or the smallest."""
    outputs = {
        "suite": ["--out", str(out / "suite")],
        "builders": ["--out", str(out / "builders.json")],
        "multisteps": ["--out", str(out / "multisteps.json")],
        "batchnorm": ["--json", str(out / "batchnorm.json")],
        "collectives": ["--json", str(out / "collectives.json")],
        "fsdp-memory": ["--json", str(out / "fsdp_memory.json")],
    }
    recorded = {
        "suite": ["--quick"],
        "builders": [],
        "multisteps": [],
        "batchnorm": [],
        "collectives": [],
        "fsdp-memory": [],
    }
    smallest = {
        "suite": ["--smoke", "--ks", "2", "--reps", "2"],
        "builders": ["--quick", "--ks", "2"],
        "multisteps": ["--quick"],
        "batchnorm": ["--batch", "64", "--k", "2"],
        "collectives": ["--ks", "1,2", "--batch", "64"],
        "fsdp-memory": ["--ks", "2", "--batch", "128", "--layers", "2", "--width", "64"],
    }
    return [mode, *(smallest if smoke else recorded)[mode], *outputs[mode]]


def run_all(args: argparse.Namespace) -> int:
    """Runs every mode in a fresh process; returns the number of modes that failed.

    A fresh process per mode keeps one mode's compiled programs and freed memory out of
    the next one's timings. Modes run one after another, their output streamed, unless
    ``--jobs`` asks for several at once (then each mode's output is printed when it ends,
    and the modes share the cores: for smoke checks, not for timings). A failing mode does
    not stop the others.
    """
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    commands = {
        mode: [sys.executable, "-m", "benchmarks", *_all_argv(mode, args.out, args.smoke)]
        for mode in MODULES
    }

    def run(mode: str) -> int:
        cmd = commands[mode]
        if args.jobs == 1:
            print(f"\n$ python -m benchmarks {' '.join(cmd[3:])}", flush=True)
            return subprocess.run(cmd, cwd=ROOT, check=False).returncode
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        print(f"\n$ python -m benchmarks {' '.join(cmd[3:])}\n{proc.stdout}{proc.stderr}", end="")
        return proc.returncode

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        codes = dict(zip(commands, pool.map(run, commands), strict=True))
    failed = [mode for mode, code in codes.items() if code]
    print(
        f"\nall: {len(codes) - len(failed)} of {len(codes)} modes ran; failed: {failed or 'none'}"
    )
    return len(failed)


def _suite(p: argparse.ArgumentParser) -> None:
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="small models, k in {1, 2, 4, 8}")
    scale.add_argument("--full", action="store_true", help="larger batches, k up to 32 (default)")
    scale.add_argument("--smoke", action="store_true", help="tiny models, k in {1, 2}")
    p.add_argument("--out", type=pathlib.Path, default=OUT / "suite", help="output folder")
    p.add_argument("--models", default="mlp,cnn,transformer", help="comma-separated workloads")
    p.add_argument("--ks", help="comma-separated numbers of micro-batches")
    p.add_argument("--reps", type=int, help="timed repetitions (smoke 2, quick 20, full 30)")
    p.add_argument("--warmup", type=int, help="untimed calls after compiling")
    p.add_argument("--batch-scale", type=int, default=1, help="multiply every N by this")
    p.add_argument(
        "--no-collectives", action="store_true", help="skip the 8-device collectives count"
    )
    p.add_argument(
        "--unroll-k", type=int, help="k at which to time unrolled scans (0: none; quick/full 8)"
    )
    p.add_argument(
        "--rereport",
        nargs="+",
        type=pathlib.Path,
        metavar="DIR",
        help="recompute the summaries of DIR/suite.json and rewrite DIR's outputs; time nothing",
    )


def _builders(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny model, k in {1, 2, 4}")
    p.add_argument("--ks", help="comma-separated numbers of micro-batches (default 1,2,4,8,16)")
    p.add_argument("--reps", type=int, help="timed repetitions (default 40, quick 2)")
    p.add_argument("--batch", type=int, help="examples per step (default 1024, quick 64)")
    p.add_argument("--out", type=pathlib.Path, default=OUT / "builders.json", help="JSON path")


def _multisteps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny model, few repetitions")
    p.add_argument("--reps", type=int, help="timed repetitions (default 200, quick 3)")
    p.add_argument("--k", type=int, default=4, help="calls per update (default 4)")
    p.add_argument("--no-donate", action="store_true", help="do not donate state")
    p.add_argument("--out", type=pathlib.Path, default=OUT / "multisteps.json", help="JSON path")


def _batchnorm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=256, help="digits in the step (default 256)")
    p.add_argument("--k", type=int, default=8, help="micro-batches (default 8)")
    p.add_argument("--json", type=pathlib.Path, help="also write the deviations here")


def _eight_devices(ks: str, batch: int) -> Any:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ks", default=ks, help=f"comma-separated k (default {ks})")
        p.add_argument("--batch", type=int, default=batch, help=f"N (default {batch})")
        p.add_argument("--json", default="", help="also write JSON here ('-': JSON to stdout)")

    return add


def _fsdp_memory(p: argparse.ArgumentParser) -> None:
    # The module's own options, read without importing JAX.
    p.add_argument("--ks", default="1,2,4,8", help="comma-separated k (default 1,2,4,8)")
    p.add_argument("--batch", type=int, default=4096, help="N (default 4096)")
    p.add_argument("--layers", type=int, default=16, help="layers (default 16)")
    p.add_argument("--width", type=int, default=1024, help="layer width (default 1024)")
    p.add_argument("--json", default="", help="also write JSON here ('-': JSON to stdout)")


def _all(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true", help="the smallest settings of every mode")
    p.add_argument("--out", type=pathlib.Path, default=OUT, help="output folder")
    p.add_argument(
        "--jobs", type=int, default=1, help="modes run at once (default 1; more only for --smoke)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per mode."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Runs one of jaxaccum's benchmarks, or all of them (benchmarks/README.md).",
    )
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, add, text in (
        ("suite", _suite, "jaxaccum.accumulate against four peers on three models"),
        ("builders", _builders, "accumulate, train_step and multi_steps against peers (MLP)"),
        ("multisteps", _multisteps, "one call of multi_steps against optax.MultiSteps"),
        ("batchnorm", _batchnorm, "BatchNorm statistics' deviation from the full batch"),
        ("collectives", _eight_devices("1,2,4,8,16,32", 512), "collectives per step vs k"),
        ("fsdp-memory", _fsdp_memory, "per-device memory and collectives of FSDP models"),
        ("all", _all, "every mode in turn"),
    ):
        mode_parser = sub.add_parser(mode, help=text, description=text)
        add(mode_parser)
        mode_parser.set_defaults(parser=mode_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> Any:
    """Parses the command line and runs the mode.

    Args:
      argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
      What the mode returns (for ``all``, the number of modes that failed).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.mode == "all":
            return run_all(args)
        return importlib.import_module(MODULES[args.mode]).run(args)
    except UsageError as error:
        args.parser.error(str(error))


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
