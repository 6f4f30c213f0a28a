"""What only MQTT 5.0 has, as seen by a real library client, paho-mqtt 2.x: CONNACK
properties, reason codes without a 3.1.1 counterpart, subscription identifiers and options,
session expiry, will properties and delay, request/response, message expiry, the client's
limits and topic aliases. The scenarios 5.0 shares with 3.1.1 are written once, for both, in
test_paho.py.

Each test gets its own broker process (conftest `broker` / `make_broker`) on ephemeral loopback
ports. Statement ids such as [MQTT-3.3.4-2] refer to the MQTT 5.0 specification.
"""
import time

import pytest

from pahoutil import (V5, ClientFactory, PacketTypes, Properties, ReasonCode, SubscribeOptions,
                      Will, disconnect_reason, props)

P = V5
CONNECT = PacketTypes.CONNECT
PUBLISH = PacketTypes.PUBLISH
SUBSCRIBE = PacketTypes.SUBSCRIBE
WILL = PacketTypes.WILLMESSAGE
DISCONNECT = PacketTypes.DISCONNECT


def expiry(seconds):
    return props(CONNECT, SessionExpiryInterval=seconds)


def sub_id(n):
    return props(SUBSCRIBE, SubscriptionIdentifier=n)


def opts(qos=0, no_local=False, rap=False, rh=0):
    return SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=rap, retainHandling=rh)


def has(p, name):
    return p is not None and hasattr(p, name)


# --------------------------------------------------------------------------- connect


def test_connack_default_properties(mk):
    """CONNACK properties with the default configuration [MQTT-3.2.2-9] [MQTT-3.2.2-10]: Receive
    Maximum 1024, no Maximum QoS (2 is supported), Retain Available, Maximum Packet Size 1048576,
    Topic Alias Maximum 64, Wildcard and Subscription Identifiers available, Shared
    Subscriptions available; no Session Expiry / Server Keep Alive / Assigned Client
    Identifier when nothing was changed."""
    c = mk("c", P)
    rc, sp, p = c.connect()
    assert rc == 0 and sp is False
    assert p.ReceiveMaximum == 1024
    assert not has(p, "MaximumQoS")
    assert p.RetainAvailable == 1
    assert p.MaximumPacketSize == 1048576
    assert p.TopicAliasMaximum == 64
    assert p.WildcardSubscriptionAvailable == 1
    assert p.SubscriptionIdentifierAvailable == 1
    assert p.SharedSubscriptionAvailable == 1
    assert not has(p, "SessionExpiryInterval")
    assert not has(p, "ServerKeepAlive")
    assert not has(p, "AssignedClientIdentifier")
    assert not has(p, "ResponseInformation")


def test_connack_properties_follow_configured_limits(make_broker, mkc):
    """CONNACK reflects the configuration: Maximum QoS when < 2 [MQTT-3.2.2-9], Receive Maximum,
    Maximum Packet Size, Topic Alias Maximum, Retain Available=0; Session Expiry Interval only when
    the broker lowered the client's; Server Keep Alive when the client's keep alive is 0 or larger
    than limits.max_keepalive [MQTT-3.2.2-21]. SUBACK grants min(requested, max_qos)."""
    b = make_broker({
        "limits": {"receive_maximum": 10, "max_packet_size": 4096, "max_session_expiry": 10,
                   "max_keepalive": 5},
        "mqtt": {"max_qos": 1, "topic_alias_maximum": 5, "retain_available": False},
    })
    a = mkc("a", P, broker=b)
    rc, sp, p = a.connect(keepalive=60, properties=expiry(100))
    assert p.MaximumQoS == 1
    assert p.ReceiveMaximum == 10
    assert p.MaximumPacketSize == 4096
    assert p.TopicAliasMaximum == 5
    assert p.RetainAvailable == 0
    assert p.SessionExpiryInterval == 10
    assert p.ServerKeepAlive == 5
    assert a.subscribe([("lim/0", 0), ("lim/1", 1), ("lim/2", 2)]) == [0, 1, 1]
    bb = mkc("b", P, broker=b)
    rc, sp, p = bb.connect(keepalive=0, properties=expiry(5))
    assert not has(p, "SessionExpiryInterval")
    assert p.ServerKeepAlive == 5
    c = mkc("c", P, broker=b)
    rc, sp, p = c.connect(keepalive=3)
    assert not has(p, "ServerKeepAlive")
    assert not has(p, "SessionExpiryInterval")


