"""Prometheus metrics; served at /metrics (API) or --metrics-port.

Standalone (`sidecar watch` / `worker` / `serve`), each process has its own registry and counts
what it did. Under `sidecar up` the children share prometheus-client's multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`, set by `up.py`): each process writes its counters and histograms to
files there, and the API's /metrics sums them, so one port shows the watcher's and the worker's
series too. The backlog gauges are read from Redis at scrape time (a custom collector, which
multiprocess mode does not share): the scraped process reports them, once. There is no `Gauge`
object: one added here needs a `multiprocess_mode`, and a `live*` mode needs `up` to call
`mark_process_dead` for a child that exits; a dead process's counter files must stay (its counts
happened). `up` empties the folder at each start.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .staging import RedisError, Staging

LINES_INGESTED = Counter("sidecar_lines_ingested_total", "Sidecar lines read and staged")
LINES_REJECTED = Counter("sidecar_lines_rejected_total", "Sidecar lines rejected", ["reason"])
ENTRIES_STAGED = Counter("sidecar_entries_staged_total", "Entries staged in Redis")
FILE_REWRITES = Counter("sidecar_file_rewrites_total", "Sidecar files found rewritten, truncated or replaced")
VERSIONS_COMPLETED = Counter("sidecar_versions_completed_total", "Completion events accepted", ["kind"])
APPLIES = Counter("sidecar_applies_total", "Apply tasks run", ["outcome"])
ENTRIES_APPLIED = Counter("sidecar_entries_applied_total", "Staged entries applied to the database")
APPLY_SECONDS = Histogram(
    "sidecar_apply_duration_seconds",
    "Duration of one apply transaction",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
APPEND_TO_STAGED = Histogram(
    "sidecar_append_to_staged_seconds",
    "From a sidecar file's last modification to its new lines being staged",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
)
DELIVERIES = Counter(
    "sidecar_deliveries_total",
    "Change notification tries by outcome (delivered, failed, given_up)",
    ["outcome"],
)
WEBHOOKS = Counter("sidecar_webhook_requests_total", "Webhook requests by outcome", ["outcome"])


def reject_reason(reason: str) -> str:
    """A small, fixed label set for reject reasons (the full text goes to the log and the list)."""
    lowered = reason.lower()
    for needle, label in (
        ("not json", "not_json"),
        ("longer than the limit", "too_long"),
        ("larger than the limit", "too_long"),
        ("reserved", "reserved_key"),
        ("bad dataset uri", "bad_uri"),
        ("deeper than", "too_deep"),
    ):
        if needle in lowered:
            return label
    return "schema"


class BacklogCollector(Collector):
    """Gauges read from Redis when scraped: targets due for an apply, the oldest one's age, and
    the targets quarantined."""

    def __init__(self) -> None:
        self.staging: Staging | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.staging is None:
            return
        due = GaugeMetricFamily("sidecar_backlog_due_targets", "Targets with entries waiting for an apply")
        oldest = GaugeMetricFamily("sidecar_backlog_oldest_due_seconds", "Age of the oldest due target")
        held = GaugeMetricFamily(
            "sidecar_quarantined_targets", "Targets held after failed applies (see `sidecar retry`)"
        )
        try:
            count, age = self.staging.backlog()
            quarantined = self.staging.quarantined_count()
        except RedisError:
            return
        due.add_metric([], count)
        oldest.add_metric([], age)
        held.add_metric([], quarantined)
        yield due
        yield oldest
        yield held


_BACKLOG = BacklogCollector()
REGISTRY.register(_BACKLOG)


def register_backlog(staging: Staging) -> None:
    """Report the backlog of this staging area (the last one set wins; one per process in use)."""
    _BACKLOG.staging = staging


def scrape_registry() -> CollectorRegistry:
    """What /metrics shows: every process's series under multiprocess mode, else this process's.

    prometheus-client picks file-backed values at import when `PROMETHEUS_MULTIPROC_DIR` is set;
    this follows the same variable (read when the app is built, not at import), so the two agree.
    """
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    registry.register(_BACKLOG)
    return registry
