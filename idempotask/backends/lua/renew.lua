-- renew: extend a lease, compare-and-set on the token.
--
-- KEYS[1]  the record's Redis key
-- ARGV[1]  format marker   ARGV[2] token   ARGV[3] lease in ms
--
-- Reply: 1 when the lease was extended, 0 when the key is not held with the token,
-- {'corrupt', what_is_there} when the value under the key is not ours.
local key = KEYS[1]
local fmt, token, lease = ARGV[1], ARGV[2], ARGV[3]

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
if r[2] == 'in_progress' and r[3] == token then
  redis.call('PEXPIRE', key, lease)
  return 1
end
return 0
