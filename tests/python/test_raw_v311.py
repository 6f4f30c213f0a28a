"""Raw-socket conformance tests for MQTT 3.1 / 3.1.1 behaviour (several also run on 5.0).

Library clients acknowledge and renumber on their own, so everything that depends on exact
packet ids, DUP flags, acknowledgement order or the absence of an acknowledgement is driven
byte-by-byte through `mqttraw`. Every case names the normative statement it checks.
"""
import socket
import time

import pytest

from mqttraw import (
    CONNACK, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, DISCONNECT,
    SESSION_EXPIRY_INTERVAL, V31, V311, V5, Client, check_broker_serves, connect,
    connected, pubcomp, pubrec, pubrel, puback, publish, uid, SUBACK, subscribe,
)

BOTH = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]


def persistent(version):
    """CONNECT keyword arguments for a session that outlives the network connection."""
    if version == V5:
        return dict(clean=False, properties=[(SESSION_EXPIRY_INTERVAL, 300)])
    return dict(clean=False)


# ---------------------------------------------------------------------------------------------
# CONNECT / CONNACK
# ---------------------------------------------------------------------------------------------
def test_mqtt31_mqisdp_connect_publish_subscribe(broker):
    """MQTT 3.1 (protocol name "MQIsdp", level 3) is accepted and works end to end; a 3.1.1
    subscriber receives the 3.1 client's message too."""
    topic = f"v31/{uid('t')}"
    other = connected(broker, uid("v311"), V311)
    assert other.subscribe([(topic, 1)]).codes == [1]
    c = Client.to(broker, V31)
    c.send(connect(uid("v31"), version=V31))
    ack = c.expect(CONNACK)
    assert ack.raw == b"\x20\x02\x00\x00", ack
    sub = c.subscribe([(topic, 1)], pid=3)
    assert sub.codes == [1], sub
    done = c.publish(topic, b"hello 3.1", qos=1, pid=9)
    assert done.raw == b"\x40\x02\x00\x09", done
    got = c.expect(PUBLISH)
    assert (got.topic, got.payload, got.qos) == (topic, b"hello 3.1", 1), got
    c.send(puback(got.pid))
    got2 = other.expect(PUBLISH)
    assert (got2.topic, got2.payload, got2.qos) == (topic, b"hello 3.1", 1), got2
    other.send(puback(got2.pid))
    assert c.ping().raw == b"\xd0\x00"
    c.disconnect()
    other.disconnect()


@pytest.mark.parametrize("version", [V311, V5])
def test_packets_pipelined_behind_connect_are_handled_at_once(broker, version):
    """A client may send SUBSCRIBE and PUBLISH right behind CONNECT without waiting for CONNACK
    [MQTT-3.1.4-5 allows it]: all of them arrive in one segment and are answered without the
    client sending anything more."""
    topic = f"pipe/{uid('t')}"
    c = Client.to(broker, version)
    c.send(connect(uid("pipe"), version=version)
           + subscribe(1, [(topic, 1)], version=version)
           + publish(topic, b"self", qos=1, pid=2, version=version))
    assert c.expect(CONNACK).body[1] == 0
    assert c.expect_ack(SUBACK, timeout=2.0).body[2:] in (b"\x01", b"\x00\x01")
    assert c.expect_ack(PUBACK, timeout=2.0) is not None
    # and its own message comes back through the subscription
    m, _ = c.recv_until(lambda p: p.type == PUBLISH, timeout=2.0)
    assert m.body.endswith(b"self")


@pytest.mark.parametrize("level", [
    pytest.param(6, id="level6-[MQTT-3.1.2-2]"),
    pytest.param(2, id="level2-[MQTT-3.1.2-2]"),
    pytest.param(255, id="level255-[MQTT-3.1.2-2]"),
])
def test_unknown_protocol_level_connack_0x01(broker, level):
    """[MQTT-3.1.2-2] An unsupported protocol level gets CONNACK return code 0x01 (3.1.1
    format 20 02 00 01) and the connection is closed."""
    c = Client.to(broker, V311)
    c.send(connect(uid("lvl"), version=level, protocol_name="MQTT"))
    packets, closed = c.wait_closed(5)
    assert [p.raw for p in packets] == [b"\x20\x02\x00\x01"], packets
    assert closed
    check_broker_serves(broker)


