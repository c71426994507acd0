-- One cursor page of a workspace's stream, with its head, oldest and drop horizon.
-- fmt and id_seq come from common.lua, which the loader puts first.
-- KEYS: log, meta.  ARGV: first id to return ('' = none), limit, max_bytes, confirmed
-- confirmed '1' (HIVE_RELAY_REDIS_MIN_REPLICAS > 0): show the stream only up to the
-- confirmed head 'c' (rows WAIT has seen on enough replicas), and report as 6th
-- element the age in µs of the oldest row past it (-1: none), so the relay can
-- confirm rows whose own writer never did (relay/store/redis/store.py).
local m = redis.call('HMGET', KEYS[2], 'h', 'd', 'c')
local head = tonumber(m[1]) or 0
local dropped = tonumber(m[2]) or 0
local last = '+'
local pending = -1
if ARGV[4] == '1' and m[3] then
  local c = tonumber(m[3])
  if c < head then
    local p = redis.call('XRANGE', KEYS[1], fmt(c + 1) .. '-0', '+', 'COUNT', 1)
    if #p > 0 then
      local t = redis.call('TIME')
      pending = math.max(0, tonumber(t[1]) * 1000000 + tonumber(t[2]) - id_seq(p[1][1]))
    else
      pending = 0  -- the rows past 'c' were dropped already: confirm the head anyway
    end
    head = c
    last = fmt(c) .. '-0'
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  if head > dropped then dropped = head end
  return {head, 0, dropped, 0, {}, pending}
end
local first = redis.call('XRANGE', KEYS[1], '-', last, 'COUNT', 1)
local oldest = 0
if #first > 0 then oldest = id_seq(first[1][1]) end
local rows, more = {}, 0
local start = ARGV[1]
if start ~= '' then
  local limit = tonumber(ARGV[2])
  local max_b = tonumber(ARGV[3])
  local total = 0
  while true do
    local want = math.min(limit - #rows, 512) + 1
    local got = redis.call('XRANGE', KEYS[1], start, last, 'COUNT', want)
    local stop = false
    for _, e in ipairs(got) do
      local row = e[2][2]
      if #rows >= limit or (#rows > 0 and total + #row > max_b) then
        more = 1
        stop = true
        break
      end
      rows[#rows + 1] = row
      total = total + #row
      start = fmt(id_seq(e[1]) + 1) .. '-0'
    end
    if stop or #got < want then break end
  end
end
return {head, oldest, dropped, more, rows, pending}
