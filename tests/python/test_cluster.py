"""Tern's cluster mode: Tern nodes sharing one NATS JetStream cluster of three nats-servers
(conftest fixtures `nats_cluster`, `tern_cluster`; helpers in cluster.py).

What a cluster promises, each checked from real clients (paho-mqtt through pahoutil, and
mosquitto_pub / mosquitto_sub), in MQTT 3.1.1 and 5.0 where the behaviour is the same (test ids
end in [v311] / [v5]):
  1. a message published on any node reaches the matching subscribers on every node, one copy per
     session at the highest granted QoS capped by the publish QoS (and a 5.0 publisher is not
     told 0x10 No matching subscribers when only other nodes' subscribers match);
  2. retained messages are the same from every node, including a node started later with an empty
     data directory;
  3. a ClientId is unique cluster-wide: connecting it on another node closes the old connection;
  4. without a JetStream quorum (two of three nats-servers down) a QoS 1 publish is never
     acknowledged as a success, and it is again once the servers are back;
  5. losing one nats-server of three keeps every acknowledged QoS 1 message.

Subscriptions reach the other nodes through NATS asynchronously, so before a test publishes
what it checks it waits until a probe message published the same way has arrived everywhere
(wait_routes); the probes are drained before the real messages. Every wait is bounded.

test_nats_cluster_harness checks the NATS side alone (it needs no Tern cluster mode).
"""
import collections
import json
import queue
import shutil
import subprocess
import threading
import time

import pytest

from cluster import NatsClient
from pahoutil import V311, V5, metric, mqtt
from pahoutil import closed_by_server, take_all

VERSIONS = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]
# quorum_timeout of the nodes in these tests: how long a QoS >= 1 publish waits for JetStream.
QUORUM_TIMEOUT = 2
# How long a subscription, a retained message or a takeover may take to reach the other nodes.
PROPAGATION = 10.0

