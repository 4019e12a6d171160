"""User-space instructions per request under callgrind (deterministic, unlike wall-clock
CPU on a noisy VM; docs/benchmarks.md). Starts an NGINX upstream and each given Tollgate
binary under `valgrind --tool=callgrind` with a keyed route, a plan with limits and usage
recording, zeroes the counters after a warm-up, drives `wrk -t1 -c8 -d5s` with a key, dumps
the counters and divides by the requests served.

Usage (after bench/run.sh has installed wrk and nginx and built the release binary):
`python3 bench/instructions.py [NAME=BINARY[+logs] ...]` (default: this checkout's release build;
`+logs` turns access logs on for that run).
"""
import glob, json, os, re, shutil, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, free_port, gateway_config, stop_all, wait_port, start_nginx  # noqa: E402

PLAN = """
[plans.pro]
rate = { per_second = 100000000, burst = 100000000 }
daily = 1000000000000
monthly = 10000000000000
"""


def post(admin, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    return json.loads(urllib.request.urlopen(req).read() or b"{}")


def start_upstream(workdir):
    """The NGINX upstream every measurement proxies to (`return 200 'ok'`, CPU 1); its port."""
    up = free_port()
    proc = start_nginx(workdir, "upstream", f"server {{ listen 127.0.0.1:{up}; location / {{ return 200 'ok'; }} }}", 1)
    wait_port(up)
    return proc, up


def start_keyed(name, binary, up, workdir, prefix, logs=False):
    """`binary` (run under `prefix`) with a keyed route to `up` on the plan above, and a
    key made for it; returns the process, its proxy port and the key."""
    port, admin = free_port(), free_port()
    config = os.path.join(workdir, f"{name}.toml")
    plan = PLAN + (f'\n[logs]\ndir = "{workdir}/logs-{name}"\n' if logs else "")
    open(config, "w").write(gateway_config(f"{workdir}/data-{name}", port, admin, f"127.0.0.1:{up}", "api_key", plan,
                                          lift_limits=binary.startswith(os.path.join(ROOT, "target"))))
    proc = subprocess.Popen(prefix + [binary, "serve", "--config", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    try:
        wait_port(port, timeout=60)
        wait_port(admin, timeout=60)
        post(admin, "/v1/consumers", {"id": "bench", "plan": "pro"})
        key = post(admin, "/v1/keys", {"consumer": "bench"})["key"]
    except BaseException:
        stop_all([proc], "/nonexistent")
        raise
    return proc, port, key


def measure(name, binary, up, workdir):
    # `NAME=BINARY+logs`: the same, with access logs on (docs/access-logs.md).
    logs = binary.endswith("+logs")
    binary = binary.removesuffix("+logs")
    out = os.path.join(workdir, f"{name}.callgrind")
    proc, port, key = start_keyed(name, binary, up, workdir,
                                  ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"], logs)
    try:
        wrk = ["wrk", "-t1", "-c8", "-H", f"X-API-Key: {key}", f"http://127.0.0.1:{port}/"]
        subprocess.run(wrk[:3] + ["-d2s"] + wrk[3:], capture_output=True)  # warm-up
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], capture_output=True, check=True)
        text = subprocess.run(wrk[:3] + ["-d5s"] + wrk[3:], capture_output=True, text=True).stdout
        requests = int(re.search(r"(\d+) requests in", text).group(1))
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        if non_2xx:
            raise SystemExit(f"{name}: {non_2xx.group(1)} responses were not 200")
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], capture_output=True, check=True)
        time.sleep(1)
    finally:
        stop_all([proc], "/nonexistent")
    # `--dump` after `--zero` writes a numbered file holding exactly the measured run.
    dumps = sorted(glob.glob(out + ".*"))
    if os.environ.get("KEEP_CALLGRIND"):
        # For `callgrind_annotate`: where the instructions go.
        for dump in dumps:
            shutil.copy(dump, os.path.join(os.environ["KEEP_CALLGRIND"], f"{name}.{os.path.basename(dump)}"))
    counted = 0
    for dump in dumps:
        for line in open(dump, errors="replace"):
            if line.startswith("summary:") or line.startswith("totals:"):
                counted = max(counted, int(line.split()[1]))
    return requests, counted


def main():
    binaries = [a.split("=", 1) for a in sys.argv[1:]] or [("tollgate", os.path.join(ROOT, "target", "release", "tollgate"))]
    workdir = tempfile.mkdtemp(prefix="tollgate-cg-")
    procs = []
    try:
        upstream, up = start_upstream(workdir)
        procs.append(upstream)
        for name, binary in binaries:
            requests, instructions = measure(name, binary, up, workdir)
            print(f"{name}: {requests} requests, {instructions / requests:,.0f} instructions per request")
    finally:
        stop_all(procs, workdir)


if __name__ == "__main__":
    main()
