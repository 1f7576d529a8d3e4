-- settle.lua: charge or refund the difference between a reservation's cost and
-- what the work actually cost, at the reservation's original start.
--
-- KEYS, the common ARGV[1..9] and the mailboxes: see lua/README.md.
--
-- ARGV after the common header:
--   10 waiter id      the id the reservation was granted under
--   11 actual units   integer >= 0: what the work cost
--   12 previous units integer >= 0: what this reservation was last charged
--                     (its cost, or its last settled value); used for the TAT
--                     when neither a window log nor the grants entry holds the
--                     reservation any more (they record their own value, which
--                     then wins, and the grants entry is updated to actual)
--
-- With d = actual - previous:
--   - every window counting cost that still holds the entry changes it by d
--     (and its running sum), so that later reservations see it; windows
--     counting calls never change;
--   - the TAT: d > 0 adds d units of intervals (a debt later starts wait for);
--     d < 0 takes |d| units off only if this reservation (or its last settle)
--     is still the last that moved the TAT (costs' 'last' field matches the
--     stored TAT); else the refund to the TAT is dropped.
-- A second settle of the same reservation replaces the first (the difference
-- is taken against the last settled value).
--
-- Reply: 1 if a window log held the entry or the TAT was changed, else 0.
-- Errors: 'ERR_ARG ...' for malformed arguments (nothing is written).

-- The preludes lua/_read.lua and lua/_shared.lua come first: they bind KEYS,
-- ARGV[1..9] and the shared helpers (int, read_now, load_tat, set_tat, ...).

local err = check_common_args()
if err then
  return err
end
local id = ARGV[10]
local actual = tonumber(ARGV[11])
local previous = tonumber(ARGV[12])
if id == nil or id == '' then
  return bad_arg('waiter id', 'a non-empty string', id)
end
if not is_int(actual, 0) or actual > 2^52 then
  return bad_arg('actual units', 'an integer >= 0', ARGV[11])
end
if not is_int(previous, 0) or previous > 2^52 then
  return bad_arg('previous units', 'an integer >= 0', ARGV[12])
end

local now = read_now()
apply_control(now)
local found = false
local held = {}
for j, w in ipairs(windows) do
  if redis.call('ZSCORE', w.key, id) then
    found = true
    held[j] = true
  end
end
-- The grants entry of the reservation, while it is kept (its lease held, or the
-- memory of a rate start; see lua/README.md), records its cost as last settled,
-- as the window logs do: a settle sent again (its reply was lost) or twice finds
-- itself applied already.
local token, start_at, recorded = parse_grant(redis.call('HGET', grants_key, id))
if found then
  -- The logs' own record of what the entry counts for (absent: one unit).
  previous = costs_of({id})[1]
elseif token then
  previous = recorded
end
local d = actual - previous
if d ~= 0 and token then
  redis.call('HSET', grants_key, id, grant_entry(token, start_at, actual))
end
local applied = false
if d ~= 0 and found then
  local fields = {}
  for j, w in ipairs(windows) do
    if w.k == 0 then
      fields[#fields + 1] = w.sum_field
    end
  end
  if #fields > 0 then
    local sums = redis.call('HMGET', costs_key, unpack(fields))
    local i = 0
    for j, w in ipairs(windows) do
      if w.k == 0 then
        i = i + 1
        if held[j] then
          w.sum = math.max(0, (tonumber(sums[i] or '') or 0) + d)
          w.dirty = true
        end
      end
    end
  end
  if actual == UNIT then
    redis.call('HDEL', costs_key, id)
  else
    redis.call('HSET', costs_key, id, int(actual))
  end
  wrote_costs = true
end
if d ~= 0 and interval > 0 then
  load_tat()
  if tat_value > 0 then
    local last = redis.call('HGET', costs_key, 'last') or ''
    local last_id, last_tat, before = string.match(last, '^(.*)|([^|]*)|([^|]*)$')
    local is_last = last_id == id and last_tat == tat_text_now()
    if d > 0 or is_last then
      set_tat(tat_value + d / UNIT * interval)
      applied = true
      if is_last then
        pending_last = id .. '|' .. tat_text_now() .. '|' .. before
      end
    end
  end
end
flush_rates(now)
-- A refund lowered the TAT, and with it the key's expiry: control's tat_until
-- follows it down.
flush_book()
if found or applied then
  return 1
end
return 0
