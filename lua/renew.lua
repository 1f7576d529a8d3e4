-- renew.lua: extend a process's leases and waiter liveness in one call.
--
-- KEYS (the same eight, in this order, for every script; all share one hash tag):
--   1 holders  ZSET   lease id -> lease expiry (integer microseconds, server time)
--   2 queue    ZSET   waiter id -> ticket (from KEYS[5]); lower ticket is served first
--   3 waiters  ZSET   waiter id -> liveness expiry (microseconds)
--   4 tat      STRING GCRA theoretical arrival time in microseconds ('%.3f')
--   5 seq      STRING counter for tickets and fencing tokens
--   6 grants   HASH   lease id (or remembered rate-only waiter id) ->
--                     "<token>|<start_at_us>"
--   7 recent   ZSET   rate-only waiter id -> end of its memory (microseconds);
--                     only the rate-only path of acquire.lua reads or writes it,
--                     and cancel.lua deletes from it
--   8 spare    ZSET   rate start given back -> that start (microseconds): a
--                     start reserved by a waiter that left before it, handed
--                     to the next reservation (see give_back in _shared.lua)
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
--   8 L              number of lease ids that follow
--   9 .. 8+L         lease ids to extend to now + lease_ttl_us (never shortened)
--   9+L ..           waiter ids still waiting in this process
--
-- A lease whose expiry is <= now is lost even if it was not purged yet; it is
-- reported, never silently re-acquired. A waiter is lost when it is neither
-- waiting nor holding (a waiter found in holders was granted and its wake-up
-- is in flight).
--
-- Reply: {lost_lease_ids, lost_waiter_ids, granted}
--   granted  number of queued waiters handed a slot by this call
-- Errors: 'ERR_ARG ...' for malformed arguments (nothing is written).

-- The prelude lua/_shared.lua comes first: it binds KEYS, ARGV[1..7] and the
-- shared helpers (int, read_now, purge, grant, handoff, expire_written, ...).

local lease_count = tonumber(ARGV[8])

local err = check_common_args()
if err then
  return err
end
if not is_int(lease_count, 0) or 8 + lease_count > #ARGV then
  return bad_arg('lease count', 'an integer between 0 and the number of ids given', ARGV[8])
end

local now = read_now()
local lost_leases = {}
local lost_waiters = {}

for i = 9, 8 + lease_count do
  local id = ARGV[i]
  local expiry = tonumber(redis.call('ZSCORE', holders_key, id) or '')
  if expiry == nil or expiry <= now then
    lost_leases[#lost_leases + 1] = id
    redis.call('ZREM', holders_key, id)
    redis.call('HDEL', grants_key, id)
  else
    redis.call('ZADD', holders_key, int(math.max(expiry, now + lease_ttl)), id)
  end
end

for i = 9 + lease_count, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', waiters_key, id) then
    redis.call('ZADD', waiters_key, int(now + lease_ttl), id)
  elseif not redis.call('ZSCORE', holders_key, id) then
    lost_waiters[#lost_waiters + 1] = id
  end
end

purge(now)
local granted = handoff(now)
expire_keys(now)
return {lost_leases, lost_waiters, granted}
