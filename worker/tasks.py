"""The Celery side: one task, `sidecar.apply`, that runs the apply transaction for a target.

Delivery is at-least-once (acks_late + reject_on_worker_lost: a worker killed mid-apply leaves
the task to be redelivered); the watermark in the database makes the second run a no-op. If a
task is lost anyway (broker restart, visibility timeout), the target stays in the due set and
the watcher's sweep enqueues it again.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import redis
import sqlalchemy.exc
from celery import Celery, Task
from sqlalchemy import Engine

from . import connections, metrics
from .keys import Keys
from .settings import Settings
from .staging import Staging
from .store.apply import apply_target
from .uris import Target

log = logging.getLogger(__name__)

APPLY_TASK = "sidecar.apply"

# Errors worth a retry: the database or Redis is down or locked for now.
TRANSIENT = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    redis.ConnectionError,
    redis.TimeoutError,
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
    """The Celery app for these settings: broker = the deployment's Redis, one apply queue."""
    keys = Keys(settings.redis_prefix)
    app = Celery("sidecar", broker=settings.effective_redis_url(), set_as_current=False)
    app.conf.update(
        task_default_queue=keys.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    resources = _Resources(settings)

    @app.task(  # type: ignore[untyped-decorator]
        name=APPLY_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=TRANSIENT,
        retry_backoff=1,
        retry_backoff_max=60,
        retry_jitter=True,
        max_retries=None,
    )
    def apply(self: Task[Any, Any], target_key: str) -> dict[str, Any]:
        engine, staging = resources.get()
        started = time.perf_counter()
        try:
            result = apply_target(engine, staging, Target.parse(target_key))
        except TRANSIENT:
            metrics.APPLIES.labels("retry").inc()
            raise
        metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
        metrics.APPLIES.labels("skipped" if result.skipped else "applied" if result.applied else "noop").inc()
        metrics.ENTRIES_APPLIED.inc(result.applied)
        if result.applied or result.skipped:
            log.info(
                "apply %s: %d entries, watermark %s%s",
                target_key,
                result.applied,
                result.watermark,
                f" ({result.skipped})" if result.skipped else "",
            )
        return {"applied": result.applied, "watermark": result.watermark, "skipped": result.skipped}

    return app


class Enqueuer:
    """Sends apply tasks; what the watcher, the webhook and the CLI call."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def __call__(self, target_key: str) -> None:
        self.app.send_task(APPLY_TASK, args=[target_key], queue=self.app.conf.task_default_queue)
