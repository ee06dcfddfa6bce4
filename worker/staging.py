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
#       6 known versions, 7 the execution's file set, 8 executions, 9 stream floor, 10.. streams
#       and done flags, referenced by index from the records.
# ARGV: 1 file, 2 state JSON ("" = leave), 3 now (ms), 4 "1" = skip the digest check (replay),
#       5 ISO time, 6 rejects kept, 7 number of the batch's first line, 8 one 8-byte digest per
#       line of the batch (consecutive lines), 9 index of the execution's done flag in KEYS,
#       10 the records (struct '>IIIIII' each: line - first line, op, stream, version-done flag,
#       member, payload length), 11 the payloads, one after the other, 12 the checkpoint the batch
#       was read from ("" = no check; "=" + state JSON, "=" alone: none), 13 execution, 14 root
#       it was read under ("" = leave), 15 M, 16..15+M the distinct members ('<op>:<target>' of
#       the execution's target set).
# The per-batch constants (done flags, members, known versions) are looked up once per batch, and
# the records and payloads are packed into two arguments: encoding one argument per entry in
# redis-py, not Redis, was the cost (a seventh of ingest).
_STAGE = """
local now, force, iso, kept = ARGV[3], ARGV[4] == '1', ARGV[5], tonumber(ARGV[6])
local first_line, digests, xi, records = tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9]), ARGV[10]
local payloads = ARGV[11]

-- The checkpoint the batch was read from must still be the file's: retention may have taken the
-- execution's state out of Redis between the watcher's read of the checkpoint and this call (the
-- batch would land without the execution's done flag and digests). The reader then reads again.
-- A batch whose reply was lost and that is sent again finds its own checkpoint: it already ran.
if ARGV[12] ~= '' then
  local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
  if cur ~= string.sub(ARGV[12], 2) then
    if ARGV[2] ~= '' and cur == ARGV[2] then return {} end
    return redis.error_reply('STALE the checkpoint of ' .. ARGV[1] .. ' moved since it was read')
  end
end

-- A stream that retention deleted and a late line creates again must go on above the watermark
-- applied from it (XADD '*' in a new stream takes Redis's clock, which may have gone back).
local checked = {}
local function xadd(si, payload)
  if checked[si] == nil then
    checked[si] = true
    if redis.call('EXISTS', KEYS[si]) == 0 then
      local floor = redis.call('GET', KEYS[9])
      if floor then
        local fm = tonumber(string.match(floor, '^(%d+)'))
        local t = redis.call('TIME')
        if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) <= fm then
          redis.call('XADD', KEYS[si], string.format('%d-*', fm + 1), 'e', payload)
          return
        end
      end
    end
  end
  redis.call('XADD', KEYS[si], '*', 'e', payload)
end

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
      xadd(si, payload)
      local member = ARGV[15 + mi]
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
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('SADD', KEYS[7], ARGV[1])
  if ARGV[14] ~= '' then redis.call('HSET', KEYS[8], ARGV[13], ARGV[14]) end
end
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


# Retention: take one execution's staging state out of Redis, once the database holds what must
# outlive it (see worker/retention.py). Nothing is deleted if a file's checkpoint moved since it
# was read (a batch of this execution staged meanwhile); the targets it fed go too if they are
# not due and hold nothing past their applied watermark.
# KEYS: 1 offsets, 2 the execution's file set, 3 its target set, 4 its done flag, 5 completed,
#       6 executions, 7 due, 8 known versions, 9 stream floor, 10..9+N the files' line digests,
#       then per target its stream and its done flag.
# ARGV: 1 execution, 2 "1" = everything (completed) / "0" = the files only (folder deleted before
#       completion: its staged entries wait for its completion), 3 N, then N (file, checkpoint)
#       pairs, then per target (target, applied watermark or "", "1" if a version).
_FORGET = """
local function newer(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local whole, n = ARGV[2] == '1', tonumber(ARGV[3])
for i = 0, n - 1 do
  if (redis.call('HGET', KEYS[1], ARGV[4 + 2 * i]) or '') ~= ARGV[5 + 2 * i] then return 0 end
end
local lasts = {}
for i = 0, n - 1 do
  redis.call('HDEL', KEYS[1], ARGV[4 + 2 * i])
  redis.call('DEL', KEYS[10 + i])
end
redis.call('DEL', KEYS[2])
redis.call('HDEL', KEYS[6], ARGV[1])
if whole then
  -- A target whose every entry is applied and that is not due goes with its stream, flag and
  -- known-version entry. One that another execution's entries (or an apply) still hold stays:
  -- this execution's own entries in it are applied (checked before, and a line of this execution
  -- staged since moved a checkpoint above).
  local a, k = 4 + 2 * n, 10 + n
  while a <= #ARGV do
    local last = redis.call('XREVRANGE', KEYS[k], '+', '-', 'COUNT', 1)
    local applied = #last == 0 or (ARGV[a + 1] ~= '' and not newer(last[1][1], ARGV[a + 1]))
    if applied and not redis.call('ZSCORE', KEYS[7], ARGV[a]) then
      if #last > 0 then lasts[#lasts + 1] = last[1][1] end
      redis.call('DEL', KEYS[k], KEYS[k + 1])
      if ARGV[a + 2] == '1' then redis.call('SREM', KEYS[8], ARGV[a]) end
    end
    a, k = a + 3, k + 2
  end
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('ZREM', KEYS[5], ARGV[1])
end
-- The floor exists once retention ever forgot something: until then no file can have a record
-- in the database, and readers need not ask it (a watcher may have no database to ask).
local floor = redis.call('GET', KEYS[9]) or '0-0'
for _, id in ipairs(lasts) do
  if newer(id, floor) then floor = id end
