-- release.lua: give one or more leases back and hand the free slots to the
-- queue heads.
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
--   8 ..            one or more lease ids
--
-- Every id is removed from holders and grants, then expired leases and dead
-- waiters are purged once and the free slots are handed off once.
--
-- Reply: {released, granted}
--   released  how many of the ids were held (and are now released); an unknown
--             or already expired lease counts 0 and frees nobody else's slot.
--             An id given twice counts once.
--   granted   number of queued waiters handed a slot (posted to their mailboxes)
--
-- Only the keys the call wrote get their TTL refreshed (see expire_written).
-- Errors: 'ERR_ARG ...' for malformed arguments (nothing is written).

-- The prelude lua/_shared.lua comes first: it binds KEYS, ARGV[1..7] and the
-- shared helpers (int, read_now, purge, grant, handoff, expire_written, ...).


local err = check_common_args()
if err then
  return err
end
if #ARGV < 8 then
  return bad_arg('lease id', 'given at least once', nil)
end

local now = read_now()
local released = 0
-- In slices: unpack() is bounded by the Lua stack.
for first = 8, #ARGV, 1000 do
  local last = math.min(first + 999, #ARGV)
  released = released + redis.call('ZREM', holders_key, unpack(ARGV, first, last))
  redis.call('HDEL', grants_key, unpack(ARGV, first, last))
end
purge(now)
local granted = handoff(now)
expire_written(now)
return {released, granted}
