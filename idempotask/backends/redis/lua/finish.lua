-- finish: store a call's outcome (a result or a failure), compare-and-set on the token.
--
-- KEYS[1]  the record's Redis key (a string laid out as claim.lua describes)
-- ARGV[1]  format marker   ARGV[2] token   ARGV[3] payload   ARGV[4] ttl in ms
-- ARGV[5]  the state byte to store: 'c' (complete) or 'f' (fail)
--
-- Reply: 1 when the outcome is stored (or was already stored by this token in this state
-- with this payload, so a resent command succeeds again), 0 when the key is not held with
-- the token, {'corrupt', what_is_there} when the value under the key is not ours.
local key = KEYS[1]
local fmt, token, payload, ttl, state = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local n = #fmt

local v = redis.pcall('GET', key)
if not v then
  return 0
elseif type(v) == 'table' then
  return {'corrupt', 'a Redis ' .. redis.call('TYPE', key)['ok'] .. ' value'}
elseif #v < n + 7 or string.sub(v, 1, n) ~= fmt then
  return {'corrupt', 'a string without the format marker ' .. fmt}
end
local tl, ol, fl = struct.unpack('>HHH', v, n + 2)
local p = n + 8
if string.sub(v, p, p + tl - 1) ~= token then
  return 0
end
local last = p + tl + ol + fl - 1  -- the last byte before the payload
local current = string.sub(v, n + 1, n + 1)
if current == 'i' then
  -- The ttl counts from the outcome, by the server's clock.
  redis.call('SET', key, fmt .. state .. string.sub(v, n + 2, last) .. payload, 'PX', ttl)
  return 1
end
if current == state and string.sub(v, last + 1) == payload then
  return 1
end
return 0
