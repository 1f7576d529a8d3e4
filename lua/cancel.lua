-- cancel.lua: withdraw a waiter (queued, or granted while the caller gave up,
-- or sleeping towards a rate start it will not use).
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
--   8 waiter id
--
-- A rate start the waiter was granted (with a lease, or remembered by the
-- rate-only path) that is still ahead is given back (give_back): the next
-- reservation may use it.
--
-- Reply: {was_granted, granted}
--   was_granted  1 if the waiter had been granted a lease meanwhile (the lease
--                is released and its slot passed on), else 0
--   granted      number of queued waiters handed a slot by this call
-- A grant message may already sit in the process mailbox; the caller ignores
-- messages for waiter ids it no longer waits for.
-- Errors: 'ERR_ARG ...' for malformed arguments (nothing is written).

-- The prelude lua/_shared.lua comes first: it binds KEYS, ARGV[1..7] and the
-- shared helpers (int, read_now, purge, grant, handoff, expire_written, ...).

local waiter_id = ARGV[8]

local err = check_common_args()
if err then
  return err
end
if waiter_id == nil then
  return bad_arg('waiter id', 'a string', nil)
end

local now = read_now()
redis.call('ZREM', queue_key, waiter_id)
redis.call('ZREM', waiters_key, waiter_id)
local was_granted = redis.call('ZREM', holders_key, waiter_id)
local start_at = string.match(redis.call('HGET', grants_key, waiter_id) or '', '^%d+|(%d+)$')
if start_at then
  redis.call('HDEL', grants_key, waiter_id)
  redis.call('ZREM', recent_key, waiter_id)
  give_back(waiter_id, tonumber(start_at), now)
end
if max_at_once == 0 then
  -- Rate only: no lease, queue or waiter to hand on; the memory of the other
  -- ids keeps its TTL.
  flush_tat(now)
  return {0, 0}
end
purge(now)
local granted = handoff(now)
expire_keys(now)
return {was_granted, granted}
