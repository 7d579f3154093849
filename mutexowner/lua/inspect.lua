-- Read-only snapshot for `mutexowner status`; never reveals the holder's token.
-- KEYS[1] lease hash   KEYS[2] fencing counter   KEYS[3] epoch hash
-- Reply: {identity, fence, pttl, counter, quiet_ms, ttl_ms, since_ms, epoch_exists}
-- ('' when absent)
local h = redis.call('HMGET', KEYS[1], 'identity', 'fence', 'ttl_ms', 'since_ms')
local pttl = redis.call('PTTL', KEYS[1])
local counter = redis.call('GET', KEYS[2]) or ''
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local quiet_until = tonumber(redis.call('HGET', KEYS[3], 'quiet_until') or '0') or 0
return {h[1] or '', h[2] or '', pttl, counter, math.max(0, quiet_until - now_ms),
        h[3] or '', h[4] or '', redis.call('EXISTS', KEYS[3])}
