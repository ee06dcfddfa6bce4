"""Sending change notifications: due deliveries claimed from the outbox (`store/outbox.py`),
POSTed with httpx, and their outcomes recorded. The `sidecar.deliver` task runs `send_due`.

Redirects are never followed (a 3xx is a failed try): a receiver must not be able to send our
signed events, or our requests, to another host. Each batch is POSTed concurrently, so one slow
receiver costs a batch at most `delivery_timeout`, not that times the batch's size.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import Engine

from . import __version__, metrics
from .notifications import body_of, gives_up, headers_for, retry_delay
from .settings import Settings
from .store import outbox
from .store.outbox import Claimed, Outcome

log = logging.getLogger(__name__)

BATCH = 16  # deliveries claimed (and POSTed at once) per round
BUDGET = 20.0  # seconds a `send_due` goes on claiming rounds; then the task sends itself again
LEASE_MIN = 30.0  # a claim lasts at least this long (and 3x the POST timeout)


@dataclass
class SendStats:
    """What one `send_due` did, and when the next pending delivery is due (None: none)."""

    delivered: int = 0
    failed: int = 0  # tries that failed (each due again later, or given up)
    more: bool = False  # stopped at the budget with deliveries still due
    next_due: datetime | None = None


def client_for(settings: Settings) -> httpx.Client:
    """The HTTP client deliveries are POSTed with: no redirects, `delivery_timeout` per connect,
    read and write, and no proxy or certificate settings taken from the environment."""
    return httpx.Client(
        timeout=httpx.Timeout(settings.delivery_timeout),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": f"dataset-properties-sidecar/{__version__}"},
    )


def send_due(
    engine: Engine, settings: Settings, client: httpx.Client | None = None, budget: float = BUDGET
) -> SendStats:
    """Claim due deliveries a batch at a time and POST them, until none is due or `budget`
    seconds have gone by. At-least-once: a receiver may get an event again (a lease that ran
    out, a 2xx lost on the way back); the event's id tells it so."""
    stats = SendStats()
    lease = max(LEASE_MIN, 3 * settings.delivery_timeout)
    own = client is None
    http = client_for(settings) if client is None else client
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=BATCH, thread_name_prefix="deliver") as pool:
            while True:
                if time.monotonic() - started >= budget:
                    stats.more = outbox.any_due(engine, datetime.now(UTC))
                    break
                claimed = outbox.claim(engine, datetime.now(UTC), lease, BATCH)
                if not claimed:
                    break
                errors = list(pool.map(lambda c: post(http, c, settings.delivery_timeout), claimed))
                outcomes = [Outcome(c, e) for c, e in zip(claimed, errors, strict=True)]
                outbox.finish(
                    engine, outcomes, datetime.now(UTC), settings.delivery_attempts, _delay(settings)
                )
                stats.delivered += sum(e is None for e in errors)
                stats.failed += sum(e is not None for e in errors)
                _count(claimed, errors, settings.delivery_attempts)
    finally:
        if own:
            http.close()
    stats.next_due = outbox.next_due(engine)
    _prune_now_and_then(engine, settings)
    return stats


PRUNE_EVERY = 600.0  # seconds between two prunes of the outbox by one process
_pruned_at: list[float] = []


def _prune_now_and_then(engine: Engine, settings: Settings) -> None:
    """Delete what `delivery_retention_seconds` no longer keeps, at most every `PRUNE_EVERY`
    seconds per process (two processes pruning at once delete the same rows: harmless)."""
    now = time.monotonic()
    if _pruned_at and now - _pruned_at[-1] < PRUNE_EVERY:
        return
    _pruned_at[:] = [now]
    before = datetime.now(UTC) - timedelta(seconds=settings.delivery_retention_seconds)
    deleted = outbox.prune(engine, before)
    if deleted:
        log.info("deliveries: %d delivered before %s deleted", deleted, before.isoformat())


def _count(claimed: list[Claimed], errors: list[str | None], limit: int) -> None:
    """Metrics and a log line per failed try."""
    for c, e in zip(claimed, errors, strict=True):
        if e is None:
            metrics.DELIVERIES.labels("delivered").inc()
            continue
        last = gives_up(c.attempt, limit)
        metrics.DELIVERIES.labels("given_up" if last else "failed").inc()
        log.warning(
            "delivery %d to %s, try %d%s: %s", c.id, c.url, c.attempt, " (given up)" if last else "", e
        )


def _delay(settings: Settings) -> outbox.Delay:
    return lambda attempts: retry_delay(attempts, settings.delivery_backoff, random.random())


def post(client: httpx.Client, claimed: Claimed, timeout: float) -> str | None:
    """POST one event, signed; None when the receiver answered 2xx, else why not. The answer's
    body is not read (a receiver cannot make us hold a large one)."""
    body = body_of(claimed.payload)
    headers = headers_for(claimed.secret, claimed.payload, body)
    try:
        with client.stream("POST", claimed.url, content=body, headers=headers) as response:
            code = response.status_code
    except httpx.TimeoutException:
        return f"timed out ({timeout:g} s)"
    except Exception as exc:  # whatever went wrong with the receiver is a failed try, not a crash
        return f"{type(exc).__name__}: {exc}"
    if 200 <= code < 300:
        return None
    if 300 <= code < 400:
        return f"HTTP {code}: a redirect, not followed"
    return f"HTTP {code}"