def test_authentication_method_rejected(mk):
    """CONNECT with an Authentication Method: CONNACK 0x8C (bad authentication method), and the
    connection is closed [MQTT-3.2.2-7]."""
    c = mk("c", P)
    rc, sp, _ = c.connect(expect_rc=None,
                          properties=props(CONNECT, AuthenticationMethod="SCRAM-SHA-256"))
    assert rc == 0x8C
    assert sp is False  # [MQTT-3.2.2-6]
    c.wait_disconnect()


# --------------------------------------------------------------------------- publish / subscribe


def test_puback_reason_codes(mk):
    """PUBACK 0x10 when nobody subscribed, 0x00 when delivered [MQTT-3.4.2-1]; a client PUBLISH
    to a '$' topic gets 0x87 and is not delivered; Payload Format Indicator 1 with a payload that
    is not UTF-8 gets 0x99 and is not delivered [MQTT-3.3.2-4]."""
    sub = mk("sub", P)
    sub.connect()
    # "$SYS/+", not "$SYS/#": the broker's own $SYS/broker/... topics are two levels deep.
    sub.subscribe([("pr/has", 1), ("$SYS/+", 1), ("#", 1)])
    pub = mk("pub", P)
    pub.connect()
    pub2 = mk("pub2", P)
    pub2.connect()
    assert pub.publish("pr/has", b"x", qos=1) == 0x00
    assert sub.get().payload == b"x"
    sub.unsubscribe("#")
    assert pub.publish("pr/nobody", b"x", qos=1) == 0x10
    assert pub.publish("$SYS/x", b"sys", qos=1) == 0x87
    assert pub.publish("pr/has", b"\xff\xfe\x00bad", qos=1,
                       properties=props(PUBLISH, PayloadFormatIndicator=1)) == 0x99
    sub.expect_none(0.5)
    assert pub.publish("pr/has", "grüße".encode(), qos=1,
                       properties=props(PUBLISH, PayloadFormatIndicator=1)) == 0x00
    m = sub.get()
    assert m.payload == "grüße".encode() and m.properties.PayloadFormatIndicator == 1
    assert pub.c.is_connected()


def test_overlapping_subscriptions_one_copy_with_all_subscription_identifiers(mk):
    """Overlapping subscriptions: one copy at the highest granted QoS carrying every matching
    Subscription Identifier [MQTT-3.3.4-3] [MQTT-3.3.4-4] [MQTT-3.3.4-5]."""
    sub = mk("sub", P)
    sub.connect()
    assert sub.subscribe("ov/+", 0, properties=sub_id(1)) == [0]
    assert sub.subscribe("ov/#", 2, properties=sub_id(2)) == [2]
    assert sub.subscribe("ov/x", 1) == [1]
    pub = mk("pub", P)
    pub.connect()
    pub.publish("ov/x", b"m", qos=2)
    m = sub.get()
    assert (m.payload, m.qos) == (b"m", 2)
    assert sorted(m.properties.SubscriptionIdentifier) == [1, 2]
    sub.expect_none(0.5)
    pub.publish("ov/y/z", b"deep", qos=1)
    m = sub.get()
    assert (m.payload, m.qos) == (b"deep", 1)
    assert m.properties.SubscriptionIdentifier == [2]
    sub.expect_none(0.3)


def test_subscription_identifier_only_when_given(mk):
    """A subscription without identifier yields messages without Subscription Identifier; one
    with identifier 268435455 gets it back [MQTT-3.3.4-3]."""
    sub = mk("sub", P)
    sub.connect()
    sub.subscribe("sid/none", 1)
    sub.subscribe("sid/big", 1, properties=sub_id(268435455))
    pub = mk("pub", P)
    pub.connect()
    pub.publish("sid/none", b"a", qos=1)
    m = sub.get()
    assert not has(m.properties, "SubscriptionIdentifier")
    pub.publish("sid/big", b"b", qos=1)
    m = sub.get()
    assert m.properties.SubscriptionIdentifier == [268435455]


# --------------------------------------------------------------------------- retained


