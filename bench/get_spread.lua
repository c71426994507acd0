-- wrk script: GET the first 5 rows of one of N workspaces (N from WORKSPACES env),
-- named PREFIX-0 … PREFIX-(N-1) (PREFIX from the env too).
local counter = 0
local n = tonumber(os.getenv("WORKSPACES") or "1000")
local prefix = os.getenv("PREFIX") or "rspread"
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/workspaces/" .. prefix .. "-" .. (counter % n) ..
                    "/envelopes?after=0&limit=5")
end
