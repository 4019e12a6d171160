"""RSS of one Tollgate worker with N API keys loaded and M idle keep-alive connections
(docs/benchmarks.md, "Targets": ≤ 64 MiB with 100,000 keys and 10,000 connections).

`python3 bench/keys_rss.py [--keys 100000] [--connections 10000]` after
`cargo build --release`. Keys are written straight into the SQLite store (their secrets'
SHA-256, as the admin API stores them), the gateway is started on it, and every idle
connection first sends one authenticated request with a different key, so the table, the
usage counters and the connections are all in use when RSS is read.
"""
import argparse, hashlib, os, resource, signal, sqlite3, subprocess, sys, tempfile, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, free_port, gateway_config, rss_kib, stop_all, wait_port  # noqa: E402


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def secret(i):
    return f"tg_live_{i:064x}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "tollgate"),
                        help="the build to measure (default: this checkout's release build)")
    args = parser.parse_args()
    binary = args.binary
    if not os.path.exists(binary):
        raise SystemExit("build first: cargo build --release")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 1000), hard))

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    workdir = tempfile.mkdtemp(prefix="tollgate-keys-rss-")
    port, admin = free_port(), free_port()
    config = os.path.join(workdir, "tollgate.toml")
    with open(config, "w") as f:
        f.write(gateway_config(f"{workdir}/data", port, admin, f"127.0.0.1:{upstream.server_address[1]}", "api_key", """
[plans.pro]
rate = { per_second = 1000, burst = 1000 }
daily = 1000000
monthly = 10000000
"""))

    def start():
        proc = subprocess.Popen([binary, "serve", "--config", config], stdout=subprocess.DEVNULL,
                                stderr=open(os.path.join(workdir, "tollgate.log"), "a"),
                                env={**os.environ, "RUST_LOG": "warn"})
        wait_port(admin, timeout=60)
        wait_port(port, timeout=60)
        import urllib.request
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1).status == 200:
                    return proc
            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit("gateway not ready")

    # The first start creates the schema; the keys are then written while it is stopped.
    first = start()
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=20)
    db = sqlite3.connect(os.path.join(workdir, "data", "tollgate.db"))
    db.execute("INSERT INTO consumers (id, plan, created_at) VALUES ('bench', 'pro', 0)")
    db.executemany(
        "INSERT INTO api_keys (id, consumer, plan, hash, prefix, created_at, expires_at, allowed_routes, revoked)"
        " VALUES (?, 'bench', NULL, ?, ?, 0, NULL, '', 0)",
        ((f"key_{i}", hashlib.sha256(secret(i).encode()).digest(), secret(i)[:12]) for i in range(args.keys)))
    db.commit()
    db.close()

    started = time.time()
    proc = start()
    print(f"started with {args.keys:,} keys in {time.time() - started:.1f} s", file=sys.stderr)
    time.sleep(1)
    with_keys = rss_kib(proc.pid)

    import socket
    conns, statuses = [], {}
    for n in range(args.connections):
        s = socket.create_connection(("127.0.0.1", port))
        key = secret(n * 7919 % args.keys)
        s.sendall(f"GET /x HTTP/1.1\r\nHost: bench\r\nX-Api-Key: {key}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        status = data.split(b" ", 2)[1].decode() if data else "closed"
        statuses[status] = statuses.get(status, 0) + 1
        conns.append(s)
    time.sleep(1)
    with_conns = rss_kib(proc.pid)
    if os.environ.get("KEYS_RSS_HOLD"):
        print(f"pid {proc.pid}; holding {os.environ['KEYS_RSS_HOLD']} s", file=sys.stderr, flush=True)
        time.sleep(float(os.environ["KEYS_RSS_HOLD"]))
    for wait in (2, 5):
        time.sleep(wait)
        print(f"{1 + wait} s later: {rss_kib(proc.pid) / 1024:.1f} MiB", file=sys.stderr)
    for s in conns:
        s.close()
    stop_all([proc], workdir)
    upstream.shutdown()

    print(f"| keys | idle connections | statuses | RSS with keys | RSS with keys + connections |")
    print("|---|---|---|---|---|")
    print(f"| {args.keys:,} | {args.connections:,} | {statuses} | {with_keys / 1024:.1f} MiB "
          f"| **{with_conns / 1024:.1f} MiB** |")


if __name__ == "__main__":
    main()
