#!/usr/bin/env python3
"""HTTPS benchmark: Tollgate vs NGINX terminating TLS with the same certificate (ECDSA
P-256, made here with openssl) in front of the same plain upstream, in the same rounds.

Two loads: keep-alive HTTPS requests (wrk -c50), and a new connection (a new handshake)
per request (`Connection: close`). CPU µs per request of the proxy process as in run.py.
Usage: bench/tls.py [--rounds N] [--duration SECONDS]; run bench/run.sh first (it builds
the release binary and installs wrk and nginx). See docs/benchmarks.md.
"""
import argparse, os, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="tollgate-tls-bench-")
    procs = []
    try:
        cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-days", "30", "-nodes", "-subj", "/CN=bench.test",
                        "-addext", "subjectAltName=DNS:bench.test,IP:127.0.0.1",
                        "-keyout", key, "-out", cert], check=True, capture_output=True)
        up = R.free_port()
        procs.append(R.start_nginx(workdir, "upstream",
                                   f"server {{ listen 127.0.0.1:{up} backlog=4096; location / {{ return 200 'ok'; }} }}", 1))
        R.wait_port(up)
        ng = R.free_port()
        nginx = R.start_nginx(workdir, "proxy", f"""
upstream backend {{ server 127.0.0.1:{up}; keepalive 64; }}
server {{
  listen 127.0.0.1:{ng} ssl backlog=4096;
  ssl_certificate {cert};
  ssl_certificate_key {key};
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  ssl_session_tickets on;
  location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
}}""", 0)
        procs.append(nginx)
        R.wait_port(ng)
        nginx_pid = R.nginx_worker_pid(nginx)
        port, tls_port, admin = R.free_port(), R.free_port(), R.free_port()
        config = os.path.join(workdir, "tollgate.toml")
        with open(config, "w") as f:
            f.write(R.gateway_config("./data", port, admin, f"127.0.0.1:{up}") + f"""
[server.tls]
listen = ["127.0.0.1:{tls_port}"]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
""")
        tollgate = subprocess.Popen(["taskset", "-c", "0", os.path.join(R.ROOT, "target", "release", "tollgate"),
                                     "serve", "--config", config], stdout=subprocess.DEVNULL,
                                    stderr=open(os.path.join(workdir, "tollgate.log"), "w"),
                                    env={**os.environ, "RUST_LOG": "warn"})
        procs.append(tollgate)
        R.wait_port(tls_port)
        systems = [("tollgate", f"https://127.0.0.1:{tls_port}/", tollgate.pid),
                   ("nginx", f"https://127.0.0.1:{ng}/", nginx_pid)]
        results = {(name, mode): [] for name, _, _ in systems for mode in ("keep-alive", "new connection")}
        for r in range(args.rounds):
            order = systems if r % 2 == 0 else list(reversed(systems))
            for name, url, pid in order:
                for mode in ("keep-alive", "new connection"):
                    key_header = None
                    if mode == "new connection":
                        res = measure_close(url, pid, args)
                    else:
                        res = R.measure(url, pid, args, key_header)
                    results[(name, mode)].append(res)
                    print(f"round {r + 1} {name:8} {mode:14} {res['rps']:9.0f} req/s  p99 {res['p99']:.2f} ms  "
                          f"{res['cpu_us']:.1f} CPU µs/req" + (f"  NON-2XX {res['errors']}" if res['errors'] else ""),
                          file=sys.stderr)

        def med(name, mode, key):
            return statistics.median(x[key] for x in results[(name, mode)])

        print(f"## HTTPS benchmark — wrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} rounds, medians; "
              "proxy on CPU 0, wrk and the upstream on CPU 1; ECDSA P-256, TLS 1.3\n")
        print("| load | system | req/s | p99 ms | CPU µs/request |")
        print("|---|---|---|---|---|")
        for mode in ("keep-alive", "new connection"):
            for name, _, _ in systems:
                print(f"| {mode} | {name} | {med(name, mode, 'rps'):.0f} | {med(name, mode, 'p99'):.2f} | "
                      f"{med(name, mode, 'cpu_us'):.1f} |")
        for mode in ("keep-alive", "new connection"):
            ratio = med("tollgate", mode, "cpu_us") / med("nginx", mode, "cpu_us")
            print(f"- {mode}: Tollgate / NGINX CPU per request **{ratio:.2f}×**, throughput "
                  f"{med('tollgate', mode, 'rps') / med('nginx', mode, 'rps'):.2f}×")
    finally:
        R.stop_all(procs, workdir)


def measure_close(url, pid, args):
    """Like run.measure, with `Connection: close`: one TLS handshake per request."""
    before = R.cpu_ticks(pid)
    result = R.run_wrk(url, args, None, extra=["-H", "Connection: close"])
    result["cpu_us"] = (R.cpu_ticks(pid) - before) * 1e6 / R.TICKS / max(result["requests"], 1)
    return result


if __name__ == "__main__":
    main()
