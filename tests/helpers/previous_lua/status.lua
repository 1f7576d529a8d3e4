-- status.lua: read-only snapshot of one limiter (safe to run on a replica).
--
-- KEYS: the eight of lua/README.md (the first six or seven alone are accepted
-- too, from clients that predate spare); only holders, queue, tat, seq and
-- spare are read.
--
-- ARGV: 1 now_us alone (see lua/README.md); none at all reads the server clock.
--
-- Reply: {now_us, holders, queue, tat, seq, spare}
--   holders  flat {lease id, expiry_us, ...} in expiry order
--   queue    flat {waiter id, ticket, ...} in ticket order
--   tat      the stored string, or '' when there is none
--   seq      the stored counter, or '0'
--   spare    the earliest start given back that is still ahead ('%d'), or ''
-- Scores are returned as decimal strings ('%d'), never as Lua numbers.
-- Errors: 'ERR_ARG ...' for malformed arguments.

-- The prelude lua/_read.lua comes first: it binds KEYS and ARGV[1] and the
-- helpers int, check_now and read_now.

if #KEYS < 6 or #KEYS > 8 then
  return redis.error_reply('ERR_ARG expected 8 keys (or the first 6 or 7), got ' .. #KEYS)
end
if now_arg == nil then
  now_arg = ''
end
local err = check_now()
if err then
  return err
end
local now = read_now()

local function with_integer_scores(flat)
  for i = 2, #flat, 2 do
    flat[i] = int(tonumber(flat[i]))
  end
  return flat
end

local holders = with_integer_scores(redis.call('ZRANGE', holders_key, 0, -1, 'WITHSCORES'))
local queue = with_integer_scores(redis.call('ZRANGE', queue_key, 0, -1, 'WITHSCORES'))
local tat = redis.call('GET', tat_key) or ''
local seq = redis.call('GET', seq_key) or '0'
local spare = ''
if spare_key then
  local first = redis.call('ZRANGEBYSCORE', spare_key, int(now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #first == 2 then
    spare = int(tonumber(first[2]))
  end
end
return {now, holders, queue, tat, seq, spare}
