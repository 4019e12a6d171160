"""The kernel's TCP and IP counters per keep-alive request (docs/benchmarks.md): NGINX's
proxy worker and each given Tollgate binary (keyed route with a plan's limits, usage and
access logs, as bench/ab.py) proxy the same NGINX upstream, one at a time, under
`wrk -t1 -c50 -d4s` (bench/run.py's, on CPU 1); `nstat` is read before and after each
run and the differences are divided by the requests served. Segments, pure ACKs and octets per request show whether a
proxy makes the kernel send more than the exchange needs (an ACK of its own, a head split
over two segments) and how many bytes its added fields cost.

Usage (after bench/run.sh has installed wrk and nginx and built the release binary):
`python3 bench/tcp_counters.py [NAME=BINARY ...]` (default: this checkout's release build).
The counters are the whole machine's: run it on an otherwise idle one.
"""
import argparse, os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, free_port, nginx_proxy_block, run_wrk, start_nginx, stop_all, wait_port  # noqa: E402
from instructions import start_keyed, start_upstream  # noqa: E402

# Counters that move by less than this per request are left out as background.
SHOWN_FROM = 0.001


def counters():
    out = subprocess.run(["nstat", "-az"], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].isdigit():
            values[fields[0]] = int(fields[1])
    return values


def measured(url, key=None):
    run_wrk(url, argparse.Namespace(connections=50, duration=1), key)  # warm-up: pools, caches
    before = counters()
    requests = run_wrk(url, argparse.Namespace(connections=50, duration=4), key)["requests"]
    after = counters()
    return {name: (after[name] - before.get(name, 0)) / requests for name in after}


def main():
    if subprocess.run(["which", "nstat"], capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "iproute2"], check=True)
    binaries = [a.split("=", 1) for a in sys.argv[1:]] or [("tollgate", os.path.join(ROOT, "target", "release", "tollgate"))]
    workdir = tempfile.mkdtemp(prefix="tollgate-tcp-")
    procs = []
    rows = {}
    try:
        upstream, up = start_upstream(workdir)
        procs.append(upstream)
        px = free_port()
        nginx = start_nginx(workdir, "proxy", nginx_proxy_block(px, up), 0)
        procs.append(nginx)
        wait_port(px)
        time.sleep(0.5)
        rows["nginx"] = measured(f"http://127.0.0.1:{px}/")
        for name, binary in binaries:
            proc, port, key = start_keyed(name, binary, up, workdir, ["taskset", "-c", "0"], logs=True)
            procs.append(proc)
            rows[name] = measured(f"http://127.0.0.1:{port}/", key)
    finally:
        stop_all(procs, workdir)
    shown = sorted({c for row in rows.values() for c, v in row.items() if v >= SHOWN_FROM})
    print("| counter per request | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for counter in shown:
        print(f"| {counter} | " + " | ".join(f"{row.get(counter, 0):.3f}" for row in rows.values()) + " |")


if __name__ == "__main__":
    main()
