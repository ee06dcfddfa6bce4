"""Liveness and backlog in Redis: heartbeats of watchers and workers, the due set's size and age,
and the sweep that re-sends applies lost on the way (a mixin of `Staging`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import orjson
import redis
from redis.client import PubSub

from ..keys import Keys
from ..uris import Target
from .clock import now_iso, now_ms

Drain = Callable[[float], None]  # sends a drain of the targets due for longer than its argument


def drain_ttl_ms(older_than: float) -> int:
    """How long a sent drain keeps others from being sent: ten sweeps, at least ten seconds."""
    return int(max(10.0, 10 * older_than) * 1000)


class Health:
    """What `/readyz`, `sidecar status`, the metrics and the sweep read of the staging area."""

    redis: redis.Redis
    keys: Keys

    def due_targets(self, older_than: float) -> list[str]:
        """Targets due for longer than `older_than` seconds (their apply was lost or is slow)."""
        limit = now_ms() - int(older_than * 1000)
        raw = cast(list[bytes], self.redis.zrangebyscore(self.keys.due, "-inf", limit))
        return [r.decode() for r in raw]

    def backlog(self) -> tuple[int, float]:
        """(targets due for an apply, seconds the oldest of them has been due)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.keys.due)
        pipe.zrange(self.keys.due, 0, 0, withscores=True)
        count, oldest = pipe.execute()
        age = max(0.0, (now_ms() - oldest[0][1]) / 1000) if oldest else 0.0
        return int(count), age

    def ping(self) -> None:
        """Raise if Redis does not answer."""
        self.redis.ping()

    def close(self) -> None:
        self.redis.close()

    def building_versions(self) -> list[tuple[str, int]]:
        """(version, entries staged) of every version seen and not completed, by name."""
        known = sorted(m.decode() for m in cast(set[bytes], self.redis.smembers(self.keys.known_versions)))
        pipe = self.redis.pipeline(transaction=False)
        for key in known:
            target = Target.parse(key)
            pipe.exists(self.keys.done(target))
            pipe.xlen(self.keys.stream(target))
        answers = pipe.execute()
        return [(key, int(answers[2 * i + 1])) for i, key in enumerate(known) if not answers[2 * i]]

    def completions(self) -> PubSub:
        """A subscription to the executions completed from now on (a hint: the periodic scan is
        what guarantees a late last line is read)."""
        # Through Any: redis-py typed `pubsub` in 8.2, earlier releases did not.
        pubsub = cast(PubSub, cast(Any, self.redis).pubsub(ignore_subscribe_messages=True))
        pubsub.subscribe(self.keys.events)
        return pubsub

    def beat(self, role: str, name: str, info: dict[str, Any], ttl: float) -> None:
        """Announce that a watcher or worker is alive, with what it wants `sidecar status` to show."""
        payload = {"role": role, "name": name, "at": now_iso(), **info}
        self.redis.set(self.keys.heartbeat(role, name), orjson.dumps(payload), px=int(ttl * 1000))

    def heartbeats(self) -> list[dict[str, Any]]:
        """Every live heartbeat (expired ones are gone by themselves)."""
        keys = sorted(self.redis.scan_iter(match=self.keys.heartbeat_pattern, count=1000))
        values = cast(list[bytes | None], self.redis.mget(keys)) if keys else []
        return [orjson.loads(v) for v in values if v is not None]

    def sweep(self, drain: Drain, older_than: float) -> bool:
        """The backstop for a lost apply task: when a target has been due for longer than
        `older_than` seconds, send one drain (`drain(older_than)`), which applies every such
        target in batches, unless a drain is already queued or running.

        One drain at a time, whatever the backlog: under a load of 100,000 due targets whose
        tasks are merely queued, sending each again every few seconds multiplied the work (the
        queue once held 85,000 tasks). The marker expires (`drain_ttl_ms`), so a drain lost with
        its broker is sent again by a later sweep; a drain still working refreshes it. Returns
        whether a drain was sent.
        """
        limit = now_ms() - int(older_than * 1000)
        if not self.redis.zrangebyscore(self.keys.due, "-inf", limit, start=0, num=1):
            return False
        if not self.redis.set(self.keys.drain, now_iso(), nx=True, px=drain_ttl_ms(older_than)):
            return False
        try:
            drain(older_than)
        except BaseException:
            self.redis.delete(self.keys.drain)  # not sent: the next sweep tries again
            raise
        return True

    def drain_alive(self, older_than: float) -> None:
        """A drain is still working: keep other sweeps from sending another."""
        self.redis.set(self.keys.drain, now_iso(), px=drain_ttl_ms(older_than))

    def drain_done(self) -> None:
        self.redis.delete(self.keys.drain)

    def deliver_claim(self, ttl_ms: int) -> bool:
        """Mark a `sidecar.deliver` as sent, unless one is queued or running already (then
        False: that one will send what is due). The mark expires after `ttl_ms`."""
        return bool(self.redis.set(self.keys.delivering, now_iso(), nx=True, px=ttl_ms))

    def deliver_done(self) -> None:
        """The `sidecar.deliver` is ending: the next request sends another."""
        self.redis.delete(self.keys.delivering)
