"""MQTT 3.1.1 (and 3.1) behaviour of Tern as seen by a real library client, paho-mqtt 2.x.

Each test gets its own broker process (conftest `broker` / `make_broker`) on ephemeral loopback
ports. Statement ids such as [MQTT-3.3.1-9] refer to the MQTT 3.1.1 specification.
"""
import re
import threading
import time

import pytest

from pahoutil import (TIMEOUT, V31, V311, ClientFactory, Will, metric)

P = V311


@pytest.fixture
def mk(broker, request):
    f = ClientFactory(broker, request.node.name)
    yield f
    f.close()


@pytest.fixture
def mkc(make_broker, request):
    """Factory for tests that start their own broker: mkc("name", broker=b)."""
    f = ClientFactory(None, request.node.name)
    yield f
    f.close()


# --------------------------------------------------------------------------- connect


def test_connect_clean_session_accepted(mk):
    """CONNACK 0 and Session Present 0 for a clean session [MQTT-3.2.2-1] [MQTT-3.2.2-3]."""
    c = mk("c", P)
    rc, sp, _ = c.connect()
    assert rc == 0
    assert sp is False


def test_mqtt31_mqisdp_client_can_publish_and_subscribe(mk):
    """An MQTT 3.1 client (protocol name MQIsdp, level 3) is accepted and can exchange messages
    with a 3.1.1 client."""
    old = mk("v31", V31)
    old.c._client_id = b"v31-old"
    rc, sp, _ = old.connect()
    assert rc == 0
    assert old.subscribe("v31/t", 1) == [1]
    new = mk("p", P)
    new.connect()
    assert new.subscribe("v31/back", 1) == [1]
    new.publish("v31/t", b"to-31", qos=1)
    m = old.get()
    assert (m.topic, m.payload, m.qos) == ("v31/t", b"to-31", 1)
    old.publish("v31/back", b"from-31", qos=1)
    m = new.get()
    assert (m.topic, m.payload, m.qos) == ("v31/back", b"from-31", 1)


def test_empty_client_id_with_clean_session_is_accepted(mk):
    """A zero-byte ClientId with CleanSession=1 gets a server-assigned id and works
    [MQTT-3.1.3-6] [MQTT-3.1.3-7]."""
    c = mk("anon", P)
    c.c._client_id = b""
    rc, sp, _ = c.connect()
    assert rc == 0 and sp is False
    assert c.subscribe("emptyid/t", 1) == [1]
    c.publish("emptyid/t", b"x", qos=1)
    assert c.get().payload == b"x"
    # A second anonymous client gets a different id: both stay connected.
    d = mk("anon2", P)
    d.c._client_id = b""
    d.connect()
    assert d.subscribe("emptyid/t", 0) == [0]
    c.publish("emptyid/t", b"y", qos=1)
    assert c.get().payload == b"y"
    assert d.get().payload == b"y"
    assert c.c.is_connected() and d.c.is_connected()


def test_empty_client_id_without_clean_session_rejected(mk):
    """A zero-byte ClientId with CleanSession=0 is refused with CONNACK return code 0x02
    (identifier rejected) [MQTT-3.1.3-8]."""
    c = mk("emptyp", P, clean_session=False)
    c.c._client_id = b""
    # paho retries with a random id after a 0x02 refusal when reconnect_on_failure is on; the
    # refusal itself is visible in its log line "Received CONNACK (flags, 2)".
    c.c._reconnect_on_failure = True
    c.c.connect(c.broker.host, c.broker.port, 60)
    c.c.loop_start()
    deadline = time.monotonic() + TIMEOUT
    pat = re.compile(r"Received CONNACK \((0|False), 2\)")
    while time.monotonic() < deadline and not any(pat.search(l) for l in c.log_lines):
        time.sleep(0.05)
    assert any(pat.search(l) for l in c.log_lines), c.log_lines
    c.c._reconnect_on_failure = False


def test_anonymous_refused_when_not_allowed(make_broker, mkc):
    """allow_anonymous=false and no username: CONNACK return code 0x05 (not authorized), and
    the connection is closed [MQTT-3.2.2-5]."""
    b = make_broker({"auth": {"allow_anonymous": False}})
    c = mkc("anon", P, broker=b)
    rc, sp, _ = c.connect(expect_rc=None)
    assert rc == 0x87  # paho maps 3.1.1 return code 5 to reason "Not authorized" (0x87)
    assert any(re.search(r"Received CONNACK \((0|False), 5\)", l) for l in c.log_lines), c.log_lines
    assert sp is False  # [MQTT-3.2.2-4]
    c.wait_disconnect()


