-- _shared.lua: the prelude of the writing scripts acquire.lua, release.lua,
-- renew.lua and cancel.lua, sent after _read.lua (see lua/README.md).
--
-- It binds the common ARGV[2..9] and defines the helpers the writers share. It
-- is not a script on its own.

if redis.replicate_commands then pcall(redis.replicate_commands) end

local max_at_once = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local lease_ttl = tonumber(ARGV[5])
local key_ttl_ms = tonumber(ARGV[6])
-- The mailbox of process p is the list (or, for an id ending in '!', the channel)
-- mailbox_prefix .. p: see handoff.
local mailbox_prefix = ARGV[7]
local window_spec = ARGV[8]
-- The adaptive spec (parse_adaptive in _read.lua): false when off.
local adaptive_spec = ARGV[9]
local adaptive = false
-- No start is given before this (microseconds; 0: no pause): see apply_control.
local not_before = 0

-- One unit of cost (a plain acquisition), in the micro-units costs travel in.
local UNIT = 1000000

-- The windows of ARGV[8], in order: {limit = units, per = us, k = 1 (counts
-- calls) or 0 (counts cost), key = its log, sum_field = its running total in
-- costs}; filled by check_common_args. longest: the index of the window with
-- the longest per (the last one to trim an entry, which then ends its cost
-- record). per_max: that per.
local windows = {}
local longest = 0
local per_max = 0

-- ---------------------------------------------------------------------------
-- Shared helpers.

