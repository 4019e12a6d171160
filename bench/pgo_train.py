"""Training load for a profile-guided build (bench/pgo.sh, docs/benchmarks.md "Profile-guided
builds"): runs an instrumented Tollgate the way production and bench/run.py use it, then
stops it gracefully so that it writes its profile.

The mix: keyed GETs through a plan with a rate limit and quotas, usage counted and access
logs on (most of the time), POSTs with small bodies, a public route, and the common
refusals (a bad key, no route). Usage: pgo_train.py BINARY SECONDS
"""
import argparse, os, signal, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (the benchmark's helpers: ports, NGINX, wrk)
from instructions import post  # noqa: E402


def main():
    binary, seconds = os.path.abspath(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 20
    workdir = tempfile.mkdtemp(prefix="tollgate-pgo-")
    procs = []
    try:
        up = bench.free_port()
        procs.append(bench.start_nginx(workdir, "upstream",
                                       f"server {{ listen 127.0.0.1:{up} backlog=4096; location / {{ return 200 'ok'; }} }}", 1))
        bench.wait_port(up)
        port, admin = bench.free_port(), bench.free_port()
        extra = """
[[routes]]
name = "open"
path = "/open"
upstream = "u"

[plans.pro]
rate = { per_second = 100000000, burst = 100000000 }
daily = 1000000000000
monthly = 10000000000000

[logs]
dir = "./logs"
"""
        config = os.path.join(workdir, "gateway.toml")
        with open(config, "w") as f:
            f.write(bench.gateway_config(os.path.join(workdir, "data"), port, admin, f"127.0.0.1:{up}", "api_key", extra))
        gateway = subprocess.Popen(["taskset", "-c", "0", binary, "serve", "--config", config], cwd=workdir,
                                   stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "gateway.log"), "w"),
                                   env={**os.environ, "RUST_LOG": "warn"})
        procs.append(gateway)
        try:
            bench.wait_port(port, timeout=60)
            bench.wait_port(admin, timeout=60)
        except SystemExit:
            print(open(os.path.join(workdir, "gateway.log")).read(), file=sys.stderr)
            raise

        post(admin, "/v1/consumers", {"id": "train", "plan": "pro"})
        key = post(admin, "/v1/keys", {"consumer": "train"})["key"]
        script = os.path.join(workdir, "post.lua")
        with open(script, "w") as f:
            f.write('wrk.method = "POST"\nwrk.body = string.rep("x", 256)\n'
                    'wrk.headers["Content-Type"] = "application/json"\n')
        base = f"http://127.0.0.1:{port}"
        share = max(seconds // 10, 1)
        loads = [  # (seconds, url, key, script)
            (share * 6, f"{base}/", key, None),
            (share * 2, f"{base}/", key, script),
            (share, f"{base}/open/x", None, None),
            (max(share // 2, 1), f"{base}/", "tg_not_a_key", None),
            (max(share // 2, 1), f"{base}/", None, None),
        ]
        for duration, url, k, s in loads:
            args = argparse.Namespace(connections=50, duration=duration, script=s)
            result = bench.run_wrk(url, args, k)
            print(f"trained {url} for {duration}s: {result['rps']:.0f} req/s", file=sys.stderr)
        # A graceful stop: the profile is written as the process exits.
        gateway.send_signal(signal.SIGTERM)
        if gateway.wait(timeout=60) != 0:
            raise SystemExit(f"the instrumented gateway exited with {gateway.returncode}")
    finally:
        bench.stop_all(procs, workdir)


if __name__ == "__main__":
    main()
