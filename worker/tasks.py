"""The Celery side: `sidecar.apply` (one target) and `sidecar.apply_batch` (many, in one
transaction), which run the apply; `sidecar.drain`, which the watcher's sweep sends to apply
every target due for too long; `sidecar.checksums`, which reads the files of an execution whose
datums were just applied; `sidecar.bulk_edit`, which runs a bulk edit by filter a slice at a
time; `sidecar.deliver`, which sends change notifications from the outbox.

Delivery is at-least-once (acks_late + reject_on_worker_lost: a worker killed mid-apply leaves
the task to be redelivered); the watermarks in the database make the second run a no-op. If a
task is lost anyway (broker restart, visibility timeout), its targets stay in the due set and
the watcher's sweep sends a drain for them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy.exc
from celery import Celery, Task
from sqlalchemy import Engine

from . import bulk, connections, delivering, metrics
from .applying import ApplyResult, apply_once
from .checksums import check_execution
from .errors import NotFound
from .keys import Keys
from .settings import Settings
from .staging import REDIS_TRANSIENT, Staging
from .store import bulk as store_bulk
from .store import definitions, outbox, quarantine
from .uris import Target

log = logging.getLogger(__name__)

APPLY_TASK = "sidecar.apply"
BATCH_TASK = "sidecar.apply_batch"
DRAIN_TASK = "sidecar.drain"
CHECKSUM_TASK = "sidecar.checksums"
RECHECK_TASK = "sidecar.recheck"
BULK_TASK = "sidecar.bulk_edit"
BULK_SLICE = 10.0  # seconds of batches one bulk-edit task runs before it sends the rest on
DELIVER_TASK = "sidecar.deliver"
# A sent `sidecar.deliver` keeps others from being sent this long (it runs for at most
# `delivering.BUDGET` seconds plus a batch's timeout; a lost one is sent again after this).
DELIVER_MARK_MS = 120_000
FEW = 8  # targets due at once that `Enqueuer.many` sends one by one

# Errors worth a retry: the database or Redis is down or locked for now.
TRANSIENT: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    *REDIS_TRANSIENT,
)


@dataclass
class _Resources:
    """Per-process connections, made after the prefork pool forks (sockets must not be shared)."""

    settings: Settings
    pid: int = 0
    _engine: Engine | None = field(default=None, repr=False)
    _staging: Staging | None = field(default=None, repr=False)

    def get(self) -> tuple[Engine, Staging]:
        if self.pid != os.getpid() or self._engine is None or self._staging is None:
            self.pid = os.getpid()
            self._engine = connections.engine(self.settings)
            self._staging = connections.staging(self.settings)
        return self._engine, self._staging


def make_app(settings: Settings) -> Celery:
    """The Celery app for these settings: one apply queue per deployment (`Keys.queue`) on the
    broker, `SIDECAR_BROKER_URL` or else the staging Redis."""
    keys = Keys(settings.redis_prefix)
    app = Celery("sidecar", broker=settings.effective_broker_url(), set_as_current=False)
    app.conf.update(
        task_default_queue=keys.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis only: an unacked task comes back after this long. RabbitMQ gives an unacked
        # message back when its consumer's channel closes (a killed worker), and has no such option.
        broker_transport_options=(
            {"visibility_timeout": settings.visibility_timeout} if settings.broker_is_redis else {}
        ),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        sidecar_apply_batch=settings.apply_batch,  # ours: what `Enqueuer.many` puts in a task
        sidecar_bulk_queue=keys.bulk_queue,  # ours: where batches and drains go
    )
    resources = _Resources(settings)

    # Every task: acknowledged after it ran, given back if its worker dies; this app's own
    # (`shared=False`: another app made in the same process must not take its tasks).
    task = functools.partial(app.task, bind=True, acks_late=True, reject_on_worker_lost=True, shared=False)

    # Transient errors retry for as long as they last; the others are counted per target in
    # Redis (`_count_failure`), so duplicates of one task (a redelivery) share one bound.
    @task(name=APPLY_TASK, max_retries=None)
    def apply(self: Task[Any, Any], target_key: str) -> dict[str, Any]:
        engine, staging = resources.get()
        target = Target.parse(target_key)
        started = time.perf_counter()
        try:
            result = apply_once(engine, staging, [target])[0]
        except TRANSIENT as exc:
            metrics.APPLIES.labels("retry").inc()
            raise self.retry(exc=exc, countdown=_backoff(settings, self.request.retries)) from exc
        except Exception as exc:  # not transient: retried a bounded number of times, then held
            held = _failed(self, settings, engine, staging, target, exc)
            _notify(app, staging)  # its quarantine's event
            return held
        _applied(app, result)
        _notify(app, staging)
        metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
        return {"applied": result.applied, "watermark": result.watermark, "skipped": result.skipped}

    @task(name=BATCH_TASK, max_retries=None)
    def apply_batch(self: Task[Any, Any], target_keys: list[str]) -> dict[str, Any]:
        """Many targets in one transaction (what `Enqueuer.many` sends when many are due)."""
        engine, staging = resources.get()
        try:
            return run_batch(app, settings, engine, staging, [Target.parse(k) for k in target_keys])
        except TRANSIENT as exc:  # the database or Redis is away: the whole batch, later
            metrics.APPLIES.labels("retry").inc()
            raise self.retry(exc=exc, countdown=_backoff(settings, self.request.retries)) from exc

    @task(name=DRAIN_TASK, max_retries=0)
    def drain(self: Task[Any, Any], older_than: float) -> dict[str, Any]:
        """Apply every target due for longer than `older_than` seconds, in batches (see
        `Health.sweep`). A transient error ends the drain; the next sweep sends another."""
        engine, staging = resources.get()
        return run_drain(app, settings, engine, staging, older_than)

    @task(name=CHECKSUM_TASK, max_retries=None)
    def checksums(self: Task[Any, Any], execution: str) -> dict[str, Any]:
        """Size and checksums of the execution's datums not read yet, from the files on disk."""
        try:
            return run_checksums(settings, lambda: resources.get()[0], execution)
        except TRANSIENT as exc:
            raise self.retry(exc=exc, countdown=_backoff(settings, self.request.retries)) from exc

    @task(name=RECHECK_TASK, max_retries=None)
    def recheck(self: Task[Any, Any]) -> dict[str, Any]:
        """Every owner checked against the definitions after a change (store/definitions.py).
        Duplicates are cheap: one finds the generation checked already, or stops at the first
        batch when another moved the cursor; a redelivered one resumes at the cursor."""
        engine, _ = resources.get()
        try:
            done = definitions.recheck(engine)
        except TRANSIENT as exc:  # a deadlock with an apply, too: the next try resumes the cursor
            raise self.retry(exc=exc, countdown=_backoff(settings, self.request.retries)) from exc
        if done.outcome == "done":
            log.info(
                "recheck: %d checked, %d changed, %d with violations",
                done.checked,
                done.changed,
                done.violating,
            )
        return {"outcome": done.outcome, "checked": done.checked, "changed": done.changed}

    _deliver_task(app, task, settings, resources)
    _bulk_task(app, settings, resources)
    return app


