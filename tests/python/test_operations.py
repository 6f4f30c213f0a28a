"""Operating Tern (issue 7): metrics, `/health` and `/ready`, `$SYS` topics, logs, graceful
shutdown, SIGHUP configuration reload and `tern check`, against the real binary.

Metrics are always read through a real Prometheus parser (prometheus_client's
`text_string_to_metric_families`), and counters are compared before and after real traffic:
every expected change is exact. Reason codes come from the raw bytes (mqttraw) and, where it
matters, from paho-mqtt; `mosquitto_sub` is the third-party `$SYS` client. Every wait is
bounded.
"""
import json
import os
import queue
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
import types
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mqttraw as mr
from conftest import ROOT, TERN_BIN, Broker, _toml_value, brokers
from mqttraw import CONNACK, DISCONNECT, PUBLISH, uid
from pahoutil import TIMEOUT, V311, V5, ClientFactory

VERSIONS = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]
VERSION = "0.1.0"

RECV_TYPES = ["connect", "publish", "puback", "pubrec", "pubrel", "pubcomp", "subscribe",
              "unsubscribe", "pingreq", "disconnect", "auth"]
SENT_TYPES = ["connack", "publish", "puback", "pubrec", "pubrel", "pubcomp", "suback",
              "unsuback", "pingresp", "disconnect", "auth"]
DROP_REASONS = ["queue_full", "expired", "too_large", "not_authorized", "no_subscribers",
                "retained_full"]
DEPTH_BUCKETS = ["0", "10", "100", "1000", "10000", "+Inf"]


@pytest.fixture
def mk(request):
    """A paho ClientFactory; pass broker=... to each call."""
    f = ClientFactory(None, request.node.name)
    yield f
    f.close()


@pytest.fixture
def raws():
    """Raw clients to close at the end: raws.append(c)."""
    out = []
    yield out
    for c in out:
        c.close()


def persistent(version):
    """CONNECT keyword arguments for a session that outlives its connection."""
    kw = dict(clean=False)
    if version == V5:
        kw["properties"] = {mr.SESSION_EXPIRY_INTERVAL: 300}
    return kw


def raw(raws, broker, version, client_id=None, **kw):
    c = mr.Client.to(broker, version)
    raws.append(c)
    c.connect(client_id or uid("ops"), **kw)
    return c


# ---------------------------------------------------------------------------------------------
# HTTP and the Prometheus exposition
# ---------------------------------------------------------------------------------------------
def http_get(broker, path, timeout=TIMEOUT):
    """(status, body text, headers) of GET path on the metrics listener."""
    url = f"http://127.0.0.1:{broker.metrics_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8"), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace"), e.headers


class Snap:
    """One scrape of /metrics, parsed by prometheus_client."""

    def __init__(self, text):
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = []
        self.type_of = {}  # sample name -> family type
        for f in self.families:
            for s in f.samples:
                self.samples.append((s.name, dict(s.labels), s.value))
                self.type_of[s.name] = f.type

    def get(self, name, **labels):
        """Sum of the samples called `name` whose labels include `labels`; None if none."""
        vals = [v for n, ls, v in self.samples
                if n == name and all(ls.get(k) == w for k, w in labels.items())]
        return sum(vals) if vals else None

    def v(self, name, **labels):
        got = self.get(name, **labels)
        if got is None:
            raise AssertionError(f"series {name}{labels} missing from /metrics:\n{self.text}")
        return got

    def labels(self, name, key):
        return {ls.get(key) for n, ls, _ in self.samples if n == name}

    def depth(self):
        """tern_sessions_by_queue_depth as {upper bound (float): sessions}."""
        return {float(ls["at_most"]): v for n, ls, v in self.samples
                if n == "tern_sessions_by_queue_depth"}


def scrape(broker):
    status, body, headers = http_get(broker, "/metrics")
    assert status == 200, (status, body)
    return Snap(body)


def _describe(name, labels):
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{inner}}}" if inner else name


def wait_series(broker, expected, base=None, timeout=TIMEOUT):
    """Polls /metrics until every (name, labels, value) holds: absolute values, or changes
    since `base` (a Snap) when given. Counters of a connection may be added a little after its
    packets, hence the polling; the comparison itself is exact."""
    deadline = time.monotonic() + timeout
    while True:
        snap = scrape(broker)
        bad = []
        for name, labels, want in expected:
            got = snap.get(name, **labels)
            if got is not None and base is not None:
                got -= base.v(name, **labels)
            if got is None or abs(got - want) > 1e-9:
                bad.append(f"  {_describe(name, labels)}: expected {'+' if base else ''}"
                           f"{want}, got {got}")
        if not bad:
            return snap
        if time.monotonic() > deadline:
            raise AssertionError("metrics never matched:\n" + "\n".join(bad))
        time.sleep(0.05)


def packet_deltas(recv=None, sent=None):
    """Expected changes of tern_packets_{received,sent}_total: the given counts, 0 for every
    other type."""
    recv, sent = recv or {}, sent or {}
    out = [("tern_packets_received_total", {"type": t}, recv.get(t, 0)) for t in RECV_TYPES]
    out += [("tern_packets_sent_total", {"type": t}, sent.get(t, 0)) for t in SENT_TYPES]
    assert set(recv) <= set(RECV_TYPES) and set(sent) <= set(SENT_TYPES)
    return out


def qos_deltas(name, counts):
    return [(name, {"qos": str(q)}, counts.get(q, 0)) for q in (0, 1, 2)]


def drop_deltas(**counts):
    return [("tern_messages_dropped_total", {"reason": r}, counts.get(r, 0))
            for r in DROP_REASONS]


def depth_values(**counts):
    """Expected tern_sessions_by_queue_depth values keyed by bucket: le0=..., le10=..., inf=..."""
    keys = {"0": "le0", "10": "le10", "100": "le100", "1000": "le1000", "10000": "le10000",
            "+Inf": "inf"}
    return [("tern_sessions_by_queue_depth", {"at_most": le}, counts[keys[le]])
            for le in DEPTH_BUCKETS]


# ---------------------------------------------------------------------------------------------
# 1. /metrics, /health, /ready
# ---------------------------------------------------------------------------------------------
COUNTERS = ["tern_connections_accepted_total", "tern_connections_refused_total",
            "tern_messages_received_total", "tern_messages_sent_total", "tern_bytes_total",
            "tern_packets_received_total", "tern_packets_sent_total",
            "tern_messages_dropped_total", "tern_tls_handshakes_total",
            "tern_auth_failures_total", "tern_storage_commits_total",
            "process_cpu_seconds_total"]
GAUGES = ["tern_connections_open", "tern_sessions", "tern_subscriptions", "tern_retained_messages",
          "tern_queued_messages", "tern_inflight_messages", "tern_sessions_by_queue_depth",
          "tern_build_info", "process_resident_memory_bytes", "process_open_fds"]
HISTOGRAMS = ["tern_storage_commit_seconds", "tern_storage_batch_submits"]
LABELS = {
    "tern_connections_refused_total": ("reason", {"max_connections", "connect_rate",
                                                  "protocol", "not_authorized"}),
    "tern_sessions": ("state", {"online", "offline"}),
    "tern_messages_received_total": ("qos", {"0", "1", "2"}),
    "tern_messages_sent_total": ("qos", {"0", "1", "2"}),
    "tern_bytes_total": ("direction", {"received", "sent"}),
    "tern_packets_received_total": ("type", set(RECV_TYPES)),
    "tern_packets_sent_total": ("type", set(SENT_TYPES)),
    "tern_messages_dropped_total": ("reason", set(DROP_REASONS)),
    "tern_tls_handshakes_total": ("result", {"ok", "failed"}),
}


