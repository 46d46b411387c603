-- dlq_scan: walk one index of a dead-letter queue in order, a bounded number of entries
-- per call, and query, count, claim or purge the letters that pass a filter.
--
-- KEYS[1]  the queue's base key (see dlq_add.lua); the indexes are sorted sets of ids:
--          base:by_time  score -last_failed_at, every letter (newest first, ties by id)
--          base:due      score next_retry_at, open letters with a next retry, unclaimed
--          base:claims   score the claim's expiry in ms of the server's TIME
-- ARGV[1]  format marker
-- ARGV[2]  mode: 'query', 'stats' or 'purge' (these walk by_time) or 'claim' (walks due)
-- ARGV[3]  the filter as JSON: {"status": [...], "kind": [...], "function": [...],
--          "since": t, "until": t, "search": text}; an absent field does not filter.
--          search is case-folded by the client and found as plain text (never a Lua
--          pattern) in the letter's case-folded error_type or message
-- ARGV[4]  lower bound of the scores walked, exclusive ('' = none)
-- ARGV[5]  upper bound, inclusive ('' = none)
-- ARGV[6]  cursor: the score and ARGV[7] the id of the last entry an earlier call of the
--          same walk left in the index ('' = start at the lower bound)
-- ARGV[8]  budget: at most this many index entries are examined (the script blocks the
--          server while it runs, so a long walk is several calls)
-- ARGV[9]  query: matching letters still to skip (the offset)
-- ARGV[10] query, claim: matching letters still wanted
-- ARGV[11] claim: the lease in ms
--
-- Reply: {'scan', done, cursor_score, cursor_id, skipped, items} or {'corrupt', id, what}.
-- done is 1 when the walk reached the end of its range or the letters wanted; otherwise
-- the caller calls again with the cursor. skipped counts letters passed over for the
-- offset. items: query and claim: one {field, value, ...} list per letter; stats: flat
-- (function, kind, status, count, retries, resolved_by_retry) sextuples; purge: {count}.
--
-- Pass one only reads, so a foreign value met on the way leaves nothing half done; pass
-- two writes. A claim moves the letter from due to claims; expired claims move back first.
if redis.replicate_commands then
  redis.replicate_commands() -- Redis < 5: replicate the writes, not the non-deterministic script
end
local base, fmt, mode = KEYS[1], ARGV[1], ARGV[2]
local filter = cjson.decode(ARGV[3])
local lo, hi = ARGV[4], ARGV[5]
local cursor_score, cursor_id = ARGV[6], ARGV[7]
local budget = tonumber(ARGV[8])
local offset, wanted = tonumber(ARGV[9]), tonumber(ARGV[10])
local lease = tonumber(ARGV[11])
local due, by_time, claims = base .. ':due', base .. ':by_time', base .. ':claims'
local index = by_time
if mode == 'claim' then
  index = due
end
local OPEN = {pending = true, retrying = true}

local function set_of(list)
  if type(list) ~= 'table' or #list == 0 then
    return nil
  end
  local set = {}
  for _, value in ipairs(list) do
    set[value] = true
  end
  return set
end
local statuses, kinds, functions = set_of(filter['status']), set_of(filter['kind']),
  set_of(filter['function'])
local since, until_ = tonumber(filter['since']), tonumber(filter['until'])
local search = filter['search']
if type(search) ~= 'string' or search == '' then
  search = nil
end

local function matches(fn, kind, status, last_failed_at)
  if (statuses and not statuses[status]) or (kinds and not kinds[kind])
      or (functions and not functions[fn]) then
    return false
  end
  local t = tonumber(last_failed_at)
  return t ~= nil and (not since or t >= since) and (not until_ or t < until_)
end

