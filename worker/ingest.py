"""Reading one sidecar file from its checkpoint and staging what it holds.

Used by the watcher (live) and by replay. The event that led here only means "go and read this
file to its end": a doubled or missed event changes nothing, because the checkpoint says where
reading resumes, and the checkpoint moves only in the same Redis script that stages the lines.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from . import metrics
from .datum_keys import drop_bad_aliases
from .errors import InvalidEntry
from .records import LineOutcome, Reject, Source, line_digest, parse_datum_object, parse_line
from .staging import Sent, Staging, now_iso
from .store.finished import FinishedRecord
from .tail import FileState, Line, read_new
from .uris import Target

log = logging.getLogger(__name__)

JSONL_NAMES = ("valohai.metadata.jsonl", "outputs.metadata.jsonl")
# One staging script call per 128 KiB of lines: ~5 ms of Redis time (a script blocks every other
# client, the Celery broker on the same Redis included). With the next batch parsed while Redis
# runs this one, 128 KiB was faster than 64, 256 or 512 KiB (75-78k against 69-74k lines/s here).
DEFAULT_BATCH_BYTES = 128 << 10
# A sidecar file that is there but cannot be read: a reject naming it (`Ingestor._unreadable`).
UNREADABLE = (PermissionError, IsADirectoryError)
PER_OUTPUT_SUFFIX = ".metadata.json"
# The database's record of a file whose staging state retention took out of Redis (None: none).
FindFinished = Callable[[str], FinishedRecord | None]


@dataclass
class IngestStats:
    """Counts for one or many ingests."""

    files: int = 0
    lines: int = 0
    entries: int = 0
    rejects: int = 0
    rewrites: int = 0
    pending_bytes: int = 0  # bytes after the checkpoint (a held partial line, or not read yet)
    read_bytes: int = 0  # bytes of the lines read (what the watcher's ReadQueue orders by)
    unread: bool = False  # stopped early (budget or stop): read the file again to go on
    # Targets made due, by the file whose lines made them due. Kept apart because the watcher
    # enqueues each file's on its own: with `ingest(carry=True)` one call's stats also count the
    # batch carried over from the file read before, and a late line's one target sent together
    # with a bulk file's hundreds would be batched with them, behind the whole load.
    due_by_file: dict[str, set[str]] = field(default_factory=dict)

    @property
    def due(self) -> set[str]:
        """Every target made due, whatever the file."""
        return set().union(*self.due_by_file.values())

    def made_due(self, file: str, targets: Iterable[str]) -> None:
        targets = set(targets)
        if targets:
            self.due_by_file.setdefault(file, set()).update(targets)

    def add(self, other: IngestStats) -> None:
        self.files += other.files
        self.lines += other.lines
        self.entries += other.entries
        self.rejects += other.rejects
        self.rewrites += other.rewrites
        self.pending_bytes += other.pending_bytes
        self.read_bytes += other.read_bytes
        self.unread |= other.unread
        for file, targets in other.due_by_file.items():
            self.made_due(file, targets)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run a block with the cyclic garbage collector off, and turn it back on after.

    Parsing builds several dicts per line that die by reference count, never in a cycle, yet each
    allocation counts towards the collector's next pass: a 1,000,000-line file set off ~70 full
    passes over every object in the process, a quarter of ingest's time. A block that the caller
    bounds (one file, or one budget of it) runs without them; whatever cycle it leaves is
    collected by the first pass after. Only the thread that turned the collector off turns it on,
    so two threads inside at once can end a pause early, never leave it off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def sidecar_kind(root: Path, path: Path) -> str | None:
    """'jsonl' for an execution's metadata file, 'per-output' for `<output>.metadata.json`, else None."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return None
    if len(parts) == 2 and parts[1] in JSONL_NAMES:
        return "jsonl"
    if len(parts) >= 2 and parts[-1].endswith(PER_OUTPUT_SUFFIX) and len(parts[-1]) > len(PER_OUTPUT_SUFFIX):
        return "per-output"
    return None


