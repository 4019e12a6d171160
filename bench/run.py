"""Measures direct, Tollgate and NGINX on loopback; prints a markdown report.

Method (docs/benchmarks.md): the proxy under test is pinned to CPU 0; wrk and the upstream
(NGINX `return 200`, one worker) share CPU 1. Each round runs the three systems in turn with
the same wrk settings; medians over rounds are reported. CPU time per request is read from
/proc/PID/stat (utime + stime) of the proxy's process before and after each run.
"""
import argparse, datetime, os, platform, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKS = os.sysconf("SC_CLK_TCK")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of the whole line)


# As NGINX is configured here (keepalive_requests 1000000, no limit_conn): the load
# generator's many connections from one loopback address are the benchmark, not a flood.
# (Binaries older than these settings have no such limits; `lift_limits=False` for them.)
LIFTED = """max_requests_per_connection = 0
max_connections_per_ip = 0"""


def gateway_config(data_dir, port, admin, upstream, auth=None, extra="", server_extra="", upstream_extra="",
                   workers=1, lift_limits=True):
    """A Tollgate config: one route `/` to upstream `u` at `upstream` (with `auth` if given),
    then `extra`; `server_extra` and `upstream_extra` go into those sections."""
    workers_line = f"workers = {workers}" if workers else ""
    auth_line = f'auth = ["{auth}"]' if auth else ""
    return f"""data_dir = "{data_dir}"

[server]
listen = ["127.0.0.1:{port}"]
{workers_line}
{LIFTED if lift_limits else ""}
{server_extra}

[admin]
listen = "127.0.0.1:{admin}"

[upstreams.u]
endpoints = ["{upstream}"]
{upstream_extra}

[[routes]]
name = "api"
path = "/"
upstream = "u"
{auth_line}
{extra}"""


def start_anonymous_gateway(workdir, procs, anonymous_extra):
    """An NGINX `return 200` upstream and the release Tollgate in front of it with one
    anonymous route behind a trusted loopback proxy (so wrk can set `X-Forwarded-For`);
    `anonymous_extra` holds the anonymous plan and `[anonymous]`. Returns (port, admin, process)."""
    up = free_port()
    procs.append(start_nginx(workdir, "upstream", f"server {{ listen 127.0.0.1:{up} backlog=4096; location / {{ return 200 'ok'; }} }}", 1))
    wait_port(up)
    port, admin = free_port(), free_port()
    config = os.path.join(workdir, "tollgate.toml")
    with open(config, "w") as f:
        f.write(gateway_config(f"{workdir}/data", port, admin, f"127.0.0.1:{up}", "anonymous", anonymous_extra,
                               server_extra='trusted_proxies = ["127.0.0.1"]', workers=None))
    gateway = subprocess.Popen([os.path.join(ROOT, "target", "release", "tollgate"), "serve", "--config", config],
                               stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "log"), "w"),
                               env={**os.environ, "RUST_LOG": "warn"})
    procs.append(gateway)
    wait_port(port)
    wait_port(admin)
    return port, admin, gateway


def metric(admin, name):
    """One unlabelled sample from the admin API's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
    return float(re.search(rf"^{re.escape(name)} ([\d.e+-]+)", text, re.M).group(1))


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_nginx(workdir, name, server_block, cpu):
    conf = os.path.join(workdir, f"{name}.conf")
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
daemon off;
master_process on;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}/error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/{name};
  proxy_temp_path {workdir}/{name};
  fastcgi_temp_path {workdir}/{name};
  uwsgi_temp_path {workdir}/{name};
  scgi_temp_path {workdir}/{name};
  keepalive_requests 1000000;
  {server_block}
}}
""")
    proc = subprocess.Popen(["taskset", "-c", str(cpu), NGINX, "-c", conf, "-p", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


def nginx_proxy_block(port, up_port, fields=False):
    """NGINX proxying to the upstream with kept-alive connections. `fields`: it also does the
    per-request field work a gateway in front of an API does and Tollgate always does: the
    forwarded fields and `X-Real-IP` to the upstream, and a fresh request id both ways
    (docs/benchmarks.md, "NGINX doing a gateway's field work")."""
    extra = """
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Real-IP $remote_addr;
    proxy_set_header X-Forwarded-Host $http_host;
    proxy_set_header X-Forwarded-Port $server_port;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Request-Id $request_id;
    add_header X-Request-Id $request_id always;""" if fields else ""
    return f"""
upstream backend {{ server 127.0.0.1:{up_port}; keepalive 64; }}
server {{
  listen 127.0.0.1:{port} backlog=4096;
  location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";{extra} }}
}}"""


def nginx_worker_pid(master):
    for _ in range(100):
        try:
            children = open(f"/proc/{master.pid}/task/{master.pid}/children").read().split()
            if children:
                return int(children[0])
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("nginx worker not found")


def run_wrk(url, args, key=None, extra=()):
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency", url]
    if key:
        cmd[4:4] = ["-H", f"X-API-Key: {key}"]
    cmd[4:4] = list(extra)
    if getattr(args, "script", None):
        cmd[4:4] = ["-s", args.script]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def latency(pct):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)\b", out)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {"rps": rps, "requests": requests, "p50": latency(50), "p99": latency(99),
            "errors": int(errors.group(1)) if errors else 0}


