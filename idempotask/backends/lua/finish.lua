-- finish: store a call's outcome (a result or a failure), compare-and-set on the token.
--
-- KEYS[1]  the record's Redis key
-- ARGV[1]  format marker   ARGV[2] token   ARGV[3] payload   ARGV[4] ttl in ms
-- ARGV[5]  the state to store: 'completed' (complete) or 'failed' (fail)
--
-- Reply: 1 when the outcome is stored (or was already stored by this token in this state
-- with this payload, so a resent command succeeds again), 0 when the key is not held with
-- the token, {'corrupt', what_is_there} when the value under the key is not ours.
local key = KEYS[1]
local fmt, token, payload, ttl, state = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local kind = redis.call('TYPE', key)['ok']
if kind == 'none' then
  return 0
elseif kind ~= 'hash' then
  return {'corrupt', 'a Redis ' .. kind .. ' value'}
end
local r = redis.call('HMGET', key, 'fmt', 'state', 'token')
if r[1] ~= fmt then
  return {'corrupt', 'a hash without the format marker ' .. fmt}
end
if r[3] ~= token then
  return 0
end
if r[2] == 'in_progress' then
  redis.call('HSET', key, 'state', state, 'payload', payload)
  -- The ttl counts from the outcome, by the server's clock.
  redis.call('PEXPIRE', key, ttl)
  return 1
end
if r[2] == state and redis.call('HGET', key, 'payload') == payload then
  return 1
end
return 0
