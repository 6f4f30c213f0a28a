"""Malformed packets and protocol errors, for MQTT 3.1.1 and 5.0.

Expectation (contract + 3.1.1 [MQTT-4.8.0-1] / 5.0 §4.13):
  * after CONNACK, 5.0 gets one DISCONNECT with reason 0x81 (Malformed Packet) or 0x82
    (Protocol Error) - or 0x95/0x93/0x94 where the contract names them - and then the socket
    closes; 3.1.1 sees the socket close without any packet;
  * before CONNACK the broker must not send DISCONNECT [MQTT-3.14.0-1]: 5.0 may send a CONNACK
    with a reason >= 0x80 [MQTT-3.1.4-1], 3.1.1 just closes;
  * nothing else breaks: a client connected before the case (the bystander) still receives, a
    fresh client can connect, publish and receive, and the broker process stays alive.
"""
import pytest

from mqttraw import (
    AUTH, CONNACK, CONNECT, DISCONNECT, MAXIMUM_PACKET_SIZE, PAYLOAD_FORMAT_INDICATOR, PUBACK,
    PUBCOMP, PUBLISH, PUBREC, PUBREL, PINGREQ, RECEIVE_MAXIMUM, SUBSCRIBE,
    SUBSCRIPTION_IDENTIFIER, UNSUBSCRIBE, USER_PROPERTY, V311, V5, Client, check_broker_serves,
    connect, connected, disconnect, packet, prop, props, publish, puback, pubcomp, pubrec,
    pubrel, string, subscribe, u16, u8, uid, unsubscribe, varint, auth,
)

PROTO = {0x81, 0x82}


def first_byte(pkt, byte):
    """Same packet with a different first (type + flags) byte."""
    return bytes([byte]) + pkt[1:]


def pub_raw(topic_bytes, v, qos=0, pid=1, flags=None, prop_bytes=None, payload=b"x"):
    body = string(topic_bytes)
    if qos:
        body += u16(pid)
    if v == V5:
        body += props(prop_bytes) if prop_bytes is not None else b"\x00"
    body += payload
    f = (qos << 1) if flags is None else flags
    return packet(PUBLISH, f, body)


def sub_raw(filter_bytes, v, opts=0, pid=1, prop_items=None):
    body = u16(pid) + (props(prop_items) if v == V5 else b"") + string(filter_bytes) + u8(opts)
    return packet(SUBSCRIBE, 2, body)


def unsub_raw(filter_bytes, v, pid=1):
    body = u16(pid) + (b"\x00" if v == V5 else b"") + string(filter_bytes)
    return packet(UNSUBSCRIBE, 2, body)


def empty_props(v):
    return b"\x00" if v == V5 else b""


