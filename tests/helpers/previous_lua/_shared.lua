-- _shared.lua: the prelude of the writing scripts acquire.lua, release.lua,
-- renew.lua and cancel.lua, sent after _read.lua (see lua/README.md).
--
-- It binds the common ARGV[2..7] and defines the helpers the writers share. It
-- is not a script on its own.

if redis.replicate_commands then pcall(redis.replicate_commands) end

local max_at_once = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local lease_ttl = tonumber(ARGV[5])
local key_ttl_ms = tonumber(ARGV[6])
local mailbox_prefix = ARGV[7]

-- ---------------------------------------------------------------------------
-- Shared helpers.

-- Returns an error reply for the first malformed common argument, or nil.
local function check_common_args()
  if #KEYS ~= 8 then
    return redis.error_reply('ERR_ARG expected 8 keys, got ' .. #KEYS)
  end
  local err = check_now()
  if err then
    return err
  end
  if not is_int(max_at_once, 0) then
    return bad_arg('max_at_once', 'an integer >= 0', ARGV[2])
  end
  if not (is_finite(interval) and interval >= 0) then
    return bad_arg('interval_us', 'a finite number >= 0', ARGV[3])
  end
  if not is_int(burst, 1) then
    return bad_arg('burst', 'an integer >= 1', ARGV[4])
  end
  if not is_int(lease_ttl, 1) then
    return bad_arg('lease_ttl_us', 'an integer >= 1', ARGV[5])
  end
  if not is_int(key_ttl_ms, 1) then
    return bad_arg('key_ttl_ms', 'an integer >= 1', ARGV[6])
  end
  if mailbox_prefix == nil then
    return bad_arg('mailbox_prefix', 'a string', nil)
  end
  return nil
end

-- Ids per command when one command takes a whole batch: unpack() is bounded by
-- the Lua stack.
local SLICE = 1000

-- Runs `command key` with the elements of `list` from index `first` on, at most
-- `per` of them per command. Returns the sum of the (integer) replies.
local function call_in_slices(command, key, list, first, per)
  local total = 0
  for from = first, #list, per do
    total = total + redis.call(command, key, unpack(list, from, math.min(from + per - 1, #list)))
  end
  return total
end

-- Milliseconds a key must live so that it outlasts `until_us` by key_ttl_ms.
local function ttl_until(until_us, now)
  return math.max(key_ttl_ms, math.ceil((until_us - now) / 1000) + key_ttl_ms)
end

-- What this call added to holders (and grants), to the queue or waiters, and
-- to seq: expire_written refreshes the TTL of exactly those keys. Removing
-- members is not recorded: it never makes a key need to live longer than the
-- TTL it was given when the members were written.
local wrote_holders = false
local wrote_queue = false
local wrote_seq = false

-- The GCRA state is read at most once per call, kept here while the call
-- reserves slots, and written back once, with its TTL, by flush_tat.
local tat_loaded = false
local tat_value = 0
local tat_text = nil

local function load_tat()
  if not tat_loaded then
    tat_value = tonumber(redis.call('GET', tat_key) or '') or 0
    tat_loaded = true
  end
end

-- Keeps the TAT exactly as stored ('%.3f'), as if it were written and read
-- back between two reservations.
local function set_tat(value)
  tat_text = string.format('%.3f', value)
  tat_value = tonumber(tat_text)
end

-- The earliest start given back and not yet passed: {member, start_us}, or nil.
-- Read at most once per call while it finds none (the common case: one
-- ZRANGEBYSCORE per call).
local spare_empty = false
local function earliest_spare(now)
  if spare_empty then
    return nil
  end
  local first = redis.call('ZRANGEBYSCORE', spare_key, int(now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #first == 0 then
    spare_empty = true
    return nil
  end
  return {first[1], tonumber(first[2])}
end

-- Reserves the next rate start: a start given back (spare) if one is still
-- ahead, else the next GCRA slot. Returns the start delay in whole
-- microseconds, or nil (and reserves nothing) if that delay would exceed
-- max_delay (nil: no bound).
--
-- A start given back is always earlier than the next GCRA slot (it was taken
-- from before the TAT), and it is a slot GCRA granted once and nobody used, so
-- handing it out again keeps every window within the GCRA bound.
local function reserve(now, max_delay)
  local spare = earliest_spare(now)
  if spare then
    local delay = math.ceil(spare[2] - now)
    if max_delay and delay > max_delay then
      return nil
    end
    redis.call('ZREM', spare_key, spare[1])
    spare_empty = false
    return delay
  end
  load_tat()
  local t = math.max(tat_value, now)
  local delay = math.ceil(math.max(0, t - (burst - 1) * interval - now))
  if max_delay and delay > max_delay then
    return nil
  end
  set_tat(t + interval)
  return delay
end

-- Gives back the rate start `start_at` (microseconds) reserved by `id` that
-- nobody will use: a start already passed is gone; the latest start reserved
-- rolls the TAT back (and with it any given-back starts that thereby become
-- the latest); any other one is kept in spare for the next reservation. So
-- withdrawn reservations never push later starts further away.
local function give_back(id, start_at, now)
  if interval <= 0 or start_at <= now then
    return
  end
  -- Starts already passed are gone (at most 100 per call; the key's TTL ends the rest).
  local passed = redis.call('ZRANGEBYSCORE', spare_key, '-inf', '(' .. int(now), 'LIMIT', 0, 100)
  if #passed > 0 then
    redis.call('ZREM', spare_key, unpack(passed))
  end
  load_tat()
  if tat_value <= 0 then
    return  -- the rate state is gone (flushed or expired): nothing to give back to
  end
  -- A future start s was reserved with TAT t = s + (burst - 1) * interval,
  -- within the microsecond its delay was rounded up by, and left the TAT at
  -- t + interval.
  local function is_latest(s)
    local latest = tat_value - burst * interval
    return latest > s - 1.001 and latest <= s + 0.001
  end
  if not is_latest(start_at) then
    redis.call('ZADD', spare_key, int(start_at), id)
    redis.call('PEXPIRE', spare_key, int(ttl_until(tat_value, now)))
    return
  end
  set_tat(tat_value - interval)
  while true do
    local top = redis.call('ZRANGE', spare_key, -1, -1, 'WITHSCORES')
    if #top == 0 or not is_latest(tonumber(top[2])) then
      break
    end
    redis.call('ZREM', spare_key, top[1])
    set_tat(tat_value - interval)
  end
end

-- Writes the TAT back if this call moved it, with a TTL that outlasts it.
-- Returns true if it wrote.
local function flush_tat(now)
  if tat_text == nil then
    return false
  end
  redis.call('SET', tat_key, tat_text, 'PX', int(ttl_until(tat_value, now)))
  tat_text = nil
  return true
end

-- Removes at most 100 members of the ZSET `key` whose score (an expiry) is
-- <= now, and the same ids from `other` with `other_command` (HDEL or ZREM), so
-- one call never does unbounded work; the rest go in later calls.
local function drop_ended(key, other, other_command, now)
  local ended = redis.call('ZRANGEBYSCORE', key, '-inf', int(now), 'LIMIT', 0, 100)
  if #ended > 0 then
    redis.call('ZREM', key, unpack(ended))
    redis.call(other_command, other, unpack(ended))
  end
end

-- Drops expired leases (and their grants) and dead waiters (and their tickets).
local function purge(now)
  drop_ended(holders_key, grants_key, 'HDEL', now)
  drop_ended(waiters_key, queue_key, 'ZREM', now)
end

-- Takes queued waiters out of the queue (and out of waiters) before a grant.
local function unqueue(ids)
  redis.call('ZREM', queue_key, unpack(ids))
  redis.call('ZREM', waiters_key, unpack(ids))
end

-- Makes `id` a holder (only when max_at_once > 0): a fencing token, when rate
-- limited the next GCRA slot, and a lease running from the start. A queued id
-- must be unqueued first. Returns token, delay_us (integer, how long the
-- holder must wait); or nil, and changes nothing, if the rate start would be
-- more than max_delay away (nil: no bound).
local function grant(id, now, max_delay)
  local delay = 0
  if interval > 0 then
    delay = reserve(now, max_delay)
    if delay == nil then
      return nil
    end
  end
  local token = redis.call('INCR', seq_key)
  wrote_seq = true
  local start_at = now + delay
  redis.call('ZADD', holders_key, int(start_at + lease_ttl), id)
  redis.call('HSET', grants_key, id, int(token) .. '|' .. int(start_at))
  wrote_holders = true
  return token, delay
end

local function process_of(id)
  return string.match(id, '^([^:]*):') or id
end

-- Moves queue heads into free concurrency slots, in ticket order, and posts
-- "<waiter id>|<token>|<delay_us>" to each new holder's process mailbox (one
-- RPUSH per process, messages in grant order). Returns how many were granted.
local function handoff(now)
  if max_at_once <= 0 then
    return 0
  end
  local free = math.min(max_at_once - redis.call('ZCARD', holders_key), 100)
  if free <= 0 then
    return 0
  end
  local heads = redis.call('ZRANGE', queue_key, 0, free - 1)
  if #heads == 0 then
    return 0
  end
  unqueue(heads)
  local processes = {}
  local messages = {}
  for _, head in ipairs(heads) do
    local token, delay = grant(head, now)
    local process = process_of(head)
    if messages[process] == nil then
      messages[process] = {}
      processes[#processes + 1] = process
    end
    local box = messages[process]
    box[#box + 1] = head .. '|' .. int(token) .. '|' .. int(delay)
  end
  for _, process in ipairs(processes) do
    local mailbox = mailbox_prefix .. process
    redis.call('RPUSH', mailbox, unpack(messages[process]))
    redis.call('PEXPIRE', mailbox, int(key_ttl_ms))
  end
  return #heads
end

-- holders and grants live until the last lease's expiry plus key_ttl_ms.
local function expire_holders(now)
  local last = redis.call('ZRANGE', holders_key, -1, -1, 'WITHSCORES')
  local holders_ttl = key_ttl_ms
  if #last == 2 then
    holders_ttl = ttl_until(tonumber(last[2]), now)
  end
  redis.call('PEXPIRE', holders_key, int(holders_ttl))
  redis.call('PEXPIRE', grants_key, int(holders_ttl))
end

-- Every key gets a TTL so an abandoned limiter disappears. Leases and the GCRA
-- state may point into the future; those keys live until then plus key_ttl_ms.
--
-- expire_written refreshes only what this call added to; a key it did not add
-- to is absent or kept the TTL it got when it was written. queue and waiters
-- are refreshed together (a waiter's liveness must not outlive its ticket), and
-- with them seq (whose counter must outlive the tickets it handed out).
local function expire_written(now)
  flush_tat(now)
  if wrote_holders then
    expire_holders(now)
  end
  if wrote_queue then
    redis.call('PEXPIRE', queue_key, int(key_ttl_ms))
    redis.call('PEXPIRE', waiters_key, int(key_ttl_ms))
    wrote_seq = true
  end
  if wrote_seq then
    redis.call('PEXPIRE', seq_key, int(key_ttl_ms))
  end
end

-- expire_keys refreshes every key, whatever the call wrote: for scripts whose
-- own code writes keys without recording it (renew.lua, cancel.lua). recent is
-- the exception: only acquire.lua's rate-only path adds to it, and refreshes it.
local function expire_keys(now)
  local tat_written = flush_tat(now)
  expire_holders(now)
  redis.call('PEXPIRE', queue_key, int(key_ttl_ms))
  redis.call('PEXPIRE', waiters_key, int(key_ttl_ms))
  redis.call('PEXPIRE', seq_key, int(key_ttl_ms))
  if not tat_written then
    local tat = tonumber(redis.call('GET', tat_key) or '')
    if tat then
      redis.call('PEXPIRE', tat_key, int(ttl_until(tat, now)))
    end
  end
end
-- End of shared helpers.
-- ---------------------------------------------------------------------------
