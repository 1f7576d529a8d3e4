-- cancel.lua: withdraw a waiter (queued, or granted while the caller gave up,
-- or sleeping towards a rate start it will not use).
--
-- KEYS, the common ARGV[1..9] and the mailboxes: see lua/README.md.
--
-- ARGV after the common header:
--   10 waiter id
--
-- The waiter's reservation, if it was granted one (with a lease, or remembered
-- by the rate-only path), is withdrawn: with a cost of one unit and no windows,
-- a start still ahead is given back (give_back) and the next reservation may
-- use it; otherwise its entry leaves every window log (the running sums
-- follow) and the TAT is rolled back to what it was before the reservation if
-- that reservation was the last to move it. A queued waiter's cost record goes
-- too.
--
-- Reply: {was_granted, granted}
--   was_granted  1 if the waiter had been granted a lease meanwhile (the lease
--                is released and its slot passed on), else 0
--   granted      number of queued waiters handed a slot by this call
-- A grant message may already sit in the process mailbox; the caller ignores
-- messages for waiter ids it no longer waits for.
-- Errors: 'ERR_ARG ...' for malformed arguments (nothing is written).

-- The preludes lua/_read.lua and lua/_shared.lua come first: they bind KEYS,
-- ARGV[1..9] and the shared helpers (int, read_now, purge, grant, handoff,
-- expire_written, call_in_slices, ...).

local waiter_id = ARGV[10]

local err = check_common_args()
if err then
  return err
end
if waiter_id == nil then
  return bad_arg('waiter id', 'a string', nil)
end

local now = read_now()
apply_control(now)
redis.call('ZREM', queue_key, waiter_id)
redis.call('ZREM', waiters_key, waiter_id)
local was_granted = redis.call('ZREM', holders_key, waiter_id)
local token, start_at, cost = parse_grant(redis.call('HGET', grants_key, waiter_id))
if token and max_at_once > 0 and was_granted == 0 then
  -- The entry of a lease released already (left to the sweep, see sweep_grants):
  -- nothing of it to withdraw.
  redis.call('HDEL', grants_key, waiter_id)
  token, start_at = nil, nil
end
if token then
  redis.call('HDEL', grants_key, waiter_id)
  redis.call('ZREM', recent_key, waiter_id)
else
  -- Never granted (or its grant ended with its lease): with windows, withdraw
  -- still takes it out of every window log that holds it.
  cost = UNIT
end
withdraw(waiter_id, start_at, cost, now)
if max_at_once == 0 then
  -- Rate only: no lease, queue or waiter to hand on; the memory of the other
  -- ids keeps its TTL. A start given back is recorded in control (spare_ahead).
  flush_rates(now)
  flush_book()
  return {0, 0}
end
purge(now)
local granted = handoff(now)
expire_keys(now)
return {was_granted, granted}
