-- dlq_update: compare-and-set on one dead letter; it also ends any processor claim.
--
-- KEYS[1]  the queue's base key (see dlq_add.lua)
-- ARGV[1]  format marker   ARGV[2] id   ARGV[3] the version the caller read
-- ARGV[4]  a token unique to this update (so a resent command recognises its own write)
-- ARGV[5]  the new by_time score (-last_failed_at), or '' when last_failed_at is unchanged
-- ARGV[6..] changed fields: field, value, ... (times as exact decimal strings, '' = None)
--
-- Reply: {'dl', {field, value, ...}} for the updated letter, {'stale'} when the stored
-- version is another one, {'absent'}, or {'corrupt', what_is_there}.
-- redis-py resends a command whose reply timed out: if the first run applied, the stored
-- version is ours + 1 with our token, and the resend answers with the letter it wrote.
local base, fmt, id, version, token = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = base .. ':letter:' .. id

local kind = redis.call('TYPE', key)['ok']
if kind == 'none' then
  return {'absent'}
elseif kind ~= 'hash' then
  return {'corrupt', 'a Redis ' .. kind .. ' value'}
end
local r = redis.call('HMGET', key, 'fmt', 'version', 'op')
if r[1] ~= fmt then
  return {'corrupt', 'a hash without the format marker ' .. fmt}
end
if r[2] ~= version then
  if r[3] == token and tonumber(r[2]) == tonumber(version) + 1 then
    return {'dl', redis.call('HGETALL', key)}
  end
  return {'stale'}
end

if #ARGV >= 6 then
  redis.call('HSET', key, unpack(ARGV, 6))
end
redis.call('HSET', key, 'op', token)
redis.call('HINCRBY', key, 'version', 1)
if ARGV[5] ~= '' then
  redis.call('ZADD', base .. ':by_time', ARGV[5], id)
end

-- The due index holds open letters with a next retry that no processor holds.
local s = redis.call('HMGET', key, 'status', 'next_retry_at')
redis.call('ZREM', base .. ':claims', id)
if (s[1] == 'pending' or s[1] == 'retrying') and s[2] and s[2] ~= '' then
  redis.call('ZADD', base .. ':due', s[2], id)
else
  redis.call('ZREM', base .. ':due', id)
end
return {'dl', redis.call('HGETALL', key)}
