"""Rebuild time of a global-mode node whose view holds N usage counters (issue 5).

1. Starts nats-server and node A once (to create its SQLite schema), stops it, and fills
   A's local view with N counters of another node (`ip:` subjects, today) — as if the
   cluster had served N distinct anonymous callers today.
2. Restart with a disk: starts A again and times spawn → `/readyz` 200 (restores N
   counters from SQLite, replays the stream tail).
3. A writes a snapshot (snapshot_interval 3s); a new node C on an empty disk times spawn →
   `/readyz` 200 (loads the snapshot, then the tail).
Usage: python3 bench/cluster_rebuild.py [--counters 1000000]   (needs nats-server 2.10+)
"""
import argparse, os, signal, sqlite3, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, free_port, gateway_config, stop_all, wait_port, rss_kib  # noqa: E402

BINARY = os.path.join(ROOT, "target", "release", "tollgate")


def config(workdir, name, nats_port):
    port, admin = free_port(), free_port()
    path = os.path.join(workdir, f"{name}.toml")
    with open(path, "w") as f:
        f.write(gateway_config(f"./data-{name}", port, admin, "127.0.0.1:9", "anonymous", f"""
[cluster]
nats = ["nats://127.0.0.1:{nats_port}"]
region = "r1"
node_id = "{name}"
snapshot_interval = "3s"
"""))
    return path, admin


def start(workdir, name, path):
    return subprocess.Popen([BINARY, "serve", "--config", path], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(workdir, f"{name}.log"), "a"), env={**os.environ, "RUST_LOG": "info"})


def ready_after(admin, started, proc):
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1).status == 200:
                return time.time() - started
        except Exception:
            pass
        if proc.poll() is not None:
            raise SystemExit("node exited")
        time.sleep(0.02)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--counters", type=int, default=1_000_000)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="tollgate-rebuild-")
    procs = []
    try:
        nats_port = free_port()
        procs.append(subprocess.Popen(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd",
                                       os.path.join(workdir, "nats")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(nats_port)
        path_a, admin_a = config(workdir, "a", nats_port)
        a = start(workdir, "a", path_a)
        ready_after(admin_a, time.time(), a)
        a.send_signal(signal.SIGTERM)
        a.wait()
        db = sqlite3.connect(os.path.join(workdir, "data-a", "tollgate.db"))
        today = int(time.time() // 86400)
        rows = ((f"ip:10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", "", today, "x", None, 1 + i % 7, 1 + i % 7)
                for i in range(args.counters))
        db.executemany("INSERT OR REPLACE INTO usage (subject, scope, day, node, consumer, count, published) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        db.commit()
        db.close()

        started = time.time()
        a = start(workdir, "a", path_a)
        procs.append(a)
        took = ready_after(admin_a, started, a)
        print(f"restart with disk, {args.counters} counters: ready in {took:.2f} s, RSS {rss_kib(a.pid) / 1024:.0f} MiB")

        time.sleep(8)  # at least one snapshot
        path_c, admin_c = config(workdir, "c", nats_port)
        started = time.time()
        c = start(workdir, "c", path_c)
        procs.append(c)
        took = ready_after(admin_c, started, c)
        print(f"new node on an empty disk (snapshot + tail), {args.counters} counters: ready in {took:.2f} s, "
              f"RSS {rss_kib(c.pid) / 1024:.0f} MiB")
    finally:
        stop_all(procs, workdir)


if __name__ == "__main__":
    main()
