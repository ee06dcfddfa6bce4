"""The watcher: watchdog tells us which files to look at; a loop reads them from their checkpoints.

The event handler does nothing but note paths, so a missed, merged or doubled inotify event is
harmless: a periodic full scan (like Vector's) is the correctness backstop, because watchdog
drops the kernel's queue-overflow event without a word (watchdog issue 654).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy.exc
from sqlalchemy import Engine
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from . import connections
from .enqueue import Delivers, Enqueue, Sender, sender
from .errors import ConfigError
from .ingest import JSONL_NAMES, PER_OUTPUT_SUFFIX, Ingestor, IngestStats, sidecar_kind
from .readqueue import ReadQueue
from .retention import Retention
from .settings import Settings
from .staging import RedisError, Staging, Subscription
from .store import finished, outbox
from .store.finished import FinishedRecord

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
PASS_BYTES = 1 << 20  # read at most this much of one file per turn (8 batches of DEFAULT_BATCH_BYTES)
QUIET_BYTES = 2 << 10  # a queued file whose last read was smaller (a few lines) is quiet
MAX_WAIT = 0.25  # a file queued this long is overdue: read next, in turn with the smallest
SLICE_SECONDS = 0.25  # read queued files for this long, then see to completions, scans and sweeps
_CHANGES = frozenset({"created", "modified", "moved", "closed"})
# The events asked of inotify: not "opened" or "closed without writing", which our own reads
# raise (two per read). watchdog hands every event through three threads, each of which takes
# the interpreter's lock from the reading loop for a moment.
_EVENTS = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


class _Dirty(FileSystemEventHandler):
    """Notes which sidecar files (and new folders) to look at; never reads anything itself."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.paths: set[Path] = set()
        self.folders: set[Path] = set()
        self.wake = threading.Event()

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Our own reads raise "opened" and "closed_no_write" events: reacting to them would
        # make the watcher read forever. Deletions leave nothing to read.
        if event.event_type not in _CHANGES:
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if not raw:
                continue
            path = Path(os.fsdecode(raw))
            if event.is_directory:
                if event.event_type in ("created", "moved"):
                    self.add_folder(path)
            elif sidecar_kind(self.root, path):
                self.add(path)

    def add(self, path: Path) -> None:
        with self.lock:
            self.paths.add(path)
        self.wake.set()

    def add_folder(self, path: Path) -> None:
        # Files written before the folder's watch existed may never get an event of their own.
        with self.lock:
            self.folders.add(path)
        self.wake.set()

    def news_besides(self, current: Path, queued: ReadQueue) -> bool:
        """True if a file other than `current`, and not queued yet, has an event waiting (or a
        new folder does): most likely a quiet file with a new line, which the read queue would
        put first."""
        with self.lock:
            return bool(self.folders) or any(p != current and p not in queued for p in self.paths)

    def take(self) -> tuple[set[Path], set[Path]]:
        with self.lock:
            paths, folders = self.paths, self.folders
            self.paths, self.folders = set(), set()
            self.wake.clear()
        return paths, folders


