-- status.lua: read-only snapshot of one limiter (safe to run on a replica).
--
-- KEYS: those of lua/README.md (the first six or seven alone are accepted
-- too, from clients that predate spare; costs, control and the window keys may
-- follow); holders, queue, tat, seq, spare and control are read.
--
-- ARGV: 1 now_us (see lua/README.md); none at all reads the server clock.
--       2 the window spec (ARGV[8] of the writers; optional): with it, and KEYS[9]
--         (costs) and KEYS[11..] (the window logs), the reply reports each
--         window's use.
--
-- With KEYS[10] (control), the reply has 8 entries: used ({} without a window
-- spec), then control.
--
-- Reply: {now_us, holders, queue, tat, seq, spare[, used[, control]]}
--   holders  flat {lease id, expiry_us, ...} in expiry order
--   queue    flat {waiter id, ticket, ...} in ticket order
--   tat      the stored TAT as '%.3f' (the stored string if it is not a
--            number), or '' when there is none
--   seq      the stored counter, or '0'
--   spare    the earliest start given back that is still ahead ('%d'), or ''
--   used     only with a window spec: per window, the units started or reserved
--            from now - per on ('%d'): its cost (absent from costs: one unit),
--            or 1000000 per start for a window counting calls. Reads every
--            entry of the windows (an operator's view, not the limiter's path).
--   control  {paused_until, max_at_once, interval_us, adaptive, adaptive rate}:
--            strings, '' when absent (see control_reply in _read.lua).
-- Scores are returned as decimal strings ('%d'), never as Lua numbers.
-- Errors: 'ERR_ARG ...' for malformed arguments.

-- The prelude lua/_read.lua comes first: it binds KEYS and ARGV[1] and the
-- helpers int, check_now and read_now.

if #KEYS < 6 then
  return redis.error_reply('ERR_ARG expected at least the first 6 keys, got ' .. #KEYS)
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
-- The writers store it as '%.3f' (SET) or as INCRBYFLOAT leaves it: always
-- reported as '%.3f' when it is a number (anything else as it is stored).
if tonumber(tat) then
  tat = string.format('%.3f', tonumber(tat))
end
local seq = redis.call('GET', seq_key) or '0'
local spare = ''
if spare_key then
  local first = redis.call('ZRANGEBYSCORE', spare_key, int(now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #first == 2 then
    spare = int(tonumber(first[2]))
  end
end
local spec = ARGV[2]
local control = nil
if control_key then
  control = control_reply(read_control(), now)
end
if (spec == nil or spec == '') and not control then
  return {now, holders, queue, tat, seq, spare}
end
local used = {}
for entry in string.gmatch(spec or '', '[^;]+') do
  local per, k = string.match(entry, '^%d+,(%d+),([01])$')
  local key = KEYS[WINDOW_KEYS_FROM + #used]
  if not per or not key or not KEYS[9] then
    return bad_arg('window spec', "'<limit units>,<per us>,<0|1>' entries with their keys", spec)
  end
  local ids = redis.call('ZRANGEBYSCORE', key, '(' .. int(now - tonumber(per)), '+inf')
  local total = #ids * 1000000
  if k == '0' and #ids > 0 then
    total = 0
    for first = 1, #ids, 1000 do
      local costs = redis.call('HMGET', KEYS[9], unpack(ids, first, math.min(first + 999, #ids)))
      for i = 1, #costs do
        total = total + (tonumber(costs[i] or '') or 1000000)
      end
    end
  end
  used[#used + 1] = int(total)
end
if control then
  return {now, holders, queue, tat, seq, spare, used, control}
end
return {now, holders, queue, tat, seq, spare, used}