@pytest.mark.parametrize("name,level", [
    pytest.param("MQTX", 4, id="MQTX-[MQTT-3.1.2-1]"),
    pytest.param("mqtt", 4, id="lowercase-[MQTT-3.1.2-1]"),
])
def test_wrong_protocol_name_closed(broker, name, level):
    """[MQTT-3.1.2-1] A wrong protocol name: the connection is closed without a CONNACK."""
    c = Client.to(broker, V311)
    c.send(connect(uid("name"), version=level, protocol_name=name))
    packets, closed = c.wait_closed(5)
    assert packets == [] and closed, packets
    check_broker_serves(broker)


# MQTT 3.1 ("MQIsdp", level 3) has no section numbers like [MQTT-x.y.z-n]; the cases cite the
# 3.1 specification's CONNECT/CONNACK text.
@pytest.mark.parametrize("clean", [pytest.param(True, id="clean"),
                                   pytest.param(False, id="persistent")])
def test_mqtt31_empty_client_id_rejected_0x02(broker, clean):
    """MQTT 3.1 requires a Client Identifier of 1 to 23 characters and has no assigned ids:
    an empty one gets CONNACK 0x02 (identifier rejected) whatever Clean Session says, then
    the connection is closed."""
    c = Client.to(broker, V31)
    c.send(connect("", version=V31, clean=clean))
    packets, closed = c.wait_closed(5)
    assert [p.raw for p in packets] == [b"\x20\x02\x00\x02"], packets
    assert closed
    check_broker_serves(broker)


@pytest.mark.parametrize("level", [
    pytest.param(4, id="MQIsdp-level4"),
    pytest.param(5, id="MQIsdp-level5"),
    pytest.param(2, id="MQIsdp-level2"),
])
def test_mqisdp_unknown_level_connack_0x01(broker, level):
    """The 3.1 protocol name at a level other than 3: CONNACK 0x01 (unacceptable protocol
    version), as for "MQTT" at an unknown level [MQTT-3.1.2-2], then close."""
    c = Client.to(broker, V311)
    c.send(connect(uid("mqisdp"), version=level, protocol_name="MQIsdp"))
    packets, closed = c.wait_closed(5)
    assert [p.raw for p in packets] == [b"\x20\x02\x00\x01"], packets
    assert closed
    check_broker_serves(broker)


def test_mqtt31_session_present_is_always_0(broker):
    """3.1's CONNACK has no Session Present flag (that byte is reserved): a 3.1 client resuming
    a persistent session gets 20 02 00 00, and the session is resumed all the same (its
    subscription and the message queued while it was away)."""
    cid = uid("v31sp")
    topic = f"v31sp/{cid}"
    c = Client.to(broker, V31)
    c.send(connect(cid, version=V31, clean=False))
    assert c.expect(CONNACK).raw == b"\x20\x02\x00\x00"
    assert c.subscribe([(topic, 1)]).codes == [1]
    c.disconnect()
    p = connected(broker, uid("v31pub"), V311)
    p.publish(topic, b"while away", qos=1, pid=3)
    p.disconnect()
    c = Client.to(broker, V31)
    c.send(connect(cid, version=V31, clean=False))
    assert c.expect(CONNACK).raw == b"\x20\x02\x00\x00"
    got = c.expect(PUBLISH)
    assert (got.topic, got.payload) == (topic, b"while away"), got
    c.send(puback(got.pid))
    c.disconnect()


def test_empty_client_id_persistent_session_rejected_0x02(broker):
    """[MQTT-3.1.3-8] 3.1.1: zero-byte ClientId with CleanSession=0 -> CONNACK 0x02, close."""
    c = Client.to(broker, V311)
    c.send(connect("", version=V311, clean=False))
    packets, closed = c.wait_closed(5)
    assert [p.raw for p in packets] == [b"\x20\x02\x00\x02"], packets
    assert closed


def test_empty_client_id_clean_session_accepted(broker):
    """[MQTT-3.1.3-6] 3.1.1: zero-byte ClientId with CleanSession=1 is accepted (an id is
    assigned) and the client can use the connection."""
    c = Client.to(broker, V311)
    c.send(connect("", version=V311, clean=True))
    ack = c.expect(CONNACK)
    assert ack.raw == b"\x20\x02\x00\x00", ack
    topic = f"anon/{uid('t')}"
    assert c.subscribe([(topic, 0)]).codes == [0]
    c.publish(topic, b"x")
    assert c.expect(PUBLISH).payload == b"x"
    c.disconnect()