needs_mosquitto = pytest.mark.skipif(
    not (shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub")),
    reason="mosquitto-clients not installed (make clients)")


@pytest.fixture(params=VERSIONS)
def version(request):
    return request.param


def pick(version, v311, v5):
    return v5 if version == V5 else v311


def connected(mkc, name, version, node, **kw):
    c = mkc(name, version, broker=node, **kw)
    c.connect()
    return c


def closed_by(c, timeout=PROPAGATION):
    return closed_by_server(c, timeout)


def is_probe(m):
    return m.payload.startswith(b"probe-")


def collect(sub, want, timeout, key=lambda m: m.payload):
    """The non-probe messages `sub` receives until every key in `want` has come or `timeout`
    seconds have passed, as a Counter of their keys (duplicates counted)."""
    counts = collections.Counter()
    deadline = time.monotonic() + timeout
    while not want <= set(counts) and time.monotonic() < deadline:
        try:
            m = sub.messages.get(timeout=0.5)
        except queue.Empty:
            continue
        if not is_probe(m):
            counts[key(m)] += 1
    return counts


def wait_routes(pubs, subs, topic, qos=(0, 1), timeout=PROPAGATION):
    """Publish probe messages on `topic` from each client in `pubs`, with each QoS in `qos`,
    until every client in `subs` has received one from each; then drain the subscribers (late
    probe copies included). Returns the seconds it took."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    k = 0
    for p in pubs:
        for q in qos:
            pending = set(range(len(subs)))
            sent = set()
            while pending:
                assert time.monotonic() < deadline, (
                    f"probe {topic} from {p.client_id} at QoS {q} did not reach "
                    f"{[subs[i].client_id for i in sorted(pending)]} within {timeout}s")
                k += 1
                payload = f"probe-{k}".encode()
                sent.add(payload)
                rc = p.publish(topic, payload, qos=q, timeout=QUORUM_TIMEOUT + 5)
                # 0x10 (No matching subscribers, 5.0) while the subscriptions are on their way.
                assert rc in (0, 0x10), f"probe publish at QoS {q}: reason code {rc:#x}"
                poll_end = time.monotonic() + 0.5
                while pending and time.monotonic() < poll_end:
                    for i in sorted(pending):
                        got = take_all(subs[i])
                        stray = [m for m in got if not is_probe(m)]
                        assert not stray, [(m.topic, m.payload) for m in stray]
                        if any(m.payload in sent for m in got):
                            pending.discard(i)
                    time.sleep(0.02)
    for s in subs:
        stray = [m for m in s.drain(0.4) if not is_probe(m)]
        assert not stray, [(m.topic, m.payload) for m in stray]
    took = time.monotonic() - t0
    print(f"wait_routes {topic}: {k} probes, {took:.2f}s")
    return took


def wait_ack(c, mid, timeout):
    """The reason code of the PUBACK for `mid` (0 = success), or None when the connection closed
    first or nothing came within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with c._lock:
            if mid in c._pubacks:
                return c._pubacks.pop(mid)
        if not c.disconnects.empty():
            return None
        time.sleep(0.005)
    return None


# --------------------------------------------------------------------------- harness


def test_nats_cluster_harness(nats_cluster):
    """The NATS side alone: three servers routed to each other with a JetStream meta leader; an R3
    stream stores with replicas; killing the meta leader leaves two healthy servers that elect
    another and keep storing; the killed server comes back with its store and catches up; with
    two of three stopped nothing is stored, after they come back it is again."""
    nats = nats_cluster
    names = {s.name for s in nats.servers}
    leader = nats.wait_healthy()
    assert leader in names
    for i in range(3):
        assert nats.health(i) is None
        routez = nats.servers[i].get_json("/routez")
        assert {r.get("remote_name") for r in routez["routes"]} == names - {nats.servers[i].name}

    def store(i, subject, timeout=15.0):
        """Publish to the stream through server i until JetStream acknowledges; its sequence."""
        deadline = time.monotonic() + timeout
        with NatsClient(nats.url(i)) as nc:
            while time.monotonic() < deadline:
                r = nc.request(subject, b"x", timeout=1.0)
                if r is not None and b'"seq"' in r[1]:
                    ack = json.loads(r[1])
                    assert ack["stream"] == "HARNESS", ack
                    return ack["seq"]
                time.sleep(0.1)  # a 503 (no responders) while the stream elects its leader
        raise AssertionError(f"nothing stored through {nats.servers[i].name} in {timeout}s")

    with NatsClient(nats.url(0)) as nc:
        r = nc.js("STREAM.CREATE.HARNESS", {"name": "HARNESS", "subjects": ["harness.>"],
                                            "num_replicas": 3, "storage": "file"})
        assert r is not None and "error" not in r, r
        assert r["config"]["num_replicas"] == 3
    assert store(0, "harness.a") == 1

    victim = int(leader[1:]) - 1
    nats.kill(victim)
    rest = [i for i in range(3) if i != victim]
    assert nats.running() == rest
    new_leader = nats.wait_healthy()
    assert new_leader != leader and new_leader in names
    # An attempt that timed out may have been stored all the same: seq 2 or more.
    last = store(rest[0], "harness.b")
    assert last >= 2

    nats.start(victim)
    assert sorted(nats.running()) == [0, 1, 2]
    deadline = time.monotonic() + 15
    msgs = None
    while time.monotonic() < deadline:
        jsz = nats.servers[victim].get_json("/jsz?streams=true") or {}
        details = [s for a in jsz.get("account_details") or []
                   for s in a.get("stream_detail") or []]
        msgs = [s["state"]["messages"] for s in details if s["name"] == "HARNESS"]
        if msgs == [last]:
            break
        time.sleep(0.1)
    assert msgs == [last], f"{leader} after restart: HARNESS messages {msgs}, expected {last}"

    # Two of three stopped: no quorum, nothing acknowledged.
    stop = [i for i in range(3) if i != rest[0]]
    for i in stop:
        nats.stop(i)
    with NatsClient(nats.url(rest[0])) as nc:
        r = nc.request("harness.c", b"x", timeout=QUORUM_TIMEOUT)
        assert r is None or b'"seq"' not in r[1], r
    for i in stop:
        nats.start(i, wait=False)
    nats.wait_healthy()
    assert store(rest[0], "harness.d") > last


# --------------------------------------------------------------------------- 1. delivery


def test_cross_node_delivery(tern_cluster, mkc, version):
    """A message published on any node reaches the matching subscriber on every node, with
    wildcards, at min(publish QoS, granted QoS): QoS 0 over core NATS, QoS 1 and 2 through
    JetStream (PUBACK / PUBCOMP success). Non-matching topics reach nobody; nothing twice."""
    nodes = tern_cluster(3, quorum_timeout=QUORUM_TIMEOUT)
    plan = [("x/+/t", 2), ("x/#", 1), ("x/a/t", 0)]  # subscriber on node k: filter, QoS
    subs = []
    for k, (node, (flt, q)) in enumerate(zip(nodes, plan)):
        s = connected(mkc, f"s{k + 1}", version, node)
        assert s.subscribe(flt, q) == [q]
        subs.append(s)
    pubs = [connected(mkc, f"p{k + 1}", version, node) for k, node in enumerate(nodes)]
    wait_routes(pubs, subs, "x/a/t")
    for k, p in enumerate(pubs):
        for q in (0, 1, 2):
            rc = p.publish("x/a/t", f"{k + 1}-{q}".encode(), qos=q, timeout=QUORUM_TIMEOUT + 5)
            assert rc == 0, (k, q, rc)  # QoS 0: paho's own 0; 1, 2: PUBACK / PUBCOMP
        # 5.0 may say 0x10 No matching subscribers: there are none, on any node.
        rc = p.publish("y/a/t", b"nobody", qos=1, timeout=QUORUM_TIMEOUT + 5)
        assert rc in (0, 0x10), rc
    for s, (flt, g) in zip(subs, plan):
        got = s.get_n(9, timeout=PROPAGATION)
        seen = sorted((m.topic, m.payload.decode(), m.qos, m.retain) for m in got)
        want = sorted(("x/a/t", f"{k}-{q}", min(q, g), False) for k in (1, 2, 3) for q in (0, 1, 2))
        assert seen == want, f"{s.client_id} ({flt}, QoS {g})"
    # Only remote subscribers match (x/b/t: s1 on t1, s2 on t2; s3's x/a/t does not). The
    # reason code is test_v5_puback_success_when_only_other_nodes_subscribe's business.
    rc = pubs[2].publish("x/b/t", b"remote-only", qos=1, timeout=QUORUM_TIMEOUT + 5)
    assert rc in (0, 0x10), rc
    for s, (flt, g) in zip(subs[:2], plan[:2]):
        m = s.get(PROPAGATION)
        assert (m.topic, m.payload, m.qos) == ("x/b/t", b"remote-only", 1), s.client_id
    for s in subs:
        s.expect_none(1.0)


def test_v5_puback_success_when_only_other_nodes_subscribe(tern_cluster, mkc):
    """A 5.0 publisher whose message only subscribers on other nodes match gets PUBACK 0x00
    Success: its node cannot know there are no matching subscribers anywhere, so it must not say
    0x10 (5.0 allows 0x10 only "if the Server knows that there are no matching subscribers")."""
    n1, n2, n3 = tern_cluster(3, quorum_timeout=QUORUM_TIMEOUT)
    sub = connected(mkc, "sub", V5, n2)
    assert sub.subscribe("ro/#", 1) == [1]
    pub = connected(mkc, "pub", V5, n1)
    wait_routes([pub], [sub], "ro/probe", qos=(1,))
    rcs = [pub.publish("ro/t", f"m{i}".encode(), qos=1, timeout=QUORUM_TIMEOUT + 5)
           for i in range(5)]
    got = sub.get_n(5, timeout=PROPAGATION)
    assert sorted(m.payload for m in got) == [f"m{i}".encode() for i in range(5)]
    assert rcs == [0] * 5, f"PUBACK reason codes {[hex(rc) for rc in rcs]} (t2 subscribes)"


def test_qos1_fast_copies_and_the_stream_deliver_once(tern_cluster, mkc, version):
    """QoS 1 reaches other nodes' clean sessions through a core NATS copy as well as the
    stream (docs/cluster.md, fast path); every subscriber still gets every message once and
    in order: from t1, which sends no fast copies (cluster.fast_path = false: every stream
    copy arrives alone, as when a fast copy is lost), from t3, which does, and QoS 2 from t3,
    which never has one. A clean and a persistent subscriber on t2."""
    (t1,) = tern_cluster(1, quorum_timeout=QUORUM_TIMEOUT, fast_path=False)
    t2, t3 = tern_cluster(2, quorum_timeout=QUORUM_TIMEOUT)
    clean = connected(mkc, "clean", version, t2)
    assert clean.subscribe("fp/#", 2) == [2]
    durable = connected(mkc, "durable", version, t2, persistent=True)
    assert durable.subscribe("fp/#", 2) == [2]
    p1 = connected(mkc, "p1", version, t1)
    p3 = connected(mkc, "p3", version, t3)
    wait_routes([p1, p3], [clean, durable], "fp/probe", qos=(1,))
    fast_out = [metric(n, "tern_cluster_messages_total", {"direction": "out", "path": "fast"})
                for n in (t1, t3)]
    n = 150
    plan = [(p1, "fp/a", 1), (p3, "fp/b", 1), (p3, "fp/c", 2)]
    mids = []
    for i in range(n):
        for p, topic, q in plan:
            mids.append((p, p.publish(topic, f"{i}".encode(), qos=q, wait=False)))
    for p, mid in mids:
        p.wait_published(mid, timeout=QUORUM_TIMEOUT + 30)
    for c in (clean, durable):
        got = c.get_n(len(plan) * n, timeout=PROPAGATION + 15)
        per = collections.defaultdict(list)
        for m in got:
            per[m.topic].append(int(m.payload))
        for _, topic, _ in plan:
            assert per[topic] == list(range(n)), f"{c.client_id}: {topic} not once each, in order"
        c.expect_none(1.0)
    sent = [metric(node, "tern_cluster_messages_total", {"direction": "out", "path": "fast"}) - f
            for node, f in zip((t1, t3), fast_out)]
    # t3 sends fast copies only while it keeps up (at most 64 messages waiting to leave).
    assert sent[0] == 0 and 0 < sent[1] <= n, f"fast copies sent by t1 (fast_path off), t3: {sent}"
    assert metric(t2, "tern_cluster_messages_total", {"direction": "in", "path": "fast"}) > 0


def test_early_deliveries_are_kept_until_acknowledged(tern_cluster, mkc, version):
    """A persistent session on t2 gets t1's QoS 1 messages from their fast copies, before t2
    has stored them (docs/cluster.md, "Early deliveries"); each is stored when its stream
    copy comes, unless the client acknowledged it first. The oracle is a restart of t2:
    what the client acknowledged does not come back (no entry left behind), what it did not
    acknowledge does, in order."""
    t1, t2 = tern_cluster(2, quorum_timeout=QUORUM_TIMEOUT)
    sub = connected(mkc, "early", version, t2, persistent=True)
    assert sub.subscribe("early/#", 1) == [1]
    pub = connected(mkc, "early-pub", version, t1)
    wait_routes([pub], [sub], "early/probe", qos=(1,))

    def publish(tag, n):
        # One at a time: a node sends fast copies only while few messages wait to leave it.
        for i in range(n):
            rc = pub.publish("early/a", f"{tag}{i}".encode(), qos=1, timeout=QUORUM_TIMEOUT + 5)
            assert rc == 0, f"{tag}{i}: reason code {rc:#x}"

    def restart_t2():
        # Stream copies come about a millisecond after their fast copies: let every one of
        # them be stored (or find its delivery acknowledged) before t2 stops.
        time.sleep(2.0)
        t2.stop()
        t2.start()

    n = 200
    early0 = metric(t2, "tern_cluster_early_deliveries_total")
    publish("acked-", n)
    got = sub.get_n(n, timeout=PROPAGATION + 15)
    assert [m.payload.decode() for m in got] == [f"acked-{i}" for i in range(n)]
    early = metric(t2, "tern_cluster_early_deliveries_total") - early0
    assert early > 0, "no early delivery was made: the test would not test them"
    sub.disconnect()
    restart_t2()
    back = mkc.again(sub)
    assert back.connect()[1], "session present after the restart"
    back.expect_none(3.0)

    # Received and not acknowledged: all of them come again after the restart.
    back.disconnect()
    lazy = mkc.again(sub, manual_ack=True)
    lazy.connect()
    early0 = metric(t2, "tern_cluster_early_deliveries_total")
    publish("unacked-", n)
    got = lazy.get_n(n, timeout=PROPAGATION + 15)
    assert [m.payload.decode() for m in got] == [f"unacked-{i}" for i in range(n)]
    assert metric(t2, "tern_cluster_early_deliveries_total") > early0
    lazy.drop()
    restart_t2()
    again = mkc.again(sub)
    assert again.connect()[1]
    got = again.get_n(n, timeout=PROPAGATION + 15)
    assert [m.payload.decode() for m in got] == [f"unacked-{i}" for i in range(n)]
    again.expect_none(1.0)
    print(f"early deliveries: {early} of {n} acknowledged ones")


def test_overlapping_filters_one_copy_per_session(tern_cluster, mkc, version):
    """A session whose filters overlap gets one copy of a message from another node (and from
    its own: the local delivery and the cluster path must not both deliver), at the highest QoS
    granted among the matching filters, capped by the publish QoS."""
    n1, n2, n3 = tern_cluster(3, quorum_timeout=QUORUM_TIMEOUT)
    plan = {
        "local": (n1, [("o/#", 2), ("o/y/z", 0)]),
        "remote2": (n2, [("o/#", 0), ("o/+/z", 2), ("o/y/z", 1)]),
        "remote3": (n3, [("o/y/+", 0), ("o/+/z", 1)]),
    }
    subs = {}
    for name, (node, filters) in plan.items():
        s = connected(mkc, name, version, node)
        assert s.subscribe(filters) == [q for _, q in filters]
        subs[name] = s
    pub = connected(mkc, "pub", version, n1)
    wait_routes([pub], list(subs.values()), "o/y/z")
    sends = [("o/y/z", 0), ("o/y/z", 1), ("o/y/z", 2), ("o/k/z", 1), ("o/y", 2), ("o/y/z/w", 2)]
    for i, (topic, q) in enumerate(sends):
        assert pub.publish(topic, f"m{i}".encode(), qos=q, timeout=QUORUM_TIMEOUT + 5) == 0

    def best(filters, topic, q):
        granted = [g for f, g in filters if mqtt.topic_matches_sub(f, topic)]
        return min(max(granted), q) if granted else None

    for name, (node, filters) in plan.items():
        want = sorted((t, f"m{i}", best(filters, t, q)) for i, (t, q) in enumerate(sends)
                      if best(filters, t, q) is not None)
        got = subs[name].get_n(len(want), timeout=PROPAGATION)
        subs[name].expect_none(1.0)
        assert sorted((m.topic, m.payload.decode(), m.qos) for m in got) == want, name


class MosqSub:
    """A running mosquitto_sub printing "MSG|topic|qos|retain|payload" lines into a queue."""

    def __init__(self, node, version, client_id, topics, qos):
        cmd = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(node.port), "-V", version,
               "-i", client_id, "-q", str(qos), "-d", "-F", "MSG|%t|%q|%r|%p", "-W", "60"]
        if shutil.which("stdbuf"):
            cmd = ["stdbuf", "-oL"] + cmd
        for t in topics:
            cmd += ["-t", t]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.lines = queue.Queue()
        self.all = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.wait_for(lambda line: "received SUBACK" in line, "SUBACK")

    def _pump(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.all.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pred, what, timeout=PROPAGATION):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"mosquitto_sub: no {what} within {timeout}s:\n" + "\n".join(self.all)
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"mosquitto_sub exited before {what}:\n" + "\n".join(self.all)
            if pred(line):
                return line

    def messages(self, n, timeout=PROPAGATION):
        """The next n MSG lines that are not probes, as (topic, qos, retain, payload)."""
        out = []
        while len(out) < n:
            line = self.wait_for(lambda l: l.startswith("MSG|") and "|probe-" not in l,
                                 f"{n} messages (got {out})", timeout)
            out.append(tuple(line.split("|", 4)[1:]))
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@needs_mosquitto
def test_cross_node_with_mosquitto_clients(tern_cluster, mkc):
    """Third-party clients across nodes: mosquitto_pub (3.1.1 and 5.0) on node 1,
    mosquitto_sub 5.0 on node 3 and 3.1.1 on node 2, each exactly once at the expected QoS."""
    n1, n2, n3 = tern_cluster(3, quorum_timeout=QUORUM_TIMEOUT)
    sub5 = MosqSub(n3, "mqttv5", "mq-sub5", ["mq/#"], qos=1)
    sub311 = MosqSub(n2, "mqttv311", "mq-sub311", ["mq/+/r"], qos=2)
    try:
        probe = connected(mkc, "probe", V5, n1)
        deadline = time.monotonic() + PROPAGATION
        for q in (0, 1):
            seen = {id(sub5): False, id(sub311): False}
            k = 0
            while not all(seen.values()):
                assert time.monotonic() < deadline, "probes did not reach mosquitto_sub:\n" + \
                    "\n".join(sub5.all + sub311.all)
                k += 1
                probe.publish("mq/p/r", f"probe-{q}-{k}".encode(), qos=q,
                              timeout=QUORUM_TIMEOUT + 5)
                time.sleep(0.15)
                for s in (sub5, sub311):
                    while True:
                        try:
                            line = s.lines.get_nowait()
                        except queue.Empty:
                            break
                        if line and line.startswith("MSG|mq/p/r|") and f"|probe-{q}-" in line:
                            seen[id(s)] = True
        for version, q, topic, payload in (("mqttv311", 1, "mq/a/r", "hello-311"),
                                           ("mqttv5", 2, "mq/b/r", "hello-5")):
            r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(n1.port), "-V",
                                version, "-i", f"mq-pub-{q}", "-q", str(q), "-t", topic,
                                "-m", payload], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=QUORUM_TIMEOUT + 10)
            assert r.returncode == 0, r.stdout.decode("utf-8", "replace")
        assert sorted(sub5.messages(2)) == [("mq/a/r", "1", "0", "hello-311"),
                                            ("mq/b/r", "1", "0", "hello-5")]
        assert sorted(sub311.messages(2)) == [("mq/a/r", "1", "0", "hello-311"),
                                              ("mq/b/r", "2", "0", "hello-5")]
        time.sleep(1.0)
        for s in (sub5, sub311):
            extra = []
            while not s.lines.empty():
                line = s.lines.get_nowait()
                if line and line.startswith("MSG|") and "|probe-" not in line:
                    extra.append(line)
            assert not extra, extra
    finally:
        sub5.stop()
        sub311.stop()