def test_exposition_parses_and_names_every_series(make_broker, mk, raws):
    """The whole exposition parses with prometheus_client; every name starts with `tern_` or
    `process_`; counters' samples end with `_total`; every series of the contract is there with
    its labels (labelled series exist from the start, at 0); no label carries a client id."""
    b = make_broker()
    marker = "opsmarkerclient"
    c = mk(f"{marker}-paho", broker=b)
    c.connect()
    assert c.subscribe("ops/names/#", 1) == [1]
    # A persistent session, so that something is written to the store.
    r = raw(raws, b, V311, client_id=f"{marker}-raw", clean=False)
    r.publish("ops/names/x", b"hello", qos=1, pid=1)
    c.get()

    status, body, headers = http_get(b, "/metrics")
    assert status == 200
    ctype = headers.get("Content-Type", "")
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, ctype
    snap = Snap(body)
    assert snap.families, body

    for f in snap.families:
        assert f.name.startswith(("tern_", "process_")), f"family {f.name!r}"
        for s in f.samples:
            assert s.name.startswith(("tern_", "process_")), f"sample {s.name!r}"
            if f.type == "counter":
                assert s.name.endswith("_total"), f"counter sample {s.name!r} of {f.name}"
            for k, v in s.labels.items():
                assert k not in ("client_id", "clientid", "client"), (s.name, s.labels)
                assert marker not in v, f"{s.name}{s.labels} carries a client id"

    for name in COUNTERS:
        assert snap.type_of.get(name) == "counter", (name, snap.type_of.get(name))
    for name in GAUGES:
        assert snap.type_of.get(name) == "gauge", (name, snap.type_of.get(name))
    for name in HISTOGRAMS:
        for suffix in ("_bucket", "_sum", "_count"):
            assert snap.type_of.get(name + suffix) == "histogram", (name + suffix)
    for name, (key, values) in LABELS.items():
        assert snap.labels(name, key) >= values, (name, key, snap.labels(name, key))
    assert set(snap.depth()) == {float(le) for le in DEPTH_BUCKETS}, snap.depth()

    assert snap.v("tern_build_info", version=VERSION) == 1
    assert snap.v("tern_uptime_seconds") >= 0
    assert snap.v("process_resident_memory_bytes") > 0
    assert snap.v("process_open_fds") > 0
    assert snap.v("process_cpu_seconds_total") >= 0
    # The connections above are on the gauges.
    assert snap.v("tern_connections_open") == 2
    assert snap.v("tern_sessions", state="online") == 2
    sessions = snap.v("tern_sessions", state="online") + snap.v("tern_sessions", state="offline")
    assert snap.depth()[float("inf")] == sessions
    assert snap.depth()[0.0] == sessions  # nothing waits in any queue
    assert snap.v("tern_subscriptions") == 1
    # Histograms carry observations once something was stored (the session above).
    assert snap.v("tern_storage_commits_total") >= 1
    assert snap.v("tern_storage_commit_seconds_count") >= 1
    assert snap.v("tern_storage_batch_submits_count") >= 1

    # Uptime moves with the clock.
    t0 = snap.v("tern_uptime_seconds")
    deadline = time.monotonic() + 3
    while scrape(b).v("tern_uptime_seconds") < t0 + 1:
        assert time.monotonic() < deadline, "tern_uptime_seconds did not advance"
        time.sleep(0.1)


def test_every_metric_is_documented(make_broker):
    """Docs drift: every metric family the broker exposes (with a shared subscription group,
    a declared queue and a bridge present, so their series exist too) is
    described in docs/operations.md; the process collector's standard `process_*` series are
    described there as a group."""
    broker = make_broker({}, extra='[[queues]]\nname = "docs"\nfilter = "docs/#"\n'
                         '[[bridges]]\nname = "docs"\naddress = "127.0.0.1:1"\n'
                         'out = [{ filter = "docs/#" }]\n')
    c = mr.Client.to(broker, mr.V5)
    c.connect(uid("doc-metrics"))
    c.subscribe([("$share/docs/m/#", 1)])
    status, body, _ = http_get(broker, "/metrics")
    assert status == 200, (status, body)
    names = sorted(set(re.findall(r"^# HELP (\w+) ", body, re.M)))
    ours = [n for n in names if n.startswith("tern_")]
    assert len(ours) >= 30, f"only {len(ours)} tern_ metrics exposed: {ours}"
    with open(os.path.join(ROOT, "docs", "operations.md")) as f:
        doc = f.read()
    # Written as `name` or with its labels, `name{label}`.
    undocumented = [n for n in ours if not re.search(r"`" + n + r"(\{[^`]*\})?`", doc)]
    assert not undocumented, f"metrics missing from docs/operations.md: {undocumented}"
    if any(n.startswith("process_") for n in names):
        assert "process_" in doc, "process_* metrics not mentioned in docs/operations.md"
    c.disconnect()


def test_health_ready_and_unknown_path(broker):
    status, body, _ = http_get(broker, "/health")
    assert (status, body.strip()) == (200, "ok")
    status, body, _ = http_get(broker, "/ready")
    assert status == 200, (status, body)
    status, _, _ = http_get(broker, "/no-such-path")
    assert status == 404
    status, _, _ = http_get(broker, "/metrics/extra")
    assert status == 404


def test_other_methods_are_405_and_head_has_no_body(broker):
    """The endpoints answer GET and HEAD; another method is 405 with Allow (docs/operations.md)."""
    url = f"http://127.0.0.1:{broker.metrics_port}/metrics"
    try:
        urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=TIMEOUT)
        raise AssertionError("POST /metrics was answered 2xx")
    except urllib.error.HTTPError as e:
        assert e.code == 405, e.code
        assert e.headers.get("Allow", "").upper() == "GET,HEAD", dict(e.headers)
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT) as r:
        assert r.status == 200
        assert r.headers.get("Content-Type", "").startswith("text/plain")
        assert r.read() == b""


# ---------------------------------------------------------------------------------------------
# 1b. Counters move by the right amounts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_qos1_fan_out_counts(make_broker, mk, version):
    """10 QoS 1 publishes from a paho client into a topic with 2 paho subscribers: every
    packet, message and connection counter moves by exactly what went over the wire."""
    b = make_broker()
    s0 = scrape(b)
    subs = [mk(f"sub{i}", broker=b, protocol=version) for i in range(2)]
    pub = mk("pub", broker=b, protocol=version)
    for c in subs + [pub]:
        c.connect()
    for c in subs:
        assert c.subscribe("ops/fan", 1) == [1]
    wait_series(b, [("tern_connections_open", {}, 3), ("tern_sessions", {"state": "online"}, 3),
                    ("tern_subscriptions", {}, 2), ("tern_connections_accepted_total", {}, 3)], base=s0)

    payloads = [f"m{i}".encode() for i in range(10)]
    for p in payloads:
        assert pub.publish("ops/fan", p, qos=1) in (0, None)
    for c in subs:
        assert [m.payload for m in c.get_n(10)] == payloads
    for c in subs + [pub]:
        c.disconnect()

    snap = wait_series(
        b,
        packet_deltas(
            recv={"connect": 3, "subscribe": 2, "publish": 10, "puback": 20, "disconnect": 3},
            sent={"connack": 3, "suback": 2, "puback": 10, "publish": 20})
        + qos_deltas("tern_messages_received_total", {1: 10})
        + qos_deltas("tern_messages_sent_total", {1: 20})
        + drop_deltas()
        + [("tern_connections_open", {}, 0), ("tern_connections_accepted_total", {}, 3),
           ("tern_sessions", {"state": "online"}, 0), ("tern_subscriptions", {}, 0),
           ("tern_auth_failures_total", {}, 0)],
        base=s0)
    # Bytes: at least the PUBLISH packets themselves (2 + 2 + 7 + 2 + 2 (+1 for v5
    # properties) bytes each) and the 4-byte PUBACKs; at most a few times that.
    publish_size = 15 + (1 if version == V5 else 0)
    rx = snap.v("tern_bytes_total", direction="received") - s0.v("tern_bytes_total",
                                                                 direction="received")
    tx = snap.v("tern_bytes_total", direction="sent") - s0.v("tern_bytes_total",
                                                             direction="sent")
    assert 10 * publish_size + 20 * 4 <= rx <= 3 * (10 * publish_size + 20 * 4) + 500, rx
    assert 20 * publish_size + 10 * 4 <= tx <= 3 * (20 * publish_size + 10 * 4) + 500, tx


