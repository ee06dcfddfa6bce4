"""Retention: Redis holds in-flight state only.

Once an execution has completed and every target its lines fed is applied, its staging state
leaves Redis `SIDECAR_RETENTION_SECONDS` later: its files' checkpoints and line digests, its file
and target sets, its done flag, and the streams, done flags and known-version entries of the
targets it fed. What must outlive that is written to the database first (`store/finished.py`):
each file's last checkpoint and digests, and the execution's completion with the flags of the
versions it fed. The watcher and replay fall back to that record when Redis has no checkpoint
for a file, and put it back in Redis before a late line of the file is staged (`Ingestor`).

The order is the database first, then Redis, one execution at a time, and the Redis part is one
script that deletes nothing if anything moved since it was read (`Staging.forget`): a crash
between the two leaves a record and the Redis state both, which the next pass finishes.

The races:

* A line staged while retention runs for its execution. If it is staged before the forget
  script, its batch moved the file's checkpoint (and made a target due or put an entry past its
  watermark): the script sees that and keeps everything; the next pass tries again. If it is
  read before the script and staged after, the staging script's checkpoint check refuses the
  batch (the checkpoint it was read from is gone) and the watcher reads the file again, from the
  database's record this time, which it puts back in Redis first.
* An execution that is not complete but whose folder disappeared. Its files can never be read
  again, so their checkpoints and digests go (recorded first, in case the folder comes back);
  its staged entries and target set stay until it completes, since a late completion event must
  still apply them: an entry is never dropped. It is forgotten by the watcher of the root it was
  read under only (`executions` names the root), after its folder was missing at two passes
  `SIDECAR_RETENTION_SECONDS` apart (a root on a network filesystem that is briefly away is
  not a deleted folder).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from .staging import Staging
from .store import finished

log = logging.getLogger(__name__)

# Seconds before an execution that could not go is looked at again (at most the retention time).
KEPT_RETRY = 60.0


@dataclass
class RetentionStats:
    """What one pass did."""

    forgotten: list[str] = field(default_factory=list)  # executions whose state left Redis
    kept: list[str] = field(default_factory=list)  # candidates something still holds


class Retention:
    """Runs retention passes for one deployment (and, given a root, its deleted folders)."""

    def __init__(
        self,
        staging: Staging,
        engine: Callable[[], Engine],
        *,
        retention_seconds: float,
        root: Path | None = None,
        root_id: str = "",
    ) -> None:
        self.staging = staging
        self.engine = engine  # made when first needed: a watcher may never need the database
        self.retention_seconds = retention_seconds
        self.root, self.root_id = root, root_id
        self._missing: dict[str, float] = {}  # execution -> when its folder was first missed
        # Candidates something still held: looked at again only after KEPT_RETRY seconds (an
        # execution feeding a version that builds for days would cost a read of its targets'
        # backlogs at every pass otherwise).
        self._retry_at: dict[str, float] = {}

    def run(self) -> RetentionStats:
        """One pass: forget every execution that may go. Safe to run anywhere, any number of
        times at once (each step is an upsert or a script that checks before it deletes)."""
        stats = RetentionStats()
        now = time.monotonic()
        completed = [
            e
            for e in self.staging.completed_before(self.retention_seconds)
            if self._retry_at.get(e, 0.0) <= now
        ]
        gone = self._gone()
        if not completed and not gone:
            return stats  # nothing to ask the database about
        engine = self.engine()
        if not finished.ready(engine):
            log.warning("the database has no finished_files table yet; retention waits for the migration")
            return stats
        for execution in completed:
            self._forget(engine, execution, stats, gone=False)
        for execution in gone:
            if execution not in completed:
                self._forget(engine, execution, stats, gone=True)
        if len(self._retry_at) > 100_000:
            self._retry_at.clear()
        for execution in stats.kept:
            self._retry_at[execution] = now + min(KEPT_RETRY, self.retention_seconds)
        for execution in stats.forgotten:
            self._retry_at.pop(execution, None)
        if stats.forgotten:
            log.info("retention: %d executions left Redis", len(stats.forgotten))
        return stats

    def _gone(self) -> list[str]:
        """Executions read under this root whose folders have been missing long enough."""
        if self.root is None or not self.root.is_dir():
            return []
        now = time.monotonic()
        held = set(self.staging.executions_under(self.root_id))
        gone = []
        for execution in sorted(held):
            if (self.root / execution).is_dir():
                self._missing.pop(execution, None)
                continue
            first = self._missing.setdefault(execution, now)
            if first < now and now - first >= self.retention_seconds:
                gone.append(execution)
        self._missing = {e: t for e, t in self._missing.items() if e in held}
        return gone

    def _forget(self, engine: Engine, execution: str, stats: RetentionStats, *, gone: bool) -> None:
        held = self.staging.held(execution)
        whole = held.completed_ms is not None
        if not whole and not gone:
            return  # completed_before listed it, but its flag went meanwhile: not ours to judge
        marks = finished.watermarks(engine, held.targets) if whole else {}
        if whole and self.staging.unapplied_by(execution, held.targets, marks):
            stats.kept.append(execution)  # some of its entries wait for an apply
            return
        # The database first: once Redis forgets, only the record knows where the files ended.
        files = {f: (state, held.digests.get(f, b"")) for f, state in held.files.items()}
        finished.save(engine, execution, completed_ms=held.completed_ms, flags=held.flags, files=files)
        if self.staging.forget(held, marks, whole=whole):
            stats.forgotten.append(execution)
            self._missing.pop(execution, None)
        else:
            stats.kept.append(execution)  # something moved since `held` was read: next pass