@pytest.mark.parametrize("version", BOTH)
def test_session_present_flag(broker, version):
    """[MQTT-3.2.2-1]/[MQTT-3.2.2-2] (3.1.1) [MQTT-3.2.2-2]/[MQTT-3.2.2-3] (5.0): Session
    Present is 0 for a new or clean session and 1 when a stored session is resumed."""
    cid = uid("sp")
    c = Client.to(broker, version)
    assert c.connect(cid, **persistent(version)).session_present is False
    c.subscribe([(f"sp/{cid}", 1)])
    c.disconnect()
    c = Client.to(broker, version)
    assert c.connect(cid, **persistent(version)).session_present is True
    c.disconnect()
    c = Client.to(broker, version)
    assert c.connect(cid, clean=True).session_present is False
    c.disconnect()


# ---------------------------------------------------------------------------------------------
# QoS flows with exact packet ids
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", BOTH)
@pytest.mark.parametrize("qos", [
    pytest.param(1, id="qos1-[MQTT-4.4.0-1][MQTT-3.3.1-1][MQTT-4.6.0-1]"),
    pytest.param(2, id="qos2-[MQTT-4.4.0-1][MQTT-3.3.1-1][MQTT-4.6.0-1]"),
])
def test_unacked_publishes_resent_with_dup_on_reconnect(broker, version, qos):
    """A persistent-session subscriber that does not acknowledge gets the same PUBLISHes again
    after reconnecting with clean start 0: DUP=1, same packet ids, original order
    [MQTT-4.4.0-1][MQTT-3.3.1-1][MQTT-4.6.0-1]. A QoS 2 message the client already PUBREC'd is
    resumed with PUBREL, not re-sent as PUBLISH. A message queued while offline is a first
    transmission and carries DUP=0 [MQTT-3.3.1-3]."""
    sid = uid("dup")
    topic = f"dup/{sid}"
    s = Client.to(broker, version)
    s.connect(sid, **persistent(version))
    assert s.subscribe([(topic, qos)]).codes == [qos]
    pub = connected(broker, uid("pub"), version)
    for i in range(4):
        pub.publish(topic, f"m{i}".encode(), qos=qos, pid=100 + i)
    first = [s.expect(PUBLISH) for _ in range(4)]
    assert [p.payload for p in first] == [b"m0", b"m1", b"m2", b"m3"], first
    assert all(p.qos == qos and not p.dup and p.pid for p in first), first
    assert len({p.pid for p in first}) == 4, first
    if qos == 2:
        s.send(pubrec(first[0].pid, version))
        rel = s.expect(PUBREL)
        assert rel.pid == first[0].pid and rel.flags == 0x2, rel
        # no PUBCOMP: the PUBREL stays unacknowledged
    s.abort()
    time.sleep(0.2)
    pub.publish(topic, b"m4", qos=qos, pid=104)  # queued while the subscriber is away

    s = Client.to(broker, version)
    ack = s.connect(sid, **persistent(version))
    assert ack.session_present is True, ack
    if qos == 1:
        expected_republished = first
    else:
        expected_republished = first[1:]
    want = len(expected_republished) + 1 + (1 if qos == 2 else 0)
    got = [s.recv(5) for _ in range(want)]
    publishes = [p for p in got if p.type == PUBLISH]
    resent = [p for p in publishes if p.payload != b"m4"]
    assert [(p.pid, p.payload, p.qos, p.dup) for p in resent] == [
        (p.pid, p.payload, qos, True) for p in expected_republished], got
    if qos == 2:
        rels = [p for p in got if p.type == PUBREL]
        assert [r.pid for r in rels] == [first[0].pid], got
        assert b"m0" not in [p.payload for p in publishes], got
    fresh = [p for p in publishes if p.payload == b"m4"]
    assert len(fresh) == 1 and fresh[0].dup is False, got
    assert publishes.index(fresh[0]) == len(publishes) - 1, "m4 must follow the re-sent ones"
    assert all(p.type in (PUBLISH, PUBREL) for p in got), got

    # Complete everything; nothing else may follow (no further re-sends).
    if qos == 2:
        s.send(pubcomp(first[0].pid, version))
    for p in publishes:
        s.ack_publish(p)
    s.assert_silent(0.4)
    s.disconnect()
    pub.disconnect()


