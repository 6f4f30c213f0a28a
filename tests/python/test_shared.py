"""Shared subscriptions (`$share/{ShareName}/{filter}`) against the real Tern binary.

MQTT 5 section 4.8.2 defines shared subscriptions; Tern also accepts them from MQTT 3.1.1
clients, so most tests run for both protocol versions (paho-mqtt 2.x clients, plus the raw
client of mqttraw.py where a test must control exactly which acknowledgements are sent).
What is tested (docs/shared-subscriptions.md):
  * syntax: accepted from v3.1.1 and v5, malformed shares refused in SUBACK (0x8F / 0x80),
    No Local on a shared subscription is a protocol error (DISCONNECT 0x82, [MQTT-3.8.3-4]);
  * distribution: one member per message per group, groups and plain subscribers independent,
    delivery QoS = min(publish, member), no retained messages at subscribe time;
  * strategies: round_robin, random, hash_clientid, hash_topic, per-group override;
  * credit: a member holds at most its in-flight window; the rest goes to the others;
  * members leaving: QoS 1 back to the group at disconnect, QoS 2 not PUBREC'd kept for a
    persistent member and given to others when the session ends;
  * every member away: QoS 1/2 queued (QoS 0 not), durably across a broker restart, bounded;
  * the group ends with its last member; back-pressure instead of overflow; metrics;
  * examples/flash_sale.py at test scale (QoS 1 with a killed worker, QoS 2 exactly once).
Every wait is bounded.
"""
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

import conftest
import mqttraw as raw
from pahoutil import (TIMEOUT, V311, V5, ClientFactory, PacketTypes, SubscribeOptions, metric,
                      props)

sys.path.insert(0, os.path.join(conftest.ROOT, "examples"))
import flash_sale  # noqa: E402

BOTH = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]
CONNECT = PacketTypes.CONNECT
SUBSCRIBE = PacketTypes.SUBSCRIBE
DISCONNECT = PacketTypes.DISCONNECT
EXPIRY = 3600


def bad_code(proto):
    """SUBACK failure code for a malformed share: 0x8F Topic Filter Invalid (3.1.1: 0x80)."""
    return 0x8F if proto == V5 else 0x80


# --------------------------------------------------------------------------- fixtures/helpers


class Raw:
    """TOML written as is by conftest's config writer (inline tables, arrays)."""

    def __init__(self, text):
        self.text = text


@pytest.fixture
def raw_toml(monkeypatch):
    orig = conftest._toml_value
    monkeypatch.setattr(conftest, "_toml_value",
                        lambda v: v.text if isinstance(v, Raw) else orig(v))
    return Raw


def member(mk, name, proto, persistent=False, broker=None, properties=None, **kw):
    """A connected client; `persistent`: v3.1.1 clean session 0, v5 Session Expiry 3600."""
    if proto == V311:
        c = mk(name, V311, broker=broker, clean_session=not persistent, **kw)
        c.connect()
    else:
        c = mk(name, V5, broker=broker, **kw)
        p = properties
        if persistent:
            p = p or props(CONNECT)
            p.SessionExpiryInterval = EXPIRY
        c.connect(properties=p)
    return c


def resume(mk, old, **kw):
    """Reconnects `old`'s client id to its persistent session (Session Present must be 1)."""
    if old.protocol == V311:
        c = mk.again(old, clean_session=False, **kw)
        rc, sp, _ = c.connect()
    else:
        c = mk.again(old, **kw)
        rc, sp, _ = c.connect(clean_start=False,
                              properties=props(CONNECT, SessionExpiryInterval=EXPIRY))
    assert sp is True, f"{old.client_id}: session not resumed"
    return c


def ints(messages):
    return [int(m.payload) for m in messages]


def gather(clients, total, timeout=TIMEOUT, settle=0.3):
    """Messages received by each client until `total` arrived in all (or `timeout`), then
    `settle` seconds more to catch extras. Returns {client: [message, ...]}."""
    got = {c: [] for c in clients}
    deadline = time.monotonic() + timeout
    end = None
    while True:
        for c in clients:
            while True:
                try:
                    got[c].append(c.messages.get_nowait())
                except Exception:
                    break
        now = time.monotonic()
        if end is None and (sum(map(len, got.values())) >= total or now > deadline):
            end = now + settle
        if end is not None and now >= end:
            return got
        time.sleep(0.01)


def publish_all(pub, topic, n, qos=1, start=0, refused=False):
    """Publishes payloads start..start+n-1 pipelined and waits for every handshake; returns the
    reason codes. refused=True: 0x97 (a full group queue took nothing, MQTT 5) is expected
    among them."""
    mids = [pub.publish(topic, str(i).encode(), qos=qos, wait=False)
            for i in range(start, start + n)]
    rcs = []
    if qos:
        for mid in mids:
            rcs.append(pub.wait_published(mid, timeout=15))
            assert rcs[-1] in ((0, 0x97, None) if refused else (0, None)), rcs[-1]
    return rcs


def series(broker, name):
    """[(labels, value)] of every sample of `name` on /metrics."""
    url = f"http://127.0.0.1:{broker.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        text = resp.read().decode()
    out = []
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)", line)
        if m and m.group(1) == name:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
            out.append((labels, float(m.group(4))))
    return out


def wait_metric(broker, name, labels, pred, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        v = metric(broker, name, labels)
        if pred(v):
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} = {v}")
        time.sleep(0.05)


def wait_away(broker, n):
    """Waits until the broker has `n` offline (persistent) sessions: a client's DISCONNECT is
    handled asynchronously, and a publish racing it could still find the member online."""
    wait_metric(broker, "tern_sessions", {"state": "offline"}, lambda v: v == n)


def raw_member(broker, client_id, proto, flt, qos, persistent):
    """A raw client (no automatic acknowledgements) subscribed to `flt`."""
    c = raw.Client.to(broker, proto)
    kw = {}
    if proto == V5 and persistent:
        kw["properties"] = [(raw.SESSION_EXPIRY_INTERVAL, EXPIRY)]
    c.connect(client_id, clean=not persistent, **kw)
    assert c.subscribe([(flt, qos)]).codes == [qos]
    return c


