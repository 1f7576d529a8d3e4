-- cancel.lua: withdraw a waiter (queued, or granted while the caller gave up,
-- or sleeping towards a rate start it will not use).
--
-- KEYS, the common ARGV[1..7] and the mailboxes: see lua/README.md.
--
-- ARGV after the common header:
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

-- The preludes lua/_read.lua and lua/_shared.lua come first: they bind KEYS,
-- ARGV[1..7] and the shared helpers (int, read_now, purge, grant, handoff,
-- expire_written, call_in_slices, ...).

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