@pytest.mark.parametrize("version", BOTH)
@pytest.mark.parametrize("variant", [
    pytest.param("same-connection", id="same-connection-[MQTT-4.3.3-2][MQTT-4.3.3-10]"),
    pytest.param("after-reconnect", id="after-reconnect-[MQTT-4.3.3-2][MQTT-4.3.3-10][MQTT-4.4.0-1]"),
])
def test_qos2_inbound_duplicate_not_redelivered(broker, version, variant):
    """Inbound QoS 2 is exactly once: a re-sent PUBLISH (DUP=1) with a packet id awaiting
    PUBREL is answered with PUBREC again and not delivered again (3.1.1 [MQTT-4.3.3-2],
    5.0 [MQTT-4.3.3-10]), also across a reconnect of a persistent session. PUBREL -> PUBCOMP
    with the same id; afterwards the id is free and a new PUBLISH with it is a new message
    (5.0 [MQTT-4.3.3-12])."""
    topic = f"once/{uid('t')}"
    s = connected(broker, uid("sub"), version)
    assert s.subscribe([(topic, 0)]).codes == [0]
    pid_ = uid("pub")
    p = Client.to(broker, version)
    p.connect(pid_, **persistent(version))
    p.send(publish(topic, b"once", qos=2, pid=7, version=version))
    rec = p.expect(PUBREC)
    assert rec.pid == 7 and rec.rc == 0, rec
    p.send(publish(topic, b"once", qos=2, pid=7, dup=True, version=version))
    rec = p.expect(PUBREC)
    assert rec.pid == 7 and rec.rc == 0, rec
    if variant == "after-reconnect":
        p.abort()
        time.sleep(0.2)
        p = Client.to(broker, version)
        assert p.connect(pid_, **persistent(version)).session_present is True
        p.send(publish(topic, b"once", qos=2, pid=7, dup=True, version=version))
        rec = p.expect(PUBREC)
        assert rec.pid == 7 and rec.rc == 0, rec
    p.send(pubrel(7, version))
    comp = p.expect(PUBCOMP)
    assert comp.pid == 7 and comp.rc == 0, comp
    got = s.collect(0.6)
    assert [(g.type, g.topic, g.payload) for g in got] == [(PUBLISH, topic, b"once")], got

    # After PUBCOMP, id 7 is a new application message.
    p.publish(topic, b"again", qos=2, pid=7)
    got = s.collect(0.6)
    assert [(g.type, g.payload) for g in got] == [(PUBLISH, b"again")], got
    p.disconnect()
    s.disconnect()


@pytest.mark.parametrize("version,expected", [
    pytest.param(V311, b"\x70\x02\x00\x2a", id="v311-[MQTT-4.3.3-2]"),
    pytest.param(V5, b"\x70\x03\x00\x2a\x92", id="v5-0x92-[MQTT-4.3.3-11][MQTT-3.7.2-1]"),
])
def test_pubrel_unknown_id_gets_pubcomp(broker, version, expected):
    """PUBREL for a packet id the broker does not know is answered with PUBCOMP for that id
    (v5 reason 0x92 Packet Identifier not found) and the connection stays up."""
    c = connected(broker, uid("rel"), version)
    c.send(pubrel(42, version))
    comp = c.expect(PUBCOMP)
    assert comp.pid == 42, comp
    if version == V5:
        assert comp.rc == 0x92, comp
    else:
        assert comp.raw == expected, comp
    assert c.ping().type == PINGRESP
    c.disconnect()


def wrong_ack_setup(broker, version, qos):
    """A subscriber with one QoS `qos` PUBLISH from the broker in flight, and a will the test
    can watch for. Returns (subscriber, the PUBLISH, watcher, will topic)."""
    topic = f"wrongack/{uid('t')}"
    will_topic = f"{topic}/will"
    watcher = connected(broker, uid("watch"), version)
    watcher.subscribe([(will_topic, 0)])
    s = Client.to(broker, version)
    s.connect(uid("wrong"), will=dict(topic=will_topic, payload=b"gone"))
    s.subscribe([(topic, qos)])
    p = connected(broker, uid("pub"), version)
    p.publish(topic, b"m", qos=qos, pid=1)
    p.disconnect()
    got = s.expect(PUBLISH)
    assert got.qos == qos, got
    return s, got, watcher, will_topic


