-- wrk script: POST a batch of 100 unique ~1 KiB JSON bodies per request.
local counter = 0
local pad = string.rep("b", 980)
local thread_id = 0
function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
end
function init(args)
  math.randomseed(os.time() + tid * 104729)
  prefix = tostring(math.random(1, 1000000000))
end
request = function()
  local items = {}
  for i = 1, 100 do
    counter = counter + 1
    items[i] = '{"n":"' .. prefix .. '-' .. tid .. '-' .. counter .. '","p":"' .. pad .. '"}'
  end
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"},
                    "[" .. table.concat(items, ",") .. "]")
end
