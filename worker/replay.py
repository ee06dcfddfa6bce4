"""`sidecar replay`: read sidecar files again from the start, stage what was missed, apply.

Replay goes through the same path as the watcher (`Ingestor`), reading from byte 0 instead of
the checkpoint. The staging script skips lines already staged (same line number and bytes, in
the unchanged start of the file), so replaying what was already applied stages nothing and the
re-apply that follows changes nothing. Lines that Redis lost (a crash with `appendfsync
everysec`, a flushed database) are staged again and applied in file order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from .applying import apply_target, version_completed
from .checksums import check_execution
from .errors import ConfigError, NotFound
from .ingest import JSONL_NAMES, PER_OUTPUT_SUFFIX, Ingestor, inside_root, sidecar_kind
from .merge import merge
from .records import Entry, LineOutcome
from .staging import Staging
from .store import finished, queries
from .tail import read_new
from .uris import Target

Progress = Callable[[int, int, int], None]


@dataclass
class ReplaySummary:
    """What a replay read, staged and applied (or, dry, would have)."""

    files: int = 0
    lines: int = 0
    rejects: int = 0
    targets: set[str] = field(default_factory=set)
    applied: int = 0
    changes: list[str] = field(default_factory=list)  # dry run: one line per key that would change

    def report(self, dry_run: bool) -> str:
        versions = sorted(t for t in self.targets if t.count("/") == 3)
        verb = "would touch" if dry_run else "touched"
        head = (
            f"{self.files} files, {self.lines} lines, {self.rejects} rejects; {verb} {len(versions)} versions"
        )
        if not dry_run:
            head += f"; {self.applied} entries applied"
        return "\n".join([head, *(f"  {v}" for v in versions)])


def sidecar_files(root: Path, paths: Iterable[Path], execution: str | None) -> list[Path]:
    """The sidecar files named by `paths` (files, or folders walked without following links)."""
    found: list[Path] = []
    for given in paths:
        path = given.resolve() if not given.is_absolute() else given
        if not inside_root(root, path):
            raise ConfigError("PATH", f"{given} is not inside the root {root}")
        if path.is_dir() and not path.is_symlink():
            found.extend(_walk(root, path))
        elif sidecar_kind(root, path):
            found.append(path)
    if execution is not None:
        found = [p for p in found if p.relative_to(root).parts[0] == execution]
    return sorted(set(found))


def _walk(root: Path, folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in filenames:
            if name in JSONL_NAMES or name.endswith(PER_OUTPUT_SUFFIX):
                path = Path(dirpath) / name
                if sidecar_kind(root, path) and not path.is_symlink():
                    yield path
        dirnames.sort()


def replay(
    engine: Engine,
    staging: Staging,
    ingestor: Ingestor,
    files: list[Path],
    *,
    version: Target | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ReplaySummary:
    """Replay `files` (only those that mention `version`, if given); apply what became due."""
    summary = ReplaySummary()
    if ingestor.finished is None:
        # A file retention took out of Redis has its checkpoint and line digests in the database:
        # with them, the lines already staged are skipped as before (and put back in Redis).
        ingestor.finished = lambda file: finished.find(engine, file)
    if version is not None:
        files = [f for f in files if _mentions(f, version.key)]
    for i, path in enumerate(files, 1):
        if dry_run:
            _dry_file(engine, staging, ingestor, path, summary)
        else:
            stats = ingestor.ingest(path, from_start=True)
            summary.files += stats.files
            summary.lines += stats.lines
            summary.rejects += stats.rejects
            summary.targets |= stats.due
        if progress:
            progress(i, len(files), summary.lines)
    if not dry_run:
        # Re-apply what the files touched; the watermark makes this a no-op where nothing is new.
        for key in sorted(summary.targets):
            target = Target.parse(key)
            summary.applied += apply_target(engine, staging, target).applied
            if target.kind == "execution":
                # Applied here, not by a worker: read its new datums' checksums here too.
                check_execution(engine, ingestor.root, target.execution)
    return summary


def _mentions(path: Path, uri: str) -> bool:
    needle = uri.encode()
    with open(path, "rb") as f:
        return any(needle in chunk for chunk in iter(lambda: f.read(1 << 20), b""))


def _dry_file(
    engine: Engine, staging: Staging, ingestor: Ingestor, path: Path, summary: ReplaySummary
) -> None:
    """Read a file as replay would and record, key by key, what staging it would change."""
    rel = path.relative_to(ingestor.root)
    if sidecar_kind(ingestor.root, path) != "jsonl":
        summary.files += 1  # per-output files hold one datum: counted, not diffed
        return
    execution = rel.parts[0]
    raw = staging.line_digests(str(rel))
    record = None
    if raw is None and staging.load_state(str(rel)) is None and staging.ever_forgot():
        record = finished.find(engine, str(rel))  # retention took it out of Redis
    final = staging.is_done(Target.for_execution(execution)) or bool(record and record.completed_ms)
    outcomes: list[LineOutcome] = []
    with open(path, "rb") as f:
        state = None
        while True:
            result = read_new(f, os.fstat(f.fileno()), state, line_limit=ingestor.line_limit, final=final)
            outcomes += [
                ingestor.outcome(line, str(rel), execution, log_reject=False) for line in result.lines
            ]
            state = result.state
            if result.at_eof:
                break
    summary.files += 1
    summary.lines += len(outcomes)
    summary.rejects += sum(1 for o in outcomes if o.reject is not None)
    digests = bytearray(raw or (record.digests if record else b""))
    new_entries = [e for o in _would_stage(digests, outcomes) for e in o.entries]
    _diff(engine, staging, new_entries, summary)


def _would_stage(digests: bytearray, outcomes: list[LineOutcome]) -> list[LineOutcome]:
    """The staging script's skip rule, read-only: the unchanged start of the file is skipped."""
    staged = []
    for outcome in outcomes:
        pos = (outcome.number - 1) * 8
        seen = bytes(digests[pos : pos + 8])
        if seen == outcome.digest:
            continue
        if seen:
            del digests[pos:]
        digests.extend(b"\0" * (pos - len(digests)))  # SETRANGE pads a gap with zero bytes
        digests[pos : pos + 8] = outcome.digest
        staged.append(outcome)
    return staged