def raw_resume(broker, client_id, proto):
    c = raw.Client.to(broker, proto)
    kw = {"properties": [(raw.SESSION_EXPIRY_INTERVAL, EXPIRY)]} if proto == V5 else {}
    ack = c.connect(client_id, clean=False, **kw)
    assert ack.session_present, ack
    return c


def raw_publishes(c, n, timeout=TIMEOUT):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        p = c.recv(max(0.001, deadline - time.monotonic()))
        if p.type == raw.PUBLISH:
            out.append(p)
    return out


# --------------------------------------------------------------------------- syntax


def test_connack_shared_subscription_available(mk):
    """v5 CONNACK: Shared Subscription Available is 1 or absent (absent means available)."""
    c = mk("c", V5)
    rc, sp, p = c.connect()
    assert getattr(p, "SharedSubscriptionAvailable", 1) == 1


@pytest.mark.parametrize("proto", BOTH)
def test_shared_subscription_granted(mk, proto):
    """`$share/{ShareName}/{filter}` with plain, '+' and '#' filters is granted at the requested
    QoS, from v3.1.1 as from v5; re-subscribing updates the membership (still one member)."""
    c = member(mk, "c", proto)
    flts = [("$share/g/sg/a", 0), ("$share/g/sg/+/x", 1), ("$share/other-name_1/sg/#", 2)]
    assert c.subscribe(flts) == [0, 1, 2]
    assert c.subscribe("$share/g/sg/a", 1) == [1]
    assert metric(c.broker, "tern_shared_members", {"group": "g", "filter": "sg/a"}) == 1
    pub = member(mk, "pub", proto)
    # sg/a matches the groups g/sg/a and other-name_1/sg/#, sg/b/x matches g/sg/+/x and
    # other-name_1/sg/#: one copy per group (c is the only member of each).
    pub.publish("sg/a", b"x", qos=1)
    pub.publish("sg/b/x", b"y", qos=1)
    got = gather([c], 4)[c]
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [
        ("sg/a", b"x", 1), ("sg/a", b"x", 1), ("sg/b/x", b"y", 1), ("sg/b/x", b"y", 1)]


@pytest.mark.parametrize("proto", BOTH)
def test_malformed_share_refused(mk, proto):
    """An empty ShareName, a ShareName with '+' or '#', a missing or empty filter, or an
    invalid filter is refused in the SUBACK with 0x8F (3.1.1: 0x80) [MQTT-4.8.2-1]
    [MQTT-4.8.2-2]; valid filters of the same SUBSCRIBE are granted and the client stays
    connected."""
    c = member(mk, "c", proto)
    bad = ["$share/g", "$share/g/", "$share//mf/t", "$share/g+/mf/t", "$share/g#/mf/t",
           "$share/+/mf/t", "$share/#/mf/t", "$share/g/mf/#/x", "$share/g/mf/a+"]
    filters = [("mf/ok", 1)] + [(f, 1) for f in bad] + [("$share/g/mf/t", 1)]
    assert c.subscribe(filters) == [1] + [bad_code(proto)] * len(bad) + [1]
    assert c.c.is_connected()
    pub = member(mk, "pub", proto)
    pub.publish("mf/t", b"shared", qos=1)
    assert c.get().payload == b"shared"
    c.expect_none(0.3)


def test_no_local_on_shared_subscription_is_protocol_error(mk):
    """v5 SUBSCRIBE with No Local=1 on a shared subscription: DISCONNECT 0x82 (protocol error)
    and the connection is closed [MQTT-3.8.3-4]; no membership is left behind."""
    c = mk("c", V5)
    c.connect()
    rc, mid = c.c.subscribe("$share/g/nl/t", options=SubscribeOptions(qos=1, noLocal=True))
    reason, flags, _, _ = c.wait_disconnect()
    assert flags.is_disconnect_packet_from_server
    assert reason.value == 0x82
    assert metric(c.broker, "tern_shared_members", {"group": "g"}) == 0
    # No Local on a plain subscription next to it stays legal for another client.
    d = mk("d", V5)
    d.connect()
    assert d.subscribe("nl/t", options=SubscribeOptions(qos=1, noLocal=True)) == [1]


def test_no_local_raw_packet(broker):
    """The same with a raw SUBSCRIBE (options byte 0x05 = QoS 1 + No Local): the broker sends
    DISCONNECT with reason 0x82 and closes."""
    c = raw.connected(broker, raw.uid("nl"), V5)
    c.send(raw.subscribe(1, [("$share/g/nlr/t", raw.sub_options(1, no_local=True))], V5))
    packets, closed = c.wait_closed()
    assert closed, packets
    assert [p.type for p in packets] == [raw.DISCONNECT], packets
    assert packets[0].rc == 0x82, packets


# --------------------------------------------------------------------------- distribution


@pytest.mark.parametrize("proto", BOTH)
def test_each_message_to_exactly_one_member_round_robin(mk, proto):
    """Each message goes to exactly one member; round robin (the default) with every member
    acknowledging gives each of M members floor(N/M) or ceil(N/M) of N messages. Metrics:
    tern_shared_members and tern_shared_messages_delivered_total, labelled group and filter."""
    members = [member(mk, f"m{i}", proto) for i in range(3)]
    for m in members:
        assert m.subscribe("$share/work/rr/t", 1) == [1]
    labels = {"group": "work", "filter": "rr/t"}
    assert metric(mk.broker, "tern_shared_members", labels) == 3
    pub = member(mk, "pub", proto)
    n = 31
    publish_all(pub, "rr/t", n)
    got = gather(members, n)
    all_ = sorted(i for msgs in got.values() for i in ints(msgs))
    assert all_ == list(range(n)), all_
    counts = sorted(len(v) for v in got.values())
    assert counts == [10, 10, 11], counts
    for msgs in got.values():
        assert ints(msgs) == sorted(ints(msgs)), "one publisher: in order at each member"
        assert all(m.qos == 1 for m in msgs)
    assert metric(mk.broker, "tern_shared_messages_delivered_total", labels) == n
    assert metric(mk.broker, "tern_shared_queued_messages", labels) == 0