def test_takeover_closes_old_connection_and_publishes_its_will(mk):
    """A second connection with the same ClientId disconnects the first [MQTT-3.1.4-2]; the old
    connection was not closed by DISCONNECT, so its will is published."""
    watcher = mk("watch", P)
    watcher.connect()
    watcher.subscribe("takeover/will", 1)
    old = mk("dup", P)
    old.connect(will=Will("takeover/will", b"old-gone", qos=1))
    new = mk.again(old)
    new.connect()
    rc, flags, _, _ = old.wait_disconnect()
    assert not old.c.is_connected()
    assert new.c.is_connected()
    m = watcher.get()
    assert (m.topic, m.payload) == ("takeover/will", b"old-gone")
    # The new connection works.
    assert new.subscribe("takeover/x", 1) == [1]
    watcher.publish("takeover/x", b"hi", qos=1)
    assert new.get().payload == b"hi"
    assert new.c.is_connected()


def test_takeover_of_persistent_session_keeps_it(mk):
    """Taking over a CleanSession=0 session: the new connection gets Session Present=1 and the
    subscriptions of the session [MQTT-3.1.4-2] [MQTT-3.2.2-2]."""
    old = mk("p", P, clean_session=False)
    old.connect()
    old.subscribe("tkp/t", 1)
    new = mk.again(old, clean_session=False)
    rc, sp, _ = new.connect()
    assert sp is True
    old.wait_disconnect()
    pub = mk("pub", P)
    pub.connect()
    pub.publish("tkp/t", b"still", qos=1)
    m = new.get()
    assert (m.payload, m.qos) == (b"still", 1)


# --------------------------------------------------------------------------- publish / subscribe


def test_qos_matrix_delivered_at_min_of_publish_and_granted_qos(mk):
    """Every publish QoS x subscription QoS combination completes its handshake and is delivered
    once at min(publish QoS, granted QoS) [MQTT-3.8.4-6] [MQTT-4.3.3-1] [MQTT-3.3.5-1]."""
    sub = mk("sub", P)
    sub.connect()
    for sq in (0, 1, 2):
        assert sub.subscribe(f"qm/s{sq}", sq) == [sq]
    pub = mk("pub", P)
    pub.connect()
    for pq in (0, 1, 2):
        for sq in (0, 1, 2):
            pub.publish(f"qm/s{sq}", f"p{pq}s{sq}".encode(), qos=pq)
            m = sub.get()
            assert m.topic == f"qm/s{sq}"
            assert m.payload == f"p{pq}s{sq}".encode()
            assert m.qos == min(pq, sq), (pq, sq, m.qos)
            assert m.retain is False
    sub.expect_none(0.3)


def test_empty_payload_and_unicode_topic(mk):
    """A zero-length payload is a valid message [MQTT-3.3.3-1]; topic names are UTF-8 and may
    contain spaces and non-ASCII characters [MQTT-4.7.3-1]."""
    sub = mk("sub", P)
    sub.connect()
    topic = "uni/grüße dir/日本"
    assert sub.subscribe([("uni/+/日本", 1), ("empty/t", 1)]) == [1, 1]
    pub = mk("pub", P)
    pub.connect()
    pub.publish("empty/t", b"", qos=1)
    m = sub.get()
    assert (m.topic, m.payload) == ("empty/t", b"")
    pub.publish(topic, "ü".encode(), qos=1)
    m = sub.get()
    assert (m.topic, m.payload) == (topic, "ü".encode())


def test_qos2_delivered_exactly_once_to_each_subscriber(mk):
    """QoS 2 messages reach each subscriber exactly once [MQTT-4.3.3-2]."""
    subs = [mk(f"s{i}", P) for i in range(3)]
    for s in subs:
        s.connect()
        s.subscribe("eo/t", 2)
    pub = mk("pub", P)
    pub.connect()
    for i in range(10):
        pub.publish("eo/t", str(i).encode(), qos=2, wait=False)
    for s in subs:
        msgs = s.get_n(10)
        assert [m.payload for m in msgs] == [str(i).encode() for i in range(10)]
        assert all(m.qos == 2 for m in msgs)
        s.expect_none(0.3)


