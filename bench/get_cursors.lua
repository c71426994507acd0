-- wrk script: catch-up reads that no two requests share, so no page cache can
-- serve one: GET …/envelopes?after=<k>&limit=LIMIT with a cursor k that is new on
-- every request (each wrk thread counts up from its own billion). Cursors below the
-- workspace's first seq (seqs are microsecond times, about 1.8e15) all give the same
-- rows: the first LIMIT, as a device's first catch-up from cursor 0 does.
-- (WS and LIMIT from the environment.)
local threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end

local counter = 0
local ws = os.getenv("WS") or "catchup"
local limit = os.getenv("LIMIT") or "5000"
function init(args)
  counter = (id or 0) * 1000000000
end

request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/workspaces/" .. ws .. "/envelopes?after=" .. counter ..
                    "&limit=" .. limit)
end
