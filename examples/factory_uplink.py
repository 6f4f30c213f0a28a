#!/usr/bin/env python3
"""Store and forward: an edge broker keeps what its devices sent while the uplink was down.

This example starts two Tern processes of its own (it needs the binary: `cargo build`):
the *edge*, with a bridge to the *cloud* (docs/bridges.md), and later the cloud.

1. The edge starts; the cloud is not there (the uplink is down). A sensor gateway publishes
   --count QoS 1 readings to sensors/... on the edge: each is acknowledged, because the
   bridge's durable queue stored it.
2. The edge is killed with SIGKILL (a power cut) and started again on the same data.
3. The cloud starts. It declares a queue for the site (docs/queues.md), so what arrives is
   kept whether or not its consumer, a dashboard, is connected yet.
4. The bridge connects and the backlog arrives at the cloud as site17/sensors/..., in order
   per topic; the dashboard takes it from $queue/site17.
5. The cloud publishes cmd/site17/press4/stop; the bridge's `in` rule brings it to the edge
   as cmd/press4/stop, where the press's controller listens.

    .venv/bin/python examples/factory_uplink.py [--tern target/debug/tern] [--count 1000]
Prints OK and exits 0 when the story worked; exits non-zero otherwise.
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

from endpoint import Endpoint, Fail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = re.compile(r"tern: ready tcp=(\S+):(\d+)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tern:
    """One Tern process on loopback with its own configuration and data directory."""

    def __init__(self, binary, name, port, extra, workdir):
        self.binary, self.name = binary, name
        self.config = os.path.join(workdir, f"{name}.toml")
        with open(self.config, "w") as f:
            f.write(f'[listeners.tcp]\nbind = "127.0.0.1:{port}"\n[metrics]\nbind = "127.0.0.1:0"\n'
                    f'[storage]\ndir = "{os.path.join(workdir, name)}"\n'
                    f'[auth]\nallow_anonymous = true\n[log]\nlevel = "warn"\n{extra}')
        self.port = port
        self.proc = None

    def start(self, timeout):
        self.proc = subprocess.Popen([self.binary, "--config", self.config],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise Fail(f"{self.name} exited before it was ready")
            if READY.search(line):
                return
        raise Fail(f"{self.name} not ready within {timeout}s")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run(binary, count, timeout):
    if not os.access(binary, os.X_OK):
        raise Fail(f"no Tern binary at {binary} (run `cargo build`, or pass --tern)")
    with tempfile.TemporaryDirectory(prefix="tern-uplink-") as work:
        cloud_port = free_port()
        bridge = (
            '[[bridges]]\nname = "cloud"\n'
            f'address = "127.0.0.1:{cloud_port}"\nprotocol = "5"\nclient_id = "edge-17"\n'
            'out = [{ filter = "sensors/#", qos = 1, local_prefix = "", remote_prefix = "site17/" }]\n'
            'in = [{ filter = "cmd/site17/#", qos = 1, remote_prefix = "cmd/site17/", local_prefix = "cmd/" }]\n'
        )
        edge = Tern(binary, "edge", free_port(), bridge, work)
        site_queue = '[[queues]]\nname = "site17"\nfilter = "site17/#"\n'
        cloud = Tern(binary, "cloud", cloud_port, site_queue, work)
        try:
            # 1. The uplink is down: the edge acknowledges and keeps.
            edge.start(timeout)
            gw = Endpoint("sensor-gateway", timeout)
            gw.connect("127.0.0.1", edge.port, clean_start=True)
            for i in range(count):
                gw.publish(f"sensors/press{i % 4}/temp", str(i).encode(), qos=1)
            gw.disconnect()
            print(f"edge: {count} readings acknowledged while the cloud is unreachable")
            # 2. Power cut.
            edge.kill()
            edge.start(timeout)
            print("edge: killed with SIGKILL and started again")
            # 3. The cloud comes up with its queue; the dashboard consumes it.
            cloud.start(timeout)
            dash = Endpoint("dashboard", timeout)
            dash.connect("127.0.0.1", cloud.port, clean_start=True)
            dash.subscribe("$queue/site17", qos=1)
            # 4. The backlog arrives (the bridge retries with backoff: allow for it).
            dash.timeout = timeout + 30
            dash.wait_messages(count)
            got = {}
            for m in dash.messages:
                got.setdefault(m.topic, []).append(int(m.payload))
            readings = sorted(p for ps in got.values() for p in ps)
            if sorted(set(readings)) != list(range(count)):
                raise Fail(f"the cloud got {len(set(readings))} distinct readings of {count}")
            for topic, ps in got.items():
                if ps != sorted(ps) or not topic.startswith("site17/sensors/"):
                    raise Fail(f"{topic}: out of order or without the prefix")
            print(f"cloud: all {count} readings arrived as site17/sensors/..., in order per topic")
            # 5. A command from the cloud reaches the edge.
            press = Endpoint("press4-controller", timeout)
            press.connect("127.0.0.1", edge.port, clean_start=True)
            press.subscribe("cmd/#", qos=1)
            ops = Endpoint("operator", timeout)
            ops.connect("127.0.0.1", cloud.port, clean_start=True)
            ops.publish("cmd/site17/press4/stop", b"stop", qos=1)
            press.wait_messages(1)
            m = press.messages[0]
            if m.topic != "cmd/press4/stop":
                raise Fail(f"the command arrived as {m.topic}")
            print("edge: the cloud's cmd/site17/press4/stop arrived as cmd/press4/stop")
            for c in (dash, press, ops):
                c.disconnect()
        finally:
            edge.stop()
            cloud.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tern", default=os.path.join(ROOT, "target", "debug", "tern"))
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per step")
    args = parser.parse_args()
    try:
        run(args.tern, args.count, args.timeout)
    except Fail as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
