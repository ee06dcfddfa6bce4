-- After an apply committed: drop a target from the due set only if nothing newer than the applied
-- watermark was staged meanwhile (a line staged during the apply keeps the target due), then trim
-- what was applied.
-- KEYS: 1 the target's stream, 2 due.
-- ARGV: 1 target, 2 the applied watermark ("" = nothing applied yet).
-- Returns 1 when the target left the due set, else 0.
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
