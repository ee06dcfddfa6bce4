"""Shared by the scale, many-machines and soak tests: an oracle with history, database
readers, sidecar subprocesses, and the soak writer (run as `python -m tests.soak_oracle write ...`).

Lines are judged by `tests.oracle.classify` (the README's rules, independent of worker/) and final
values compared with its `same`. The fold is kept here because the soak also checks each key's
history: it needs the list of real changes, judged like the product judges them (a value of
another type is a change, `1` to `1.0` or `true`; equal values are not).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.oracle import classify as classify_line
from tests.oracle import same as json_equal

REPO = Path(__file__).resolve().parent.parent
JSONL = "valohai.metadata.jsonl"

# -- the oracle -----------------------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """No change to record: equal values of one type at the top level (as worker.merge judges)."""
    return type(a) is type(b) and bool(a == b)


def fold_into(state: dict[str, Any], metadata: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Shallow merge in place, null deletes; return (key, old, new) of every key that really changed."""
    changes: list[tuple[str, Any, Any]] = []
    for key, value in metadata.items():
        if value is None:
            if key in state:
                changes.append((key, state.pop(key), None))
        elif key not in state or not same(state[key], value):
            changes.append((key, state.get(key), value))
            state[key] = value
    return changes


def classify(raw: bytes) -> tuple[str, dict[str, Any]] | None:
    """(target key, metadata) of a valid dataset or dataset-version line, None for a reject.

    The soak writers produce no datum lines; one would count as a reject here."""
    found = classify_line(raw, "")
    if len(found) != 1 or not found[0][0].startswith("dataset://"):
        return None
    return found[0]


@dataclass
class Oracle:
    """Expected properties and history of every target, from the final content of sidecar files.

    Files must not share (target, key) pairs: then the order in which files are applied does not
    matter, and each key's history is that of the one file that sets it.
    """

    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (target, key) -> [(file, line, old, new), ...] in file order
    history: dict[tuple[str, str], list[tuple[str, int, Any, Any]]] = field(default_factory=dict)
    entries: Counter[str] = field(default_factory=Counter)  # valid lines per target
    rejects: int = 0
    owner: dict[tuple[str, str], str] = field(default_factory=dict)

    def add_file(self, rel: str, content: bytes) -> None:
        """Fold one file's complete lines (its content must end with a newline)."""
        assert not content or content.endswith(b"\n"), f"{rel} ends with a partial line"
        per_file: dict[str, dict[str, Any]] = {}
        for number, raw in enumerate(content.split(b"\n")[:-1], 1):
            if not raw.strip():
                continue
            parsed = classify(raw.rstrip(b"\r"))
            if parsed is None:
                self.rejects += 1
                continue
            target, metadata = parsed
            self.entries[target] += 1
            for key in metadata:
                other = self.owner.setdefault((target, key), rel)
                assert other == rel, f"test design error: {rel} and {other} both set {key} of {target}"
            state = per_file.setdefault(target, {})
            for key, old, new in fold_into(state, metadata):
                self.history.setdefault((target, key), []).append((rel, number, old, new))
        for target, props in per_file.items():
            self.state.setdefault(target, {}).update(props)

    def add_root(self, root: Path) -> list[Path]:
        """Fold every `<root>/<execution>/valohai.metadata.jsonl`; return the files."""
        files = sorted(root.glob(f"*/{JSONL}"))
        for path in files:
            self.add_file(str(path.relative_to(root)), path.read_bytes())
        return files

    def versions(self) -> set[str]:
        return {t for t in self.entries if t.count("/") == 3}

    def datasets(self) -> set[str]:
        return {t for t in self.entries if t.count("/") == 2} | {t.rsplit("/", 1)[0] for t in self.versions()}


# -- the database, read back ----------------------------------------------------------------------


