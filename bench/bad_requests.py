"""The bad-input cases of tests/data/bad_requests.json against Tollgate, NGINX and HAProxy,
each proxying to its own counting upstream (docs/security.md, "Strict HTTP/1.1").

For every case prints what each proxy answered (status, or `close` when it closed without
a response) and marks with `*` the cases where a request reached the upstream.
Usage: `python3 bench/bad_requests.py` (needs nginx and haproxy: `apt-get install -y
nginx-light haproxy`; uses target/release/tollgate, else target/debug/tollgate).
"""
import http.server, json, os, shutil, socket, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, free_port, gateway_config, stop_all, wait_port, start_nginx  # noqa: E402


class Counting(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        self.server.hits += 1
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = answer

    def log_message(self, *args):
        pass


class Quiet(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # proxies closing connections mid-request are expected here


def upstream():
    server = Quiet(("127.0.0.1", 0), Counting)
    server.hits = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def exchange(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(3)
        try:
            s.sendall(data)
        except OSError:
            pass
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    # The last response on the connection: the one for the bad request.
    statuses = [line.split()[1] for line in out.split(b"\r\n") if line.startswith(b"HTTP/1.") and len(line.split()) > 1]
    return statuses[-1].decode() if statuses else "close"


def main():
    cases = json.load(open(os.path.join(ROOT, "tests", "data", "bad_requests.json")))
    workdir = tempfile.mkdtemp(prefix="tollgate-bad-")
    procs = []
    try:
        ups = {name: upstream() for name in ("tollgate", "nginx", "haproxy")}
        ports = {name: free_port() for name in ups}
        admin = free_port()
        binary = next(p for p in (os.path.join(ROOT, "target", b, "tollgate") for b in ("release", "debug")) if os.path.exists(p))
        config = os.path.join(workdir, "tollgate.toml")
        open(config, "w").write(gateway_config(f"{workdir}/data", ports["tollgate"], admin,
                                               f"127.0.0.1:{ups['tollgate'].server_port}"))
        procs.append(subprocess.Popen([binary, "serve", "--config", config], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        procs.append(start_nginx(workdir, "proxy", f"""server {{ listen 127.0.0.1:{ports['nginx']};
            location / {{ proxy_pass http://127.0.0.1:{ups['nginx'].server_port}; proxy_http_version 1.1;
            proxy_set_header Connection ""; }} }}""", 0))
        haproxy_conf = os.path.join(workdir, "haproxy.cfg")
        open(haproxy_conf, "w").write(f"""global
  maxconn 1000
defaults
  mode http
  timeout connect 5s
  timeout client 5s
  timeout server 5s
frontend f
  bind 127.0.0.1:{ports['haproxy']}
  default_backend b
backend b
  server s1 127.0.0.1:{ups['haproxy'].server_port}
""")
        procs.append(subprocess.Popen([shutil.which("haproxy") or "/usr/sbin/haproxy", "-f", haproxy_conf, "-db"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports.values():
            wait_port(port)
        print("| case | Tollgate | NGINX 1.22 | HAProxy 2.6 |")
        print("|---|---|---|---|")
        for case in cases:
            row = []
            for name in ("tollgate", "nginx", "haproxy"):
                before = ups[name].hits
                status = exchange(ports[name], case["request"].encode("latin-1", "replace"))
                time.sleep(0.05)
                row.append(status + ("*" if ups[name].hits > before else ""))
            print(f"| {case['name']} | " + " | ".join(row) + " |")
        print("\n`*`: a request reached the upstream; `close`: closed without a response.")
    finally:
        stop_all(procs, workdir)


if __name__ == "__main__":
    main()
