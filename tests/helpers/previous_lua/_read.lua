-- _read.lua: the prelude of every script of the limiter (see lua/README.md).
--
-- It binds the eight KEYS and ARGV[1] (now_us), and defines the helpers that a
-- read-only script needs too. It is not a script on its own: status.lua is sent
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
