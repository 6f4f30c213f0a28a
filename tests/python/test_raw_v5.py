"""Raw-socket conformance tests for MQTT 5.0 specifics: reason codes, properties, Receive
Maximum flow control, topic aliases, DISCONNECT handling. Each case names its normative
statement (or the spec section when the statement has no id)."""
import time

import pytest

from mqttraw import (
    ASSIGNED_CLIENT_IDENTIFIER, AUTHENTICATION_METHOD, CONNACK, DISCONNECT, MAXIMUM_PACKET_SIZE,
    MAXIMUM_QOS, PAYLOAD_FORMAT_INDICATOR, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL,
    RECEIVE_MAXIMUM, REQUEST_RESPONSE_INFORMATION, RESPONSE_INFORMATION, RETAIN_AVAILABLE,
    SESSION_EXPIRY_INTERVAL, SHARED_SUBSCRIPTION_AVAILABLE,
    SERVER_KEEP_ALIVE, SUBSCRIPTION_IDENTIFIER_AVAILABLE, TOPIC_ALIAS, TOPIC_ALIAS_MAXIMUM, V311, V5,
    WILDCARD_SUBSCRIPTION_AVAILABLE, Client, check_broker_serves, connect, connected, puback,
    pubcomp, publish, pubrec, uid,
)


def v5(broker, client_id=None, **kw):
    return connected(broker, client_id or uid("v5"), V5, **kw)


# ---------------------------------------------------------------------------------------------
# CONNACK
# ---------------------------------------------------------------------------------------------
def test_connack_properties_defaults(broker):
    """CONNACK properties with the default limits (contract; [MQTT-3.2.2-9] Maximum QoS only
    when < 2): Receive Maximum 1024, Maximum Packet Size 1048576, Topic Alias Maximum 64,
    Retain Available 1, Wildcard Subscription Available 1, Subscription Identifiers Available
    1, Shared Subscription Available 0; no property repeated."""
    c = Client.to(broker, V5)
    ack = c.connect(uid("cp"))
    pr = ack.props
    assert ack.session_present is False and ack.rc == 0
    assert pr.dups == [], ack
    assert pr.get(RECEIVE_MAXIMUM) == 1024, ack
    assert pr.get(MAXIMUM_PACKET_SIZE) == 1048576, ack
    assert pr.get(TOPIC_ALIAS_MAXIMUM) == 64, ack
    assert pr.get(RETAIN_AVAILABLE, 1) == 1, ack
    assert pr.get(WILDCARD_SUBSCRIPTION_AVAILABLE) == 1, ack
    assert pr.get(SUBSCRIPTION_IDENTIFIER_AVAILABLE) == 1, ack
    assert pr.get(SHARED_SUBSCRIPTION_AVAILABLE) == 1, ack
    assert MAXIMUM_QOS not in pr, ack
    assert ASSIGNED_CLIENT_IDENTIFIER not in pr, ack
    c.disconnect()


def test_empty_client_id_gets_assigned_identifier(broker):
    """[MQTT-3.2.2-16] [MQTT-3.1.3-6]/[MQTT-3.1.3-7]: an empty client id is accepted and the
    CONNACK carries a non-empty Assigned Client Identifier, different per connection."""
    ids = []
    for _ in range(2):
        c = Client.to(broker, V5)
        ack = c.connect("")
        assigned = ack.props.get(ASSIGNED_CLIENT_IDENTIFIER)
        assert assigned, ack
        ids.append(assigned)
        assert c.ping().type == PINGRESP
        c.disconnect()
    assert ids[0] != ids[1]


def test_authentication_method_rejected_0x8c(broker):
    """[MQTT-4.12.0-1] An unsupported Authentication Method -> CONNACK 0x8C, then close."""
    c = Client.to(broker, V5)
    c.send(connect(uid("auth"), version=V5,
                   properties=[(AUTHENTICATION_METHOD, "SCRAM-SHA-1")]))
    packets, closed = c.wait_closed(5)
    assert [(p.type, p.rc, p.session_present) for p in packets] == [(CONNACK, 0x8C, False)], \
        packets
    assert closed


def test_password_without_username_allowed_in_v5(broker):
    """5.0 §3.1.2.9 allows a Password without a User Name (unlike 3.1.1 [MQTT-3.1.2-22])."""
    c = Client.to(broker, V5)
    ack = c.connect(uid("pw"), password=b"secret")
    assert ack.rc == 0
    assert c.ping().type == PINGRESP
    c.disconnect()


