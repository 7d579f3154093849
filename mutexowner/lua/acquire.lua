-- Acquire-or-renew: the only script that writes the lease (DESIGN invariants 1, 2, 6, 7, 10).
--
-- KEYS[1] lease hash {token, identity, fence, ttl_ms, since_ms}, expires after ttl
-- KEYS[2] fencing counter: a decimal integer, never expires
-- KEYS[3] epoch hash {id, run_id, quiet_until, replicated, checked_ms}: proof that Redis
--         still holds our state
-- ARGV[1] token (fresh random per acquisition)   ARGV[2] holder identity
-- ARGV[3] ttl in ms   ARGV[4] fencing token when renewing, '' when acquiring
-- ARGV[5] a fresh random epoch id, used only if the epoch must be re-created
-- ARGV[6] check period in ms: a renewal of our own key reads the server's run_id only when
--         the last such check is at least this old ('' or 0: on every call)
--
-- Replies: {'acquired'|'renewed'|'retaken', fence, quiet_ms, ttl_ms, replicas, replicated}
--          replicas: the master's connected replicas now (-1: INFO refused in scripts;
--          -2: not read, because this is a renewal of a data set marked replicated);
--          replicated: '1' once this dataset has been seen on a master with replicas
--          {'taken', holder identity, pttl, holder fence}
--          {'quiet', '', quiet_ms, ''}: free, but nobody new may take it for quiet_ms
if redis.replicate_commands then pcall(redis.replicate_commands) end

local token, identity = ARGV[1], ARGV[2]
local ttl_ms = tonumber(ARGV[3])
local own_fence, new_epoch = ARGV[4], ARGV[5]
local check_ms = tonumber(ARGV[6] or '') or 0

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

local epoch = redis.call('HMGET', KEYS[3], 'id', 'run_id', 'quiet_until', 'replicated',
                         'checked_ms')
local cur = redis.call('HMGET', KEYS[1], 'token', 'identity', 'fence')
local quiet_until = tonumber(epoch[3]) or 0
local replicated = epoch[4] or ''

-- Replication (DESIGN invariant 10): the caller WAITs for replicas when this dataset lives,
-- or has lived, on a master with replicas. The 'replicated' mark is sticky and replicated
-- with the epoch, so an old master cut off from its replicas still says it had some. Once
-- it is set the count changes nothing, so it is read only while the mark is not set: a
-- replica that attaches is seen by the next call, whichever it is.
local function replicas_now()
  local rinfo = redis.pcall('INFO', 'replication')
  if type(rinfo) ~= 'string' then
    return -1
  end
  local n = tonumber(string.match(rinfo, 'connected_slaves:(%d+)') or '0') or 0
  if n > 0 and replicated ~= '1' then
    redis.call('HSET', KEYS[3], 'replicated', '1')
    replicated = '1'
  end
  return n
end

-- The common case: a renewal of the key that holds our token, on a server whose run_id was
-- read less than check_ms ago. Nobody else can have been granted the key since our last
-- confirmed call: a restore of older data that still holds our token leaves us the
-- legitimate holder (docs/safety.md, point 5), and every call that could hand the key to
-- someone else takes the full path below, which notices the lost state first.
local renewing = own_fence ~= '' and cur[1] == token
if renewing and epoch[1] then
  local checked = tonumber(epoch[5])
  if checked and now_ms >= checked and now_ms - checked < check_ms then
    local replicas = -2
    if replicated ~= '1' then
      replicas = replicas_now()
    end
    redis.call('PEXPIRE', KEYS[1], ttl_ms)
    return {'renewed', cur[3] or '', math.max(0, quiet_until - now_ms), ttl_ms, replicas,
            replicated}
  end
end

-- Has Redis lost its state since the epoch was written? Either the epoch is gone
-- (restart without persistence, flush) or the server instance changed (restart from
-- an older snapshot, failover to a replica). Then a lease granted before the loss may
-- still be running on its holder's clock, so nobody may start workers until one full
-- ttl has passed: the quiet period, shared by every caller through the epoch hash.
local run_id = ''
local info = redis.pcall('INFO', 'server')
if type(info) == 'string' then
  local at = string.find(info, 'run_id:', 1, true)
  if at then
    run_id = string.match(info, '^%w+', at + 7) or ''
  end
end
local replicas = -2
if not (renewing and replicated == '1') then
  replicas = replicas_now()  -- a renewal of a marked data set has no use for the count
end
local known_run = epoch[2] or ''
if not epoch[1] or (run_id ~= '' and known_run ~= '' and known_run ~= run_id) then
  quiet_until = now_ms + ttl_ms
  redis.call('HSET', KEYS[3], 'id', epoch[1] or new_epoch, 'run_id', run_id,
             'quiet_until', string.format('%.0f', quiet_until))
elseif run_id ~= '' and known_run ~= run_id then
  redis.call('HSET', KEYS[3], 'run_id', run_id)
end
local quiet_ms = math.max(0, quiet_until - now_ms)
-- Calls that leave our token in the key record when the run_id was last read.
local now_s = string.format('%.0f', now_ms)

if cur[1] == token then
  -- Ours: renewal, or an acquire whose reply was lost (idempotent acquire).
  redis.call('HSET', KEYS[3], 'checked_ms', now_s)
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  return {'renewed', cur[3] or '', quiet_ms, ttl_ms, replicas, replicated}
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'taken', cur[2] or '', redis.call('PTTL', KEYS[1]), cur[3] or ''}
end

-- Free. During a quiet period only a renewing holder (whose own lease is still valid) may
-- take it: a newcomer waits, so the old holder keeps its workers through a short Redis
-- restart instead of losing the key to a standby that would only sit out the period.
if own_fence == '' and quiet_ms > 0 then
  return {'quiet', '', quiet_ms, ''}
end
-- A renewing holder re-takes it with its own fencing token; a new holder gets
-- max(counter + 1, TIME in microseconds), strictly greater than any earlier token even
-- when the counter itself was lost with the data.
local counter = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if own_fence ~= '' and counter > tonumber(own_fence) then
  -- Someone was granted a later lease since ours: ours ended, whatever our clock says
  -- (the key was deleted by hand, or expired early). Never re-take with an older token.
  return {'taken', '', 0, ''}
end
local fence, status
if own_fence ~= '' then
  fence, status = tonumber(own_fence), 'retaken'
else
  fence, status = math.max(counter + 1, now_us), 'acquired'
end
local fence_s = string.format('%.0f', fence)
if fence > counter then
  redis.call('SET', KEYS[2], fence_s)
end
redis.call('HSET', KEYS[3], 'checked_ms', now_s)
redis.call('HSET', KEYS[1], 'token', token, 'identity', identity, 'fence', fence_s,
           'ttl_ms', ARGV[3], 'since_ms', now_s)
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return {status, fence_s, quiet_ms, ttl_ms, replicas, replicated}