# --------------------------------------------------------------------------- 2. retained


def retained_on(mkc, version, node, flt, tag):
    """{topic: payload} of the retained messages a new subscriber to `flt` on `node` gets."""
    c = connected(mkc, tag, version, node)
    assert c.subscribe(flt, 1) == [1]
    got = c.drain(0.6)
    c.disconnect()
    # A message published just before may also arrive live (retain 0) from the other node's
    # stream after the subscription is in place: not a retained message, not counted here.
    live = [(m.topic, m.payload) for m in got if not m.retain]
    if live:
        print(f"retained_on {node.node}: also live {live}")
    retained = [m for m in got if m.retain]
    out = {m.topic: m.payload for m in retained}
    assert len(out) == len(retained), [(m.topic, m.payload) for m in retained]  # no topic twice
    return out


def wait_retained(mkc, version, node, flt, want, timeout=PROPAGATION):
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        n += 1
        got = retained_on(mkc, version, node, flt, f"r-{node.node}-{n}-{time.monotonic_ns()}")
        if got == want:
            return
        assert time.monotonic() < deadline, f"retained on {node.node}: {got}, expected {want}"
        time.sleep(0.2)


def test_retained_is_the_same_on_every_node(tern_cluster, mkc, version):
    """Retained messages set on node 1 are there for new subscribers on nodes 2 and 3; replacing
    one on node 2 (QoS 0) and clearing one with an empty retained publish on node 3 take effect
    everywhere; a node started later with an empty data directory has them too."""
    n1, n2, n3 = tern_cluster(3, quorum_timeout=QUORUM_TIMEOUT)
    pub = connected(mkc, "pub", version, n1)
    # Nobody subscribes to r/... anywhere: 5.0 may say 0x10 No matching subscribers.
    assert pub.publish("r/a", b"one", qos=1, retain=True) in (0, 0x10)
    assert pub.publish("r/b", b"two", qos=1, retain=True) in (0, 0x10)
    assert pub.publish("r/c/d", b"three", qos=2, retain=True) in (0, 0x10)
    want = {"r/a": b"one", "r/b": b"two", "r/c/d": b"three"}
    for node in (n2, n3, n1):
        wait_retained(mkc, version, node, "r/#", want)
    assert retained_on(mkc, version, n2, "r/+", "plus") == {"r/a": b"one", "r/b": b"two"}

    p2 = connected(mkc, "p2", version, n2)
    p2.publish("r/b", b"deux", qos=0, retain=True)
    p3 = connected(mkc, "p3", version, n3)
    assert p3.publish("r/a", b"", qos=1, retain=True) in (0, 0x10)
    want = {"r/b": b"deux", "r/c/d": b"three"}
    for node in (n1, n2, n3):
        wait_retained(mkc, version, node, "r/#", want)

    n4 = tern_cluster.node("t4", quorum_timeout=QUORUM_TIMEOUT)
    assert n4.cluster_node == "t4"
    wait_retained(mkc, version, n4, "r/#", want)