def measure(url, pid, args, key=None):
    before = cpu_ticks(pid) if pid else 0
    result = run_wrk(url, args, key)
    if pid:
        used_us = (cpu_ticks(pid) - before) * 1e6 / TICKS
        result["cpu_us"] = used_us / max(result["requests"], 1)
    return result


def idle_connections_rss(port, pid, count):
    """Opens `count` keep-alive connections, one request each, and reads the proxy's RSS."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1000), hard))
    base = rss_kib(pid)
    conns = []
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(4096)
        conns.append(s)
    time.sleep(1)
    rss = rss_kib(pid)
    for s in conns:
        s.close()
    return base, rss


def stop_all(procs, workdir):
    """SIGTERM every process (SIGKILL after 20 s) and remove the work directory."""
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=20)
        except Exception:
            p.kill()
    shutil.rmtree(workdir, ignore_errors=True)


def median(values):
    return statistics.median(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--idle-connections", type=int, default=10000)
    parser.add_argument("--also", action="append", default=[], metavar="NAME=BINARY",
                        help="also measure another tollgate build in the same rounds (A/B of a change)")
    parser.add_argument("--auth", action="store_true",
                        help="require an API key on Tollgate's route (wrk sends one)")
    parser.add_argument("--limits", action="store_true",
                        help="API key plus a plan with a rate limit and daily/monthly quotas (never reached), "
                             "usage counted and flushed; also measures a Tollgate without auth/limits ('tollgate-off')")
    parser.add_argument("--health", action="store_true",
                        help="active health checks (HTTP, every 1 s) on Tollgate's upstream pool, and also measure "
                             "'tollgate-bare': no health checks, no passive ejection, no retries")
    parser.add_argument("--logs", action="store_true",
                        help="access logs on Tollgate ([logs], zstd segments) and on an extra NGINX "
                             "(access_log buffer=64k gzip, JSON of the same fields); also measures "
                             "'tollgate-nologs' (same config, no [logs])")
    parser.add_argument("--body", type=int, default=0, metavar="BYTES",
                        help="send POSTs with a body of this many bytes (Content-Length, written with "
                             "the head) instead of GETs")
    parser.add_argument("--haproxy", action="store_true",
                        help="also HAProxy (one thread, http-reuse always) proxying alone, pinned "
                             "like the others (apt-get install haproxy)")
    parser.add_argument("--nginx-fields", action="store_true",
                        help="also 'nginx-fields': NGINX adding the forwarded fields, X-Real-IP and a "
                             "request id both ways, as Tollgate does on every request")
    parser.add_argument("--core-hour-usd", type=float, default=0.04,
                        help="price of one core-hour, for the cost per billion requests")
    args = parser.parse_args()
    if args.limits:
        args.auth = True

    workdir = tempfile.mkdtemp(prefix="tollgate-bench-")
    args.script = None
    if args.body:
        args.script = os.path.join(workdir, "post.lua")
        with open(args.script, "w") as script:
            script.write(f'wrk.method = "POST"\nwrk.body = string.rep("x", {args.body})\n'
                         'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    procs = []
    try:
        up_port = free_port()
        procs.append(start_nginx(workdir, "upstream",
                                 f"server {{ listen 127.0.0.1:{up_port} backlog=4096; location / {{ return 200 'ok'; }} }}", 1))
        wait_port(up_port)

        ng_port = free_port()
        nginx = start_nginx(workdir, "proxy", nginx_proxy_block(ng_port, up_port), 0)
        procs.append(nginx)
        wait_port(ng_port)
        nginx_pid = nginx_worker_pid(nginx)

        def start_tollgate(name, binary, auth=args.auth, bare=False, logs=args.logs):
            port, admin = free_port(), free_port()
            health = """
[upstreams.u.health]
interval = "1s"
""" if args.health and not bare else """
[upstreams.u.outlier]
consecutive_failures = 0
[upstreams.u.retries]
attempts = 0
""" if bare else ""
            plan = """
[plans.pro]
rate = { per_second = 100000000, burst = 100000000 }
daily = 1000000000000
monthly = 10000000000000
""" if args.limits and auth else """
# Defined and unlimited: a key on an undefined plan is refused (docs/security.md).
[plans.pro]
""" if auth else ""
            if logs:
                plan += f"""
