-- acquire.lua: take a slot for one or more waiters, or queue them and report
-- their positions.
--
-- KEYS, the common ARGV[1..9] and the mailboxes: see lua/README.md.
--
-- ARGV after the common header:
--   10 ..            zero or more release items '-<lease id>', then zero or more
--                    waiter items (at least one item in all; a release item
--                    after a waiter item is refused). A release item does what
--                    release.lua does for its id, first: the id leaves holders
--                    and grants (its entries in the window logs stay); then
--                    expired leases and dead waiters are purged once, the free
--                    slots are handed off to the queue heads once (in ticket
--                    order: a waiter item of this call queues behind them),
--                    and the waiter items are served as below. So a process
--                    gives a slot back and asks for the next one in one call.
--   then             the waiter items
--                    '[+|^]<process id>:<n>[/<max delay us>][*<cost units>]';
--                    the waiter id '<process id>:<n>' becomes the lease id when
--                    granted. A leading '+' marks a fresh item: its caller
--                    sends this id for the first time (in this call, or in a
--                    resend of it). In a call whose release items were all
--                    held (so no earlier run of the same call released them:
--                    this is its first run), a fresh id holds no lease and is
--                    not looked up in holders (the first time it comes in the
--                    call); in any other call the '+' is ignored.
--                    A leading '^' marks a fresh item too, whose caller
--                    expects it to queue (its process has waiters queued
--                    already). When every waiter item of such a first run
--                    starts with '^', costs one unit, has no max delay, is of
--                    the process of the first release item, and no id comes
--                    twice, the items are queued first ("queue
--                    first"): once the handoff knows a slot is free, they take
--                    their tickets and liveness at the tail of the queue, then
--                    the handoff reads the heads. Those it reaches are granted
--                    (their entries are '1,token,delay_us'; their grants are
--                    not among the own grants); the others stay queued. The
--                    outcome is the one the items would get after the handoff
--                    (the same grants, the same order); what differs: a
--                    queued item's ahead is -1 (not counted, which saves the
--                    ZCARD of the queue) unless the handoff reached an item of
--                    the call, and a granted item took a ticket too (seq moves
--                    one more). Otherwise (no slot free, an item without '^',
--                    ...) '^' is read as '+'.
--                    '/<max delay us>' (the caller's remaining time): the
--                    waiter is never given a rate start further away than
--                    that. '*<cost units>': the cost of the acquisition (see
--                    "Costs and windows" in lua/README.md; absent: one unit,
--                    1000000). Neither suffix is part of the id.
--
-- A queued waiter's cost (when not one unit) is recorded in costs under its id,
-- so that a handoff charges it when the waiter is granted.
--
-- The call does exactly what one call per waiter id, in ARGV order and with the
-- same now, would do (expired leases and dead waiters are purged once, first):
-- an id later in the batch queues behind the ones before it and gets a later
-- ticket or token, and consecutive rate reservations follow each other.
--
-- Reply (a call without release items): one string with one entry per waiter
-- id, in ARGV order, the entries
-- separated by ';' and the integers of an entry by ',' (a flat string costs a
-- client far less to parse than nested arrays; for two ids: '1,17,0;0,3'):
--   1,token,delay_us  granted; start after delay_us (rate limit), token is a
--                     fencing token. Repeating the call for a waiter that
--                     already holds a lease (granted by a handoff, or a retry
--                     after a lost reply) returns the same grant and changes
--                     nothing.
--   0,ahead           queued; ahead = 0-based position in the queue, or -1
--                     when not counted (items queued first, see above). The
--                     waiter's liveness is extended to now + lease_ttl_us.
--   2,0               refused: the waiter's next rate start would be further
--                     away than its max delay. Nothing is reserved, held or
--                     queued for it (an entry it already had in the queue
--                     stays, for its caller to cancel).
--
-- Reply of a call with release items: {released, own grants, entries}:
--   released    as release.lua's: how many of the ids were held (an unknown or
--               expired lease counts 0 and frees nobody else's slot; an id
--               given twice counts once)
--   own grants  the handoff's grants to queued waiters of the caller's own
--               process (the part before ':' of the first item), which are
--               NOT posted to its mailbox: "<waiter id>|<token>|<delay_us>"
--               (the mailbox format), joined by ';', in grant order; '' if
--               none. Grants to other processes are posted as always.
--   entries     the string above, for the waiter items ('' if none)
-- Only clients that send release items read this shape. A swap repeated after a
-- lost reply releases nothing more (released counts 0) and does not return the
-- own grants of the first run again: the caller's waiters find them by asking
-- again (an id already granted gets its grant back, see above).
--
-- Rate only (max_at_once = 0) takes a fast path that keeps no lease: holders,
-- queue and waiters are neither read nor written (nor purged). Every id is
-- granted, and its grant is remembered, so that a retry after a lost reply
-- (the same ids sent again) neither reserves a second rate slot nor takes a
-- second token:
--   - first, at most 100 memories that ended (score in recent <= now) leave
--     recent and grants; any others go in later calls;
--   - an id with a grant "<token>|<start_at_us>" in grants and an end > now in
--     recent is a retry: its entry is 1,token,max(0, start_at_us - now) (the
--     same grant, its delay shorter by the time gone by) and nothing is
--     reserved or written for it;
--   - any other id is new: it takes the next token and rate slot, and is
--     remembered: ZADD recent <now + lease_ttl_us> id, and
--     HSET grants id "<token>|<now + delay_us>".
-- So an id given twice in one batch is new the first time and a retry the
-- second. The new ids of a call take their rate starts in ARGV order (a start
-- given back first, see reserve), and the granted ones their tokens from one
-- INCRBY seq <number granted>; a refused id (its max delay) is not
-- remembered. A call in which no id is granted anew writes nothing (tat, seq
-- and every TTL stay as they were) but its trims of the window logs.
--
-- How long an id is remembered: lease_ttl_us (ARGV[5]), so that the ARGV
-- layout stays that of every other script. A client repeats a call only within
-- its retry window, which is far shorter than the lease TTL, so a retry always
-- finds the memory. An id sent after its memory ended is new again, and so is
-- a remembered id whose grant is gone (release.lua, renew.lua and cancel.lua
-- delete the grants entry of every id they are given). A rate-only id is never
-- put in holders. recent and grants, when written, live until
-- now + lease_ttl_us + key_ttl_ms: past the end of every memory they hold.
--
-- TTLs: see "TTLs and purges" in lua/README.md (expire_written).
-- Errors: 'ERR_ARG ...' for malformed arguments, and for a cost that no limit
-- can ever admit (above burst units with a rate limit, or above the limit of a
-- window counting cost); nothing is written.