# --------------------------------------------------------------------------- 3. client ids


def test_client_id_is_unique_across_nodes(tern_cluster, mkc, version):
    """A ClientId connecting on another node closes its connection on the node it was on (5.0:
    DISCONNECT 0x8E Session taken over; 3.1.1: closed), and the new connection stays and works;
    taking it back to the first node works the same way."""
    n1, n2, n3 = tern_cluster(3, quorum_timeout=QUORUM_TIMEOUT)
    first = connected(mkc, "dup", version, n1)
    assert first.subscribe("tk/first", 1) == [1]
    expected = pick(version, None, 0x8E)

    second = mkc("dup", version, broker=n2)
    assert second.client_id == first.client_id
    assert second.connect()[0] == 0
    assert closed_by(first) == expected

    third = mkc("dup", version, broker=n3)
    assert third.connect()[0] == 0
    assert closed_by(second) == expected

    back = mkc("dup", version, broker=n1)
    assert back.connect()[0] == 0
    assert closed_by(third) == expected

    # The last one stays: no node closes it afterwards (no takeover ping-pong) and it works.
    time.sleep(1.5)
    assert back.c.is_connected()
    assert first.disconnects.empty() and second.disconnects.empty() and third.disconnects.empty()
    watcher = connected(mkc, "watch", version, n2)
    assert back.subscribe("tk/x", 1) == [1]
    wait_routes([watcher], [back], "tk/x", qos=(1,))
    assert watcher.publish("tk/x", b"hi", qos=1) in (0, 0x10)
    m = back.get(PROPAGATION)
    assert (m.topic, m.payload) == ("tk/x", b"hi")
    assert back.c.is_connected()