@pytest.mark.parametrize("version", BOTH)
@pytest.mark.parametrize("qos,answer", [
    pytest.param(1, "pubcomp", id="pubcomp-for-qos1-[MQTT-4.3.2-3]"),
    pytest.param(1, "pubrec", id="pubrec-for-qos1-[MQTT-4.3.2-3]"),
    pytest.param(2, "puback", id="puback-for-qos2-[MQTT-4.3.3-3]"),
    pytest.param(2, "pubcomp", id="pubcomp-before-pubrel-[MQTT-4.3.3-3]"),
    pytest.param(2, "pubrec-then-puback", id="puback-after-pubrel-[MQTT-4.3.3-5]"),
])
def test_wrong_acknowledgement_type_is_a_protocol_error(broker, version, qos, answer):
    """The subscriber answers a PUBLISH with an acknowledgement of the wrong kind: QoS 1 ends
    with PUBACK only [MQTT-4.3.2-3], QoS 2 with PUBREC [MQTT-4.3.3-3] and then, after the
    broker's PUBREL, PUBCOMP [MQTT-4.3.3-5]. That is a protocol error: v5 DISCONNECT 0x82,
    3.1.1 a close without a packet; no PUBREL goes out for a PUBREC to a QoS 1 message, and the
    will is published (an abnormal end)."""
    s, got, watcher, will_topic = wrong_ack_setup(broker, version, qos)
    if answer == "pubrec-then-puback":
        s.send(pubrec(got.pid, version))
        rel = s.expect(PUBREL)
        assert rel.pid == got.pid, rel
        answer = "puback"
    build = {"puback": puback, "pubrec": pubrec, "pubcomp": pubcomp}[answer]
    s.send(build(got.pid, version))
    packets, closed = s.wait_closed(5)
    if version == V5:
        assert [(p.type, p.rc) for p in packets] == [(DISCONNECT, 0x82)], packets
    else:
        assert packets == [], packets
    assert closed
    wills = [(p.topic, p.payload) for p in watcher.collect(1.0) if p.type == PUBLISH]
    assert wills == [(will_topic, b"gone")], wills
    watcher.disconnect()
    check_broker_serves(broker, version=version)


@pytest.mark.parametrize("version", BOTH)
def test_acknowledgements_for_unknown_ids_are_tolerated(broker, version):
    """PUBACK, PUBREC and PUBCOMP for packet ids that are not in flight (a client may repeat
    acknowledgements after a reconnect) change nothing and keep the connection: PUBREC is
    answered with PUBREL (v5 reason 0x92, Packet Identifier not found); a message in flight
    with another id is unaffected and completes normally."""
    s, got, watcher, _ = wrong_ack_setup(broker, version, 1)
    other = 1 if got.pid != 1 else 2
    s.send(puback(other, version) + pubcomp(other, version) + pubrec(other, version))
    rel = s.expect(PUBREL)
    assert rel.pid == other, rel
    if version == V5:
        assert rel.rc == 0x92, rel
    assert s.ping().type == PINGRESP
    s.send(puback(got.pid, version))
    s.send(puback(got.pid, version))  # repeated: unknown by now, tolerated
    assert s.ping().type == PINGRESP
    s.disconnect()
    watcher.assert_silent(0.3)
    watcher.disconnect()


@pytest.mark.parametrize("version", BOTH)
@pytest.mark.parametrize("qos", [
    pytest.param(1, id="puback-[MQTT-4.6.0-2]"),
    pytest.param(2, id="pubrec-[MQTT-4.6.0-3]"),
])
def test_acks_in_publish_arrival_order(broker, version, qos):
    """50 pipelined QoS 1 (QoS 2) PUBLISHes: the PUBACKs (PUBRECs) come back in arrival order."""
    topic = f"order/{uid('t')}"
    s = connected(broker, uid("sub"), version)
    s.subscribe([(topic, 0)])
    c = connected(broker, uid("pipe"), version)
    ids = [(i * 37) % 1000 + 1 for i in range(50)]  # non-monotonic ids
    assert len(set(ids)) == 50
    c.send(b"".join(publish(topic, f"{i}".encode(), qos=qos, pid=pid, version=version)
                    for i, pid in enumerate(ids)))
    acks = [c.recv(5) for _ in range(50)]
    want = PUBACK if qos == 1 else PUBREC
    assert all(a.type == want for a in acks), acks
    assert [a.pid for a in acks] == ids
    if qos == 2:
        c.send(b"".join(pubrel(pid, version) for pid in ids))
        comps = [c.expect(PUBCOMP, 5) for _ in range(50)]
        assert [x.pid for x in comps] == ids
    # the subscriber sees them in publish order too [MQTT-4.6.0-6 (v5)]
    got = [s.expect(PUBLISH, 5) for _ in range(50)]
    assert [g.payload for g in got] == [f"{i}".encode() for i in range(50)]
    c.disconnect()
    s.disconnect()