def test_retain_handling(mk):
    """Retain Handling 0 sends retained messages on every subscribe, 1 only when the subscription
    is new, 2 never [MQTT-3.3.1-9] [MQTT-3.3.1-10] [MQTT-3.3.1-11]."""
    pub = mk("pub", P)
    pub.connect()
    pub.publish("rh/t", b"kept", qos=1, retain=True)
    s = mk("s", P)
    s.connect()
    s.subscribe("rh/t", options=opts(1, rh=0))
    assert s.get().payload == b"kept"
    s.subscribe("rh/t", options=opts(1, rh=0))
    m = s.get()
    assert (m.payload, m.retain) == (b"kept", True)
    s.subscribe("rh/+", options=opts(1, rh=1))
    m = s.get()
    assert (m.payload, m.retain) == (b"kept", True)
    s.subscribe("rh/+", options=opts(1, rh=1))  # exists now: nothing
    s.expect_none(0.5)
    s.subscribe("rh/#", options=opts(1, rh=2))
    s.expect_none(0.5)
    # A live message still reaches the client once.
    pub.publish("rh/t", b"live", qos=1)
    m = s.get()
    assert m.payload == b"live"
    s.expect_none(0.3)


def test_retained_delivery_carries_subscription_identifier(mk):
    """Retained messages sent because of a SUBSCRIBE carry that subscription's identifier
    [MQTT-3.3.4-3]."""
    pub = mk("pub", P)
    pub.connect()
    pub.publish("rsid/t", b"kept", qos=1, retain=True)
    s = mk("s", P)
    s.connect()
    s.subscribe("rsid/#", 1, properties=sub_id(5))
    m = s.get()
    assert (m.payload, m.retain) == (b"kept", True)
    assert m.properties.SubscriptionIdentifier == [5]


def test_retain_as_published(mk):
    """Retain As Published=1 keeps the publisher's RETAIN flag on live messages; =0 clears it
    [MQTT-3.3.1-12] [MQTT-3.3.1-13]."""
    keep = mk("keep", P)
    keep.connect()
    keep.subscribe("rap/t", options=opts(1, rap=True))
    clear = mk("clear", P)
    clear.connect()
    clear.subscribe("rap/t", options=opts(1, rap=False))
    pub = mk("pub", P)
    pub.connect()
    pub.publish("rap/t", b"r", qos=1, retain=True)
    pub.publish("rap/t", b"n", qos=1, retain=False)
    a, b = keep.get_n(2)
    assert (a.payload, a.retain, b.payload, b.retain) == (b"r", True, b"n", False)
    a, b = clear.get_n(2)
    assert (a.payload, a.retain, b.payload, b.retain) == (b"r", False, b"n", False)


def test_no_local(mk):
    """No Local=1: the client's own publishes are not sent back to it [MQTT-3.8.3-3]; messages
    from others are."""
    c = mk("c", P)
    c.connect()
    c.subscribe("nl/t", options=opts(1, no_local=True))
    echo = mk("echo", P)
    echo.connect()
    echo.subscribe("nl/t", options=opts(1, no_local=False))
    c.publish("nl/t", b"self", qos=1)
    assert echo.get().payload == b"self"
    c.expect_none(0.5)
    echo.publish("nl/t", b"other", qos=1)
    assert c.get().payload == b"other"
    assert echo.get().payload == b"other"  # echo has No Local=0: it sees its own message


# --------------------------------------------------------------------------- sessions


def test_session_expiry_zero_ends_session_at_disconnect(mk):
    """Session Expiry Interval absent (0): the session ends when the connection closes
    [MQTT-3.1.2-23]; the next Clean Start=0 connect has Session Present=0 and no messages."""
    sub = mk("sub", P)
    sub.connect(clean_start=False)
    sub.subscribe("sz/t", 1)
    sub.disconnect()
    pub = mk("pub", P)
    pub.connect()
    assert pub.publish("sz/t", b"x", qos=1) == 0x10
    again = mk.again(sub)
    rc, sp, _ = again.connect(clean_start=False, properties=expiry(60))
    assert sp is False
    again.expect_none(0.5)


def test_session_expires_after_interval(mk):
    """Session Expiry Interval 1: after more than a second offline the session and its queued
    messages are gone."""
    sub = mk("sub", P)
    sub.connect(clean_start=False, properties=expiry(1))
    sub.subscribe("sx/t", 1)
    sub.disconnect()
    pub = mk("pub", P)
    pub.connect()
    assert pub.publish("sx/t", b"queued", qos=1) == 0x00
    time.sleep(2.2)
    assert pub.publish("sx/t", b"after", qos=1) == 0x10
    again = mk.again(sub)
    rc, sp, _ = again.connect(clean_start=False, properties=expiry(60))
    assert sp is False
    again.expect_none(0.5)


