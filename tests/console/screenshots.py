#!/usr/bin/env python3
"""Makes the screenshots of docs/console/ from a gateway with a month of history and a
few minutes of live traffic, then runs the same browser driver as tests/console.rs.

    cargo build --release && python3 tests/console/screenshots.py [--minutes 3]

The month is made by restarting the gateway on each past day (TOLLGATE_CLOCK_START, a
testing-only setting, docs/operations.md) and sending that day's calls; then it runs on
today's clock with traffic of varying rate, some upstream 5xx and some 429s. Loopback
only; everything it starts is stopped at the end.
"""
import argparse
import datetime
import http.server
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "screenshot-admin-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        time.sleep(random.choice([0.001, 0.002, 0.003, 0.004, 0.008, 0.015, 0.03]))
        failing = self.server.failing
        status = 500 if failing and random.random() < failing else 200
        body = json.dumps({"ip": "8.8.8.8", "country": "US"}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def upstream(failing):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    server.failing = failing
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def config(data, proxy, admin, geo, flaky, dead):
    return f"""data_dir = "{data}"
[server]
listen = ["127.0.0.1:{proxy}"]
workers = 2
[admin]
listen = "127.0.0.1:{admin}"
token = "{TOKEN}"
[upstreams.geo]
endpoints = ["127.0.0.1:{geo}", "127.0.0.1:{flaky}"]
[upstreams.maps]
endpoints = ["127.0.0.1:{geo}", "127.0.0.1:{dead}"]
[upstreams.maps.health]
kind = "tcp"
interval = "1s"
[[routes]]
name = "lookup"
path = "/v1/lookup"
upstream = "geo"
auth = ["api_key", "anonymous"]
[[routes]]
name = "maps"
path = "/v1/maps"
upstream = "maps"
auth = ["api_key"]
[plans.pro]
rate = {{ per_second = 50, burst = 100 }}
daily = 500
monthly = 12000
[plans.starter]
rate = {{ per_second = 5 }}
daily = 120
monthly = 3000
[plans.anonymous]
daily = 40
[usage]
flush_interval = "200ms"
[usage_page]
"""


def request(url, headers=None, method="GET", body=None):
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class Gateway:
    def __init__(self, binary, path, clock=None):
        env = dict(os.environ, RUST_LOG="warn")
        if clock:
            env["TOLLGATE_CLOCK_START"] = clock
        self.process = subprocess.Popen([binary, "serve", "--config", path], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in self.process.stdout:
            if line.startswith("tollgate ready"):
                break
        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "console"))
    args = parser.parse_args()
    binary = os.path.join(ROOT, "target", "release", "tollgate")
    if not os.path.exists(binary):
        binary = os.path.join(ROOT, "target", "debug", "tollgate")
    work = tempfile.mkdtemp(prefix="tollgate-shots-")
    proxy, admin, dead = free_port(), free_port(), free_port()
    path = os.path.join(work, "tollgate.toml")
    with open(path, "w") as f:
        f.write(config(os.path.join(work, "data"), proxy, admin, upstream(0.0), upstream(0.08), dead))
    admin_url, proxy_url = f"http://127.0.0.1:{admin}", f"http://127.0.0.1:{proxy}"
    auth = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    today = datetime.datetime.now(datetime.timezone.utc).date()

    keys = {}
    random.seed(7)
    for back in range(29, 0, -1):
        day = today - datetime.timedelta(days=back)
        gateway = Gateway(binary, path, f"{day.isoformat()}T12:00:00Z")
        if not keys:
            for consumer, plan in [("acme", "pro"), ("globex", "starter"), ("initech", "pro"), ("umbrella", "starter")]:
                request(f"{admin_url}/v1/consumers", auth, "POST", json.dumps({"id": consumer, "plan": plan}).encode())
                _, body = request(f"{admin_url}/v1/keys", auth, "POST", json.dumps({"consumer": consumer}).encode())
                keys[consumer] = json.loads(body)["key"]
        weekday = day.weekday() < 5
        for consumer, base in [("acme", 330), ("globex", 60), ("initech", 140), ("umbrella", 25)]:
            calls = int(base * (1.0 if weekday else 0.45) * random.uniform(0.7, 1.35))
            for _ in range(calls):
                request(f"{proxy_url}/v1/lookup/8.8.8.8", {"x-api-key": keys[consumer]})
        gateway.stop()
        print(f"{day}: history written", file=sys.stderr)

    gateway = Gateway(binary, path)
    stop = threading.Event()

    def traffic(consumer, rate, route):
        start = time.time()
        while not stop.is_set():
            t = time.time() - start
            now_rate = rate * (1.0 + 0.6 * math.sin(t / 25.0) + 0.2 * random.random())
            headers = {"x-api-key": keys[consumer]} if consumer else {
                "referer": random.choice(["https://blog.example.org/", "https://news.example.com/a"])}
            request(f"{proxy_url}{route}", headers)
            time.sleep(max(0.005, 1.0 / now_rate))

    threads = [threading.Thread(target=traffic, args=a, daemon=True) for a in [
        ("acme", 12, "/v1/lookup/1.1.1.1"), ("initech", 6, "/v1/lookup/9.9.9.9"), ("globex", 4, "/v1/maps/tile"),
        ("umbrella", 8, "/v1/lookup/4.4.4.4"), (None, 2, "/v1/lookup/8.8.4.4")]]
    for thread in threads:
        thread.start()
    time.sleep(args.minutes * 60)
    os.makedirs(args.out, exist_ok=True)
    driver = subprocess.run(["node", os.path.join(ROOT, "tests", "console", "console.mjs")], capture_output=True, text=True, env=dict(
        os.environ, ADMIN_URL=admin_url, PROXY_URL=proxy_url, TOKEN=TOKEN, CONSUMER="umbrella", PAGE_KEY=keys["acme"], SHOTS=args.out))
    stop.set()
    gateway.stop()
    result = json.loads(driver.stdout.strip().splitlines()[-1])
    print(json.dumps({k: result.get(k) for k in ["failed", "errors", "external", "traffic"]}, indent=1))
    return 0 if not result.get("failed") and not result.get("errors") else 1


if __name__ == "__main__":
    sys.exit(main())
