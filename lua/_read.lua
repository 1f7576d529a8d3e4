-- _read.lua: the prelude of every script of the limiter (see lua/README.md).
--
-- It binds the KEYS (the eight of every limiter, then costs, control and the
-- window logs) and ARGV[1] (now_us), and defines the helpers that a read-only script
-- needs too. It is not a script on its own: status.lua is sent
-- after it, and the writing scripts after it and _shared.lua.

local holders_key = KEYS[1]
local queue_key = KEYS[2]
local waiters_key = KEYS[3]
local tat_key = KEYS[4]
local seq_key = KEYS[5]
local grants_key = KEYS[6]
-- Read and written only by the rate-only path of acquire.lua (see its header).
local recent_key = KEYS[7]
-- Rate starts given back by waiters that left before them (see give_back).
local spare_key = KEYS[8]
-- Cost units of reservations and the running sum of each window log (see
-- lua/README.md); absent when the caller predates costs.
local costs_key = KEYS[9]
-- Pause, limits set at run time and the adaptive rate (see lua/README.md:
-- "Control"); absent when the caller predates them.
local control_key = KEYS[10]
-- KEYS[11 ..]: one window log per Rate, in the order of the window spec (ARGV[8]).
local WINDOW_KEYS_FROM = 11

local now_arg = ARGV[1]

-- Integers are always sent to Redis through '%d': Lua's tostring() switches to
-- exponent notation above 1e14, and microsecond timestamps are larger than that.
local function int(x)
  return string.format('%d', x)
end

local function is_finite(n)
  return n ~= nil and n == n and n ~= math.huge and n ~= -math.huge
end

local function is_int(n, min)
  return is_finite(n) and n == math.floor(n) and n >= min
end

local function bad_arg(name, expected, raw)
  return redis.error_reply('ERR_ARG ' .. name .. ' must be ' .. expected .. ', got ' .. tostring(raw))
end

-- Returns an error reply if ARGV[1] is malformed, or nil.
local function check_now()
  if now_arg == nil or (now_arg ~= '' and not is_int(tonumber(now_arg), 0)) then
    return bad_arg('now_us', 'empty or an integer >= 0', now_arg)
  end
  return nil
end

local function read_now()
  if now_arg ~= '' then
    return tonumber(now_arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- ---------------------------------------------------------------------------
-- Control (KEYS[10]; see lua/README.md: "Control").

-- The fields of control, in the order read_control returns them.
local CONTROL_FIELDS = {'paused_until', 'max_at_once', 'interval_us', 'adaptive', 'keep_until'}

-- control's fields as a table (absent fields are nil; numbers as numbers but
-- 'adaptive', kept as its text), and whether the key holds any of them. The
-- fields named in `extra` (numbers; the writers' bookkeeping, see _shared.lua)
-- are read by the same HMGET and do not count in `any`.
local function read_control(extra)
  local c = {}
  local any = false
  if not control_key then
    return c, false
  end
  local fields = CONTROL_FIELDS
  if extra then
    fields = {unpack(CONTROL_FIELDS)}
    for _, field in ipairs(extra) do
      fields[#fields + 1] = field
    end
  end
  local values = redis.call('HMGET', control_key, unpack(fields))
  for i, field in ipairs(fields) do
    local v = values[i]
    if v then
      any = any or i <= #CONTROL_FIELDS
      if field == 'adaptive' then
        c[field] = v
      else
        c[field] = tonumber(v)
      end
    end
  end
  return c, any
end

-- The adaptive spec (ARGV[9] of the writers): '' (off) or
-- '<factor>,<floor per second>,<cooldown us>,<recovery us>'; floor 0 asks for
-- the default (floor_of). Returns a table, false for '', or nil and an error
-- reply.
local function parse_adaptive(spec)
  if spec == nil then
    return nil, bad_arg('adaptive spec', 'a string', nil)
  end
  if spec == '' then
    return false
  end
  local f, fl, cd, rc = string.match(spec, '^([%d.]+),([%d.]+),(%d+),(%d+)$')
  local factor, floor, cooldown, recovery = tonumber(f), tonumber(fl), tonumber(cd), tonumber(rc)
  if not (is_finite(factor) and factor > 0 and factor < 1 and is_finite(floor) and floor >= 0
      and cooldown and recovery and recovery >= 1) then
    return nil, bad_arg('adaptive spec', "'<factor in (0, 1)>,<floor per s>,<cooldown us>,"
      .. "<recovery us>'", spec)
  end
  return {factor = factor, floor = floor, cooldown = cooldown, recovery = recovery}
end

-- The adaptive state kept in control's 'adaptive' field:
-- '<rate after the cut>|<cut at us>|<max rate>|<floor>|<recovery us>' (rates per
-- second, as text). Returns a table or nil.
local function parse_cut(text)
  local r, at, mx, fl, rc = string.match(text or '', '^([^|]+)|(%d+)|([^|]+)|([^|]+)|(%d+)$')
  r, at, mx, fl, rc = tonumber(r), tonumber(at), tonumber(mx), tonumber(fl), tonumber(rc)
  if not (is_finite(r) and at and is_finite(mx) and is_finite(fl) and rc and rc >= 1) then
    return nil
  end
  return {rate = r, at = at, max = mx, floor = fl, recovery = rc}
end

-- The adaptive rate at `now` (per second) under the maximum `max_rate`, after the
-- cut `cut` (nil: none): the rate it was cut to, recovering linearly toward
-- max_rate, from floor to max_rate in `recovery` microseconds; never below floor
-- nor above max_rate.
local function recovered_rate(max_rate, floor, recovery, cut, now)
  if not cut then
    return max_rate
  end
  local r = cut.rate + (max_rate - floor) * math.max(0, now - cut.at) / recovery
  return math.max(math.min(floor, max_rate), math.min(max_rate, r))
end

-- The floor of an adaptive spec `a` under max_rate: its own (at most max_rate),
-- or max_rate / 20.
local function floor_of(a, max_rate)
  if a.floor > 0 then
    return math.min(a.floor, max_rate)
  end
  return max_rate / 20
end

-- The adaptive rate now (per second, as text) of the cut stored in control, under
-- the max_per_second set at run time if there is one, else the one of the cut;
-- '' if there is no cut.
local function stored_rate(c, now)
  local cut = parse_cut(c.adaptive)
  if not cut then
    return ''
  end
  local max_rate = cut.max
  if c.interval_us and c.interval_us > 0 then
    max_rate = 1e6 / c.interval_us
  end
  local floor = math.min(cut.floor, max_rate)
  return string.format('%.6f', recovered_rate(max_rate, floor, cut.recovery, cut, now))
end

-- Until when control must be kept (microseconds): the end of its pause, of its
-- adaptive recovery and its keep_until (limits set at run time).
local function control_keep(c, now)
  local keep = math.max(now, c.paused_until or 0, c.keep_until or 0)
  local cut = parse_cut(c.adaptive)
  if cut then
    keep = math.max(keep, cut.at + cut.recovery)
  end
  return keep
end

-- control as the scripts report it: {paused_until, max_at_once, interval_us,
-- adaptive, adaptive rate now}, each a string ('' when absent).
local function control_reply(c, now)
  local function text(v, fmt)
    if v == nil then
      return ''
    end
    return string.format(fmt, v)
  end
  local paused = ''
  if c.paused_until and c.paused_until > now then
    paused = int(c.paused_until)
  end
  return {paused, text(c.max_at_once, '%d'), text(c.interval_us, '%.3f'), c.adaptive or '',
    stored_rate(c, now)}
end
