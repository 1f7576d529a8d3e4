-- renew.lua: extend a process's leases and waiter liveness in one call.
--
-- KEYS, the common ARGV[1..9] and the mailboxes: see lua/README.md.
--
-- ARGV after the common header:
--   10 L             number of lease ids that follow
--   11 .. 10+L       lease ids to extend to now + lease_ttl_us (never shortened)
--   11+L ..          waiter ids still waiting in this process
--
-- A waiter of a process that keeps one liveness for its waiters (lua/README.md:
-- "Process liveness") is waiting while it is queued; the process's entry in
-- waiters is written again (now + lease_ttl) once per call that finds one of
-- them queued. Any other waiter has its own entry extended.
--
-- A lease whose expiry is <= now is lost even if it was not purged yet; it is
-- reported, never silently re-acquired. A waiter is lost when it is neither
-- waiting nor holding (a waiter found in holders was granted and its wake-up
-- is in flight).
--
-- Reply: {lost_lease_ids, lost_waiter_ids, granted}
--   granted  number of queued waiters handed a slot by this call
-- Errors: 'ERR_ARG ...' for malformed arguments (nothing is written).

-- The preludes lua/_read.lua and lua/_shared.lua come first: they bind KEYS,
-- ARGV[1..9] and the shared helpers (int, read_now, purge, grant, handoff,
-- expire_written, call_in_slices, ...).

local lease_count = tonumber(ARGV[10])

local err = check_common_args()
if err then
  return err
end
if not is_int(lease_count, 0) or 10 + lease_count > #ARGV then
  return bad_arg('lease count', 'an integer between 0 and the number of ids given', ARGV[10])
end

local now = read_now()
-- The ids are the caller's process's (that of the first id).
if #ARGV >= 11 then
  set_caller(process_of(ARGV[11]))
end
apply_control(now)
local lost_leases = {}
local lost_waiters = {}

for i = 11, 10 + lease_count do
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

local kept = {}
for i = 11 + lease_count, #ARGV do
  local id = ARGV[i]
  local process = process_of(id)
  if one_liveness(process) then
    -- Its process keeps one liveness for its waiters: a waiter still queued has
    -- it written once per call.
    if redis.call('ZSCORE', queue_key, id) then
      if not kept[process] then
        kept[process] = true
        keep_alive(now, process, true)
      end
    elseif not redis.call('ZSCORE', holders_key, id) then
      lost_waiters[#lost_waiters + 1] = id
    end
  elseif redis.call('ZSCORE', waiters_key, id) then
    redis.call('ZADD', waiters_key, int(now + lease_ttl), id)
  elseif not redis.call('ZSCORE', holders_key, id) then
    lost_waiters[#lost_waiters + 1] = id
  end
end

purge(now)
local granted = handoff(now)
expire_keys(now)
return {lost_leases, lost_waiters, granted}