def test_session_expiry_lowered_to_zero_in_disconnect(mk):
    """The Session Expiry Interval can be changed in DISCONNECT: 60 at CONNECT, 0 at DISCONNECT
    ends the session."""
    sub = mk("sub", P)
    sub.connect(clean_start=False, properties=expiry(60))
    sub.subscribe("sd/t", 1)
    sub.disconnect(properties=props(DISCONNECT, SessionExpiryInterval=0))
    again = mk.again(sub)
    rc, sp, _ = again.connect(clean_start=False, properties=expiry(60))
    assert sp is False


def test_session_expiry_zero_then_nonzero_in_disconnect_is_protocol_error(mk):
    """0 at CONNECT and non-zero at DISCONNECT is a protocol error (5.0 section 3.14.2.2.2): the
    DISCONNECT is not a normal one, so the will is published, and the session does not
    survive."""
    w = mk("w", P)
    w.connect()
    w.subscribe("sp/will", 1)
    c = mk("c", P)
    c.connect(clean_start=False, will=Will("sp/will", b"proto", qos=1))
    c.subscribe("sp/t", 1)
    c.disconnect(properties=props(DISCONNECT, SessionExpiryInterval=60))
    assert w.get().payload == b"proto"
    again = mk.again(c)
    rc, sp, _ = again.connect(clean_start=False)
    assert sp is False


def test_clean_start_discards_existing_session(mk):
    """Clean Start=1 discards an existing session [MQTT-3.1.2-4]: Session Present=0 and the
    old subscriptions are gone."""
    sub = mk("sub", P)
    sub.connect(clean_start=False, properties=expiry(60))
    sub.subscribe("cs5/t", 1)
    sub.disconnect()
    again = mk.again(sub)
    rc, sp, _ = again.connect(clean_start=True, properties=expiry(60))
    assert sp is False
    pub = mk("pub", P)
    pub.connect()
    assert pub.publish("cs5/t", b"x", qos=1) == 0x10
    again.expect_none(0.4)


# --------------------------------------------------------------------------- will


def test_will_published_with_its_properties(mk):
    """Abnormal close: the will is published with its properties [MQTT-3.1.2-8]."""
    w = mk("w", P)
    w.connect()
    w.subscribe("w5/t", 1)
    c = mk("c", P)
    wp = props(WILL, ContentType="text/plain", UserProperty=[("k", "1"), ("j", "2")])
    c.connect(will=Will("w5/t", b"bye", qos=1, properties=wp))
    c.drop()
    m = w.get()
    assert (m.topic, m.payload, m.qos) == ("w5/t", b"bye", 1)
    assert m.properties.ContentType == "text/plain"
    assert m.properties.UserProperty == [("k", "1"), ("j", "2")]


def test_will_published_on_disconnect_with_will_message(mk):
    """DISCONNECT reason 0x04 (Disconnect with Will Message) publishes the will."""
    w = mk("w", P)
    w.connect()
    w.subscribe("w5/04", 1)
    c = mk("c", P)
    c.connect(will=Will("w5/04", b"asked", qos=1))
    c.disconnect(reasoncode=ReasonCode(DISCONNECT, "Disconnect with will message"))
    assert w.get().payload == b"asked"


def test_will_delay_interval(mk):
    """Will Delay Interval 2: the will is published about 2 s after the connection is lost, not
    before [MQTT-3.1.3-9]."""
    w = mk("w", P)
    w.connect()
    w.subscribe("wd/t", 1)
    c = mk("c", P)
    c.connect(clean_start=False, properties=expiry(30),
              will=Will("wd/t", b"late", qos=1, properties=props(WILL, WillDelayInterval=2)))
    t0 = time.monotonic()
    c.drop()
    w.expect_none(1.3)
    m = w.get(timeout=4)
    assert m.payload == b"late"
    assert m.timestamp - t0 >= 1.5
    assert not has(m.properties, "WillDelayInterval")


def test_will_delay_cancelled_by_reconnect(mk):
    """A reconnect to the session within the Will Delay Interval cancels the will
    [MQTT-3.1.3-9]."""
    w = mk("w", P)
    w.connect()
    w.subscribe("wc/t", 1)
    c = mk("c", P)
    c.connect(clean_start=False, properties=expiry(30),
              will=Will("wc/t", b"never", qos=1, properties=props(WILL, WillDelayInterval=2)))
    c.drop()
    time.sleep(0.3)
    again = mk.again(c)
    rc, sp, _ = again.connect(clean_start=False, properties=expiry(30))
    assert sp is True
    w.expect_none(3.0)