def test_pubacks_in_order_of_publishes(mk):
    """PUBACK / PUBCOMP come back in the order the PUBLISHes were sent [MQTT-4.6.0-2]
    [MQTT-4.6.0-3] [MQTT-4.6.0-4]; messages on one topic keep their order [MQTT-4.6.0-6]."""
    sub = mk("sub", P)
    sub.connect()
    sub.subscribe("ord/#", 2)
    pub = mk("pub", P)
    pub.connect()
    mids1 = [pub.publish("ord/q1", f"a{i}".encode(), qos=1, wait=False) for i in range(30)]
    for mid in mids1:
        assert pub.wait_published(mid) == 0
    assert pub.puback_order == mids1
    del pub.puback_order[:]
    mids2 = [pub.publish("ord/q2", f"b{i}".encode(), qos=2, wait=False) for i in range(20)]
    for mid in mids2:
        pub.wait_published(mid)
    assert pub.puback_order == mids2
    got = [m.payload for m in sub.get_n(50)]
    assert got == [f"a{i}".encode() for i in range(30)] + [f"b{i}".encode() for i in range(20)]


def test_wildcards(mk):
    """'+' matches one level, '#' any number of levels including the parent [MQTT-4.7.1-2];
    '+' matches an empty level [MQTT-4.7.1-3]."""
    sub = mk("sub", P)
    sub.connect()
    filters = ["wc/+/x", "wc/a/#", "wc/+", "+/+/+/z"]
    assert sub.subscribe([(f, 0) for f in filters]) == [0, 0, 0, 0]
    pub = mk("pub", P)
    pub.connect()
    cases = {
        "wc/b/x": True,      # wc/+/x
        "wc/a": True,        # wc/a/# matches the parent level
        "wc/a/b/c": True,    # wc/a/#
        "wc/": True,         # wc/+ matches an empty level
        "wc/b/y": False,
        "wc/b/x/y": False,   # + is a single level
        "wcx/a": False,
        "q/w/e/z": True,     # +/+/+/z
        "q/w/z": False,
    }
    for topic in cases:
        pub.publish(topic, topic.encode(), qos=1)
    pub.publish("wc/end", b"end", qos=1)  # matched by wc/+: marks the end
    got = []
    while True:
        m = sub.get()
        if m.payload == b"end":
            break
        got.append(m.topic)
    expected = [t for t, want in cases.items() if want]
    assert sorted(got) == sorted(expected)
    assert len(got) == len(set(got))


def test_dollar_topics_not_delivered_and_not_matched_by_wildcards(mk):
    """Topics starting with '$' are the broker's: a client PUBLISH to "$SYS/x" or "$foo" is not
    delivered to anyone, neither to "$SYS/+" nor to "#" or "+/x" [MQTT-4.7.2-1]. ("$SYS/+", not
    "$SYS/#": the broker's own retained $SYS/broker/... topics are two levels deep.)"""
    sub = mk("sub", P)
    sub.connect()
    assert sub.subscribe([("$SYS/+", 1), ("#", 1), ("+/x", 1), ("$foo", 1)]) == [1, 1, 1, 1]
    pub = mk("pub", P)
    pub.connect()
    pub.publish("$SYS/x", b"sys", qos=1)
    pub.publish("$foo", b"foo", qos=0)
    pub.publish("$SYS/x", b"sys0", qos=0)
    sub.expect_none(0.7)
    pub.publish("dollar/x", b"normal", qos=1)
    m = sub.get()
    assert (m.topic, m.payload, m.qos) == ("dollar/x", b"normal", 1)  # one copy
    sub.expect_none(0.3)
    assert pub.c.is_connected()


def test_overlapping_subscriptions_deliver_one_copy_at_highest_qos(mk):
    """Several matching subscriptions of one client: one copy, at the highest granted QoS
    [MQTT-3.3.5-1]."""
    sub = mk("sub", P)
    sub.connect()
    assert sub.subscribe([("ov/+", 0), ("ov/#", 2), ("ov/x", 1)]) == [0, 2, 1]
    pub = mk("pub", P)
    pub.connect()
    pub.publish("ov/x", b"m", qos=2)
    m = sub.get()
    assert (m.topic, m.payload, m.qos) == ("ov/x", b"m", 2)
    sub.expect_none(0.5)
    pub.publish("ov/x", b"m1", qos=1)
    m = sub.get()
    assert (m.payload, m.qos) == (b"m1", 1)
    sub.expect_none(0.3)


