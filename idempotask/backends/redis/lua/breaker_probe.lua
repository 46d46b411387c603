-- breaker_probe: take the single half-open probe of a circuit breaker, with a lease.
--
-- KEYS[1]  the breaker's Redis key (see breaker_state.lua for its fields)
-- ARGV[1]  format marker   ARGV[2] lease in ms   ARGV[3] the caller's token
-- ARGV[4]  ms to keep the record after the lease
--
-- Granted (probe = 1) when the open period has ended and no other caller's probe lease is
-- running; the same token is granted again, so a command resent after a lost reply
-- recognises its own grant. A crashed prober's lease runs out and frees the probe.
-- Otherwise the state is returned unchanged with probe = 0.
-- Reply: as breaker_state.lua.
if redis.replicate_commands then
  redis.replicate_commands()
end
local key, fmt = KEYS[1], ARGV[1]
local lease, token, retain = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])

local kind = redis.call('TYPE', key)['ok']
if kind == 'none' then
  return {'brk', 'closed', 0, 0, 0, 0}
elseif kind ~= 'hash' then
  return {'corrupt', 'a Redis ' .. kind .. ' value'}
end
local r = redis.call('HMGET', key, 'fmt', 'failures', 'window_until', 'open_until',
                     'probe_until', 'probe_token')
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
elseif now < probe_until and r[6] ~= token then
  return {'brk', 'half_open', 0, probe_until - now, 0, 0}
end
redis.call('HSET', key, 'probe_until', now + lease, 'probe_token', token)
redis.call('PEXPIRE', key, lease + retain)
return {'brk', 'half_open', 0, lease, 0, 1}
