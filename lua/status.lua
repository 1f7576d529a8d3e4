-- status.lua: read-only snapshot of one limiter (safe to run on a replica).
--
-- KEYS (the same eight, in this order, as every other script; the first six
-- or seven alone are accepted too, from clients that predate spare):
--   1 holders  ZSET   lease id -> lease expiry (integer microseconds)
--   2 queue    ZSET   waiter id -> ticket
--   3 waiters  ZSET   waiter id -> liveness expiry (not reported)
--   4 tat      STRING GCRA theoretical arrival time in microseconds
--   5 seq      STRING ticket / token counter
--   6 grants   HASH   lease id (or remembered rate-only waiter id) ->
--                     "<token>|<start_at_us>" (not reported)
--   7 recent   ZSET   rate-only waiter id -> end of its memory (not reported)
--   8 spare    ZSET   rate starts given back -> start_us
--
-- ARGV:
--   1 now_us  '' = read the server clock (TIME); an integer = use it (tests only)
--
-- Reply: {now_us, holders, queue, tat, seq, spare}
--   holders  flat {lease id, expiry_us, ...} in expiry order
--   queue    flat {waiter id, ticket, ...} in ticket order
--   tat      the stored string, or '' when there is none
--   seq      the stored counter, or '0'
--   spare    the earliest start given back that is still ahead ('%d'), or ''
-- Scores are returned as decimal strings ('%d'), never as Lua numbers.
-- Errors: 'ERR_ARG ...' for malformed arguments.

local holders_key = KEYS[1]
local queue_key = KEYS[2]
local tat_key = KEYS[4]
local seq_key = KEYS[5]

local now_arg = ARGV[1]

if #KEYS < 6 or #KEYS > 8 then
  return redis.error_reply('ERR_ARG expected 8 keys (or the first 6 or 7), got ' .. #KEYS)
end

local now
if now_arg == nil or now_arg == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(now_arg)
  if now == nil or now ~= now or now < 0 or now == math.huge or now ~= math.floor(now) then
    return redis.error_reply('ERR_ARG now_us must be empty or an integer >= 0, got ' .. now_arg)
  end
end

local function with_integer_scores(flat)
  for i = 2, #flat, 2 do
    flat[i] = string.format('%d', tonumber(flat[i]))
  end
  return flat
end

local holders = with_integer_scores(redis.call('ZRANGE', holders_key, 0, -1, 'WITHSCORES'))
local queue = with_integer_scores(redis.call('ZRANGE', queue_key, 0, -1, 'WITHSCORES'))
local tat = redis.call('GET', tat_key) or ''
local seq = redis.call('GET', seq_key) or '0'
local spare = ''
if KEYS[8] then
  local first = redis.call('ZRANGEBYSCORE', KEYS[8], string.format('%d', now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #first == 2 then
    spare = string.format('%d', tonumber(first[2]))
  end
end
return {now, holders, queue, tat, seq, spare}
