-- wrk script: POST unique ~1 KiB bodies spread over N workspaces (N from WORKSPACES env).
local counter = 0
local pad = string.rep("s", 980)
local thread_id = 0
local n = tonumber(os.getenv("WORKSPACES") or "1000")
function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
end
function init(args)
  math.randomseed(os.time() + tid * 7919)
  prefix = tostring(math.random(1, 1000000000))
end
request = function()
  counter = counter + 1
  local ws = "spread-" .. (counter % n)
  local body = '{"n":"' .. prefix .. '-' .. tid .. '-' .. counter .. '","p":"' .. pad .. '"}'
  return wrk.format("POST", "/v1/workspaces/" .. ws .. "/envelopes",
                    {["Content-Type"] = "application/json"}, body)
end
