"""RSS of a gateway whose usage table holds many anonymous subjects (docs/benchmarks.md, "Targets"; issue 4).

Starts NGINX (`return 200`) as the upstream and Tollgate with an anonymous route and a
trusted loopback proxy, then drives wrk with a Lua script that gives every request a new
X-Forwarded-For address (and one of 1000 Referer hosts) until N distinct IPs were charged.
Prints RSS before and after and the gateway's own count of subjects held in memory.
Usage: bench/run.sh installs wrk and nginx; then `python3 bench/anonymous_rss.py [--ips N]`.
"""
import argparse, os, re, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import metric, rss_kib, start_anonymous_gateway, stop_all  # noqa: E402

LUA = r"""
local n = 0
local threads = 0
local base = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end
function init(args)
  base = tonumber(args[1]) or 0
end
function request()
  n = n + 1
  local k = base + n * 4 + id
  local ip = string.format("10.%d.%d.%d", math.floor(k / 65536) % 256, math.floor(k / 256) % 256, k % 256)
  return wrk.format(nil, nil, {["X-Forwarded-For"] = ip, ["Referer"] = "https://site" .. (k % 1000) .. ".example/"})
end
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ips", type=int, default=1_000_000)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="tollgate-anon-")
    procs = []
    try:
        port, admin, gateway = start_anonymous_gateway(workdir, procs, """
[plans.anonymous]
# Each IP's quota; the 1000 Referer hosts share the plan, so it must not stop them.
rate = { per_second = 100000, burst = 100000 }
daily = 100000
[anonymous]
plan = "anonymous"
by = ["ip", "referer"]
""")
        script = os.path.join(workdir, "ips.lua")
        open(script, "w").write(LUA)
        before = rss_kib(gateway.pid)
        started = time.time()
        def subjects():
            time.sleep(0.5)  # the gauge is refreshed after each flush
            return int(metric(admin, "tollgate_usage_counters"))

        # Each wrk run starts its addresses past every address used before.
        total, base = 0, 0
        while subjects() < args.ips + 1000:
            out = subprocess.run(["wrk", "-t4", "-c64", "-d10s", "-s", script, f"http://127.0.0.1:{port}/", "--", str(base)],
                                 capture_output=True, text=True).stdout
            sent = int(re.search(r"(\d+) requests in", out).group(1))
            total += sent
            base += 4 * sent + 1000
            print(f"  {total} requests, {subjects()} subjects, RSS {rss_kib(gateway.pid) / 1024:.1f} MiB", file=sys.stderr)
        subjects = subjects()
        print(f"requests sent: {total} in {time.time() - started:.0f} s")
        print(f"subjects in memory: {subjects} (IPs + 1000 Referers)")
        print(f"RSS: {before / 1024:.1f} MiB before, {rss_kib(gateway.pid) / 1024:.1f} MiB after")
    finally:
        stop_all(procs, workdir)


if __name__ == "__main__":
    main()