# ---------------------------------------------------------------------------------------------
# PUBACK / PUBREC reason codes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qos,subscribed,rc", [
    pytest.param(1, False, 0x10, id="qos1-no-subscriber-0x10-[MQTT-3.4.2-1]"),
    pytest.param(2, False, 0x10, id="qos2-no-subscriber-0x10-[MQTT-3.5.2-1]"),
    pytest.param(1, True, 0x00, id="qos1-subscriber-0x00-[MQTT-3.4.2-1]"),
    pytest.param(2, True, 0x00, id="qos2-subscriber-0x00-[MQTT-3.5.2-1]"),
])
def test_no_matching_subscribers_reason(broker, qos, subscribed, rc):
    """PUBACK/PUBREC reason 0x10 (No matching subscribers) when nothing matched, else 0x00."""
    topic = f"nm/{uid('t')}"
    if subscribed:
        s = v5(broker)
        s.subscribe([(topic, 0)])
    c = v5(broker)
    c.send(publish(topic, b"x", qos=qos, pid=21, version=V5))
    a = c.expect(PUBACK if qos == 1 else PUBREC)
    assert (a.pid, a.rc) == (21, rc), a
    if qos == 2:
        c.send(b"\x62\x02\x00\x15")
        comp = c.expect(PUBCOMP)
        assert (comp.pid, comp.rc) == (21, 0), comp
    c.disconnect()


def test_payload_format_utf8_violation_0x99(broker):
    """Payload Format Indicator 1 with a non-UTF-8 payload: PUBACK 0x99 (Payload format
    invalid) and not delivered (contract; 5.0 §3.3.2.3.2)."""
    topic = f"pfi/{uid('t')}"
    s = v5(broker)
    s.subscribe([(topic, 0)])
    c = v5(broker)
    c.send(publish(topic, b"\xff\xfe", qos=1, pid=8, version=V5,
                   properties=[(PAYLOAD_FORMAT_INDICATOR, 1)]))
    a = c.expect(PUBACK)
    assert (a.pid, a.rc) == (8, 0x99), a
    assert s.collect(0.4) == []
    c.disconnect()
    s.disconnect()


# ---------------------------------------------------------------------------------------------
# SUBACK / UNSUBACK codes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version,flt,code", [
    pytest.param(V5, "a/#/b", 0x8F, id="v5-hash-not-last-0x8F-[MQTT-4.7.1-1]"),
    pytest.param(V5, "a/b#", 0x8F, id="v5-hash-in-level-0x8F-[MQTT-4.7.1-1]"),
    pytest.param(V5, "a/+b", 0x8F, id="v5-plus-in-level-0x8F-[MQTT-4.7.1-2]"),
    pytest.param(V5, "$share/g", 0x8F, id="v5-share-without-filter-0x8F-[MQTT-4.8.2-1]"),
    pytest.param(V5, "$share/g#/t", 0x8F, id="v5-share-name-wildcard-0x8F-[MQTT-4.8.2-2]"),
    pytest.param(V311, "a/#/b", 0x80, id="v311-hash-not-last-0x80-[MQTT-4.7.1-2]"),
    pytest.param(V311, "a+/b", 0x80, id="v311-plus-in-level-0x80-[MQTT-4.7.1-3]"),
    pytest.param(V311, "$share//t", 0x80, id="v311-empty-share-name-0x80-[MQTT-4.8.2-1]"),
])
def test_suback_failure_codes(broker, version, flt, code):
    """Invalid filters fail per filter without disconnecting; valid ones in the same SUBSCRIBE
    are granted ([MQTT-3.8.4-4]/[MQTT-3.8.4-5] one SUBACK, codes in order [MQTT-3.9.3-1])."""
    c = connected(broker, uid("sa"), version)
    ack = c.subscribe([("ok/1", 1), (flt, 1), ("ok/2", 2)], pid=77)
    assert ack.codes == [1, code, 2], ack
    assert c.ping().type == PINGRESP
    c.disconnect()


def test_unsuback_reason_codes(broker):
    """v5 UNSUBACK: 0x00 for a removed subscription, 0x11 (No subscription existed) otherwise,
    in filter order [MQTT-3.11.3-1]."""
    c = v5(broker)
    c.subscribe([("u/a", 0)])
    ack = c.unsubscribe(["u/none", "u/a", "u/a"], pid=9)
    assert ack.codes == [0x11, 0x00, 0x11], ack
    c.disconnect()