class Watcher:
    """Watches a root of execution folders and stages their sidecar files until `stop` is set."""

    def __init__(
        self, settings: Settings, staging: Staging, enqueue: Enqueue | Sender, stop: threading.Event
    ) -> None:
        self.settings = settings
        self.root = settings.require_root().resolve()
        self.staging = staging
        self.enqueue = sender(enqueue, staging.due_targets)
        self.stop = stop
        self._engine: Engine | None = None  # made when first needed (see `_db`)
        self._deliveries_failing = False  # the last check of the due deliveries failed
        self._db_ready_at = -1e9  # when the database last had the tables (or -1e9: never seen)
        self.ingestor = Ingestor(
            self.root, staging, line_limit=settings.line_limit, finished=self._find_finished
        )
        self.retention = Retention(
            staging,
            self._db,
            retention_seconds=settings.retention_seconds,
            root=self.root,
            root_id=self.ingestor.root_id,
        )
        self.dirty = _Dirty(self.root)
        self.queue = ReadQueue(MAX_WAIT)
        self.last_scan = 0.0
        self.stats = IngestStats()
        self.pending: dict[Path, int] = {}  # bytes after each file's checkpoint, at its last read
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self) -> None:
        """Scan once, then follow events, rescanning every `rescan_interval` and sweeping the due set."""
        if not self.root.is_dir():
            raise ConfigError("SIDECAR_ROOT", f"{self.root} is not a folder")
        log.info("watching %s", self.root)
        observer = self._start_observer()
        pubsub = self._subscribe()
        try:
            self.scan()
            last_sweep = last_beat = 0.0
            while not self.stop.is_set():
                self.dirty.wake.wait(timeout=0 if self.queue else 0.25)
                self._drain()
                self._completions(pubsub)
                now = time.monotonic()
                if now - self.last_scan >= self.settings.rescan_interval:
                    self.scan()
                    self._retain()
                if now - last_sweep >= self.settings.sweep_after:
                    self._sweep()
                    last_sweep = now
                if now - last_beat >= HEARTBEAT_SECONDS:
                    self._beat()
                    last_beat = now
        finally:
            self._settle()
            if self._engine is not None:
                self._engine.dispose()
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            if pubsub is not None:
                pubsub.close()

    def scan(self) -> None:
        """Queue every sidecar file under the root: the backstop for events that never came.

        Queued, not read here: a scan of 10,000 files read in a row kept a quiet file's new
        line waiting for all of them; in the queue they take turns with it.
        """
        now = time.monotonic()
        found = set()
        for path in self._sidecar_files(self.root, depth=0):
            self.queue.add(path, now)
            found.add(path)
        # Forget the files gone since (their executions were cleaned up).
        self.pending = {path: self.pending.get(path, 0) for path in found}
        self.last_scan = now
        self._beat()

    def _drain(self) -> None:
        """Read queued files for one slice, taking in the files that events mark meanwhile.

        New events are taken between two files, not once per pass, so that a file with one new
        line goes ahead of the busy files still queued (see ReadQueue).
        """
        end = time.monotonic() + SLICE_SECONDS
        while not self.stop.is_set():  # when stopped, the rest is read again at the next start
            self._take_events()
            path = self.queue.pop(time.monotonic())
            if path is None:
                self._settle()
                return
            self._ingest(path)
            if time.monotonic() >= end:
                return

    def _take_events(self) -> None:
        paths, folders = self.dirty.take()
        for folder in folders:
            if folder.is_dir() and not folder.is_symlink():
                paths.update(self._sidecar_files(folder, depth=len(folder.relative_to(self.root).parts)))
        now = time.monotonic()
        for path in sorted(paths):
            self.queue.add(path, now)

    def _ingest(self, path: Path) -> IngestStats | None:
        def yield_turn() -> bool:
            # Asked between two batches. A quiet file with a new line waits for this batch, not
            # for the rest of the turn: one whose news is not queued yet (busy files with a
            # backlog are queued, as a rule), or one queued already (it may have been taken in
            # just before this turn began; a whole turn of an overdue file was then its wait,
            # up to 130 ms under 8 writers). When only busy files are behind, turns run whole,
            # so catching up keeps its pace (a turn's end waits for its last batch's reply, so
            # turns of one batch would lose the overlap of parsing and staging).
            if self.stop.is_set() or self.dirty.news_besides(path, self.queue):
                return True
            smallest = self.queue.smallest()
            return smallest is not None and smallest < QUIET_BYTES

        try:
            # At most PASS_BYTES of one file per turn: a file with a large backlog goes back in
            # the queue, so a line appended to another file waits for a slice, not the backlog.
            # carry: Redis runs this turn's last batch while the next turn reads and parses (one
            # batch per turn is the rule under load, where waiting for it was a third of a turn).
            stats = self.ingestor.ingest(path, budget=PASS_BYTES, stop=yield_turn, carry=True)
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc)
            return None
        except RedisError as exc:
            # Nothing was checkpointed: the next scan reads the same lines again. (The batch that
            # failed may be the one carried over from the file read before; a batch refused as
            # STALE was read from a checkpoint that retention took out meanwhile.)
            log.warning("staging failed while reading %s (%s); will retry at the next scan", path, exc)
            return None
        except sqlalchemy.exc.SQLAlchemyError as exc:
            # The database's record of a finished file could not be read: reading the file from
            # the start instead would stage it all again. The next scan tries again.
            log.warning("cannot look %s up in the database (%s); will retry at the next scan", path, exc)
            return None
        self.pending[path] = stats.pending_bytes
        self.queue.read(path, stats.read_bytes)
        if stats.unread and not self.stop.is_set():
            self.queue.add(path, time.monotonic())
        self._counted(stats)
        return stats

    def _settle(self) -> None:
        """Wait for the batch carried over from the last turn (nothing else to overlap it with)."""
        try:
            self._counted(self.ingestor.settle())
        except RedisError as exc:
            log.warning("staging failed (%s); will retry at the next scan", exc)

    def _counted(self, stats: IngestStats) -> None:
        self.stats.add(stats)
        for targets in stats.due_by_file.values():  # a file at a time: see `IngestStats`
            self._enqueue(targets)

    def _db(self) -> Engine:
        if self._engine is None:
            self._engine = connections.engine(self.settings)
        return self._engine

    def _find_finished(self, file: str) -> FinishedRecord | None:
        """The database's record of a file retention took out of Redis (see Ingestor)."""
        engine = self._db()
        if self._db_ready_at < 0:
            if not finished.ready(engine):
                return None  # never migrated: it cannot hold a record
            self._db_ready_at = time.monotonic()
        return finished.find(engine, file)

    def _retain(self) -> None:
        """A retention pass (worker/retention.py), beside each full scan."""
        try:
            self.retention.run()
        except (RedisError, sqlalchemy.exc.SQLAlchemyError) as exc:
            log.warning("retention pass failed (%s); will retry after the next scan", exc)

    def _beat(self) -> None:
        """Tell `sidecar status` and `/readyz` what this watcher is doing."""
        info = {
            "root": str(self.root),
            "files": len(self.pending),
            "pending_bytes": sum(self.pending.values()),
            "queued": len(self.queue) + len(self.dirty.paths),
            "last_scan_age": round(time.monotonic() - self.last_scan, 3),
            "lines": self.stats.lines,
            "rejects": self.stats.rejects,
        }
        ttl = max(30.0, 3 * self.settings.rescan_interval)
        try:
            self.staging.beat("watcher", self.name, info, ttl)
        except RedisError as exc:
            log.warning("heartbeat failed: %s", exc)

    def _enqueue(self, targets: Collection[str]) -> None:
        try:
            self.enqueue.many(targets)
        except Exception as exc:  # the broker is down: the due set keeps the targets for the sweep
            log.warning("could not enqueue %d applies (%s); the sweep will retry", len(targets), exc)

    def _sweep(self) -> None:
        # Batched applies still queued will apply their targets: a drain now would race them
        # (`Enqueuer.busy`). Deliveries are swept all the same.
        if not self.enqueue.busy():
            self._send_drain()
        self._deliveries()

    def _send_drain(self) -> None:
        try:
            sent = self.staging.sweep(self.enqueue.drain, older_than=self.settings.sweep_after)
        except RedisError as exc:
            log.warning("sweep failed: %s", exc)
            return
        except Exception as exc:  # the broker is down: the next sweep tries again
            log.warning("could not send a drain of the due targets (%s); the next sweep will retry", exc)
            return
        if sent:
            log.info("targets due for over %.1f s: drain sent", self.settings.sweep_after)

    def _deliveries(self) -> None:
        """The backstop of change notifications, and their retries' clock: when a delivery is
        due (a lost `sidecar.deliver`, a failed try's backoff run out), send one, unless one is
        on its way (its Redis mark). A sender that cannot (a plain callable) has none to send."""
        if not isinstance(self.enqueue, Delivers):
            return
        try:
            if outbox.any_due(self._db(), datetime.now(UTC)):
                self.enqueue.deliver(self.staging)
            self._deliveries_failing = False
        except (sqlalchemy.exc.SQLAlchemyError, RedisError) as exc:
            # Said once per outage (a watcher without the database, or before `db upgrade`,
            # would say it every sweep otherwise).
            level = logging.DEBUG if self._deliveries_failing else logging.WARNING
            log.log(level, "could not check the due deliveries (%s); the next sweeps will", exc)
            self._deliveries_failing = True
        except Exception as exc:  # the broker is down
            log.warning("could not send a deliver task (%s); the next sweep will retry", exc)

    def _completions(self, pubsub: Subscription | None) -> None:
        """Executions that just completed: re-read their files so a held last line is flushed now."""
        if pubsub is None:
            return
        try:
            while (message := pubsub.get_message(timeout=0)) is not None:
                if message["type"] != "message":
                    continue
                execution = message["data"].decode()
                folder = self.root / execution
                if "/" not in execution and execution not in ("", ".", ".."):
                    for name in JSONL_NAMES:
                        self.dirty.add(folder / name)
                    self.dirty.add_folder(folder)
        except RedisError as exc:
            log.warning("completion channel failed (%s); the periodic scan covers it", exc)

    def _subscribe(self) -> Subscription | None:
        try:
            return self.staging.completions()
        except RedisError as exc:
            log.warning("cannot subscribe to completions (%s); relying on the periodic scan", exc)
            return None

    def _start_observer(self) -> BaseObserver | None:
        observer: BaseObserver = PollingObserver() if self.settings.polling else Observer()
        observer.schedule(self.dirty, str(self.root), recursive=True, event_filter=_EVENTS)
        try:
            observer.start()
        except OSError as exc:
            # Typically "inotify watch limit reached" (fs.inotify.max_user_watches): keep going
            # on periodic scans alone, loudly, rather than die or go quiet.
            log.error(
                "file events unavailable (%s); raise fs.inotify.max_user_watches or use --polling. "
                "Falling back to a full scan every %.0f s",
                exc,
                self.settings.rescan_interval,
            )
            return None
        return observer

    def _sidecar_files(self, folder: Path, depth: int) -> Iterator[Path]:
        """Sidecar files under `folder` (depth 0 = the root), never following symbolic links."""
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from self._sidecar_files(Path(entry.path), depth + 1)
            elif depth >= 1 and entry.is_file(follow_symlinks=False):
                name = entry.name
                if (depth == 1 and name in JSONL_NAMES) or name.endswith(PER_OUTPUT_SUFFIX):
                    yield Path(entry.path)
