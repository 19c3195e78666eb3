"""What the ``suite`` mode writes besides its JSON: Markdown tables and PNG plots."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

from benchmarks import comm_counts

MiB = 2**20


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def model_table(rows: Sequence[dict[str, Any]]) -> str:
    """One model's rows as a Markdown table, one line per (k, method)."""
    lines = [
        "| k | method | step ms | × full | (p25–p75) | compile s | temp MiB | GFLOP/s | MFU "
        "| max grad diff | ok |",
        "| ---: | --- | ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in rows:
        lo, hi = r["ratio_p25_p75"]
        temp = f"{r['temp_bytes'] / MiB:.2f}" + ("" if r["one_call"] else "*")
        flops = r["achieved_flops_per_s"]
        lines.append(
            f"| {r['k']} | {r['method']} | {r['median_ms']:.2f} | {r['ratio_to_full']:.2f} "
            f"| {lo:.2f}–{hi:.2f} | {r['compile_s']:.2f} | {temp} "
            f"| {_fmt(None if flops is None else flops / 1e9, '.1f')} "
            f"| {_fmt(r['mfu'], '.3f')} | {r['grad_max_abs_diff']:.1e} "
            f"| {'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(lines)


def _verdict(s: dict[str, Any]) -> str:
    if s["jaxaccum_le_fastest_peer"]:
        return "yes"
    return "**no**" if s["jaxaccum_clearly_behind"] else "no (p25 ≤ 1: noise?)"


def summary_table(summary: Sequence[dict[str, Any]]) -> str:
    """jaxaccum against the fastest peer, one line per (model, k)."""
    lines = [
        "| model | k | jaxaccum × full | fastest peer | its × full | jaxaccum / fastest "
        "| (p25–p75) | jaxaccum ≤ fastest |",
        "| --- | ---: | ---: | --- | ---: | ---: | :---: | :---: |",
    ]
    for s in summary:
        lo, hi = s["jaxaccum_vs_fastest_peer_p25_p75"]
        lines.append(
            f"| {s['model']} | {s['k']} | {s['jaxaccum_ratio_to_full']:.2f} "
            f"| {s['fastest_peer']} | {s['fastest_peer_ratio_to_full']:.2f} "
            f"| {s['jaxaccum_vs_fastest_peer']:.3f} | {lo:.2f}–{hi:.2f} "
            f"| {_verdict(s)} |"
        )
    return "\n".join(lines)


def compile_table(rows: Sequence[dict[str, Any]]) -> str:
    """jaxaccum's compile time per k, one line per model."""
    ks = sorted({int(k) for r in rows for k in r["compile_s"]})
    lines = [
        "| model | " + " | ".join(f"k={k}" for k in ks) + " | largest k / k=2 |",
        "| --- | " + " | ".join("---:" for _ in ks) + " | ---: |",
    ]
    for r in rows:
        by_k = {int(k): v for k, v in r["compile_s"].items()}
        cells = " | ".join(_fmt(by_k.get(k), ".2f") for k in ks)
        lines.append(f"| {r['model']} | {cells} | {_fmt(r['largest_k_over_k2'], '.2f')} |")
    return "\n".join(lines)


def unroll_table(rows: Sequence[dict[str, Any]]) -> str:
    """Time, temporaries and compile time of the unrolled scans, one line per factor."""
    lines = [
        "| model | k | unroll | × full | (p25–p75) | temp MiB | temp / unroll=1 | compile s |",
        "| --- | ---: | ---: | ---: | :---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lo, hi = r["ratio_p25_p75"]
        lines.append(
            f"| {r['model']} | {r['k']} | {r['unroll']} | {r['ratio_to_full']:.2f} "
            f"| {lo:.2f}–{hi:.2f} | {r['temp_bytes'] / MiB:.2f} "
            f"| {r['temp_over_unroll_1']:.2f} | {r['compile_s']:.2f} |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The whole report: settings, one table per model, the summary."""
    machine, s = report["machine"], report["settings"]
    parts = [
        "# Gradient accumulation suite",
        "",
        f"{machine['platform']}; {machine['cpu']}, {machine['cores']} cores; backend "
        f"{machine.get('backend', 'not recorded')}, devices {', '.join(machine['devices'])}; "
        f"jax {machine['jax']}, jaxlib {machine['jaxlib']}, "
        f"optax {machine['optax']}. Mode {s['mode']}, {s['reps']} repetitions, "
        f"load average {report['loadavg_before']} before, {report['loadavg_after']} after.",
        "",
        "Step ms: median over repetitions; × full: median of the per-repetition ratio to the "
        "full-batch step; temp MiB: compiled temporaries (* of the micro-step called k "
        "times); GFLOP/s: full-batch model FLOPs / step time; MFU against "
        f"{report['flops'].get('peak_basis') or 'no known peak (null)'}; ok: loss, gradient "
        "(and carried state) within the tolerance of the reference.",
    ]
    for model in s["models"]:
        rows = [r for r in report["rows"] if r["model"] == model]
        config = s["workloads"][model]
        parts += ["", f"## {model}", "", f"`{config}`", "", model_table(rows)]
    parts += ["", "## jaxaccum against the fastest peer", "", summary_table(report["summary"])]
    parts += ["", "## jaxaccum compile time (s) against k", "", compile_table(report["compile"])]
    if report["unroll"]:
        parts += [
            "",
            "## Unrolling the scan: time against memory",
            "",
            "`unroll=u` keeps u micro-batches' activations alive at once.",
            "",
            unroll_table(report["unroll"]),
        ]
    if report["collectives"]:
        parts += [
            "",
            "## Collectives per step on 8 devices (MLP, N = 512, batch sharded)",
            "",
            "Counted in the compiled HLO; an op inside the loop runs k times per step.",
            "",
            comm_counts.markdown(report["collectives"]),
        ]
    return "\n".join(parts) + "\n"


def _by_model(
    rows: Sequence[dict[str, Any]],
    models: Sequence[str],
    ylabel: str,
    key: str,
    path: pathlib.Path,
    scale: float = 1.0,
) -> None:
    """One subplot per model: ``row[key] * scale`` against k, one line per method.

    Methods measured at a single k (the unrolled scans) are left out.
    """
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = sorted((r["k"], r[key] * scale) for r in mine if r["method"] == method)
            if len(pts) < 2 <= len({r["k"] for r in mine}):
                continue
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="k (micro-batches)", ylabel=ylabel, title=model)
    axes[0][0].legend(fontsize="small")
    _save(fig, path)


def _save(fig: Any, path: pathlib.Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_ratio(
    rows: Sequence[dict[str, Any]], models: Sequence[str], path: pathlib.Path
) -> None:
    """Step time as a multiple of the full-batch step, against k."""
    _by_model(rows, models, "step time / full-batch step", "ratio_to_full", path)


def plot_temp_memory(
    rows: Sequence[dict[str, Any]], models: Sequence[str], path: pathlib.Path
) -> None:
    """Compiled temporaries in MiB against k (the micro-step's for the loop methods)."""
    _by_model(rows, models, "compiled temp MiB", "temp_bytes", path, scale=1 / MiB)


def _per_step(row: dict[str, Any]) -> int:
    """Collectives run per step: those in the loop k times, the others once."""
    if "per_step" in row:
        return int(row["per_step"])
    return row["k"] * sum(row["in_loop"].values()) + sum(row["outside_loop"].values())


def plot_collectives(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """Collective ops inside loops against k, one line per method.

    Args:
      rows: ``{"method", "k", "in_loop": {op: count}, "outside_loop": {op: count}}``.
      path: the PNG to write; with no rows it says that nothing was recorded.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["k"], _per_step(r)) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set(xlabel="k (micro-batches)", ylabel="collectives run per step", title="8 devices")
    if rows:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no collectives recorded", ha="center", transform=ax.transAxes)
    _save(fig, path)


def write_plots(report: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    """time_ratio.png, temp_memory.png and collectives.png in ``out``; returns their paths."""
    models = report["settings"]["models"]
    paths = [out / "time_ratio.png", out / "temp_memory.png", out / "collectives.png"]
    plot_time_ratio(report["rows"], models, paths[0])
    plot_temp_memory(report["rows"], models, paths[1])
    plot_collectives(report["collectives"], paths[2])
    return paths
