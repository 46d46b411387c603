-- dlq_expire_claim (test hook): end a processor's claim on one dead letter now.
--
-- KEYS[1]  the queue's base key (see dlq_add.lua)
-- ARGV[1]  format marker   ARGV[2] id
--
-- Reply: 1 when a live claim (expiring after the server's TIME) was there, else 0. The
-- letter goes back to the due index if it is open and has a next retry.
if redis.replicate_commands then
  redis.replicate_commands() -- Redis < 5: replicate the writes, not the non-deterministic script
end
local base, fmt, id = KEYS[1], ARGV[1], ARGV[2]
local claims = base .. ':claims'

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = redis.call('ZSCORE', claims, id)
if not until_ms then
  return 0
end
redis.call('ZREM', claims, id)
local r = redis.pcall('HMGET', base .. ':letter:' .. id, 'fmt', 'status', 'next_retry_at')
if not r.err and r[1] == fmt and (r[2] == 'pending' or r[2] == 'retrying')
    and r[3] and r[3] ~= '' then
  redis.call('ZADD', base .. ':due', r[3], id)
end
if tonumber(until_ms) > now then
  return 1
end
return 0
