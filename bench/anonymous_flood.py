"""An anonymous flood against the bounded anonymous table (docs/security.md, "Anonymous
state"; issue 12): every request comes from a new random IPv6 address (through a trusted
loopback proxy's X-Forwarded-For) with a new random Referer host, so without a bound each
request would add two subjects. Prints RSS before and after, the subjects held and the
evictions.

Usage: bench/run.sh installs wrk and nginx and builds the release binary; then
`python3 bench/anonymous_flood.py [--requests 1000000] [--max-subjects 100000]`.
"""
import argparse, os, re, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import metric as metric_value, rss_kib, start_anonymous_gateway, stop_all  # noqa: E402


def metric(admin, name):
    return int(metric_value(admin, name))

LUA = r"""
local threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end
function init(args)
  math.randomseed(os.time() * 100 + id)
end
local letters = "abcdefghijklmnopqrstuvwxyz"
function request()
  local host = {}
  for i = 1, 12 do
    local k = math.random(1, 26)
    host[i] = letters:sub(k, k)
  end
  local ip = string.format("2001:db8:%x:%x:%x:%x:%x:%x", math.random(0, 65535), math.random(0, 65535),
    math.random(0, 65535), math.random(0, 65535), math.random(0, 65535), math.random(0, 65535))
  return wrk.format(nil, nil, {["X-Forwarded-For"] = ip, ["Referer"] = "https://" .. table.concat(host) .. ".example/"})
end
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--max-subjects", type=int, default=100_000)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="tollgate-flood-")
    procs = []
    try:
        port, admin, gateway = start_anonymous_gateway(workdir, procs, f"""
[plans.anonymous]
daily = 1000
[anonymous]
plan = "anonymous"
by = ["ip", "referer"]
max_subjects = {args.max_subjects}
""")
        script = os.path.join(workdir, "flood.lua")
        open(script, "w").write(LUA)
        before = rss_kib(gateway.pid)
        started, total, peak = time.time(), 0, before
        while total < args.requests:
            out = subprocess.run(["wrk", "-t2", "-c64", "-d10s", "-s", script, f"http://127.0.0.1:{port}/"],
                                 capture_output=True, text=True).stdout
            total += int(re.search(r"(\d+) requests in", out).group(1))
            rss = rss_kib(gateway.pid)
            peak = max(peak, rss)
            print(f"  {total} requests, {metric(admin, 'tollgate_anonymous_subjects')} subjects held, "
                  f"RSS {rss / 1024:.1f} MiB", file=sys.stderr)
        time.sleep(1.5)  # the last flush, then the table is bounded again
        print(f"requests sent: {total} in {time.time() - started:.0f} s (each a new IPv6 /64 and Referer host)")
        print(f"anonymous subjects held: {metric(admin, 'tollgate_anonymous_subjects')} (max_subjects {args.max_subjects})")
        print(f"evicted: {metric(admin, 'tollgate_anonymous_evictions_total')}, "
              f"usage rows dropped: {metric(admin, 'tollgate_anonymous_usage_rows_dropped_total')}")
        flushes = metric(admin, "tollgate_usage_flush_duration_seconds_count")
        seconds = metric_value(admin, "tollgate_usage_flush_duration_seconds_sum")
        rows = metric(admin, "tollgate_usage_rows_written_total")
        print(f"usage flushes: {flushes}, {rows} rows, {seconds:.1f} s writing ({rows / max(seconds, 1e-9):,.0f} rows/s)")
        print(f"RSS: {before / 1024:.1f} MiB before, {peak / 1024:.1f} MiB peak, {rss_kib(gateway.pid) / 1024:.1f} MiB after")
    finally:
        stop_all(procs, workdir)


if __name__ == "__main__":
    main()
