"""Every Redis key in one place.

Staging runs on one Redis server (a primary; replicas and a failover in front of it are the
operator's, behind one URL). Redis Cluster is not supported: the client is a plain `redis.Redis`
(`connections.py`), and nothing was tested on a cluster.

All keys of one deployment still share the hash tag `{<prefix>}`. On one server it costs nothing;
it puts every multi-key script (each passes all its keys in KEYS) and transaction on one slot,
which a cluster port would need first. Such a port would still have to bring a cluster client
behind the `redis.Redis` the code is typed on, MULTI and SCAN across nodes, pub/sub and `INFO` per
node, and a broker that is not that Redis (kombu's Redis transport does not speak Cluster). One
Redis comfortably stages far more lines per second than runners write (see docs/benchmarks.md),
so atomicity wins over sharding either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from .uris import Target


@dataclass(frozen=True)
class Keys:
    """Key templates under one prefix (`SIDECAR_REDIS_PREFIX`, default `sidecar`)."""

    prefix: str = "sidecar"

    @property
    def tag(self) -> str:
        return "{" + self.prefix + "}"

    def stream(self, target: Target) -> str:
        """Stream of staged entries for one target, in arrival order (XADD ids are the order)."""
        return f"{self.tag}:stream:{target.key}"

    def done(self, target: Target) -> str:
        """Set once a version (or an execution) has completed; its value is the ISO time."""
        return f"{self.tag}:done:{target.key}"

    @property
    def due(self) -> str:
        """Sorted set: targets with entries waiting for an apply, scored by when they became due."""
        return f"{self.tag}:due"

    @property
    def offsets(self) -> str:
        """Hash: tailed file (relative to the root) -> its FileState JSON."""
        return f"{self.tag}:offsets"

    def lines(self, file: str) -> str:
        """String of 8-byte digests, one per line number: a re-read after a rewrite stages nothing twice."""
        return f"{self.tag}:lines:{file}"

    def execution_targets(self, execution: str) -> str:
        """Set of `<op>:<target>` an execution's lines staged for (`m:` membership, `d:`, `v:`, `x:`)."""
        return f"{self.tag}:exec-targets:{execution}"

    def execution_files(self, execution: str) -> str:
        """Set of the files (relative to the root) an execution's lines were staged from."""
        return f"{self.tag}:exec-files:{execution}"

    @property
    def executions(self) -> str:
        """Hash: execution with staging state in Redis -> the root it was read under (`host:path`)."""
        return f"{self.tag}:executions"

    @property
    def completed(self) -> str:
        """Sorted set: completed executions whose staging state is still in Redis, scored by the
        completion time (ms). Retention takes its candidates from here."""
        return f"{self.tag}:completed"

    @property
    def stream_floor(self) -> str:
        """The highest stream id retention ever deleted: a stream created again starts above it."""
        return f"{self.tag}:stream-floor"

    @property
    def known_versions(self) -> str:
        """Set of versions ever staged for (the first sighting registers a building version)."""
        return f"{self.tag}:known-versions"

    @property
    def failures(self) -> str:
        """Hash: target -> failed apply attempts in a row (errors that are not transient)."""
        return f"{self.tag}:failures"

    @property
    def drain(self) -> str:
        """String, set while a `sidecar.drain` sent by a sweep is queued or running (it expires,
        so a lost drain does not stop the next sweep for long)."""
        return f"{self.tag}:drain"

    @property
    def delivering(self) -> str:
        """String, set while a `sidecar.deliver` is queued or running (it expires, so a lost one
        does not stop the next request for long)."""
        return f"{self.tag}:delivering"

    @property
    def quarantine(self) -> str:
        """Hash: target -> JSON (error, attempts, at) of a target held after too many failures."""
        return f"{self.tag}:quarantine"

    @property
    def rejects(self) -> str:
        """List of rejected lines (newest first), capped."""
        return f"{self.tag}:rejects"

    def heartbeat(self, role: str, name: str) -> str:
        """A process's heartbeat (JSON, with a TTL): role is `watcher` or `worker`."""
        return f"{self.tag}:heartbeat:{role}:{name}"

    @property
    def heartbeat_pattern(self) -> str:
        return f"{self.tag}:heartbeat:*"

    @property
    def events(self) -> str:
        """Pub/sub channel: execution ids whose completion watchers should flush (a hint only)."""
        return f"{self.tag}:events"

    @property
    def queue(self) -> str:
        """The Celery queue the applies of one or a few targets go to (late lines, API writes)."""
        return f"{self.prefix}.apply"

    @property
    def bulk_queue(self) -> str:
        """The Celery queue of batched applies and drains: a bulk load waits here, so that a late
        line's apply on `queue` never waits behind it (a worker takes from both in turn)."""
        return f"{self.prefix}.apply-bulk"

    def pattern(self) -> str:
        """Glob matching every key of this prefix (for tests and `sidecar reset`)."""
        return f"{self.tag}:*"
