"""Over-admission of a hot key in global mode (issue 14): three regions (one nats-server
each, joined by gateways) with two release Tollgate nodes each; one key on a plan with a
daily quota is hammered through all six nodes at once — by wrk at full speed, and by
wrk2-style pacing (`--rate`, a Python client) — and the 200s are counted.

Usage: python3 bench/quota_race.py [--quotas 500,1000] [--seconds 3]
Needs nats-server 2.10+, wrk and nginx (bench/run.sh installs them) and
`cargo build --release`. Results in docs/multi-region.md ("Quota leases").
"""
import argparse, concurrent.futures, http.client, json, os, re, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, free_port, gateway_config, start_nginx, stop_all, wait_port  # noqa: E402

BINARY = os.path.join(ROOT, "target", "release", "tollgate")


def start_regions(workdir, procs, count=3):
    ports = [(free_port(), free_port(), free_port(), free_port()) for _ in range(count)]
    for i, (client, http_port, route, gateway) in enumerate(ports):
        name = f"r{i + 1}"
        gateways = ", ".join(f'{{name: r{j + 1}, urls: ["nats://127.0.0.1:{p[3]}"]}}' for j, p in enumerate(ports))
        conf = os.path.join(workdir, f"{name}.conf")
        with open(conf, "w") as f:
            f.write(f"""server_name: {name}
listen: "127.0.0.1:{client}"
http: "127.0.0.1:{http_port}"
accounts {{ SYS: {{ users: [{{user: sys, password: sys}}] }}, APP: {{ jetstream: enabled, users: [{{user: app, password: app}}] }} }}
system_account: SYS
no_auth_user: app
jetstream {{ store_dir: "{workdir}/{name}" }}
cluster {{ name: {name}, listen: "127.0.0.1:{route}", routes: ["nats://127.0.0.1:{route}"] }}
gateway {{ name: {name}, listen: "127.0.0.1:{gateway}", gateways: [{gateways}] }}
""")
        procs.append(subprocess.Popen(["nats-server", "-c", conf], stdout=subprocess.DEVNULL,
                                      stderr=open(os.path.join(workdir, f"{name}.log"), "w")))
    for client, http_port, _, _ in ports:
        wait_port(client)
    # The meta group needs every region's gateway before streams can be created.
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            jsz = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ports[0][1]}/jsz", timeout=1).read())
            if jsz.get("meta_cluster", {}).get("cluster_size") == count and jsz["meta_cluster"].get("leader"):
                break
        except Exception:
            pass
        time.sleep(0.2)
    return [p[0] for p in ports]


def admin_call(admin, method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"})
    return json.loads(urllib.request.urlopen(req).read() or b"{}")


def wrk_all(ports, key, seconds):
    """One wrk per node at once; returns the 200s (requests minus non-2xx)."""
    runs = [subprocess.Popen(["wrk", "-t1", "-c8", f"-d{seconds}s", "-H", f"X-API-Key: {key}",
                              f"http://127.0.0.1:{port}/x"], stdout=subprocess.PIPE, text=True) for port in ports]
    ok = total = 0
    for run in runs:
        out = run.communicate()[0]
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        total += requests
        ok += requests - (int(errors.group(1)) if errors else 0)
    return ok, total


def paced_all(ports, key, seconds, rate):
    """`rate` requests/s in all, spread over the nodes, each on its own connection."""
    clients = 40
    interval = clients / rate

    def client(index):
        port = ports[index % len(ports)]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        ok = sent = 0
        next_at = time.time() + index * interval / clients
        end = time.time() + seconds
        while time.time() < end:
            time.sleep(max(0, next_at - time.time()))
            next_at += interval
            conn.request("GET", "/x", headers={"X-API-Key": key})
            response = conn.getresponse()
            response.read()
            sent += 1
            ok += response.status == 200
        return ok, sent

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    return sum(r[0] for r in results), sum(r[1] for r in results)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quotas", default="500,1000")
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="tollgate-race-")
    procs = []
    try:
        nats_ports = start_regions(workdir, procs)
        up = free_port()
        procs.append(start_nginx(workdir, "upstream", f"server {{ listen 127.0.0.1:{up} backlog=4096; location / {{ return 200 'ok'; }} }}", 1))
        wait_port(up)
        nodes = []
        for region in range(3):
            for n in "ab":
                name = f"r{region + 1}{n}"
                port, admin = free_port(), free_port()
                path = os.path.join(workdir, f"{name}.toml")
                with open(path, "w") as f:
                    f.write(gateway_config(f"{workdir}/data-{name}", port, admin, f"127.0.0.1:{up}", "api_key", f"""
[cluster]
nats = ["nats://127.0.0.1:{nats_ports[region]}"]
region = "r{region + 1}"
node_id = "{name}"
"""))
                procs.append(subprocess.Popen([BINARY, "serve", "--config", path], stdout=subprocess.DEVNULL,
                                              stderr=open(os.path.join(workdir, f"{name}.log"), "w")))
                nodes.append((port, admin))
        for port, admin in nodes:
            wait_port(admin, timeout=30)
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1).status == 200:
                        break
                except Exception:
                    time.sleep(0.1)
        time.sleep(3)  # heartbeats: every node knows how many share the quotas
        admin0 = nodes[0][1]
        ports = [p for p, _ in nodes]
        print("| quota | load | sent | admitted | over |")
        print("|---|---|---|---|---|")
        for quota in [int(q) for q in args.quotas.split(",")]:
            for load in ["wrk, full speed", "paced 2,000/s"]:
                admin_call(admin0, "PUT", f"/v1/plans/race{quota}", {"daily": quota})
                consumer = f"race-{quota}-{len(load)}"
                admin_call(admin0, "POST", "/v1/consumers", {"id": consumer, "plan": f"race{quota}"})
                key = admin_call(admin0, "POST", "/v1/keys", {"consumer": consumer})
                time.sleep(1)  # the key reaches every region
                if load.startswith("wrk"):
                    ok, sent = wrk_all(ports, key["key"], args.seconds)
                else:
                    ok, sent = paced_all(ports, key["key"], args.seconds, 2000)
                print(f"| {quota} | {load} | {sent} | {ok} | {ok - quota:+d} |", flush=True)
    finally:
        stop_all(procs, workdir)


if __name__ == "__main__":
    main()
