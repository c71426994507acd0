-- wrk script: POST a unique ~1 KiB JSON body each request (unique, so never deduplicated).
local counter = 0
local pad = string.rep("a", 980)
local thread_id = 0
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
  local body = '{"n":"' .. prefix .. '-' .. tid .. '-' .. counter .. '","p":"' .. pad .. '"}'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
