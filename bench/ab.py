"""Paired comparison of Tollgate builds (and NGINX) on this noisy VM (docs/benchmarks.md,
"Paired runs"). Every system runs at once, each pinned to CPU 0 and idle until its turn;
short wrk runs alternate between them (A B … then … B A) for `--pairs` turns, and each
system's CPU per request is divided by the first system's in the same turn. A whole
round of bench/run.py takes over half a minute, long enough for this VM's speed to
change within it; adjacent two-second runs share most of that drift, so the per-turn
ratios are far tighter than ratios of medians.

Usage: python3 bench/ab.py [--pairs N] [--duration S] [--nologs] [--nginx] [--nginx-fields] BINARY [BINARY ...]
Every Tollgate has a keyed route, a plan with limits, usage, and access logs unless --nologs.
Prints, per system: the median of its CPU µs/request and user-space µs/request, and the
median and quartiles of its per-turn ratio to the first system.
"""
import argparse, os, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402
from instructions import PLAN, post  # noqa: E402  (the keyed setup callgrind uses)

def proc_times(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binaries", nargs="+")
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--duration", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--nologs", action="store_true")
    parser.add_argument("--nginx", action="store_true", help="also NGINX proxying alone")
    parser.add_argument("--nginx-fields", action="store_true",
                        help="also NGINX adding the forwarded fields and a request id (bench/run.py's 'nginx-fields')")
    args = parser.parse_args()
    binaries = [os.path.abspath(b) for b in args.binaries]
    workdir = tempfile.mkdtemp(prefix="tollgate-ab-")
    procs = []
    try:
        up = bench.free_port()
        procs.append(bench.start_nginx(workdir, "upstream",
                                       f"server {{ listen 127.0.0.1:{up} backlog=4096; location / {{ return 200 'ok'; }} }}", 1))
        bench.wait_port(up)
        systems = []  # (name, url, pid, key)
        for i, binary in enumerate(binaries):
            port, admin = bench.free_port(), bench.free_port()
            extra = PLAN + ("" if args.nologs else f'\n[logs]\ndir = "{workdir}/logs-{i}"\n')
            config = os.path.join(workdir, f"gateway-{i}.toml")
            with open(config, "w") as f:
                f.write(bench.gateway_config(f"{workdir}/data-{i}", port, admin, f"127.0.0.1:{up}", "api_key", extra))
            log = os.path.join(workdir, f"gateway-{i}.log")
            proc = subprocess.Popen(["taskset", "-c", "0", binary, "serve", "--config", config],
                                    stdout=subprocess.DEVNULL, stderr=open(log, "w"), env={**os.environ, "RUST_LOG": "warn"})
            procs.append(proc)
            try:
                bench.wait_port(port)
                bench.wait_port(admin)
            except SystemExit:
                print(open(log).read(), file=sys.stderr)
                raise

            post(admin, "/v1/consumers", {"id": "bench", "plan": "pro"})
            key = post(admin, "/v1/keys", {"consumer": "bench"})["key"]
            name = os.path.relpath(binary, bench.ROOT) if binary.startswith(bench.ROOT) else binary
            systems.append((f"{i}:{name}", f"http://127.0.0.1:{port}/", proc.pid, key))
        for name, fields, wanted in (("nginx", False, args.nginx), ("nginx-fields", True, args.nginx_fields)):
            if not wanted:
                continue
            port = bench.free_port()
            nginx = bench.start_nginx(workdir, f"proxy-{name}", bench.nginx_proxy_block(port, up, fields=fields), 0)
            procs.append(nginx)
            bench.wait_port(port)
            systems.append((name, f"http://127.0.0.1:{port}/", bench.nginx_worker_pid(nginx), None))
        load = argparse.Namespace(connections=args.connections, duration=args.duration)
        for _, url, _, key in systems:  # warm-up: pools, caches, the first segment
            bench.run_wrk(url, argparse.Namespace(connections=args.connections, duration=1), key)
        total = {s[0]: [] for s in systems}
        user = {s[0]: [] for s in systems}
        for turn in range(args.pairs):
            for name, url, pid, key in (systems if turn % 2 == 0 else systems[::-1]):
                before = proc_times(pid)
                result = bench.run_wrk(url, load, key)
                after = proc_times(pid)
                requests = max(result["requests"], 1)
                scale = 1e6 / bench.TICKS / requests
                user[name].append((after[0] - before[0]) * scale)
                total[name].append((after[0] + after[1] - before[0] - before[1]) * scale)
        first = systems[0][0]
        print(f"{args.pairs} turns of {args.duration} s, wrk -c{args.connections}, "
              f"{'no access logs' if args.nologs else 'access logs on'}; ratios are per turn, to {first}")
        print("| system | CPU µs/req | ratio (q1–q3) | user µs/req | ratio (q1–q3) |")
        print("|---|---|---|---|---|")
        for name, _, _, _ in systems:
            cells = []
            for series in (total, user):
                ratios = [x / y for x, y in zip(series[name], series[first])]
                q1, _, q3 = statistics.quantiles(ratios, n=4)
                cells.append(f"{statistics.median(series[name]):.2f} | {statistics.median(ratios):.3f} ({q1:.3f}–{q3:.3f})")
            print(f"| {name} | {' | '.join(cells)} |")
    finally:
        bench.stop_all(procs, workdir)


if __name__ == "__main__":
    main()
