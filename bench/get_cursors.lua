-- wrk script: catch-up reads that no two requests in a row share, so no page cache
-- helps: GET …/envelopes?after=<k>&limit=LIMIT with k cycling over 0 … CURSORS-1
-- (WS, LIMIT and CURSORS from the environment).
local counter = 0
local ws = os.getenv("WS") or "catchup"
local limit = os.getenv("LIMIT") or "5000"
local n = tonumber(os.getenv("CURSORS") or "64")
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/workspaces/" .. ws .. "/envelopes?after=" .. (counter % n) ..
                    "&limit=" .. limit)
end