def _deliver_task(
    app: Celery, task: functools.partial[Task[Any, Any]], settings: Settings, resources: _Resources
) -> None:
    """Register `sidecar.deliver` on `app` (as `make_app` registers the others)."""

    @task(name=DELIVER_TASK, max_retries=None)
    def deliver(self: Task[Any, Any]) -> dict[str, Any]:
        """Send the due change notifications (delivering.py) for up to `delivering.BUDGET`
        seconds; then, if some are still due, another of this task. Deliveries due later (a
        failed try's backoff) are picked up by the watcher's sweep (`Watcher._sweep`)."""
        engine, staging = resources.get()
        try:
            return run_deliver(app, settings, engine, staging)
        except TRANSIENT as exc:
            raise self.retry(exc=exc, countdown=_backoff(settings, self.request.retries)) from exc


def _bulk_task(app: Celery, settings: Settings, resources: _Resources) -> None:
    @app.task(
        name=BULK_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, shared=False, max_retries=None
    )
    def bulk_edit(self: Task[Any, Any], ident: str) -> dict[str, Any]:
        """A slice of a bulk edit (`worker/bulk.py`), then the rest sent on as another task, so
        the applies queued meanwhile run in between. A redelivered or duplicate task resumes at
        the edit's cursor; one for an edit that is over does nothing."""
        engine, staging = resources.get()
        try:
            return run_bulk(app, settings, engine, staging, ident)
        except TRANSIENT as exc:
            raise self.retry(exc=exc, countdown=_backoff(settings, self.request.retries)) from exc


