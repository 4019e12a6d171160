"""System calls per keep-alive request (docs/benchmarks.md): NGINX's proxy worker and each
given Tollgate binary (keyed route with a plan's limits and usage, as bench/instructions.py)
proxy the same NGINX upstream; `strace -c -f` is attached for a `wrk -t1 -c50 -d4s` run and
the calls it counted are divided by the requests served.

Usage (after bench/run.sh has installed wrk and nginx and built the release binary):
`python3 bench/syscalls.py [NAME=BINARY ...]` (default: this checkout's release build).
strace slows the traced process, so only the counts mean anything, not the rates.
"""
import os, re, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, free_port, start_nginx, stop_all, wait_port  # noqa: E402
from instructions import start_keyed, start_upstream  # noqa: E402


def traced(pid, url, headers, workdir, name):
    out = os.path.join(workdir, f"{name}.strace")
    strace = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    wrk = ["wrk", "-t1", "-c50", "-d4s"] + sum((["-H", h] for h in headers), []) + [url]
    text = subprocess.run(wrk, capture_output=True, text=True).stdout
    strace.terminate()
    strace.wait()
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    calls, detail = 0, {}
    for line in open(out):
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            count = int(fields[3])
            calls += count
            detail[fields[-1]] = count
    top = ", ".join(f"{k} {v / requests:.2f}" for k, v in sorted(detail.items(), key=lambda kv: -kv[1])[:6])
    print(f"{name}: {requests} requests, {calls / requests:.2f} system calls per request ({top})")


def main():
    binaries = [a.split("=", 1) for a in sys.argv[1:]] or [("tollgate", os.path.join(ROOT, "target", "release", "tollgate"))]
    workdir = tempfile.mkdtemp(prefix="tollgate-sc-")
    procs = []
    try:
        upstream, up = start_upstream(workdir)
        procs.append(upstream)
        px = free_port()
        nginx = start_nginx(workdir, "proxy", f"""
upstream backend {{ server 127.0.0.1:{up}; keepalive 64; }}
server {{ listen 127.0.0.1:{px} backlog=4096;
  location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}""", 0)
        procs.append(nginx)
        wait_port(px)
        time.sleep(0.5)
        worker = subprocess.run(["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True).stdout.split()[0]
        traced(int(worker), f"http://127.0.0.1:{px}/", [], workdir, "nginx")
        for name, binary in binaries:
            proc, port, key = start_keyed(name, binary, up, workdir, ["taskset", "-c", "0"])
            procs.append(proc)
            traced(proc.pid, f"http://127.0.0.1:{port}/", [f"X-API-Key: {key}"], workdir, name)
    finally:
        stop_all(procs, workdir)


if __name__ == "__main__":
    main()
