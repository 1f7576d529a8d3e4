-- acquire.lua: take a slot for one or more waiters, or queue them and report
-- their positions.
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
-- mailbox lives in the same cluster slot as KEYS. (acquire.lua itself never
-- posts to a mailbox.)
--
-- ARGV (common header):
--   1 now_us         '' = read the server clock (TIME); an integer = use it (tests only)
--   2 max_at_once    integer, 0 = no concurrency limit
--   3 interval_us    float, emission interval 1e6 / max_per_second, 0 = no rate limit
--   4 burst          integer >= 1
--   5 lease_ttl_us   integer >= 1
--   6 key_ttl_ms     integer >= 1; every written key is given at least this TTL
--   7 mailbox prefix e.g. 'aiometer:{name}:mb:'
--   8 ..            one or more waiter ids '<process id>:<n>'; a waiter id
--                    becomes the lease id when granted
--
-- The call does exactly what one call per waiter id, in ARGV order and with the
-- same now, would do (expired leases and dead waiters are purged once, first):
-- an id later in the batch queues behind the ones before it and gets a later
-- ticket or token, and consecutive rate reservations follow each other.
--
-- Reply: an array with one element per waiter id, in ARGV order:
--   {1, token, delay_us}  granted; start after delay_us (rate limit), token is a
--                         fencing token. Repeating the call for a waiter that
--                         already holds a lease (granted by a handoff, or a retry
--                         after a lost reply) returns the same grant and changes
--                         nothing.
--   {0, ahead}            queued; ahead = 0-based position in the queue. The
--                         waiter's liveness is extended to now + lease_ttl_us.
--
-- Rate only (max_at_once = 0) takes a fast path: no lease is kept, so holders,
-- queue, waiters and grants are neither read nor written (nor purged); only tat
-- and seq are. Every id is granted, a retry reserves another rate slot, and
-- token i of the batch (0-based) is first + i, the tokens coming from one
-- INCRBY seq <number of ids>.
--
-- Only the keys the call wrote get their TTL refreshed (see expire_written).
-- Errors: 'ERR_ARG ...' for malformed arguments (nothing is written).

-- The prelude lua/_shared.lua comes first: it binds KEYS, ARGV[1..7] and the
-- shared helpers (int, read_now, purge, grant, handoff, expire_written, ...).


local err = check_common_args()
if err then
  return err
end
local count = #ARGV - 7
if count < 1 then
  return bad_arg('waiter id', "'<process id>:<n>' (at least one)", nil)
end
for i = 8, #ARGV do
  if not string.find(ARGV[i], '^[^:]+:') then
    return bad_arg('waiter id', "'<process id>:<n>'", ARGV[i])
  end
end

local now = read_now()
local replies = {}

-- Rate only: tat and seq, nothing else. TIME (unless now is given), INCRBY
-- and PEXPIRE seq, and with a rate limit GET tat and SET tat .. PX: at most
-- 5 commands, whatever the number of ids.
if max_at_once == 0 then
  local first = redis.call('INCRBY', seq_key, count) - count + 1
  redis.call('PEXPIRE', seq_key, int(key_ttl_ms))
  for i = 1, count do
    local delay = 0
    if interval > 0 then
      delay = reserve(now)
    end
    replies[i] = {1, first + i - 1, delay}
  end
  flush_tat(now)
  return replies
end

purge(now)
-- ZCARD of holders and of the queue, read when first needed and then kept up
-- to date here as this call grants and queues.
local held = nil
local queue_len = nil

for i = 1, count do
  local id = ARGV[7 + i]
  if redis.call('ZSCORE', holders_key, id) then
    local grant_info = redis.call('HGET', grants_key, id) or ''
    local token, start_at = string.match(grant_info, '^(%d+)|(%d+)$')
    if token then
      replies[i] = {1, tonumber(token), math.max(0, tonumber(start_at) - now)}
    else
      replies[i] = {1, 0, 0}
    end
  else
    held = held or redis.call('ZCARD', holders_key)
    local rank = redis.call('ZRANK', queue_key, id)
    local ahead = rank
    if not rank then
      queue_len = queue_len or redis.call('ZCARD', queue_key)
      ahead = queue_len
    end
    if held + ahead < max_at_once then
      if rank then
        unqueue({id})
        if queue_len then
          queue_len = queue_len - 1
        end
      end
      local token, delay = grant(id, now)
      held = held + 1
      replies[i] = {1, token, delay}
    else
      if not rank then
        local ticket = redis.call('INCR', seq_key)
        redis.call('ZADD', queue_key, int(ticket), id)
        queue_len = queue_len + 1
      end
      redis.call('ZADD', waiters_key, int(now + lease_ttl), id)
      wrote_queue = true
      replies[i] = {0, ahead}
    end
  end
end

expire_written(now)
return replies