def run_deliver(app: Celery, settings: Settings, engine: Engine, staging: Staging) -> dict[str, Any]:
    """The deliver task's work: send what is due, then let the next request send another task
    (and send one now if something is still due)."""
    stats = delivering.send_due(engine, settings)
    # The mark goes first, then the check: an apply that wrote events after our last claim
    # either finds no mark (and sends its own task) or is seen by the check.
    staging.deliver_done()
    if stats.more or (stats.next_due is not None and stats.next_due <= datetime.now(UTC)):
        request_delivery(app, staging)
    if stats.delivered or stats.failed:
        log.info("deliveries: %d delivered, %d tries failed", stats.delivered, stats.failed)
    return {"delivered": stats.delivered, "failed": stats.failed}


def request_delivery(app: Celery, staging: Staging) -> bool:
    """Send a `sidecar.deliver`, unless one is queued or running (its Redis mark). Whether one
    was sent."""
    if not staging.deliver_claim(DELIVER_MARK_MS):
        return False
    try:
        _send(app, DELIVER_TASK, [])
    except BaseException:
        staging.deliver_done()  # not sent: the next request (or sweep) tries again
        raise
    return True


def _notify(app: Celery, staging: Staging) -> None:
    """After an apply (or quarantine) that wrote change notifications, have them sent. A failure
    here is logged only: the events are in the outbox, and the watcher's sweep sends them."""
    if not outbox.took_events():
        return
    try:
        request_delivery(app, staging)
    except Exception as exc:
        log.warning("could not send a deliver task (%s); the sweep will", exc)


def run_bulk(app: Celery, settings: Settings, engine: Engine, staging: Staging, ident: str) -> dict[str, Any]:
    """The bulk-edit task's work: its batches applied as the batch task applies (a target that
    fails alone is split out and retried by itself), for `BULK_SLICE` seconds."""

    def apply(targets: list[Target]) -> None:
        run_batch(app, settings, engine, staging, targets)

    try:
        edit = bulk.run(engine, staging, ident, apply, batch=settings.apply_batch, seconds=BULK_SLICE)
    except NotFound:
        return {"state": "unknown"}
    except TRANSIENT:
        raise
    except Exception as exc:  # not transient (a bug, a filter a new version no longer reads)
        log.exception("bulk edit %s failed", ident)
        store_bulk.finish(engine, ident, "failed", describe(exc))
        return {"state": "failed"}
    if edit.state == "running":
        _send(app, BULK_TASK, [ident])
    return {"state": edit.state, "done": edit.done}


def run_drain(
    app: Celery, settings: Settings, engine: Engine, staging: Staging, older_than: float
) -> dict[str, Any]:
    """The drain task's work: the targets due for longer than `older_than` seconds, applied in
    batches, the drain marker kept alive meanwhile and dropped at the end."""
    done = 0
    try:
        keys = staging.due_targets(older_than)
        for start in range(0, len(keys), settings.apply_batch):
            batch = [Target.parse(k) for k in keys[start : start + settings.apply_batch]]
            run_batch(app, settings, engine, staging, batch)
            done += len(batch)
            staging.drain_alive(older_than)
    except TRANSIENT as exc:
        log.warning("drain stopped after %d targets: %s (the next sweep goes on)", done, exc)
    finally:
        with contextlib.suppress(*REDIS_TRANSIENT):
            staging.drain_done()
    if done:
        log.info("drain applied %d targets due for over %.1f s", done, older_than)
    return {"targets": done}


