-- Retention: take one execution's staging state out of Redis, once the database holds what must
-- outlive it (see worker/retention.py). Nothing is deleted if a file's checkpoint moved since it
-- was read (a batch of this execution staged meanwhile); the targets it fed go too if they are
-- not due and hold nothing past their applied watermark.
-- KEYS: 1 offsets, 2 the execution's file set, 3 its target set, 4 its done flag, 5 completed,
--       6 executions, 7 due, 8 known versions, 9 stream floor, 10..9+N the files' line digests,
--       then per target its stream and its done flag.
-- ARGV: 1 execution, 2 "1" = everything (completed) / "0" = the files only (folder deleted before
--       completion: its staged entries wait for its completion), 3 N, then N (file, checkpoint)
--       pairs, then per target (target, applied watermark or "", "1" if a version).
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
