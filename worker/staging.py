"""Staging in Redis: entries per target in arrival order, file checkpoints, completion flags, the due set.

Every write that must go with another goes in one Lua script: a batch of lines is staged together
with the checkpoint of the file they came from, so a watcher killed at any instant either staged
a batch and moved its offset, or did neither. The database, not Redis, decides what was applied
(see store/apply.py); Redis only has to never lose an entry that its offset claims was handed on.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import redis
from redis.exceptions import NoScriptError

from .keys import Keys
from .records import Entry
from .uris import Target

Enqueue = Callable[[str], None]
REJECTS_KEPT = 10_000
READ_BATCH = 1000

# KEYS: 1 offsets, 2 due, 3 rejects, 4 line digests of the file, 5 the execution's target set,
#       6 known versions, 7.. streams and done flags, referenced by index from the records.
# ARGV: 1 file, 2 state JSON ("" = leave), 3 now (ms), 4 "1" = skip the digest check (replay),
#       5 ISO time, 6 rejects kept, 7 number of the batch's first line, 8 one 8-byte digest per
#       line of the batch (consecutive lines), 9 index of the execution's done flag in KEYS,
#       10 the records (struct '>IIIIII' each: line - first line, op, stream, version-done flag,
#       member, payload length), 11 the payloads, one after the other, 12 M, 13..12+M the distinct
#       members ('<op>:<target>' of the execution's target set).
# The per-batch constants (done flags, members, known versions) are looked up once per batch, and
# the records and payloads are packed into two arguments: encoding one argument per entry in
# redis-py, not Redis, was the cost (a seventh of ingest).
_STAGE = """
local now, force, iso, kept = ARGV[3], ARGV[4] == '1', ARGV[5], tonumber(ARGV[6])
local first_line, digests, xi, records = tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9]), ARGV[10]
local payloads = ARGV[11]
local due = {}
local function mark(target) due[target] = true end