def run_batch(
    app: Celery, settings: Settings, engine: Engine, staging: Staging, targets: list[Target]
) -> dict[str, Any]:
    """Apply `targets` in one transaction. If the batch fails with an error that is not
    transient, it is split in halves, each applied again, down to the target that fails alone:
    that one goes the way of a failing single apply (`_failed_alone`: retried by itself later,
    then quarantined), and the rest of the batch is applied now. A half that fails transiently
    is sent again as its own batch, later. Transient errors of the whole batch are raised."""
    started = time.perf_counter()
    try:
        results = apply_once(engine, staging, targets)
    except TRANSIENT:
        raise
    except Exception as exc:
        if len(targets) == 1:
            _failed_alone(app, settings, engine, staging, targets[0], exc)
            _notify(app, staging)  # its quarantine's event, if it was quarantined
            return {"applied": 0, "failed": 1}
        log.warning("a batch of %d targets failed (%s); applying it in halves", len(targets), describe(exc))
        half = len(targets) // 2
        out: dict[str, Any] = {"applied": 0, "failed": 0}
        for part in (targets[:half], targets[half:]):
            try:
                got = run_batch(app, settings, engine, staging, part)
            except TRANSIENT as again:
                log.warning("%d targets of a split batch will be tried again: %s", len(part), again)
                _send(app, BATCH_TASK, [[t.key for t in part]], _backoff(settings, 0))
                continue
            out["applied"] += got["applied"]
            out["failed"] += got["failed"]
        return out
    metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
    for result in results:
        _applied(app, result)
    _notify(app, staging)  # the batch task, the drain, a bulk edit (here or in `sidecar props`)
    return {"applied": sum(r.applied for r in results), "failed": 0}


def _applied(app: Celery, result: ApplyResult) -> None:
    """Count, log and follow up one target's successful apply."""
    target = Target.parse(result.target)
    if result.more:
        # One slice of a long execution or dataset target was applied (`apply_once`); the rest
        # goes to the back of the bulk queue rather than on in this task, so that one target of
        # 100,000 entries neither holds this worker (the apply queue's, for a late line) nor
        # keeps a bulk thread from every other target for minutes. Duplicates are harmless:
        # the next slice starts at the watermark, and one that finds nothing sends nothing.
        try:
            _send(app, BATCH_TASK, [[result.target]])
        except Exception as exc:  # the target stays due (entries after its watermark): the sweep
            log.warning("could not send the rest of %s (%s); the sweep will apply it", result.target, exc)
    elif target.kind == "execution" and not result.skipped:
        # Even when this apply found nothing new: an API write may have applied the
        # execution's lines inline (it does not send this), and the task is cheap when
        # every datum is checked already (one indexed SELECT).
        _send_checksums(app, target.execution)
    metrics.APPLIES.labels(_outcome(result)).inc()
    metrics.ENTRIES_APPLIED.inc(result.applied)
    if result.applied or result.skipped:
        log.info(
            "apply %s: %d entries, watermark %s%s",
            result.target,
            result.applied,
            result.watermark,
            f" ({result.skipped})" if result.skipped else "",
        )


def _send(app: Celery, task: str, args: list[Any], countdown: float | None = None) -> None:
    """Send a task: batches, drains, bulk edits, checksums and re-checks (work that grows with
    the store or the load) to the bulk queue; single applies and deliveries to the apply queue,
    which a worker of its own (`sidecar worker --queues apply`, one of `sidecar up`'s) keeps free
    of any bulk load, so that a late line is applied within a second of being staged."""
    bulk_queue = task in (BATCH_TASK, DRAIN_TASK, BULK_TASK, CHECKSUM_TASK, RECHECK_TASK)
    queue = app.conf.sidecar_bulk_queue if bulk_queue else app.conf.task_default_queue
    app.send_task(task, args=args, queue=queue, countdown=countdown)


