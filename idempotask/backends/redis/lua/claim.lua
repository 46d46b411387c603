-- claim: take the key, or return the record that holds it, in one atomic step.
--
-- The common claim is a plain `SET key value NX PX lease GET` sent by the client (no
-- script). This script is the general form, used where that reply shows a claim the
-- caller may re-take (its own token, or the same non-empty owner) and on servers older
-- than Redis 7.0, which refuse NX together with GET.
--
-- A record is one string: the format marker, one state byte ('i' in progress,
-- 'c' completed, 'f' failed), the byte lengths of token, owner and fingerprint as three
-- big-endian 16-bit numbers, those three fields, then the payload.
--
-- KEYS[1]  the record's Redis key
-- ARGV[1]  format marker   ARGV[2] token   ARGV[3] lease in ms   ARGV[4] owner ('' = none)
-- ARGV[5]  fingerprint ('' = keep the one a re-taken claim has)
--
-- Reply: {value, pttl_ms} of the record that holds the key after the claim, or
-- {'corrupt', what_is_there}. Running it twice with the same token is harmless: the second
-- run re-takes its own claim (redis-py may resend a command whose reply timed out).
local key = KEYS[1]
local fmt, token, lease, owner, fingerprint = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local n = #fmt

local v = redis.pcall('GET', key)
if type(v) == 'table' then
  return {'corrupt', 'a Redis ' .. redis.call('TYPE', key)['ok'] .. ' value'}
end
if v then
  if #v < n + 7 or string.sub(v, 1, n) ~= fmt then
    return {'corrupt', 'a string without the format marker ' .. fmt}
  end
  local tl, ol, fl = struct.unpack('>HHH', v, n + 2)
  local p = n + 8
  local retake = string.sub(v, n + 1, n + 1) == 'i'
    and (string.sub(v, p, p + tl - 1) == token
         or (owner ~= '' and string.sub(v, p + tl, p + tl + ol - 1) == owner))
  if not retake then
    return {v, redis.call('PTTL', key)}
  end
  -- Re-taking keeps the fingerprint unless the caller brings a new one.
  if fingerprint == '' then
    fingerprint = string.sub(v, p + tl + ol, p + tl + ol + fl - 1)
  end
end

-- Absent (an expired lease or ttl is absent too: the key's TTL is the lease or ttl).
local value = fmt .. 'i' .. struct.pack('>HHH', #token, #owner, #fingerprint)
  .. token .. owner .. fingerprint
redis.call('SET', key, value, 'PX', lease)
return {value, tonumber(lease)}
