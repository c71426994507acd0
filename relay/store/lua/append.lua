-- Appends envelopes to a workspace's stream; relay/store/redis/store.py calls it.
-- fmt and id_seq come from common.lua, which the loader puts first.
-- KEYS: log, dedup, meta
-- ARGV: max_envelopes, retention_us, channel, inline_bytes, expire_ms, publish, (key, body)...
-- publish: PUBLISH (one Redis) or SPUBLISH (a Cluster: the notification stays on
-- the workspace's shard; the channel carries the workspace's hash tag).
-- channel '' (HIVE_RELAY_REDIS_MIN_REPLICAS > 0): publish nothing and leave the
-- confirmed head 'c' where it is; the notification is returned (8th element) and
-- commit.lua publishes it once WAIT says enough replicas hold the rows. Otherwise
-- the notification is published here and 'c' moves with the head.
local log, dedup, meta = KEYS[1], KEYS[2], KEYS[3]
local max_n = tonumber(ARGV[1])
local ret_us = tonumber(ARGV[2])
local inline = tonumber(ARGV[4])
local expire_ms = tonumber(ARGV[5])
local publish = ARGV[6]
if publish ~= 'PUBLISH' and publish ~= 'SPUBLISH' then
  return redis.error_reply('ERR append: ARGV[6] must be PUBLISH or SPUBLISH')
end
local CAP = 10000

local m = redis.call('HMGET', meta, 'h', 'd', 'n', 'b', 'c')
local head = tonumber(m[1]) or 0
local dropped = tonumber(m[2]) or 0
local count = tonumber(m[3]) or 0
local bytes = tonumber(m[4]) or 0
local prev = head
local created = 0
if not m[1] then created = 1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- Pass 1, read-only: dedup and seq assignment. Nothing is written before every
-- element is decided, so an error (or OOM on the first write) leaves no trace.
local out, fresh, seen = {}, {}, {}
for i = 7, #ARGV, 2 do
  local key = ARGV[i]
  local s = seen[key]
  if not s then
    local v = redis.call('HGET', dedup, key)
    if v then s = tonumber(v) end
  end
  if s then
    out[#out + 1] = s
    out[#out + 1] = 1
  else
    head = math.max(now, head + 1)  -- the seq rule (relay.store.base.next_seq)
    seen[key] = head
    fresh[#fresh + 1] = i
    out[#out + 1] = head
    out[#out + 1] = 0
  end
end
if #fresh == 0 then
  return {prev, 0, 0, 0, 0, 0, out, ''}
end

local drop_n, drop_b = 0, 0
if count > 0 and redis.call('EXISTS', log) == 0 then
  -- Age retention expired the whole idle log (see PEXPIRE below).
  drop_n, drop_b = count, bytes
  if prev > dropped then dropped = prev end
  bytes = 0
end

-- Pass 2: write.
local added_b = 0
local hdr = {fmt(prev), fmt(head)}
local rows = {}
for _, i in ipairs(fresh) do
  local key = ARGV[i]
  local sq = fmt(seen[key])
  local row = '{"seq":' .. sq .. ',"body":' .. ARGV[i + 1] .. '}'  -- as relay.store.base.encode_row
  redis.call('XADD', log, sq .. '-0', 'r', row, 'k', key)
  redis.call('HSET', dedup, key, sq)
  added_b = added_b + #row
  hdr[#hdr + 1] = sq .. ':' .. #row
  rows[#rows + 1] = row
end
bytes = bytes + added_b

local function drop(entries)
  local last = nil
  for _, e in ipairs(entries) do
    local s = id_seq(e[1])
    local f = e[2]
    local row, key = f[2], f[4]
    if redis.call('HGET', dedup, key) == fmt(s) then redis.call('HDEL', dedup, key) end
    drop_n = drop_n + 1
    drop_b = drop_b + #row
    bytes = bytes - #row
    last = s
  end
  if last then
    if last > dropped then dropped = last end
    redis.call('XTRIM', log, 'MINID', fmt(last) .. '-1')
  end
end
if max_n > 0 then
  local excess = redis.call('XLEN', log) - max_n
  if excess > 0 then
    drop(redis.call('XRANGE', log, '-', '+', 'COUNT', math.min(excess, CAP)))
  end
end
if ret_us > 0 then
  drop(redis.call('XRANGE', log, '-', fmt(now - ret_us - 1) .. '-0', 'COUNT', CAP))
end
local notify = ARGV[3] ~= ''
local confirmed = m[5]
if notify then
  confirmed = fmt(head)
elseif not confirmed then
  confirmed = fmt(prev)  -- a missing 'c' reads as the head: keep it at what was visible
end
redis.call('HSET', meta, 'h', fmt(head), 'd', fmt(dropped), 'n', redis.call('XLEN', log),
  'b', bytes, 'c', confirmed)
if expire_ms > 0 then
  -- Every row is older than the retention by then: an idle workspace forgets them
  -- without anyone appending. meta keeps head and the dropped horizon.
  redis.call('PEXPIRE', log, expire_ms)
  redis.call('PEXPIRE', dedup, expire_ms)
end

local msg = table.concat(hdr, ' ') .. '\n'
if added_b <= inline then
  msg = msg .. table.concat(rows)
else
  msg = fmt(prev) .. ' ' .. fmt(head) .. '\n'
end
if notify then
  redis.call(publish, ARGV[3], msg)
  msg = ''
end
return {prev, created, #fresh, added_b, drop_n, drop_b, out, msg}
