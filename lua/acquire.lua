-- acquire.lua: take a slot for a waiter, or queue it and report its position.
--
-- KEYS (the same six, in this order, for every script; all share one hash tag):
--   1 holders  ZSET   lease id -> lease expiry (integer microseconds, server time)
--   2 queue    ZSET   waiter id -> ticket (from KEYS[5]); lower ticket is served first
--   3 waiters  ZSET   waiter id -> liveness expiry (microseconds)
--   4 tat      STRING GCRA theoretical arrival time in microseconds ('%.3f')
--   5 seq      STRING counter for tickets and fencing tokens
--   6 grants   HASH   lease id -> "<token>|<start_at_us>"
--
-- One more key is written without being in KEYS: the mailbox of the process
-- that owns a waiter, ARGV[7] .. <process id>, where the process id is the part
-- of the waiter id before the first ':'. This is deliberate: the set of
-- processes is open-ended. The prefix carries the limiter's hash tag, so the
-- mailbox lives in the same cluster slot as KEYS.
--
-- ARGV (common header):
--   1 now_us         '' = read the server clock (TIME); an integer = use it (tests only)
--   2 max_at_once    integer, 0 = no concurrency limit
--   3 interval_us    float, emission interval 1e6 / max_per_second, 0 = no rate limit
--   4 burst          integer >= 1
--   5 lease_ttl_us   integer >= 1
--   6 key_ttl_ms     integer >= 1; every written key is given at least this TTL
--   7 mailbox prefix e.g. 'aiometer:{name}:mb:'
--   8 waiter id      '<process id>:<n>'; becomes the lease id when granted
--
-- Reply:
--   {1, token, delay_us}  granted; start after delay_us (rate limit), token is a
--                         fencing token. Repeating the call for a waiter that
--                         already holds a lease (granted by a handoff, or a retry
--                         after a lost reply) returns the same grant and changes
--                         nothing. With max_at_once = 0 no lease is kept, so a
--                         retry reserves another rate slot.
--   {0, ahead}            queued; ahead = 0-based position in the queue. The
--                         waiter's liveness is extended to now + lease_ttl_us.
-- Errors: 'ERR_ARG ...' for malformed arguments (nothing is written).

if redis.replicate_commands then pcall(redis.replicate_commands) end

local holders_key = KEYS[1]
local queue_key = KEYS[2]
local waiters_key = KEYS[3]
local tat_key = KEYS[4]
local seq_key = KEYS[5]
local grants_key = KEYS[6]

local now_arg = ARGV[1]
local max_at_once = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local lease_ttl = tonumber(ARGV[5])
local key_ttl_ms = tonumber(ARGV[6])
local mailbox_prefix = ARGV[7]
local waiter_id = ARGV[8]

-- ---------------------------------------------------------------------------
-- Shared helpers. Redis has no includes, so this block is repeated verbatim
-- in acquire.lua, release.lua, renew.lua and cancel.lua; keep the copies equal
-- (tests/test_scripts.py checks that they are).

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

