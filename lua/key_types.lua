-- key_types.lua: read-only; the type of each key, so that `aiometer-redis status` can name
-- a key that holds something the limiter does not write. Not used by the limiter itself
-- (a Redis user made for the limiter may not run TYPE: the command then does without it).
--
-- KEYS: any keys (the CLI gives the eight of lua/README.md). ARGV: none.
-- Reply: {type of KEYS[1], type of KEYS[2], ...}, 'none' for a missing key.

local types = {}
for i, key in ipairs(KEYS) do
  types[i] = redis.call('TYPE', key)['ok']
end
return types