# --------------------------------------------------------------------------- 4. no quorum


def test_no_quorum_qos1_is_never_acknowledged(tern_cluster, mkc, version):
    """replicas = 3 with two of the three nats-servers stopped: a QoS 1 publish is not
    acknowledged as a success. 5.0 gets PUBACK 0x83 after about quorum_timeout and stays
    connected; 3.1.1, which has no failure PUBACK, is disconnected without one. Once the servers
    are back, QoS 1 publishes are acknowledged and delivered across nodes again."""
    n1, n2, n3 = tern_cluster(3, quorum_timeout=QUORUM_TIMEOUT)
    nats = tern_cluster.nats
    sub = connected(mkc, "sub", version, n2)
    assert sub.subscribe("nq/#", 1) == [1]
    pub = connected(mkc, "pub", version, n1)
    wait_routes([pub], [sub], "nq/probe", qos=(1,))
    assert pub.publish("nq/t", b"before", qos=1, timeout=QUORUM_TIMEOUT + 5) in (0, 0x10)
    assert sub.get(PROPAGATION).payload == b"before"

    # n1 is seeded with server 0 first; servers 1 and 2 go. Whichever server n1's NATS client
    # ends up on, no stream has a quorum.
    nats.stop(1)
    nats.stop(2)
    limit = QUORUM_TIMEOUT + 6
    t0 = time.monotonic()
    if version == V5:
        mids = [pub.publish("nq/t", f"lost-{i}".encode(), qos=1, wait=False) for i in range(3)]
        rcs = [wait_ack(pub, mid, limit) for mid in mids]
        took = time.monotonic() - t0
        print(f"no quorum: PUBACKs {rcs} after {took:.2f}s")
        assert rcs == [0x83] * 3, f"PUBACK reason codes {rcs} (None: no PUBACK in {limit}s)"
        assert pub.c.is_connected()
    else:
        mid = pub.publish("nq/t", b"lost", qos=1, wait=False)
        rc = wait_ack(pub, mid, limit)
        took = time.monotonic() - t0
        print(f"no quorum: PUBACK {rc}, connection closed: {not pub.disconnects.empty()} "
              f"after {took:.2f}s")
        assert rc is None, f"3.1.1 publisher got PUBACK {rc} without a quorum"
        assert not pub.disconnects.empty(), f"3.1.1 publisher neither acked nor closed in {limit}s"
    # Not at once: the publish waits (retrying) for the quorum for quorum_timeout.
    assert QUORUM_TIMEOUT * 0.75 <= took <= QUORUM_TIMEOUT + 5, took
    # Once its heartbeat has failed for quorum_timeout the node counts itself cut off, and a
    # persistent session, whose state the cluster cannot keep now, is refused: 0x88 / 3.
    deadline = time.monotonic() + QUORUM_TIMEOUT + 10
    while metric(n2, "tern_cluster_available") != 0:
        assert time.monotonic() < deadline, "t2 still counts itself available without quorum"
        time.sleep(0.2)
    durable = mkc("nq-durable", version, broker=n2, persistent=True)
    # paho reports 3.1.1's return code 3 as 0x88 too.
    durable.connect(expect_rc=0x88, timeout=QUORUM_TIMEOUT + 10)

    nats.start(1, wait=False)
    nats.start(2, wait=False)
    nats.wait_healthy()
    # Tern's NATS clients reconnect and the stream elects a leader: QoS 1 works again.
    deadline = time.monotonic() + 30
    attempt = 0
    acked = None
    p = pub
    while acked is None:
        assert time.monotonic() < deadline, "QoS 1 publishes not acknowledged 30s after recovery"
        attempt += 1
        if p is None or not p.c.is_connected():
            # 3.1.1: a new connection (CONNECT may be refused while the cluster recovers).
            p = mkc(f"pub-again-{attempt}", version, broker=n1)
            try:
                p.connect(timeout=QUORUM_TIMEOUT + 5)
            except AssertionError as e:
                print(f"after recovery, attempt {attempt}: {e}")
                p = None
                time.sleep(0.3)
                continue
        payload = f"after-{attempt}".encode()
        mid = p.publish("nq/t", payload, qos=1, wait=False)
        rc = wait_ack(p, mid, QUORUM_TIMEOUT + 5)
        if rc is not None and rc < 0x80:
            acked = payload
        else:
            time.sleep(0.3)
    print(f"after recovery: acknowledged at attempt {attempt}")
    # Failed ("lost-*") messages may still arrive: JetStream may store them once quorum is back.
    # The subscriber's node reads it once its consumer has a leader again and its pull is
    # renewed: up to a few heartbeats after the recovery, so more than PROPAGATION.
    deadline = time.monotonic() + 3 * PROPAGATION
    got = []
    while acked not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"{acked!r} acknowledged but not delivered on t2; got {got}"
        try:
            got.append(sub.messages.get(timeout=left).payload)
        except queue.Empty:
            pass