-- Returns an error reply for the first malformed common argument, or nil.
local function check_common_args()
  if #KEYS ~= 6 then
    return redis.error_reply('ERR_ARG expected 6 keys, got ' .. #KEYS)
  end
  if now_arg == nil or (now_arg ~= '' and not is_int(tonumber(now_arg), 0)) then
    return bad_arg('now_us', 'empty or an integer >= 0', now_arg)
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

local function read_now()
  if now_arg ~= '' then
    return tonumber(now_arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Milliseconds a key must live so that it outlasts `until_us` by key_ttl_ms.
local function ttl_until(until_us, now)
  return math.max(key_ttl_ms, math.ceil((until_us - now) / 1000) + key_ttl_ms)
end

-- Drops a bounded number of expired leases and dead waiters, so one call never
-- does unbounded work; whatever is left is picked up by the next call.
local function purge(now)
  local expired = redis.call('ZRANGEBYSCORE', holders_key, '-inf', int(now), 'LIMIT', 0, 100)
  if #expired > 0 then
    redis.call('ZREM', holders_key, unpack(expired))
    redis.call('HDEL', grants_key, unpack(expired))
  end
  local dead = redis.call('ZRANGEBYSCORE', waiters_key, '-inf', int(now), 'LIMIT', 0, 100)
  if #dead > 0 then
    redis.call('ZREM', waiters_key, unpack(dead))
    redis.call('ZREM', queue_key, unpack(dead))
  end
end

-- Gives `id` a fencing token and, when rate limited, reserves the next GCRA
-- slot. Returns token, delay_us (integer, how long the holder must wait).
local function grant(id, now)
  redis.call('ZREM', queue_key, id)
  redis.call('ZREM', waiters_key, id)
  local token = redis.call('INCR', seq_key)
  local delay = 0
  if interval > 0 then
    local tat = tonumber(redis.call('GET', tat_key) or '') or 0
    local t = math.max(tat, now)
    delay = math.max(0, t - (burst - 1) * interval - now)
    redis.call('SET', tat_key, string.format('%.3f', t + interval))
  end
  delay = math.ceil(delay)
  local start_at = now + delay
  if max_at_once > 0 then
    redis.call('ZADD', holders_key, int(start_at + lease_ttl), id)
    redis.call('HSET', grants_key, id, int(token) .. '|' .. int(start_at))
  end
  return token, delay
end

local function process_of(id)
  return string.match(id, '^([^:]*):') or id
end

-- Moves queue heads into free concurrency slots, in ticket order, and posts
-- "<waiter id>|<token>|<delay_us>" to each new holder's process mailbox.
local function handoff(now)
  if max_at_once <= 0 then
    return 0
  end
  local granted = 0
  local budget = math.min(max_at_once, 100)
  while granted < budget and redis.call('ZCARD', holders_key) < max_at_once do
    local head = redis.call('ZRANGE', queue_key, 0, 0)[1]
    if not head then
      break
    end
    local token, delay = grant(head, now)
    local mailbox = mailbox_prefix .. process_of(head)
    redis.call('RPUSH', mailbox, head .. '|' .. int(token) .. '|' .. int(delay))
    redis.call('PEXPIRE', mailbox, int(key_ttl_ms))
    granted = granted + 1
  end
  return granted
end

-- Every key gets a TTL so an abandoned limiter disappears. Leases and the GCRA
-- state may point into the future; those keys live until then plus key_ttl_ms.
local function expire_keys(now)
  local last = redis.call('ZRANGE', holders_key, -1, -1, 'WITHSCORES')
  local holders_ttl = key_ttl_ms
  if #last == 2 then
    holders_ttl = ttl_until(tonumber(last[2]), now)
  end
  redis.call('PEXPIRE', holders_key, int(holders_ttl))
  redis.call('PEXPIRE', grants_key, int(holders_ttl))
  redis.call('PEXPIRE', queue_key, int(key_ttl_ms))
  redis.call('PEXPIRE', waiters_key, int(key_ttl_ms))
  redis.call('PEXPIRE', seq_key, int(key_ttl_ms))
  local tat = tonumber(redis.call('GET', tat_key) or '')
  if tat then
    redis.call('PEXPIRE', tat_key, int(ttl_until(tat, now)))
  end
end
-- End of shared helpers.
-- ---------------------------------------------------------------------------

local err = check_common_args()
if err then
  return err
end
if waiter_id == nil or not string.find(waiter_id, '^[^:]+:') then
  return bad_arg('waiter id', "'<process id>:<n>'", waiter_id)
end

local now = read_now()
purge(now)

local reply
if redis.call('ZSCORE', holders_key, waiter_id) then
  local grant_info = redis.call('HGET', grants_key, waiter_id) or ''
  local token, start_at = string.match(grant_info, '^(%d+)|(%d+)$')
  if token then
    reply = {1, tonumber(token), math.max(0, tonumber(start_at) - now)}
  else
    reply = {1, 0, 0}
  end
  return reply
end

if max_at_once == 0 then
  local token, delay = grant(waiter_id, now)
  reply = {1, token, delay}
else
  local held = redis.call('ZCARD', holders_key)
  local rank = redis.call('ZRANK', queue_key, waiter_id)
  local ahead = rank or redis.call('ZCARD', queue_key)
  if held + ahead < max_at_once then
    local token, delay = grant(waiter_id, now)
    reply = {1, token, delay}
  else
    if not rank then
      local ticket = redis.call('INCR', seq_key)
      redis.call('ZADD', queue_key, int(ticket), waiter_id)
    end
    redis.call('ZADD', waiters_key, int(now + lease_ttl), waiter_id)
    reply = {0, ahead}
  end
end

expire_keys(now)
return reply
