-- dlq_get: read one dead letter (no writes).
--
-- KEYS[1]  the queue's base key (see dlq_add.lua)
-- ARGV[1]  format marker   ARGV[2] id
--
-- Reply: {'dl', {field, value, ...}}, {'absent'}, or {'corrupt', what_is_there}.
local fmt = ARGV[1]
local key = KEYS[1] .. ':letter:' .. ARGV[2]

local kind = redis.call('TYPE', key)['ok']
if kind == 'none' then
  return {'absent'}
elseif kind ~= 'hash' then
  return {'corrupt', 'a Redis ' .. kind .. ' value'}
end
if redis.call('HGET', key, 'fmt') ~= fmt then
  return {'corrupt', 'a hash without the format marker ' .. fmt}
end
return {'dl', redis.call('HGETALL', key)}