# ---------------------------------------------------------------------------------------------
# Receive Maximum
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("configured", [
    pytest.param(None, id="default-1024-[MQTT-3.3.4-7]"),
    pytest.param(3, id="configured-3-[MQTT-3.3.4-7]"),
])
def test_inbound_receive_maximum_exceeded_0x93(make_broker, configured):
    """A client that sends more unacknowledged QoS 2 PUBLISHes (no PUBREL) than the Receive
    Maximum from CONNACK gets DISCONNECT 0x93 (Receive Maximum exceeded), then close."""
    b = make_broker({"limits": {"receive_maximum": configured}} if configured else None)
    c = Client.to(b, V5, timeout=10)
    ack = c.connect(uid("rm"))
    rm = ack.props.get(RECEIVE_MAXIMUM, 65535)
    assert rm == (configured or 1024), ack
    c.send(b"".join(publish("rm/t", b"x", qos=2, pid=i, version=V5) for i in range(1, rm + 2)))
    packets, closed = c.wait_closed(10, limit=rm + 10)
    assert closed, packets[-3:]
    recs = [p for p in packets if p.type == PUBREC]
    assert [p.pid for p in recs] == list(range(1, rm + 1)), packets[-3:]
    assert (packets[-1].type, packets[-1].rc) == (DISCONNECT, 0x93), packets[-3:]
    assert len(packets) == rm + 1, packets[-3:]
    check_broker_serves(b)


@pytest.mark.parametrize("qos", [
    pytest.param(1, id="qos1-[MQTT-3.3.4-9][MQTT-4.9.0-2]"),
    pytest.param(2, id="qos2-[MQTT-3.3.4-9][MQTT-4.9.0-2]"),
])
def test_outbound_receive_maximum_respected(broker, qos):
    """A subscriber with Receive Maximum 2 that does not acknowledge gets exactly 2 PUBLISHes;
    acknowledging one (PUBACK, or for QoS 2 PUBCOMP - a PUBREC alone does not free the slot)
    releases exactly one more. PINGRESP is not held back [MQTT-3.3.4-10]."""
    topic = f"rmo/{uid('t')}"
    s = Client.to(broker, V5)
    s.connect(uid("rms"), properties=[(RECEIVE_MAXIMUM, 2)])
    s.subscribe([(topic, qos)])
    p = v5(broker)
    for i in range(5):
        p.publish(topic, f"m{i}".encode(), qos=qos, pid=i + 1)
    got = s.collect(0.8)
    assert [(g.type, g.payload) for g in got] == [(PUBLISH, b"m0"), (PUBLISH, b"m1")], got
    assert s.ping().type == PINGRESP
    if qos == 1:
        s.send(puback(got[0].pid, V5))
    else:
        s.send(pubrec(got[0].pid, V5))
        more = s.collect(0.6)
        assert [(m.type, m.pid) for m in more] == [(PUBREL, got[0].pid)], more
        s.send(pubcomp(got[0].pid, V5))
    more = s.collect(0.8)
    assert [(m.type, m.payload) for m in more] == [(PUBLISH, b"m2")], more
    # drain the rest by acknowledging everything
    pending = [got[1], more[0]]
    seen = [b"m0", b"m1", b"m2"]
    for _ in range(10):
        if not pending:
            break
        s.ack_publish(pending.pop(0))
        for m in s.collect(0.4):
            assert m.type == PUBLISH, m
            seen.append(m.payload)
            pending.append(m)
    assert seen == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    s.disconnect()
    p.disconnect()