def db_state(engine: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every dataset and version in the database: uri -> (status, properties); datasets have status ""."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from worker.store.models import Dataset, DatasetVersion

    out: dict[str, tuple[str, dict[str, Any]]] = {}
    with Session(engine) as s:
        for ds in s.scalars(select(Dataset)):
            out[f"dataset://{ds.name}"] = ("", dict(ds.properties or {}))
        for v, name in s.execute(select(DatasetVersion, Dataset.name).join(Dataset)):
            out[f"dataset://{name}/{v.name}"] = (v.status, dict(v.properties or {}))
    return out


def db_history(engine: Any) -> dict[tuple[str, str], list[tuple[str, int, Any, Any]]]:
    """Recorded changes of datasets and versions: (uri, key) -> [(file, line, old, new), ...], in id order."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from worker.store.models import Dataset, DatasetVersion, PropertyChange

    with Session(engine) as s:
        names = {("dataset", d.id): f"dataset://{d.name}" for d in s.scalars(select(Dataset))}
        for v, name in s.execute(select(DatasetVersion, Dataset.name).join(Dataset)):
            names[("version", v.id)] = f"dataset://{name}/{v.name}"
        out: dict[tuple[str, str], list[tuple[str, int, Any, Any]]] = {}
        for row in s.scalars(select(PropertyChange).order_by(PropertyChange.id)):
            if row.owner_kind == "datum":
                continue
            uri = names[(row.owner_kind, row.owner_id)]
            src = row.source or {}
            change = (str(src.get("file")), int(src.get("line", 0)), row.old, row.new)
            out.setdefault((uri, row.key), []).append(change)
    return out


def differences(expected: Oracle, actual: dict[str, tuple[str, dict[str, Any]]]) -> list[str]:
    """What still differs between the database and the oracle, key by key (empty when equal)."""
    problems: list[str] = []
    for uri in sorted(expected.versions() | expected.datasets()):
        want = expected.state.get(uri, {})
        status, have = actual.get(uri, ("missing", {}))
        if uri.count("/") == 3 and status != "completed":
            problems.append(f"{uri}: status {status}")
        for key in sorted(set(want) | set(have)):
            if key not in have or key not in want or not json_equal(want[key], have[key]):
                wanted, got = want.get(key, "<absent>"), have.get(key, "<absent>")
                problems.append(f"{uri} {key}: expected {wanted!r}, got {got!r}")
    return problems


def converged(
    staging: Any, engine: Any, oracle: Oracle, roots: list[Path], processes: list[Sidecar], enqueue: Any
) -> bool:
    """For wait_until: nothing died, every line is staged, the database equals the oracle and
    nothing is due. Sweeps the due set on each call, in the place of a watcher (a task lost with a
    SIGKILLed worker would come back only after Celery's 900 s visibility timeout)."""
    for proc in processes:
        assert proc.alive(), f"{proc.args} exited with {proc.proc.returncode}:\n{proc.log()[-5000:]}"
    staging.sweep(enqueue.drain, older_than=1.0)
    missing = unstaged(staging, roots)
    assert not missing, f"not staged yet: {missing[:3]}"
    problems = differences(oracle, db_state(engine))
    assert not problems, f"{len(problems)} differences, e.g. {problems[:5]}"
    due = staging.due_targets(older_than=-1)
    assert not due, f"still due: {due}"
    return True


def assert_history(engine: Any, oracle: Oracle) -> None:
    """Each key's changes exactly once, in file order, from the right file and line."""
    history = db_history(engine)
    assert set(history) == set(oracle.history), set(history) ^ set(oracle.history)
    for key, changes in oracle.history.items():
        assert history[key] == changes, key


def unstaged(staging: Any, roots: list[Path]) -> list[str]:
    """Sidecar files whose checkpoint does not yet cover the whole file (empty when all is staged)."""
    offsets = {k.decode(): json.loads(v) for k, v in staging.redis.hgetall(staging.keys.offsets).items()}
    out = []
    for root in roots:
        for path in sorted(root.glob(f"*/{JSONL}")):
            rel = str(path.relative_to(root))
            size = path.stat().st_size
            if offsets.get(rel, {}).get("offset") != size:
                out.append(f"{rel}: staged up to {offsets.get(rel, {}).get('offset')}, size {size}")
    return out


# -- sidecar subprocesses -------------------------------------------------------------------------


class Sidecar:
    """One `sidecar <command>` subprocess in its own process group, logging to a file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        from tests.e2e_helpers import clean_env

        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()/sigkill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args],
            env=clean_env(env),
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sigkill(self) -> None:
        from tests.e2e_helpers import kill_group

        kill_group(self.proc)
        self._log.close()

    def stop(self) -> None:
        from tests.e2e_helpers import kill_group, stop_group

        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(18)  # SIGCONT, should a test have left it stopped
        if self.proc.poll() is None:
            stop_group(self.proc, timeout=30)
        kill_group(self.proc)  # anything left in its group
        self._log.close()


# -- the soak writer ------------------------------------------------------------------------------


def _value(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.15:
        return None  # deletes the key
    if roll < 0.45:
        return rng.randrange(-5, 50)
    if roll < 0.65:
        return rng.choice(["night", "day", "", "ünï", "x" * rng.randrange(1, 40)])
    if roll < 0.75:
        return rng.random() < 0.5
    if roll < 0.88:
        return [rng.randrange(5) for _ in range(rng.randrange(4))]
    return {"n": rng.randrange(3), "tags": {"a": rng.choice(["p", "q"])}}


def soak_line(rng: random.Random, execution: str, versions: list[str]) -> tuple[bytes, bool]:
    """One line for `execution`: (bytes with newline, valid?). Keys carry the execution id, so no two
    files ever set the same key of a target; within a file, keys collide often."""
    roll = rng.random()
    if roll < 0.04:
        return b'{"dataset-version": "' + rng.choice(versions).encode() + b'", "metad\n', False
    if roll < 0.06:
        bad = {"dataset-version": rng.choice(versions), "metadata": {"valohai.size": 1, f"{execution}.k0": 1}}
        return json.dumps(bad).encode() + b"\n", False
    keys = [f"{execution}.k{rng.randrange(6)}" for _ in range(rng.randrange(1, 4))]
    metadata = {k: _value(rng) for k in keys}
    version = rng.choice(versions)
    if roll < 0.22:
        doc = {"dataset": version.rsplit("/", 1)[0], "metadata": metadata}
    else:
        doc = {"dataset-version": version, "metadata": metadata}
    return json.dumps(doc).encode() + b"\n", True


def write_soak(
    root: Path, executions: list[str], versions: list[str], seed: int, stop_file: Path, limit: float
) -> int:
    """Append to and rewrite the files of `executions` until `stop_file` exists (or `limit` s pass).

    Rewrites are valohai-utils style (truncate and write the whole file; sometimes slowly, or as a
    new file renamed over the old one), or a truncation to an earlier line boundary followed by the
    rest written back; they only ever add lines: the earlier lines stay byte-identical
    and in place, so the final content is the whole truth and the oracle is the fold of its lines.
    Every line is finished before the writer exits."""
    rng = random.Random(seed)
    content = {e: bytearray() for e in executions}
    deadline = time.monotonic() + limit
    ops = 0
    while not stop_file.exists() and time.monotonic() < deadline:
        execution = rng.choice(executions)
        path = root / execution / JSONL
        path.parent.mkdir(exist_ok=True)
        lines = [soak_line(rng, execution, versions)[0] for _ in range(rng.randrange(1, 6))]
        data = b"".join(lines)
        roll = rng.random()
        if roll < 0.45:
            with open(path, "ab") as f:
                f.write(data)
        elif roll < 0.62:
            path.write_bytes(bytes(content[execution] + data))  # truncate + write, like valohai-utils
        elif roll < 0.72:
            # A replacement: a new file (a new inode) renamed over the old one.
            tmp = path.with_name(JSONL + ".tmp")
            tmp.write_bytes(bytes(content[execution] + data))
            os.replace(tmp, path)
        elif roll < 0.8:
            # A slow whole-file rewrite: readers see the file truncated, then growing back.
            whole = bytes(content[execution] + data)
            cuts = sorted(rng.randrange(len(whole)) for _ in range(2))
            with open(path, "wb") as f:
                for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True):
                    f.write(whole[a:b])
                    f.flush()
                    time.sleep(rng.uniform(0, 0.05))
        elif roll < 0.85 and content[execution]:
            # Truncated to an earlier line boundary, then the rest written back: the size drops
            # below the reader's offset for a moment.
            whole = bytes(content[execution])
            keep = whole.rfind(b"\n", 0, rng.randrange(len(whole))) + 1
            os.truncate(path, keep)
            time.sleep(rng.uniform(0, 0.05))
            with open(path, "ab") as f:
                f.write(whole[keep:] + data)
        elif roll < 0.95:
            cut = rng.randrange(1, len(data))  # a line written in two pieces: held until its newline
            with open(path, "ab") as f:
                f.write(data[:cut])
                f.flush()
                time.sleep(rng.uniform(0, 0.3))
                f.write(data[cut:])
        else:
            data = b"".join(soak_line(rng, execution, versions)[0] for _ in range(200))
            with open(path, "ab") as f:
                f.write(data)
        content[execution] += data
        ops += 1
        time.sleep(rng.uniform(0, 0.04))
    print(f"writer {seed}: {ops} writes, {sum(len(c) for c in content.values())} bytes", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak_oracle")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="the soak writer")
    w.add_argument("--root", type=Path, required=True)
    w.add_argument("--executions", required=True, help="comma-separated execution ids")
    w.add_argument("--versions", required=True, help="comma-separated dataset://name/version URIs")
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--stop-file", type=Path, required=True)
    w.add_argument("--limit", type=float, default=600.0)
    args = parser.parse_args(argv)
    return write_soak(
        args.root, args.executions.split(","), args.versions.split(","), args.seed, args.stop_file, args.limit
    )


if __name__ == "__main__":
    sys.exit(main())