class CountingClient(mr.Client):
    """A raw client that counts every byte it writes and reads."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.bytes_out = 0
        self.bytes_in = 0

    def send(self, data):
        self.bytes_out += len(data)
        super().send(data)

    def try_send(self, data):
        ok = super().try_send(data)
        if ok:
            self.bytes_out += len(data)
        return ok

    def _fill(self, deadline):
        before = len(self.buf)
        more = super()._fill(deadline)
        self.bytes_in += len(self.buf) - before
        return more


@pytest.mark.parametrize("version", VERSIONS)
def test_every_packet_type_and_exact_bytes(make_broker, raws, version):
    """One raw client runs QoS 0, 1 and 2 through its own subscription, pings, unsubscribes
    and disconnects: every packet type is counted once per packet in each direction, and
    tern_bytes_total moves by exactly the bytes on the wire."""
    b = make_broker()
    s0 = scrape(b)
    c = CountingClient.to(b, version)
    raws.append(c)
    c.connect(uid("counted"))
    assert c.subscribe([("ops/every", 2)], pid=1).codes == [2]

    comp = c.publish("ops/every", b"two", qos=2, pid=10)
    assert comp.type == mr.PUBCOMP and comp.pubrec.rc == 0
    p, _ = c.recv_until(lambda p: p.type == PUBLISH)
    assert (p.qos, p.payload) == (2, b"two")
    c.ack_publish(p)  # PUBREC -> PUBREL -> PUBCOMP

    ack = c.publish("ops/every", b"one", qos=1, pid=11)
    assert ack.type == mr.PUBACK and ack.rc == 0
    p, _ = c.recv_until(lambda p: p.type == PUBLISH)
    assert (p.qos, p.payload) == (1, b"one")
    c.ack_publish(p)

    c.publish("ops/every", b"zero", qos=0)
    p, _ = c.recv_until(lambda p: p.type == PUBLISH)
    assert (p.qos, p.payload) == (0, b"zero")

    c.ping()
    assert c.unsubscribe(["ops/every"], pid=2).type == mr.UNSUBACK
    c.assert_silent(0.2)
    c.disconnect()

    wait_series(
        b,
        packet_deltas(
            recv={"connect": 1, "subscribe": 1, "publish": 3, "pubrel": 1, "pubrec": 1,
                  "pubcomp": 1, "puback": 1, "pingreq": 1, "unsubscribe": 1, "disconnect": 1},
            sent={"connack": 1, "suback": 1, "publish": 3, "pubrec": 1, "pubcomp": 1,
                  "pubrel": 1, "puback": 1, "pingresp": 1, "unsuback": 1})
        + qos_deltas("tern_messages_received_total", {0: 1, 1: 1, 2: 1})
        + qos_deltas("tern_messages_sent_total", {0: 1, 1: 1, 2: 1})
        + [("tern_bytes_total", {"direction": "received"}, c.bytes_out),
           ("tern_bytes_total", {"direction": "sent"}, c.bytes_in),
           ("tern_connections_accepted_total", {}, 1), ("tern_connections_open", {}, 0)]
        + drop_deltas(),
        base=s0)


@pytest.mark.parametrize("version", VERSIONS)
def test_publish_without_subscribers_is_counted_as_dropped(make_broker, raws, version):
    b = make_broker()
    watcher = raw(raws, b, version)
    assert watcher.subscribe([("ops/watched/#", 1)]).codes == [1]
    c = raw(raws, b, version)
    s0 = scrape(b)
    c.publish("ops/nobody/here", b"x", qos=0)
    c.publish("ops/nobody/here", b"y", qos=1, pid=1)
    c.publish("ops/watched/a", b"z", qos=1, pid=2)  # has a subscriber: not dropped
    p, _ = watcher.recv_until(lambda p: p.type == PUBLISH)
    watcher.ack_publish(p)
    c.ping()
    wait_series(b, drop_deltas(no_subscribers=2)
                + qos_deltas("tern_messages_received_total", {0: 1, 1: 2})
                + qos_deltas("tern_messages_sent_total", {1: 1}), base=s0)


def test_subscription_and_retained_gauges(make_broker, raws):
    b = make_broker()
    s0 = scrape(b)
    c = raw(raws, b, V5)
    assert c.subscribe([("ops/g/a", 0), ("ops/g/b", 1), ("ops/g/#", 1)]).codes == [0, 1, 1]
    for i in range(3):
        c.publish(f"ops/r/{i}", b"kept", qos=1, pid=i + 1, retain=True)
    wait_series(b, [("tern_subscriptions", {}, 3), ("tern_retained_messages", {}, 3)], base=s0)
    c.publish("ops/r/0", b"", qos=1, pid=9, retain=True)  # deletes one
    c.unsubscribe(["ops/g/a"], pid=5)
    wait_series(b, [("tern_subscriptions", {}, 2), ("tern_retained_messages", {}, 2)], base=s0)


@pytest.mark.parametrize("version", VERSIONS)
def test_offline_queue_gauges(make_broker, raws, version):
    """A persistent session whose client is away with 5 QoS 1 messages queued: queued 5,
    nothing in flight, the session in queue-depth buckets at_most >= 10 but not at_most=0; with
    15 queued it leaves the at_most=10 bucket; once its client is back and has acknowledged all,
    everything is back at 0."""
    b = make_broker()
    cid = uid("away")
    sub = raw(raws, b, version, cid, **persistent(version))
    assert sub.subscribe([("ops/q/#", 1)]).codes == [1]
    sub.disconnect()
    wait_series(b, [("tern_sessions", {"state": "offline"}, 1),
                    ("tern_sessions", {"state": "online"}, 0)])

    pub = raw(raws, b, version)
    for i in range(5):
        pub.publish("ops/q/x", f"m{i}".encode(), qos=1, pid=i + 1)
    pub.disconnect()
    wait_series(b, [("tern_sessions", {"state": "online"}, 0),
                    ("tern_sessions", {"state": "offline"}, 1),
                    ("tern_queued_messages", {}, 5), ("tern_inflight_messages", {}, 0)]
                + depth_values(le0=0, le10=1, le100=1, le1000=1, le10000=1, inf=1))

    pub = raw(raws, b, version)
    for i in range(5, 15):
        pub.publish("ops/q/x", f"m{i}".encode(), qos=1, pid=i + 1)
    pub.disconnect()
    wait_series(b, [("tern_sessions", {"state": "online"}, 0),
                    ("tern_queued_messages", {}, 15)]
                + depth_values(le0=0, le10=0, le100=1, le1000=1, le10000=1, inf=1))

    sub = raw(raws, b, version, cid, **persistent(version))
    assert sub.connack.session_present
    got = []
    for _ in range(15):
        p, _ = sub.recv_until(lambda p: p.type == PUBLISH)
        got.append(p.payload)
        sub.ack_publish(p)
    assert got == [f"m{i}".encode() for i in range(15)]
    sub.ping()
    wait_series(b, [("tern_sessions", {"state": "online"}, 1),
                    ("tern_sessions", {"state": "offline"}, 0),
                    ("tern_queued_messages", {}, 0), ("tern_inflight_messages", {}, 0)]
                + depth_values(le0=1, le10=1, le100=1, le1000=1, le10000=1, inf=1))


@pytest.mark.parametrize("version", VERSIONS)
def test_inflight_gauge_follows_the_window(make_broker, raws, version):
    """A subscriber that does not acknowledge: v5 with Receive Maximum 2 (3.1.1: the broker's
    limits.max_inflight = 3) holds that many messages in flight; the rest of 5 wait queued.
    Each PUBACK lets one more out; when all are acknowledged both gauges are 0."""
    window = 2 if version == V5 else 3
    b = make_broker({"limits": {"max_inflight": 3}})
    kw = {"properties": {mr.RECEIVE_MAXIMUM: 2}} if version == V5 else {}
    sub = raw(raws, b, version, **kw)
    assert sub.subscribe([("ops/slow", 1)]).codes == [1]
    pub = raw(raws, b, version)
    for i in range(5):
        pub.publish("ops/slow", f"s{i}".encode(), qos=1, pid=i + 1)
    pub.disconnect()
    first = [p for p in sub.collect(0.5) if p.type == PUBLISH]
    assert [p.payload for p in first] == [f"s{i}".encode() for i in range(window)], first
    wait_series(b, [("tern_inflight_messages", {}, window),
                    ("tern_queued_messages", {}, 5 - window),
                    ("tern_sessions", {"state": "online"}, 1)]
                + depth_values(le0=0, le10=1, le100=1, le1000=1, le10000=1, inf=1))

    sub.send(mr.puback(first[0].pid, version))
    nxt, _ = sub.recv_until(lambda p: p.type == PUBLISH)
    assert nxt.payload == f"s{window}".encode()
    wait_series(b, [("tern_inflight_messages", {}, window),
                    ("tern_queued_messages", {}, 5 - window - 1)])

    pending = first[1:] + [nxt]
    seen = window + 1
    while pending:
        sub.send(mr.puback(pending.pop(0).pid, version))
        if seen < 5:
            p, _ = sub.recv_until(lambda p: p.type == PUBLISH)
            pending.append(p)
            seen += 1
    sub.ping()
    wait_series(b, [("tern_inflight_messages", {}, 0), ("tern_queued_messages", {}, 0)]
                + depth_values(le0=1, le10=1, le100=1, le1000=1, le10000=1, inf=1))


def tern_passwd(path, user, password):
    r = subprocess.run([TERN_BIN, "passwd", str(path), user], input=password.encode() + b"\n",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert r.returncode == 0, r.stderr.decode(errors="replace")


def write_atomic(path, text):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@pytest.mark.parametrize("version", VERSIONS)
def test_auth_failures_are_counted(make_broker, raws, tmp_path, version):
    """A wrong password, an unknown user and an anonymous client (not allowed) each add 1 to
    tern_auth_failures_total (and to refused{not_authorized}); a good login and a refusal for
    a protocol reason do not."""
    passwd = tmp_path / "passwd"
    tern_passwd(passwd, "alice", "alice-pw")
    b = make_broker({"auth": {"allow_anonymous": False, "password_file": str(passwd)}})
    bad_creds = 0x86 if version == V5 else 4
    not_auth = 0x87 if version == V5 else 5
    s0 = scrape(b)
    for user, pw, rc in [("alice", "wrong", bad_creds), ("mallory", "x", bad_creds),
                         (None, None, not_auth)]:
        c = mr.Client.to(b, version)
        raws.append(c)
        c.connect(uid("authfail"), expect_rc=rc, username=user, password=pw)
        c.wait_closed(timeout=5)
    wait_series(b, [("tern_auth_failures_total", {}, 3),
                    ("tern_connections_refused_total", {"reason": "not_authorized"}, 3),
                    ("tern_connections_accepted_total", {}, 0)], base=s0)

    ok = raw(raws, b, version, username="alice", password="alice-pw")
    ok.ping()
    # An unsupported protocol level is a protocol refusal, not an authentication failure.
    c = mr.Client.to(b, mr.V311)
    raws.append(c)
    c.send(mr.packet(mr.CONNECT, 0, mr.string("MQTT") + mr.u8(9) + mr.u8(2) + mr.u16(60)
                     + mr.string(uid("proto"))))
    c.wait_closed(timeout=5)
    wait_series(b, [("tern_auth_failures_total", {}, 3),
                    ("tern_connections_refused_total", {"reason": "not_authorized"}, 3),
                    ("tern_connections_refused_total", {"reason": "protocol"}, 1),
                    ("tern_connections_accepted_total", {}, 1)], base=s0)


# ---------------------------------------------------------------------------------------------
# 2. $SYS topics
# ---------------------------------------------------------------------------------------------
SYS = "$SYS/broker/"
SYS_INTEGER = [SYS + t for t in (
    "clients/connected", "clients/disconnected", "clients/total", "clients/maximum",
    "messages/received", "messages/sent", "publish/messages/received",
    "publish/messages/sent", "publish/messages/dropped", "bytes/received", "bytes/sent",
    "subscriptions/count", "retained messages/count", "messages/stored")]
SYS_LOAD = [f"{SYS}load/{kind}/{d}/{w}" for kind in ("messages", "publish", "bytes")
            for d in ("received", "sent") for w in ("1min", "5min", "15min")]
SYS_LOAD += [f"{SYS}load/connections/{w}" for w in ("1min", "5min", "15min")]
SYS_ALL = [SYS + "version", SYS + "uptime"] + SYS_INTEGER + SYS_LOAD
DECIMAL = re.compile(r"^\d+(\.\d+)?$")


def check_sys_payload(topic, payload):
    text = payload.decode("utf-8")
    if topic == SYS + "version":
        assert text == f"tern version {VERSION}", text
    elif topic == SYS + "uptime":
        assert re.fullmatch(r"\d+ seconds", text), text
    elif topic in SYS_INTEGER:
        assert re.fullmatch(r"\d+", text), (topic, text)
    elif topic in SYS_LOAD:
        assert DECIMAL.match(text), (topic, text)


class SysWatch:
    """Follows a paho client's `$SYS/#` subscription: the latest payload of every topic (a
    topic whose value did not change need not be published again) and which topics arrived
    with the retain flag."""

    def __init__(self, client):
        self.c = client
        self.latest = {}
        self.retained = set()
        self.messages = []

    def _take(self, timeout):
        try:
            m = self.c.messages.get(timeout=max(timeout, 0.001))
        except queue.Empty:
            return None
        self.messages.append(m)
        self.latest[m.topic] = m.payload.decode("utf-8")
        if m.retain:
            self.retained.add(m.topic)
        return m

    def first_batch(self, timeout=TIMEOUT):
        """Reads until every contract topic was seen with the retain flag (the retained copy
        sent because of the subscription; a periodic update racing it may come first)."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [t for t in SYS_ALL if t not in self.retained]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"$SYS topics never seen retained: {missing}; latest: "
                                     f"{self.latest}")
            self._take(deadline - time.monotonic())

    def wait(self, want, timeout=4.0):
        """Reads until, for every topic in `want` (topic -> predicate on the text payload),
        the latest value satisfies it. Returns the latest values."""
        deadline = time.monotonic() + timeout
        while True:
            if all(t in self.latest and ok(self.latest[t]) for t, ok in want.items()):
                return dict(self.latest)
            if time.monotonic() > deadline:
                raise AssertionError(f"$SYS never reached the expected values: "
                                     f"{ {t: self.latest.get(t) for t in want} }")
            self._take(deadline - time.monotonic())


