-- Helpers the loader (relay/store/redis/scripts.py) puts before append.lua and read.lua.
-- Lua numbers are doubles: seqs (µs since 1970, < 2^53) are exact. fmt() prints them
-- without an exponent.
local function fmt(n) return string.format('%.0f', n) end
local function id_seq(id) return tonumber(string.match(id, '^(%d+)')) end