[logs]
dir = "./logs-{name}"
"""
            config = os.path.join(workdir, f"{name}.toml")
            with open(config, "w") as f:
                f.write(gateway_config(f"./data-{name}", port, admin, f"127.0.0.1:{up_port}",
                                       "api_key" if auth else None, plan, upstream_extra=health,
                                       lift_limits=binary.startswith(os.path.join(ROOT, "target"))))
            proc = subprocess.Popen(["taskset", "-c", "0", binary, "serve", "--config", config],
                                    stdout=subprocess.DEVNULL,
                                    stderr=open(os.path.join(workdir, f"{name}.log"), "w"),
                                    env={**os.environ, "RUST_LOG": "warn"})
            procs.append(proc)
            try:
                wait_port(port)
                wait_port(admin)
            except SystemExit:
                print(open(os.path.join(workdir, f"{name}.log")).read(), file=sys.stderr)
                raise
            return port, proc, admin

        tg_port, tollgate, tg_admin = start_tollgate("tollgate", os.path.join(ROOT, "target", "release", "tollgate"))
        # Instances whose route requires a key (with --auth/--limits): each gets its own.
        keyed = {"tollgate": tg_admin}
        extra = []
        for spec in args.also:
            name, binary = spec.split("=", 1)
            # Absolute: a build of this checkout (under target/) has the load's limits lifted.
            binary = os.path.abspath(binary)
            port, proc, keyed[name] = start_tollgate(name, binary)
            extra.append((name, f"http://127.0.0.1:{port}/", proc.pid))
        if args.health:
            port, proc, keyed["tollgate-bare"] = start_tollgate(
                "tollgate-bare", os.path.join(ROOT, "target", "release", "tollgate"), bare=True)
            extra.append(("tollgate-bare", f"http://127.0.0.1:{port}/", proc.pid))
        if args.limits:
            port, proc, _ = start_tollgate("tollgate-off", os.path.join(ROOT, "target", "release", "tollgate"), auth=False)
            extra.append(("tollgate-off", f"http://127.0.0.1:{port}/", proc.pid))
        if args.logs:
            port, proc, keyed["tollgate-nologs"] = start_tollgate(
                "tollgate-nologs", os.path.join(ROOT, "target", "release", "tollgate"), logs=False)
            extra.append(("tollgate-nologs", f"http://127.0.0.1:{port}/", proc.pid))
            ngl_port = free_port()
            nginx_logs = start_nginx(workdir, "proxy-logs", f"""
log_format tollgate escape=json '{{"time":"$time_iso8601","request_id":"$request_id","client_ip":"$remote_addr",'
  '"method":"$request_method","path":"$uri","protocol":"$server_protocol","referer":"$http_referer",'
  '"status":$status,"bytes_in":$request_length,"bytes_out":$body_bytes_sent,"upstream":"$upstream_addr",'
  '"upstream_status":"$upstream_status","latency_ms":$request_time,"upstream_latency_ms":"$upstream_response_time"}}';
upstream backend {{ server 127.0.0.1:{up_port}; keepalive 64; }}
server {{
  listen 127.0.0.1:{ngl_port} backlog=4096;
  access_log {workdir}/proxy-logs/access.log.gz tollgate buffer=64k gzip flush=1s;
  location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
}}""", 0)
            procs.append(nginx_logs)
            wait_port(ngl_port)
            extra.append(("nginx-logs", f"http://127.0.0.1:{ngl_port}/", nginx_worker_pid(nginx_logs)))
        if args.nginx_fields:
            ngf_port = free_port()
            nginx_fields = start_nginx(workdir, "proxy-fields", nginx_proxy_block(ngf_port, up_port, fields=True), 0)
            procs.append(nginx_fields)
            wait_port(ngf_port)
            extra.append(("nginx-fields", f"http://127.0.0.1:{ngf_port}/", nginx_worker_pid(nginx_fields)))
        if args.haproxy:
            ha_port = free_port()
            ha_conf = os.path.join(workdir, "haproxy.cfg")
            with open(ha_conf, "w") as f:
                f.write(f"""global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:{ha_port} backlog 4096
  default_backend b
backend b
  server s1 127.0.0.1:{up_port}