@pytest.mark.parametrize("version", VERSIONS)
def test_sys_topics_with_paho(make_broker, mk, raws, version):
    """interval = 1: a paho client subscribing `$SYS/#` gets every topic as a retained QoS 0
    message with the right kind of payload; clients/connected follows new connections and
    publish/messages/received counts client PUBLISHes exactly."""
    b = make_broker({"sys_topics": {"interval": 1}})
    c = mk("sys", broker=b, protocol=version)
    c.connect()
    assert c.subscribe("$SYS/#", 1) == [1]
    watch = SysWatch(c)
    watch.first_batch()
    for m in watch.messages:
        assert m.topic.startswith("$SYS/")
        assert m.qos == 0, (m.topic, m.qos)
        check_sys_payload(m.topic, m.payload)

    others = [raw(raws, b, V311), raw(raws, b, V5)]
    for i in range(5):
        others[0].publish("ops/sys/count", b"p", qos=0)
    others[1].publish("ops/sys/count", b"p", qos=1, pid=1)
    latest = watch.wait({
        SYS + "clients/connected": lambda v: v == "3",
        SYS + "publish/messages/received": lambda v: v == "6",
        SYS + "clients/maximum": lambda v: int(v) >= 3,
        # Per-minute load averages follow the traffic.
        SYS + "load/publish/received/1min": lambda v: float(v) > 0,
        SYS + "load/connections/1min": lambda v: float(v) > 0,
        SYS + "load/bytes/received/1min": lambda v: float(v) > 0,
    })
    for topic, value in latest.items():
        check_sys_payload(topic, value.encode())
    for o in others:
        o.disconnect()
    watch.wait({SYS + "clients/connected": lambda v: v == "1",
                 SYS + "clients/maximum": lambda v: int(v) >= 3})