@pytest.mark.parametrize("proto", BOTH)
def test_two_groups_and_a_plain_subscriber_each_get_everything(mk, proto):
    """Two groups on the same filter each receive every message exactly once; a plain
    subscriber beside them receives every message."""
    a = [member(mk, f"a{i}", proto) for i in range(2)]
    b = [member(mk, f"b{i}", proto) for i in range(2)]
    for c in a:
        assert c.subscribe("$share/ga/tg/#", 1) == [1]
    for c in b:
        assert c.subscribe("$share/gb/tg/#", 1) == [1]
    plain = member(mk, "plain", proto)
    assert plain.subscribe("tg/#", 1) == [1]
    pub = member(mk, "pub", proto)
    n = 20
    publish_all(pub, "tg/x", n)
    ga, gb, gp = gather(a, n), gather(b, n), gather([plain], n)
    assert sorted(i for v in ga.values() for i in ints(v)) == list(range(n))
    assert sorted(i for v in gb.values() for i in ints(v)) == list(range(n))
    assert ints(gp[plain]) == list(range(n))
    assert all(len(v) == n // 2 for v in list(ga.values()) + list(gb.values()))


@pytest.mark.parametrize("proto", BOTH)
def test_member_that_is_also_a_plain_subscriber_gets_both_copies(mk, proto):
    """A client in a group that also has a plain subscription to the same topic gets one copy
    for the subscription and, when the group picks it, one as a member. v5: each copy carries
    the Subscription Identifier of its own subscription."""
    x = member(mk, "x", proto)
    y = member(mk, "y", proto)
    if proto == V5:
        assert x.subscribe("$share/g/both/t", 1, properties=props(
            SUBSCRIBE, SubscriptionIdentifier=1)) == [1]
        assert x.subscribe("both/t", 1, properties=props(
            SUBSCRIBE, SubscriptionIdentifier=2)) == [1]
    else:
        assert x.subscribe("$share/g/both/t", 1) == [1]
        assert x.subscribe("both/t", 1) == [1]
    assert y.subscribe("$share/g/both/t", 1) == [1]
    pub = member(mk, "pub", proto)
    n = 10
    publish_all(pub, "both/t", n)
    got = gather([x, y], 2 * n)
    cx, cy = ints(got[x]), ints(got[y])
    for i in range(n):
        assert cx.count(i) + cy.count(i) == 2, (i, cx, cy)  # plain copy + one group copy
        assert cx.count(i) >= 1, (i, cx)
    assert len(cy) == n // 2 and len(cx) == n + n // 2
    if proto == V5:
        ids = [tuple(m.properties.SubscriptionIdentifier) for m in got[x]]
        assert ids.count((2,)) == n, ids
        assert ids.count((1,)) == n // 2, ids


@pytest.mark.parametrize("proto", BOTH)
def test_only_member_and_plain_subscriber_gets_two_copies(mk, proto):
    """The sole member of a group with a plain subscription to the same filter gets every
    message twice."""
    x = member(mk, "x", proto)
    assert x.subscribe([("$share/solo/two/t", 1), ("two/t", 1)]) == [1, 1]
    pub = member(mk, "pub", proto)
    publish_all(pub, "two/t", 5)
    got = gather([x], 10)
    assert sorted(ints(got[x])) == sorted(list(range(5)) * 2)


@pytest.mark.parametrize("proto", BOTH)
def test_delivery_qos_is_min_of_publish_and_member_qos(mk, proto):
    """A member receives min(publish QoS, its subscription QoS) [MQTT-3.8.4-8]."""
    members = {}
    for sq in (0, 1, 2):
        m = member(mk, f"m{sq}", proto)
        assert m.subscribe(f"$share/g{sq}/dq/t", sq) == [sq]
        members[sq] = m
    pub = member(mk, "pub", proto)
    for pq in (0, 1, 2):
        pub.publish("dq/t", f"p{pq}".encode(), qos=pq)
        for sq, m in members.items():
            got = m.get()
            assert got.payload == f"p{pq}".encode()
            assert got.qos == min(pq, sq), (pq, sq, got.qos)
    for m in members.values():
        m.expect_none(0.3)


@pytest.mark.parametrize("proto", BOTH)
def test_retained_message_not_sent_on_shared_subscribe(mk, proto):
    """A retained message is not sent when a shared subscription is made (MQTT 5 section
    4.8.2), whatever the Retain Handling; a plain subscription gets it; later live messages
    reach the member."""
    pub = member(mk, "pub", proto)
    pub.publish("rt/t", b"retained", qos=1, retain=True)
    m = member(mk, "m", proto)
    if proto == V5:
        assert m.subscribe("$share/g/rt/t", options=SubscribeOptions(qos=1, retainHandling=0)
                           ) == [1]
        assert m.subscribe("$share/g2/rt/#", options=SubscribeOptions(
            qos=1, retainHandling=1, retainAsPublished=True)) == [1]
    else:
        assert m.subscribe([("$share/g/rt/t", 1), ("$share/g2/rt/#", 1)]) == [1, 1]
    m.expect_none(0.6)
    plain = member(mk, "plain", proto)
    assert plain.subscribe("rt/t", 1) == [1]
    got = plain.get()
    assert (got.payload, got.retain) == (b"retained", True)
    pub.publish("rt/t", b"live", qos=1)
    got = gather([m], 2)[m]
    assert [x.payload for x in got] == [b"live", b"live"]  # once per group


# --------------------------------------------------------------------------- strategies


@pytest.mark.parametrize("proto", BOTH)
def test_random_strategy_uses_every_member(make_broker, mkc, proto):
    """strategy = "random": every message to exactly one member, and with 300 messages over 3
    members every member gets some."""
    b = make_broker({"shared": {"strategy": "random"}})
    members = [member(mkc, f"m{i}", proto, broker=b) for i in range(3)]
    for m in members:
        assert m.subscribe("$share/g/rnd/t", 1) == [1]
    pub = member(mkc, "pub", proto, broker=b)
    n = 300
    publish_all(pub, "rnd/t", n)
    got = gather(members, n, timeout=15)
    assert sorted(i for v in got.values() for i in ints(v)) == list(range(n))
    counts = [len(v) for v in got.values()]
    assert all(c > 0 for c in counts), counts


def check_sticky(got, key_of, seq_of):
    """Every key's messages on one member, in increasing seq order. Returns {key: member}."""
    owner = {}
    for c, msgs in got.items():
        last = {}
        for m in msgs:
            k = key_of(m)
            assert owner.setdefault(k, c) is c, f"{k} on {owner[k].client_id} and {c.client_id}"
            s = seq_of(m)
            assert s > last.get(k, -1), f"{k}: {s} after {last.get(k)} at {c.client_id}"
            last[k] = s
    return owner


@pytest.mark.parametrize("proto", BOTH)
def test_hash_clientid_keeps_each_publisher_on_one_member(make_broker, mkc, proto):
    """strategy = "hash_clientid": while membership does not change, all messages of one
    publisher go to the same member, in order; different publishers spread over members."""
    b = make_broker({"shared": {"strategy": "hash_clientid"}})
    members = [member(mkc, f"m{i}", proto, broker=b) for i in range(3)]
    for m in members:
        assert m.subscribe("$share/g/hc/t", 1) == [1]
    pubs = [member(mkc, f"p{j}", proto, broker=b) for j in range(12)]
    per = 15
    mids = []
    for i in range(per):  # interleaved
        for j, p in enumerate(pubs):
            mids.append((p, p.publish("hc/t", f"{j}:{i}".encode(), qos=1, wait=False)))
    for p, mid in mids:
        p.wait_published(mid, timeout=15)
    got = gather(members, per * len(pubs), timeout=15)
    total = sorted(m.payload for v in got.values() for m in v)
    assert total == sorted(f"{j}:{i}".encode() for j in range(len(pubs)) for i in range(per))
    owner = check_sticky(got, lambda m: m.payload.split(b":")[0],
                         lambda m: int(m.payload.split(b":")[1]))
    assert len(set(owner.values())) > 1, "12 publishers all hashed to one member"


@pytest.mark.parametrize("proto", BOTH)
def test_hash_topic_keeps_each_topic_on_one_member(make_broker, mkc, proto):
    """strategy = "hash_topic": all messages of one topic go to the same member, in order."""
    b = make_broker({"shared": {"strategy": "hash_topic"}})
    members = [member(mkc, f"m{i}", proto, broker=b) for i in range(3)]
    for m in members:
        assert m.subscribe("$share/g/ht/+", 1) == [1]
    pub = member(mkc, "pub", proto, broker=b)
    topics, per = 12, 10
    mids = [pub.publish(f"ht/{t}", str(i).encode(), qos=1, wait=False)
            for i in range(per) for t in range(topics)]
    for mid in mids:
        pub.wait_published(mid, timeout=15)
    got = gather(members, topics * per, timeout=15)
    assert sum(map(len, got.values())) == topics * per
    owner = check_sticky(got, lambda m: m.topic, lambda m: int(m.payload))
    assert len(owner) == topics
    assert len(set(owner.values())) > 1, "12 topics all hashed to one member"


def test_per_group_strategy_override(make_broker, mkc, raw_toml):
    """[shared] groups = [{ name = "orders", strategy = "hash_clientid" }]: the group "orders"
    hashes by publisher while another group on the same filter uses the global round robin."""
    b = make_broker({"shared": {
        "strategy": "round_robin",
        "groups": raw_toml('[{ name = "orders", strategy = "hash_clientid" }, '
                           '{ name = "audit", strategy = "random" }]'),
    }})
    orders = [member(mkc, f"o{i}", V5, broker=b) for i in range(2)]
    other = [member(mkc, f"r{i}", V5, broker=b) for i in range(2)]
    for m in orders:
        assert m.subscribe("$share/orders/ov/t", 1) == [1]
    for m in other:
        assert m.subscribe("$share/other/ov/t", 1) == [1]
    pubs = [member(mkc, f"p{j}", V311, broker=b) for j in range(5)]
    per = 12
    for i in range(per):
        for j, p in enumerate(pubs):
            p.publish("ov/t", f"{j}:{i}".encode(), qos=1)
    n = per * len(pubs)
    got_orders = gather(orders, n)
    check_sticky(got_orders, lambda m: m.payload.split(b":")[0],
                 lambda m: int(m.payload.split(b":")[1]))
    assert sum(map(len, got_orders.values())) == n
    got_other = gather(other, n)
    assert sorted(len(v) for v in got_other.values()) == [n // 2, n // 2]


def test_unknown_strategy_is_a_startup_error():
    """An unknown strategy stops the broker at startup (it never becomes ready)."""
    with pytest.raises(RuntimeError):
        b = conftest.Broker({"shared": {"strategy": "fastest"}})
        b.close()


# --------------------------------------------------------------------------- credit


@pytest.mark.parametrize("proto", BOTH)
def test_slow_member_holds_only_its_window(make_broker, mkc, proto):
    """A member that never acknowledges holds at most its in-flight window (v5: its Receive
    Maximum 2; v3.1.1: limits.max_inflight = 2); the other member gets the rest: 20 QoS 1
    messages -> 18 to the fast member. When the slow one goes away, its 2 go to the other
    (tern_shared_messages_redelivered_total)."""
    b = make_broker({"limits": {"max_inflight": 2}} if proto == V311 else None)
    slow = mkc("slow", proto, broker=b, manual_ack=True)
    if proto == V5:
        slow.connect(properties=props(CONNECT, ReceiveMaximum=2))
    else:
        slow.connect()
    fast = member(mkc, "fast", proto, broker=b)
    assert slow.subscribe("$share/g/cr/t", 1) == [1]
    assert fast.subscribe("$share/g/cr/t", 1) == [1]
    pub = member(mkc, "pub", proto, broker=b)
    publish_all(pub, "cr/t", 20)
    held = slow.get_n(2)
    fast_got = fast.get_n(18, timeout=10)
    slow.expect_none(0.3)
    fast.expect_none(0.2)
    assert sorted(ints(held) + ints(fast_got)) == list(range(20))
    labels = {"group": "g", "filter": "cr/t"}
    before = metric(b, "tern_shared_messages_redelivered_total", labels)
    slow.drop()
    again = fast.get_n(2)
    assert sorted(ints(again)) == sorted(ints(held))
    assert metric(b, "tern_shared_messages_redelivered_total", labels) - before == 2
    assert metric(b, "tern_shared_messages_delivered_total", labels) == 22


# --------------------------------------------------------------------------- members leaving


@pytest.mark.parametrize("how", ["drop", "disconnect"])
@pytest.mark.parametrize("proto", BOTH)
def test_unacked_qos1_goes_to_other_members_at_disconnect(mk, proto, how):
    """A member (persistent session) that received QoS 1 messages and did not acknowledge them
    disconnects (abruptly or with DISCONNECT): they go back to the group and the other member
    gets them, without waiting for the session to end."""
    a = member(mk, "a", proto, persistent=True, manual_ack=True)
    bm = member(mk, "b", proto)
    assert a.subscribe("$share/g/lv/t", 1) == [1]
    assert bm.subscribe("$share/g/lv/t", 1) == [1]
    pub = member(mk, "pub", proto)
    publish_all(pub, "lv/t", 10)
    got = gather([a, bm], 10)
    held = ints(got[a])
    assert len(held) == 5 and len(got[bm]) == 5
    labels = {"group": "g", "filter": "lv/t"}
    before = metric(mk.broker, "tern_shared_messages_redelivered_total", labels)
    if how == "drop":
        a.drop()
    else:
        a.disconnect()
    more = bm.get_n(5)
    assert sorted(ints(more)) == sorted(held)
    assert sorted(ints(got[bm]) + ints(more)) == list(range(10))
    assert metric(mk.broker, "tern_shared_messages_redelivered_total", labels) - before == 5
    # The member is still a member (persistent session): it gets its share of new messages
    # when it returns, and not the ones already given to the other member.
    a2 = resume(mk, a)
    publish_all(pub, "lv/t", 4, start=10)
    got = gather([a2, bm], 4)
    assert sorted(ints(got[a2]) + ints(got[bm])) == [10, 11, 12, 13]
    assert len(got[a2]) == 2


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
@pytest.mark.parametrize("proto", BOTH)
def test_unacked_qos1_goes_to_other_member_after_broker_restart(broker, mk, proto, stop):
    """Two persistent members; A holds two QoS 1 messages unacknowledged when the broker stops
    (SIGTERM) or crashes (SIGKILL). After the restart A's connection is gone, as at any
    disconnect: B, returning, gets A's two messages (and nothing it already acknowledged)
    without waiting for A to come back."""
    a = member(mk, "a", proto, persistent=True, manual_ack=True)
    bm = member(mk, "b", proto, persistent=True)
    assert a.subscribe("$share/g/crash/t", 1) == [1]
    assert bm.subscribe("$share/g/crash/t", 1) == [1]
    pub = member(mk, "pub", proto)
    publish_all(pub, "crash/t", 4)
    got = gather([a, bm], 4)
    held, done = ints(got[a]), ints(got[bm])
    assert len(held) == 2 and len(done) == 2
    bm.disconnect()
    wait_away(broker, 1)  # B's DISCONNECT, and so its PUBACKs before it, were handled
    if stop == "sigkill":
        broker.proc.kill()
        broker.proc.wait(timeout=10)
    else:
        broker.stop()
    broker.start()
    b2 = resume(mk, bm)
    again = b2.get_n(2)
    assert sorted(ints(again)) == sorted(held)
    b2.expect_none(0.5)


@pytest.mark.parametrize("proto", BOTH)
def test_qos2_not_pubrecd_stays_with_persistent_member(broker, mk, proto):
    """QoS 2: a persistent member disconnects holding one message it never PUBREC'd and one it
    PUBREC'd. Neither goes to the other member; on return the first is re-sent with DUP=1 and
    the same packet id, the second is resumed with PUBREL: exactly once per group."""
    cid = raw.uid("a")
    a = raw_member(broker, cid, proto, "$share/g/q2/t", 2, persistent=True)
    bm = member(mk, "b", proto)
    assert bm.subscribe("$share/g/q2/t", 2) == [2]
    pub = member(mk, "pub", proto)
    publish_all(pub, "q2/t", 4, qos=2)
    mine = raw_publishes(a, 2)
    theirs = bm.get_n(2)
    assert sorted([int(p.payload) for p in mine] + ints(theirs)) == [0, 1, 2, 3]
    first, second = mine
    a.send(raw.pubrec(second.pid, proto))
    rel = a.expect_ack(raw.PUBREL)
    assert rel.pid == second.pid
    time.sleep(0.2)
    a.abort()
    bm.expect_none(1.0)
    a = raw_resume(broker, cid, proto)
    got = a.collect(1.0)
    pubs = [p for p in got if p.type == raw.PUBLISH]
    rels = [p for p in got if p.type == raw.PUBREL]
    assert [(p.pid, p.payload, p.dup, p.qos) for p in pubs] == [
        (first.pid, first.payload, True, 2)], got
    assert [p.pid for p in rels] == [second.pid], got
    a.send(raw.pubrec(first.pid, proto))
    assert a.expect_ack(raw.PUBREL).pid == first.pid
    a.send(raw.pubcomp(first.pid, proto) + raw.pubcomp(second.pid, proto))
    a.assert_silent(0.3)
    bm.expect_none(0.3)
    assert metric(broker, "tern_shared_messages_redelivered_total", {"group": "g"}) == 0
    a.disconnect()


@pytest.mark.parametrize("proto", BOTH)
def test_qos2_not_pubrecd_goes_to_others_when_session_ends(broker, mk, proto):
    """QoS 2 messages a member did not PUBREC go to the other members when its session ends
    with the connection (v3.1.1 clean session, v5 Session Expiry 0)."""
    a = raw_member(broker, raw.uid("a"), proto, "$share/g/q2e/t", 2, persistent=False)
    bm = member(mk, "b", proto)
    assert bm.subscribe("$share/g/q2e/t", 2) == [2]
    pub = member(mk, "pub", proto)
    publish_all(pub, "q2e/t", 4, qos=2)
    mine = raw_publishes(a, 2)
    theirs = bm.get_n(2)
    a.abort()
    more = bm.get_n(2)
    assert sorted(ints(more)) == sorted(int(p.payload) for p in mine)
    assert sorted(ints(theirs) + ints(more)) == [0, 1, 2, 3]
    assert all(m.qos == 2 for m in more)
    bm.expect_none(0.3)
    assert metric(broker, "tern_shared_messages_redelivered_total", {"group": "g"}) == 2


@pytest.mark.parametrize("proto", BOTH)
def test_qos2_not_pubrecd_goes_to_others_when_session_ends_later(broker, mk, proto):
    """A persistent member that left holding a QoS 2 message it did not PUBREC: the message
    waits for it; when it comes back with a clean start (its session ends) the message goes
    to the other member."""
    cid = raw.uid("a")
    a = raw_member(broker, cid, proto, "$share/g/q2l/t", 2, persistent=True)
    bm = member(mk, "b", proto)
    assert bm.subscribe("$share/g/q2l/t", 2) == [2]
    pub = member(mk, "pub", proto)
    publish_all(pub, "q2l/t", 2, qos=2)
    mine = raw_publishes(a, 1)
    theirs = bm.get_n(1)
    a.abort()
    bm.expect_none(0.8)
    a = raw.Client.to(broker, proto)
    assert not a.connect(cid, clean=True).session_present
    got = bm.get()
    assert got.payload == mine[0].payload
    assert sorted(ints(theirs + [got])) == [0, 1]
    a.assert_silent(0.3)
    a.disconnect()


# --------------------------------------------------------------------------- members away


@pytest.mark.parametrize("proto", BOTH)
def test_group_queues_qos1_qos2_while_every_member_is_away(mk, proto):
    """Every member away with a persistent session: the group queues QoS 1 and 2 messages
    (tern_shared_queued_messages), not QoS 0, and delivers them to the first member that returns."""
    a = member(mk, "a", proto, persistent=True)
    bm = member(mk, "b", proto, persistent=True)
    for c in (a, bm):
        assert c.subscribe("$share/g/aw/t", 2) == [2]
        c.disconnect()
    wait_away(mk.broker, 2)
    pub = member(mk, "pub", proto)
    for i in range(5):
        pub.publish("aw/t", f"q0-{i}".encode(), qos=0)
        pub.publish("aw/t", f"q1-{i}".encode(), qos=1)
        pub.publish("aw/t", f"q2-{i}".encode(), qos=2)
    labels = {"group": "g", "filter": "aw/t"}
    assert wait_metric(mk.broker, "tern_shared_queued_messages", labels, lambda v: v == 10) == 10
    assert metric(mk.broker, "tern_shared_members", labels) == 2
    a2 = resume(mk, a)
    got = a2.get_n(10)
    assert sorted(m.payload for m in got) == sorted(
        [f"q1-{i}".encode() for i in range(5)] + [f"q2-{i}".encode() for i in range(5)])
    assert {m.payload: m.qos for m in got}[b"q2-0"] == 2
    a2.expect_none(0.3)
    assert metric(mk.broker, "tern_shared_queued_messages", labels) == 0
    b2 = resume(mk, bm)
    b2.expect_none(0.3)


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
@pytest.mark.parametrize("proto", BOTH)
def test_group_queue_survives_broker_restart(broker, mk, proto, stop):
    """The queue of a group whose members are all away (persistent sessions) is durable:
    after a broker restart (SIGTERM or SIGKILL) the returning member gets every acknowledged
    QoS 1 and QoS 2 message, and the group still exists."""
    a = member(mk, "a", proto, persistent=True)
    assert a.subscribe("$share/g/dur/t", 2) == [2]
    a.disconnect()
    wait_away(broker, 1)
    pub = member(mk, "pub", proto)
    for i in range(6):
        pub.publish("dur/t", f"m{i}".encode(), qos=1 + i % 2)
    pub.disconnect()
    if stop == "sigkill":
        broker.proc.kill()
        broker.proc.wait(timeout=10)
    else:
        broker.stop()
    broker.start()
    labels = {"group": "g", "filter": "dur/t"}
    assert metric(broker, "tern_shared_members", labels) == 1
    assert metric(broker, "tern_shared_queued_messages", labels) == 6
    a2 = resume(mk, a)
    got = a2.get_n(6)
    assert sorted(m.payload for m in got) == [f"m{i}".encode() for i in range(6)]
    assert sorted((m.payload, m.qos) for m in got)[1] == (b"m1", 2)
    a2.expect_none(0.3)
    # And it is still a working group.
    pub2 = member(mk, "pub2", proto)
    pub2.publish("dur/t", b"after", qos=1)
    assert a2.get().payload == b"after"


def test_group_queue_limit_while_away(make_broker, mkc):
    """[shared] max_queued_messages = 5, every member away: the 6th and later messages are
    dropped (tern_shared_messages_dropped_total, tern_messages_dropped_total{reason="queue_full"}); the
    publisher is not paused (nobody drains the queue)."""
    b = make_broker({"shared": {"max_queued_messages": 5}})
    a = member(mkc, "a", V5, broker=b, persistent=True)
    assert a.subscribe("$share/g/lim/t", 1) == [1]
    a.disconnect()
    wait_away(b, 1)
    pub = member(mkc, "pub", V5, broker=b)
    rcs = publish_all(pub, "lim/t", 8, refused=True)
    assert rcs == [0] * 5 + [0x97] * 3, rcs  # the publisher learns what nobody took
    labels = {"group": "g", "filter": "lim/t"}
    assert metric(b, "tern_shared_queued_messages", labels) == 5
    assert metric(b, "tern_shared_messages_dropped_total", labels) == 3
    assert metric(b, "tern_messages_dropped_total", {"reason": "queue_full"}) == 3
    assert metric(b, "tern_backpressure_pauses_total") == 0
    a2 = resume(mkc, a)
    assert ints(a2.get_n(5)) == [0, 1, 2, 3, 4]
    a2.expect_none(0.3)


def test_group_queue_byte_limit_while_away(make_broker, mkc):
    """[shared] max_queued_bytes = 1000 (payload plus topic), every member away: 20 messages of
    100 bytes each (topic 4 + payload 96): about 10 fit, the rest is dropped and counted."""
    b = make_broker({"shared": {"max_queued_bytes": 1000}})
    a = member(mkc, "a", V311, broker=b, persistent=True)
    assert a.subscribe("$share/g/qb/t", 1) == [1]
    a.disconnect()
    wait_away(b, 1)
    pub = member(mkc, "pub", V311, broker=b)
    for i in range(20):
        pub.publish("qb/t", b"%02d" % i + b"x" * 94, qos=1)
    labels = {"group": "g", "filter": "qb/t"}
    queued = metric(b, "tern_shared_queued_messages", labels)
    dropped = metric(b, "tern_shared_messages_dropped_total", labels)
    assert 8 <= queued <= 10 and queued + dropped == 20, (queued, dropped)
    a2 = resume(mkc, a)
    got = a2.get_n(int(queued))
    assert [m.payload[:2] for m in got] == [b"%02d" % i for i in range(int(queued))]
    a2.expect_none(0.3)


def test_qos0_not_queued_without_connected_member(mk):
    """QoS 0 reaches a connected member but is not queued while no member is connected."""
    a = member(mk, "a", V5, persistent=True)
    assert a.subscribe("$share/g/z/t", 1) == [1]
    pub = member(mk, "pub", V5)
    pub.publish("z/t", b"live0", qos=0)
    assert a.get().payload == b"live0"
    a.disconnect()
    wait_away(mk.broker, 1)
    pub.publish("z/t", b"away0", qos=0)
    pub.publish("z/t", b"away1", qos=1)
    a2 = resume(mk, a)
    assert a2.get().payload == b"away1"
    a2.expect_none(0.4)


# --------------------------------------------------------------------------- group end


@pytest.mark.parametrize("proto", BOTH)
def test_group_ends_when_last_member_unsubscribes(mk, proto):
    """The group ends when its last member unsubscribes: its metric series go away and a
    message to the filter has no subscriber any more (v5 PUBACK 0x10)."""
    a = member(mk, "a", proto)
    bm = member(mk, "b", proto)
    for c in (a, bm):
        assert c.subscribe("$share/g/end/t", 1) == [1]
    labels = {"group": "g", "filter": "end/t"}
    assert metric(mk.broker, "tern_shared_members", labels) == 2
    a.unsubscribe("$share/g/end/t")
    assert metric(mk.broker, "tern_shared_members", labels) == 1
    pub = member(mk, "pub", proto)
    pub.publish("end/t", b"0", qos=1)
    assert bm.get().payload == b"0"
    bm.unsubscribe("$share/g/end/t")
    assert not [s for s in series(mk.broker, "tern_shared_members") if s[0].get("group") == "g"]
    rc = pub.publish("end/t", b"1", qos=1)
    if proto == V5:
        assert rc == 0x10
    a.expect_none(0.3)
    bm.expect_none(0.1)


@pytest.mark.parametrize("proto", BOTH)
def test_group_ends_with_last_members_session_and_its_queue_is_discarded(mk, proto):
    """The last member's session ends (it comes back with a clean start / clean session):
    the group ends and its queue is discarded; a new group on the same name starts empty."""
    a = member(mk, "a", proto, persistent=True)
    assert a.subscribe("$share/g/ses/t", 1) == [1]
    a.disconnect()
    wait_away(mk.broker, 1)
    pub = member(mk, "pub", proto)
    publish_all(pub, "ses/t", 3)
    labels = {"group": "g", "filter": "ses/t"}
    assert metric(mk.broker, "tern_shared_queued_messages", labels) == 3
    fresh = mk.again(a, clean_session=True) if proto == V311 else mk.again(a)
    rc, sp, _ = fresh.connect()
    assert sp is False
    assert not [s for s in series(mk.broker, "tern_shared_queued_messages") if s[0].get("group") == "g"]
    assert fresh.subscribe("$share/g/ses/t", 1) == [1]
    fresh.expect_none(0.5)
    pub.publish("ses/t", b"new", qos=1)
    assert fresh.get().payload == b"new"


def test_group_ends_when_member_session_expires(mk):
    """v5: the last member's session expires (Session Expiry 1 s): the group ends."""
    a = member(mk, "a", V5, properties=props(CONNECT, SessionExpiryInterval=1))
    assert a.subscribe("$share/g/exp/t", 1) == [1]
    a.disconnect()
    labels = {"group": "g", "filter": "exp/t"}
    assert metric(mk.broker, "tern_shared_members", labels) == 1
    deadline = time.monotonic() + 5
    while [s for s in series(mk.broker, "tern_shared_members") if s[0].get("group") == "g"]:
        assert time.monotonic() < deadline, "group still there 5 s after its session expired"
        time.sleep(0.2)


# --------------------------------------------------------------------------- back-pressure


@pytest.mark.parametrize("proto", BOTH)
def test_backpressure_slows_publisher_without_loss(make_broker, mkc, proto):
    """[shared] max_queued_messages = 100, back-pressure on (default), a slow member (Receive
    Maximum 10, ~2 ms per message): the publisher is paused (tern_backpressure_pauses_total),
    not disconnected; nothing is dropped; every message arrives exactly once."""
    b = make_broker({"shared": {"max_queued_messages": 100}})
    slow = mkc("slow", V5, broker=b)
    inner = slow.c.on_message

    def slow_on_message(client, userdata, message):
        time.sleep(0.002)
        inner(client, userdata, message)

    slow.c.on_message = slow_on_message
    slow.connect(properties=props(CONNECT, ReceiveMaximum=10))
    assert slow.subscribe("$share/g/bp/t", 1) == [1]
    pub = member(mkc, "pub", proto, broker=b)
    n = 800
    publish_all(pub, "bp/t", n)
    got = slow.get_n(n, timeout=30)
    assert sorted(ints(got)) == list(range(n))
    slow.expect_none(0.3)
    assert pub.c.is_connected()
    labels = {"group": "g", "filter": "bp/t"}
    assert metric(b, "tern_backpressure_pauses_total") > 0
    assert metric(b, "tern_shared_messages_dropped_total", labels) == 0
    assert metric(b, "tern_messages_dropped_total", {"reason": "queue_full"}) == 0


def test_overflow_without_backpressure_drops(make_broker, mkc):
    """backpressure = false, max_queued_messages = 5, a connected member that never
    acknowledges (Receive Maximum 1): what does not fit is dropped and counted; the publisher
    is never paused; delivered + queued + dropped = published."""
    b = make_broker({"shared": {"max_queued_messages": 5, "backpressure": False}})
    m = mkc("m", V5, broker=b, manual_ack=True)
    m.connect(properties=props(CONNECT, ReceiveMaximum=1))
    assert m.subscribe("$share/g/of/t", 1) == [1]
    pub = member(mkc, "pub", V5, broker=b)
    n = 20
    rcs = publish_all(pub, "of/t", n, refused=True)
    assert len(m.get_n(1)) == 1
    m.expect_none(0.3)
    labels = {"group": "g", "filter": "of/t"}
    dropped = metric(b, "tern_shared_messages_dropped_total", labels)
    queued = metric(b, "tern_shared_queued_messages", labels)
    delivered = metric(b, "tern_shared_messages_delivered_total", labels)
    assert queued == 5
    assert dropped >= n - 1 - 5 - 1 and dropped > 0
    assert delivered + queued + dropped == n, (delivered, queued, dropped)
    assert metric(b, "tern_messages_dropped_total", {"reason": "queue_full"}) == dropped
    assert rcs.count(0x97) == dropped, rcs
    assert metric(b, "tern_backpressure_pauses_total") == 0


def test_publisher_may_keep_receive_maximum_qos2_in_flight_to_durable_group(broker):
    """A v5 publisher keeps the broker's full Receive Maximum of QoS 2 PUBLISHes in flight to
    a durable group (a persistent member away, so every PUBREC waits for the store): all are
    PUBREC'd and no DISCONNECT 0x93 (Receive Maximum exceeded) follows [MQTT-3.3.4-9]."""
    m = raw_member(broker, raw.uid("m"), V5, "$share/g/rmq/t", 2, persistent=True)
    m.disconnect()
    wait_away(broker, 1)
    pub = raw.Client.to(broker, V5, timeout=10)
    ack = pub.connect(raw.uid("pub"))
    rmax = ack.props.get(raw.RECEIVE_MAXIMUM, 65535)
    assert rmax == 1024
    pub.send(b"".join(raw.publish("rmq/t", str(i).encode(), 2, i + 1, version=V5)
                      for i in range(rmax)))
    recs = 0
    deadline = time.monotonic() + 15
    while recs < rmax:
        p = pub.recv(max(0.001, deadline - time.monotonic()))
        assert p.type == raw.PUBREC, f"after {recs} PUBREC: {p!r}"
        assert p.rc == 0, p
        recs += 1
        pub.try_send(raw.pubrel(p.pid, V5))
    comps = 0
    while comps < rmax:
        p = pub.recv(max(0.001, deadline - time.monotonic()))
        assert p.type == raw.PUBCOMP, p
        comps += 1
    pub.disconnect()


# --------------------------------------------------------------------------- metrics


def test_metrics_per_group(mk):
    """Per-group series labelled group (ShareName) and filter: members, queued, delivered."""
    a = member(mk, "a", V5)
    bm = member(mk, "b", V5)
    assert a.subscribe([("$share/alpha/mx/+", 1), ("$share/beta/mx/t", 1)]) == [1, 1]
    assert bm.subscribe("$share/alpha/mx/+", 1) == [1]
    pub = member(mk, "pub", V5)
    publish_all(pub, "mx/t", 4)
    gather([a, bm], 8)
    ms = {(s[0]["group"], s[0]["filter"]): s[1] for s in series(mk.broker, "tern_shared_members")}
    assert ms == {("alpha", "mx/+"): 2, ("beta", "mx/t"): 1}
    assert metric(mk.broker, "tern_shared_messages_delivered_total",
                  {"group": "alpha", "filter": "mx/+"}) == 4
    assert metric(mk.broker, "tern_shared_messages_delivered_total",
                  {"group": "beta", "filter": "mx/t"}) == 4
    assert metric(mk.broker, "tern_shared_queued_messages", {"group": "alpha"}) == 0


# --------------------------------------------------------------------------- flash sale


def test_flash_sale_qos1_with_killed_worker(make_broker):
    """examples/flash_sale.py at test scale: 20,000 QoS 1 orders, 4 worker processes at 1500
    orders/s each, one SIGKILLed halfway and restarted: every order is processed at least
    once. The group queue is small (2,000) so the burst is held back by back-pressure; nothing
    is dropped and the broker's memory stays bounded."""
    b = make_broker({"shared": {"max_queued_messages": 2000}})
    lines = []
    r = flash_sale.run(b.host, b.port, b.metrics_port, orders=20_000, workers=4, rate=1500,
                       qos=1, kill_one=True, timeout=20, max_rss_mb=512, log=lines.append)
    assert r["missing"] == 0 and r["distinct"] == 20_000, (r, lines)
    assert r["killed"] and r["restarted"], r
    assert r["backpressure_pauses"] > 0, r
    assert r["redelivered"] > 0, "the killed worker held unacknowledged orders: " + repr(r)
    assert r["dropped"] == 0, r
    # Bounded by the limit, plus what a leaving worker gives back (its window, 1024): given-back
    # messages were acknowledged to the publisher and are never dropped.
    assert r["queued_peak"] <= 2000 + 1024, r
    assert r["drain_s"] < 20, r
    assert metric(b, "tern_messages_dropped_total", {"reason": "queue_full"}) == 0
    # The workers left with Session Expiry 0: the group is gone.
    assert not series(b, "tern_shared_members")


def test_flash_sale_qos2_exactly_once(make_broker):
    """The same with QoS 2 (10,000 orders): persistent worker sessions, the killed worker
    restarted with its journal of PUBREC'd packet ids: every order processed exactly once."""
    b = make_broker()
    lines = []
    r = flash_sale.run(b.host, b.port, b.metrics_port, orders=10_000, workers=4, rate=1500,
                       qos=2, kill_one=True, timeout=20, max_rss_mb=512, log=lines.append)
    assert r["missing"] == 0 and r["duplicates"] == 0, (r, lines)
    assert r["processed"] == 10_000, r
    assert r["killed"] and r["restarted"], r
    # The killed worker's unacknowledged orders came back to it (DUP=1), not to the others.
    assert r["resent"] > 0, r


def test_flash_sale_cli_prints_ok(broker):
    """The example as a program: small run, exits 0 and prints OK."""
    out = subprocess.run(
        [sys.executable, os.path.join(conftest.ROOT, "examples", "flash_sale.py"),
         "--host", broker.host, "--port", str(broker.port),
         "--metrics-port", str(broker.metrics_port), "--orders", "2000", "--workers", "2",
         "--rate", "2000", "--timeout", "10"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1].startswith("OK 2000 orders processed"), out.stdout
