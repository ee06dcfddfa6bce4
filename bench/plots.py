"""PNG plots of one run's results: latency distributions, cost against size, throughput, search, memory.

Each plot is drawn only when the run has the data for it (`--only` runs have less).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

Data = dict[str, dict[str, Any]]
MB_PER_MIB = 1.048576


def make_plots(result: dict[str, Any], folder: Path, stamp: str) -> list[Path]:
    """Draw every plot the data allows into `folder` as `<stamp>-<name>.png`; return the paths."""
    data: Data = {s["name"]: s["data"] for s in result["sections"] if s["data"]}
    out: list[Path] = []
    for name, draw in PLOTS.items():
        fig = draw(data)
        if fig is None:
            continue
        path = folder / f"{stamp}-{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        out.append(path)
    return out


def _ecdf(ax: Axes, samples_ms: list[float], label: str) -> None:
    xs = sorted(samples_ms)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=f"{label} (n={len(xs):,})")


def _target(ax: Axes, x: float, label: str, vertical: bool = True) -> None:
    if vertical:
        ax.axvline(x, color="grey", linestyle="--", linewidth=1)
        ax.text(x, 0.02, f" {label}", color="grey", fontsize=8, rotation=90, va="bottom")
    else:
        ax.axhline(x, color="grey", linestyle="--", linewidth=1)
        ax.text(ax.get_xlim()[0], x, f" {label}", color="grey", fontsize=8, va="bottom")


def latency(data: Data) -> Figure | None:
    lat, vis = data.get("latency", {}), data.get("visible", {})
    if not lat and not vis:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    left, right = axes
    for label, entry in lat.items():
        if isinstance(entry, dict) and "samples_ms" in entry:
            _ecdf(left, entry["samples_ms"], label.replace("append → staged ", ""))
    left.set_title("append → staged (sidecar watch, XREAD on the stream)")
    for x, text in ((10, "p50 target 10 ms"), (50, "p99 target 50 ms")):
        _target(left, x, text)
    for key, entry in vis.items():
        name = key.replace("completion_", "completion, ").replace("late_", "late write, ") + " props"
        _ecdf(right, entry["samples_ms"], name)
    right.set_title("completion / late write → visible (Celery worker, PostgreSQL)")
    for x, text in ((200, "p99 target 200 ms (1,000 props)"), (1000, "p99 target 1 s (late)")):
        _target(right, x, text)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("fraction of samples ≤ x")
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle("Latency distributions (empirical CDF)")
    return fig


def cost(data: Data) -> Figure | None:
    growth, vis = data.get("growth", {}), data.get("visible", {})
    if not growth and not vis:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, key, title, unit in (
        (axes[0], "files", "ingest time against files (2 lines each)", "files"),
        (axes[1], "versions", "apply time against versions (10 properties, PostgreSQL)", "versions"),
    ):
        series = growth.get(key)
        if not series:
            ax.set_visible(False)
            continue
        xs = [n for n, _ in series["measured"]]
        ys = [s for _, s in series["measured"]]
        ax.plot(xs, ys, "o-", label=f"measured (slope {series['slope']:.2f})")
        if series["skipped"]:
            px = [xs[-1]] + [n for n, _ in series["skipped"]]
            py = [ys[-1]] + [s for _, s in series["skipped"]]
            ax.plot(px, py, "x:", color="grey", label="not run: linear prediction")
        ref_x = [xs[0], (series["skipped"][-1][0] if series["skipped"] else xs[-1])]
        ax.plot(ref_x, [ys[-1] * x / xs[-1] for x in ref_x], "--", color="grey", alpha=0.5, label="linear")
        ax.set_title(title)
        ax.set_xlabel(unit)
        ax.set_ylabel("seconds")
    ax = axes[2]
    sizes = sorted(int(k.split("_")[1]) for k in vis if k.startswith("completion_"))
    if sizes:
        p50 = [vis[f"completion_{n}"]["summary"]["p50_ms"] for n in sizes]
        p99 = [vis[f"completion_{n}"]["summary"]["p99_ms"] for n in sizes]
        floor = [vis[f"completion_{n}"]["floor_ms"] for n in sizes]
        ax.plot(sizes, p50, "o-", label="completion → visible p50")
        ax.plot(sizes, p99, "o-", label="completion → visible p99")
        ax.plot(sizes, floor, "s--", label="floor: bulk insert of the rows")
        ax.set_title("completion → visible against version size")
        ax.set_xlabel("properties in the version")
        ax.set_ylabel("ms")
    else:
        ax.set_visible(False)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Cost against size (log-log; the dashed grey line has slope 1)")
    return fig


def throughput(data: Data) -> Figure | None:
    ing, app = data.get("ingest", {}), data.get("apply", {})
    if not ing and not app:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    if ing:
        labels = ["naive loop", "Ingestor, one file", "watcher, 8 writers", "floor: parse + XADD"]
        values = [
            ing["naive_lines_per_s"],
            ing["real_lines_per_s"],
            ing["live_lines_per_s"],
            ing["floor_lines_per_s"],
        ]
        bars = axes[0].barh(labels, values, color=["#bbb", "#4c72b0", "#4c72b0", "#55a868"])
        axes[0].bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8, padding=3)
        axes[0].axvline(ing["floor_lines_per_s"] / 2, color="grey", linestyle="--", linewidth=1)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("lines/s (log scale); dashed: target = 50% of floor")
        axes[0].set_title("ingest throughput")
    else:
        axes[0].set_visible(False)
    if app:
        labels, values, colors = [], [], []
        for kind in ("sqlite", "postgresql"):
            if kind in app:
                labels += [f"{kind}: 2 workers", f"{kind}: floor (Core bulk insert)"]
                values += [app[kind]["apply_vps"], app[kind]["floor_vps"]]
                colors += ["#4c72b0", "#55a868"]
        bars = axes[1].barh(labels, values, color=colors)
        axes[1].bar_label(bars, labels=[f"{v:,.1f}" for v in values], fontsize=8, padding=3)
        axes[1].set_xlabel("versions of 100 properties per second")
        axes[1].set_title("apply throughput (target: ≥ 30% of floor)")
    else:
        axes[1].set_visible(False)
    fig.tight_layout()
    return fig


def search(data: Data) -> Figure | None:
    found = data.get("search", {}).get("queries")
    if not found:
        return None
    names = [n for n in found if "no_index" in found[n]]  # the filters (facets and exports: rows only)
    fig, ax = plt.subplots(figsize=(11, 4.2))
    xs = range(len(names))
    indexed = [found[n]["indexed"]["p50_ms"] for n in names]
    bare = [found[n]["no_index"]["p50_ms"] for n in names]
    b1 = ax.bar([x - 0.2 for x in xs], indexed, 0.4, label="with the property_index indexes")
    b2 = ax.bar([x + 0.2 for x in xs], bare, 0.4, label="indexes dropped (floor)", color="#bbb")
    ax.bar_label(b1, labels=[f"{v:.0f}" for v in indexed], fontsize=8)
    ax.bar_label(b2, labels=[f"{v:.0f}" for v in bare], fontsize=8)
    ax.set_xticks(list(xs), [f"{n}\n({found[n]['count']:,} matches)" for n in names], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("p50 ms (log scale)")
    ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="target p50 50 ms (selective)")
    versions = data["search"].get("versions", 0)
    ax.set_title(
        f"search on PostgreSQL: {versions:,} versions, {versions // 10:,} datasets "
        "(list_versions: count + first page)"
    )
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return fig


def memory(data: Data) -> Figure | None:
    mem = data.get("memory")
    if not mem:
        return None
    fig, ax = plt.subplots(figsize=(11, 4))
    for key, label in (("reference", "empty root"), ("folders", "many folders"), ("big", "huge file")):
        entry = mem.get(key)
        if entry:
            xs = [t for t, _ in entry["timeline"]]
            ys = [r * MB_PER_MIB for _, r in entry["timeline"]]
            ax.plot(xs, ys, label=f"{label} (peak {entry['peak_mib'] * MB_PER_MIB:.0f} MB)")
    for y, text in ((150, "target 150 MB (folders)"), (200, "target 200 MB (huge file)")):
        ax.axhline(y, color="grey", linestyle="--", linewidth=1)
        ax.text(0, y, f" {text}", color="grey", fontsize=8, va="bottom")
    ax.set_xlabel("seconds since the watcher started")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(0, 220)
    ax.set_title("sidecar watch resident memory")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, alpha=0.3)
    return fig


PLOTS: dict[str, Callable[[Data], Figure | None]] = {
    "latency": latency,
    "cost": cost,
    "throughput": throughput,
    "search": search,
    "memory": memory,
}