-- A line already staged at this number with the same bytes is the same line read again after a
-- rewrite (valohai-utils rewrites the whole file): stage it once only. That holds for the unchanged
-- start of the file only: from the first line that differs, every later line is new in order too
-- (else an old value staged earlier would win over the change), so the digests after it are
-- dropped and those lines are staged.
local lines = #digests / 8
local pos0 = (first_line - 1) * 8
local fresh = nil  -- offset in the batch of the first line to stage; nil: all seen before
if lines > 0 then
  if force then
    fresh = 0
  else
    local seen = redis.call('GETRANGE', KEYS[4], pos0, pos0 + #digests - 1)
    for k = 0, lines - 1 do
      if string.sub(seen, k * 8 + 1, k * 8 + 8) ~= string.sub(digests, k * 8 + 1, k * 8 + 8) then
        fresh = k
        break
      end
    end
  end
end
if fresh ~= nil then
  local pos = pos0 + fresh * 8
  if redis.call('STRLEN', KEYS[4]) > pos then
    if pos == 0 then
      redis.call('DEL', KEYS[4])
    else
      redis.call('SET', KEYS[4], redis.call('GETRANGE', KEYS[4], 0, pos - 1))
    end
  end
  redis.call('SETRANGE', KEYS[4], pos, string.sub(digests, fresh * 8 + 1))
end

local exec_done = redis.call('EXISTS', KEYS[xi]) == 1
local version_done = {}
local function is_done(vi)
  if version_done[vi] == nil then version_done[vi] = redis.call('EXISTS', KEYS[vi]) == 1 end
  return version_done[vi]
end
local members, seen_member = {}, {}
local at, pat = 1, 1
for r = 1, #records / 24 do
  local k, op, si, vi, mi, length
  k, op, si, vi, mi, length, at = struct.unpack('>IIIIII', records, at)
  local payload = string.sub(payloads, pat, pat + length - 1)
  pat = pat + length
  if fresh ~= nil and k >= fresh then
    if op == 2 then
      redis.call('LPUSH', KEYS[3], payload)
    else
      redis.call('XADD', KEYS[si], '*', 'e', payload)
      local member = ARGV[12 + mi]
      if not seen_member[mi] then
        seen_member[mi] = true
        members[#members + 1] = member
        -- A version seen for the first time: hand it out so an apply registers it as building.
        if vi > 0 and redis.call('SADD', KEYS[6], string.sub(member, 3)) == 1 then
          mark(string.sub(member, 3))
        end
      end
      local target = string.sub(member, 3)
      local is_due
      if op == 1 then
        -- The execution completed before this late datum line arrived: the version it feeds
        -- is complete too (execution_completed completes the versions its datums name).
        if exec_done and not is_done(vi) then
          redis.call('SET', KEYS[vi], iso)
          version_done[vi] = true
          local ds = string.match(target, '^(dataset://[^/]+)/')
          redis.call('ZADD', KEYS[2], 'NX', now, ds)
          mark(ds)
        end
        is_due = is_done(vi)
      elseif vi > 0 then
        is_due = is_done(vi)
      else
        is_due = exec_done
      end
      if is_due then
        redis.call('ZADD', KEYS[2], 'NX', now, target)
        mark(target)
      end
    end
  end
end
for i = 1, #members, 1000 do
  redis.call('SADD', KEYS[5], unpack(members, i, math.min(i + 999, #members)))
end
redis.call('LTRIM', KEYS[3], 0, kept - 1)
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
local out = {}
for target, _ in pairs(due) do out[#out + 1] = target end
return out
"""
_OPS = {"set": 0, "member": 1}
_REJECT = 2

# Drop a target from the due set only if nothing newer than the applied watermark was staged
# meanwhile (a line staged during the apply keeps the target due), then trim what was applied.
_FINISH = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local function newer(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
-- With no watermark (nothing applied yet), only an empty stream means nothing is left.
if #last == 0 or (ARGV[2] ~= '' and not newer(last[1][1], ARGV[2])) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  if ARGV[2] ~= '' then redis.call('XTRIM', KEYS[1], 'MINID', ARGV[2]) end
  return 1
end
return 0
"""


# Keep a quarantined target out of the due set, unless `release` put it back meanwhile: the mark
# and the removal go together, so a retry racing with a held apply still leaves the target due.
_HOLD = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Reject:
    """A line that could not be staged, and why; never holds the line's content (it may hold secrets)."""

    file: str
    line: int
    offset: int
    reason: str
    execution: str = ""
    at: str = ""

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__)


@dataclass(slots=True)
class LineOutcome:
    """What one line of a file became: entries to stage, or a reject."""

    number: int
    digest: bytes
    entries: list[Entry] = field(default_factory=list)
    reject: Reject | None = None


def line_digest(data: bytes | None) -> bytes:
    """8-byte digest of a line's bytes (an over-long line, whose bytes were not kept, has a fixed one)."""
    return hashlib.blake2b(b"\x00over-long" if data is None else data, digest_size=8).digest()


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


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


class Staging:
    """The staging area of one deployment: a Redis client and the key layout."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._last_swept: dict[str, float] = {}
        self._stage = client.register_script(_STAGE)
        self._finish = client.register_script(_FINISH)
        self._hold = client.register_script(_HOLD)

    # -- the watcher's side ------------------------------------------------------------------

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
        force: bool = False,
    ) -> list[str]:
        """Stage a batch of lines and the file's new checkpoint atomically; return targets now due.

        The lines must be consecutive (as a file is read); a batch with a gap is staged as several
        calls, the checkpoint going with the last.
        """
        outcomes = list(outcomes)
        runs = _consecutive_runs(outcomes)
        due: set[str] = set()
        for i, run in enumerate(runs):
            keys, args = self._stage_args(
                file, execution, run, state_json if i == len(runs) - 1 else "", force
            )
            due.update(self._run_stage(keys, args))
        return sorted(due)

    def send_lines(
        self, file: str, execution: str, outcomes: list[LineOutcome], state_json: str, *, force: bool = False
    ) -> Sent:
        """`stage_lines`, split in two: send the batch now, wait for Redis with `Sent.wait()`.

        The reader parses its next batch while Redis runs the script of this one (a quarter of
        ingest time was spent waiting for it). Send the next batch only after `wait()` returned:
        if this batch failed, a later one must not move the checkpoint past its lines.
        """
        if len(_consecutive_runs(outcomes)) > 1:  # a gap (replay of a range): the plain way
            return Sent(self, due=self.stage_lines(file, execution, outcomes, state_json, force=force))
        keys, args = self._stage_args(file, execution, outcomes, state_json, force)
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
        self, file: str, execution: str, outcomes: list[LineOutcome], state_json: str, force: bool
    ) -> tuple[list[str], list[Any]]:
        index: dict[str, int] = {}
        keys = [
            self.keys.offsets,
            self.keys.due,
            self.keys.rejects,
            self.keys.lines(file),
            self.keys.execution_targets(execution),
            self.keys.known_versions,
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
            _now_ms(),
            "1" if force else "0",
            now_iso(),
            REJECTS_KEPT,
            first,
            b"".join(o.digest for o in outcomes),
            exec_done,
            # One struct call for the whole batch rather than one per entry.
            struct.pack(f">{len(records)}I", *records),
            b"".join(payloads),
            len(members),
            *members,
        ]
        return keys, args

    def stage_entry(self, entry: Entry) -> bool:
        """Stage one entry that has no file (an API write on a building version); True if now due."""
        target = entry.target
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.keys.stream(target), {"e": entry.to_json()})
        pipe.exists(self.keys.done(target))
        _, done = pipe.execute()
        # Race: the version may complete between the XADD and this check. Either the completion's
        # apply reads our entry (it was added first), or we see the flag and make it due ourselves.
        if done:
            self.redis.zadd(self.keys.due, {target.key: _now_ms()}, nx=True)
        return bool(done)

    def record_reject(self, reject: Reject) -> None:
        """Record a reject that belongs to no staged batch (e.g. an unreadable file)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.lpush(self.keys.rejects, reject.to_json())
        pipe.ltrim(self.keys.rejects, 0, REJECTS_KEPT - 1)
        pipe.execute()

    def rejects(self, limit: int = 100) -> list[Reject]:
        """The newest rejects first."""
        raw = cast(list[bytes], self.redis.lrange(self.keys.rejects, 0, limit - 1))
        return [Reject(**orjson.loads(r)) for r in raw]

    # -- completion --------------------------------------------------------------------------

    def is_done(self, target: Target) -> bool:
        return bool(self.redis.exists(self.keys.done(target)))

    def complete_version(self, target: Target) -> list[str]:
        """Mark a version complete; it and its dataset become due. Returns the due targets."""
        # Race with the watcher: the flag is set in the same transaction that makes the version
        # due, and the staging script checks the flag atomically with its XADD. An entry staged
        # before this point is read by the apply this completion triggers; one staged after it
        # sees the flag and makes the version due again by itself. Neither order strands it.
        dataset = target.dataset_target
        now = _now_ms()
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
        self.redis.set(self.keys.done(exe), now_iso(), nx=True)
        self.redis.publish(self.keys.events, execution)
        members = cast(set[bytes], self.redis.smembers(self.keys.execution_targets(execution)))
        due = {exe.key}
        for raw in sorted(members):
            op, key = raw.decode()[:1], raw.decode()[2:]
            if op == "m":
                due.update(self.complete_version(Target.parse(key)))
            elif op == "d":
                due.add(key)
        now = _now_ms()
        self.redis.zadd(self.keys.due, dict.fromkeys(due, now), nx=True)
        return sorted(due)

    # -- the apply side ----------------------------------------------------------------------

    def snapshot(self, target: Target) -> Snapshot:
        """A target's completion flag and first staged entries, read in one round trip.

        An apply reads this before it takes the database's write lock, so that the other worker
        can write while this one waits for Redis and decodes. Nothing in it can go stale for the
        apply: a staged entry never changes and is trimmed only once applied (at or before the
        watermark the lock then reveals, and `read_after` skips those); a completion flag, once
        set, stays. What is staged after the snapshot is past the watermark this apply commits,
        and `finish` then leaves the target due for the next apply.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.keys.done(target))
        pipe.xrange(self.keys.stream(target), min="-", max="+", count=READ_BATCH)
        pipe.hexists(self.keys.quarantine, target.key)
        pipe.hexists(self.keys.failures, target.key)
        done, batch, quarantined, failed = pipe.execute()
        entries = [(raw_id.decode(), Entry.from_json(fields[b"e"])) for raw_id, fields in batch]
        return Snapshot(
            bool(done),
            entries,
            whole=len(batch) < READ_BATCH,
            quarantined=bool(quarantined),
            failed=bool(failed),
        )

    def read_after(
        self, target: Target, watermark: str | None, snapshot: Snapshot | None = None
    ) -> Iterator[tuple[str, Entry]]:
        """Staged entries of a target after `watermark` (exclusive), in order, as (stream id, entry).

        With a `snapshot` of the target, its entries are used and Redis is read only past them.
        """
        if snapshot is not None:
            after = _stream_order(watermark) if watermark else (-1, -1)
            for stream_id, entry in snapshot.entries:
                if _stream_order(stream_id) > after:
                    yield stream_id, entry
            if snapshot.whole:
                # The end of the stream as it was read: see `snapshot` for what comes after.
                return
            last = snapshot.entries[-1][0]
            if not watermark or _stream_order(last) > after:
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

    def finish(self, target: Target, watermark: str | None, completed_at: str | None = None) -> bool:
        """After a commit: leave the due set unless newer entries arrived; trim applied entries.

        `completed_at`: the version is completed in the database; put its completion flag back
        (if Redis lost it) in the same round trip, so its late lines keep being applied.
        """
        keys, args = [self.keys.stream(target), self.keys.due], [target.key, watermark or ""]
        if completed_at is None:
            return bool(self._finish(keys=keys, args=args))
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.done(target), completed_at, nx=True)
        self._finish(keys=keys, args=args, client=pipe)
        return bool(pipe.execute()[-1])

    # -- failing applies and quarantine ------------------------------------------------------

    def note_failure(self, target: Target) -> int:
        """Count one more failed apply of `target` (an error that is not transient); the count."""
        return int(self.redis.hincrby(self.keys.failures, target.key, 1))

    def clear_failures(self, target: Target) -> None:
        """The target applied: its next failure starts the count again."""
        self.redis.hdel(self.keys.failures, target.key)

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
        pipe.zadd(self.keys.due, {target.key: _now_ms()}, nx=True)
        pipe.execute()

    def quarantined(self) -> dict[str, dict[str, Any]]:
        """Every quarantined target with its record (error, attempts, at)."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(self.keys.quarantine))
        return {k.decode(): orjson.loads(v) for k, v in sorted(raw.items())}

    def quarantined_count(self) -> int:
        return int(self.redis.hlen(self.keys.quarantine))

    def due_targets(self, older_than: float) -> list[str]:
        """Targets due for longer than `older_than` seconds (their apply was lost or is slow)."""
        limit = _now_ms() - int(older_than * 1000)
        raw = cast(list[bytes], self.redis.zrangebyscore(self.keys.due, "-inf", limit))
        return [r.decode() for r in raw]

    def backlog(self) -> tuple[int, float]:
        """(targets due for an apply, seconds the oldest of them has been due)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.keys.due)
        pipe.zrange(self.keys.due, 0, 0, withscores=True)
        count, oldest = pipe.execute()
        age = max(0.0, (_now_ms() - oldest[0][1]) / 1000) if oldest else 0.0
        return int(count), age

    def beat(self, role: str, name: str, info: dict[str, Any], ttl: float) -> None:
        """Announce that a watcher or worker is alive, with what it wants `sidecar status` to show."""
        payload = {"role": role, "name": name, "at": now_iso(), **info}
        self.redis.set(self.keys.heartbeat(role, name), orjson.dumps(payload), px=int(ttl * 1000))

    def heartbeats(self) -> list[dict[str, Any]]:
        """Every live heartbeat (expired ones are gone by themselves)."""
        keys = sorted(self.redis.scan_iter(match=self.keys.heartbeat_pattern, count=1000))
        values = cast(list[bytes | None], self.redis.mget(keys)) if keys else []
        return [orjson.loads(v) for v in values if v is not None]

    def sweep(self, enqueue: Enqueue, older_than: float) -> list[str]:
        """Enqueue an apply for every target due for too long: the backstop for a lost task.

        A target is sent again at most every `older_than` seconds by this process. The due
        score is left alone: it says since when the target has waited (`sidecar status`).
        """
        now = time.monotonic()
        targets = [
            t for t in self.due_targets(older_than) if now - self._last_swept.get(t, -1e9) >= older_than
        ]
        for key in targets:
            self._last_swept[key] = now
            enqueue(key)
        if len(self._last_swept) > 100_000:
            self._last_swept.clear()
        return targets


@dataclass(frozen=True)
class Snapshot:
    """What `Staging.snapshot` read of a target."""

    done: bool
    entries: list[tuple[str, Entry]]  # (stream id, entry), the stream's first READ_BATCH
    whole: bool  # the entries reached the end of the stream as it was
    quarantined: bool = False  # held after too many failed applies (`Staging.quarantine`)
    failed: bool = False  # an earlier apply failed: a success clears the count


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


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)