@pytest.mark.parametrize("sub_qos,pub_qos", [
    pytest.param(s, p, id=f"sub{s}-pub{p}-[MQTT-3.8.4-6]") for s in (0, 1, 2) for p in (0, 1, 2)
])
def test_delivered_qos_is_min_of_publish_and_granted(broker, sub_qos, pub_qos):
    """[MQTT-3.8.4-6] (3.1.1) The delivered QoS is min(publish QoS, granted QoS); QoS 0
    deliveries carry no packet id and DUP=0 [MQTT-3.3.1-2]."""
    topic = f"minqos/{uid('t')}"
    s = connected(broker, uid("sub"))
    assert s.subscribe([(topic, sub_qos)]).codes == [sub_qos]
    c = connected(broker, uid("pub"))
    c.publish(topic, b"q", qos=pub_qos, pid=3)
    got = s.expect(PUBLISH)
    assert got.qos == min(sub_qos, pub_qos), got
    assert got.dup is False
    if got.qos == 0:
        assert got.pid is None and got.raw == publish(topic, b"q"), got
    s.ack_publish(got)
    s.assert_silent(0.2)
    c.disconnect()
    s.disconnect()


# ---------------------------------------------------------------------------------------------
# Keep alive, takeover, connect timeout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [
    pytest.param(V311, id="v311-[MQTT-3.1.2-24]"),
    pytest.param(V5, id="v5-0x8D-[MQTT-3.1.2-22]"),
])
def test_keepalive_silent_client_disconnected(broker, version):
    """Keep alive 1 s and silence: the broker disconnects after ~1.5 s (v5 with DISCONNECT
    0x8D first), and the client's will is published (abnormal disconnect, [MQTT-3.1.2-8])."""
    will_topic = f"will/{uid('t')}"
    w = connected(broker, uid("watch"), version)
    w.subscribe([(will_topic, 0)])
    c = Client.to(broker, version)
    c.connect(uid("ka"), keepalive=1, will=dict(topic=will_topic, payload=b"gone"))
    start = time.monotonic()
    packets, closed = c.wait_closed(6)
    elapsed = time.monotonic() - start
    assert closed, packets
    assert 1.0 <= elapsed <= 4.0, elapsed
    if version == V5:
        assert [(p.type, p.rc) for p in packets] == [(DISCONNECT, 0x8D)], packets
    else:
        assert packets == [], packets
    will = w.expect(PUBLISH, 3)
    assert (will.topic, will.payload) == (will_topic, b"gone"), will
    w.disconnect()


@pytest.mark.parametrize("version", [
    pytest.param(V311, id="v311-[MQTT-3.12.4-1]"),
    pytest.param(V5, id="v5-[MQTT-3.12.4-1]"),
])
def test_keepalive_pinging_client_stays_connected(broker, version):
    """A client with keep alive 1 s that sends PINGREQ every 0.5 s gets PINGRESP each time and
    stays connected well past 1.5 s."""
    c = connected(broker, uid("ping"), version, keepalive=1)
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < 3.0 and n < 20:
        assert c.ping(2).raw == b"\xd0\x00"
        n += 1
        time.sleep(0.5)
    assert n >= 5
    assert c.ping(2).type == PINGRESP
    c.disconnect()