def test_will_published_at_session_end_before_will_delay(mk):
    """Will Delay Interval 10 but Session Expiry Interval 1: the will is published when the
    session ends, whichever comes first [MQTT-3.1.3-9]."""
    w = mk("w", P)
    w.connect()
    w.subscribe("wse/t", 1)
    c = mk("c", P)
    c.connect(clean_start=False, properties=expiry(1),
              will=Will("wse/t", b"session-over", qos=1,
                        properties=props(WILL, WillDelayInterval=10)))
    t0 = time.monotonic()
    c.drop()
    m = w.get(timeout=5)
    assert m.payload == b"session-over"
    assert m.timestamp - t0 < 5


def test_server_keep_alive_enforced(make_broker, mkc):
    """limits.max_keepalive=1 and a client keep alive of 0: CONNACK Server Keep Alive 1
    [MQTT-3.2.2-21], and a silent client is disconnected with 0x8D after about 1.5 s."""
    b = make_broker({"limits": {"max_keepalive": 1}})
    c = mkc("c", P, broker=b)
    rc, sp, p = c.connect(keepalive=0)
    assert p.ServerKeepAlive == 1
    c.pause()
    packets, closed = c.read_until_close(6.0)
    assert closed is not None
    assert closed <= 3.5, closed
    assert disconnect_reason(packets) == 0x8D, packets


# --------------------------------------------------------------------------- request / response


def test_request_response_properties_pass_through(mk):
    """Response Topic, Correlation Data, User Properties (order kept), Content Type and Payload
    Format Indicator reach the subscriber unaltered [MQTT-3.3.2-15] [MQTT-3.3.2-16]
    [MQTT-3.3.2-17] [MQTT-3.3.2-18] [MQTT-3.3.2-20] [MQTT-3.3.2-4]."""
    req = mk("req", P)
    rc, sp, p = req.connect(properties=props(CONNECT, RequestResponseInformation=1))
    assert p.ResponseInformation == f"reply/{req.client_id}"
    rtopic = f"{p.ResponseInformation}/call1"
    assert req.subscribe(f"{p.ResponseInformation}/#", 1) == [1]
    srv = mk("srv", P)
    srv.connect()
    srv.subscribe("svc/req", 1)
    ups = [("k", "v1"), ("a", "b"), ("k", "v2"), ("ü", "ß")]
    corr = b"\x00\xffcorr\x01"
    rq = props(PUBLISH, ResponseTopic=rtopic, CorrelationData=corr, UserProperty=list(ups),
               ContentType="application/json; charset=utf-8", PayloadFormatIndicator=1)
    assert req.publish("svc/req", b'{"q":1}', qos=1, properties=rq) == 0
    m = srv.get()
    assert m.payload == b'{"q":1}'
    assert m.properties.ResponseTopic == rtopic
    assert m.properties.CorrelationData == corr
    assert m.properties.UserProperty == ups
    assert m.properties.ContentType == "application/json; charset=utf-8"
    assert m.properties.PayloadFormatIndicator == 1
    rs = props(PUBLISH, CorrelationData=m.properties.CorrelationData,
               UserProperty=[("status", "ok")])
    srv.publish(m.properties.ResponseTopic, b"answer", qos=1, properties=rs)
    r = req.get()
    assert (r.topic, r.payload) == (rtopic, b"answer")
    assert r.properties.CorrelationData == corr
    assert r.properties.UserProperty == [("status", "ok")]
    assert not has(r.properties, "ContentType")


def test_response_information_only_when_requested(mk):
    """Without Request Response Information the CONNACK has no Response Information
    [MQTT-3.1.2-28]; with it, it is "reply/<client id>"."""
    a = mk("a", P)
    rc, sp, p = a.connect(properties=props(CONNECT, RequestResponseInformation=0))
    assert not has(p, "ResponseInformation")
    b = mk("b", P)
    rc, sp, p = b.connect(properties=props(CONNECT, RequestResponseInformation=1))
    assert p.ResponseInformation == f"reply/{b.client_id}"


# --------------------------------------------------------------------------- expiry / limits