-- Returns an error reply for the first malformed common argument, or nil.
local function check_common_args()
  if window_spec == nil then
    return bad_arg('window spec', 'a string', nil)
  end
  if window_spec ~= '' then
    for entry in string.gmatch(window_spec .. ';', '([^;]*);') do
      local l, p, k = string.match(entry, '^(%d+),(%d+),([01])$')
      local limit, per = tonumber(l), tonumber(p)
      if not l or limit < 1 or per < 1 or (k == '1' and limit < UNIT) or limit > 2^52 then
        return bad_arg('window spec', "'<limit units>,<per us>,<0|1>' entries separated by ';' "
          .. '(a window counting calls needs a limit >= 1000000)', window_spec)
      end
      windows[#windows + 1] = {limit = limit, per = per, k = tonumber(k),
        sum_field = 'sum:' .. p .. ':' .. k, sum = 0, dirty = false}
      if per >= per_max then
        per_max = per
        longest = #windows
      end
    end
  end
  if #KEYS ~= 10 + #windows then
    return redis.error_reply('ERR_ARG expected ' .. (10 + #windows) .. ' keys (8, costs, control '
      .. 'and one per window), got ' .. #KEYS)
  end
  for j, w in ipairs(windows) do
    w.key = KEYS[WINDOW_KEYS_FROM + j - 1]
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
  local parsed, adaptive_err = parse_adaptive(adaptive_spec)
  if adaptive_err then
    return adaptive_err
  end
  adaptive = parsed
  return nil
end

-- Milliseconds a key must live so that it outlasts `until_us` by key_ttl_ms.
local function ttl_until(until_us, now)
  return math.max(key_ttl_ms, math.ceil((until_us - now) / 1000) + key_ttl_ms)
end

-- The writers' bookkeeping, kept in control next to its fields and read by the
-- same HMGET (see lua/README.md: "TTLs and purges"). Numbers in microseconds;
-- nil when absent (control expired, deleted, or never written): then the call
-- purges and refreshes as if they were due.
--   keys_until  the expiry the group holders, grants, queue, waiters and seq
--               was last given (refresh_group); a key of the group this call
--               creates gets it, and the group is given a later one only when
--               what the call writes comes within 3/4 of key_ttl_ms of it.
--   next_purge  no expiry in holders or waiters is before it (written by this
--               version): purge() does nothing before then.
--   costly      1 once a waiter with a cost other than one unit was queued:
--               until then, handoffs do not read the queued waiters' costs
--               (queued_costs).
--   spare_ahead 0: a call found no start in spare ahead of it, and no start
--               was given back since (give_back writes 1): reserve() does not
--               read spare (earliest_spare).
--   tat_until   an expiry (microseconds) the tat key was given by this version
--               (PEXPIRE; a SET .. PX when control is written anyway): a
--               reservation that moves the TAT with INCRBYFLOAT (which keeps
--               the key's TTL) refreshes the TTL only when the TAT comes within
--               3/4 of key_ttl_ms of it. Later SETs only lengthen the TTL (by
--               more than the few intervals a give-back takes off), so the key
--               outlives the TAT by at least key_ttl_ms / 4.
--   grants_scan the HSCAN cursor of the sweep of grants (sweep_grants), written
--               by every sweep that ran; while it is present, a release leaves
--               the grants entries of the leases it frees to the sweep (one
--               HDEL less per release). Absent (control lost, or a sweep was
--               refused: an ACL without HSCAN or ZMSCORE): releases delete them.
--   epoch       what a fencing token adds to its number of seq (see token_of).
local BOOK_FIELDS = {
  'keys_until', 'next_purge', 'costly', 'spare_ahead', 'tat_until', 'grants_scan', 'epoch',
}
local keys_until = nil
local next_purge = nil
local costly = false
local spare_ahead = nil
local tat_until = nil
local grants_scan = nil
local epoch = nil
-- The call's server time, for token_of (set by apply_control).
local book_now = 0
-- What this call will store (flush_book writes the ones that changed).
local new_keys_until = nil
local new_next_purge = nil
local new_spare_ahead = nil
local new_tat_until = nil
-- The cursor a sweep of this call ended on, or false: a sweep was refused.
local new_grants_scan = nil
-- Whether control holds any of its own fields (apply_control then set its TTL).
local control_used = false
-- The epoch this call chose (token_of), for flush_book to store.
local new_epoch = nil

-- Process liveness (see lua/README.md: "Process liveness"). A process id whose
-- last character (before a final '!') is '.' keeps one liveness entry in
-- waiters for all its queued waiters (member: the process id, score: expiry),
-- instead of one per waiter; control's field 'live:<process id>' records the
-- expiry last written, so that a call knows without reading waiters whether
-- the entry must be written again.
local function one_liveness(process)
  local n = #process
  if string.byte(process, n) == 33 then  -- '!'
    n = n - 1
  end
  return n > 0 and string.byte(process, n) == 46  -- '.'
end

local function process_of(id)
  return string.match(id, '^([^:]*):') or id
end

-- The caller's process when it keeps one liveness (set_caller), the expiry
-- control records for it, and the one this call wrote (nil: none).
local live_process = nil
local live_until = nil
local new_live_until = nil

-- Names the process of the call (before apply_control, which reads its record).
local function set_caller(process)
  if process and one_liveness(process) then
    live_process = process
  end
end

-- Reads control (one HMGET) and applies it to this call: a limit set at run time
-- replaces the caller's (only a limit the caller has: max_at_once > 0, interval
-- > 0, so a rate-only caller stays rate-only); an adaptive caller's interval is
-- that of the adaptive rate now; a pause makes not_before its end. A control key
-- in use gets its TTL refreshed (until its pause end or keep_until, and
-- key_ttl_ms after): it lives while the limiter is used.
local function apply_control(now)
  local fields = BOOK_FIELDS
  if live_process then
    fields = {unpack(BOOK_FIELDS)}
    fields[#fields + 1] = 'live:' .. live_process
  end
  local c, any = read_control(fields)
  if live_process then
    live_until = c['live:' .. live_process]
  end
  keys_until, next_purge = c.keys_until, c.next_purge
  new_keys_until, new_next_purge = keys_until, next_purge
  spare_ahead = c.spare_ahead
  new_spare_ahead = spare_ahead
  tat_until = c.tat_until
  new_tat_until = tat_until
  grants_scan = c.grants_scan
  epoch = c.epoch
  book_now = now
  costly = c.costly ~= nil
  control_used = any
  if not any then
    return
  end
  if max_at_once > 0 and c.max_at_once and c.max_at_once >= 1 then
    max_at_once = c.max_at_once
  end
  if interval > 0 and c.interval_us and c.interval_us > 0 then
    interval = c.interval_us
  end
  if adaptive and interval > 0 then
    local cut = parse_cut(c.adaptive)
    if cut then
      local max_rate = 1e6 / interval
      local rate = recovered_rate(max_rate, floor_of(adaptive, max_rate), adaptive.recovery, cut, now)
      interval = 1e6 / rate
    end
  end
  if c.paused_until and c.paused_until > now then
    not_before = c.paused_until
  end
  redis.call('PEXPIRE', control_key, int(ttl_until(control_keep(c, now), now)))
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

-- Removing members is not recorded: it never makes a key need to live longer
-- than the TTL it was given when the members were written.
-- The latest expiry (lease or waiter liveness, microseconds) this call wrote to
-- holders or waiters (nil: none), and the keys of the group it created (found
-- empty before it wrote to them): see expire_written.
local wrote_until = nil
local created = {}

-- Records that this call wrote the expiry `expiry` to holders or waiters: the
-- group's TTL must cover it, and next_purge must not be after it.
local function wrote_expiry(expiry)
  wrote_until = math.max(wrote_until or expiry, expiry)
  if new_next_purge and expiry < new_next_purge then
    new_next_purge = expiry
  end
end

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
  if value >= 2^50 then
    -- A double this large is a multiple of 1/4: '%.3f' gives it back unchanged, so the
    -- text is made only when needed (tat_text_now). false: moved, text not made yet.
    tat_value = value
    tat_text = false
  else
    tat_text = string.format('%.3f', value)
    tat_value = tonumber(tat_text)
  end
end

-- The expiry (microseconds) a SET of this call gave the tat key: recorded in
-- control when flush_book writes control anyway (a tat_until older than the
-- key's expiry only makes a later INCRBYFLOAT refresh the TTL sooner), and
-- always when it is earlier than the one recorded (the TAT went down: a start
-- given back, a refund): tat_until must never be after the key's expiry.
local tat_set_until = nil

-- The earliest start given back and not yet passed: {member, start_us}, or nil.
-- Read at most once per call while it finds none, and not at all while
-- control's spare_ahead is 0 (the common case: nothing given back since a call
-- found spare empty; a start given back after that sets it to 1).
local spare_empty = false
local function earliest_spare(now)
  if spare_empty or new_spare_ahead == 0 then
    return nil
  end
  local first = redis.call('ZRANGEBYSCORE', spare_key, int(now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #first == 0 then
    spare_empty = true
    new_spare_ahead = 0
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
-- The reservation that last moved the TAT, to be written to costs' 'last'
-- field: "<id>|<tat text>|<tat text before>" (see the GCRA refund rule in
-- lua/README.md); nil: this call did not move the TAT.
local pending_last = nil

local function tat_text_now()
  return tat_text or string.format('%.3f', tat_value)
end

-- Whether the stored TAT is already right (moved by INCRBYFLOAT) and needs no
-- SET from flush_tat, only a TTL that covers it.
local tat_incremented = false

-- The first reservation of a call without a max delay, with an interval of
-- whole microseconds, on Redis 7.0 or later: INCRBYFLOAT adds one interval to the stored TAT and
-- returns the sum, in one command instead of GET now and SET later. When the
-- limiter is busy (the TAT was at or after now, no pause beyond it), the sum
-- is the new TAT and nothing more is written but, now and then, a TTL; else
-- the TAT it read is corrected as usual (SET .. PX by flush_tat). Refused (an
-- ACL without INCRBYFLOAT) or failed (the key holds no number), load_tat()
-- reads it as before. Whole intervals keep the sum exact: every stored TAT is
-- a multiple of the precision of a double at that size, and so is the sum.
-- Redis 7.0 or later: Redis 6.2 corrupts its heap when a script runs INCRBYFLOAT
-- (the command rewrites the script client's arguments for replication).
local INCRBYFLOAT_SAFE = (tonumber(redis.REDIS_VERSION_NUM) or 0) >= 0x070000

local function load_tat_adding(now)
  if tat_loaded or not INCRBYFLOAT_SAFE or interval <= 0 or interval ~= math.floor(interval)
      or interval >= 2^31 then
    return false
  end
  local stored = redis.pcall('INCRBYFLOAT', tat_key, int(interval))
  if type(stored) == 'table' then
    return false
  end
  tat_loaded = true
  tat_value = tonumber(stored) - interval
  if tat_value >= now and tat_value >= not_before then
    tat_value = tonumber(stored)
    tat_incremented = true
    return true
  end
  return false
end

local function reserve(now, max_delay)
  local spare = earliest_spare(math.max(now, not_before))
  if spare then
    local delay = math.ceil(spare[2] - now)
    if max_delay and delay > max_delay then
      return nil
    end
    redis.call('ZREM', spare_key, spare[1])
    spare_empty = false
    return delay
  end
  if max_delay == nil and load_tat_adding(now) then
    -- Busy: the start is the one GCRA gives from the TAT before the addition.
    return math.ceil(math.max(tat_value - burst * interval, now, not_before) - now)
  end
  load_tat()
  local t = math.max(tat_value, now)
  -- In a pause, the start is its end (and the GCRA counts it from there).
  local start = math.max(t - (burst - 1) * interval, now, not_before)
  local delay = math.ceil(start - now)
  if max_delay and delay > max_delay then
    return nil
  end
  -- A reservation of one unit without windows leaves 'last' as it is (so this
  -- path runs the commands it ran before costs existed): the TAT moved, so no
  -- earlier reservation's refund applies to it any more.
  set_tat(math.max(t, start) + interval)
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
    spare_empty = false
    new_spare_ahead = 1
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
    if tat_incremented then
      tat_incremented = false
      if tat_until == nil or tat_until < tat_value + key_ttl_ms * 750 then
        local ttl = ttl_until(tat_value, now)
        redis.call('PEXPIRE', tat_key, int(ttl))
        new_tat_until = now + ttl * 1000
      end
      return true
    end
    return false
  end
  local ttl = ttl_until(tat_value, now)
  redis.call('SET', tat_key, tat_text_now(), 'PX', int(ttl))
  tat_set_until = now + ttl * 1000
  tat_text = nil
  tat_incremented = false
  return true
end

-- The same values again, as new locals: every closure created below captures
-- these instead of the originals. A script builds all its helpers on every call,
-- and Lua 5.1 finds each local a closure captures by walking the list of open
-- upvalues from the highest stack slot down to it: a capture of a local declared
-- early (the keys, int) walked past every local captured since, most of what
-- building the helpers cost. Only names that are never assigned again may be
-- listed here (a table filled in place is fine); tests/test_scripts.py checks.
local int, costs_key, UNIT, holders_key, grants_key, queue_key,
  waiters_key, windows, tat_key, key_ttl_ms, lease_ttl, ttl_until,
  control_key, recent_key, seq_key, process_of, spare_key, SLICE,
  wrote_expiry, burst, one_liveness, created, is_int
  = int, costs_key, UNIT, holders_key, grants_key, queue_key,
  waiters_key, windows, tat_key, key_ttl_ms, lease_ttl, ttl_until,
  control_key, recent_key, seq_key, process_of, spare_key, SLICE,
  wrote_expiry, burst, one_liveness, created, is_int

-- ---------------------------------------------------------------------------
-- Costs and windows (see lua/README.md: "Costs and windows").

-- Per call: whether the windows were trimmed and their sums read (load_windows),
-- the latest start reserved in them (0: none), and what the call wrote.
local windows_loaded = false
local latest = 0
local wrote_windows = false
local wrote_costs = false

-- What an entry of `id` (cost `cost` units) weighs in window w.
local function weight(w, cost)
  if w.k == 1 then
    return UNIT
  end
  return cost
end

-- The cost units recorded for each of `ids` (absent: one unit).
local function costs_of(ids)
  local values = redis.call('HMGET', costs_key, unpack(ids))
  local out = {}
  for i = 1, #ids do
    out[i] = tonumber(values[i] or '') or UNIT
  end
  return out
end

local function read_latest()
  local top = redis.call('ZRANGE', windows[1].key, -1, -1, 'WITHSCORES')
  if #top == 2 then
    return tonumber(top[2])
  end
  return 0
end

-- Once per call, before the windows are used: reads their running sums, trims
-- at most 100 entries per window that started <= now - per (an entry leaving
-- the longest window ends its cost record), and reads the latest start.
local function load_windows(now)
  if windows_loaded or #windows == 0 then
    return
  end
  windows_loaded = true
  local fields = {}
  for j, w in ipairs(windows) do
    fields[j] = w.sum_field
  end
  local sums = redis.call('HMGET', costs_key, unpack(fields))
  -- The cost records of the entries that left the longest window end after the
  -- loop: a shorter window may trim the same entries later in it, and needs
  -- their costs to take them off its sum.
  local ended_for_good = nil
  for j, w in ipairs(windows) do
    w.sum = tonumber(sums[j] or '') or 0
    local ended = redis.call('ZRANGEBYSCORE', w.key, '-inf', int(now - w.per), 'LIMIT', 0, 100)
    if #ended > 0 then
      local drop = #ended * UNIT
      if w.k == 0 then
        drop = 0
        for _, c in ipairs(costs_of(ended)) do
          drop = drop + c
        end
      end
      redis.call('ZREM', w.key, unpack(ended))
      w.sum = math.max(0, w.sum - drop)
      w.dirty = true
      if j == longest then
        ended_for_good = ended
      end
    end
  end
  if ended_for_good then
    redis.call('HDEL', costs_key, unpack(ended_for_good))
  end
  latest = read_latest()
end

-- The earliest start >= t0 at which window w admits `add` more units: walks
-- its log oldest first, dropping entries, until what remains fits; t0 must be
-- at or after the latest start in the log. Entries that already left the
-- window at t0 (not trimmed yet) are walked through too, so the answer never
-- depends on trimming.
local function window_start(w, t0, add)
  if w.sum + add <= w.limit then
    return t0
  end
  local remaining = w.sum
  local from = 0
  while true do
    local page = redis.call('ZRANGE', w.key, from, from + 49, 'WITHSCORES')
    if #page == 0 then
      -- The running sum counted more than the log holds (the log expired, or
      -- a key was deleted): correct it and walk again.
      w.sum = w.sum - remaining
      w.dirty = true
      return window_start(w, t0, add)
    end
    local ids = {}
    for i = 1, #page, 2 do
      ids[#ids + 1] = page[i]
    end
    local costs = nil
    if w.k == 0 then
      costs = costs_of(ids)
    end
    for i = 1, #ids do
      remaining = remaining - ((costs and costs[i]) or UNIT)
      if remaining + add <= w.limit then
        return math.max(t0, tonumber(page[2 * i]) + w.per)
      end
    end
    from = from + 50
  end
end

-- Reserves the next start of `id` for a cost of `cost` units: the latest of
-- now, the latest start already reserved (first come, first served), the GCRA
-- and every window; then charges all of them (all or nothing). Returns the
-- start delay in whole microseconds, or nil (and reserves nothing) if it would
-- exceed max_delay (nil: no bound). A cost of one unit with no windows takes
-- reserve() (starts given back first), exactly as before costs existed.
local function reserve_for(id, cost, now, max_delay)
  if #windows == 0 and cost == UNIT then
    return reserve(now, max_delay)
  end
  load_windows(now)
  local t0 = math.max(now, latest, not_before)
  local t = t0
  local units = cost / UNIT
  if interval > 0 then
    load_tat()
    t = math.max(t, tat_value - (burst - units) * interval)
  end
  for _, w in ipairs(windows) do
    t = math.max(t, window_start(w, t0, weight(w, cost)))
  end
  local delay = math.ceil(t - now)
  if max_delay and delay > max_delay then
    return nil
  end
  local start = now + delay
  if interval > 0 then
    local before = tat_text_now()
    set_tat(math.max(tat_value, t) + units * interval)
    pending_last = id .. '|' .. tat_text_now() .. '|' .. before
  end
  if #windows > 0 then
    for _, w in ipairs(windows) do
      redis.call('ZADD', w.key, int(start), id)
      w.sum = w.sum + weight(w, cost)
      w.dirty = true
    end
    if cost ~= UNIT then
      redis.call('HSET', costs_key, id, int(cost))
    end
    latest = start
    wrote_windows = true
    wrote_costs = true
  end
  return delay
end

-- Withdraws the reservation of `id` (its start `start_at`, nil if it had none;
-- its cost `cost` units): it leaves every window log, and the TAT is rolled
-- back if it was the last reservation that moved it. With one unit and no
-- windows, give_back() does it as before costs existed. Also ends the cost
-- record of `id` (a queued waiter's).
local function withdraw(id, start_at, cost, now)
  if #windows == 0 and cost == UNIT then
    if start_at then
      give_back(id, start_at, now)
    end
  else
    if #windows > 0 then
      load_windows(now)
      local recorded = costs_of({id})[1]
      local removed = false
      for _, w in ipairs(windows) do
        if redis.call('ZREM', w.key, id) == 1 then
          w.sum = math.max(0, w.sum - weight(w, recorded))
          w.dirty = true
          removed = true
        end
      end
      if removed then
        latest = read_latest()
      end
    end
    if start_at and interval > 0 then
      local last = redis.call('HGET', costs_key, 'last') or ''
      local last_id, last_tat, before = string.match(last, '^(.*)|([^|]*)|([^|]*)$')
      load_tat()
      if last_id == id and last_tat == tat_text_now() then
        local value = tonumber(before) or 0
        if value > 0 then
          set_tat(value)
        else
          redis.call('DEL', tat_key)
          tat_text = nil
          tat_value = 0
          tat_incremented = false
        end
        redis.call('HDEL', costs_key, 'last')
      end
    end
  end
  if costs_key then
    redis.call('HDEL', costs_key, id)
  end
end

-- The window logs live until their latest start + per + key_ttl_ms, and costs
-- (whose running sums must outlive the logs they count) until the latest start
-- + the longest per + key_ttl_ms: set together, from the same latest start, so
-- that costs never expires before a log. Without windows costs holds only
-- 'last' and queued waiters' costs, which key_ttl_ms covers.
local function expire_costs(now)
  if #windows == 0 then
    redis.call('PEXPIRE', costs_key, int(key_ttl_ms))
    return
  end
  if not windows_loaded then
    latest = read_latest()
  end
  for _, w in ipairs(windows) do
    redis.call('PEXPIRE', w.key, int(ttl_until(math.max(latest + w.per, now), now)))
  end
  redis.call('PEXPIRE', costs_key, int(ttl_until(math.max(latest + per_max, now), now)))
end

-- Writes back what the call changed in the windows and costs (sums, 'last')
-- and refreshes the TTLs of those keys.
local function flush_windows(now)
  local fields = {}
  for _, w in ipairs(windows) do
    if w.dirty then
      fields[#fields + 1] = w.sum_field
      fields[#fields + 1] = int(w.sum)
      w.dirty = false
    end
  end
  if pending_last then
    fields[#fields + 1] = 'last'
    fields[#fields + 1] = pending_last
    pending_last = nil
  end
  if #fields > 0 then
    redis.call('HSET', costs_key, unpack(fields))
    wrote_costs = true
  end
  if wrote_costs or wrote_windows then
    expire_costs(now)
    wrote_costs = false
    wrote_windows = false
  end
end

-- The rate state a call changed (TAT, windows, costs), written back.
local function flush_rates(now)
  local wrote = flush_tat(now)
  flush_windows(now)
  return wrote
end

-- Removes at most 100 members of the ZSET `key` whose score (an expiry) is
-- <= now, and the same ids from `other` with `other_command` (HDEL or ZREM), so
-- one call never does unbounded work; the rest go in later calls. Returns the
-- ids removed.
local function drop_ended(key, other, other_command, now)
  local ended = redis.call('ZRANGEBYSCORE', key, '-inf', int(now), 'LIMIT', 0, 100)
  if #ended > 0 then
    redis.call('ZREM', key, unpack(ended))
    redis.call(other_command, other, unpack(ended))
  end
  return ended
end

-- The earliest expiry (score) in the ZSET `key` when it is before `bound`,
-- else bound.
local function earliest_expiry(key, bound)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first == 2 then
    return math.min(bound, tonumber(first[2]))
  end
  return bound
end

-- Dead waiters leave the queue, with their cost records (kept while they waited).
local function forget_queued(ids)
  redis.call('ZREM', queue_key, unpack(ids))
  redis.call('HDEL', costs_key, unpack(ids))
end

-- Pages of SLICE queue ids read per call for dead processes (drop_dead_processes).
local DEAD_PAGES = 10

-- The queued waiters of processes whose liveness ended (`dead`: process id ->
-- the ticket its pass over the queue resumes after, or false to start at the
-- head) leave the queue, with their cost records: the queue is read in ticket
-- order, in pages of SLICE ids, at most DEAD_PAGES pages per call, from the
-- lowest resume point. A pass that reached the tail ends: the processes' entries
-- leave waiters and control forgets their records. Otherwise each entry is
-- left in waiters with score -<last ticket read> (always ended, and never an
-- expiry), and the next call goes on from there. Returns whether it ended.
local function drop_dead_processes(dead)
  local from = '-inf'
  local lowest = nil
  for _, resume in pairs(dead) do
    if resume == false then
      lowest = false
    elseif lowest ~= false and (lowest == nil or resume < lowest) then
      lowest = resume
    end
  end
  if lowest then
    from = '(' .. int(lowest)
  end
  for _ = 1, DEAD_PAGES do
    local page = redis.call('ZRANGEBYSCORE', queue_key, from, '+inf', 'WITHSCORES',
      'LIMIT', 0, SLICE)
    local gone = {}
    for i = 1, #page, 2 do
      if dead[process_of(page[i])] ~= nil then
        gone[#gone + 1] = page[i]
      end
    end
    if #gone > 0 then
      forget_queued(gone)
    end
    if #page < 2 * SLICE then
      local members, fields = {}, {}
      for process in pairs(dead) do
        members[#members + 1] = process
        fields[#fields + 1] = 'live:' .. process
      end
      redis.call('ZREM', waiters_key, unpack(members))
      redis.call('HDEL', control_key, unpack(fields))
      return true
    end
    from = '(' .. page[#page]
  end
  -- Every page was full: `from` is '(<last ticket read>'.
  local resume = {}
  for process in pairs(dead) do
    resume[#resume + 1] = -tonumber(string.sub(from, 2))
    resume[#resume + 1] = process
  end
  redis.call('ZADD', waiters_key, unpack(resume))
  return false
end

-- Drops expired leases (and their grants) and dead waiters (and their tickets),
-- once next_purge is reached (before it, nothing has expired): then the
-- earliest expiry left, at most now + lease_ttl (what any later grant or queued
-- waiter of the same lease TTL expires after), is the next next_purge.
local function purge(now)
  if next_purge and now < next_purge then
    return
  end
  local full = #drop_ended(holders_key, grants_key, 'HDEL', now) == 100
  local ended = redis.call('ZRANGEBYSCORE', waiters_key, '-inf', int(now), 'WITHSCORES',
    'LIMIT', 0, 100)
  if #ended > 0 then
    -- A waiter's own entry (id '<process>:<n>'), or a process's (no ':'): a process
    -- found dead (its score an expiry), or one whose pass over the queue goes on
    -- (score -<ticket>, see drop_dead_processes).
    local waiters, dead, any_dead = {}, {}, false
    for i = 1, #ended, 2 do
      local member, score = ended[i], tonumber(ended[i + 1])
      if string.find(member, ':', 1, true) then
        waiters[#waiters + 1] = member
      else
        dead[member] = score <= 0 and -score or false
        any_dead = true
      end
    end
    if #waiters > 0 then
      redis.call('ZREM', waiters_key, unpack(waiters))
      forget_queued(waiters)
    end
    if any_dead and not drop_dead_processes(dead) then
      full = true
    end
    full = full or #ended == 200
  end
  if full then
    new_next_purge = now  -- more ended than one call drops: the next call goes on
  else
    new_next_purge = earliest_expiry(waiters_key, earliest_expiry(holders_key, now + lease_ttl))
  end
end

-- Records that a waiter with a cost other than one unit is queued (its cost is
-- in costs): from now on handoffs read the queued waiters' costs.
local costly_written = false
local function queued_costly()
  costly_written = costly_written or not costly
  costly = true
end

-- The cost units of the queued waiters `ids` (as costs_of). While no costly
-- waiter was ever queued (costly absent), they are not read: all are one unit.
-- Without the bookkeeping (keys_until absent: control expired or was deleted),
-- costly may have been lost while a costly waiter is still queued: they are read,
-- and costly is written again (queued waiters after `ids` are not known).
local function queued_costs(ids)
  if costly or keys_until == nil then
    if not costly then
      queued_costly()
    end
    return costs_of(ids)
  end
  local out = {}
  for i = 1, #ids do
    out[i] = UNIT
  end
  return out
end

-- Removes the liveness entries of the waiters `ids` that have one of their own
-- (their process does not keep one liveness).
local function drop_liveness(ids)
  local own = {}
  for _, id in ipairs(ids) do
    if not one_liveness(process_of(id)) then
      own[#own + 1] = id
    end
  end
  if #own > 0 then
    redis.call('ZREM', waiters_key, unpack(own))
  end
end

-- Keeps the liveness entry of `process` (one that keeps one liveness) for a
-- waiter of it this call queues or renews: written (until now + lease_ttl)
-- when `always` (a renewal; a waiter whose item is not marked '^': its process
-- had no waiter waiting when it sent it, so its last renewal may have found
-- nothing queued and not written the entry), or when the process is the
-- caller's and control's record of it is absent or less than 3/4 of lease_ttl
-- ahead. While a process has waiters queued its renewal loop writes the entry
-- every third of lease_ttl: a waiter is then covered as long as with an entry
-- of its own. Another process's (a call with items of several processes) is
-- always written, and not recorded.
local function keep_alive(now, process, always)
  if process == live_process then
    local known = new_live_until or live_until
    if new_live_until == now + lease_ttl
        or (not always and known and known >= now + lease_ttl * 3 / 4) then
      return  -- written by this call already, or far enough ahead
    end
    new_live_until = now + lease_ttl
  end
  redis.call('ZADD', waiters_key, int(now + lease_ttl), process)
  wrote_expiry(now + lease_ttl)
  created[waiters_key] = true
end

-- Takes queued waiters out of the queue (and out of waiters) before a grant.
local function unqueue(ids)
  redis.call('ZREM', queue_key, unpack(ids))
  drop_liveness(ids)
end

-- Tickets and fencing tokens come from seq, one block per call: the first number
-- the call needs takes, with one INCRBY, that number and the `more` the call may
-- still need after it (an upper bound); later numbers come from the block, in
-- the order they are needed, so tokens still increase in grant order and
-- tickets in arrival order, across calls too (a script runs alone). The
-- numbers a call took and did not use are the top of its block, and
-- return_numbers() gives them back (INCRBY -n) before the call ends: seq ends
-- exactly where one INCR per number would have left it.
local seq_next, seq_last = 1, 0

-- seq before the first block of this call (nil: the call took no number).
local seq_last_before = nil

-- The fencing token of the number `n` of seq is epoch + n (epoch: a field of
-- control, read by apply_control). seq starts again from 1 when its key expires
-- (the limiter unused for key_ttl_ms) or is deleted (reset), and tokens must
-- not: a store that remembers the highest token it saw would refuse every
-- holder after that. So a call that creates seq takes the server clock (in
-- microseconds) as the epoch, whatever control held, and a call that finds no
-- epoch (control expired or deleted while seq lived on) takes now - (n - 1) for
-- the number n of its first token: either way its first token is at least
-- now + 1. A token is then at most the clock when it was handed out plus the
-- numbers taken since its epoch was chosen minus the microseconds gone by, so a
-- new epoch's tokens exceed every earlier one as long as seq grows by less than
-- one number per microsecond (a million per second, far beyond what one Redis
-- serves).
--
-- take_block(size) takes `size` numbers with one INCRBY and returns the last;
-- a block that starts at 1 created seq, and sets the epoch.
local function take_block(size)
  local last = redis.call('INCRBY', seq_key, size)
  if last == size then
    epoch = book_now
    new_epoch = epoch
  end
  return last
end

local function token_of(n)
  if epoch == nil then
    epoch = math.max(0, book_now - (n - 1))
    new_epoch = epoch
  end
  return epoch + n
end

local function next_number(more)
  if seq_next > seq_last then
    local size = 1 + more
    seq_last = take_block(size)
    seq_next = seq_last - size + 1
    seq_last_before = seq_last_before or seq_next - 1
    if seq_next == 1 then
      created[seq_key] = true
    end
  end
  local number = seq_next
  seq_next = seq_next + 1
  return number
end

local function return_numbers()
  if seq_next <= seq_last then
    -- INCRBY by a negative number: the ACL of the limiter's user needs no DECRBY.
    redis.call('INCRBY', seq_key, seq_next - 1 - seq_last)
    seq_last = seq_next - 1
  end
end

-- Releases leave grants entries behind while control has a grants_scan (see
-- BOOK_FIELDS): the sweep deletes them. It runs in a call whose numbers of seq
-- cross a multiple of SWEEP_EVERY (about once per SWEEP_EVERY / 2 tasks under
-- contention: a ticket and a token each), and reads the next page of grants
-- (HSCAN from grants_scan, COUNT 2 * SWEEP_EVERY; a small hash comes whole):
-- an entry whose id is neither held (holders) nor a remembered rate-only grant
-- (recent) belongs to a lease released (or lost) already and goes.
local SWEEP_EVERY = 128

-- Whether releases may leave their grants entries to the sweep.
local function sweeping()
  return grants_scan ~= nil and new_grants_scan ~= false
end

local function sweep_grants()
  local before = seq_last_before
  if before == nil or math.floor(before / SWEEP_EVERY) == math.floor(seq_last / SWEEP_EVERY) then
    return
  end
  local page = redis.pcall('HSCAN', grants_key, int(grants_scan or 0), 'COUNT', 2 * SWEEP_EVERY)
  if page.err then
    new_grants_scan = false
    return
  end
  local fields = {}
  for i = 1, #page[2], 2 do
    fields[#fields + 1] = page[2][i]
  end
  if #fields > 0 then
    local held = redis.pcall('ZMSCORE', holders_key, unpack(fields))
    if held.err then
      new_grants_scan = false
      return
    end
    local remembered = redis.call('ZMSCORE', recent_key, unpack(fields))
    local gone = {}
    for i, id in ipairs(fields) do
      if not held[i] and not remembered[i] then
        gone[#gone + 1] = id
      end
    end
    if #gone > 0 then
      redis.call('HDEL', grants_key, unpack(gone))
    end
  end
  new_grants_scan = tonumber(page[1])
end

-- Makes `id` a holder (only when max_at_once > 0): a fencing token, when rate
-- limited the next GCRA slot, and a lease running from the start. A queued id
-- must be unqueued first. Returns token, delay_us (integer, how long the
-- holder must wait); or nil, and changes nothing, if the rate start would be
-- more than max_delay away (nil: no bound).
-- The grants entry of a grant: "<token>|<start_at_us>", then "|<cost units>"
-- when the cost is not one unit.
local function grant_entry(token, start_at, cost)
  local entry = int(token) .. '|' .. int(start_at)
  if cost ~= UNIT then
    entry = entry .. '|' .. int(cost)
  end
  return entry
end

-- A grants entry as token, start_at_us, cost units; nil if malformed.
local function parse_grant(entry)
  local token, start_at, rest = string.match(entry or '', '^(%d+)|(%d+)(.*)$')
  if not token then
    return nil
  end
  local cost = UNIT
  if rest ~= '' then
    cost = tonumber(string.match(rest, '^|(%d+)$')) or UNIT
  end
  return tonumber(token), tonumber(start_at), cost
end

local function grant(id, now, max_delay, cost, more)
  cost = cost or UNIT
  local delay = 0
  if interval > 0 or #windows > 0 then
    delay = reserve_for(id, cost, now, max_delay)
    if delay == nil then
      return nil
    end
  elseif not_before > now then
    -- A pause without a rate limit: the grant waits for its end.
    delay = not_before - now
    if max_delay and delay > max_delay then
      return nil
    end
  end
  local token = token_of(next_number(more or 0))
  local start_at = now + delay
  redis.call('ZADD', holders_key, int(start_at + lease_ttl), id)
  redis.call('HSET', grants_key, id, grant_entry(token, start_at, cost))
  wrote_expiry(start_at + lease_ttl)
  return token, delay
end

-- What the handoff of this call leaves, for the acquisitions that follow it in
-- the same call: held = the number of holders (nil: no handoff ran), queued =
-- 0 when it emptied the queue (nil: unknown), enqueued = how many waiters its
-- `enqueue` queued (0: none, or it did not run), popped = how many heads it
-- granted, granted = waiter id -> {token, delay_us} of each head it granted (when its
-- `enqueue` ran: only the queued-first items read it).
local handoff_left = {enqueued = 0, popped = 0, granted = {}}

-- Moves queue heads into free concurrency slots, in ticket order, and posts
-- "<waiter id>|<token>|<delay_us>" to each new holder's process mailbox (one
-- RPUSH per process, messages in grant order), or, for a process id ending in
-- '!', publishes them joined by ',' on the channel of the same name (one PUBLISH
-- per process; a refused PUBLISH posts them to the list). Returns how many were granted,
-- and the messages of process `own` (nil: none is), which are returned to the
-- caller instead of posted: a list, empty when none. `after` (default 0): how
-- many numbers of seq the call may need after the handoff (next_number takes
-- them in the same block as the grants' tokens). `enqueue` (optional): called
-- with the number of free slots once it is known to be at least one, before
-- the heads are read; it queues the caller's waiters at the tail and returns
-- how many it queued (acquire.lua's queue-first items).
local function handoff(now, own, after, enqueue)
  if max_at_once <= 0 then
    return 0
  end
  local held = redis.call('ZCARD', holders_key)
  if held == 0 then
    created[holders_key], created[grants_key] = true, true
  end
  local free = math.min(max_at_once - held, 100)
  handoff_left.held = held
  if free <= 0 then
    return 0
  end
  if enqueue then
    handoff_left.enqueued = enqueue(free)
  end
  -- The heads leave the queue as they are read (ZPOPMIN: lowest ticket first,
  -- as ZRANGE orders them), then waiters. Refused (an ACL without ZPOPMIN: the
  -- rules of earlier versions), they are read with ZRANGE and removed with ZREM.
  local popped = redis.pcall('ZPOPMIN', queue_key, free)
  local heads = {}
  if popped.err then
    heads = redis.call('ZRANGE', queue_key, 0, free - 1)
    if #heads > 0 then
      redis.call('ZREM', queue_key, unpack(heads))
    end
  else
    for j = 1, #popped, 2 do
      heads[#heads + 1] = popped[j]
    end
  end
  -- Fewer heads than free slots: the queue is empty now.
  if #heads < free then
    handoff_left.queued = 0
  end
  if #heads == 0 then
    return 0
  end
  handoff_left.held = held + #heads
  handoff_left.popped = #heads
  drop_liveness(heads)
  -- A queued waiter's cost was recorded when it queued.
  local costs = queued_costs(heads)
  local processes = {}
  local messages = {}
  for i, head in ipairs(heads) do
    local token, delay = grant(head, now, nil, costs[i], #heads - i + (after or 0))
    if enqueue then
      handoff_left.granted[head] = {token, delay}  -- read only after queue first
    end
    if #windows == 0 and costs[i] ~= UNIT then
      redis.call('HDEL', costs_key, head)  -- kept in its grants entry from now on
    end
    local process = process_of(head)
    if messages[process] == nil then
      messages[process] = {}
      processes[#processes + 1] = process
    end
    local box = messages[process]
    box[#box + 1] = head .. '|' .. int(token) .. '|' .. int(delay)
  end
  local kept = {}
  for _, process in ipairs(processes) do
    if process == own then
      kept = messages[process]
    else
      local mailbox = mailbox_prefix .. process
      -- A process id ending in '!' listens on the channel of that name: one PUBLISH
      -- of the messages joined by ',' (a channel is not a key: nothing to expire).
      -- Refused (an ACL without the channel), or heard by nobody, they go to the list
      -- of that name: a process refused SUBSCRIBE reads that list instead, and one
      -- between two subscriptions asks again for its waiters once subscribed, and
      -- deletes the list unread.
      local published = false
      if string.byte(process, -1) == 33 then
        local reply = redis.pcall('PUBLISH', mailbox, table.concat(messages[process], ','))
        published = type(reply) == 'number' and reply > 0
      end
      if not published then
        redis.call('RPUSH', mailbox, unpack(messages[process]))
        redis.call('PEXPIRE', mailbox, int(key_ttl_ms))
      end
    end
  end
  return #heads, kept
end

-- Every key gets a TTL so an abandoned limiter disappears. Leases and the GCRA
-- state may point into the future; those keys live until then plus key_ttl_ms.

-- Writes the bookkeeping that changed to control. control gets a TTL of
-- key_ttl_ms unless it holds fields of its own (apply_control gave it its
-- TTL); losing the bookkeeping only makes the next call purge and refresh.
local function flush_book()
  sweep_grants()
  local fields = {}
  if new_keys_until and new_keys_until ~= keys_until then
    fields[#fields + 1] = 'keys_until'
    fields[#fields + 1] = int(new_keys_until)
  end
  if new_next_purge and new_next_purge ~= next_purge then
    fields[#fields + 1] = 'next_purge'
    fields[#fields + 1] = int(new_next_purge)
  end
  if costly_written then
    fields[#fields + 1] = 'costly'
    fields[#fields + 1] = '1'
    costly_written = false
  end
  if new_spare_ahead and new_spare_ahead ~= spare_ahead then
    fields[#fields + 1] = 'spare_ahead'
    fields[#fields + 1] = int(new_spare_ahead)
  end
  if new_live_until then
    fields[#fields + 1] = 'live:' .. live_process
    fields[#fields + 1] = int(new_live_until)
    live_until, new_live_until = new_live_until, nil
  end
  if new_grants_scan == false then
    if grants_scan ~= nil then
      redis.call('HDEL', control_key, 'grants_scan')
    end
    grants_scan = nil
  elseif new_grants_scan ~= nil then
    fields[#fields + 1] = 'grants_scan'
    fields[#fields + 1] = int(new_grants_scan)
    grants_scan = new_grants_scan
  end
  new_grants_scan = nil
  if tat_set_until then
    if new_tat_until and tat_set_until < new_tat_until then
      new_tat_until = tat_set_until
    elseif new_tat_until == tat_until and #fields > 0 then
      new_tat_until = tat_set_until
    end
  end
  tat_set_until = nil
  if new_tat_until and new_tat_until ~= tat_until then
    fields[#fields + 1] = 'tat_until'
    fields[#fields + 1] = int(new_tat_until)
  end
  if new_epoch then
    fields[#fields + 1] = 'epoch'
    fields[#fields + 1] = int(new_epoch)
    new_epoch = nil
  end
  keys_until, next_purge, spare_ahead = new_keys_until, new_next_purge, new_spare_ahead
  tat_until = new_tat_until
  if #fields > 0 then
    redis.call('HSET', control_key, unpack(fields))
    if not control_used then
      redis.call('PEXPIRE', control_key, int(key_ttl_ms))
    end
  end
end

-- The keys of the group whose TTL refresh_group sets together.
local GROUP = {holders_key, grants_key, queue_key, waiters_key, seq_key}

-- Gives every key of the group the TTL until the latest lease in holders (or
-- `latest_written`, if later) plus key_ttl_ms, and records it in keys_until.
local function refresh_group(now, latest_written)
  local last = redis.call('ZRANGE', holders_key, -1, -1, 'WITHSCORES')
  local horizon = math.max(now, latest_written)
  if #last == 2 then
    horizon = math.max(horizon, tonumber(last[2]))
  end
  local ttl = ttl_until(horizon, now)
  for _, key in ipairs(GROUP) do
    redis.call('PEXPIRE', key, int(ttl))
  end
  new_keys_until = now + ttl * 1000
end

-- expire_written refreshes the group's TTLs only when they may no longer cover
-- what this call wrote with a margin: keys_until is absent or less than 3/4 of
-- key_ttl_ms after the latest expiry written (so once per quarter of
-- key_ttl_ms while the limiter is used). Otherwise only a key of the group this
-- call created (it had no TTL) is given keys_until. A key the call did not
-- write is absent or kept the TTL it had; queue and waiters always have the
-- same (a waiter's liveness must not outlive its ticket), and seq too (its
-- counter must outlive the tickets and tokens it handed out).
local function expire_written(now)
  flush_rates(now)
  if wrote_until then
    if keys_until == nil or keys_until < wrote_until + key_ttl_ms * 750 then
      refresh_group(now, wrote_until)
    else
      local ttl = int(math.ceil((keys_until - now) / 1000))
      for _, key in ipairs(GROUP) do
        if created[key] then
          redis.call('PEXPIRE', key, ttl)
        end
      end
    end
  end
  flush_book()
end

-- expire_keys refreshes every key, whatever the call wrote: for scripts whose
-- own code writes keys without recording it (renew.lua, cancel.lua). recent is
-- the exception: only acquire.lua's rate-only path adds to it, and refreshes it.
local function expire_keys(now)
  local tat_written = flush_rates(now)
  refresh_group(now, now)
  if not tat_written then
    local tat = tonumber(redis.call('GET', tat_key) or '')
    if tat then
      redis.call('PEXPIRE', tat_key, int(ttl_until(tat, now)))
    end
  end
  flush_book()
end
-- End of shared helpers.
-- ---------------------------------------------------------------------------
