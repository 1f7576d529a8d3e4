-- release.lua: give one or more leases back and hand the free slots to the
-- queue heads.
--
-- KEYS, the common ARGV[1..9] and the mailboxes: see lua/README.md.
--
-- ARGV after the common header:
--   10 ..           one or more lease ids
--
-- Every id is removed from holders and grants (its grants entry is left to the
-- sweep while control has a grants_scan, see sweep_grants; its entries in the window logs
-- stay: a start, once made, counts in its windows whether its slot is held or
-- not), then expired leases and dead
-- waiters are purged once and the free slots are handed off once.
--
-- Reply: {released, granted}
--   released  how many of the ids were held (and are now released); an unknown
--             or already expired lease counts 0 and frees nobody else's slot.
--             An id given twice counts once.
--   granted   number of queued waiters handed a slot (posted to their mailboxes)
--
-- TTLs: see "TTLs and purges" in lua/README.md (expire_written).
-- Errors: 'ERR_ARG ...' for malformed arguments (nothing is written).

-- The preludes lua/_read.lua and lua/_shared.lua come first: they bind KEYS,
-- ARGV[1..9] and the shared helpers (int, read_now, purge, grant, handoff,
-- expire_written, call_in_slices, ...).


local err = check_common_args()
if err then
  return err
end
if #ARGV < 10 then
  return bad_arg('lease id', 'given at least once', nil)
end

local now = read_now()
apply_control(now)
local released = call_in_slices('ZREM', holders_key, ARGV, 10, SLICE)
if max_at_once == 0 or not sweeping() then
  call_in_slices('HDEL', grants_key, ARGV, 10, SLICE)
end
purge(now)
local granted = handoff(now)
expire_written(now)
return {released, granted}
