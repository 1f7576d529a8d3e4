-- stored_numbers.lua: read-only; the tat and seq keys as stored, so that
-- `aiometer-redis status` can name the one that holds something other than a number.
--
-- KEYS: 1 tat, 2 seq (the fourth and fifth keys of lua/README.md). ARGV: none.
-- Reply: {tat, seq}, '' for a missing key.

return {redis.call('GET', KEYS[1]) or '', redis.call('GET', KEYS[2]) or ''}
