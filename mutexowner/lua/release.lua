-- Compare-and-delete release plus hand-off notice (DESIGN invariants 1 and 8).
-- KEYS[1] lease hash   ARGV[1] token   ARGV[2] release channel   ARGV[3] releasing identity
-- Reply: 1 released, 0 not ours (already expired or taken).
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.pcall('PUBLISH', ARGV[2], ARGV[3])  -- a refused notice only costs latency
  return 1
end
return 0
