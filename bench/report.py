"""The results table (terminal and Markdown) and the generated part of docs/benchmarks.md."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:results:begin (written by bench/run.py; edit outside these markers) -->"
END = "<!-- bench:results:end -->"
COLUMNS = ("what", "workload", "measured", "floor", "ratio", "target", "verdict")
HEADERS = ("what", "workload (as run)", "measured", "floor (same run)", "ratio", "target", "verdict")
PLOT_TITLES = {
    "latency": "Latency distributions",
    "cost": "Cost against size",
    "throughput": "Throughput against the floors",
    "search": "Search with and without the indexes",
    "memory": "Watcher memory",
}


def rows(result: dict[str, Any]) -> list[dict[str, str]]:
    """Every table row of a run, with a row per benchmark that failed."""
    out: list[dict[str, str]] = []
    for section in result["sections"]:
        out.extend(section["rows"])
        if section["error"]:
            out.append(
                {
                    "what": section["name"],
                    "workload": "—",
                    "measured": f"error: {section['error'][:200]}",
                    "floor": "—",
                    "ratio": "—",
                    "target": "—",
                    "verdict": "NOT RUN",
                }
            )
    return out


def markdown_table(result: dict[str, Any]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows(result):
        values = [cell(row[c]) for c in COLUMNS]
        if row["verdict"] in ("MISSED", "NOT RUN"):
            values[-1] = f"**{values[-1]}**"
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def print_table(result: dict[str, Any]) -> None:
    print()
    print(markdown_table(result))
    missed = [r["what"] for r in rows(result) if r["verdict"] in ("MISSED", "NOT RUN")]
    if missed:
        print(f"\nmissed or not run: {', '.join(missed)}")


def machine_line(result: dict[str, Any]) -> str:
    m = result["machine"]
    return (
        f"{m['cpu'] or 'unknown CPU'}, {m['cores']} cores, {m['memory_gib']} GiB RAM; {m['os']}; "
        f"Python {m['python']}; Redis {m.get('redis') or '?'}; PostgreSQL {m.get('postgres') or '?'}; "
        f"load average {m['load_at_start']:.2f} when the run started (a shared machine)"
    )


def loads(result: dict[str, Any]) -> str:
    return ", ".join(f"{s['name']} {s['load']['before']:.1f}" for s in result["sections"] if s.get("load"))


def generated_block(result: dict[str, Any], plots: list[Path]) -> str:
    m = result["machine"]
    started = datetime.fromisoformat(result["started"]).strftime("%Y-%m-%d %H:%M UTC")
    commit = f"commit `{m['commit']}`" + (" with uncommitted changes in worker/" if m["dirty"] else "")
    missed = [r["what"] for r in rows(result) if r["verdict"] in ("MISSED", "NOT RUN")]
    parts = [
        BEGIN,
        "",
        "## Latest run",
        "",
        f"`bench/run.py` ({result['mode']}) on {started}, {commit}; wall time **{result['seconds']:.0f} s**.",
        "",
        f"Machine: {machine_line(result)}.",
        "",
        f"Load average before each benchmark (2 cores; other work was running): {loads(result)}.",
        "",
        markdown_table(result),
        "",
        f"Missed: {', '.join(missed)}." if missed else "Every target was met.",
        "",
        "### Plots",
        "",
    ]
    for plot in plots:
        name = plot.stem.split("-", 1)[1]
        parts += [f"![{PLOT_TITLES.get(name, name)}](benchmarks/{name}.png)", ""]
    parts.append(END)
    return "\n".join(parts)


SKELETON = f"""# Benchmarks

{BEGIN}
{END}
"""


def update_docs(result: dict[str, Any], plots: list[Path], docs: Path) -> None:
    """Copy the plots to docs/benchmarks/<name>.png and rewrite the generated block of the page."""
    folder = docs / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        shutil.copyfile(plot, folder / f"{plot.stem.split('-', 1)[1]}.png")
    page = docs / "benchmarks.md"
    text = page.read_text() if page.exists() else SKELETON
    if BEGIN not in text or END not in text:
        text = text.rstrip() + "\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(head + generated_block(result, plots) + tail)
