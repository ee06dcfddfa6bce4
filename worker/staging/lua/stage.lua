-- Stage one batch of a file's lines with the file's new checkpoint, atomically.
-- KEYS: 1 offsets, 2 due, 3 rejects, 4 line digests of the file, 5 the execution's target set,
--       6 known versions, 7 the execution's file set, 8 executions, 9 stream floor, 10.. streams
--       and done flags, referenced by index from the records.
-- ARGV: 1 file, 2 state JSON ("" = leave), 3 now (ms), 4 ISO time, 5 rejects kept, 6 number of
--       the batch's first line, 7 one 8-byte digest per line of the batch (consecutive lines),
--       8 index of the execution's done flag in KEYS, 9 the records (struct '>IIIIII' each:
--       line - first line, op, stream, version-done flag, member, payload length), 10 the
--       payloads, one after the other, 11 the checkpoint the batch was read from ("" = no check;
--       "=" + state JSON, "=" alone: none), 12 execution, 13 root it was read under ("" = leave),
--       14 M, 15..14+M the distinct members ('<op>:<target>' of the execution's target set).
-- Returns the targets that became due; or an error reply STALE when ARGV 11 no longer matches.
-- The per-batch constants (done flags, members, known versions) are looked up once per batch, and
-- the records and payloads are packed into two arguments: encoding one argument per entry in
-- redis-py, not Redis, was the cost (a seventh of ingest).
local now, iso, kept = ARGV[3], ARGV[4], tonumber(ARGV[5])
local first_line, digests, xi, records = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8]), ARGV[9]
local payloads = ARGV[10]

-- The checkpoint the batch was read from must still be the file's: retention may have taken the
-- execution's state out of Redis between the watcher's read of the checkpoint and this call (the
-- batch would land without the execution's done flag and digests). The reader then reads again.
-- A batch whose reply was lost and that is sent again finds its own checkpoint: it already ran.
if ARGV[11] ~= '' then
  local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
  if cur ~= string.sub(ARGV[11], 2) then
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
  local seen = redis.call('GETRANGE', KEYS[4], pos0, pos0 + #digests - 1)
  for k = 0, lines - 1 do
    if string.sub(seen, k * 8 + 1, k * 8 + 8) ~= string.sub(digests, k * 8 + 1, k * 8 + 8) then
      fresh = k
      break
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
      local member = ARGV[14 + mi]
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
  if ARGV[13] ~= '' then redis.call('HSET', KEYS[8], ARGV[12], ARGV[13]) end
end
local out = {}
for target, _ in pairs(due) do out[#out + 1] = target end
return out