# --------------------------------------------------------------------------- 5. one server lost


LOSE_N = 2000
WINDOW = 20
# Publishes per second at most: the stream then goes on for seconds after the kill, through
# Tern's NATS reconnect and, when the killed server led the stream, JetStream's re-election.
LOSE_RATE = 300


def server_of(nats, node):
    """Index of the nats-server holding `node`'s NATS connection (by connection name), else the
    first server the node is seeded with; and how it was found."""
    for i in nats.running():
        names = [c.get("name") or "" for c in nats.connz(i)]
        if any(n == f"tern-{node.node}" or n.endswith(f"-{node.node}") for n in names):
            return i, f"its connection (named {names}) is on {nats.servers[i].name}"
    first = node.nats_urls[0]
    return nats.urls().index(first), "no named connection: its first seed"


def routed_pair(tern_cluster, mkc, version, topic, persistent=False, **cluster_kw):
    """Three nodes (with `cluster_kw`), a QoS 1 subscriber to `topic`/# on t2 and a publisher
    on t1, routed. Returns (t1, t2, the NATS cluster, subscriber, publisher)."""
    n1, n2, _ = tern_cluster(3, **cluster_kw)
    sub = connected(mkc, f"{topic}-sub", version, n2, persistent=persistent)
    assert sub.subscribe(f"{topic}/#", 1) == [1]
    pub = connected(mkc, f"{topic}-pub", version, n1)
    wait_routes([pub], [sub], f"{topic}/probe", qos=(1,))
    return n1, n2, tern_cluster.nats, sub, pub


