-- Keep a quarantined target out of the due set, unless `release` put it back meanwhile: the mark
-- and the removal go together, so a retry racing with a held apply still leaves the target due.
-- KEYS: 1 quarantine, 2 due.
-- ARGV: 1 target.
-- Returns 1 when the target was held, 0 when it is no longer quarantined.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
return 0
