-- get: read a record and the time left on its lease or ttl, in one round trip.
--
-- KEYS[1]  the record's Redis key
-- ARGV[1]  format marker
--
-- Reply: {'rec', state, token, owner, fingerprint, payload, pttl_ms}, {'absent'}, or
-- {'corrupt', what_is_there} when the value under the key is not ours.
local key = KEYS[1]
local fmt = ARGV[1]

local kind = redis.call('TYPE', key)['ok']
if kind == 'none' then
  return {'absent'}
elseif kind ~= 'hash' then
  return {'corrupt', 'a Redis ' .. kind .. ' value'}
end
local r = redis.call('HMGET', key, 'fmt', 'state', 'token', 'owner', 'fingerprint', 'payload')
if r[1] ~= fmt then
  return {'corrupt', 'a hash without the format marker ' .. fmt}
end
return {'rec', r[2] or '', r[3] or '', r[4] or '', r[5] or '', r[6] or '', redis.call('PTTL', key)}
