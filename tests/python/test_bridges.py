"""Store-and-forward bridges (`[[bridges]]`, docs/bridges.md) between real processes: Tern A
bridging to a Mosquitto B (Debian's package, started here on a loopback port) or to another
Tern B over TLS, with paho clients on both sides, for the bridge's MQTT 3.1.1 and 5.

The factory uplink: what A acknowledged while B was down, A keeps across a SIGKILL and
forwards once B is up, in order per topic, with duplicates only within the in-flight window;
an `in` rule brings B's commands to A; overlapping `in` and `out` rules neither loop nor echo;
what comes in is checked by the ACL as `bridge:NAME`. BRIDGE_N (10,000 by default; `make soak`
sets TERN_BRIDGE_N=100000) sizes the long runs.
"""
import collections
import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import conftest
from pahoutil import V311, V5, TIMEOUT, metric
from test_queues import publish_all, wait_metric

BRIDGE_N = int(os.environ.get("TERN_BRIDGE_N", "10000"))
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
WINDOW = 100


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A Mosquitto broker on 127.0.0.1:`port` with persistence in its own directory."""

    def __init__(self, port):
        self.port = port
        self.host = "127.0.0.1"
        self.tmp = tempfile.TemporaryDirectory(prefix="mosq-")
        conf = os.path.join(self.tmp.name, "mosquitto.conf")
        with open(conf, "w") as f:
            # As root Mosquitto would switch to the user "mosquitto", which cannot write here.
            f.write(f"user {getpass.getuser()}\n")
            f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    f"persistence true\npersistence_location {self.tmp.name}/\n"
                    "max_queued_messages 0\nmax_inflight_messages 100\n")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def alive(self):
        return self.proc.poll() is None

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.tmp.cleanup()


@pytest.fixture
def mosquitto():
    made = []

    def start(port):
        m = Mosquitto(port)
        made.append(m)
        return m

    yield start
    for m in made:
        m.close()


@pytest.fixture(params=["3.1.1", "5"])
def protocol(request):
    return request.param


def bridge_toml(port, protocol, out=None, inbound=None, name="cloud", tls=None, extra=""):
    """A [[bridges]] table to 127.0.0.1:port; rules as (filter, qos, local, remote)."""
    def rules(rs):
        return "[" + ", ".join(
            f'{{ filter = "{f}", qos = {q}, local_prefix = "{lp}", remote_prefix = "{rp}" }}'
            for f, q, lp, rp in rs) + "]"
    t = (f'[[bridges]]\nname = "{name}"\naddress = "127.0.0.1:{port}"\n'
         f'protocol = "{protocol}"\nwindow = {WINDOW}\n')
    if out:
        t += f"out = {rules(out)}\n"
    if inbound:
        t += f"in = {rules(inbound)}\n"
    if tls:
        t += f'tls = {{ ca = "{tls}" }}\n'
    return t + extra


def wait_connected(b, name="cloud", want=1, timeout=15):
    got = wait_metric(b, "tern_bridge_connected", {"bridge": name}, want, timeout=timeout)
    assert got == want, f"bridge {name} connected={got}"


def check_arrival(got, n, topics):
    """Oracle for a drained backlog: every message arrived; per topic in order once its
    first copies are taken; second copies only within the in-flight window."""
    seen = collections.Counter(p for _, p in got)
    assert set(seen) == set(range(n)), f"lost {n - len(set(seen))} of {n}"
    dups = sum(c - 1 for c in seen.values())
    firsts = collections.defaultdict(list)
    already = set()
    for topic, p in got:
        if p not in already:
            already.add(p)
            firsts[topic].append(p)
    for topic, ps in firsts.items():
        assert ps == sorted(ps), f"{topic} out of order"
    assert len(firsts) == topics
    return dups


def drain(sub, n, timeout=180):
    """(topic, int payload) until every one of n distinct payloads arrived."""
    got, distinct = [], set()
    deadline = time.monotonic() + timeout
    while len(distinct) < n and time.monotonic() < deadline:
        try:
            m = sub.messages.get(timeout=1)
        except Exception:
            continue
        p = int(m.payload)
        got.append((m.topic, p))
        distinct.add(p)
    got += [(m.topic, int(m.payload)) for m in sub.drain(0.3)]
    return got


def test_what_a_acknowledged_while_b_was_down_reaches_b_after_a_kill(
        stoppable, mosquitto, mkc, protocol):
    """The factory uplink: Tern A bridges sensors/# to a Mosquitto B that is down. BRIDGE_N
    QoS 1 publishes to A are all acknowledged; A is SIGKILLed and restarted; B is started; a
    persistent subscriber on B gets every message with the prefix applied, in order per topic,
    second copies only within the in-flight window."""
    port = free_port()
    a = stoppable({}, extra=bridge_toml(port, protocol, out=[("sensors/#", 1, "", "site17/")]))
    pub = mkc("sensor-gw", V5, broker=a)
    pub.connect()
    rcs = publish_all(pub, lambda i: f"sensors/t{i % 10}", BRIDGE_N)
    assert set(rcs) == {0}, collections.Counter(rcs)
    assert wait_metric(a, "tern_bridge_queued_messages", {"bridge": "cloud"}, BRIDGE_N) == BRIDGE_N
    assert metric(a, "tern_bridge_connected", {"bridge": "cloud"}) == 0
    pub.close()
    a.proc.kill()
    a.proc.wait(timeout=10)
    b = mosquitto(port)
    sub = mkc("cloud-sub", V5, broker=b, persistent=True)
    sub.connect()
    assert sub.subscribe("site17/#", 1) == [1]
    a.start()
    got = drain(sub, BRIDGE_N)
    assert all(t.startswith("site17/sensors/t") for t, _ in got)
    dups = check_arrival(got, BRIDGE_N, 10)
    assert dups <= WINDOW, dups
    assert wait_metric(a, "tern_bridge_queued_messages", {"bridge": "cloud"}, 0) == 0
    assert metric(a, "tern_queue_oldest_age_seconds", {"kind": "bridge", "name": "cloud"}) == 0


def test_the_same_to_another_tern_over_tls(stoppable, make_broker, mkc, tmp_path):
    """As above with Tern as B, over TLS (the bridge checks B's certificate against the CA),
    B down at first, A killed in between."""
    certs = conftest.gen_certs(tmp_path / "certs")
    port = free_port()
    n = BRIDGE_N
    a = stoppable({}, extra=bridge_toml(port, "5", out=[("sensors/#", 1, "", "site17/")],
                                        tls=certs.ca_pem))
    pub = mkc("gw", V5, broker=a)
    pub.connect()
    assert set(publish_all(pub, lambda i: f"sensors/t{i % 4}", n)) == {0}
    pub.close()
    a.proc.kill()
    a.proc.wait(timeout=10)
    b = make_broker({"listeners.tls": {"bind": f"127.0.0.1:{port}", "cert": certs.server_pem,
                                       "key": certs.server_key}})
    sub = mkc("cloud", V5, broker=b, persistent=True)
    sub.connect()
    assert sub.subscribe("site17/#", 1) == [1]
    a.start()
    got = drain(sub, n)
    assert check_arrival(got, n, 4) <= WINDOW


def test_an_in_rule_brings_remote_commands_here(make_broker, mosquitto, mkc, protocol):
    """`in` subscribes at the remote and maps the topic back: B's cmd/site17/reboot arrives on
    A as cmd/reboot, at the rule's QoS; a topic no rule maps stays away."""
    port = free_port()
    b = mosquitto(port)
    a = make_broker({}, extra=bridge_toml(
        port, protocol, inbound=[("cmd/site17/#", 1, "cmd/", "cmd/site17/")]))
    wait_connected(a)
    local = mkc("device", V5, broker=a)
    local.connect()
    assert local.subscribe("#", 1) == [1]
    ops = mkc("ops", V5, broker=b)
    ops.connect()
    time.sleep(0.3)  # the bridge's SUBSCRIBE reached B
    assert ops.publish("cmd/site17/reboot", b"now", qos=1) in (0, 16)
    ops.publish("cmd/site18/reboot", b"not ours", qos=1)
    m = local.get()
    assert (m.topic, m.payload, m.qos) == ("cmd/reboot", b"now", 1)
    local.expect_none(0.5)
    assert metric(a, "tern_bridge_messages_received_total", {"bridge": "cloud"}) == 1


def test_overlapping_in_and_out_rules_neither_loop_nor_echo(make_broker, mosquitto, mkc,
                                                           protocol):
    """out sensors/# and in sensors/#, no prefixes, the same topics both ways. A local
    message reaches B once and A's subscriber once (3.1.1: Mosquitto's echo of it is dropped
    by the echo filter and counted; 5: No Local keeps it at B); a message from B reaches A
    once and never goes back to B."""
    port = free_port()
    b = mosquitto(port)
    a = make_broker({}, extra=bridge_toml(port, protocol, out=[("sensors/#", 1, "", "")],
                                          inbound=[("sensors/#", 1, "", "")]))
    wait_connected(a)
    here = mkc("here", V5, broker=a)
    here.connect()
    assert here.subscribe("sensors/#", 1) == [1]
    there = mkc("there", V5, broker=b)
    there.connect()
    assert there.subscribe("sensors/#", 1) == [1]
    time.sleep(0.3)
    local_pub = mkc("local-pub", V5, broker=a)
    local_pub.connect()
    for i in range(20):
        local_pub.publish("sensors/a", f"a{i}".encode(), qos=1)
    remote_pub = mkc("remote-pub", V5, broker=b)
    remote_pub.connect()
    for i in range(20):
        remote_pub.publish("sensors/b", f"b{i}".encode(), qos=1)
    want = sorted([f"a{i}".encode() for i in range(20)] + [f"b{i}".encode() for i in range(20)])
    for c in (here, there):
        got = sorted(m.payload for m in c.get_n(40, timeout=15))
        assert got == want
        c.expect_none(1.0)
    echoes = metric(a, "tern_bridge_messages_dropped_total", {"bridge": "cloud", "reason": "echo"})
    assert echoes == (20 if protocol == "3.1.1" else 0)


def test_incoming_messages_are_checked_as_bridge_name(make_broker, mosquitto, mkc, tmp_path):
    """With an ACL, what the bridge brings in is published as the user bridge:cloud: allowed
    topics arrive, others are dropped and counted as not_authorized."""
    acl = tmp_path / "acl"
    acl.write_text("topic read #\n\nuser bridge:cloud\ntopic write cmd/#\n")
    port = free_port()
    b = mosquitto(port)
    a = make_broker({"auth": {"acl_file": str(acl)}},
                    extra=bridge_toml(port, "5", inbound=[("remote/#", 1, "", "remote/")]))
    wait_connected(a)
    local = mkc("device", V5, broker=a)
    local.connect()
    local.subscribe("#", 1)
    ops = mkc("ops", V5, broker=b)
    ops.connect()
    time.sleep(0.3)
    ops.publish("remote/cmd/go", b"allowed", qos=1)
    ops.publish("remote/etc/x", b"denied", qos=1)
    assert local.get().payload == b"allowed"
    local.expect_none(0.5)
    assert wait_metric(a, "tern_bridge_messages_dropped_total",
                       {"bridge": "cloud", "reason": "not_authorized"}, 1) == 1


def test_the_factory_uplink_example_tells_its_story():
    """examples/factory_uplink.py (an edge and a cloud Tern of its own, the edge killed while
    the uplink is down) exits 0 and says OK."""
    r = subprocess.run(
        [sys.executable, os.path.join(conftest.ROOT, "examples", "factory_uplink.py"),
         "--tern", conftest.TERN_BIN],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("OK"), r.stdout


def test_reload_adds_changes_and_removes_a_bridge(make_broker, mosquitto, mkc):
    """SIGHUP with a new [[bridges]]: it connects and forwards. Changed (another prefix): it
    restarts and the new prefix applies. Removed: it disconnects; what is published then is
    not collected."""
    import signal
    port = free_port()
    b = mosquitto(port)
    a = make_broker({})
    sub = mkc("cloud", V5, broker=b)
    sub.connect()
    sub.subscribe("#", 1)

    def reload(text):
        with open(a.config_path) as f:
            base = f.read().split("[[bridges]]")[0]
        with open(a.config_path, "w") as f:
            f.write(base + text)
        before = a.log().count("configuration reloaded")
        a.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT
        while a.log().count("configuration reloaded") == before and time.monotonic() < deadline:
            time.sleep(0.05)

    pub = mkc("pub", V5, broker=a)
    pub.connect()
    reload(bridge_toml(port, "5", out=[("sensors/#", 1, "", "one/")]))
    wait_connected(a)
    pub.publish("sensors/x", b"1", qos=1)
    assert sub.get().topic == "one/sensors/x"
    reload(bridge_toml(port, "5", out=[("sensors/#", 1, "", "two/")]))
    time.sleep(0.5)
    wait_connected(a)
    pub.publish("sensors/x", b"2", qos=1)
    m = sub.get()
    assert (m.topic, m.payload) == ("two/sensors/x", b"2")
    reload("")
    wait_connected(a, want=0)
    pub.publish("sensors/x", b"3", qos=1)
    sub.expect_none(1.0)
    assert metric(a, "tern_bridge_queued_messages", {"bridge": "cloud"}) in (0, None)


def test_qos_2_crosses_a_bridge_exactly_once_while_the_link_holds(make_broker, mosquitto, mkc,
                                                                 protocol):
    """An out rule at QoS 2: 200 QoS 2 messages published on A reach a QoS 2 subscriber on B
    at QoS 2, each once and in order (the link finishes each with PUBREC/PUBREL/PUBCOMP
    before the queue lets it go)."""
    port = free_port()
    b = mosquitto(port)
    a = make_broker({}, extra=bridge_toml(port, protocol, out=[("sensors/#", 2, "", "q2/")]))
    wait_connected(a)
    sub = mkc("cloud", V5, broker=b)
    sub.connect()
    assert sub.subscribe("q2/#", 2) == [2]
    pub = mkc("gw", V5, broker=a)
    pub.connect()
    for i in range(200):
        assert pub.publish("sensors/x", str(i).encode(), qos=2) == 0
    got = sub.get_n(200, timeout=30)
    assert [int(m.payload) for m in got] == list(range(200))
    assert {m.qos for m in got} == {2}
    sub.expect_none(0.5)
    assert wait_metric(a, "tern_bridge_queued_messages", {"bridge": "cloud"}, 0) == 0
