-- Confirms rows of a workspace once WAIT saw them on enough replicas
-- (HIVE_RELAY_REDIS_MIN_REPLICAS > 0), then announces them; relay/store/redis/store.py
-- calls it. fmt comes from common.lua, which the loader puts first.
-- KEYS: meta.  ARGV: channel, confirmed seq, notification ('' = announce the range),
-- publish: PUBLISH (one Redis) or SPUBLISH (a Cluster: stays on the workspace's shard)
-- The confirmed head 'c' only moves up, and never past the head. A notification
-- given by the append goes out as it is (a follower ignores rows it delivered
-- already); without one, a header-only notification `<old c> <new c>` goes out only
-- when 'c' moved, so followers read the newly confirmed rows from the stream.
-- Returns the confirmed head after the call.
local publish = ARGV[4]
if publish ~= 'PUBLISH' and publish ~= 'SPUBLISH' then
  return redis.error_reply('ERR commit: ARGV[4] must be PUBLISH or SPUBLISH')
end
local m = redis.call('HMGET', KEYS[1], 'h', 'c')
local head = tonumber(m[1]) or 0
local c = tonumber(m[2]) or head
local new = math.min(tonumber(ARGV[2]), head)
if new > c then
  redis.call('HSET', KEYS[1], 'c', fmt(new))
end
if ARGV[3] ~= '' then
  redis.call(publish, ARGV[1], ARGV[3])
elseif new > c then
  redis.call(publish, ARGV[1], fmt(c) .. ' ' .. fmt(new) .. '\n')
end
return math.max(c, new)
