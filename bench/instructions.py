"""User-space instructions per request under callgrind (deterministic, unlike wall-clock
CPU on a noisy VM; docs/benchmarks.md). Starts an NGINX upstream and each given Tollgate
binary under `valgrind --tool=callgrind` with a keyed route, a plan with limits and usage
recording, zeroes the counters after a warm-up, drives `wrk -t1 -c8 -d5s` with a key, dumps
the counters and divides by the requests served.

Also reported per request:
- locked instructions (`lock`-prefixed, and `xchg` with memory, which locks implicitly),
  found by disassembling every object the run executed (objdump) and summing callgrind's
  per-instruction counts at those addresses. Each costs about 9 ns on this VM even
  uncontended (docs/benchmarks.md, "Locked instructions");
- instructions in SHA-256's software rounds: valgrind hides the CPU's SHA extensions, so
  the key's hash runs in software under callgrind only (about 6,700 instructions a
  request) and not on the benchmark machine, which has them.

Usage (after bench/run.sh has installed wrk and nginx and built the release binary):
`python3 bench/instructions.py [--nginx] [NAME=BINARY[+logs] ...]` (default: this checkout's release
build; `+logs` turns access logs on for that run; `--nginx` measures NGINX proxying to the same
upstream the same way, as one process with no master, for comparison).
"""
import glob, json, os, re, shutil, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import NGINX, ROOT, free_port, gateway_config, stop_all, wait_port, start_nginx  # noqa: E402

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


def callgrind(out):
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=yes"]


def start_nginx_proxy(up, workdir, prefix):
    """NGINX as a keep-alive proxy to `up` (bench/run.py's configuration), in one process
    (no master) so that callgrind sees the worker; returns the process and its port."""
    port = free_port()
    conf = os.path.join(workdir, "nginx-proxy.conf")
    scratch = os.path.join(workdir, "nginx-proxy")
    os.makedirs(scratch, exist_ok=True)
    open(conf, "w").write(f"""
worker_processes 1;
daemon off;
master_process off;
pid {scratch}/nginx.pid;
error_log {scratch}/error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {scratch};
  proxy_temp_path {scratch};
  fastcgi_temp_path {scratch};
  uwsgi_temp_path {scratch};
  scgi_temp_path {scratch};
  keepalive_requests 1000000;
  upstream backend {{ server 127.0.0.1:{up}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
""")
    proc = subprocess.Popen(prefix + [NGINX, "-c", conf, "-p", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, timeout=60)
    return proc, port


def measure(name, binary, up, workdir):
    out = os.path.join(workdir, f"{name}.callgrind")
    if binary == "nginx":
        proc, port = start_nginx_proxy(up, workdir, callgrind(out))
        headers = []
    else:
        # `NAME=BINARY+logs`: the same, with access logs on (docs/access-logs.md).
        logs = binary.endswith("+logs")
        binary = binary.removesuffix("+logs")
        proc, port, key = start_keyed(name, binary, up, workdir, callgrind(out), logs)
        headers = ["-H", f"X-API-Key: {key}"]
    try:
        wrk = ["wrk", "-t1", "-c8"] + headers + [f"http://127.0.0.1:{port}/"]
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
    locked, soft_sha = 0, 0
    for dump in dumps:
        one_locked, one_sha = per_instruction(dump)
        locked, soft_sha = locked + one_locked, soft_sha + one_sha
    return requests, counted, locked, soft_sha


LOCKED_ADDRESSES = {}


def locked_addresses(obj):
    """Addresses (as callgrind gives them: the object's own) of `obj`'s locked instructions."""
    if obj not in LOCKED_ADDRESSES:
        found = set()
        if os.path.exists(obj):
            dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", obj], capture_output=True, text=True).stdout
            for m in re.finditer(r"^\s+([0-9a-f]+):\s+(?:lock |xchg [^\n]*\()", dump, re.M):
                found.add(int(m.group(1), 16))
        LOCKED_ADDRESSES[obj] = found
    return LOCKED_ADDRESSES[obj]


def per_instruction(dump):
    """(locked instructions executed, instructions in SHA-256's software rounds) of one
    callgrind dump written with `--dump-instr=yes`."""
    names, obj, fn, last, call_cost = {}, None, "", [0, 0], False
    locked, soft_sha = 0, 0

    def position(token, i):
        if token == "*":
            return last[i]
        if token[0] in "+-":
            step = int(token[1:], 16) if token[1:].startswith("0x") else int(token[1:])
            return last[i] + (step if token[0] == "+" else -step)
        return int(token, 16) if token.startswith("0x") else int(token)

    def name(kind, rest):
        m = re.match(r"\((\d+)\)(?: (.*))?", rest)
        if not m:
            return rest
        if m.group(2):
            names[(kind, m.group(1))] = m.group(2)
        return names.get((kind, m.group(1)), "")

    for line in open(dump, errors="replace"):
        line = line.rstrip("\n")
        if not line:
            continue
        key = line.split("=", 1)[0]
        if key in ("ob", "cob"):
            value = name("ob", line[len(key) + 1:])
            if key == "ob":
                obj = value
            continue
        if key in ("fn", "cfn"):
            value = name("fn", line[len(key) + 1:])
            if key == "fn":
                fn = value
            continue
        if key in ("fl", "fi", "fe", "cfi", "cfl"):
            name("fl", line[len(key) + 1:])
            continue
        if key == "calls":
            # The next cost line is the call's inclusive cost, not this function's own.
            call_cost = True
            continue
        if not (line[0].isdigit() or line[0] in "+-*"):
            continue
        tokens = line.split()
        last[0] = position(tokens[0], 0)
        if len(tokens) > 1:
            last[1] = position(tokens[1], 1)
        if call_cost:
            call_cost = False
            continue
        if len(tokens) < 3:
            continue
        cost = int(tokens[2])
        if obj and last[0] in locked_addresses(obj):
            locked += cost
        if "sha256" in fn and "compress" in fn:
            soft_sha += cost
    return locked, soft_sha


def main():
    args = [a for a in sys.argv[1:] if a != "--nginx"]
    binaries = [a.split("=", 1) for a in args] or [("tollgate", os.path.join(ROOT, "target", "release", "tollgate"))]
    if "--nginx" in sys.argv[1:]:
        binaries.append(("nginx", "nginx"))
    workdir = tempfile.mkdtemp(prefix="tollgate-cg-")
    procs = []
    try:
        upstream, up = start_upstream(workdir)
        procs.append(upstream)
        for name, binary in binaries:
            requests, instructions, locked, soft_sha = measure(name, binary, up, workdir)
            print(f"{name}: {requests} requests, {instructions / requests:,.0f} instructions per request "
                  f"({(instructions - soft_sha) / requests:,.0f} without SHA-256's software rounds), "
                  f"{locked / requests:.1f} locked instructions per request")
    finally:
        stop_all(procs, workdir)


if __name__ == "__main__":
    main()
