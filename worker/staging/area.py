"""Staging in Redis: entries per target in arrival order, file checkpoints, completion flags, the due set.

Every write that must go with another goes in one Lua script: a batch of lines is staged together
with the checkpoint of the file they came from, so a watcher killed at any instant either staged
a batch and moved its offset, or did neither. The database, not Redis, decides what was applied
(see applying.py and store/apply.py); Redis only has to never lose an entry that its offset
claims was handed on.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import redis
from redis.exceptions import NoScriptError

from ..keys import Keys
from ..records import Entry, LineOutcome, Reject
from ..uris import Target
from . import scripts
from .clock import now_iso, now_ms
from .health import Health

REJECTS_KEPT = 10_000
READ_BATCH = 1000

_OPS = {"set": 0, "member": 1}
_REJECT = 2


@dataclass
class Held:
    """What Redis holds of one execution's staging state (`Staging.held`)."""

    execution: str
    completed_ms: int | None  # None: not completed
    files: dict[str, str]  # file -> its checkpoint
    digests: dict[str, bytes]  # file -> its line digests
    targets: list[str]  # the targets its lines staged for
    flags: dict[str, str]  # completed version it fed -> its done flag's value


class Sent:
    """A batch sent to the staging script whose reply has not been read yet (`Staging.send_lines`)."""

    def __init__(
        self,
        staging: Staging,
        *,
        due: list[str] | None = None,
        conn: Any = None,
        keys: list[str] | None = None,
        args: list[Any] | None = None,
    ) -> None:
        self.staging, self.conn, self.due = staging, conn, due
        self.keys: list[str] = keys or []  # the call, to run again if its reply is lost
        self.args: list[Any] = args or []

    def wait(self) -> list[str]:
        """The targets now due; raises what the script call raised (nothing was staged then)."""
        if self.conn is None:
            return self.due or []
        conn, self.conn = self.conn, None
        try:
            reply = conn.read_response()  # an error reply is raised here, by redis-py
        except NoScriptError:
            # Redis lost its scripts (a restart): nothing ran. The plain call loads the script.
            self._release(conn, broken=False)
            return self.staging._run_stage(self.keys, self.args)
        except (redis.ConnectionError, redis.TimeoutError):
            # The batch ran or not, as a whole. Running it again is harmless: lines already
            # staged at their numbers with the same bytes are skipped (the digest check).
            self._release(conn, broken=True)
            return self.staging._run_stage(self.keys, self.args)
        except BaseException:
            self._release(conn, broken=True)  # the reply may still be on its way
            raise
        self._release(conn, broken=False)
        return sorted(_decoded(reply))

    def abandon(self) -> None:
        """Give up on the reply (the reader failed meanwhile). The batch ran or not, as a whole;
        the next read starts from whichever checkpoint Redis holds."""
        if self.conn is not None:
            conn, self.conn = self.conn, None
            self._release(conn, broken=True)

    def _release(self, conn: Any, *, broken: bool) -> None:
        """Back to the pool; a connection whose reply was not read is closed first."""
        if broken:
            conn.disconnect()
        self.staging.redis.connection_pool.release(conn)


