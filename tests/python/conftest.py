"""Shared fixtures: start the real Tern binary on ephemeral loopback ports.

The broker is started as a subprocess with a temporary config (ports 0) and found through the
`tern: ready tcp=ADDR:PORT metrics=ADDR:PORT` line it prints on stdout (`... cluster=NODE` for a
node of a cluster). The cluster fixtures (`nats_cluster`, `tern_cluster`) are at the end; their
helpers are in cluster.py.
"""
import os
import re
import subprocess
import tempfile
import threading
import time
import types

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TERN_BIN = os.environ.get("TERN_BIN", os.path.join(ROOT, "target", "debug", "tern"))
# With a [cluster] section the line ends in " cluster=NODE" (the node's name).
READY = re.compile(r"tern: ready tcp=(\S+):(\d+) metrics=(\S+):(\d+)(?: cluster=(\S+))?")
LISTENER = re.compile(r" ([A-Za-z0-9_-]+)=(\S+):(\d+)")


def _toml_value(v):
    """A Python value as a TOML value: bool, number, string, or a list (or tuple) of those
    (a TOML array, e.g. ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"])."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


GEN = os.path.join(ROOT, "certs", "gen.sh")
CERT_FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")


def gen_certs(out_dir, cn="device1"):
    """Run certs/gen.sh into out_dir; returns a namespace of the file paths."""
    r = subprocess.run(["bash", GEN, str(out_dir), cn], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=30)
    assert r.returncode == 0, r.stdout.decode("utf-8", "replace")
    return cert_paths(out_dir)


def cert_paths(d):
    d = str(d)
    return types.SimpleNamespace(
        dir=d, **{name.replace(".", "_"): os.path.join(d, name) for name in CERT_FILES})


class Broker:
    """A running Tern process. `overrides` is {section: {key: value}} merged over the base;
    `extra` is TOML text appended to the file (arrays of tables such as [[queues]])."""

    def __init__(self, overrides=None, extra=""):
        self.tmp = tempfile.TemporaryDirectory(prefix="tern-test-")
        sections = {
            "listeners.tcp": {"bind": "127.0.0.1:0"},
            "metrics": {"bind": "127.0.0.1:0"},
            "storage": {"dir": os.path.join(self.tmp.name, "data")},
            "auth": {"allow_anonymous": True},
            "log": {"level": "info"},
        }
        for section, values in (overrides or {}).items():
            sections.setdefault(section, {}).update(values)
        self.config_path = os.path.join(self.tmp.name, "tern.toml")
        with open(self.config_path, "w") as f:
            for section, values in sections.items():
                f.write(f"[{section}]\n")
                for k, v in values.items():
                    f.write(f"{k} = {_toml_value(v)}\n")
            f.write(extra)
        self.log_lines = []
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [TERN_BIN, "--config", self.config_path],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("tern exited before ready:\n" + "".join(self.log_lines))
            self.log_lines.append(line)
            m = READY.search(line)
            if m:
                self.host = m.group(1)
                self.port = int(m.group(2))
                self.metrics_port = int(m.group(4))
                self.cluster_node = m.group(5)
                # Every listener as NAME=ADDR:PORT (named listeners: docs/configuration.md).
                self.listeners = {
                    name: types.SimpleNamespace(host=h, port=int(p))
                    for name, h, p in LISTENER.findall(line)
                    if name not in ("metrics", "cluster")
                }
                break
        else:
            raise RuntimeError("tern did not become ready")
        # Keep draining output so the broker never blocks on a full pipe.
        self._drain = threading.Thread(target=self._pump, daemon=True)
        self._drain.start()

    def _pump(self):
        for line in self.proc.stdout:
            self.log_lines.append(line)

    def log(self):
        return "".join(self.log_lines)

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self):
        self.stop()
        self.tmp.cleanup()


@pytest.fixture
def broker():
    b = Broker()
    yield b
    alive = b.alive()
    b.close()
    assert alive, "broker died during the test:\n" + b.log()


def brokers(check_alive, make=Broker):
    """Yields a factory of brokers (`make(...)`, Broker by default) and closes them afterwards;
    with check_alive, fails the test if one of them died during it. For fixtures."""
    made = []

    def factory(*args, **kwargs):
        b = make(*args, **kwargs)
        made.append(b)
        return b

    yield factory
    dead = [b for b in made if not b.alive()]
    logs = "".join(b.log() for b in dead)
    for b in made:
        b.close()
    if check_alive:
        assert not dead, "broker died during the test:\n" + logs


@pytest.fixture
def make_broker():
    """Factory for tests that need non-default settings: make_broker({"limits": {...}})."""
    yield from brokers(check_alive=True)


@pytest.fixture
def stoppable():
    """Like make_broker, for tests that stop the broker themselves (no liveness check)."""
    yield from brokers(check_alive=False)


@pytest.fixture
def mk(broker, request):
    """paho clients (pahoutil.ClientFactory) on the module's broker: mk("name", version)."""
    from pahoutil import ClientFactory

    f = ClientFactory(broker, request.node.name)
    yield f
    f.close()


@pytest.fixture
def mkc(make_broker, request):
    """paho clients for tests that start their own broker: mkc("name", version, broker=b)."""
    from pahoutil import ClientFactory

    f = ClientFactory(None, request.node.name)
    yield f
    f.close()


@pytest.fixture
def nats_cluster(tmp_path):
    """Three nats-servers with JetStream, clustered, healthy with a meta leader
    (cluster.NatsCluster); stopped at the end of the test. Fails, not skips, when the
    nats-server binary is missing (`make test` installs it into the venv)."""
    from cluster import NatsCluster

    c = NatsCluster(tmp_path / "nats", n=3)
    yield c
    c.close()


@pytest.fixture
def tern_cluster(nats_cluster):
    """Factory of Tern nodes on `nats_cluster` (cluster.TernCluster): tern_cluster(3,
    quorum_timeout=2) starts t1..t3, tern_cluster.node("t4") one more; .nats is the NATS cluster.
    Fails the test if a node died during it (with the nodes' and servers' logs)."""
    from cluster import TernCluster

    made = []

    def make(sections, extra=""):
        # Registered before __init__ runs: a node that does not become ready (its process may
        # still be running) is stopped at the end too.
        b = Broker.__new__(Broker)
        made.append(b)
        b.__init__(sections, extra)
        return b

    tc = TernCluster(nats_cluster, make)
    yield tc
    # Shown by pytest with a failed test's report ("Captured stdout teardown").
    for b in made:
        if hasattr(b, "port"):
            tail = "".join(b.log_lines[-40:])
            print(f"---- tern {getattr(b, 'node', '?')} (last 40 lines):\n{tail}")
    print(nats_cluster.logs())
    # Only nodes that became ready: one that did not has failed its test already.
    dead = [b for b in made if hasattr(b, "port") and not b.alive()]
    logs = "".join(f"---- tern {getattr(b, 'node', '?')}:\n{b.log()}" for b in dead)
    for b in made:
        if hasattr(b, "tmp"):
            b.close()
    assert not dead, "tern node died during the test:\n" + logs + nats_cluster.logs()
