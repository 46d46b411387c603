-- breaker_failure: count one failure of a circuit breaker's calls, atomically.
--
-- KEYS[1]  the breaker's Redis key (see breaker_state.lua for its fields)
-- ARGV[1]  format marker   ARGV[2] threshold   ARGV[3] window in ms
-- ARGV[4]  open period in ms   ARGV[5] ms to keep the record after its open period
--
-- Closed: a failure after the window ended starts a new window at 1; the threshold-th
-- failure within the window opens the breaker for the open period. Open: nothing changes.
-- Half-open (the open period ended, the probe or a straggler failed): open again.
-- Reply: as breaker_state.lua; changed is 1 when this failure opened the breaker, and
-- failures is then the count that opened it (0 when it reopened from half-open).
-- Time is the server's (TIME), so every client agrees on windows and open periods.
if redis.replicate_commands then
  redis.replicate_commands() -- Redis < 5: replicate the writes, not the non-deterministic script
end
local key, fmt = KEYS[1], ARGV[1]
local threshold, window = tonumber(ARGV[2]), tonumber(ARGV[3])
local open_for, retain = tonumber(ARGV[4]), tonumber(ARGV[5])

local kind = redis.call('TYPE', key)['ok']
local failures, window_until, open_until = 0, 0, 0
if kind == 'hash' then
  local r = redis.call('HMGET', key, 'fmt', 'failures', 'window_until', 'open_until')
  if r[1] ~= fmt then
    return {'corrupt', 'a hash without the format marker ' .. fmt}
  end
  failures, window_until = tonumber(r[2]) or 0, tonumber(r[3]) or 0
  open_until = tonumber(r[4]) or 0
elseif kind ~= 'none' then
  return {'corrupt', 'a Redis ' .. kind .. ' value'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function open(counted)
  redis.call('HSET', key, 'fmt', fmt, 'failures', 0, 'window_until', 0,
             'open_until', now + open_for, 'probe_until', 0, 'probe_token', '')
  -- Kept past the open period so the half-open state (one probe) is not forgotten soon.
  redis.call('PEXPIRE', key, open_for + retain)
  return {'brk', 'open', counted, open_for, 1, 0}
end

if open_until > 0 then
  if now < open_until then
    return {'brk', 'open', 0, open_until - now, 0, 0}
  end
  return open(0)
end
if window_until <= now then
  failures = 0
  window_until = now + window
end
failures = failures + 1
if failures >= threshold then
  return open(failures)
end
redis.call('HSET', key, 'fmt', fmt, 'failures', failures, 'window_until', window_until,
           'open_until', 0, 'probe_until', 0, 'probe_token', '')
-- A count outlives its window for nothing: the key goes when the window ends.
redis.call('PEXPIRE', key, window_until - now)
return {'brk', 'closed', failures, 0, 0, 0}