def test_message_expiry_offline_session(mk):
    """A message whose expiry passed while the session was offline is not delivered
    [MQTT-3.3.2-5]; a surviving one carries the remaining (smaller) interval [MQTT-3.3.2-6]."""
    sub = mk("sub", P)
    sub.connect(clean_start=False, properties=expiry(60))
    sub.subscribe("mx/#", 1)
    sub.disconnect()
    pub = mk("pub", P)
    pub.connect()
    pub.publish("mx/short", b"short", qos=1, properties=props(PUBLISH, MessageExpiryInterval=1))
    pub.publish("mx/long", b"long", qos=1, properties=props(PUBLISH, MessageExpiryInterval=60))
    time.sleep(1.8)
    again = mk.again(sub)
    again.connect(clean_start=False, properties=expiry(60))
    m = again.get()
    assert m.payload == b"long"
    assert 0 < m.properties.MessageExpiryInterval <= 59
    again.expect_none(0.5)


def test_message_expiry_forwarded_live(mk):
    """A live message keeps a Message Expiry Interval no larger than the one published
    [MQTT-3.3.2-6]; a message without one has none."""
    sub = mk("sub", P)
    sub.connect()
    sub.subscribe("ml/#", 1)
    pub = mk("pub", P)
    pub.connect()
    pub.publish("ml/a", b"a", qos=1, properties=props(PUBLISH, MessageExpiryInterval=30))
    m = sub.get()
    assert 0 < m.properties.MessageExpiryInterval <= 30
    pub.publish("ml/b", b"b", qos=1)
    assert not has(sub.get().properties, "MessageExpiryInterval")


def test_retained_message_expiry(mk):
    """An expired retained message is not sent to new subscribers [MQTT-3.3.2-5]."""
    pub = mk("pub", P)
    pub.connect()
    pub.publish("rx/t", b"brief", qos=1, retain=True,
                properties=props(PUBLISH, MessageExpiryInterval=1))
    time.sleep(1.8)
    s = mk("s", P)
    s.connect()
    s.subscribe("rx/t", 1)
    s.expect_none(0.5)


def test_client_maximum_packet_size(mk):
    """A message larger than the client's Maximum Packet Size is skipped for that client only
    [MQTT-3.1.2-24] [MQTT-3.1.2-25]."""
    small = mk("small", P)
    small.connect(properties=props(CONNECT, MaximumPacketSize=200))
    small.subscribe("mps/#", 1)
    big = mk("big", P)
    big.connect()
    big.subscribe("mps/#", 1)
    pub = mk("pub", P)
    pub.connect()
    pub.publish("mps/t", b"L" * 500, qos=1)
    pub.publish("mps/t", b"s" * 10, qos=1)
    assert [len(m.payload) for m in big.get_n(2)] == [500, 10]
    m = small.get()
    assert m.payload == b"s" * 10
    small.expect_none(0.3)
    assert small.c.is_connected()


def test_receive_maximum_limits_outbound_inflight(mk):
    """The broker never has more unacknowledged QoS 1 PUBLISHes towards a client than its Receive
    Maximum [MQTT-3.3.4-9]; each PUBACK releases the next one."""
    sub = mk("sub", P, manual_ack=True)
    sub.connect(properties=props(CONNECT, ReceiveMaximum=2))
    sub.subscribe("rm/t", 1)
    pub = mk("pub", P)
    pub.connect()
    for i in range(5):
        pub.publish("rm/t", str(i).encode(), qos=1)
    got = sub.get_n(2)
    sub.expect_none(0.7)
    sub.c.ack(got[0].mid, 1)
    got.append(sub.get())
    sub.expect_none(0.5)
    for m in got[1:]:
        sub.c.ack(m.mid, 1)
    more = sub.get_n(2)
    for m in more:
        sub.c.ack(m.mid, 1)
    assert [m.payload for m in got + more] == [str(i).encode() for i in range(5)]
    sub.expect_none(0.3)


