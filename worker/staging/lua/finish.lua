-- After an apply committed: for each target, drop it from the due set only if nothing newer than
-- its applied watermark was staged meanwhile (a line staged during the apply keeps the target
-- due), then trim what was applied; put a completed version's flag back if Redis lost it.
-- KEYS: 1 due, then per target i (from 0): 2+2i its stream, 3+2i its completion flag.
-- ARGV: per target i: 1+3i target, 2+3i the applied watermark ("" = nothing applied yet),
--       3+3i the completion time to put back ("" = none: not a completed version).
-- Returns, per target, 1 when it left the due set, else 0.
local function newer(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local out = {}
for i = 0, (#KEYS - 1) / 2 - 1 do
  local stream, flag = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local target, mark, completed = ARGV[1 + 3 * i], ARGV[2 + 3 * i], ARGV[3 + 3 * i]
  if completed ~= '' then redis.call('SET', flag, completed, 'NX') end
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  -- With no watermark (nothing applied yet), only an empty stream means nothing is left.
  if #last == 0 or (mark ~= '' and not newer(last[1][1], mark)) then
    redis.call('ZREM', KEYS[1], target)
    if mark ~= '' then redis.call('XTRIM', stream, 'MINID', mark) end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