class Staging(Health):
    """The staging area of one deployment: a Redis client and the key layout."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._stage = client.register_script(scripts.source("stage"))
        self._finish = client.register_script(scripts.source("finish"))
        self._hold = client.register_script(scripts.source("hold"))
        self._forget = client.register_script(scripts.source("forget"))
        self._restore = client.register_script(scripts.source("restore"))

    # -- the watcher's side ------------------------------------------------------------------

    def line_digests(self, file: str) -> bytes | None:
        """The digests of a file's staged lines, 8 bytes per line (None: none kept)."""
        return cast(bytes | None, self.redis.get(self.keys.lines(file)))

    def load_state(self, file: str) -> str | None:
        """The checkpoint JSON of a tailed file, or None if never seen."""
        raw = self.redis.hget(self.keys.offsets, file)
        return raw.decode() if isinstance(raw, bytes) else raw

    def stage_lines(
        self,
        file: str,
        execution: str,
        outcomes: Iterable[LineOutcome],
        state_json: str,
        *,
        expect: str | None = None,
        root: str = "",
    ) -> list[str]:
        """Stage a batch of lines and the file's new checkpoint atomically; return targets now due.

        The lines must be consecutive (as a file is read); a batch with a gap is staged as several
        calls, the checkpoint going with the last. `expect`: the checkpoint the lines were read
        from ("" = none), which must still be the file's (else a ResponseError `STALE ...`); None: no check.
        `root`: the watched root the file is under (`host:path`), for forgetting deleted folders.
        """
        outcomes = list(outcomes)
        runs = _consecutive_runs(outcomes)
        due: set[str] = set()
        for i, run in enumerate(runs):
            last = i == len(runs) - 1
            keys, args = self._stage_args(
                file,
                execution,
                run,
                state_json if last else "",
                expect if i == 0 else None,
                root if last else "",
            )
            due.update(self._run_stage(keys, args))
        return sorted(due)

    def send_lines(
        self,
        file: str,
        execution: str,
        outcomes: list[LineOutcome],
        state_json: str,
        *,
        expect: str | None = None,
        root: str = "",
    ) -> Sent:
        """`stage_lines`, split in two: send the batch now, wait for Redis with `Sent.wait()`.

        The reader parses its next batch while Redis runs the script of this one (a quarter of
        ingest time was spent waiting for it). Send the next batch only after `wait()` returned:
        if this batch failed, a later one must not move the checkpoint past its lines.
        """
        if len(_consecutive_runs(outcomes)) > 1:  # a gap (replay of a range): the plain way
            due = self.stage_lines(file, execution, outcomes, state_json, expect=expect, root=root)
            return Sent(self, due=due)
        keys, args = self._stage_args(file, execution, outcomes, state_json, expect, root)
        conn: Any = self.redis.connection_pool.get_connection()
        sent = Sent(self, conn=conn, keys=keys, args=args)
        try:
            conn.send_command("EVALSHA", self._stage.sha, len(keys), *keys, *args)
        except (redis.ConnectionError, redis.TimeoutError):
            # A stale pooled connection (Redis restarted): the plain call retries as configured.
            sent.abandon()
            return Sent(self, due=self._run_stage(keys, args))
        except BaseException:
            sent.abandon()
            raise
        return sent

    def _run_stage(self, keys: list[str], args: list[Any]) -> list[str]:
        """One call of the staging script (redis-py loads it and retries as configured)."""
        return sorted(_decoded(self._stage(keys=keys, args=args)))

    def _stage_args(
        self,
        file: str,
        execution: str,
        outcomes: list[LineOutcome],
        state_json: str,
        expect: str | None = None,
        root: str = "",
    ) -> tuple[list[str], list[Any]]:
        index: dict[str, int] = {}
        keys = [
            self.keys.offsets,
            self.keys.due,
            self.keys.rejects,
            self.keys.lines(file),
            self.keys.execution_targets(execution),
            self.keys.known_versions,
            self.keys.execution_files(execution),
            self.keys.executions,
            self.keys.stream_floor,
        ]

        def key_index(key: str) -> int:
            if key not in index:
                keys.append(key)
                index[key] = len(keys)
            return index[key]

        # (op, target key) -> the record's constant fields: op code, stream and done flag (KEYS
        # indexes), member (index among the members). One lookup per entry.
        slots: dict[tuple[str, str], tuple[int, int, int, int]] = {}
        members: dict[str, int] = {}
        records: list[int] = []  # 6 integers per record, as _STAGE unpacks them
        payloads: list[bytes] = []
        exec_done = key_index(self.keys.done(Target.for_execution(execution)))
        first = outcomes[0].number if outcomes else 1
        for outcome in outcomes:
            k = outcome.number - first
            if outcome.reject is not None:
                payload = outcome.reject.to_json()
                records.extend((k, _REJECT, 0, 0, 0, len(payload)))
                payloads.append(payload)
            for entry in outcome.entries:
                target = entry.target
                slot = slots.get((entry.op, target.key))
                if slot is None:
                    version_done = key_index(self.keys.done(target)) if target.kind == "version" else 0
                    member = members.setdefault(_member(entry), len(members) + 1)
                    stream = key_index(self.keys.stream(target))
                    slot = slots[entry.op, target.key] = (_OPS[entry.op], stream, version_done, member)
                payload = entry.to_json()
                records.extend((k, *slot, len(payload)))
                payloads.append(payload)
        args: list[Any] = [
            file,
            state_json,
            now_ms(),
            now_iso(),
            REJECTS_KEPT,
            first,
            b"".join(o.digest for o in outcomes),
            exec_done,
            # One struct call for the whole batch rather than one per entry.
            struct.pack(f">{len(records)}I", *records),
            b"".join(payloads),
            "" if expect is None else "=" + expect,
            execution,
            root,
            len(members),
            *members,
        ]
        return keys, args

    def stage_entry(self, entry: Entry) -> bool:
        """Stage one entry that has no file (an API write on a building version); True if now due."""
        return self.stage_write(entry)[1]

    def stage_write(self, entry: Entry) -> tuple[str, bool]:
        """`stage_entry`, also returning the entry's stream id (for `withdraw`)."""
        target = entry.target
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.keys.stream(target), {"e": entry.to_json()})
        pipe.exists(self.keys.done(target))
        stream_id, done = pipe.execute()
        # Race: the version may complete between the XADD and this check. Either the completion's
        # apply reads our entry (it was added first), or we see the flag and make it due ourselves.
        if done:
            self.redis.zadd(self.keys.due, {target.key: now_ms()}, nx=True)
        return stream_id.decode(), bool(done)

    def stage_writes(self, entries: list[Entry]) -> list[tuple[str, bool]]:
        """`stage_write` of many entries in one round trip: (stream id, target done) of each.

        Not one MULTI: each entry's EXISTS runs after its own XADD on this connection, which is
        all the race in `stage_write` needs (a completion between the two either sees the entry
        or is seen here). The caller makes the done targets it applies due (`make_due`).
        """
        pipe = self.redis.pipeline(transaction=False)
        for entry in entries:
            pipe.xadd(self.keys.stream(entry.target), {"e": entry.to_json()})
            pipe.exists(self.keys.done(entry.target))
        replies = pipe.execute()
        return [(replies[i].decode(), bool(replies[i + 1])) for i in range(0, len(replies), 2)]

    def make_due(self, targets: list[Target]) -> None:
        """Put targets in the due set (kept if there already): the sweep applies them if the
        apply that is about to run does not get to (its process dies first)."""
        if targets:
            self.redis.zadd(self.keys.due, {t.key: now_ms() for t in targets}, nx=True)

    def done_flags(self, targets: list[Target]) -> list[bool]:
        """`is_done` of each target, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for target in targets:
            pipe.exists(self.keys.done(target))
        return [bool(found) for found in pipe.execute()]

    def withdraw(self, target: Target, stream_id: str) -> None:
        """Take back one staged entry that has not been applied (an API write answered with an error)."""
        self.redis.xdel(self.keys.stream(target), stream_id)

    def record_rejects(self, rejects: list[Reject]) -> None:
        """Record rejects that belong to no staged batch (an apply refusing a member entry, a file
        that cannot be read), in one round trip."""
        if not rejects:
            return
        pipe = self.redis.pipeline(transaction=True)
        for start in range(0, len(rejects), 1000):
            pipe.lpush(self.keys.rejects, *(r.to_json() for r in rejects[start : start + 1000]))
        pipe.ltrim(self.keys.rejects, 0, REJECTS_KEPT - 1)
        pipe.execute()

    def rejects(self, limit: int = 100) -> list[Reject]:
        """The newest rejects first."""
        raw = cast(list[bytes], self.redis.lrange(self.keys.rejects, 0, limit - 1))
        return [Reject(**orjson.loads(r)) for r in raw]

    # -- completion --------------------------------------------------------------------------

    def is_done(self, target: Target) -> bool:
        return bool(self.redis.exists(self.keys.done(target)))

    def knows_execution(self, execution: str) -> bool:
        """Whether staging holds anything of `execution` (its lines, files or completion)."""
        pipe = self.redis.pipeline(transaction=False)
        done = self.keys.done(Target("execution", execution=execution))
        pipe.exists(self.keys.execution_targets(execution), done)
        pipe.hexists(self.keys.executions, execution)
        found, known = pipe.execute()
        return bool(found) or bool(known)

    def complete_version(self, target: Target) -> list[str]:
        """Mark a version complete; it and its dataset become due. Returns the due targets."""
        # Race with the watcher: the flag is set in the same transaction that makes the version
        # due, and the staging script checks the flag atomically with its XADD. An entry staged
        # before this point is read by the apply this completion triggers; one staged after it
        # sees the flag and makes the version due again by itself. Neither order strands it.
        dataset = target.dataset_target
        now = now_ms()
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.done(target), now_iso(), nx=True)
        pipe.zadd(self.keys.due, {target.key: now, dataset.key: now}, nx=True)
        pipe.execute()
        return [target.key, dataset.key]

    def complete_execution(self, execution: str) -> list[str]:
        """Mark an execution complete: its datums and dataset lines become due, and the versions
        its datums put files into complete. Watchers are told to flush its last partial line."""
        exe = Target.for_execution(execution)
        # Order matters: the flag first, then the read of the target set. A line staged before
        # the flag is in the set we read; one staged after sees the flag in the staging script.
        # The execution becomes a candidate of retention with its flag (NX: the first completion
        # counts, so a repeated event does not hold its state in Redis for longer).
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.done(exe), now_iso(), nx=True)
        pipe.zadd(self.keys.completed, {execution: now_ms()}, nx=True)
        pipe.execute()
        self.redis.publish(self.keys.events, execution)
        members = cast(set[bytes], self.redis.smembers(self.keys.execution_targets(execution)))
        due = {exe.key}
        for raw in sorted(members):
            op, key = raw.decode()[:1], raw.decode()[2:]
            if op == "m":
                due.update(self.complete_version(Target.parse(key)))
            elif op == "d":
                due.add(key)
        now = now_ms()
        self.redis.zadd(self.keys.due, dict.fromkeys(due, now), nx=True)
        return sorted(due)

    # -- retention (worker/retention.py) -----------------------------------------------------

    def completed_before(self, seconds_ago: float) -> list[str]:
        """Executions completed at least `seconds_ago` whose staging state is still in Redis."""
        limit = now_ms() - int(seconds_ago * 1000)
        raw = cast(list[bytes], self.redis.zrangebyscore(self.keys.completed, "-inf", limit))
        return [r.decode() for r in raw]

    def executions_under(self, root: str) -> list[str]:
        """Executions held in Redis whose files were read under `root` (`host:path`)."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(self.keys.executions))
        return sorted(k.decode() for k, v in raw.items() if v.decode() == root)

    def held(self, execution: str) -> Held:
        """An execution's staging state as Redis holds it now."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zscore(self.keys.completed, execution)
        pipe.smembers(self.keys.execution_files(execution))
        pipe.smembers(self.keys.execution_targets(execution))
        score, raw_files, members = pipe.execute()
        files = sorted(f.decode() for f in raw_files)
        targets = sorted({m.decode()[2:] for m in members})
        versions = [t for t in targets if Target.parse(t).kind == "version"]
        pipe = self.redis.pipeline(transaction=False)
        for file in files:
            pipe.hget(self.keys.offsets, file)
            pipe.get(self.keys.lines(file))
        for key in versions:
            pipe.get(self.keys.done(Target.parse(key)))
        answers = pipe.execute()
        held = Held(execution, None if score is None else int(score), {}, {}, targets, {})
        for i, file in enumerate(files):
            state, digests = answers[2 * i], answers[2 * i + 1]
            if state is not None:
                held.files[file], held.digests[file] = state.decode(), digests or b""
        for key, flag in zip(versions, answers[2 * len(files) :], strict=True):
            if flag is not None:
                held.flags[key] = flag.decode()
        return held

    def ever_forgot(self) -> bool:
        """True once retention forgot an execution (only then can a file have a finished record)."""
        return bool(self.redis.exists(self.keys.stream_floor))

    def unapplied_by(
        self, execution: str, targets: list[str], watermarks: dict[str, str | None], limit: int = READ_BATCH
    ) -> list[str]:
        """The targets holding an entry of `execution` past their applied watermark (or more than
        `limit` entries to look through past it: held, to be safe)."""
        held = []
        for key in targets:
            target = Target.parse(key)
            if target.kind == "execution" and target.execution != execution:
                continue
            for seen, (_, entry) in enumerate(self.read_after(target, watermarks.get(key)), 1):
                if entry.source.execution == execution or seen >= limit or target.kind == "execution":
                    held.append(key)
                    break
        return held

    def forget(self, held: Held, watermarks: dict[str, str | None], *, whole: bool) -> bool:
        """Delete what `held` read, if nothing moved since (see _FORGET); True if deleted.

        `watermarks`: each target's applied watermark, from the database. `whole=False` takes
        only the files' state (an execution not completed whose folder was deleted).
        """
        execution = held.execution
        keys = [
            self.keys.offsets,
            self.keys.execution_files(execution),
            self.keys.execution_targets(execution),
            self.keys.done(Target.for_execution(execution)),
            self.keys.completed,
            self.keys.executions,
            self.keys.due,
            self.keys.known_versions,
            self.keys.stream_floor,
            *(self.keys.lines(f) for f in held.files),
        ]
        args: list[Any] = [execution, "1" if whole else "0", len(held.files)]
        for file, state in held.files.items():
            args += [file, state]
        for key in held.targets:
            target = Target.parse(key)
            keys += [self.keys.stream(target), self.keys.done(target)]
            args += [key, watermarks.get(key) or "", "1" if target.kind == "version" else "0"]
        return bool(self._forget(keys=keys, args=args))

    def restore(
        self,
        file: str,
        state: str,
        digests: bytes,
        execution: str,
        *,
        root: str = "",
        completed_ms: int | None = None,
        flags: dict[str, str] | None = None,
    ) -> str | None:
        """Put a finished file's state back (see _RESTORE); the checkpoint Redis now holds."""
        flags = flags or {}
        completed_iso = (
            "" if completed_ms is None else datetime.fromtimestamp(completed_ms / 1000, UTC).isoformat()
        )
        keys = [
            self.keys.offsets,
            self.keys.lines(file),
            self.keys.execution_files(execution),
            self.keys.executions,
            self.keys.done(Target.for_execution(execution)),
            self.keys.completed,
            *(self.keys.done(Target.parse(v)) for v in flags),
        ]
        args: list[Any] = [file, state, digests, execution, root, completed_iso, completed_ms or 0]
        args += flags.values()
        raw = self._restore(keys=keys, args=args)
        return raw.decode() if isinstance(raw, bytes) else raw

    def memory(self) -> dict[str, Any]:
        """Redis's memory (`INFO memory`) and the oldest completed execution still held, for status."""
        info = self.redis.info("memory")
        raw = self.redis.zrange(self.keys.completed, 0, 0, withscores=True)
        oldest = cast(list[tuple[bytes, float]], raw)
        age = max(0.0, (now_ms() - oldest[0][1]) / 1000) if oldest else None
        return {
            "used_memory": int(info.get("used_memory", 0)),
            "used_memory_human": str(info.get("used_memory_human", "")),
            "maxmemory": int(info.get("maxmemory", 0)),
            "held_executions": int(self.redis.hlen(self.keys.executions)),
            "oldest_retained": oldest[0][0].decode() if oldest else None,
            "oldest_retained_seconds": None if age is None else round(age, 3),
        }

    # -- the apply side ----------------------------------------------------------------------

    def snapshots(self, targets: list[Target], count: int | None = None) -> list[Snapshot]:
        """`snapshot` of many targets in one round trip, at most `count` entries each (default
        READ_BATCH; the rest is read on by `read_after`, under the lock): what a batched apply
        reads first."""
        count = READ_BATCH if count is None else count
        if not targets:
            return []
        names = [t.key for t in targets]
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget([self.keys.done(t) for t in targets])
        pipe.hmget(self.keys.quarantine, names)
        pipe.hmget(self.keys.failures, names)
        for target in targets:
            pipe.xrange(self.keys.stream(target), min="-", max="+", count=count)
        done, quarantined, failed, *streams = pipe.execute()
        return [
            Snapshot(
                done[i] is not None,
                [(raw_id.decode(), Entry.from_json(fields[b"e"])) for raw_id, fields in streams[i]],
                whole=len(streams[i]) < count,
                quarantined=quarantined[i] is not None,
                failed=failed[i] is not None,
            )
            for i in range(len(targets))
        ]

    def snapshot(self, target: Target) -> Snapshot:
        """A target's completion flag and first staged entries, read in one round trip.

        An apply reads this before it takes the database's write lock, so that the other worker
        can write while this one waits for Redis and decodes. Nothing in it can go stale for the
        apply: a staged entry never changes and is trimmed only once applied (at or before the
        watermark the lock then reveals, and `read_after` skips those); a completion flag, once
        set, stays. What is staged after the snapshot is past the watermark this apply commits,
        and `finish` then leaves the target due for the next apply.
        """
        return self.snapshots([target])[0]

    def read_after(
        self, target: Target, watermark: str | None, snapshot: Snapshot | None = None
    ) -> Iterator[tuple[str, Entry]]:
        """Staged entries of a target after `watermark` (exclusive), in order, as (stream id, entry).

        With a `snapshot` of the target, its entries are used and Redis is read only past them.
        """
        if snapshot is not None:
            yield from after_watermark(snapshot.entries, watermark)
            if snapshot.whole:
                # The end of the stream as it was read: see `snapshot` for what comes after.
                return
            last = snapshot.entries[-1][0]
            if not watermark or _stream_order(last) > _stream_order(watermark):
                watermark = last
        stream = self.keys.stream(target)
        start = f"({watermark}" if watermark else "-"
        while True:
            batch = self.redis.xrange(stream, min=start, max="+", count=READ_BATCH)
            if not batch:
                return
            for raw_id, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], batch):
                stream_id = raw_id.decode()
                yield stream_id, Entry.from_json(fields[b"e"])
            if len(batch) < READ_BATCH:
                # The end of the stream as it was read. An entry staged since lies after the
                # watermark this apply commits, so `finish` leaves the target due for the next.
                return
            start = f"({stream_id}"

    def finish_many(self, finished: list[tuple[Target, str | None, str | None]]) -> list[bool]:
        """After a commit: each (target, watermark, completed_at) leaves the due set unless newer
        entries arrived, and its applied entries are trimmed, in one script call for a batch
        (each target's finish depends on its own keys only). Returns which left the due set.

        `completed_at`: the version is completed in the database; its completion flag is put
        back (if Redis lost it), so that its late lines keep being applied.
        """
        if not finished:
            return []
        keys, args = [self.keys.due], []
        for target, watermark, completed_at in finished:
            keys += [self.keys.stream(target), self.keys.done(target)]
            args += [target.key, watermark or "", completed_at or ""]
        return [bool(left) for left in self._finish(keys=keys, args=args)]

    def finish(self, target: Target, watermark: str | None, completed_at: str | None = None) -> bool:
        """`finish_many` of one target."""
        return self.finish_many([(target, watermark, completed_at)])[0]

    # -- failing applies and quarantine ------------------------------------------------------

    def note_failure(self, target: Target) -> int:
        """Count one more failed apply of `target` (an error that is not transient); the count."""
        return int(self.redis.hincrby(self.keys.failures, target.key, 1))

    def clear_failures(self, *targets: Target) -> None:
        """The targets applied: their next failure starts the count again."""
        if targets:
            self.redis.hdel(self.keys.failures, *(t.key for t in targets))

    def quarantine(self, target: Target, error: str, attempts: int, at: str) -> None:
        """Hold `target`: its entries stay staged, and applies skip it until `release`."""
        record = orjson.dumps({"error": error, "attempts": attempts, "at": at})
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.quarantine, target.key, record)
        pipe.zrem(self.keys.due, target.key)
        pipe.execute()

    def hold(self, target: Target) -> bool:
        """An apply found `target` quarantined: keep it out of the due set (see `_HOLD`)."""
        return bool(self._hold(keys=[self.keys.quarantine, self.keys.due], args=[target.key]))

    def release(self, target: Target) -> None:
        """Put a quarantined target back: its failure count restarts and it is due again."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.keys.quarantine, target.key)
        pipe.hdel(self.keys.failures, target.key)
        pipe.zadd(self.keys.due, {target.key: now_ms()}, nx=True)
        pipe.execute()

    def quarantined(self) -> dict[str, dict[str, Any]]:
        """Every quarantined target with its record (error, attempts, at)."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(self.keys.quarantine))
        return {k.decode(): orjson.loads(v) for k, v in sorted(raw.items())}

    def quarantined_count(self) -> int:
        return int(self.redis.hlen(self.keys.quarantine))


