-- Put a finished file's state back from the database record, before a new line of it is staged
-- (an append or rewrite after retention). Only what is missing is written (NX everywhere): a
-- watcher that restored it first, or a completion since, wins.
-- KEYS: 1 offsets, 2 the file's line digests, 3 the execution's file set, 4 executions, 5 the
--       execution's done flag, 6 completed, 7.. the done flags of the versions it fed.
-- ARGV: 1 file, 2 checkpoint ("" = none: a new file), 3 digests, 4 execution, 5 root,
--       6 completion ISO time ("" = not completed), 7 completion time (ms), 8.. the versions'
--       flag values (as KEYS 7..).
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
