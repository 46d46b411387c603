-- delete: remove a record; with a token, only the record that token wrote.
--
-- KEYS[1]  the record's Redis key (a string laid out as claim.lua describes)
-- ARGV[1]  format marker   ARGV[2] '1' to compare the token, '0' to remove anything
-- ARGV[3]  token
--
-- Reply: 1 when something was removed, 0 when not, {'corrupt', what_is_there} when a
-- token was given and the value under the key is not ours. Without a token it removes
-- whatever is there, foreign values included: that is how corrupt data is cleared.
local key = KEYS[1]
local fmt, compare, token = ARGV[1], ARGV[2], ARGV[3]
local n = #fmt

if compare ~= '1' then
  return redis.call('DEL', key)
end
local v = redis.pcall('GET', key)
if not v then
  return 0
elseif type(v) == 'table' then
  return {'corrupt', 'a Redis ' .. redis.call('TYPE', key)['ok'] .. ' value'}
elseif #v < n + 7 or string.sub(v, 1, n) ~= fmt then
  return {'corrupt', 'a string without the format marker ' .. fmt}
end
local tl = struct.unpack('>H', v, n + 2)
if string.sub(v, n + 8, n + 7 + tl) == token then
  return redis.call('DEL', key)
end
return 0