@pytest.mark.parametrize("version", [
    pytest.param(V311, id="v311-[MQTT-3.1.4-2]"),
    pytest.param(V5, id="v5-0x8E-[MQTT-3.1.4-3]"),
])
def test_takeover_disconnects_existing_connection(broker, version):
    """A second connection with the same client id takes over: the first gets (v5) DISCONNECT
    0x8E and is closed; its will is published; the new connection works."""
    cid = uid("take")
    will_topic = f"will/{cid}"
    w = connected(broker, uid("watch"), version)
    w.subscribe([(will_topic, 0)])
    first = Client.to(broker, version)
    first.connect(cid, will=dict(topic=will_topic, payload=b"taken"))
    second = Client.to(broker, version)
    second.connect(cid)
    packets, closed = first.wait_closed(5)
    assert closed, packets
    if version == V5:
        assert [(p.type, p.rc) for p in packets] == [(DISCONNECT, 0x8E)], packets
    else:
        assert packets == [], packets
    assert second.ping().type == PINGRESP
    will = w.expect(PUBLISH, 3)
    assert (will.topic, will.payload) == (will_topic, b"taken"), will
    second.disconnect()
    w.disconnect()


@pytest.mark.parametrize("sent", [
    pytest.param(b"", id="nothing-[MQTT-3.1.0-1]"),
    pytest.param(b"\x10\x0d\x00\x04MQ", id="partial-connect-[MQTT-3.1.0-1]"),
])
def test_connect_timeout_closes_socket(make_broker, sent):
    """limits.connect_timeout=1: a connection that never completes a CONNECT is closed within a
    few seconds, without any packet from the broker."""
    b = make_broker({"limits": {"connect_timeout": 1}})
    c = Client.to(b, V311)
    if sent:
        c.send(sent)
    start = time.monotonic()
    packets, closed = c.wait_closed(6)
    elapsed = time.monotonic() - start
    assert closed and packets == [], packets
    assert 0.5 <= elapsed <= 4.0, elapsed
    check_broker_serves(b)


# ---------------------------------------------------------------------------------------------
# $ topics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", BOTH)
@pytest.mark.parametrize("topic,qos", [
    pytest.param("$SYS/test", 1, id="SYS-qos1-[MQTT-4.7.2-1]"),
    pytest.param("$SYS/test", 2, id="SYS-qos2-[MQTT-4.7.2-1]"),
    pytest.param("$private/x", 1, id="dollar-qos1-[MQTT-4.7.2-1]"),
])
def test_client_publish_to_dollar_topic_not_delivered(broker, version, topic, qos):
    """A client PUBLISH to a '$' topic is never delivered, not even to an explicit subscriber of
    that topic; '#' never sees '$' topics [MQTT-4.7.2-1]. 3.1.1 acknowledges it like any other
    (PUBACK / PUBREC without a reason code, the QoS 2 flow completes); 5.0 answers 0x87 (Not
    authorized). The connection stays usable."""
    s = connected(broker, uid("sub"), version)
    s.subscribe([(topic, 1), ("#", 1)])
    c = connected(broker, uid("pub"), version)
    c.send(publish(topic, b"nope", qos=qos, pid=5, version=version))
    ack = c.expect(PUBACK if qos == 1 else PUBREC)
    if version == V5:
        assert (ack.pid, ack.rc) == (5, 0x87), ack
    else:
        assert ack.raw == bytes([0x40 if qos == 1 else 0x50, 0x02, 0x00, 0x05]), ack
        if qos == 2:
            c.send(pubrel(5, version))
            assert c.expect(PUBCOMP).raw == b"\x70\x02\x00\x05"
    got = [p for p in s.collect(0.5) if p.type == PUBLISH and p.topic == topic]
    assert got == [], got
    assert c.ping().type == PINGRESP
    c.disconnect()
    s.disconnect()


def test_hash_filter_matches_parent_level(broker):
    """[MQTT-4.7.1-2] (3.1.1 4.7.1.2): "a/#" also matches "a"."""
    base = uid("h")
    s = connected(broker, uid("sub"))
    s.subscribe([(f"{base}/#", 0)])
    c = connected(broker, uid("pub"))
    c.publish(base, b"parent")
    c.publish(f"{base}/x/y", b"child")
    got = [s.expect(PUBLISH) for _ in range(2)]
    assert [(g.topic, g.payload) for g in got] == [(base, b"parent"), (f"{base}/x/y", b"child")]
    c.disconnect()
    s.disconnect()


def test_pingreq_pingresp_exact_bytes(broker):
    """[MQTT-3.12.4-1] PINGREQ c0 00 -> PINGRESP d0 00."""
    c = connected(broker, uid("p"))
    c.send(b"\xc0\x00")
    assert c.recv().raw == b"\xd0\x00"
    c.disconnect()