end
redis.call('SET', KEYS[9], floor)
return 1
"""

# Put a finished file's state back from the database record, before a new line of it is staged
# (an append or rewrite after retention). Only what is missing is written (NX everywhere): a
# watcher that restored it first, or a completion since, wins.
# KEYS: 1 offsets, 2 the file's line digests, 3 the execution's file set, 4 executions, 5 the
#       execution's done flag, 6 completed, 7.. the done flags of the versions it fed.
# ARGV: 1 file, 2 checkpoint ("" = none: a new file), 3 digests, 4 execution, 5 root,
#       6 completion ISO time ("" = not completed), 7 completion time (ms), 8.. the versions'
#       flag values (as KEYS 7..).
_RESTORE = """
if ARGV[2] ~= '' and redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 and #ARGV[3] > 0 then
  redis.call('SET', KEYS[2], ARGV[3], 'NX')
end
redis.call('SADD', KEYS[3], ARGV[1])
if ARGV[5] ~= '' then redis.call('HSETNX', KEYS[4], ARGV[4], ARGV[5]) end
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[5], ARGV[6], 'NX')
  redis.call('ZADD', KEYS[6], 'NX', ARGV[7], ARGV[4])
end
for i = 7, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 1], 'NX') end
return redis.call('HGET', KEYS[1], ARGV[1])
"""


@dataclass
class Held:
    """What Redis holds of one execution's staging state (`Staging.held`)."""

    execution: str
    completed_ms: int | None  # None: not completed
    files: dict[str, str]  # file -> its checkpoint
    digests: dict[str, bytes]  # file -> its line digests
    targets: list[str]  # the targets its lines staged for
    flags: dict[str, str]  # completed version it fed -> its done flag's value


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
        self._forget = client.register_script(_FORGET)
        self._restore = client.register_script(_RESTORE)

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
                force,
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
        force: bool = False,
        expect: str | None = None,
        root: str = "",
    ) -> Sent:
        """`stage_lines`, split in two: send the batch now, wait for Redis with `Sent.wait()`.

        The reader parses its next batch while Redis runs the script of this one (a quarter of
        ingest time was spent waiting for it). Send the next batch only after `wait()` returned:
        if this batch failed, a later one must not move the checkpoint past its lines.
        """
        if len(_consecutive_runs(outcomes)) > 1:  # a gap (replay of a range): the plain way
            due = self.stage_lines(
                file, execution, outcomes, state_json, force=force, expect=expect, root=root
            )
            return Sent(self, due=due)
        keys, args = self._stage_args(file, execution, outcomes, state_json, force, expect, root)
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
        force: bool,
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
            self.redis.zadd(self.keys.due, {target.key: _now_ms()}, nx=True)
        return stream_id.decode(), bool(done)

    def withdraw(self, target: Target, stream_id: str) -> None:
        """Take back one staged entry that has not been applied (an API write answered with an error)."""
        self.redis.xdel(self.keys.stream(target), stream_id)

    def record_reject(self, reject: Reject) -> None:
        """Record a reject that belongs to no staged batch (e.g. an unreadable file)."""
        self.record_rejects([reject])

    def record_rejects(self, rejects: list[Reject]) -> None:
        """Record rejects found after staging (an apply refusing a member entry), in one round trip."""
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
        # The execution becomes a candidate of retention with its flag (NX: the first completion
        # counts, so a repeated event does not hold its state in Redis for longer).
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.done(exe), now_iso(), nx=True)
        pipe.zadd(self.keys.completed, {execution: _now_ms()}, nx=True)
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
        now = _now_ms()
        self.redis.zadd(self.keys.due, dict.fromkeys(due, now), nx=True)
        return sorted(due)

    # -- retention (worker/retention.py) -----------------------------------------------------

    def completed_before(self, seconds_ago: float) -> list[str]:
        """Executions completed at least `seconds_ago` whose staging state is still in Redis."""
        limit = _now_ms() - int(seconds_ago * 1000)
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
        age = max(0.0, (_now_ms() - oldest[0][1]) / 1000) if oldest else None
        return {
            "used_memory": int(info.get("used_memory", 0)),
            "used_memory_human": str(info.get("used_memory_human", "")),
            "maxmemory": int(info.get("maxmemory", 0)),
            "held_executions": int(self.redis.hlen(self.keys.executions)),
            "oldest_retained": oldest[0][0].decode() if oldest else None,
            "oldest_retained_seconds": None if age is None else round(age, 3),
        }

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