# ---------------------------------------------------------------------------------------------
# Topic aliases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,rc", [
    pytest.param("alias-zero", 0x94, id="alias-0-0x94-[MQTT-3.3.2-8]"),
    pytest.param("alias-above-max", 0x94, id="alias-gt-max-0x94-[MQTT-3.3.2-9]"),
    pytest.param("empty-topic-unknown-alias", 0x82, id="unknown-alias-0x82-§3.3.2.3.4"),
    pytest.param("empty-topic-no-alias", 0x82, id="empty-topic-no-alias-0x82-[MQTT-4.7.3-1]"),
    pytest.param("alias-from-previous-connection", 0x82, id="alias-not-carried-0x82-[MQTT-3.3.2-7]"),
])
def test_inbound_topic_alias_errors(broker, case, rc):
    """Invalid inbound topic alias use -> DISCONNECT with the contract's reason, then close;
    the broker keeps serving others."""
    cid = uid("ta")
    c = Client.to(broker, V5)
    ack = c.connect(cid)
    tam = ack.props.get(TOPIC_ALIAS_MAXIMUM, 0)
    assert tam >= 1, ack
    if case == "alias-zero":
        pkt = publish("ta/x", b"x", version=V5, properties=[(TOPIC_ALIAS, 0)])
    elif case == "alias-above-max":
        pkt = publish("ta/x", b"x", version=V5, properties=[(TOPIC_ALIAS, tam + 1)])
    elif case == "empty-topic-unknown-alias":
        pkt = publish("", b"x", version=V5, properties=[(TOPIC_ALIAS, 5)])
    elif case == "empty-topic-no-alias":
        pkt = publish("", b"x", version=V5)
    else:
        c.send(publish("ta/x", b"x", version=V5, properties=[(TOPIC_ALIAS, 5)]))
        assert c.ping().type == PINGRESP
        c.disconnect()
        c = Client.to(broker, V5)
        c.connect(cid)
        pkt = publish("", b"x", version=V5, properties=[(TOPIC_ALIAS, 5)])
    c.send(pkt)
    packets, closed = c.wait_closed(5)
    assert [(p.type, p.rc) for p in packets] == [(DISCONNECT, rc)], packets
    assert closed
    check_broker_serves(broker, version=V5)


def test_inbound_topic_alias_valid_use(broker):
    """[MQTT-3.3.2-12] Aliases 1..Topic Alias Maximum are accepted: set with a topic, reused
    with an empty topic, remapped; subscribers always see the full topic name and, without a
    Topic Alias Maximum of their own, never an alias [MQTT-3.1.2-27]."""
    t1, t2 = f"tav/{uid('a')}", f"tav/{uid('b')}"
    s = v5(broker)
    s.subscribe([(t1, 0), (t2, 0)])
    s3 = connected(broker, uid("v311s"), V311)
    s3.subscribe([(t1, 0)])
    c = Client.to(broker, V5)
    top = c.connect(uid("tav")).props.get(TOPIC_ALIAS_MAXIMUM, 0)
    assert top >= 2
    c.send(publish(t1, b"1", version=V5, properties=[(TOPIC_ALIAS, 1)]))
    c.send(publish("", b"2", version=V5, properties=[(TOPIC_ALIAS, 1)]))
    c.send(publish(t2, b"3", version=V5, properties=[(TOPIC_ALIAS, top)]))
    c.send(publish(t2, b"4", version=V5, properties=[(TOPIC_ALIAS, 1)]))  # remap 1 -> t2
    c.send(publish("", b"5", qos=1, pid=2, version=V5, properties=[(TOPIC_ALIAS, 1)]))
    c.send(publish("", b"6", version=V5, properties=[(TOPIC_ALIAS, top)]))
    a = c.expect(PUBACK)
    assert (a.pid, a.rc) == (2, 0), a
    got = [s.expect(PUBLISH) for _ in range(6)]
    assert [(g.topic, g.payload) for g in got] == [
        (t1, b"1"), (t1, b"2"), (t2, b"3"), (t2, b"4"), (t2, b"5"), (t2, b"6")], got
    assert all(TOPIC_ALIAS not in g.props for g in got), got
    got3 = [s3.expect(PUBLISH) for _ in range(2)]
    assert [(g.topic, g.payload) for g in got3] == [(t1, b"1"), (t1, b"2")], got3
    assert c.ping().type == PINGRESP
    c.disconnect()
    s.disconnect()
    s3.disconnect()


def test_outbound_topic_alias_assigned(broker):
    """A subscriber advertising Topic Alias Maximum 10 gets the first message with topic name +
    alias (1..10, [MQTT-3.3.2-11]) and a later message on the same topic with an empty topic
    name and the same alias."""
    topic = f"tao/{uid('t')}"
    s = Client.to(broker, V5)
    s.connect(uid("tas"), properties=[(TOPIC_ALIAS_MAXIMUM, 10)])
    s.subscribe([(topic, 0)])
    p = v5(broker)
    p.publish(topic, b"first")
    p.publish(topic, b"second")
    first, second = s.expect(PUBLISH), s.expect(PUBLISH)
    alias = first.props.get(TOPIC_ALIAS)
    assert first.topic == topic and first.payload == b"first", first
    assert alias is not None and 1 <= alias <= 10, first
    assert second.topic == "" and second.props.get(TOPIC_ALIAS) == alias, second
    assert second.payload == b"second"
    p.disconnect()
    s.disconnect()