def inside_root(root_real: Path, path: Path) -> bool:
    """True if `path`, with every symbolic link resolved, is still under the root."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(root_real)
    except OSError:
        return False


@dataclass
class _InFlight:
    """A batch sent to the staging script whose reply has not been read yet."""

    sent: Sent
    file: str  # relative to the root
    outcomes: list[LineOutcome]
    mtime: float  # the file's, when it was read (for the append → staged metric)


class Ingestor:
    """Reads sidecar files under one root into the staging area."""

    def __init__(
        self,
        root: Path,
        staging: Staging,
        *,
        line_limit: int,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        finished: FindFinished | None = None,
    ) -> None:
        self.root = root.resolve()
        self.staging = staging
        self.line_limit = line_limit
        self.batch_bytes = batch_bytes
        # Where a file with no checkpoint in Redis is looked up (retention took it out): without
        # it, such a file is read from the start as a new one.
        self.finished = finished
        self.root_id = f"{socket.gethostname()}:{self.root}"
        self._carried: _InFlight | None = None  # see `ingest(carry=True)`
        self._bad_names: set[str] = set()  # paths refused by `_utf8_name`, rejected once
        self._unreadable_seen: dict[str, int | None] = {}  # file -> errno of its recorded reject
        self._forgot = False  # retention has forgotten something (see Staging.ever_forgot)

    def _utf8_name(self, path: Path) -> bool:
        """Whether the file's path is text every store can hold. A folder or file named with
        bytes that are not UTF-8 (Python reads them as surrogates) cannot become an execution
        id, a datum path or a Redis key: it is a reject, recorded once per process, not a
        crash at every scan."""
        rel = str(path.relative_to(self.root))
        try:
            rel.encode("utf-8")
            return True
        except UnicodeEncodeError:
            pass
        if rel not in self._bad_names:
            self._bad_names.add(rel)
            shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
            reason = "the file's path is not valid UTF-8, so it is not read (rename it)"
            log.warning("rejected %s: %s", shown, reason)
            self.staging.record_rejects([Reject(shown, 0, 0, reason, shown.split("/")[0], now_iso())])
            metrics.LINES_REJECTED.labels("bad_path").inc()
        return False

    def _unreadable(self, path: Path, exc: OSError) -> None:
        """A sidecar file that cannot be opened or read (permission denied, a directory or a link
        where a file was): a reject naming the file, recorded once per cause per process (not at
        every scan), and nothing staged. Once the file reads again its lines are staged as usual."""
        rel = str(path.relative_to(self.root))
        if rel in self._unreadable_seen and self._unreadable_seen[rel] == exc.errno:
            return
        self._unreadable_seen[rel] = exc.errno
        what = {errno.ELOOP: "a symbolic link (links are not followed)"}.get(exc.errno or 0, exc.strerror)
        reason = f"the file cannot be read: {what}"
        log.warning("rejected %s: %s", rel, reason)
        self.staging.record_rejects(
            [Reject(rel, 0, 0, reason, path.relative_to(self.root).parts[0], now_iso())]
        )
        metrics.LINES_REJECTED.labels("unreadable").inc()

    def settle(self) -> IngestStats:
        """Wait for a batch carried over by `ingest(carry=True)`: its lines and due targets."""
        stats = IngestStats()
        self._settle_carried(stats)
        return stats

    def ingest(
        self,
        path: Path,
        *,
        from_start: bool = False,
        budget: int | None = None,
        stop: Callable[[], bool] | None = None,
        carry: bool = False,
    ) -> IngestStats:
        """Stage whatever is new in one sidecar file. `from_start` is for replay.

        With a `budget` (bytes) or a `stop` callable, reading may end early, between two staged
        batches; `stats.unread` then says the file has more to read from its checkpoint.

        `carry=True` (the watcher): return without waiting for the last batch's reply, so that
        Redis runs it while the next call reads and parses. The next call (or `settle`) waits for
        it before it sends anything, and its stats then count that batch's lines and due targets;
        if that batch failed, the next call raises, and the file it came from is read again from
        its checkpoint at the next scan, as after any failed batch.
        """
        kind = sidecar_kind(self.root, path)
        stats = IngestStats()
        if kind is None or not inside_root(self.root, path) or not self._utf8_name(path):
            self._settle_carried(stats)
            return stats
        try:
            if kind == "jsonl":
                with gc_paused():
                    self._ingest_jsonl(
                        path, stats, from_start=from_start, budget=budget, stop=stop, carry=carry
                    )
            else:
                self._settle_carried(stats)
                self._ingest_per_output(path, stats)
        except FileNotFoundError:
            return stats  # removed between the event and the read: nothing to stage
        except UNREADABLE as exc:
            self._unreadable(path, exc)
            return stats
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # O_NOFOLLOW refused a link where the file was
                raise
            self._unreadable(path, exc)
            return stats
        if self._unreadable_seen:
            self._unreadable_seen.pop(str(path.relative_to(self.root)), None)
        stats.files = 1
        return stats

    # -- valohai.metadata.jsonl ------------------------------------------------------------

    def _ingest_jsonl(
        self,
        path: Path,
        stats: IngestStats,
        *,
        from_start: bool,
        budget: int | None,
        stop: Callable[[], bool] | None,
        carry: bool,
    ) -> None:
        rel = str(path.relative_to(self.root))
        execution = path.relative_to(self.root).parts[0]
        if self._carried is not None and self._carried.file == rel:
            # This file's own batch: its checkpoint must be in Redis before it is loaded.
            self._settle_carried(stats)
        current, record = self._checkpoint(rel)
        state = FileState.from_json(current) if current and not from_start else None
        # The checkpoint the next batch is read from, which the staging script checks is still
        # the file's (retention may take it out of Redis meanwhile). Replay rewinds on purpose.
        expect: str | None = None if from_start else (current or "")
        start = state.offset if state else 0
        final = False
        # One batch is in flight while the next is read and parsed: Redis runs the staging script
        # of batch N while Python parses batch N+1. Batch N+1 is sent only once N's reply is in
        # (N may be another file's, carried over from the call before).

        # O_NOFOLLOW: the file itself must not be a link (the folders were checked by inside_root).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            with os.fdopen(fd, "rb") as f:
                while True:
                    st = os.fstat(f.fileno())
                    result = read_new(
                        f, st, state, line_limit=self.line_limit, final=final, max_bytes=self.batch_bytes
                    )
                    if result.rewritten:
                        stats.rewrites += 1
                        metrics.FILE_REWRITES.inc()
                        log.info("%s was rewritten or replaced; reading it again from the start", rel)
                        start = 0
                    outcomes = [self.outcome(line, rel, execution) for line in result.lines]
                    stats.read_bytes += sum(line.length for line in result.lines)
                    self._settle_carried(stats)
                    if result.lines or result.state != state:
                        # The batch and the checkpoint after it go together, in one script.
                        state_json = result.state.to_json()
                        if record is not None:
                            self._restore(record)  # something new in a finished file
                            record = None
                        sent = self.staging.send_lines(
                            rel,
                            execution,
                            outcomes,
                            state_json,
                            expect=expect,
                            root=self.root_id,
                        )
                        expect = state_json
                        self._carried = _InFlight(sent, rel, outcomes, st.st_mtime)
                    state = result.state
                    stats.pending_bytes = max(0, st.st_size - state.offset)
                    if result.at_eof:
                        # A last line without its newline is held until the execution completes.
                        if result.partial and not final and self._completed(execution, record):
                            final = True
                            continue
                        break
                    # Between two batches is a safe place to stop: everything read is checkpointed
                    # once the batch in flight is settled.
                    if (budget is not None and state.offset - start >= budget) or (
                        stop is not None and stop()
                    ):
                        stats.unread = True
                        break
            if not carry:
                self._settle_carried(stats)
        except BaseException:
            # The batch in flight ran or not, as a whole: its file's next read starts from
            # whichever checkpoint Redis holds. (If it was another file's, the targets it made
            # due wait for the watcher's sweep.)
            if self._carried is not None:
                self._carried.sent.abandon()
                self._carried = None
            raise

    def _checkpoint(self, rel: str) -> tuple[str | None, FinishedRecord | None]:
        """A file's checkpoint: Redis's, else the database's record of it as finished (returned
        too, to be put back in Redis before anything new of the file is staged)."""
        current = self.staging.load_state(rel)
        if current is not None or self.finished is None:
            return current, None
        if not self._forgot:
            self._forgot = self.staging.ever_forgot()  # once true, true for good
            if not self._forgot:
                return None, None
        record = self.finished(rel)
        return (record.state or None, record) if record is not None else (None, None)

    def _restore(self, record: FinishedRecord) -> None:
        """Put a finished file's state back in Redis: its checkpoint, line digests, and its
        execution's completion flags, so a late line is staged as it would have been before."""
        self.staging.restore(
            record.file,
            record.state,
            record.digests,
            record.execution,
            root=self.root_id,
            completed_ms=record.completed_ms,
            flags=record.flags,
        )

    def _completed(self, execution: str, record: FinishedRecord | None) -> bool:
        """Whether the execution completed (its flag, or the finished record not put back yet)."""
        if record is not None and record.completed_ms is not None:
            return True
        return self.staging.is_done(Target.for_execution(execution))

    def _settle_carried(self, stats: IngestStats) -> None:
        """Wait for the batch in flight, if any; count it and its due targets in `stats`."""
        batch, self._carried = self._carried, None
        if batch is None:
            return
        stats.made_due(batch.file, batch.sent.wait())
        self._count(batch.outcomes, stats)
        if batch.outcomes:
            metrics.APPEND_TO_STAGED.observe(max(0.0, time.time() - batch.mtime))

    def outcome(self, line: Line, rel: str, execution: str, *, log_reject: bool = True) -> LineOutcome:
        """What one line becomes: its entries, or a reject saying where and why."""
        outcome = LineOutcome(line.number, line_digest(line.data))
        source = Source("sidecar", execution, rel, line.number, line.offset)
        if line.data is None:
            reason = f"line longer than the limit of {self.line_limit} bytes; skipped"
            outcome.reject = self._reject(source, reason, log_reject)
            return outcome
        problems: list[str] = []
        try:
            outcome.entries = parse_line(line.data, source, problems)
        except InvalidEntry as exc:
            outcome.reject = self._reject(source, str(exc), log_reject)
            return outcome
        # A malformed alias is dropped like a bad version item: the rest of the line applies.
        alias_problem = drop_bad_aliases(outcome.entries)
        if alias_problem:
            problems.append(alias_problem)
        if problems:
            # The line is staged without its bad version items or alias, and rejected for them.
            outcome.reject = self._reject(source, "; ".join(problems), log_reject)
        return outcome

    def _reject(self, source: Source, reason: str, log_it: bool = True) -> Reject:
        # Logged once, with where and why; never the line itself (it may hold secrets).
        if log_it:
            log.warning("rejected %s: %s", source.where(), reason)
        return Reject(source.file, source.line, source.offset, reason, source.execution, now_iso())

    # -- <output>.metadata.json ------------------------------------------------------------

    def _ingest_per_output(self, path: Path, stats: IngestStats) -> None:
        rel_path = path.relative_to(self.root)
        rel, execution = str(rel_path), rel_path.parts[0]
        output = str(Path(*rel_path.parts[1:]))[: -len(PER_OUTPUT_SUFFIX)]
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            signature = orjson.dumps([st.st_ino, st.st_size, st.st_mtime_ns]).decode()
            current, record = self._checkpoint(rel)
            if current == signature:
                return
            data = f.read(self.line_limit + 1)
        stats.read_bytes = len(data)
        source = Source("sidecar", execution, rel, 1, 0)
        outcome = LineOutcome(1, line_digest(data))
        if len(data) > self.line_limit:
            outcome.reject = self._reject(source, f"file larger than the limit of {self.line_limit} bytes")
        else:
            problems: list[str] = []
            try:
                outcome.entries = parse_datum_object(data, output, source, problems)
                alias_problem = drop_bad_aliases(outcome.entries)
                if alias_problem:
                    problems.append(alias_problem)
            except InvalidEntry as exc:
                # The writer may still be writing it: judge it when the execution has completed.
                if not self._completed(execution, record):
                    return
                outcome.reject = self._reject(source, str(exc))
            if problems:
                outcome.reject = self._reject(source, "; ".join(problems))
        if record is not None:
            self._restore(record)
        expect = current or ""
        due = self.staging.stage_lines(rel, execution, [outcome], signature, expect=expect, root=self.root_id)
        stats.made_due(rel, due)
        self._count([outcome], stats)

    @staticmethod
    def _count(outcomes: list[LineOutcome], stats: IngestStats) -> None:
        entries = sum(len(o.entries) for o in outcomes)
        rejects = [o.reject for o in outcomes if o.reject is not None]
        stats.lines += len(outcomes)
        stats.entries += entries
        stats.rejects += len(rejects)
        metrics.LINES_INGESTED.inc(len(outcomes) - len(rejects))
        metrics.ENTRIES_STAGED.inc(entries)
        for reject in rejects:
            metrics.LINES_REJECTED.labels(metrics.reject_reason(reject.reason)).inc()