def test_sys_values_agree_with_metrics(make_broker, mk, raws):
    """$SYS counts are the broker's own: subscriptions, retained messages and offline
    sessions (clients/disconnected, as Mosquitto counts them) match /metrics."""
    b = make_broker({"sys_topics": {"interval": 1}})
    away = raw(raws, b, V5, uid("away"), **persistent(V5))
    away.subscribe([("ops/away", 1)])
    away.disconnect()
    wait_series(b, [("tern_sessions", {"state": "offline"}, 1)])
    p = raw(raws, b, V5)
    p.publish("ops/kept", b"r", qos=1, pid=1, retain=True)
    p.publish("ops/away", b"q1", qos=1, pid=2)
    p.publish("ops/away", b"q2", qos=1, pid=3)
    c = mk("sys", broker=b)
    c.connect()
    assert c.subscribe("$SYS/#", 0) == [0]
    snap = wait_series(b, [("tern_queued_messages", {}, 2)])
    want_subs = str(int(snap.v("tern_subscriptions")))
    want_retained = int(snap.v("tern_retained_messages"))
    assert want_retained >= 1
    SysWatch(c).wait({
        SYS + "subscriptions/count": lambda v: v == want_subs,
        SYS + "retained messages/count": lambda v: v == str(want_retained),
        # Mosquitto's "stored": retained messages plus messages queued for sessions.
        SYS + "messages/stored": lambda v: v == str(want_retained + 2),
        SYS + "clients/disconnected": lambda v: v == "1",
        SYS + "clients/connected": lambda v: v == "2",
        SYS + "clients/total": lambda v: v == "3",
    })


@pytest.mark.parametrize("version", VERSIONS)
def test_wildcards_do_not_match_sys(make_broker, mk, version):
    """[MQTT-4.7.2-1]: `#` and `+/...` do not match topics starting with `$`: the client gets
    normal messages but no `$SYS` ones, neither retained nor periodic."""
    b = make_broker({"sys_topics": {"interval": 1}})
    c = mk("all", broker=b, protocol=version)
    c.connect()
    assert c.subscribe([("#", 0), ("+/broker/#", 0)]) == [0, 0]
    p = mk("pub", broker=b, protocol=version)
    p.connect()
    p.publish("ops/normal", b"visible", qos=1)
    m = c.get()
    assert (m.topic, m.payload) == ("ops/normal", b"visible")
    got = c.drain(1.6)
    assert not [x.topic for x in got if x.topic.startswith("$")], [x.topic for x in got]


def test_sys_interval_zero_publishes_nothing(make_broker, mk):
    b = make_broker({"sys_topics": {"interval": 0}})
    c = mk("sys", broker=b)
    c.connect()
    assert c.subscribe("$SYS/#", 0) == [0]
    c.expect_none(2.0)


def test_sys_default_publishes_at_startup(broker, mk):
    """Without a [sys_topics] section (interval 10) the first publication happens at startup:
    a newcomer gets the retained version at once."""
    c = mk("sys", broker=broker)
    c.connect()
    assert c.subscribe(SYS + "version", 0) == [0]
    m = c.get(timeout=3)
    assert (m.topic, m.payload, m.retain) == (SYS + "version", f"tern version {VERSION}".encode(),
                                              True)


SYS_LINE = re.compile(r"^(\$SYS/\S+(?: messages/count)?) (.*)$")


@pytest.mark.skipif(not shutil.which("mosquitto_sub"), reason="mosquitto-clients not installed")
@pytest.mark.parametrize("proto", ["mqttv311", "mqttv5"])
def test_sys_with_mosquitto_sub(make_broker, proto):
    b = make_broker({"sys_topics": {"interval": 1}})
    n = 2 * len(SYS_ALL)  # the retained set, then periodic updates
    r = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(b.port), "-V", proto,
                        "-t", "$SYS/#", "-C", str(n), "-W", "5", "-v"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=15)
    out = r.stdout.decode()
    assert r.returncode == 0, (r.returncode, out, r.stderr.decode())
    values = {}
    for line in out.splitlines():
        m = SYS_LINE.match(line)
        assert m, line
        values.setdefault(m.group(1), m.group(2))
    assert len(out.splitlines()) == n
    assert not set(SYS_ALL) - set(values), sorted(set(SYS_ALL) - set(values))
    assert values[SYS + "version"] == f"tern version {VERSION}", values
    for topic, v in values.items():
        check_sys_payload(topic, v.encode())


