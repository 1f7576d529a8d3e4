-- control.lua: pause the limiter, report a push-back from its target (and cut
-- the adaptive rate), set or clear limits at run time, or read all that.
--
-- KEYS: those of lua/README.md; only KEYS[10] (control) is read or written, the
-- others are given so that a cluster routes the call to the limiter's slot (at
-- least 10 keys).
--
-- ARGV (not the writers' header: the command line calls this script without
-- knowing the fleet's options):
--   1 now_us        see lua/README.md
--   2 key_ttl_ms    integer >= 1: control lives at least this long after the
--                   end of its pause, of its adaptive recovery and keep_until
--   3 operation, then its arguments:
--     'read'
--     'pause' <us>            paused_until = max(paused_until, now + us)
--     'throttled' <retry us or ''> <interval us> <adaptive spec>
--                             with a retry, a pause of that long; with an
--                             adaptive spec and an interval > 0 (the caller's
--                             configured one; a max_per_second set at run time
--                             replaces it), a cut of the adaptive rate unless the
--                             last cut is less than a cool-down old
--     'set' <max_at_once or ''> <interval us or ''> <keep us>
--                             limits set at run time ('' leaves one as it is);
--                             keep_until = now + keep us
--     'clear'                 removes the limits set at run time
--
-- The adaptive cut: the rate now (recovered_rate in _read.lua) times the factor,
-- never below the floor; stored in 'adaptive' as
-- '<rate>|<now>|<max rate>|<floor>|<recovery us>'. Within the spec's cool-down
-- after a cut, a push-back cuts nothing.
--
-- Reply: {now_us, cut, paused_until, max_at_once, interval_us, adaptive, rate}:
--   cut 1 if this call cut the adaptive rate, else 0; the others as
--   control_reply (in _read.lua) gives them, strings, '' when absent.
-- Errors: 'ERR_ARG ...' for malformed arguments; nothing is written.

-- The prelude lua/_read.lua comes first: it binds KEYS and ARGV[1] and the
-- control helpers.

if #KEYS < 10 then
  return redis.error_reply('ERR_ARG expected at least 10 keys (control is KEYS[10]), got ' .. #KEYS)
end
local err = check_now()
if err then
  return err
end
local key_ttl_ms = tonumber(ARGV[2])
if not is_int(key_ttl_ms, 1) then
  return bad_arg('key_ttl_ms', 'an integer >= 1', ARGV[2])
end
local op = ARGV[3]
local fields = {}
local cut_done = 0

local function us_arg(i, name, allow_empty)
  local raw = ARGV[i]
  if allow_empty and raw == '' then
    return false
  end
  local v = tonumber(raw)
  if not is_int(v, 0) or v > 2^52 then
    return nil, bad_arg(name, 'an integer >= 0', raw)
  end
  return v
end

local now = read_now()
local c = read_control()

local function pause_for(us)
  local until_us = now + us
  if not c.paused_until or c.paused_until < until_us then
    c.paused_until = until_us
    fields[#fields + 1] = 'paused_until'
    fields[#fields + 1] = int(until_us)
  end
end

if op == 'read' then
  -- nothing to write
elseif op == 'pause' then
  local us, e = us_arg(4, 'pause us', false)
  if e then
    return e
  end
  pause_for(us)
elseif op == 'throttled' then
  local retry, e = us_arg(4, 'retry us', true)
  if e then
    return e
  end
  local base = tonumber(ARGV[5])
  if not (is_finite(base) and base >= 0) then
    return bad_arg('interval_us', 'a finite number >= 0', ARGV[5])
  end
  local a, aerr = parse_adaptive(ARGV[6])
  if aerr then
    return aerr
  end
  if retry then
    pause_for(retry)
  end
  if a and base > 0 then
    if c.interval_us and c.interval_us > 0 then
      base = c.interval_us
    end
    local max_rate = 1e6 / base
    local floor = floor_of(a, max_rate)
    local cut = parse_cut(c.adaptive)
    local rate = recovered_rate(max_rate, floor, a.recovery, cut, now)
    if not cut or now - cut.at >= a.cooldown then
      local new_rate = math.max(floor, rate * a.factor)
      c.adaptive = string.format('%.6f', new_rate) .. '|' .. int(now) .. '|'
        .. string.format('%.6f', max_rate) .. '|' .. string.format('%.6f', floor) .. '|'
        .. int(a.recovery)
      fields[#fields + 1] = 'adaptive'
      fields[#fields + 1] = c.adaptive
      cut_done = 1
    end
  end
elseif op == 'set' then
  local m, e1 = us_arg(4, 'max_at_once', true)
  if e1 then
    return e1
  end
  if m == 0 then
    return bad_arg('max_at_once', "an integer >= 1 or ''", ARGV[4])
  end
  local iv = ARGV[5]
  local interval_us = false
  if iv ~= '' then
    interval_us = tonumber(iv)
    if not (is_finite(interval_us) and interval_us > 0) then
      return bad_arg('interval_us', "a finite number > 0 or ''", iv)
    end
  end
  local keep, e2 = us_arg(6, 'keep us', false)
  if e2 then
    return e2
  end
  if m then
    c.max_at_once = m
    fields[#fields + 1] = 'max_at_once'
    fields[#fields + 1] = int(m)
  end
  if interval_us then
    c.interval_us = interval_us
    fields[#fields + 1] = 'interval_us'
    fields[#fields + 1] = string.format('%.3f', interval_us)
  end
  c.keep_until = now + keep
  fields[#fields + 1] = 'keep_until'
  fields[#fields + 1] = int(c.keep_until)
elseif op == 'clear' then
  redis.call('HDEL', control_key, 'max_at_once', 'interval_us', 'keep_until')
  c.max_at_once = nil
  c.interval_us = nil
  c.keep_until = nil
else
  return bad_arg('operation', "'read', 'pause', 'throttled', 'set' or 'clear'", op)
end

if #fields > 0 then
  redis.call('HSET', control_key, unpack(fields))
  local keep = control_keep(c, now)
  redis.call('PEXPIRE', control_key, int(math.max(key_ttl_ms, math.ceil((keep - now) / 1000) + key_ttl_ms)))
end

local reply = {now, cut_done}
for _, v in ipairs(control_reply(c, now)) do
  reply[#reply + 1] = v
end
return reply