# (id, versions, phase, builder(version) -> bytes, v5 reasons allowed after CONNACK)
# phase "post": sent after a successful CONNECT/CONNACK; "pre": sent instead of a CONNECT.
BOTH = (V311, V5)
CASES = [
    # --- fixed header flags ------------------------------------------------------------------
    ("subscribe-flags-0000-[MQTT-3.8.1-1]", BOTH, "post",
     lambda v: first_byte(subscribe(1, [("a", 0)], v), 0x80), PROTO),
    ("subscribe-flags-0011-[MQTT-3.8.1-1]", BOTH, "post",
     lambda v: first_byte(subscribe(1, [("a", 0)], v), 0x83), PROTO),
    ("unsubscribe-flags-0000-[MQTT-3.10.1-1]", BOTH, "post",
     lambda v: first_byte(unsubscribe(1, ["a"], v), 0xA0), PROTO),
    ("pubrel-flags-0000-[MQTT-3.6.1-1]", BOTH, "post",
     lambda v: first_byte(pubrel(1, v), 0x60), PROTO),
    ("pubrel-flags-0011-[MQTT-3.6.1-1]", BOTH, "post",
     lambda v: first_byte(pubrel(1, v), 0x63), PROTO),
    ("pingreq-flags-0001-[MQTT-2.2.2-2][MQTT-2.1.3-1]", BOTH, "post",
     lambda v: b"\xc1\x00", PROTO),
    ("pingreq-flags-0010-[MQTT-2.2.2-2][MQTT-2.1.3-1]", BOTH, "post",
     lambda v: b"\xc2\x00", PROTO),
    ("puback-flags-0010-[MQTT-2.2.2-2][MQTT-2.1.3-1]", BOTH, "post",
     lambda v: first_byte(puback(1, v), 0x42), PROTO),
    ("pubrec-flags-0001-[MQTT-2.2.2-2][MQTT-2.1.3-1]", BOTH, "post",
     lambda v: first_byte(pubrec(1, v), 0x51), PROTO),
    ("pubcomp-flags-1000-[MQTT-2.2.2-2][MQTT-2.1.3-1]", BOTH, "post",
     lambda v: first_byte(pubcomp(1, v), 0x78), PROTO),
    ("disconnect-flags-0001-[MQTT-2.2.2-2][MQTT-3.14.1-1]", BOTH, "post",
     lambda v: b"\xe1\x00", PROTO),
    ("publish-qos3-[MQTT-3.3.1-4]", BOTH, "post",
     lambda v: pub_raw("a/b", v, qos=3, flags=0x06), PROTO),
    ("publish-qos3-dup-retain-[MQTT-3.3.1-4]", BOTH, "post",
     lambda v: pub_raw("a/b", v, qos=3, flags=0x0F), PROTO),
    ("publish-qos0-dup-[MQTT-3.3.1-2]", BOTH, "post",
     lambda v: pub_raw("a/b", v, flags=0x08), PROTO),
    # --- remaining length ----------------------------------------------------------------------
    ("remaining-length-5-bytes-§2.2.3/§1.5.5", BOTH, "post",
     lambda v: b"\x30\xff\xff\xff\xff\x7f" + b"\x00" * 8, {0x81}),
    ("remaining-length-5-bytes-pingreq-§2.2.3/§1.5.5", BOTH, "post",
     lambda v: b"\xc0\x80\x80\x80\x80\x00", {0x81}),
    ("remaining-length-over-max-packet-size-0x95-§3.2.2.3.6", BOTH, "post",
     lambda v: b"\x30" + varint(2_000_000) + b"\x00\x03a/b" + b"x" * 13, {0x95}),
    # --- empty SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------------
    ("empty-subscribe-[MQTT-3.8.3-3][MQTT-3.8.3-2]", BOTH, "post",
     lambda v: packet(SUBSCRIBE, 2, u16(1) + empty_props(v)), PROTO),
    ("empty-unsubscribe-[MQTT-3.10.3-2]", BOTH, "post",
     lambda v: packet(UNSUBSCRIBE, 2, u16(1) + empty_props(v)), PROTO),
    # --- strings ---------------------------------------------------------------------------------
    ("topic-invalid-utf8-ff-[MQTT-1.5.3-1][MQTT-1.5.4-1]", BOTH, "post",
     lambda v: pub_raw(b"a/\xff", v), PROTO),
    ("topic-utf8-surrogate-[MQTT-1.5.3-1][MQTT-1.5.4-1]", BOTH, "post",
     lambda v: pub_raw(b"a/\xed\xa0\x80", v), PROTO),
    ("topic-utf8-overlong-[MQTT-1.5.3-1][MQTT-1.5.4-1]", BOTH, "post",
     lambda v: pub_raw(b"a/\xc0\xaf", v), PROTO),
    ("topic-utf8-truncated-seq-[MQTT-1.5.3-1][MQTT-1.5.4-1]", BOTH, "post",
     lambda v: pub_raw(b"a/\xe2\x82", v), PROTO),
    ("topic-U+0000-[MQTT-1.5.3-2][MQTT-1.5.4-2]", BOTH, "post",
     lambda v: pub_raw(b"a\x00b", v), PROTO),
    ("filter-invalid-utf8-[MQTT-1.5.3-1][MQTT-1.5.4-1]", BOTH, "post",
     lambda v: sub_raw(b"f/\xff", v), PROTO),
    ("filter-U+0000-[MQTT-1.5.3-2][MQTT-4.7.3-2]", BOTH, "post",
     lambda v: sub_raw(b"f\x00", v), PROTO),
    ("unsubscribe-filter-invalid-utf8-[MQTT-1.5.3-1][MQTT-1.5.4-1]", BOTH, "post",
     lambda v: unsub_raw(b"f/\xfe", v), PROTO),
    ("publish-topic-plus-wildcard-[MQTT-3.3.2-2]", BOTH, "post",
     lambda v: pub_raw("a/+", v), PROTO),
    ("publish-topic-hash-wildcard-[MQTT-3.3.2-2]", BOTH, "post",
     lambda v: pub_raw("a/#", v, qos=1, pid=3), PROTO),
    ("publish-empty-topic-v311-[MQTT-4.7.3-1]", (V311,), "post",
     lambda v: pub_raw("", v), PROTO),
    # --- packet identifiers ------------------------------------------------------------------
    ("publish-qos1-packet-id-0-[MQTT-2.3.1-1][MQTT-2.2.1-3]", BOTH, "post",
     lambda v: pub_raw("a/b", v, qos=1, pid=0), PROTO),
    ("publish-qos2-packet-id-0-[MQTT-2.3.1-1][MQTT-2.2.1-3]", BOTH, "post",
     lambda v: pub_raw("a/b", v, qos=2, pid=0), PROTO),
    ("subscribe-packet-id-0-[MQTT-2.3.1-1][MQTT-2.2.1-3]", BOTH, "post",
     lambda v: subscribe(0, [("a", 0)], v), PROTO),
    ("unsubscribe-packet-id-0-[MQTT-2.3.1-1][MQTT-2.2.1-3]", BOTH, "post",
     lambda v: unsubscribe(0, ["a"], v), PROTO),
    # --- subscription options ----------------------------------------------------------------
    ("subscribe-qos3-[MQTT-3.8.3-4]", BOTH, "post", lambda v: sub_raw("a", v, opts=3), PROTO),
    ("subscribe-reserved-option-bits-[MQTT-3.8.3-4][MQTT-3.8.3-5]", BOTH, "post",
     lambda v: sub_raw("a", v, opts=0xC0 if v == V5 else 0x04), PROTO),
    ("subscribe-retain-handling-3-§3.8.3.1", (V5,), "post",
     lambda v: sub_raw("a", v, opts=0x30), PROTO),
    ("subscribe-subscription-identifier-0-§3.8.2.1.2", (V5,), "post",
     lambda v: sub_raw("a", v, prop_items=[(SUBSCRIPTION_IDENTIFIER, 0)]), PROTO),
    # --- truncated content inside a complete fixed header ------------------------------------
    ("puback-remaining-length-1", BOTH, "post", lambda v: b"\x40\x01\x00", PROTO),
    ("publish-topic-longer-than-packet", BOTH, "post", lambda v: b"\x30\x03\x00\x05a", PROTO),
    ("publish-qos1-missing-packet-id", BOTH, "post", lambda v: b"\x32\x04\x00\x02ab", PROTO),
    ("subscribe-missing-options-byte", BOTH, "post",
     lambda v: packet(SUBSCRIBE, 2, u16(1) + empty_props(v) + string("a")), PROTO),
    ("unsubscribe-filter-longer-than-packet", BOTH, "post",
     lambda v: packet(UNSUBSCRIBE, 2, u16(1) + empty_props(v) + b"\x00\x09ab"), PROTO),
    # --- v5 properties -----------------------------------------------------------------------
    ("v5-property-length-beyond-packet-§2.2.2", (V5,), "post",
     lambda v: packet(PUBLISH, 0, string("a") + b"\x0a\x01\x01"), PROTO),
    ("v5-unknown-property-id-§2.2.2.2", (V5,), "post",
     lambda v: pub_raw("a", v, prop_bytes=b"\x7f\x00"), PROTO),
    ("v5-duplicate-property-§2.2.2.2", (V5,), "post",
     lambda v: pub_raw("a", v, prop_bytes=prop(PAYLOAD_FORMAT_INDICATOR, 0) * 2), PROTO),
    ("v5-publish-with-subscription-identifier-[MQTT-3.3.4-6]", (V5,), "post",
     lambda v: pub_raw("a", v, prop_bytes=prop(SUBSCRIPTION_IDENTIFIER, 1)), PROTO),
    ("v5-payload-format-indicator-2-§3.3.2.3.2", (V5,), "post",
     lambda v: pub_raw("a", v, prop_bytes=prop(PAYLOAD_FORMAT_INDICATOR, 2)), PROTO),
    ("v5-user-property-invalid-utf8-[MQTT-1.5.7-1]", (V5,), "post",
     lambda v: pub_raw("a", v, prop_bytes=varint(USER_PROPERTY) + string(b"k\xff") + string("v")),
     PROTO),
    ("v5-auth-without-authentication-method-§4.12", (V5,), "post",
     lambda v: auth(0x18), PROTO),
    ("v5-disconnect-unknown-property-§3.14.2.2", (V5,), "post",
     lambda v: b"\xe0\x03\x00\x01\x7f", PROTO),
    # --- packet sequence ---------------------------------------------------------------------
    ("second-connect-[MQTT-3.1.0-2]", BOTH, "post",
     lambda v: connect(uid("again"), version=v), {0x82}),
    ("client-sends-connack", BOTH, "post", lambda v: b"\x20\x02\x00\x00", PROTO),
    ("client-sends-suback", BOTH, "post", lambda v: b"\x90\x03\x00\x01\x00", PROTO),
    ("client-sends-pingresp", BOTH, "post", lambda v: b"\xd0\x00", PROTO),
    ("packet-type-0-[MQTT-2.2.2-2]", BOTH, "post", lambda v: b"\x00\x00", PROTO),
    ("packet-type-15-v311-[MQTT-2.2.2-2]", (V311,), "post", lambda v: b"\xf0\x00", PROTO),
    ("garbage-after-connect", BOTH, "post", lambda v: b"\x00\xde\xad\xbe\xef" * 4, PROTO),
    # --- before / instead of CONNECT ---------------------------------------------------------
    ("first-packet-publish-[MQTT-3.1.0-1]", BOTH, "pre", lambda v: pub_raw("a/b", v), None),
    ("first-packet-pingreq-[MQTT-3.1.0-1]", BOTH, "pre", lambda v: b"\xc0\x00", None),
    ("first-packet-subscribe-[MQTT-3.1.0-1]", BOTH, "pre",
     lambda v: subscribe(1, [("#", 0)], v), None),
    ("first-packet-disconnect-[MQTT-3.1.0-1]", BOTH, "pre", lambda v: b"\xe0\x00", None),
    ("connect-reserved-flag-[MQTT-3.1.2-3]", BOTH, "pre",
     lambda v: connect(uid("rf"), version=v, reserved=True), None),
    ("connect-fixed-header-flags-[MQTT-2.2.2-2][MQTT-2.1.3-1]", BOTH, "pre",
     lambda v: first_byte(connect(uid("ff"), version=v), 0x12), None),
    ("will-flag-0-will-qos-1-[MQTT-3.1.2-13][MQTT-3.1.2-11]", BOTH, "pre",
     lambda v: connect(uid("wq"), version=v, flags=0x02 | 0x08), None),
    ("will-flag-0-will-retain-1-[MQTT-3.1.2-15][MQTT-3.1.2-13]", BOTH, "pre",
     lambda v: connect(uid("wr"), version=v, flags=0x02 | 0x20), None),
    ("will-qos-3-[MQTT-3.1.2-14][MQTT-3.1.2-12]", BOTH, "pre",
     lambda v: connect(uid("w3"), version=v, will=dict(topic="w", payload=b"x", qos=3)), None),
    ("password-without-username-v311-[MQTT-3.1.2-22]", (V311,), "pre",
     lambda v: connect(uid("pw"), version=v, password=b"pw"), None),
    ("username-flag-without-username-[MQTT-3.1.2-19][MQTT-3.1.2-17]", BOTH, "pre",
     lambda v: connect(uid("uf"), version=v, flags=0x82), None),
    ("client-id-invalid-utf8-[MQTT-1.5.3-1][MQTT-1.5.4-1]", BOTH, "pre",
     lambda v: connect(b"id\xff", version=v), None),
    ("client-id-U+0000-[MQTT-1.5.3-2][MQTT-1.5.4-2]", BOTH, "pre",
     lambda v: connect(b"id\x00x", version=v), None),
    ("v5-connect-receive-maximum-0-§3.1.2.11.3", (V5,), "pre",
     lambda v: connect(uid("rm0"), version=v, properties=[(RECEIVE_MAXIMUM, 0)]), None),
    ("v5-connect-maximum-packet-size-0-§3.1.2.11.4", (V5,), "pre",
     lambda v: connect(uid("mp0"), version=v, properties=[(MAXIMUM_PACKET_SIZE, 0)]), None),
    ("connect-remaining-length-5-bytes", BOTH, "pre",
     lambda v: b"\x10\xff\xff\xff\xff\x7f" + b"\x00" * 8, None),
    ("garbage-http-request", BOTH, "pre",
     lambda v: b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", None),
    ("garbage-ff-bytes", BOTH, "pre", lambda v: b"\xff" * 64, None),
    ("garbage-zero-bytes", BOTH, "pre", lambda v: b"\x00" * 64, None),
]

PARAMS = [
    pytest.param(v, phase, build, rcs, id=f"{'v5' if v == V5 else 'v311'}-{name}")
    for name, versions, phase, build, rcs in CASES for v in versions
]


def expect_rejected(c, version, phase, rcs):
    packets, closed = c.wait_closed(5)
    if version != V5:
        assert packets == [], f"3.1.1 expects a silent close, got {packets!r}"
    elif phase == "post":
        assert [p.type for p in packets] == [DISCONNECT], f"expected DISCONNECT: {packets!r}"
        assert packets[0].rc in rcs, f"reason {packets[0].rc:#x} not in " \
            f"{sorted(hex(r) for r in rcs)}: {packets!r}"
    else:
        # before CONNACK: nothing, or a failing CONNACK; never DISCONNECT [MQTT-3.14.0-1]
        assert packets == [] or (
            len(packets) == 1 and packets[0].type == CONNACK and packets[0].rc >= 0x80
            and not packets[0].session_present), f"unexpected: {packets!r}"
    assert closed, f"broker did not close the connection (got {packets!r})"


@pytest.mark.parametrize("version,phase,build,rcs", PARAMS)
def test_malformed_or_protocol_error(broker, version, phase, build, rcs):
    """See the case id for the normative statement; expectations in the module docstring."""
    topic = f"bystander/{uid('t')}"
    bystander = connected(broker, uid("by"), version)
    assert bystander.subscribe([(topic, 0)]).codes == [0]
    c = Client.to(broker, version)
    if phase == "post":
        c.connect(uid("bad"))
    c.try_send(build(version))
    expect_rejected(c, version, phase, rcs)
    c.close()
    check_broker_serves(broker, bystander, topic, version)
    assert bystander.ping().raw == b"\xd0\x00"
    bystander.disconnect()
    assert broker.alive()


@pytest.mark.parametrize("version", [
    pytest.param(V311, id="v311-[MQTT-3.1.2-8]"),
    pytest.param(V5, id="v5-[MQTT-3.1.2-8]"),
])
def test_protocol_error_publishes_will(broker, version):
    """A connection closed by the broker for a protocol error is an abnormal disconnect: the
    will is published (3.1.1 §3.1.2.5, 5.0 [MQTT-3.1.2-8])."""
    topic = f"will/{uid('t')}"
    w = connected(broker, uid("watch"), version)
    w.subscribe([(topic, 0)])
    c = Client.to(broker, version)
    c.connect(uid("bad"), will=dict(topic=topic, payload=b"broken"))
    c.send(pub_raw("a/b", version, qos=3, flags=0x06))
    c.wait_closed(5)
    got = [(p.topic, p.payload) for p in w.collect(1.0) if p.type == PUBLISH]
    assert got == [(topic, b"broken")], got
    w.disconnect()


# ---------------------------------------------------------------------------------------------
# Every client packet type truncated at every byte
# ---------------------------------------------------------------------------------------------
def full_packets(v):
    """One well-formed example of every packet type a client may send (with optional fields
    filled so there are many truncation points)."""
    vp = [(USER_PROPERTY, ("k", "v"))] if v == V5 else None
    out = {
        "CONNECT": connect("trunc-cid", version=v, keepalive=30,
                           will=dict(topic="w/t", payload=b"will", qos=1, retain=False,
                                     properties=vp),
                           username="user", password=b"pass",
                           properties=[(RECEIVE_MAXIMUM, 10)] if v == V5 else None),
        "PUBLISH-qos0": publish("tr/a", b"payload", version=v, properties=vp),
        "PUBLISH-qos1": publish("tr/a", b"payload", qos=1, pid=5, version=v, properties=vp),
        "PUBLISH-qos2": publish("tr/a", b"payload", qos=2, pid=6, version=v, properties=vp),
        "PUBACK": puback(5, v, rc=0 if v == V5 else None, properties=vp),
        "PUBREC": pubrec(6, v, rc=0 if v == V5 else None, properties=vp),
        "PUBREL": pubrel(6, v, rc=0 if v == V5 else None, properties=vp),
        "PUBCOMP": pubcomp(6, v, rc=0 if v == V5 else None, properties=vp),
        "SUBSCRIBE": subscribe(7, [("tr/+", 1), ("tr/#", 2)], v,
                               properties=[(SUBSCRIPTION_IDENTIFIER, 3)] if v == V5 else None),
        "UNSUBSCRIBE": unsubscribe(8, ["tr/+", "tr/#"], v, properties=vp),
        "PINGREQ": b"\xc0\x00",
        "DISCONNECT": disconnect(v, rc=0 if v == V5 else None, properties=vp),
    }
    if v == V5:
        out["AUTH"] = auth(0x18, properties=[(0x15, "m"), (0x16, b"d")])
    return out


TRUNC = [pytest.param(v, name, id=f"{'v5' if v == V5 else 'v311'}-{name}")
         for v in (V311, V5) for name in full_packets(v)]


@pytest.mark.parametrize("version,name", TRUNC)
def test_truncated_packet_then_close(broker, version, name):
    """Send every proper prefix of a packet, then close the socket: the broker drops that
    connection and keeps serving (bystander and fresh clients work after every prefix)."""
    pkt = full_packets(version)[name]
    assert len(pkt) >= 2
    topic = f"bystander/{uid('t')}"
    bystander = connected(broker, uid("by"), version)
    bystander.subscribe([(topic, 0)])
    for cut in range(1, len(pkt)):
        c = Client.to(broker, version)
        if name != "CONNECT":
            c.connect(uid("tr"))
        c.send(pkt[:cut])
        c.close()
        check_broker_serves(broker, bystander, topic, version)
    assert bystander.ping().raw == b"\xd0\x00"
    bystander.disconnect()
    assert broker.alive()


def test_all_packet_type_constants_used():
    """Guards the truncation table: it covers every client-to-server packet type."""
    types = {p[0] >> 4 for p in full_packets(V5).values()}
    assert types == {CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE,
                     UNSUBSCRIBE, PINGREQ, DISCONNECT, AUTH}