""")
            haproxy = subprocess.Popen(["taskset", "-c", "0", shutil.which("haproxy") or "/usr/sbin/haproxy",
                                        "-f", ha_conf, "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(haproxy)
            wait_port(ha_port)
            extra.append(("haproxy", f"http://127.0.0.1:{ha_port}/", haproxy.pid))
        headers = {}
        if args.auth:
            import json, urllib.request
            def post(admin, path, body):
                req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", data=json.dumps(body).encode(),
                                             headers={"content-type": "application/json"}, method="POST")
                return json.loads(urllib.request.urlopen(req).read() or b"{}")
            for name, admin in keyed.items():
                post(admin, "/v1/consumers", {"id": "bench", "plan": "pro"})
                headers[name] = post(admin, "/v1/keys", {"consumer": "bench"})["key"]

        systems = [("direct", f"http://127.0.0.1:{up_port}/", None),
                   ("tollgate", f"http://127.0.0.1:{tg_port}/", tollgate.pid),
                   ("nginx", f"http://127.0.0.1:{ng_port}/", nginx_pid)] + extra
        for _, url, _ in systems:  # warm-up
            pass
        results = {name: [] for name, _, _ in systems}
        for r in range(args.rounds):
            order = systems if r % 2 == 0 else list(reversed(systems))
            for name, url, pid in order:
                res = measure(url, pid, args, headers.get(name))
                results[name].append(res)
                print(f"round {r + 1} {name:9} {res['rps']:9.0f} req/s  p50 {res['p50']:.2f} ms  p99 {res['p99']:.2f} ms"
                      + (f"  {res['cpu_us']:.1f} CPU µs/req" if 'cpu_us' in res else "")
                      + (f"  NON-2XX {res['errors']}" if res['errors'] else ""), file=sys.stderr)

        base, rss = idle_connections_rss(tg_port, tollgate.pid, args.idle_connections)

        def med(name, key):
            return median([x[key] for x in results[name] if key in x])

        mode = "auth + limits + usage" if args.limits else "auth" if args.auth else "no auth"
        if args.health:
            mode += ", active health checks"
        if args.logs:
            mode += ", access logs"
        if args.body:
            mode += f", POST bodies of {args.body} bytes"
        print(f"## Core proxy benchmark ({mode}) — {datetime.date.today()}\n")
        print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.release()}; "
              f"wrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} rounds, medians. "
              "Proxy on CPU 0; wrk and the upstream (NGINX `return 200`) on CPU 1.\n")
        print("| system | req/s | p50 ms | p99 ms | CPU µs/request | $ per billion requests |")
        print("|---|---|---|---|---|---|")
        for name, _, _ in systems:
            cpu = med(name, "cpu_us")
            cost = "" if cpu != cpu else f"{cpu * 1000 / 3600 * args.core_hour_usd:.2f}"
            cpu_text = "" if cpu != cpu else f"{cpu:.1f}"
            print(f"| {name} | {med(name, 'rps'):.0f} | {med(name, 'p50'):.2f} | {med(name, 'p99'):.2f} | {cpu_text} | {cost} |")
        t, n, d = med("tollgate", "rps"), med("nginx", "rps"), med("direct", "rps")
        print()
        print(f"- Tollgate / NGINX throughput: **{t / n:.2f}×**; Tollgate / direct: **{t / d:.2f}×**")
        print(f"- Tollgate / NGINX CPU per request: **{med('tollgate', 'cpu_us') / med('nginx', 'cpu_us'):.2f}×** (lower is better)")
        for name, _, _ in extra:
            print(f"- Tollgate / {name}: throughput {t / med(name, 'rps'):.2f}×, "
                  f"CPU per request {med('tollgate', 'cpu_us') / med(name, 'cpu_us'):.2f}×")
        for name in [n for n, _, _ in extra if n.startswith("tollgate") and n != "tollgate-nologs"]:
            print(f"- {name} / NGINX: throughput {med(name, 'rps') / n:.2f}×, "
                  f"CPU per request {med(name, 'cpu_us') / med('nginx', 'cpu_us'):.2f}×")
        if args.nginx_fields:
            print(f"- The forwarded fields and request ids cost NGINX "
                  f"**{(med('nginx-fields', 'cpu_us') / med('nginx', 'cpu_us') - 1) * 100:+.1f} %** CPU per request")
        if args.logs:
            tl, tn = med("tollgate", "cpu_us"), med("tollgate-nologs", "cpu_us")
            nl, nn = med("nginx-logs", "cpu_us"), med("nginx", "cpu_us")
            print(f"- Access logs cost Tollgate **{(tl / tn - 1) * 100:+.1f} %** CPU per request "
                  f"(NGINX's gzip access_log: {(nl / nn - 1) * 100:+.1f} %)")
            print(f"- CPU per request, Tollgate / NGINX: **{tl / nl:.2f}×** with access logs, "
                  f"{tn / nn:.2f}× without")
        print(f"- Tollgate RSS: {base / 1024:.1f} MiB idle, **{rss / 1024:.1f} MiB with {args.idle_connections} idle keep-alive connections**")
        print(f"- Cost column: CPU µs/request × 10⁹ requests at ${args.core_hour_usd}/core-hour.")
    finally:
        stop_all(procs, workdir)


if __name__ == "__main__":
    main()
