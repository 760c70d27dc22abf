-- wrk script: POST one image file as the raw request body, then print the results as one JSON line.
-- usage: wrk -t1 -c8 -d10s --latency -s post_image.lua URL -- IMAGE_PATH [CONTENT_TYPE]

function init(args)
   local path = args[1]
   local file = assert(io.open(path, "rb"), "cannot open " .. tostring(path))
   wrk.method = "POST"
   wrk.body = file:read("*a")
   file:close()
   wrk.headers["Content-Type"] = args[2] or "image/jpeg"
end

function done(summary, latency, requests)
   local seconds = summary.duration / 1e6
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_s": %.6f, "req_per_s": %.4f, "bytes": %d, ' ..
      '"p50_ms": %.3f, "p90_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, "mean_ms": %.3f, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
      summary.requests, seconds, summary.requests / seconds, summary.bytes,
      latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(95) / 1e3,
      latency:percentile(99) / 1e3, latency.max / 1e3, latency.mean / 1e3,
      e.connect, e.read, e.write, e.status, e.timeout))
end