def run_checksums(settings: Settings, engine: Callable[[], Engine], execution: str) -> dict[str, Any]:
    """The checksums task's work: skipped (and said once) on a worker that has no root."""
    if settings.root is None:
        _no_root_once()
        return {"skipped": "no root"}
    stats = check_execution(engine(), settings.root, execution)
    if stats.checked:
        log.info("checksums of %s: %d files (%d missing)", execution, stats.checked, stats.missing)
    return {"checked": stats.checked, "missing": stats.missing}


_warned_no_root: list[bool] = []


def _no_root_once() -> None:
    """A worker without SIDECAR_ROOT cannot read datums' files: said once per process."""
    if not _warned_no_root:
        _warned_no_root.append(True)
        log.warning(
            "checksums skipped: this worker has no SIDECAR_ROOT, so datums' size and checksums stay "
            "null (every worker must see the executions' root for them to be read)"
        )


def _send_checksums(app: Celery, execution: str) -> None:
    """After an execution's datums were applied. A failed send leaves their checksums null until
    the execution's next apply (a late line) sends it again."""
    try:
        _send(app, CHECKSUM_TASK, [execution])
    except Exception as exc:
        log.warning("could not send the checksums of %s (%s)", execution, exc)


def _outcome(result: ApplyResult) -> str:
    if result.skipped == "quarantined":
        return "held"
    return "skipped" if result.skipped else "applied" if result.applied else "noop"


def _backoff(settings: Settings, retries: int) -> float:
    """Seconds before the next try: the base, doubled per retry, at most 60, fully jittered (as
    Celery's `retry_backoff`, whose helper takes whole seconds only)."""
    return random.uniform(0, min(60.0, settings.apply_retry_backoff * 2**retries))


def _failed(
    task: Task[Any, Any], settings: Settings, engine: Engine, staging: Staging, target: Target, exc: Exception
) -> dict[str, Any]:
    """A single apply failed with an error that is not transient: retried by this task with
    backoff (`_count_failure`), then quarantined."""
    attempts = _count_failure(settings, engine, staging, target, exc)
    if attempts is not None:
        raise task.retry(exc=exc, countdown=_backoff(settings, attempts - 1), max_retries=None) from exc
    return {"applied": 0, "quarantined": describe(exc)}


def _failed_alone(
    app: Celery, settings: Settings, engine: Engine, staging: Staging, target: Target, exc: Exception
) -> None:
    """A target split out of a batch failed alone: its retry is a single apply sent with
    backoff (so it no longer holds a batch back), until it is quarantined."""
    attempts = _count_failure(settings, engine, staging, target, exc)
    if attempts is not None:
        _send(app, APPLY_TASK, [target.key], _backoff(settings, attempts - 1))


def _count_failure(
    settings: Settings, engine: Engine, staging: Staging, target: Target, exc: Exception
) -> int | None:
    """An apply failed with an error that is not transient (a bug, or a limit nothing checked).

    Counted per target in Redis: the attempts so far when another try is due (retried
    `apply_retries` times with backoff), or None once the target is quarantined: recorded in
    the database first (durable), then held in Redis, which takes it out of the due set.
    Nothing is dropped: its entries, and those staged later, wait in Redis until `sidecar
    retry`. A crash between the two steps leaves the target due; its next failure quarantines
    it again.
    """
    attempts = staging.note_failure(target)
    error = describe(exc)
    if attempts <= settings.apply_retries:
        metrics.APPLIES.labels("failed").inc()
        log.warning(
            "apply %s failed (try %d of %d): %s", target.key, attempts, settings.apply_retries + 1, error
        )
        return attempts
    now = datetime.now(UTC)
    quarantine.record(engine, target.key, error, attempts, now)
    staging.quarantine(target, error, attempts, now.isoformat())
    metrics.APPLIES.labels("quarantined").inc()
    log.error("apply %s quarantined after %d failed tries: %s", target.key, attempts, error)
    return None


