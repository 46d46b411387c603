-- breaker_success: report a successful call; closes a half-open circuit breaker.
--
-- KEYS[1]  the breaker's Redis key (see breaker_state.lua for its fields)
-- ARGV[1]  format marker
--
-- Half-open: the record is removed (closed, failures forgotten), changed = 1. Open: a
-- call that began before the opening proves nothing; unchanged. Closed: successes do not
-- reset the window's failure count; unchanged.
-- Reply: as breaker_state.lua.
if redis.replicate_commands then
  redis.replicate_commands()
end
local key, fmt = KEYS[1], ARGV[1]

local kind = redis.call('TYPE', key)['ok']
if kind == 'none' then
  return {'brk', 'closed', 0, 0, 0, 0}
elseif kind ~= 'hash' then
  return {'corrupt', 'a Redis ' .. kind .. ' value'}
end
local r = redis.call('HMGET', key, 'fmt', 'failures', 'window_until', 'open_until')
if r[1] ~= fmt then
  return {'corrupt', 'a hash without the format marker ' .. fmt}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local failures, window_until = tonumber(r[2]) or 0, tonumber(r[3]) or 0
local open_until = tonumber(r[4]) or 0

if open_until == 0 then
  if window_until <= now then
    failures = 0
  end
  return {'brk', 'closed', failures, 0, 0, 0}
elseif now < open_until then
  return {'brk', 'open', 0, open_until - now, 0, 0}
end
redis.call('DEL', key)
return {'brk', 'closed', 0, 0, 1, 0}
