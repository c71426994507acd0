-- luacheck settings for the Redis store's scripts (make lint-lua).
std = "lua51"
read_globals = { "redis", "KEYS", "ARGV" }
-- The loader (relay/store/redis/scripts.py) puts common.lua before these three.
files["relay/store/lua/append.lua"] = { read_globals = { "fmt", "id_seq" } }
files["relay/store/lua/read.lua"] = { read_globals = { "fmt", "id_seq" } }
files["relay/store/lua/commit.lua"] = { read_globals = { "fmt" } }
-- common.lua only defines helpers for the scripts it is put before.
files["relay/store/lua/common.lua"] = { ignore = { "211" } }