def test_resubscribe_replaces_subscription_qos(mk):
    """Subscribing again to an identical filter replaces the subscription (new QoS), it does not
    add a second one [MQTT-3.8.4-3]."""
    sub = mk("sub", P)
    sub.connect()
    assert sub.subscribe("rs/t", 2) == [2]
    assert sub.subscribe("rs/t", 0) == [0]
    pub = mk("pub", P)
    pub.connect()
    pub.publish("rs/t", b"x", qos=2)
    m = sub.get()
    assert m.qos == 0
    sub.expect_none(0.4)


def test_unsubscribe_stops_delivery(mk):
    """After UNSUBACK no new messages for the removed filter [MQTT-3.10.4-2]; UNSUBSCRIBE of a
    filter that does not exist is still acknowledged [MQTT-3.10.4-5]."""
    sub = mk("sub", P)
    sub.connect()
    sub.subscribe([("us/a", 1), ("us/b", 1)])
    pub = mk("pub", P)
    pub.connect()
    sub.unsubscribe("us/a")
    sub.unsubscribe("us/never-subscribed")  # must still get an UNSUBACK
    pub.publish("us/a", b"a", qos=1)
    pub.publish("us/b", b"b", qos=1)
    m = sub.get()
    assert (m.topic, m.payload) == ("us/b", b"b")
    sub.expect_none(0.4)


def test_suback_failure_codes(mk):
    """Invalid filters and malformed shared subscriptions get 0x80 in the SUBACK while the valid filters of
    the same SUBSCRIBE are granted [MQTT-3.9.3-2] [MQTT-4.7.1-1]."""
    other = mk("other", P)
    other.connect()
    sub = mk("sub", P)
    sub.connect()
    filters = [("sf/ok", 1), ("sf/#/x", 1), ("sf/a#", 0), ("sf/a+/b", 2), ("$share/g+/sf/t", 1),
               (f"reply/{other.client_id}/#", 1), ("sf/ok2", 2)]
    assert sub.subscribe(filters) == [1, 0x80, 0x80, 0x80, 0x80, 0x80, 2]
    pub = mk("pub", P)
    pub.connect()
    pub.publish("sf/ok", b"1", qos=1)
    pub.publish(f"reply/{other.client_id}/x", b"nope", qos=1)
    pub.publish("sf/ok2", b"2", qos=1)
    assert [m.payload for m in sub.get_n(2)] == [b"1", b"2"]
    sub.expect_none(0.3)
    assert sub.c.is_connected()


def test_max_qos_config_limits_granted_qos(make_broker, mkc):
    """mqtt.max_qos=1: SUBACK grants min(requested, 1) and QoS 2 publishes are delivered at 1."""
    b = make_broker({"mqtt": {"max_qos": 1}})
    sub = mkc("sub", P, broker=b)
    sub.connect()
    assert sub.subscribe([("mq/0", 0), ("mq/1", 1), ("mq/2", 2)]) == [0, 1, 1]
    pub = mkc("pub", P, broker=b)
    pub.connect()
    pub.publish("mq/2", b"x", qos=1)
    assert sub.get().qos == 1


# --------------------------------------------------------------------------- retained


