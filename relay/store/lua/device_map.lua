-- KEYS: entries (hash), times (zset).  ARGV: ttl_secs.  Read-only.
local all = redis.call('HGETALL', KEYS[1])
local ttl = tonumber(ARGV[1])
if ttl <= 0 then return all end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i = 1, #all, 2 do
  local at = redis.call('ZSCORE', KEYS[2], all[i])
  if (not at) or now - tonumber(at) <= ttl then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