-- a <= b in byte order, as sorted sets order equal scores (Lua's '<' follows the locale).
local function le_bytes(a, b)
  if a == b then
    return true
  end
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a < #b
end

local function letter_key(id)
  return base .. ':letter:' .. id
end

-- The case-folded copies the client wrote (cf_*); a letter from before them is lowered
-- here (ASCII only). string.find with plain = true: no pattern characters.
local function has_text(key)
  local s = redis.call('HMGET', key, 'cf_error_type', 'cf_message')
  for i, name in ipairs({'error_type', 'message'}) do
    local text = s[i]
    if not text then
      text = string.lower(redis.call('HGET', key, name) or '')
    end
    if string.find(text, search, 1, true) then
      return true
    end
  end
  return false
end

local now = 0
if mode == 'claim' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- Claims that ran out (a processor crashed or hung): their letters are due again.
  local expired = redis.call('ZRANGEBYSCORE', claims, '-inf', now, 'LIMIT', 0, budget)
  for _, id in ipairs(expired) do
    redis.call('ZREM', claims, id)
    local r = redis.pcall('HMGET', letter_key(id), 'fmt', 'status', 'next_retry_at')
    if not r.err and r[1] == fmt and OPEN[r[2]] and r[3] and r[3] ~= '' then
      redis.call('ZADD', due, r[3], id)
    end
  end
end

-- Where to start: after the lower bound, and after the cursor.
local hi_n = nil
if hi ~= '' then
  hi_n = tonumber(hi)
end
local pos = 0
if lo ~= '' then
  pos = redis.call('ZCOUNT', index, '-inf', lo)
end
local skip_score, skip_id = nil, nil
if cursor_id ~= '' then
  local s = redis.call('ZSCORE', index, cursor_id)
  if s and tonumber(s) == tonumber(cursor_score) then
    pos = math.max(pos, redis.call('ZRANK', index, cursor_id) + 1)
  else
    -- The cursor's entry left the index meanwhile: start at its score and pass over the
    -- entries of that score up to its id, which an earlier call walked already.
    pos = math.max(pos, redis.call('ZCOUNT', index, '-inf', '(' .. cursor_score))
    skip_score, skip_id = tonumber(cursor_score), cursor_id
  end
end
local fast = mode == 'query' and not statuses and not kinds and not functions and not search
if fast and offset > 0 then
  -- Every letter in the range matches: jump over the offset instead of reading it.
  pos = pos + offset
  offset = 0
end
local skipped = tonumber(ARGV[9]) - offset

-- Pass one: read.
local examined, done = 0, 0
local chosen, stale, groups = {}, {}, {}
local last_score, last_id = cursor_score, cursor_id
while done == 0 and examined < budget do
  local page = redis.call('ZRANGE', index, pos, pos + math.min(100, budget - examined) - 1,
                          'WITHSCORES')
  if #page == 0 then
    done = 1
    break
  end
  pos = pos + #page / 2
  for i = 1, #page, 2 do
    local id, score = page[i], page[i + 1]
    local score_n = tonumber(score)
    if hi_n and score_n > hi_n then
      done = 1
      break
    end
    examined = examined + 1
    local keep = true
    if skip_score and score_n == skip_score and le_bytes(id, skip_id) then
      keep = true -- walked by an earlier call
    else
      skip_score = nil
      local key = letter_key(id)
      local r = redis.pcall('HMGET', key, 'fmt', 'function', 'kind', 'status',
                            'last_failed_at', 'attempts', 'resolution')
      if r.err then
        return {'corrupt', id, 'a Redis ' .. redis.call('TYPE', key)['ok'] .. ' value'}
      end
      if r[1] ~= fmt and (r[1] or redis.call('EXISTS', key) == 1) then
        return {'corrupt', id, 'a hash without the format marker ' .. fmt}
      end
      local live_claim = false
      if mode == 'claim' and r[1] then
        local c = redis.call('ZSCORE', claims, id)
        live_claim = c and tonumber(c) > now
      end
      if not r[1] or (mode == 'claim' and (live_claim or not OPEN[r[4]])) then
        -- The index names a letter that is gone (deleted by hand, evicted) or, in due, one
        -- that is held or closed: claim and purge drop the entry, query and stats pass it.
        if mode == 'claim' or mode == 'purge' then
          stale[#stale + 1] = id
          keep = false
        end
      elseif matches(r[2], r[3], r[4], r[5]) and (not search or has_text(key)) then
        if offset > 0 then
          offset = offset - 1
          skipped = skipped + 1
        elseif mode == 'stats' then
          local by_kind = groups[r[2]] or {}
          groups[r[2]] = by_kind
          local by_status = by_kind[r[3]] or {}
          by_kind[r[3]] = by_status
          local row = by_status[r[4]] or {0, 0, 0}
          by_status[r[4]] = row
          row[1] = row[1] + 1
          row[2] = row[2] + math.max((tonumber(r[6]) or 1) - 1, 0)
          if r[4] == 'resolved' and r[7] == 'retry' then
            row[3] = row[3] + 1
          end
        else
          chosen[#chosen + 1] = id
          keep = mode == 'query'
          if mode ~= 'purge' and #chosen >= wanted then
            done = 1
          end
        end
      end
    end
    if keep then
      last_score, last_id = score, id
    end
    if done == 1 then
      break
    end
  end
end

-- Pass two: write, and gather the reply.
local items = {}
if mode == 'query' then
  for _, id in ipairs(chosen) do
    items[#items + 1] = redis.call('HGETALL', letter_key(id))
  end
elseif mode == 'claim' then
  for _, id in ipairs(stale) do
    redis.call('ZREM', due, id)
  end
  for _, id in ipairs(chosen) do
    local key = letter_key(id)
    redis.call('ZREM', due, id)
    redis.call('ZADD', claims, now + lease, id)
    redis.call('HINCRBY', key, 'version', 1)
    items[#items + 1] = redis.call('HGETALL', key)
  end
elseif mode == 'purge' then
  for _, id in ipairs(stale) do
    redis.call('ZREM', by_time, id)
    redis.call('ZREM', due, id)
    redis.call('ZREM', claims, id)
  end
  for _, id in ipairs(chosen) do
    redis.call('DEL', letter_key(id))
    redis.call('ZREM', by_time, id)
    redis.call('ZREM', due, id)
    redis.call('ZREM', claims, id)
  end
  items[1] = #chosen
else
  for fn, by_kind in pairs(groups) do
    for kind, by_status in pairs(by_kind) do
      for status, row in pairs(by_status) do
        items[#items + 1] = fn
        items[#items + 1] = kind
        items[#items + 1] = status
        items[#items + 1] = row[1]
        items[#items + 1] = row[2]
        items[#items + 1] = row[3]
      end
    end
  end
end
return {'scan', done, last_score, last_id, skipped, items}
