-- dlq_add: store a new dead letter, or return the one already stored under its id.
--
-- KEYS[1]  the queue's base key, e.g. 'idempotask:{idempotask:dlq}'. It is never written
--          itself: every key of the queue is the base plus a suffix, so all of them share
--          its hash tag and live in one cluster slot (see RedisDeadLetterStore).
-- ARGV[1]  format marker   ARGV[2] id
-- ARGV[3]  the letter's by_time score: -last_failed_at (newest first in ZRANGE order)
-- ARGV[4]  its due score: next_retry_at, or '' when it is not open or has no next retry
-- ARGV[5..] the letter hash: field, value, field, value... (the format marker included)
--
-- Reply: {'new'} when stored, {'dl', {field, value, ...}} for the letter already under
-- the id (a spooled letter delivered twice, or a resent command), or {'corrupt', what}.
local base, fmt, id = KEYS[1], ARGV[1], ARGV[2]
local key = base .. ':letter:' .. id

local kind = redis.call('TYPE', key)['ok']
if kind == 'hash' then
  if redis.call('HGET', key, 'fmt') ~= fmt then
    return {'corrupt', 'a hash without the format marker ' .. fmt}
  end
  return {'dl', redis.call('HGETALL', key)}
elseif kind ~= 'none' then
  return {'corrupt', 'a Redis ' .. kind .. ' value'}
end

redis.call('HSET', key, unpack(ARGV, 5))
redis.call('ZADD', base .. ':by_time', ARGV[3], id)
if ARGV[4] ~= '' then
  redis.call('ZADD', base .. ':due', ARGV[4], id)
end
-- A claim left by a purged letter of the same id must not hold the new one.
redis.call('ZREM', base .. ':claims', id)
return {'new'}
