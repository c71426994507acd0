-- KEYS: entries (hash), times (zset).  ARGV: device, data, ttl_secs, max_devices
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('(%.6f', now - ttl))
  for _, d in ipairs(old) do
    redis.call('HDEL', KEYS[1], d)
    redis.call('ZREM', KEYS[2], d)
  end
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
    and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], string.format('%.6f', now), ARGV[1])
return 1