def _diff(engine: Engine, staging: Staging, entries: list[Entry], summary: ReplaySummary) -> None:
    by_target: dict[Target, list[Entry]] = {}
    for entry in entries:
        by_target.setdefault(entry.target, []).append(entry)
    with Session(engine) as session:
        for target, group in by_target.items():
            summary.targets.add(target.key)
            if target.kind == "execution":
                summary.changes.append(f"{target.key}: {len(group)} datum entries would be staged")
                continue
            if target.kind == "version" and not version_completed(session, staging, target):
                summary.changes.append(f"{target.key}: {len(group)} entries staged until it completes")
                continue
            before = _current(session, target)
            after = before
            for entry in group:
                if entry.op == "set":
                    after, _ = merge(after, entry.metadata)
            # Net effect: merging "after" (with nulls for removed keys) into "before".
            _, changes = merge(before, {k: after.get(k) for k in {**before, **after}})
            summary.changes += [f"{target.key}: {c.key}: {c.old!r} -> {c.new!r}" for c in changes]


def _current(session: Session, target: Target) -> dict[str, Any]:
    try:
        kind, owner_id = queries.find_by_uri(session, target.key)
    except NotFound:
        return {}
    owner = (
        queries.get_dataset(session, owner_id)
        if kind == "dataset"
        else queries.get_version(session, owner_id)
    )
    return dict(owner.properties or {})


def terminal_progress(stream: TextIO = sys.stderr) -> Progress | None:
    """A one-line progress bar on a terminal; None when not on one."""
    if not stream.isatty():
        return None

    def show(done: int, total: int, lines: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} files, {lines} lines")
        if done == total:
            stream.write("\n")
        stream.flush()

    return show