def test_inbound_receive_maximum_exceeded(make_broker, mkc):
    """A client with more unacknowledged inbound QoS 2 PUBLISHes than the broker's Receive
    Maximum gets DISCONNECT 0x93 [MQTT-3.3.4-8]; other clients are unaffected."""
    b = make_broker({"limits": {"receive_maximum": 2}})
    other = mkc("other", P, broker=b)
    other.connect()
    c = mkc("c", P, broker=b)
    rc, sp, p = c.connect()
    assert p.ReceiveMaximum == 2
    # Three QoS 2 PUBLISHes written at once, so no PUBREL can come in between (paho would
    # otherwise answer the PUBRECs and race the broker's DISCONNECT).
    c.send_batched(lambda: [c.c.publish("rmx/t", str(i).encode(), qos=2) for i in range(3)])
    packets, closed = c.read_until_close()
    assert closed is not None, packets
    assert [first for first, _ in packets] == [0x50, 0x50, 0xE0], packets  # PUBREC x2, DISCONNECT
    assert packets[-1][1][:1] == b"\x93", packets
    assert other.c.is_connected()
    assert other.subscribe("rmx/ok", 1) == [1]


# --------------------------------------------------------------------------- topic aliases


def test_inbound_topic_alias(mk):
    """A client may set a Topic Alias and then publish with an empty topic; subscribers get the
    full topic name."""
    sub = mk("sub", P)
    sub.connect()
    sub.subscribe("ta/#", 1)
    c = mk("c", P)
    c.connect()
    c.publish("ta/long/name", b"1", qos=1, properties=props(PUBLISH, TopicAlias=3))
    c.publish("", b"2", qos=1, properties=props(PUBLISH, TopicAlias=3))
    c.publish("ta/other", b"3", qos=1, properties=props(PUBLISH, TopicAlias=3))
    c.publish("", b"4", qos=1, properties=props(PUBLISH, TopicAlias=3))
    msgs = sub.get_n(4)
    got = [(m.topic, m.payload) for m in msgs]
    assert got == [("ta/long/name", b"1"), ("ta/long/name", b"2"), ("ta/other", b"3"),
                   ("ta/other", b"4")]
    # The subscriber advertised no Topic Alias Maximum: no alias towards it [MQTT-3.1.2-27].
    assert not any(has(m.properties, "TopicAlias") for m in msgs)


@pytest.mark.parametrize("alias,empty_topic,code", [(0, False, 0x94), (65, False, 0x94),
                                                    (7, True, 0x82)])
def test_inbound_topic_alias_errors(mk, alias, empty_topic, code):
    """Topic Alias 0 or above Topic Alias Maximum (64): DISCONNECT 0x94 [MQTT-3.3.2-8]
    [MQTT-3.3.2-9]; an empty topic with an alias never set: DISCONNECT 0x82. A connection closed
    for a protocol error publishes its will."""
    w = mk("w", P)
    w.connect()
    w.subscribe("tae/will", 1)
    c = mk("c", P)
    c.connect(will=Will("tae/will", b"err", qos=1))
    p = Properties(PUBLISH)
    object.__setattr__(p, "TopicAlias", alias)  # paho refuses 0 itself
    c.publish("" if empty_topic else "tae/t", b"x", qos=1, properties=p, wait=False, closes=True)
    reason, flags, _, _ = c.wait_disconnect()
    assert flags.is_disconnect_packet_from_server
    assert reason.value == code
    assert w.get().payload == b"err"


def test_outbound_topic_aliases(mk):
    """A client advertising Topic Alias Maximum > 0 gets broker-assigned aliases within its limit
    [MQTT-3.1.2-26]; a client that did not advertise any gets none [MQTT-3.1.2-27]."""
    al = mk("al", P)
    al.connect(properties=props(CONNECT, TopicAliasMaximum=2))
    al.subscribe("oa/#", 0)
    plain = mk("plain", P)
    plain.connect()
    plain.subscribe("oa/#", 0)
    pub = mk("pub", P)
    pub.connect()
    topics = ["oa/one", "oa/one", "oa/two", "oa/one", "oa/two"]
    for i, t in enumerate(topics):
        pub.publish(t, str(i).encode(), qos=1)
    got = al.get_n(5)
    assert [m.payload for m in got] == [str(i).encode() for i in range(5)]
    aliases = {}
    saw_empty = False
    for t, m in zip(topics, got):
        if has(m.properties, "TopicAlias"):
            a = m.properties.TopicAlias
            assert 1 <= a <= 2
            if m.topic == "":
                saw_empty = True
                assert aliases.get(a) == t, (a, aliases, t)
            else:
                assert m.topic == t
                aliases[a] = t
        else:
            assert m.topic == t
    assert aliases, "no Topic Alias was used"
    assert saw_empty, "aliases were set but never used with an empty topic"
    pm = plain.get_n(5)
    assert [m.topic for m in pm] == topics
    assert not any(has(m.properties, "TopicAlias") for m in pm)