# ---------------------------------------------------------------------------------------------
# 3. Logs
# ---------------------------------------------------------------------------------------------
class SplitBroker(Broker):
    """A Broker whose stdout and stderr are read separately (stderr lines in `err_lines`)."""

    def start(self):
        self.err_lines = []
        self.proc = subprocess.Popen([TERN_BIN, "--config", self.config_path],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def pump_err():
            for line in self.proc.stderr:
                self.err_lines.append(line)
                self.log_lines.append(line)

        threading.Thread(target=pump_err, daemon=True).start()
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("tern exited before ready:\n" + "".join(self.log_lines))
            self.log_lines.append(line)
            m = re.search(r"tern: ready tcp=(\S+):(\d+) metrics=(\S+):(\d+)", line)
            if m:
                self.host, self.port, self.metrics_port = m.group(1), int(m.group(2)), int(
                    m.group(4))
                break
        else:
            raise RuntimeError("tern did not become ready")
        self._drain = threading.Thread(target=self._pump, daemon=True)
        self._drain.start()


@pytest.fixture
def split_broker():
    yield from brokers(check_alive=False, make=SplitBroker)


def wait_for(pred, timeout=TIMEOUT, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def json_lines(b):
    out = []
    for line in list(b.err_lines):
        line = line.rstrip("\n")
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"stderr line is not JSON: {line!r}")
        assert isinstance(obj, dict), line
        out.append(obj)
    return out


def message_of(obj):
    fields = obj.get("fields") or {}
    return fields.get("message", obj.get("message"))


def traffic(b, raws, n=50):
    """Two clients: one subscribes, the other publishes n QoS 1 messages it receives; then
    one disconnects normally and the other drops its connection."""
    sub = raw(raws, b, V5)
    sub.subscribe([("ops/log", 1)])
    pub = raw(raws, b, V311)
    for i in range(n):
        pub.publish("ops/log", b"x", qos=1, pid=i + 1)
    for _ in range(n):
        p, _ = sub.recv_until(lambda p: p.type == PUBLISH)
        sub.ack_publish(p)
    sub.ping()
    sub.disconnect()
    pub.abort()


def test_json_logs(split_broker, raws):
    """log.format = "json": every stderr line is a JSON object with a level and a message;
    one "client connected" per connection and one "connection closed" with a reason per
    close, and no per-message lines at info."""
    b = split_broker({"log": {"level": "info", "format": "json"}})
    traffic(b, raws, 50)
    wait_for(lambda: sum(message_of(o) == "connection closed" for o in json_lines(b)) >= 2,
             what="two 'connection closed' lines")
    time.sleep(0.2)
    objs = json_lines(b)
    for o in objs:
        assert "level" in o and "timestamp" in o and message_of(o) is not None, o
        assert o["level"] in ("ERROR", "WARN", "INFO", "DEBUG", "TRACE"), o
    assert all(o["level"] != "DEBUG" for o in objs)
    connected = [o for o in objs if message_of(o) == "client connected"]
    closed = [o for o in objs if message_of(o) == "connection closed"]
    assert len(connected) == 2, connected
    assert len(closed) == 2, closed
    for o in connected + closed:
        assert o["level"] == "INFO", o
    for o in closed:
        fields = o.get("fields") or {}
        assert any("reason" in k for k in fields) or any("reason" in k for k in o), o
    # 100 messages went through (50 in, 50 out): nothing is logged per message.
    assert len(objs) < 30, "\n".join(json.dumps(o) for o in objs)


def test_text_logs_one_line_per_connection(split_broker, raws):
    b = split_broker({"log": {"level": "info"}})
    traffic(b, raws, 50)
    wait_for(lambda: sum("connection closed" in x for x in b.err_lines) >= 2,
             what="two 'connection closed' lines")
    time.sleep(0.2)
    lines = list(b.err_lines)
    assert sum("client connected" in x for x in lines) == 2, "".join(lines)
    assert sum("connection closed" in x for x in lines) == 2, "".join(lines)
    assert all(not x.lstrip().startswith("{") for x in lines), "".join(lines)
    assert len(lines) < 30, "".join(lines)


def test_connect_and_refusal_lines_say_who(split_broker):
    """What an operator greps for is on the line, for a client let in and one refused:
    client id, user name, listener, protocol version, keep alive, clean start (a refusal
    too, with why)."""
    b = split_broker({"log": {"level": "info"}, "auth": {"allow_anonymous": False}})
    c = mr.Client.to(b, V5)
    c.send(mr.connect("gw-9", version=V5, keepalive=30, username="sensor-002", password=b"x"))
    p = c.recv()
    assert p.type == CONNACK and p.rc != 0
    c.close()
    wait_for(lambda: any("connection refused" in x for x in b.err_lines), what="a refusal line")
    line = next(x for x in b.err_lines if "connection refused" in x)
    for part in ("client_id=gw-9", "username=sensor-002", 'version="5.0"', "keep_alive=30",
                 "clean_start=true", "bad user name or password", 'listener="tcp"'):
        assert part in line, line


# ---------------------------------------------------------------------------------------------
# 4. Graceful shutdown
# ---------------------------------------------------------------------------------------------
def assert_no_new_connections(b, window=1.0):
    """From now until the process exits (or `window` passes), no new connection gets a
    successful CONNACK."""
    deadline = time.monotonic() + window
    attempts = 0
    while attempts == 0 or (b.proc.poll() is None and time.monotonic() < deadline):
        attempts += 1
        try:
            c = mr.Client.to(b, V5, timeout=1.0)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            c.send(mr.connect(uid("late"), version=V5))
            p = c.recv(timeout=1.0)
            assert not (p.type == CONNACK and p.rc == 0), f"accepted after the signal: {p!r}"
        except (mr.Closed, mr.Timeout, OSError):
            pass
        finally:
            c.close()
        time.sleep(0.05)


def test_sigterm_disconnects_publishes_wills_and_exits_0(stoppable, mk, raws):
    """SIGTERM: v5 clients get DISCONNECT 0x8B (raw bytes and paho's on_disconnect), 3.1.1
    clients are closed, no new connection is accepted, wills of connected clients are
    published (a persistent subscriber finds them after a restart on the same data directory,
    a retained will is retained), and the process exits 0 within 10 s."""
    b = stoppable()
    watcher_id = uid("watcher")
    watcher = raw(raws, b, V5, watcher_id, **persistent(V5))
    assert watcher.subscribe([("ops/wills/#", 1)]).codes == [1]
    w5 = raw(raws, b, V5, will=dict(topic="ops/wills/v5", payload=b"gone-v5", qos=1,
                                    retain=True))
    w3 = raw(raws, b, V311, will=dict(topic="ops/wills/v311", payload=b"gone-v311", qos=1))
    plain5 = raw(raws, b, V5)
    p5 = mk("paho5", broker=b, protocol=V5)
    p5.connect()
    p3 = mk("paho3", broker=b, protocol=V311)
    p3.connect()
    wait_series(b, [("tern_connections_open", {}, 6)])

    t0 = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    for c in (plain5, w5):
        pkts, closed = c.wait_closed(timeout=10)
        assert closed, pkts
        assert [(p.type, p.rc) for p in pkts] == [(DISCONNECT, 0x8B)], pkts
    pkts, closed = w3.wait_closed(timeout=10)
    assert closed and not pkts, pkts  # 3.1.1 has no server DISCONNECT
    rc, flags, _, _ = p5.wait_disconnect(10)
    assert flags.is_disconnect_packet_from_server and rc.value == 0x8B, rc
    p3.wait_disconnect(10)
    assert_no_new_connections(b)
    b.proc.wait(timeout=max(0.1, 10 - (time.monotonic() - t0)))
    assert b.proc.returncode == 0, b.log()

    b.start()
    watcher = raw(raws, b, V5, watcher_id, **persistent(V5))
    assert watcher.connack.session_present
    wills = set()
    deadline = time.monotonic() + TIMEOUT
    while len(wills) < 2 and time.monotonic() < deadline:
        p, _ = watcher.recv_until(lambda p: p.type == PUBLISH,
                                  timeout=max(0.01, deadline - time.monotonic()))
        watcher.ack_publish(p)
        wills.add((p.topic, p.payload))
    assert wills == {("ops/wills/v5", b"gone-v5"), ("ops/wills/v311", b"gone-v311")}
    late = raw(raws, b, V5)
    late.subscribe([("ops/wills/#", 1)])
    p, _ = late.recv_until(lambda p: p.type == PUBLISH)
    assert (p.topic, p.payload, p.retain) == ("ops/wills/v5", b"gone-v5", True)
    late.assert_silent(0.3)


def test_sigint_is_graceful_too(stoppable, raws):
    b = stoppable()
    c = raw(raws, b, V5)
    b.proc.send_signal(signal.SIGINT)
    pkts, closed = c.wait_closed(timeout=10)
    assert closed and [(p.type, p.rc) for p in pkts] == [(DISCONNECT, 0x8B)], pkts
    b.proc.wait(timeout=10)
    assert b.proc.returncode == 0, b.log()


def test_ready_is_503_while_shutting_down(stoppable, raws):
    """/ready answers 200 while serving; after SIGTERM, while the broker is still finishing (a
    v5 client that does not read keeps its connection busy), it answers 503 and never 200
    again."""
    b = stoppable({"limits": {"write_timeout": 30}})
    assert http_get(b, "/ready")[0] == 200
    # A subscriber that never reads: its socket fills up, so the broker cannot finish it at
    # once and shutdown takes up to its grace period.
    stuck = raw(raws, b, V5)
    stuck.subscribe([("ops/flood", 0)])
    pub = raw(raws, b, V5)
    big = b"z" * 60000
    for _ in range(300):
        pub.publish("ops/flood", big, qos=0)
    pub.ping(timeout=10)
    b.proc.send_signal(signal.SIGTERM)
    statuses = []
    deadline = time.monotonic() + 10
    while b.proc.poll() is None and time.monotonic() < deadline:
        try:
            statuses.append(http_get(b, "/ready", timeout=1)[0])
        except (OSError, urllib.error.URLError):
            statuses.append(None)
        time.sleep(0.05)
    # The signal is handled asynchronously: a 200 may still come first, but once /ready has
    # said 503 it never says 200 again.
    assert 503 in statuses, statuses
    assert 200 not in statuses[statuses.index(503):], statuses
    b.proc.wait(timeout=10)
    assert b.proc.returncode == 0


# ---------------------------------------------------------------------------------------------
# 5. SIGHUP reloads the configuration file
# ---------------------------------------------------------------------------------------------
def write_config(b, overrides):
    """Rewrites b's config file: conftest's base sections with `overrides` merged over them."""
    sections = {
        "listeners.tcp": {"bind": "127.0.0.1:0"},
        "metrics": {"bind": "127.0.0.1:0"},
        "storage": {"dir": os.path.join(b.tmp.name, "data")},
        "auth": {"allow_anonymous": True},
        "log": {"level": "info"},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    text = ""
    for section, values in sections.items():
        text += f"[{section}]\n"
        for k, v in values.items():
            text += f"{k} = {_toml_value(v)}\n"
    write_atomic(b.config_path, text)


def reload(b, overrides=None, text=None):
    """Rewrites the config (or writes `text`) and sends SIGHUP; returns the log position."""
    mark = len(b.log_lines)
    if text is not None:
        write_atomic(b.config_path, text)
    else:
        write_config(b, overrides or {})
    b.proc.send_signal(signal.SIGHUP)
    return mark


def wait_line(b, pred, since=0, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        for line in b.log_lines[since:]:
            if pred(line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError("no such log line:\n" + "".join(b.log_lines[since:]))
        time.sleep(0.02)


def level_of(line):
    m = re.search(r"\b(TRACE|DEBUG|INFO|WARN|ERROR)\b", line)
    return m.group(1) if m else None


def reload_line(key):
    return lambda line: "reload:" in line and key in line


def connack_mps(b, raws):
    c = raw(raws, b, V5)
    return c, c.connack.props.get(mr.MAXIMUM_PACKET_SIZE)


def test_reload_max_packet_size_applies_to_new_connections(make_broker, mk, raws):
    """limits.max_packet_size 1048576 -> 2000 on SIGHUP: logged at info, announced in the
    CONNACK of connections made afterwards (raw and paho) and enforced on them; connections
    made before keep the 1 MiB their CONNACK announced and stay up."""
    b = make_broker()
    old5, mps = connack_mps(b, raws)
    assert mps == 1048576
    old3 = raw(raws, b, V311)
    assert old5.subscribe([("ops/big/#", 1)]).codes == [1]

    mark = reload(b, {"limits": {"max_packet_size": 2000}})
    line = wait_line(b, reload_line("limits.max_packet_size"), mark)
    assert "2000" in line and "1048576" in line and level_of(line) == "INFO", line

    new5, mps = connack_mps(b, raws)
    assert mps == 2000
    pc = mk("paho-new", broker=b)
    _, _, cprops = pc.connect()
    assert cprops.MaximumPacketSize == 2000
    new3 = raw(raws, b, V311)

    # The old connections still take 5000-byte packets ...
    assert old5.publish("ops/big/5", b"a" * 5000, qos=1, pid=1).rc == 0
    assert old3.publish("ops/big/3", b"b" * 5000, qos=1, pid=1).rc == 0
    got = set()
    for _ in range(2):
        p, _ = old5.recv_until(lambda p: p.type == PUBLISH)
        old5.ack_publish(p)
        got.add((p.topic, len(p.payload)))
    assert got == {("ops/big/5", 5000), ("ops/big/3", 5000)}
    # ... the new ones are held to 2000 (v5: DISCONNECT 0x95; 3.1.1: closed).
    new5.send(mr.publish("ops/big/x", b"c" * 5000, qos=1, pid=1, version=V5))
    pkts, closed = new5.wait_closed(5)
    assert closed and [(p.type, p.rc) for p in pkts] == [(DISCONNECT, 0x95)], pkts
    new3.send(mr.publish("ops/big/x", b"d" * 5000, qos=1, pid=1))
    pkts, closed = new3.wait_closed(5)
    assert closed and not pkts, pkts
    for c in (old5, old3):
        assert c.ping().type == mr.PINGRESP
    # A packet just under the new limit is fine on a new connection.
    assert raw(raws, b, V5).publish("ops/big/ok", b"e" * 1500, qos=1, pid=1).rc == 0


ACL_ONE = "user alice\ntopic readwrite ops/#\nuser bob\ntopic read ops/#\n"
ACL_TWO = "user alice\ntopic readwrite ops/#\nuser bob\ntopic readwrite ops/#\n"


def test_reload_switches_acl_file(make_broker, raws, tmp_path):
    """[auth] acl_file pointed at another file: a connected client's rights change without
    reconnecting it, and nobody is disconnected."""
    passwd = tmp_path / "passwd"
    tern_passwd(passwd, "alice", "alice-pw")
    tern_passwd(passwd, "bob", "bob-pw")
    acl1, acl2 = tmp_path / "acl1", tmp_path / "acl2"
    acl1.write_text(ACL_ONE)
    acl2.write_text(ACL_TWO)
    auth = {"allow_anonymous": False, "password_file": str(passwd), "acl_file": str(acl1)}
    b = make_broker({"auth": auth})
    alice = raw(raws, b, V5, username="alice", password="alice-pw")
    assert alice.subscribe([("ops/#", 1)]).codes == [1]
    bob = raw(raws, b, V5, username="bob", password="bob-pw")
    assert bob.publish("ops/x", b"denied", qos=1, pid=1).rc == 0x87
    alice.assert_silent(0.3)

    mark = reload(b, {"auth": dict(auth, acl_file=str(acl2))})
    line = wait_line(b, reload_line("auth.acl_file"), mark)
    assert level_of(line) == "INFO", line

    assert bob.publish("ops/x", b"allowed", qos=1, pid=2).rc == 0
    p, _ = alice.recv_until(lambda p: p.type == PUBLISH)
    assert (p.topic, p.payload) == ("ops/x", b"allowed")
    alice.ack_publish(p)
    for c in (alice, bob):
        assert c.ping().type == mr.PINGRESP


def shared_group_cycle(b, raws):
    """Something that logs at debug in Tern: a shared subscription group that ends."""
    c = raw(raws, b, V5)
    c.subscribe([("$share/opsdbg/ops/dbg", 1)])
    c.publish("ops/dbg", b"x", qos=1, pid=1)
    p, _ = c.recv_until(lambda p: p.type == PUBLISH)
    c.ack_publish(p)
    c.unsubscribe(["$share/opsdbg/ops/dbg"])
    c.disconnect()


def test_reload_log_level(make_broker, raws):
    b = make_broker()
    shared_group_cycle(b, raws)
    time.sleep(0.3)
    assert not [x for x in b.log_lines if level_of(x) == "DEBUG"], b.log()

    mark = reload(b, {"log": {"level": "debug"}})
    line = wait_line(b, reload_line("log.level"), mark)
    assert "debug" in line and level_of(line) == "INFO", line
    shared_group_cycle(b, raws)
    wait_line(b, lambda x: level_of(x) == "DEBUG", mark)


def test_reload_warns_about_keys_that_need_a_restart(make_broker, raws):
    """Keys that need a restart are logged at warn (key name and "restart") and not applied;
    a reloadable key in the same file still is."""
    b = make_broker()
    mark = reload(b, {
        "mqtt": {"max_qos": 1},
        "storage": {"durability": "fsync"},
        "log": {"format": "json"},
        "shared": {"strategy": "random"},
        "limits": {"max_packet_size": 3000},
    })
    wait_line(b, reload_line("limits.max_packet_size"), mark)
    for key in ("mqtt.max_qos", "storage.durability", "log.format", "shared.strategy"):
        line = wait_line(b, lambda x, k=key: k in x and "restart" in x, mark)
        assert level_of(line) == "WARN", line
    c, mps = connack_mps(b, raws)
    assert mps == 3000
    assert mr.MAXIMUM_QOS not in c.connack.props, c.connack  # still QoS 2
    assert c.subscribe([("ops/q2", 2)]).codes == [2]
    # The log format did not change either: the new connection's line is text.
    line = wait_line(b, lambda x: "client connected" in x, mark)
    assert not line.lstrip().startswith("{"), line


def test_reload_rejects_an_invalid_config(make_broker, raws):
    """An invalid file is rejected as a whole ("reload rejected" naming the key, at error);
    the broker goes on with the old configuration; a later valid file is applied."""
    b = make_broker()
    mark = reload(b, {"limits": {"max_packet_size": 10}, "auth": {"allow_anonymous": False}})
    line = wait_line(b, lambda x: "reload rejected" in x, mark)
    assert "limits.max_packet_size" in line and level_of(line) == "ERROR", line
    time.sleep(0.2)
    assert b.alive()
    c, mps = connack_mps(b, raws)  # anonymous still allowed, old packet size
    assert mps == 1048576
    assert not [x for x in b.log_lines[mark:] if "reload:" in x], b.log_lines[mark:]

    mark = reload(b, text="[limits\nmax_packet_size = 3000\n")
    wait_line(b, lambda x: "reload rejected" in x, mark)
    mark = reload(b, {"limits": {"max_packet_sise": 3000}})
    line = wait_line(b, lambda x: "reload rejected" in x, mark)
    assert "max_packet_sise" in line, line
    assert connack_mps(b, raws)[1] == 1048576

    mark = reload(b, {"limits": {"max_packet_size": 4000}})
    wait_line(b, reload_line("limits.max_packet_size"), mark)
    assert connack_mps(b, raws)[1] == 4000
    assert c.ping().type == mr.PINGRESP


def test_sighup_right_after_the_ready_line_reloads(make_broker, raws):
    """The signal handlers are in place before the ready line is printed: a SIGHUP sent the
    moment it appears is a reload, not the default action (which kills the process)."""
    for _ in range(5):
        b = make_broker()
        mark = reload(b, {"limits": {"max_packet_size": 4000}})
        wait_line(b, reload_line("limits.max_packet_size"), mark)
        assert b.alive()
        assert connack_mps(b, raws)[1] == 4000


def test_reload_sys_interval_and_allow_anonymous(make_broker, mk, raws):
    b = make_broker({"sys_topics": {"interval": 0}})
    c = mk("sys", broker=b)
    c.connect()
    assert c.subscribe("$SYS/#", 0) == [0]
    c.expect_none(1.2)

    mark = reload(b, {"sys_topics": {"interval": 1}})
    wait_line(b, reload_line("sys_topics.interval"), mark)
    m = c.get(timeout=3.5)
    assert m.topic.startswith("$SYS/broker/"), m.topic

    mark = reload(b, {"sys_topics": {"interval": 1}, "auth": {"allow_anonymous": False}})
    wait_line(b, reload_line("auth.allow_anonymous"), mark)
    for version, rc in ((V5, 0x87), (V311, 5)):
        r = mr.Client.to(b, version)
        raws.append(r)
        r.connect(uid("anon"), expect_rc=rc)


def gen_certs(out_dir):
    r = subprocess.run(["bash", os.path.join(ROOT, "certs", "gen.sh"), str(out_dir)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    assert r.returncode == 0, r.stdout.decode("utf-8", "replace")
    return {n: str(out_dir / n) for n in ("ca.pem", "server.pem", "server.key")}


def test_reload_switches_tls_certificate_files(make_broker, mk, tmp_path):
    """listeners.tls.cert / key pointed at another certificate (another CA): new handshakes
    present it (a client trusting only the old CA fails, counted as a failed handshake), a
    TLS connection made before stays up."""
    old, new = gen_certs(tmp_path / "old"), gen_certs(tmp_path / "new")
    tls = {"bind": "127.0.0.1:0", "cert": old["server.pem"], "key": old["server.key"]}
    b = make_broker({"listeners.tls": tls})
    line = wait_line(b, lambda x: "tls=" in x and "tern: ready" in x)
    tls_ep = types.SimpleNamespace(host="127.0.0.1", metrics_port=b.metrics_port,
                                   port=int(re.search(r"tls=\S+:(\d+)", line).group(1)))

    def tls_client(name, ca):
        c = mk(name, broker=tls_ep)
        c.c.tls_set(ca_certs=ca)
        return c

    before = tls_client("before", old["ca.pem"])
    before.connect()
    assert before.subscribe("ops/tls", 1) == [1]
    s0 = scrape(b)

    mark = reload(b, {"listeners.tls": dict(tls, cert=new["server.pem"],
                                            key=new["server.key"])})
    for key in ("listeners.tls.cert", "listeners.tls.key"):
        line = wait_line(b, reload_line(key), mark)
        assert level_of(line) == "INFO", line
    assert not [x for x in b.log_lines[mark:] if level_of(x) == "WARN"], b.log_lines[mark:]

    after = tls_client("after", new["ca.pem"])
    after.connect()
    stale = tls_client("stale", old["ca.pem"])
    with pytest.raises(ssl.SSLCertVerificationError):
        stale.connect(expect_rc=None)
    after.publish("ops/tls", b"via-new-cert", qos=1)
    m = before.get()
    assert (m.topic, m.payload) == ("ops/tls", b"via-new-cert")
    wait_series(b, [("tern_tls_handshakes_total", {"result": "ok"}, 1),
                    ("tern_tls_handshakes_total", {"result": "failed"}, 1)], base=s0)


# ---------------------------------------------------------------------------------------------
# 6. tern check
# ---------------------------------------------------------------------------------------------
def tern_check(tmp_path, text):
    cfg = tmp_path / "check.toml"
    cfg.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERN__")}
    r = subprocess.run([TERN_BIN, "check", "--config", str(cfg)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=30, env=env)
    return r.returncode, r.stdout.decode("utf-8", "replace")


def test_check_accepts_a_valid_config(tmp_path):
    code, out = tern_check(tmp_path, (
        '[listeners.tcp]\nbind = "127.0.0.1:0"\n[metrics]\nbind = "127.0.0.1:0"\n'
        f'[storage]\ndir = "{tmp_path / "data"}"\n'
        '[log]\nlevel = "info"\nformat = "json"\n[sys_topics]\ninterval = 5\n'))
    assert code == 0, out
    assert "configuration OK" in out, out
    assert not (tmp_path / "data").exists(), "check must not open the store"


def test_check_reads_the_files_the_config_names(tmp_path):
    """A configuration naming an ACL file that does not exist is not OK."""
    missing = tmp_path / "no-such-acl"
    code, out = tern_check(tmp_path, f'[auth]\nacl_file = "{missing}"\n')
    assert code != 0, out
    assert "configuration OK" not in out and str(missing) in out, out


@pytest.mark.parametrize("text,key", [
    ("[limits]\nmax_packet_size = 10\n", "limits.max_packet_size"),
    ("[sys_topics]\ninterval = -1\n", "sys_topics.interval"),
    ('[sys_topics]\ninterval = "often"\n', "sys_topics.interval"),
    ('[log]\nformat = "xml"\n', "log.format"),
    ("[limits]\nmax_packet_sise = 2000\n", "max_packet_sise"),
    ("[sys_topics]\nintervall = 1\n", "intervall"),
], ids=["bad-packet-size", "negative-interval", "string-interval", "bad-format",
        "unknown-limit", "unknown-sys-key"])
def test_check_names_the_offending_key(tmp_path, text, key):
    code, out = tern_check(tmp_path, text)
    assert code != 0, out
    assert "configuration OK" not in out, out
    assert key in out, out
