-- claim: take the key, or return the record that holds it, in one atomic step.
--
-- KEYS[1]  the record's Redis key
-- ARGV[1]  format marker (a hash without it is not ours)
-- ARGV[2]  token   ARGV[3] lease in ms   ARGV[4] owner ('' = none)   ARGV[5] fingerprint
--
-- Reply: {'rec', state, token, owner, fingerprint, payload, pttl_ms} for the record that
-- holds the key after the claim, or {'corrupt', what_is_there}.
-- Running it twice with the same token is harmless: the second run re-takes its own
-- claim (redis-py may resend a command whose reply timed out).
local key = KEYS[1]
local fmt, token, lease, owner, fingerprint = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local kind = redis.call('TYPE', key)['ok']
if kind == 'hash' then
  local r = redis.call('HMGET', key, 'fmt', 'state', 'token', 'owner', 'fingerprint', 'payload')
  if r[1] ~= fmt then
    return {'corrupt', 'a hash without the format marker ' .. fmt}
  end
  local retake = r[2] == 'in_progress'
    and (r[3] == token or (owner ~= '' and r[4] == owner))
  if not retake then
    return {'rec', r[2] or '', r[3] or '', r[4] or '', r[5] or '', r[6] or '',
            redis.call('PTTL', key)}
  end
  -- Re-taking keeps the fingerprint unless the caller brings a new one.
  if fingerprint == '' then
    fingerprint = r[5] or ''
  end
elseif kind ~= 'none' then
  return {'corrupt', 'a Redis ' .. kind .. ' value'}
end

-- Absent (an expired lease or ttl is absent too: the key's TTL is the lease or ttl).
redis.call('HSET', key, 'fmt', fmt, 'state', 'in_progress', 'token', token,
           'owner', owner, 'fingerprint', fingerprint, 'payload', '')
redis.call('PEXPIRE', key, lease)
return {'rec', 'in_progress', token, owner, fingerprint, '', tonumber(lease)}