def test_retained_store_replace_delete(mk):
    """Retained messages are stored and sent with RETAIN=1 to new subscribers [MQTT-3.3.1-5]
    [MQTT-3.3.1-8]; a new retained message replaces the old one; an empty retained payload deletes
    it [MQTT-3.3.1-10] [MQTT-3.3.1-11]; live deliveries to existing subscribers have RETAIN=0
    [MQTT-3.3.1-9]; the retained QoS is capped by the subscription's."""
    pub = mk("pub", P)
    pub.connect()
    pub.publish("ret/a", b"one", qos=1, retain=True)
    pub.publish("ret/b", b"bee", qos=0, retain=True)
    s1 = mk("s1", P)
    s1.connect()
    s1.subscribe("ret/a", 1)
    m = s1.get()
    assert (m.topic, m.payload, m.retain, m.qos) == ("ret/a", b"one", True, 1)
    # Live message to an existing subscriber: RETAIN=0.
    pub.publish("ret/a", b"two", qos=1, retain=True)
    m = s1.get()
    assert (m.payload, m.retain) == (b"two", False)
    # The new retained message replaced the old one.
    s2 = mk("s2", P)
    s2.connect()
    s2.subscribe("ret/+", 0)
    got = {m.topic: m for m in s2.get_n(2)}
    assert got["ret/a"].payload == b"two" and got["ret/a"].retain is True
    assert got["ret/a"].qos == 0
    assert got["ret/b"].payload == b"bee" and got["ret/b"].retain is True
    s2.expect_none(0.3)
    # Delete by empty retained payload.
    pub.publish("ret/a", b"", qos=1, retain=True)
    s2.drain(0.3)
    s3 = mk("s3", P)
    s3.connect()
    s3.subscribe("ret/#", 1)
    m = s3.get()
    assert (m.topic, m.payload) == ("ret/b", b"bee")
    s3.expect_none(0.4)


def test_retained_sent_again_on_resubscribe(mk):
    """Re-subscribing to an existing filter re-sends the matching retained messages
    [MQTT-3.8.4-3]."""
    pub = mk("pub", P)
    pub.connect()
    pub.publish("rr/t", b"kept", qos=1, retain=True)
    sub = mk("sub", P)
    sub.connect()
    sub.subscribe("rr/t", 1)
    assert sub.get().payload == b"kept"
    sub.subscribe("rr/t", 1)
    m = sub.get()
    assert (m.payload, m.retain) == (b"kept", True)


# --------------------------------------------------------------------------- sessions


def test_persistent_session_queues_qos1_and_qos2_not_qos0(mk):
    """CleanSession=0: subscriptions survive a disconnect, QoS 1/2 messages published meanwhile
    are queued and delivered on reconnect, QoS 0 ones are not; Session Present=1
    [MQTT-3.1.2-4] [MQTT-3.1.2-5] [MQTT-3.2.2-2]."""
    sub = mk("sub", P, clean_session=False)
    rc, sp, _ = sub.connect()
    assert sp is False
    sub.subscribe([("ps/q1", 1), ("ps/q2", 2)])
    sub.disconnect()
    pub = mk("pub", P)
    pub.connect()
    pub.publish("ps/q1", b"q1", qos=1)
    pub.publish("ps/q2", b"q2", qos=2)
    pub.publish("ps/q1", b"q0", qos=0)
    pub.publish("ps/q2", b"q2b", qos=1)
    again = mk.again(sub, clean_session=False)
    rc, sp, _ = again.connect()
    assert sp is True
    got = again.get_n(3)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [
        ("ps/q1", b"q1", 1), ("ps/q2", b"q2", 2), ("ps/q2", b"q2b", 1)]
    # On the wire in publish order [MQTT-4.6.0-6].
    assert [(t, q) for t, q, _, _ in again.wire_publishes()] == [
        ("ps/q1", 1), ("ps/q2", 2), ("ps/q2", 1)]
    again.expect_none(0.4)
    # The subscription is still there for live messages too.
    pub.publish("ps/q1", b"live", qos=1)
    assert again.get().payload == b"live"


def test_clean_session_discards_previous_session(mk):
    """Connecting with CleanSession=1 discards the stored session [MQTT-3.1.2-6]; a clean
    session is not kept after it disconnects either."""
    a = mk("a", P, clean_session=False)
    a.connect()
    a.subscribe("cs/t", 1)
    a.disconnect()
    b = mk.again(a, clean_session=True)
    rc, sp, _ = b.connect()
    assert sp is False
    b.disconnect()
    pub = mk("pub", P)
    pub.connect()
    pub.publish("cs/t", b"lost", qos=1)
    c = mk.again(a, clean_session=False)
    rc, sp, _ = c.connect()
    assert sp is False
    c.expect_none(0.5)
    pub.publish("cs/t", b"not subscribed", qos=1)
    c.expect_none(0.3)


