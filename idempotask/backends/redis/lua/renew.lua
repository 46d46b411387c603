-- renew: extend a lease, compare-and-set on the token.
--
-- KEYS[1]  the record's Redis key (a string laid out as claim.lua describes)
-- ARGV[1]  format marker   ARGV[2] token   ARGV[3] lease in ms
--
-- Reply: 1 when the lease was extended, 0 when the key is not held with the token,
-- {'corrupt', what_is_there} when the value under the key is not ours.
local key = KEYS[1]
local fmt, token, lease = ARGV[1], ARGV[2], ARGV[3]
local n = #fmt

local v = redis.pcall('GET', key)
if not v then
  return 0
elseif type(v) == 'table' then
  return {'corrupt', 'a Redis ' .. redis.call('TYPE', key)['ok'] .. ' value'}
elseif #v < n + 7 or string.sub(v, 1, n) ~= fmt then
  return {'corrupt', 'a string without the format marker ' .. fmt}
end
local tl = struct.unpack('>H', v, n + 2)
if string.sub(v, n + 1, n + 1) == 'i' and string.sub(v, n + 8, n + 7 + tl) == token then
  redis.call('PEXPIRE', key, lease)
  return 1
end
return 0