# ---------------------------------------------------------------------------------------------
# DISCONNECT and wills
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ending,will_expected", [
    pytest.param(b"\xe0\x00", False, id="e000-normal-[MQTT-3.14.4-3]"),
    pytest.param(b"\xe0\x01\x00", False, id="e00100-normal-[MQTT-3.14.4-3]"),
    pytest.param(b"\xe0\x02\x00\x00", False, id="rc0-empty-props-[MQTT-3.14.4-3]"),
    pytest.param(b"\xe0\x01\x04", True, id="0x04-with-will-[MQTT-3.1.2-8]"),
    pytest.param(None, True, id="socket-closed-[MQTT-3.1.2-8]"),
])
def test_disconnect_and_will(broker, ending, will_expected):
    """DISCONNECT with remaining length 0 or 1 (reason 0x00) is a normal disconnect and the will
    is discarded; reason 0x04 (Disconnect with Will Message) and a lost connection publish it."""
    topic = f"will/{uid('t')}"
    w = v5(broker)
    w.subscribe([(topic, 1)])
    c = Client.to(broker, V5)
    c.connect(uid("w"), will=dict(topic=topic, payload=b"bye", qos=1))
    if ending is None:
        c.abort()
    else:
        c.send(ending)
        packets, closed = c.wait_closed(3)
        assert packets == [] and closed, packets
    got = [p for p in w.collect(1.0) if p.type == PUBLISH]
    if will_expected:
        assert [(g.topic, g.payload, g.qos) for g in got] == [(topic, b"bye", 1)], got
    else:
        assert got == [], got
    w.disconnect()


def test_disconnect_session_expiry_zero_to_nonzero_is_protocol_error(broker):
    """5.0 §3.14.2.2.2: Session Expiry 0 at CONNECT and non-zero in DISCONNECT is a Protocol
    Error: DISCONNECT 0x82 from the broker, then close; and the will is published."""
    topic = f"will/{uid('t')}"
    w = v5(broker)
    w.subscribe([(topic, 0)])
    c = Client.to(broker, V5)
    c.connect(uid("se"), will=dict(topic=topic, payload=b"err"))
    c.send(b"\xe0\x07\x00\x05\x11\x00\x00\x00\x3c")
    packets, closed = c.wait_closed(3)
    assert [(p.type, p.rc) for p in packets] == [(DISCONNECT, 0x82)], packets
    assert closed
    got = [(g.topic, g.payload) for g in w.collect(1.0) if g.type == PUBLISH]
    assert got == [(topic, b"err")], got
    w.disconnect()


# ---------------------------------------------------------------------------------------------
# Maximum Packet Size
# ---------------------------------------------------------------------------------------------
def test_packet_larger_than_max_packet_size_0x95(make_broker):
    """limits.max_packet_size=1024 is advertised in CONNACK; a 2000-byte PUBLISH gets
    DISCONNECT 0x95 (Packet too large) then close ([MQTT-3.2.2-15] is the client's duty,
    5.0 §3.2.2.3.6 the server's reaction); other clients are unaffected."""
    b = make_broker({"limits": {"max_packet_size": 1024}})
    c = Client.to(b, V5)
    ack = c.connect(uid("big"))
    assert ack.props.get(MAXIMUM_PACKET_SIZE) == 1024, ack
    c.send(publish("big/t", b"x" * 2000, qos=1, pid=1, version=V5))
    packets, closed = c.wait_closed(5)
    assert [(p.type, p.rc) for p in packets] == [(DISCONNECT, 0x95)], packets
    assert closed
    check_broker_serves(b, version=V5)