def test_session_present_after_reconnect_without_messages(mk):
    """CleanSession=0 reconnect: Session Present=1 even with nothing queued [MQTT-3.2.2-2]."""
    a = mk("a", P, clean_session=False)
    a.connect()
    a.disconnect()
    b = mk.again(a, clean_session=False)
    rc, sp, _ = b.connect()
    assert rc == 0 and sp is True


def test_offline_queue_overflow_dropped_and_counted(make_broker, mkc):
    """limits.max_queued_messages bounds the offline queue; the overflow is dropped and counted in
    tern_messages_dropped_total{reason="queue_full"}."""
    b = make_broker({"limits": {"max_queued_messages": 5}})
    sub = mkc("sub", P, broker=b, clean_session=False)
    sub.connect()
    sub.subscribe("qf/t", 1)
    sub.disconnect()
    before = metric(b, "tern_messages_dropped_total", {"reason": "queue_full"})
    pub = mkc("pub", P, broker=b)
    pub.connect()
    for i in range(8):
        pub.publish("qf/t", str(i).encode(), qos=1)
    deadline = time.monotonic() + TIMEOUT
    after = metric(b, "tern_messages_dropped_total", {"reason": "queue_full"})
    while after - before < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
        after = metric(b, "tern_messages_dropped_total", {"reason": "queue_full"})
    assert after - before == 3
    again = mkc.again(sub, clean_session=False)
    rc, sp, _ = again.connect()
    assert sp is True
    got = [m.payload for m in again.get_n(5)]
    again.expect_none(0.5)
    assert len(set(got)) == 5 and set(got) <= {str(i).encode() for i in range(8)}
    assert got == sorted(got)  # queue order kept
    assert metric(b, "tern_messages_dropped_total", {"reason": "queue_full"}) - before == 3


def test_unacked_qos1_resent_with_dup_on_reconnect(mk):
    """Unacknowledged QoS 1 PUBLISHes are re-sent on reconnect of a persistent session, with DUP=1,
    the same packet ids and in the original order [MQTT-4.4.0-1] [MQTT-3.3.1-1]
    [MQTT-4.6.0-1]."""
    sub = mk("sub", P, clean_session=False, manual_ack=True)
    sub.connect()
    sub.subscribe("dup/t", 1)
    pub = mk("pub", P)
    pub.connect()
    for i in range(3):
        pub.publish("dup/t", f"m{i}".encode(), qos=1)
    first = sub.get_n(3)
    assert all(not m.dup for m in first)
    sub.disconnect()  # never acknowledged
    again = mk.again(sub, clean_session=False)
    rc, sp, _ = again.connect()
    assert sp is True
    second = again.get_n(3)
    assert [m.payload for m in second] == [b"m0", b"m1", b"m2"]
    assert [m.mid for m in second] == [m.mid for m in first]
    assert all(m.dup for m in second)
    again.expect_none(0.3)


def test_pubrecd_qos2_resumed_with_pubrel_not_resent(mk):
    """A QoS 2 message the client already PUBREC'd is resumed with PUBREL after reconnect, not
    re-sent as PUBLISH [MQTT-4.4.0-1] [MQTT-4.3.3-1]."""
    sub = mk("sub", P, clean_session=False, manual_ack=True)
    sub.connect()
    sub.subscribe("rel/t", 2)
    pub = mk("pub", P)
    pub.connect()
    pub.publish("rel/t", b"once", qos=2)
    m = sub.get()  # paho delivers on PUBREL; with manual_ack it holds the PUBCOMP back
    assert m.payload == b"once"
    mid = m.mid
    sub.disconnect()
    again = mk.again(sub, clean_session=False)
    again.connect()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and not any(
            f"Received PUBREL (Mid: {mid})" in l for l in again.log_lines):
        time.sleep(0.05)
    assert any(f"Received PUBREL (Mid: {mid})" in l for l in again.log_lines), again.log_lines
    again.expect_none(0.4)
    assert not any(l.startswith("Received PUBLISH") for l in again.log_lines)


# --------------------------------------------------------------------------- will


def test_will_published_on_abnormal_close(mk):
    """A network close without DISCONNECT publishes the will [MQTT-3.1.2-8]."""
    w = mk("w", P)
    w.connect()
    w.subscribe("will/t", 1)
    c = mk("c", P)
    c.connect(will=Will("will/t", b"bye", qos=1))
    c.drop()
    m = w.get()
    assert (m.topic, m.payload, m.qos, m.retain) == ("will/t", b"bye", 1, False)