@dataclass(frozen=True)
class Snapshot:
    """What `Staging.snapshot` read of a target."""

    done: bool
    entries: list[tuple[str, Entry]]  # (stream id, entry), the stream's first READ_BATCH
    whole: bool  # the entries reached the end of the stream as it was
    quarantined: bool = False  # held after too many failed applies (`Staging.quarantine`)
    failed: bool = False  # an earlier apply failed: a success clears the count


def after_watermark(entries: list[tuple[str, Entry]], watermark: str | None) -> list[tuple[str, Entry]]:
    """The (stream id, entry) pairs of `entries` after `watermark` (None: all of them)."""
    if not watermark:
        return entries
    after = _stream_order(watermark)
    return [(stream_id, entry) for stream_id, entry in entries if _stream_order(stream_id) > after]


def _stream_order(stream_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair (`"10-2"` sorts before `"9-0"` as text)."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq)


def _consecutive_runs(outcomes: list[LineOutcome]) -> list[list[LineOutcome]]:
    """Split lines into runs of consecutive numbers (one run, as a file is read); [[]] for none."""
    runs: list[list[LineOutcome]] = [[]]
    for outcome in outcomes:
        if runs[-1] and outcome.number != runs[-1][-1].number + 1:
            runs.append([])
        runs[-1].append(outcome)
    return runs


def _member(entry: Entry) -> str:
    """How the execution's target set remembers this entry's target."""
    kind = entry.target.kind
    if entry.op == "member":
        return "m:" + entry.target.key
    return {"dataset": "d:", "version": "v:", "execution": "x:"}[kind] + entry.target.key


def _decoded(reply: Any) -> list[str]:
    return [d.decode() if isinstance(d, bytes) else d for d in reply]
