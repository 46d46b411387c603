-- dlq_update: compare-and-set on one dead letter; it also ends any processor claim.
--
-- KEYS[1]  the queue's base key (see dlq_add.lua)
-- ARGV[1]  format marker   ARGV[2] id   ARGV[3] the version the caller read
-- ARGV[4]  a token unique to this update (so a resent command recognises its own write)
-- ARGV[5]  the new by_time score (-last_failed_at), or '' when last_failed_at is unchanged
-- ARGV[6]  '1': change nothing while a processor's claim on the letter is live (its
--          score in base:claims is after the server's TIME); '' for a plain update
-- ARGV[7..] changed fields: field, value, ... (times as exact decimal strings, '' = None)
--
-- Reply: {'dl', {field, value, ...}} for the updated letter, {'stale'} when the stored
-- version is another one, {'claimed'} when ARGV[6] asked and a claim is live,
-- {'absent'}, or {'corrupt', what_is_there}.
-- redis-py resends a command whose reply timed out: if the first run applied, the stored
-- version is ours + 1 with our token, and the resend answers with the letter it wrote.
if redis.replicate_commands then
  redis.replicate_commands() -- Redis < 5: replicate the writes, not the non-deterministic script
end
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
if ARGV[6] == '1' then
  local until_ms = redis.call('ZSCORE', base .. ':claims', id)
  if until_ms then
    local t = redis.call('TIME')
    if tonumber(until_ms) > tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then
      return {'claimed'}
    end
  end
end

if #ARGV >= 7 then
  redis.call('HSET', key, unpack(ARGV, 7))
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
