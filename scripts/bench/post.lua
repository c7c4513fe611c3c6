-- wrk script for lorkd benchmarks: POSTs one fixed body to one task, or to a uniformly random task per request.
-- Environment:
--   BODY_FILE     file sent as the body (a PNG for the native route, an OIP v2 JSON request for infer)
--   CONTENT_TYPE  its content type
--   PATH_FMT      request path with %s for the task, e.g. /v1/experts/%s/predict
--   TASK          the task (single-expert runs), or
--   TASKS_FILE    a file with one task id per line: each request picks one uniformly at random
--   WRK_RESULT    where done() writes the summary as JSON (latencies in microseconds)
--   AUTHORIZATION optional Authorization header value (e.g. "Bearer <key>")

local function read_all(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

wrk.method = "POST"
wrk.body = read_all(os.getenv("BODY_FILE"))
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE")
local authorization = os.getenv("AUTHORIZATION")
if authorization and authorization ~= "" then wrk.headers["Authorization"] = authorization end

local path_fmt = os.getenv("PATH_FMT")
local tasks = {}
local tasks_file = os.getenv("TASKS_FILE")
if tasks_file and tasks_file ~= "" then
  for line in io.lines(tasks_file) do
    if line ~= "" then tasks[#tasks + 1] = line end
  end
else
  tasks[1] = os.getenv("TASK")
end
local fixed = nil
if #tasks == 1 then fixed = string.format(path_fmt, tasks[1]) end

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end

function request()
  if fixed then
    return wrk.format(nil, fixed)
  end
  return wrk.format(nil, string.format(path_fmt, tasks[math.random(#tasks)]))
end

function done(summary, latency, requests)
  local out = os.getenv("WRK_RESULT")
  if not out or out == "" then return end
  local f = assert(io.open(out, "w"))
  local e = summary.errors
  f:write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
  f:close()
end