def describe(exc: BaseException) -> str:
    """An error as one short line for status and logs: the database's own message, without the
    statement and parameters SQLAlchemy appends (they may be large, or hold the values)."""
    inner = getattr(exc, "orig", None) or exc
    lines = str(inner).strip().splitlines()
    text = f"{type(inner).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 500 else text[:500] + "..."


def retry_targets(
    engine: Engine, staging: Staging, enqueue: Callable[[str], None], targets: list[str]
) -> list[str]:
    """`sidecar retry`: forget the quarantine of `targets` and enqueue an apply of each.

    The database row goes first: if Redis then fails, the target is still held and shown, and
    the retry can be run again.
    """
    quarantine.remove(engine, targets)
    for key in targets:
        staging.release(Target.parse(key))
        enqueue(key)  # each alone: one of them may fail again
    return targets


def send_recheck(app: Celery) -> bool:
    """Ask a worker to re-check after a definition change; False (logged) if the broker is away.
    The change itself moved the generation, so `sidecar status` shows the re-check as pending
    and `sidecar definitions recheck` runs it, whatever happens to this message."""
    try:
        _send(app, RECHECK_TASK, [])
    except Exception as exc:
        log.warning("could not send the definitions recheck (%s); `sidecar definitions recheck` runs it", exc)
        return False
    return True


class Enqueuer:
    """Sends apply tasks; what the watcher, the webhook and the CLI call."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.batch: int = app.conf.sidecar_apply_batch

    def __call__(self, target_key: str) -> None:
        """An apply of one target."""
        _send(self.app, APPLY_TASK, [target_key])

    def many(self, target_keys: Iterable[str]) -> None:
        """Applies of many targets due at once (an execution's completion makes every version it
        fed due): one task per `batch` of them on the bulk queue, so the work grows with the
        number of transactions, not of targets. Up to `FEW` targets go one by one as
        `sidecar.apply`, on the apply queue, which no bulk load holds up."""
        keys = sorted(set(target_keys))
        if len(keys) <= FEW:
            for key in keys:  # a late line, one completion: not a bulk load
                self(key)
            return
        for start in range(0, len(keys), self.batch):
            _send(self.app, BATCH_TASK, [keys[start : start + self.batch]])

    def drain(self, older_than: float) -> None:
        """A drain of every target due for longer than `older_than` seconds (`Health.sweep`)."""
        _send(self.app, DRAIN_TASK, [older_than])

    def busy(self) -> bool:
        """Whether the bulk queue holds messages (a passive declare: the broker's count, on
        Redis and RabbitMQ alike). The sweep waits while it does: in a 100,000-version load every
        queued target had been due for more than `SIDECAR_SWEEP_AFTER`, so the drains it sent
        applied them in a race with their own queued batches (the two worker threads taking
        turns on the same watermark locks, and 99 batches of nothing at ~1.3 s each). A task
        lost meanwhile is caught by the first sweep after the queue has emptied. A broker that
        cannot answer counts as not busy: the drain is the backstop, and must not be the one
        thing a broker hiccup turns off."""
        try:
            # No retries: the watcher's loop calls this, and must not wait out a broker outage.
            with self.app.connection_for_read(connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=0)
                name = self.app.conf.sidecar_bulk_queue
                channel: Any = conn.default_channel  # a transport's Channel; the stubs say StdChannel
                return bool(channel.queue_declare(queue=name, passive=True).message_count)
        except Exception as exc:  # an unknown queue (no worker ever declared it), the broker away
            log.debug("could not count the bulk queue (%s); sweeping", exc)
            return False

    def recheck(self) -> None:
        """After a definition change (the API's PUT and DELETE)."""
        send_recheck(self.app)

    def bulk_edit(self, ident: str) -> None:
        """A bulk edit just recorded (the API's POST .../metadata/bulk/)."""
        _send(self.app, BULK_TASK, [ident])

    def deliver(self, staging: Staging) -> bool:
        """A send of the due change notifications, unless one is on its way (the sweep)."""
        return request_delivery(self.app, staging)
