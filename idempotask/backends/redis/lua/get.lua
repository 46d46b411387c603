-- get: read a record and the time left on its lease or ttl, in one round trip.
--
-- KEYS[1]  the record's Redis key (a string laid out as claim.lua describes)
--
-- Reply: {value, pttl_ms}, nil when absent, or {'corrupt', what_is_there} when the value
-- under the key is not a string (the client checks a string's format marker).
local key = KEYS[1]

local v = redis.pcall('GET', key)
if not v then
  return false
elseif type(v) == 'table' then
  return {'corrupt', 'a Redis ' .. redis.call('TYPE', key)['ok'] .. ' value'}
end
return {v, redis.call('PTTL', key)}