-- The preludes lua/_read.lua and lua/_shared.lua come first: they bind KEYS,
-- ARGV[1..9] and the shared helpers (int, read_now, purge, grant, handoff,
-- expire_written, call_in_slices, ...).


local err = check_common_args()
if err then
  return err
end
if #ARGV < 10 then
  return bad_arg('waiter id', "'<process id>:<n>' (at least one)", nil)
end
-- The release items' lease ids, in ARGV order; the waiter items follow them.
local releases = {}
local first_waiter = 10
while first_waiter <= #ARGV and string.sub(ARGV[first_waiter], 1, 1) == '-' do
  local lease_id = string.match(ARGV[first_waiter], '^%-([^:/*]+:[^/*]*)$')
  if not lease_id then
    return bad_arg('release item', "'-<process id>:<n>'", ARGV[first_waiter])
  end
  releases[#releases + 1] = lease_id
  first_waiter = first_waiter + 1
end
local count = #ARGV - first_waiter + 1
-- ids[i], max_delays[i] (nil: no bound), costs[i] (units) and fresh[i] (a leading
-- '+') of the i-th waiter item.
local ids = {}
local max_delays = {}
local costs = {}
local fresh = {}
-- queue_first[i]: the i-th waiter item starts with '^' (see the header).
local queue_first = {}
local ITEM = "'[+|^]<process id>:<n>[/<max delay us>][*<cost units>]'"
for i = first_waiter, #ARGV do
  if string.sub(ARGV[i], 1, 1) == '-' then
    return bad_arg('release item', 'before every waiter item', ARGV[i])
  end
  local text = ARGV[i]
  local mark = string.byte(text)
  local is_fresh = mark == 43 or mark == 94  -- '+' or '^'
  if is_fresh then
    text = string.sub(text, 2)
  end
  local id, tail = string.match(text, '^([^:/*]+:[^/*]*)(.*)$')
  local max_delay, cost = nil, nil
  if tail and tail ~= '' then
    -- '/<max delay>' (a start reserved ahead) first, the most frequent.
    max_delay = string.match(tail, '^/(%d+)$')
    if not max_delay then
      max_delay, cost = string.match(tail, '^/(%d+)%*(%d+)$')
      if not max_delay then
        cost = string.match(tail, '^%*(%d+)$')
        if not cost then
          id = nil
        end
      end
    end
  end
  if not id then
    return bad_arg('waiter id', ITEM, ARGV[i])
  end
  cost = tonumber(cost) or UNIT
  if cost < 1 or cost > 2^52 then
    return bad_arg('cost units', 'an integer >= 1', ARGV[i])
  end
  if interval > 0 and cost > burst * UNIT then
    return bad_arg('cost units', 'at most burst units (' .. int(burst * UNIT) .. ')', ARGV[i])
  end
  for _, w in ipairs(windows) do
    if w.k == 0 and cost > w.limit then
      return bad_arg('cost units', 'at most the limit of every window counting cost ('
        .. int(w.limit) .. ')', ARGV[i])
    end
  end
  local k = i - first_waiter + 1
  ids[k] = id
  max_delays[k] = tonumber(max_delay)
  costs[k] = cost
  fresh[k] = is_fresh
  queue_first[k] = mark == 94
end

-- ---------------------------------------------------------------------------
-- Rate-only helpers.

-- The ids that are remembered: id -> {token, start_at_us}; an id checked and
-- not remembered maps to false. One HMGET grants per SLICE ids; only an id
-- with a grant (in practice, a retry) costs a ZSCORE recent, to check that its
-- memory has not ended.
local function remembered_grants(now)
  local known = {}
  for first = 1, count, SLICE do
    local last = math.min(first + SLICE - 1, count)
    local values = redis.call('HMGET', grants_key, unpack(ids, first, last))
    for i = first, last do
      local id = ids[i]
      local value = values[i - first + 1]
      local token, start_at = nil, nil
      if value then
        token, start_at = parse_grant(value)
      end
      if token and known[id] == nil then
        known[id] = false
        local ends = tonumber(redis.call('ZSCORE', recent_key, id) or '')
        if ends and ends > now then
          known[id] = {token, start_at}
        end
      end
    end
  end
  return known
end

-- ---------------------------------------------------------------------------

-- The entries of the reply string (see the header): granted, and refused.
local REFUSED_ENTRY = '2,0'
local function granted_entry(token, delay)
  return '1,' .. int(token) .. ',' .. int(delay)
end

-- The reply string (see the header) of a list of {1, token, delay_us} and
-- {0, ahead} tables.
local function encode_replies(replies)
  local entries = {}
  for i, reply in ipairs(replies) do
    if reply[1] == 1 then
      entries[i] = granted_entry(reply[2], reply[3])
    elseif reply[1] == 2 then
      entries[i] = REFUSED_ENTRY
    else
      entries[i] = '0,' .. int(reply[2])
    end
  end
  return table.concat(entries, ';')
end

-- The reply: the entries string, or with release items the table of the
-- header (released, own grants, entries).
local released = 0
local own_grants = {}
local function reply_with(entries)
  if #releases == 0 then
    return entries
  end
  return {released, table.concat(own_grants, ';'), entries}
end

local now = read_now()
-- The items are the caller's process's (that of the first item).
set_caller(process_of(releases[1] or ids[1]))
apply_control(now)
local replies = {}
if #releases > 0 then
  released = call_in_slices('ZREM', holders_key, releases, 1, SLICE)
  if max_at_once == 0 or not sweeping() then
    call_in_slices('HDEL', grants_key, releases, 1, SLICE)
  end
end

-- Rate only. With the server clock, a first call runs TIME, ZRANGEBYSCORE
-- recent (and ZREM recent, HDEL grants when memories ended), HMGET grants,
-- INCRBY and PEXPIRE seq, INCRBYFLOAT tat (with a rate limit; and SET tat ..
-- PX unless it is one start while the limiter is busy), ZADD recent, HSET
-- grants and PEXPIRE recent and grants: 10 or 11 commands, whatever the number
-- of ids (up to SLICE). A retry runs TIME, ZRANGEBYSCORE, HMGET and one ZSCORE
-- recent per remembered id, and writes nothing.
if max_at_once == 0 then
  drop_ended(recent_key, grants_key, 'HDEL', now)  -- ended memories
  local known = remembered_grants(now)
  -- The new ids in ARGV order, and their rate start delays (false: refused);
  -- taken[id]: granted anew in this call (its second time in the batch is a retry).
  local new_ids = {}
  local delays = {}
  local new_costs = {}
  local taken = {}
  local granted = 0
  -- refused[i]: the id at ARGV position 9 + i was refused (its max delay).
  local refused = {}
  for i = 1, count do
    local id = ids[i]
    if not known[id] and not taken[id] then
      local delay = 0
      if interval > 0 or #windows > 0 then
        delay = reserve_for(id, costs[i], now, max_delays[i]) or false
      elseif not_before > now then
        -- A pause without a rate limit: the grant waits for its end.
        delay = not_before - now
        if max_delays[i] and delay > max_delays[i] then
          delay = false
        end
      end
      if delay then
        taken[id] = true
        granted = granted + 1
      else
        refused[i] = true
      end
      local n = #new_ids + 1
      new_ids[n] = id
      delays[n] = delay
      new_costs[n] = costs[i]
    end
  end
  -- The new grants: id -> token, id -> start (microseconds).
  local tokens = {}
  local starts = {}
  if granted > 0 then
    local before = take_block(granted) - granted
    redis.call('PEXPIRE', seq_key, int(key_ttl_ms))
    local ends = int(now + lease_ttl)
    local members = {}
    local fields = {}
    local n = 0
    for k, id in ipairs(new_ids) do
      local delay = delays[k]
      if delay then
        n = n + 1
        local token = token_of(before + n)
        local start_at = now + delay
        tokens[id] = token
        starts[id] = start_at
        members[2 * n - 1] = ends
        members[2 * n] = id
        fields[2 * n - 1] = id
        fields[2 * n] = grant_entry(token, start_at, new_costs[k])
      end
    end
    -- Pairs: SLICE ids per command.
    call_in_slices('ZADD', recent_key, members, 1, 2 * SLICE)
    call_in_slices('HSET', grants_key, fields, 1, 2 * SLICE)
    local memory_ttl = int(ttl_until(now + lease_ttl, now))
    redis.call('PEXPIRE', recent_key, memory_ttl)
    redis.call('PEXPIRE', grants_key, memory_ttl)
  end
  -- Also after a call that granted nothing new: its windows may have been trimmed.
  flush_rates(now)
  -- control's spare_ahead, if the call found spare empty.
  flush_book()
  -- The reply string (see encode_replies), made here without a table per entry.
  local entries = {}
  for i = 1, count do
    if refused[i] then
      entries[i] = REFUSED_ENTRY
    else
      local id = ids[i]
      local token, start_at = tokens[id], starts[id]
      if token == nil then
        local remembered = known[id]
        token, start_at = remembered[1], remembered[2]
      end
      entries[i] = granted_entry(token, math.max(0, start_at - now))
    end
  end
  return reply_with(table.concat(entries, ';'))
end

purge(now)
-- Queue first (see the header): in a first run of a swap whose waiter items all
-- start with '^', cost one unit, have no max delay, differ and are of the process
-- of the first release item (whose grants the handoff returns), the items are
-- queued as soon as the handoff knows a slot is free, before it reads the heads.
local early = #releases > 0 and released == #releases
if early then
  local early_seen = {}
  for i = 1, count do
    if not queue_first[i] or costs[i] ~= UNIT or max_delays[i] or early_seen[ids[i]]
        or process_of(ids[i]) ~= process_of(releases[1]) then
      early = false
      break
    end
    early_seen[ids[i]] = true
  end
end

-- Queues every waiter item at the tail, in ARGV order: a ticket each (taken with
-- the tokens of the at most `free` heads the handoff grants next) and its
-- liveness. Returns how many it queued.
local function enqueue(free)
  local tickets = {}
  local lives = {}
  local kept = {}
  local liveness = int(now + lease_ttl)
  for i = 1, count do
    tickets[2 * i - 1] = int(next_number(count - i + free))
    tickets[2 * i] = ids[i]
    local process = process_of(ids[i])
    if not one_liveness(process) then
      lives[#lives + 1] = liveness
      lives[#lives + 1] = ids[i]
    elseif not kept[process] then
      kept[process] = true
      keep_alive(now, process)
    end
  end
  call_in_slices('ZADD', queue_key, tickets, 1, 2 * SLICE)
  call_in_slices('ZADD', waiters_key, lives, 1, 2 * SLICE)
  wrote_expiry(now + lease_ttl)
  return count
end

if #releases > 0 then
  -- The waiter items may need one number of seq each after the handoff's grants
  -- (none when they were queued first).
  local after = count
  local tail = nil
  if early then
    after, tail = 0, enqueue
  end
  local _, kept = handoff(now, process_of(releases[1]), after, tail)
  own_grants = kept or {}
end
-- ZCARD of holders and of the queue, known from the handoff of the release
-- items or read when first needed, and then kept up to date here as this call
-- grants and queues.
local held = handoff_left.held
local queue_len = handoff_left.queued

if handoff_left.enqueued > 0 then
  -- The items queued first: the handoff granted those within the free slots (it
  -- read every head before them first); their grants are their entries, not
  -- own grants. The others wait.
  local mine = 0
  local mine_ids = {}
  for i = 1, count do
    local grant_info = handoff_left.granted[ids[i]]
    if grant_info then
      replies[i] = {1, grant_info[1], grant_info[2]}
      mine = mine + 1
      mine_ids[ids[i]] = true
    end
  end
  if mine > 0 then
    local others = {}
    for _, message in ipairs(own_grants) do
      if not mine_ids[string.match(message, '^([^|]*)|')] then
        others[#others + 1] = message
      end
    end
    own_grants = others
  end
  -- When the handoff reached an item of this call, every waiter queued before
  -- it left the queue: the items left are all of it, and their positions are
  -- known. Otherwise they are not counted (ahead -1).
  local waiting = 0
  for i = 1, count do
    if replies[i] == nil then
      replies[i] = {0, mine > 0 and waiting or -1}
      waiting = waiting + 1
    end
  end
  if mine > 0 then
    queue_len = waiting
    if waiting > 0 and handoff_left.popped == mine then
      -- Nobody was queued before them: this call created the queue (and waiters).
      created[queue_key], created[waiters_key] = true, true
    end
  end
end
-- Every release item was held: no earlier run of this call released them, so
-- its fresh waiter items hold no lease (no ZSCORE of holders for them), unless
-- an id comes twice: from its second time on it is looked up.
local first_run = #releases > 0 and released == #releases
local seen = {}

-- The items not answered yet (all of them, unless they were queued first).
for i = 1, count do
  if replies[i] == nil then
    local id = ids[i]
    local unheld = first_run and fresh[i] and not seen[id]
    seen[id] = true
    if not unheld and redis.call('ZSCORE', holders_key, id) then
      local token, start_at = parse_grant(redis.call('HGET', grants_key, id))
      if token then
        replies[i] = {1, token, math.max(0, start_at - now)}
      else
        replies[i] = {1, 0, 0}
      end
    else
      queue_len = queue_len or redis.call('ZCARD', queue_key)
      local rank = nil
      -- Whether its liveness is written already (its own entry; a process that
      -- keeps one liveness for its waiters has none per waiter).
      local live = false
      local own_entry = not one_liveness(process_of(id))
      if queue_len > 0 then
        -- waiters holds the ids of the queue, so adding its liveness only if
        -- absent tells whether it is queued: no ZRANK for a new waiter (one that
        -- is not left queued takes its liveness back below). Behind a queue as
        -- long as max_at_once, a new waiter queues whatever is held: no ZCARD of
        -- holders either.
        if not own_entry then
          rank = redis.call('ZRANK', queue_key, id)
        elseif redis.call('ZADD', waiters_key, 'NX', int(now + lease_ttl), id) == 1 then
          live = true
        else
          rank = redis.call('ZRANK', queue_key, id)
        end
      end
      local ahead = rank or queue_len
      local token, delay = nil, nil
      if ahead < max_at_once then
        held = held or redis.call('ZCARD', holders_key)
      end
      if ahead < max_at_once and held + ahead < max_at_once then
        token, delay = grant(id, now, max_delays[i], costs[i], count - i)
        if live then
          redis.call('ZREM', waiters_key, id)
          live = false
        end
        if token == nil then
          replies[i] = {2}
        elseif rank then
          unqueue({id})
          if #windows == 0 and costs[i] ~= UNIT then
            redis.call('HDEL', costs_key, id)  -- kept in its grants entry from now on
          end
          queue_len = queue_len - 1
        end
      end
      if token then
        if held == 0 then
          created[holders_key], created[grants_key] = true, true
        end
        held = held + 1
        replies[i] = {1, token, delay}
      elseif replies[i] == nil then
        if not rank then
          local ticket = next_number(count - i)
          if queue_len == 0 then
            created[queue_key], created[waiters_key] = true, true
          end
          redis.call('ZADD', queue_key, int(ticket), id)
          queue_len = queue_len + 1
        end
        if not own_entry then
          -- An item not marked '^': its process may have had nothing queued at its
          -- last renewal, which then did not write the entry (see keep_alive).
          keep_alive(now, process_of(id), not queue_first[i])
        elseif not live then
          redis.call('ZADD', waiters_key, int(now + lease_ttl), id)
        end
        wrote_expiry(now + lease_ttl)
        if costs[i] ~= UNIT then
          redis.call('HSET', costs_key, id, int(costs[i]))
          wrote_costs = true
          queued_costly()
        end
        replies[i] = {0, ahead}
      end
    end
  end
end

return_numbers()
expire_written(now)
return reply_with(encode_replies(replies))