def test_client_maximum_packet_size_respected(broker):
    """[MQTT-3.1.2-24]/[MQTT-3.1.2-25]: a message larger than the subscriber's Maximum Packet
    Size is skipped for that subscriber only; smaller ones still arrive."""
    topic = f"cmps/{uid('t')}"
    small = Client.to(broker, V5)
    small.connect(uid("small"), properties=[(MAXIMUM_PACKET_SIZE, 200)])
    small.subscribe([(topic, 1)])
    big = v5(broker)
    big.subscribe([(topic, 1)])
    p = v5(broker)
    p.publish(topic, b"L" * 500, qos=1, pid=1)
    p.publish(topic, b"S" * 10, qos=1, pid=2)
    got = [g for g in small.collect(0.8) if g.type == PUBLISH]
    assert [g.payload for g in got] == [b"S" * 10], got
    assert all(len(g.raw) <= 200 for g in got)
    got_big = [big.expect(PUBLISH) for _ in range(2)]
    assert [len(g.payload) for g in got_big] == [500, 10]
    p.disconnect()
    small.disconnect()
    big.disconnect()


def connack_with_max(broker, maximum, **props):
    """CONNECT with Maximum Packet Size `maximum` (and Request Response Information = 1);
    returns (packets until close or 0.5 s, closed?, client)."""
    c = Client.to(broker, V5)
    c.send(connect(uid("mps"), version=V5,
                   properties=[(MAXIMUM_PACKET_SIZE, maximum), (REQUEST_RESPONSE_INFORMATION, 1)]))
    packets, closed = c.wait_closed(0.5)
    return packets, closed, c


def test_connack_trimmed_to_client_maximum_packet_size(broker):
    """[MQTT-3.1.2-24] The server must not send a packet larger than the client's Maximum
    Packet Size, CONNACK included ([MQTT-3.2.2-19]/[MQTT-3.2.2-20] for its Reason String and
    User Properties). Tern leaves optional properties out until it fits: Response Information
    first, then the ones that restate their default, then Topic Alias Maximum; Receive Maximum
    and Maximum Packet Size always stay."""
    full, closed, c = connack_with_max(broker, 1 << 20)
    assert not closed and full[0].type == CONNACK, full
    full = full[0]
    assert RESPONSE_INFORMATION in full.props, full
    c.disconnect()
    # One byte short: only Response Information goes.
    got, closed, c = connack_with_max(broker, len(full.raw) - 1)
    assert not closed and got[0].rc == 0, got
    assert len(got[0].raw) <= len(full.raw) - 1, got
    assert RESPONSE_INFORMATION not in got[0].props
    assert {k: v for k, v in full.props.items() if k != RESPONSE_INFORMATION} == \
        dict(got[0].props), got
    assert c.ping().type == PINGRESP
    c.disconnect()
    # 13 bytes: Receive Maximum and Maximum Packet Size and nothing else. Without Topic
    # Alias Maximum the client may use no alias: one is a protocol error (0x94).
    got, closed, c = connack_with_max(broker, 13)
    assert not closed and len(got) == 1, got
    assert len(got[0].raw) == 13, got
    assert dict(got[0].props) == {RECEIVE_MAXIMUM: 1024, MAXIMUM_PACKET_SIZE: 1048576}, got
    c.send(publish("mps/t", b"x", version=V5, properties=[(TOPIC_ALIAS, 1)]))
    packets, closed = c.wait_closed(5)
    assert [(p.type, p.rc) for p in packets] == [(DISCONNECT, 0x94)], packets
    assert closed


def test_connack_that_cannot_fit_is_not_sent(broker):
    """[MQTT-3.1.2-24] When even the CONNACK without optional properties is larger than the
    client's Maximum Packet Size (here 12 bytes), the connection is closed without one; a
    refusing CONNACK (5 bytes) larger than a 4-byte maximum is not sent either."""
    got, closed, c = connack_with_max(broker, 12)
    if not closed:
        packets, closed = c.wait_closed(5)
        got += packets
    assert got == [] and closed, got
    c = Client.to(broker, V5)
    c.send(connect(uid("mps"), version=V5,
                   properties=[(MAXIMUM_PACKET_SIZE, 4), (AUTHENTICATION_METHOD, "SCRAM-SHA-1")]))
    packets, closed = c.wait_closed(5)
    assert packets == [] and closed, packets
    check_broker_serves(broker, version=V5)