def test_losing_one_nats_server_keeps_acknowledged_messages(tern_cluster, mkc, version):
    """QoS 1 from node 1 to a subscriber on node 2 while the nats-server node 2 is connected to is
    SIGKILLed mid-stream: two of three keep the quorum, so the MQTT connections stay, (nearly)
    every publish is acknowledged, and every acknowledged message arrives (duplicates allowed).
    The nodes run with the default quorum_timeout (20 s): a killed stream leader takes
    JetStream 4 to 9 s to replace (longer on a loaded machine), and a publish waits that out
    rather than fail."""
    n1, n2, nats, sub, pub = routed_pair(tern_cluster, mkc, version, "lo")
    victim, how = server_of(nats, n2)
    print(f"will kill {nats.servers[victim].name} ({how}); stream leaders: "
          f"TERN_MSGS {nats.stream_leader('TERN_MSGS')!r}, meta {nats.meta_leader(0)!r}")

    t0 = time.monotonic()
    deadline = t0 + 60
    inflight = collections.deque()
    ok, failed = [], []
    killed_at = None

    def reap_one():
        mid, i = inflight.popleft()
        rc = wait_ack(pub, mid, max(deadline - time.monotonic(), 0.1))
        # Accepted: a reason code below 0x80 (0x10 is wrong here: see
        # test_v5_puback_success_when_only_other_nodes_subscribe).
        (ok if rc is not None and rc < 0x80 else failed).append((i, rc))
        assert rc is not None or pub.c.is_connected(), (
            f"publisher lost its connection at message {i} ({len(ok)} acknowledged)")

    for i in range(LOSE_N):
        assert time.monotonic() < deadline, f"only {i} of {LOSE_N} published in 60s"
        ahead = t0 + i / LOSE_RATE - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        if i == LOSE_N // 3:
            nats.kill(victim)
            killed_at = time.monotonic()
        inflight.append((pub.publish("lo/t", str(i).encode(), qos=1, wait=False), i))
        while len(inflight) >= WINDOW:
            reap_one()
    while inflight:
        reap_one()
    published = time.monotonic()

    want = {str(i).encode() for i, _ in ok}
    # A delivery in flight to t2 through the server that died is lost in transit; its node
    # consumer gets it again after the ack wait (30 s), or from where t2 was when the consumer
    # is made again on another server (cluster/receive.rs): later, not lost.
    counts = collect(sub, want, 45)
    missing = sorted(int(p) for p in want - set(counts))
    dups = sum(n - 1 for n in counts.values() if n > 1)
    print(f"{pick(version, 'v311', 'v5')}: published {LOSE_N} in {published - t0:.1f}s (killed "
          f"{nats.servers[victim].name} after {killed_at - t0:.1f}s): {len(ok)} acknowledged, "
          f"({sum(rc == 0x10 for _, rc in ok)} of them 0x10), "
          f"{len(failed)} failed {failed[:10]}; received {len(counts)} distinct, "
          f"{dups} duplicates, {len(missing)} acknowledged but missing {missing[:20]}")
    assert not missing, f"{len(missing)} acknowledged messages never arrived: {missing[:20]}"
    assert len(failed) <= WINDOW, f"{len(failed)} publishes failed with one server of three lost"
    assert pub.c.is_connected() and sub.c.is_connected()
    assert sub.disconnects.empty() and pub.disconnects.empty()


CONSUMER_N = 300
# How long a publish right after a nats-server's death may wait for its PUBACK: past the
# default cluster.quorum_timeout (20 s) the node refuses it itself.
PUBLISH_WAIT = 30


def consumer_server(nats, node):
    """Index of the nats-server holding `node`'s consumer of the messages stream (R1 by
    default, cluster/receive.rs), None while no server answers for it."""
    for i in nats.running():
        with NatsClient(nats.url(i)) as nc:
            info = nc.js(f"CONSUMER.INFO.TERN_MSGS.{node.node}")
        leader = ((info or {}).get("cluster") or {}).get("leader")
        if leader:
            return [s.name for s in nats.servers].index(leader)
    return None


def only_through_consumers(tern_cluster, mkc, version, topic):
    """routed_pair without fast copies (`fast_path = false`), so a message reaches t2 only
    through its node consumer, and a persistent subscriber."""
    return routed_pair(tern_cluster, mkc, version, topic, persistent=True, fast_path=False)


