"""Run the benchmarks: `python bench/run.py [--quick] [--only NAME ...]` (or `make bench [QUICK=1]`).

Prints one table, writes `bench/results/<timestamp>.json` and PNG plots next to it; a full run
(not `--quick`, not `--only`) also copies the plots to `docs/benchmarks/` and rewrites the table
and machine sections of `docs/benchmarks.md`. Needs the real Redis and PostgreSQL: `BENCH_REDIS_URL`
(default redis://127.0.0.1:6379/15) and `BENCH_DATABASE_URL` (default
postgresql://postgres@127.0.0.1:5432/test); it only uses its own key prefixes and schemas, and
removes them afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

# Run as a script (`python bench/run.py`): import the `bench` and `worker` packages from the repo.
_REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == _REPO / "bench":
    sys.path[0] = str(_REPO)

from bench import apply, growth, ingest, latency, memory, peers, pipeline, search, visible  # noqa: E402
from bench.common import DEFAULT_POSTGRES, DEFAULT_REDIS, Box, Context, Section, machine  # noqa: E402
from bench.report import print_table, update_docs  # noqa: E402

Bench = Callable[[Context], Section]

# name -> (function, seconds of the full run's time box, of the quick run's)
BENCHMARKS: dict[str, tuple[Bench, float, float]] = {
    "ingest": (ingest.run, 95, 12),
    "latency": (latency.run, 55, 10),
    "visible": (visible.run, 40, 15),  # ~15 s here: its workloads are fixed, not fitted
    "apply": (apply.run, 80, 12),
    "search": (search.run, 180, 12),  # generating 1,000,000 versions takes ~100 s of it here
    "memory": (memory.run, 45, 12),  # not scalable: the asked workload, ~30 s here
    "growth": (growth.run, 45, 10),
    # written → visible through a whole `sidecar up`, 8 rows of a fresh stack each (~3 s to start)
    "pipeline": (pipeline.run, 240, 60),
}
# Run only when asked (`--peers`, `make bench PEERS=1`, or `--only NAME`): their boxes come on top
# of BUDGET. peers: the pages of 1,000 against MLflow, ~4 minutes at 100,000 records here (MLflow's
# virtualenv is made on the first run, ~30 s more, within the same box).
OPTIONAL: dict[str, tuple[Bench, float, float]] = {
    "peers": (peers.run, 300, 120),
}
BUDGET = 540.0  # the boxes, seconds; they shrink when earlier benchmarks ran over. Setup and
# teardown outside the boxes took a few seconds in a full run; the whole must stay under 10 minutes.
RESULTS = _REPO / "bench" / "results"
DOCS = _REPO / "docs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run of a minute or so")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted({**BENCHMARKS, **OPTIONAL}),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join({**BENCHMARKS, **OPTIONAL})}",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also run the pages against MLflow (bench/peers; MLflow in its own virtualenv)",
    )
    parser.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update docs/benchmarks.md and docs/benchmarks/ (default: full runs only)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, files)")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="run nothing: redraw the plots and the table (and the docs, with --docs) from a results file",
    )
    args = parser.parse_args(argv)
    if args.render:
        return render(args.render, bool(args.docs))

    names = args.only or list(BENCHMARKS)
    if args.peers and "peers" not in names:
        names.append("peers")
    known = {**BENCHMARKS, **OPTIONAL}
    budget = BUDGET + sum(OPTIONAL[n][1] for n in names if n in OPTIONAL)
    update = args.docs if args.docs is not None else not (args.quick or args.only)
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    ctx = Context(
        quick=args.quick,
        redis_url=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS),
        postgres_url=os.environ.get("BENCH_DATABASE_URL", DEFAULT_POSTGRES),
        workdir=workdir,
    )
    started = datetime.now(UTC)
    wall = time.perf_counter()
    sections: list[Section] = []
    info = machine(ctx.redis_url, ctx.postgres_url)
    for i, name in enumerate(names):
        fn, full_s, quick_s = known[name]
        box = quick_s if args.quick else full_s
        if not args.quick:
            planned = sum(known[n][1] for n in names[i:])
            left = budget - 15 - (time.perf_counter() - wall)
            box *= max(0.3, min(1.0, left / planned))
        ctx.box = Box(box)
        print(f"[{time.perf_counter() - wall:6.1f} s] {name} (time box {box:.0f} s) ...", flush=True)
        load_before = os.getloadavg()[0]
        begin = time.perf_counter()
        try:
            section = fn(ctx)
        except Exception as exc:  # one broken benchmark must not hide the others' results
            traceback.print_exc()
            section = Section(name, error=f"{type(exc).__name__}: {exc}")
        finally:
            ctx.cleanup()
        section.seconds = time.perf_counter() - begin
        section.load = {"before": load_before, "after": os.getloadavg()[0], "box": box}
        sections.append(section)
        print(f"[{time.perf_counter() - wall:6.1f} s] {name} done in {section.seconds:.1f} s", flush=True)
    seconds = time.perf_counter() - wall

    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "started": started.isoformat(),
        "seconds": seconds,
        "mode": "quick" if args.quick else "full",
        "only": args.only,
        "machine": info,
        "sections": [s.to_json() for s in sections],
    }
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(result, indent=2, default=str))

    from bench.plots import make_plots  # matplotlib is only needed from here on

    plots = make_plots(result, RESULTS, stamp)
    print_table(result)
    print(f"\nwall time {seconds:.0f} s; results in {out.relative_to(_REPO)}")
    for plot in plots:
        print(f"plot {plot.relative_to(_REPO)}")
    if update:
        update_docs(result, plots, DOCS)
        print("docs/benchmarks.md and docs/benchmarks/*.png updated")
    if args.keep:
        print(f"scratch folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(s.error for s in sections) else 0


def render(path: Path, docs: bool) -> int:
    """Plots, table and (optionally) docs again from a results file of an earlier run."""
    from bench.plots import make_plots

    result = json.loads(path.read_text())
    plots = make_plots(result, path.parent, path.stem)
    print_table(result)
    if docs:
        update_docs(result, plots, DOCS)
        print("docs/benchmarks.md and docs/benchmarks/*.png updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
