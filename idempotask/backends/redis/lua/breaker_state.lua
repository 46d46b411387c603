-- breaker_state: read a circuit breaker's state (no writes).
--
-- KEYS[1]  the breaker's Redis key (a hash: fmt, failures, window_until, open_until,
--          probe_until, probe_token; times in ms by the server's clock; no key: closed)
-- ARGV[1]  format marker (a hash without it is not ours)
--
-- Reply: {'brk', status, failures, wait_ms, changed (0/1), probe (0/1)}, or
-- {'corrupt', what_is_there}. status is 'closed', 'open' or 'half_open'; wait_ms is the
-- time left of the open period (open) or of a probe's lease (half_open, 0: probe free).
local key, fmt = KEYS[1], ARGV[1]

local kind = redis.call('TYPE', key)['ok']
if kind == 'none' then
  return {'brk', 'closed', 0, 0, 0, 0}
elseif kind ~= 'hash' then
  return {'corrupt', 'a Redis ' .. kind .. ' value'}
end
local r = redis.call('HMGET', key, 'fmt', 'failures', 'window_until', 'open_until', 'probe_until')
if r[1] ~= fmt then
  return {'corrupt', 'a hash without the format marker ' .. fmt}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local failures, window_until = tonumber(r[2]) or 0, tonumber(r[3]) or 0
local open_until, probe_until = tonumber(r[4]) or 0, tonumber(r[5]) or 0

if open_until == 0 then
  if window_until <= now then
    failures = 0
  end
  return {'brk', 'closed', failures, 0, 0, 0}
elseif now < open_until then
  return {'brk', 'open', 0, open_until - now, 0, 0}
end
return {'brk', 'half_open', 0, math.max(0, probe_until - now), 0, 0}