def test_normal_disconnect_suppresses_will_abnormal_publishes(broker):
    """3.1.1 [MQTT-3.1.2-8]/[MQTT-3.1.2-10]: the will is published when the connection is lost
    without DISCONNECT and discarded on DISCONNECT."""
    topic = f"will/{uid('t')}"
    w = connected(broker, uid("watch"))
    w.subscribe([(topic, 0)])
    a = connected(broker, uid("a"), will=dict(topic=topic, payload=b"normal"))
    a.disconnect()
    b = connected(broker, uid("b"), will=dict(topic=topic, payload=b"lost"))
    b.abort()
    got = w.collect(1.0)
    assert [(g.topic, g.payload) for g in got] == [(topic, b"lost")], got
    w.disconnect()



@pytest.mark.parametrize("version", BOTH)
def test_no_resend_while_connected_and_resend_after_each_reconnect(broker, version):
    """[MQTT-4.4.0-1] Unacknowledged messages are re-sent only on reconnect - never while the
    connection stays up - and again (DUP=1, same id) on every further reconnect until acked."""
    sid = uid("rs")
    topic = f"rs/{sid}"
    s = Client.to(broker, version)
    s.connect(sid, **persistent(version))
    s.subscribe([(topic, 1)])
    pub = connected(broker, uid("pub"), version)
    pub.publish(topic, b"keep", qos=1, pid=1)
    first = s.expect(PUBLISH)
    assert (first.payload, first.dup) == (b"keep", False), first
    s.assert_silent(1.0)
    for _ in range(2):
        s.abort()
        s = Client.to(broker, version)
        assert s.connect(sid, **persistent(version)).session_present is True
        again = s.expect(PUBLISH)
        assert (again.payload, again.pid, again.dup, again.qos) == (b"keep", first.pid, True, 1)
        s.assert_silent(0.3)
    s.send(puback(first.pid, version))
    assert s.ping().type == PINGRESP  # the PUBACK has been read before we go away
    s.abort()
    s = Client.to(broker, version)
    s.connect(sid, **persistent(version))
    s.assert_silent(0.5)
    s.disconnect()
    pub.disconnect()


def _raw_connect(port, cid, clean):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(3)
    c = cid.encode()
    body = b"\x00\x04MQTT\x04" + bytes([0x02 if clean else 0]) + b"\x00\x3c" + len(c).to_bytes(2, "big") + c
    s.sendall(bytes([0x10, len(body)]) + body)
    assert s.recv(4)[:2] == b"\x20\x02"
    return s


def _raw_packet(s):
    first = s.recv(1)
    if not first:
        return None
    n, mul = 0, 1
    for _ in range(4):
        b = s.recv(1)[0]
        n += (b & 0x7F) * mul
        mul *= 128
        if b < 128:
            break
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return first[0], data


def test_ack_sent_just_before_reconnect_is_honoured(broker):
    """A PUBACK written right before the client closes and reconnects with the same id must
    count: the new connection does not re-send that message [MQTT-4.3.2-3] [MQTT-4.4.0-1].
    (The old connection handles what it already received before handing the session over.)"""
    resent = 0
    for i in range(10):
        sub = _raw_connect(broker.port, f"ackrace{i}", clean=False)
        sub.sendall(b"\x82\x08\x00\x01\x00\x03r/t\x01")  # SUBSCRIBE r/t QoS 1
        assert _raw_packet(sub)[0] == 0x90
        pub = _raw_connect(broker.port, f"ackrace-pub{i}", clean=True)
        pub.sendall(b"\x32\x08\x00\x03r/t\x00\x05hi")  # PUBLISH QoS 1 id 5
        assert _raw_packet(pub)[0] == 0x40
        pub.close()
        kind, data = _raw_packet(sub)
        assert kind >> 4 == 3
        sub.sendall(b"\x40\x02" + data[5:7])  # PUBACK with the packet id we got
        sub.close()
        again = _raw_connect(broker.port, f"ackrace{i}", clean=False)
        again.settimeout(0.3)
        try:
            p = _raw_packet(again)
            if p and p[0] >> 4 == 3:
                resent += 1
        except socket.timeout:
            pass
        again.close()
    assert resent == 0, f"{resent} of 10 acknowledged messages were re-sent"