def test_node_consumer_moves_when_its_nats_server_dies(tern_cluster, mkc, version):
    """Node t2's consumer has one replica: the nats-server holding it is SIGKILLed. t2 sees its
    pulls fail for FAILOVER (5 s), finds the consumer not answering, and makes it again on a
    live server, reading on from where it was: every QoS 1 message t1 had acknowledged
    reaches t2's persistent subscriber, none twice."""
    n1, n2, nats, sub, pub = only_through_consumers(tern_cluster, mkc, version, "mv")
    victim = consumer_server(nats, n2)
    assert victim is not None, "t2's consumer has no server"
    with NatsClient(nats.url(victim)) as nc:
        info = nc.js(f"CONSUMER.INFO.TERN_MSGS.{n2.node}")
    assert info["config"].get("num_replicas", 0) in (0, 1), info["config"]
    for i in range(CONSUMER_N // 3):
        assert pub.publish("mv/t", str(i).encode(), qos=1, timeout=20) < 0x80
    nats.kill(victim)
    killed = time.monotonic()
    acked = set(range(CONSUMER_N // 3))
    for i in range(CONSUMER_N // 3, CONSUMER_N):
        # Longer than quorum_timeout: the first publishes wait out the election of a new
        # stream leader if the victim held it (and once in CI took longer than 15 s).
        rc = pub.publish("mv/t", str(i).encode(), qos=1, timeout=PUBLISH_WAIT)
        if rc is not None and rc < 0x80:
            acked.add(i)
    assert len(acked) >= CONSUMER_N - 20, f"only {len(acked)} of {CONSUMER_N} acknowledged"
    # Without the failover nothing after the kill would ever come (a consumer on a dead
    # server redelivers nothing); the bound only keeps a failure short.
    counts = collect(sub, acked, 45, key=lambda m: int(m.payload))
    took = time.monotonic() - killed
    missing = sorted(acked - set(counts))
    dups = {k: n for k, n in counts.items() if n > 1}
    moved_to = consumer_server(nats, n2)
    remade = metric(n2, "tern_cluster_consumer_remakes_total")
    print(f"killed {nats.servers[victim].name}; {len(acked)} acknowledged, all delivered "
          f"{took:.1f}s after the kill; consumer now on {moved_to}; remade {remade}")
    assert not missing, f"{len(missing)} acknowledged messages never arrived: {missing[:20]}"
    assert not dups, f"delivered twice: {dups}"
    assert remade >= 1
    assert moved_to is not None and moved_to != victim
    assert sub.c.is_connected()


def test_publishes_wait_out_the_election_of_a_new_stream_leader(tern_cluster, mkc, version):
    """The nats-server holding the messages stream's Raft leader is SIGKILLed. Its two
    followers keep the quorum but wait 4 to 9 s (nats-server's election timeout) before one
    of them leads, and a QoS 1 publish meanwhile has nowhere to be stored. With the default
    cluster.quorum_timeout (20 s) the node waits the election out: every publish is
    acknowledged (3.1.1 is not disconnected, 5.0 gets no 0x83) and delivered. With the old
    default of 5 s the first publishes after the kill were refused."""
    n1, n2, nats, sub, pub = routed_pair(tern_cluster, mkc, version, "el")
    leader = nats.stream_leader("TERN_MSGS")
    names = [s.name for s in nats.servers]
    assert leader in names, f"no leader of TERN_MSGS: {leader!r}"
    nats.kill(names.index(leader))
    killed = time.monotonic()
    slowest = 0.0
    for i in range(50):
        t = time.monotonic()
        rc = pub.publish("el/t", str(i).encode(), qos=1, timeout=PUBLISH_WAIT)
        slowest = max(slowest, time.monotonic() - t)
        assert rc is not None and rc < 0x80, f"publish {i} refused ({rc}) after the leader died"
    acked = time.monotonic() - killed
    # If the victim also held t2's node consumer, what was published meanwhile reaches t2 once
    # t2 has made its consumer again on a live server: about 23 s after the kill here
    # (test_node_consumer_moves_when_its_nats_server_dies), longer on a loaded machine.
    counts = collect(sub, set(range(50)), 60, key=lambda m: int(m.payload))
    missing = sorted(set(range(50)) - set(counts))
    print(f"killed the stream leader {leader}; new leader {nats.stream_leader('TERN_MSGS')!r}; "
          f"slowest publish {slowest:.1f}s; all 50 acknowledged {acked:.1f}s and "
          f"{len(counts)} delivered {time.monotonic() - killed:.1f}s after the kill")
    assert not missing, f"acknowledged but never delivered: {missing}"
    assert pub.c.is_connected() and pub.disconnects.empty()


def test_persistent_connects_ride_out_the_election_of_the_nodes_buckets_leader(tern_cluster,
                                                                             mkc, version):
    """The nats-server holding the Raft leader of the nodes bucket (the heartbeats) is
    SIGKILLed. For the 4 to 9 s of the election a node's heartbeat puts fail, although two
    servers of three keep the quorum. A node counts itself cut off only when no heartbeat has
    been stored for quorum_timeout (20 s by default), so persistent CONNECTs arriving every
    half second through the election are all accepted; the node refused them with 0x88 from
    the first failed put before."""
    n1, n2, _ = tern_cluster(3)
    nats = tern_cluster.nats
    names = [s.name for s in nats.servers]
    leader = nats.stream_leader("KV_tern_nodes")
    assert leader in names, f"no leader of the nodes bucket: {leader!r}"
    nats.kill(names.index(leader))
    killed = time.monotonic()
    codes = []
    for i in range(20):
        c = mkc(f"el-durable-{i}", version, broker=(n1, n2)[i % 2], persistent=True)
        rc, _, _ = c.connect(expect_rc=None, timeout=PUBLISH_WAIT)
        rc = getattr(rc, "value", rc)
        codes.append((round(time.monotonic() - killed, 1), rc))
        if rc == 0:
            c.disconnect()
        time.sleep(0.5)
    after = nats.stream_leader("KV_tern_nodes")
    print(f"killed {leader} (the nodes bucket's leader; now {after!r}): CONNACKs {codes}")
    assert [rc for _, rc in codes] == [0] * 20, codes
    assert metric(n1, "tern_cluster_available") == 1
    assert metric(n2, "tern_cluster_available") == 1


def test_node_restarting_without_its_consumers_server_reads_from_its_anchors(tern_cluster, mkc,
                                                                            version):
    """Two faults at once: node t2 is down, and the nats-server holding its one-replica
    consumer is SIGKILLed. t2 starts again: its consumer does not answer, so after FAILOVER it
    is made again from the lowest anchor of t2's persistent sessions (cluster/anchors.rs), and
    the persistent session gets every message published meanwhile (at least once: what it had
    already had after its anchor may come again)."""
    n1, n2, nats, sub, pub = only_through_consumers(tern_cluster, mkc, version, "an")
    time.sleep(3)  # the anchor sweep (2 s) records the drained session's position
    sub.disconnect()
    victim = consumer_server(nats, n2)
    assert victim is not None
    n2.stop()
    nats.kill(victim)
    acked = []
    for i in range(100):
        rc = pub.publish("an/t", str(i).encode(), qos=1, timeout=PUBLISH_WAIT)
        if rc is not None and rc < 0x80:
            acked.append(i)
    assert len(acked) >= 90, f"only {len(acked)} of 100 acknowledged with one server down"
    n2.start()
    sub = connected(mkc, "an-sub", version, n2, persistent=True)
    counts = collect(sub, set(acked), 20, key=lambda m: int(m.payload))
    missing = sorted(set(acked) - set(counts))
    print(f"killed {nats.servers[victim].name} with t2 down; {len(acked)} acknowledged, "
          f"{len(missing)} missing; consumer now on {consumer_server(nats, n2)}")
    assert not missing, f"{len(missing)} acknowledged messages never arrived: {missing[:20]}"
    assert "made again from the anchors" in n2.log()
