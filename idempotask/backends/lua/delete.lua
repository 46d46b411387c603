-- delete: remove a record; with a token, only the record that token wrote.
--
-- KEYS[1]  the record's Redis key
-- ARGV[1]  format marker   ARGV[2] '1' to compare the token, '0' to remove anything
-- ARGV[3]  token
--
-- Reply: 1 when something was removed, 0 when not, {'corrupt', what_is_there} when a
-- token was given and the value under the key is not ours. Without a token it removes
-- whatever is there, foreign values included: that is how corrupt data is cleared.
local key = KEYS[1]
local fmt, compare, token = ARGV[1], ARGV[2], ARGV[3]

if compare ~= '1' then
  return redis.call('DEL', key)
end
local kind = redis.call('TYPE', key)['ok']
if kind == 'none' then
  return 0
elseif kind ~= 'hash' then
  return {'corrupt', 'a Redis ' .. kind .. ' value'}
end
local r = redis.call('HMGET', key, 'fmt', 'token')
if r[1] ~= fmt then
  return {'corrupt', 'a hash without the format marker ' .. fmt}
end
if r[2] == token then
  return redis.call('DEL', key)
end
return 0