@pytest.mark.parametrize("qos", [
    pytest.param(1, id="puback-0x80-[MQTT-4.4.0-2]"),
    pytest.param(2, id="pubrec-0x80-[MQTT-4.4.0-2][MQTT-4.3.3-4]"),
])
def test_negative_ack_completes_delivery(broker, qos):
    """A subscriber answering PUBACK/PUBREC with a reason >= 0x80: the message counts as
    acknowledged - no PUBREL follows a failing PUBREC [MQTT-4.3.3-4], and it is not re-sent on
    reconnect [MQTT-4.4.0-2]; the next message is delivered normally."""
    sid = uid("neg")
    topic = f"neg/{sid}"
    s = Client.to(broker, V5)
    s.connect(sid, clean=False, properties=[(SESSION_EXPIRY_INTERVAL, 300)])
    s.subscribe([(topic, qos)])
    p = v5(broker)
    p.publish(topic, b"refused", qos=qos, pid=1)
    got = s.expect(PUBLISH)
    s.send((puback if qos == 1 else pubrec)(got.pid, V5, rc=0x80))
    s.assert_silent(0.4)
    s.abort()
    s = Client.to(broker, V5)
    assert s.connect(sid, clean=False,
                     properties=[(SESSION_EXPIRY_INTERVAL, 300)]).session_present is True
    s.assert_silent(0.5)
    p.publish(topic, b"next", qos=qos, pid=2)
    nxt = s.expect(PUBLISH)
    assert (nxt.payload, nxt.dup) == (b"next", False), nxt
    s.ack_publish(nxt)
    s.disconnect()
    p.disconnect()


@pytest.mark.parametrize("client_keepalive,server_keepalive", [
    pytest.param(0, 1, id="ka0-gets-1-[MQTT-3.2.2-21]"),
    pytest.param(60, 1, id="ka60-gets-1-[MQTT-3.2.2-21]"),
    pytest.param(1, None, id="ka1-unchanged-[MQTT-3.2.2-22]"),
])
def test_server_keep_alive(make_broker, client_keepalive, server_keepalive):
    """limits.max_keepalive=1: a client asking for 0 or more than 1 gets Server Keep Alive 1 in
    CONNACK, and the broker enforces it (silent client: DISCONNECT 0x8D after ~1.5 s); a client
    asking for 1 gets no Server Keep Alive."""
    b = make_broker({"limits": {"max_keepalive": 1}})
    c = Client.to(b, V5)
    ack = c.connect(uid("ska"), keepalive=client_keepalive)
    assert ack.props.get(SERVER_KEEP_ALIVE) == server_keepalive, ack
    start = time.monotonic()
    packets, closed = c.wait_closed(6)
    elapsed = time.monotonic() - start
    assert closed and [(x.type, x.rc) for x in packets] == [(DISCONNECT, 0x8D)], packets
    assert 1.0 <= elapsed <= 4.0, elapsed


def test_session_expiry_lowered_by_broker(make_broker):
    """limits.max_session_expiry=10: a client asking for 100 s gets Session Expiry Interval 10
    in CONNACK (5.0 §3.2.2.3.2); one asking for 5 s gets none back."""
    b = make_broker({"limits": {"max_session_expiry": 10}})
    c = Client.to(b, V5)
    ack = c.connect(uid("se"), clean=False, properties=[(SESSION_EXPIRY_INTERVAL, 100)])
    assert ack.props.get(SESSION_EXPIRY_INTERVAL) == 10, ack
    c.disconnect()
    c = Client.to(b, V5)
    ack = c.connect(uid("se"), clean=False, properties=[(SESSION_EXPIRY_INTERVAL, 5)])
    assert SESSION_EXPIRY_INTERVAL not in ack.props, ack
    c.disconnect()


@pytest.mark.parametrize("version", [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")])
def test_max_qos_1(make_broker, version):
    """mqtt.max_qos=1: v5 CONNACK has Maximum QoS 1 [MQTT-3.2.2-9]; SUBACK grants
    min(requested, 1) [MQTT-3.2.2-10]; a QoS 2 message is delivered at QoS 1 [MQTT-3.8.4-8]."""
    b = make_broker({"mqtt": {"max_qos": 1}})
    topic = f"mq/{uid('t')}"
    s = Client.to(b, version)
    ack = s.connect(uid("mq"))
    if version == V5:
        assert ack.props.get(MAXIMUM_QOS) == 1, ack
    assert s.subscribe([(topic, 2), (topic + "/0", 0)]).codes == [1, 0]
    p = connected(b, uid("p"), V311)
    p.publish(topic, b"q2", qos=1, pid=4)
    got = s.expect(PUBLISH)
    assert (got.payload, got.qos) == (b"q2", 1), got
    s.ack_publish(got)
    s.disconnect()
    p.disconnect()