def test_will_not_published_after_disconnect(mk):
    """After a normal DISCONNECT the will is discarded, not published [MQTT-3.1.2-10]
    [MQTT-3.14.4-3]."""
    w = mk("w", P)
    w.connect()
    w.subscribe("will/n", 1)
    c = mk("c", P)
    c.connect(will=Will("will/n", b"bye", qos=1))
    c.disconnect()
    w.expect_none(1.0)


def test_will_qos_and_retain_honoured(mk):
    """Will QoS and Will Retain: the will is published at its QoS and stored as retained
    [MQTT-3.1.2-14] [MQTT-3.1.2-17]."""
    w = mk("w", P)
    w.connect()
    w.subscribe("will/r", 2)
    c = mk("c", P)
    c.connect(will=Will("will/r", b"gone", qos=2, retain=True))
    c.drop()
    m = w.get()
    assert (m.payload, m.qos) == (b"gone", 2)
    late = mk("late", P)
    late.connect()
    late.subscribe("will/r", 2)
    m = late.get()
    assert (m.payload, m.qos, m.retain) == (b"gone", 2, True)


def test_keepalive_timeout_closes_and_publishes_will(mk):
    """A client that stops sending within 1.5 x keep alive is disconnected and its will is
    published [MQTT-3.1.2-24]."""
    w = mk("w", P)
    w.connect()
    w.subscribe("ka/will", 1)
    c = mk("c", P)
    c.connect(keepalive=1, will=Will("ka/will", b"timeout", qos=1))
    c.publish("ka/other", b"x", qos=1)  # last packet from the client
    c.pause()
    t0 = time.monotonic()
    sock = c.c.socket()
    sock.settimeout(6)
    closed_at = None
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            closed_at = time.monotonic()
            break
        data += chunk
        if time.monotonic() - t0 > 6:
            break
    assert closed_at is not None, "broker did not close the silent connection"
    elapsed = closed_at - t0
    assert 1.0 <= elapsed <= 3.5, elapsed
    m = w.get(timeout=3)
    assert m.payload == b"timeout"
    # 3.1.1: just closed; at most a PINGRESP to a PINGREQ paho sent before it was paused.
    assert data.replace(b"\xd0\x00", b"") == b"", data


# --------------------------------------------------------------------------- limits / misc


def test_oversized_packet_closes_only_that_client(make_broker, mkc):
    """A PUBLISH larger than limits.max_packet_size closes the 3.1.1 connection (its will is
    published); other clients are unaffected."""
    b = make_broker({"limits": {"max_packet_size": 1024}})
    other = mkc("other", P, broker=b)
    other.connect()
    other.subscribe("big/#", 1)
    c = mkc("c", P, broker=b)
    c.connect(will=Will("big/will", b"w", qos=1))
    c.publish("big/t", b"x" * 2000, qos=1, wait=False, closes=True)
    c.wait_disconnect()
    m = other.get()  # not the oversized message, but the will of the closed connection
    assert (m.topic, m.payload) == ("big/will", b"w")
    other.expect_none(0.3)
    p = mkc("p", P, broker=b)
    p.connect()
    p.publish("big/t", b"small", qos=1)
    assert other.get().payload == b"small"


def test_many_concurrent_clients(mk):
    """Ten publishers and ten subscribers at once: every subscriber gets every message once, and
    per-publisher order is kept [MQTT-4.6.0-6]."""
    n, per = 10, 20
    subs = [mk(f"s{i}", P) for i in range(n)]
    for s in subs:
        s.connect()
        s.subscribe("many/#", 1)
    pubs = [mk(f"p{i}", P) for i in range(n)]
    for p in pubs:
        p.connect()
    errors = []

    def run(i, p):
        try:
            mids = [p.publish(f"many/{i}", f"{i}:{k}".encode(), qos=1, wait=False)
                    for k in range(per)]
            for mid in mids:
                p.wait_published(mid)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(pubs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert not errors
    for s in subs:
        got = [m.payload.decode() for m in s.get_n(n * per, timeout=10)]
        assert len(set(got)) == n * per
        for i in range(n):
            seq = [int(x.split(":")[1]) for x in got if x.startswith(f"{i}:")]
            assert seq == list(range(per))
