"""Abuse limits in [limits]: connect rate, topic length/levels, subscriptions per client and
per-client publish rate (back-pressure). Raw sockets on loopback; every wait is bounded."""
import threading
import time

import pytest

from mqttraw import (
    DISCONNECT, PUBACK, PUBLISH, V311, V5, Client, Closed, Timeout, connected, publish, uid,
)
from pahoutil import metric

BOTH = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]


def _try_connect(broker, version=V311):
    """CONNECT on a fresh socket: the Client on success, None when the broker closed it."""
    try:
        c = Client.to(broker, version, timeout=3.0)
    except OSError:
        return None
    try:
        c.connect(uid("rate"))
        return c
    except (Closed, Timeout, OSError, ConnectionError):
        c.close()
        return None


# ---------------------------------------------------------------------------------------------
# max_connect_rate
# ---------------------------------------------------------------------------------------------
def test_connect_rate_refuses_connections_over_the_rate(make_broker):
    b = make_broker({"limits": {"max_connect_rate": 5}})
    start = time.monotonic()
    results = [_try_connect(b) for _ in range(30)]
    elapsed = time.monotonic() - start
    ok = [c for c in results if c is not None]
    # Burst of 5 plus what refills while the loop runs.
    assert len(ok) >= 5, (len(ok), elapsed)
    assert len(ok) <= 5 + int(elapsed * 5) + 2, (len(ok), elapsed)
    refused = metric(b, "tern_connections_refused_total", {"reason": "connect_rate"})
    assert refused == 30 - len(ok), (refused, len(ok))
    for c in ok:
        c.disconnect()
    # The bucket refills: a connection a second later is served.
    time.sleep(1.2)
    c = _try_connect(b)
    assert c is not None
    c.disconnect()


def test_connect_rate_default_is_unlimited(broker):
    clients = [_try_connect(broker) for _ in range(40)]
    assert all(c is not None for c in clients)
    assert metric(broker, "tern_connections_refused_total", {"reason": "connect_rate"}) == 0
    for c in clients:
        c.disconnect()


# ---------------------------------------------------------------------------------------------
# max_topic_length / max_topic_levels
# ---------------------------------------------------------------------------------------------
TOPIC_LIMITS = {"limits": {"max_topic_length": 32, "max_topic_levels": 4}}


def test_publish_topic_at_the_limits_is_accepted(make_broker):
    b = make_broker(TOPIC_LIMITS)
    for version in (V311, V5):
        with connected(b, uid("tl"), version) as c:
            assert c.publish("a" * 32, b"x", qos=1, pid=1).type == PUBACK
            assert c.publish("a/b/c/d", b"x", qos=1, pid=2).type == PUBACK
            c.disconnect()


@pytest.mark.parametrize("version", BOTH)
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("topic", ["a" * 33, "a/b/c/d/e", "/a/b/c/", "////"])
def test_publish_topic_over_limits_closes(make_broker, topic, qos, version):
    """A PUBLISH whose topic is over the limits closes the connection: 5.0 with DISCONNECT 0x90
    (Topic Name invalid), 3.1.1 without a word."""
    b = make_broker(TOPIC_LIMITS)
    with connected(b, uid("tl"), version) as c:
        c.send(publish(topic, b"x", qos=qos, pid=1 if qos else None, version=version))
        got, closed = c.wait_closed(timeout=5)
        assert closed, got
        assert [(p.type, p.rc) for p in got] == ([(DISCONNECT, 0x90)] if version == V5 else []), got


def test_subscribe_filter_over_limits_is_refused(make_broker):
    b = make_broker(TOPIC_LIMITS)
    filters = [("a/+/c/#", 1), ("f" * 33, 1), ("a/b/c/d/#", 1), ("x" * 32, 0)]
    with connected(b, uid("tl"), V5) as c:
        assert c.subscribe(filters).codes == [1, 0x8F, 0x8F, 0]
        c.disconnect()
    with connected(b, uid("tl"), V311) as c:
        assert c.subscribe(filters).codes == [1, 0x80, 0x80, 0]
        c.disconnect()


def test_will_topic_over_limits_is_refused(make_broker):
    b = make_broker(TOPIC_LIMITS)
    c = Client.to(b, V5)
    c.connect(uid("tl"), expect_rc=0x90, will={"topic": "w" * 33, "payload": b"bye"})
    c.close()


def test_topic_limit_validation_names_the_key(make_broker):
    with pytest.raises(RuntimeError) as e:
        make_broker({"limits": {"max_topic_levels": 0}})
    assert "limits.max_topic_levels" in str(e.value)
    with pytest.raises(RuntimeError) as e:
        make_broker({"limits": {"max_topic_length": 70000}})
    assert "limits.max_topic_length" in str(e.value)
    with pytest.raises(RuntimeError) as e:
        make_broker({"limits": {"max_publish_bytes_rate": 10}})
    assert "limits.max_publish_bytes_rate" in str(e.value)


# ---------------------------------------------------------------------------------------------
# max_subscriptions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", BOTH)
def test_max_subscriptions_refused_beyond_the_limit(make_broker, version):
    """limits.max_subscriptions=3: further filters are refused in the SUBACK (5.0 0x97 Quota
    exceeded, 3.1.1 0x80); re-subscribing to a filter the client already has does not count,
    and unsubscribing frees a place."""
    refused = 0x97 if version == V5 else 0x80
    b = make_broker({"limits": {"max_subscriptions": 3}})
    with connected(b, uid("ms"), version) as c:
        sub = c.subscribe([(f"s/{i}", 1) for i in range(5)], pid=1)
        assert sub.codes == [1, 1, 1, refused, refused], sub
        # Re-subscribing to filters it already has does not count (and sets the new QoS).
        assert c.subscribe([("s/0", 0)], pid=2).codes == [0]
        assert c.subscribe([("s/1", 2), ("s/2", 0)], pid=6).codes == [2, 0]
        assert c.subscribe([("s/9", 0)], pid=3).codes == [refused]
        # A 3.1.1 UNSUBACK carries no reason codes.
        assert c.unsubscribe(["s/1"], pid=4).codes == ([0] if version == V5 else [])
        assert c.subscribe([("s/9", 0)], pid=5).codes == [0]
        # The refused filters really are not subscribed.
        c.publish("s/4", b"x", qos=0)
        c.publish("s/9", b"y", qos=0)
        got, _ = c.recv_until(lambda p: p.type == PUBLISH, timeout=5)
        assert got.topic == "s/9", got
        c.assert_silent(0.3)
        c.disconnect()


# ---------------------------------------------------------------------------------------------
# max_publish_rate / max_publish_bytes_rate: back-pressure, never a disconnect
# ---------------------------------------------------------------------------------------------
def _flood(b, count, payload, results):
    """Pipelines `count` QoS 1 publishes and counts PUBACKs (in a thread)."""
    c = connected(b, uid("flood"), V311)
    c.sock.settimeout(10)
    data = b"".join(publish("flood/x", payload, qos=1, pid=(i % 65535) + 1)
                    for i in range(count))
    start = time.monotonic()
    sender = threading.Thread(target=c.send, args=(data,), daemon=True)
    sender.start()
    acks = 0
    try:
        while acks < count:
            p = c.recv(timeout=10)
            if p.type == PUBACK:
                acks += 1
    except (Closed, Timeout) as e:
        results["error"] = repr(e)
    results["acks"] = acks
    results["elapsed"] = time.monotonic() - start
    sender.join(5)
    c.disconnect()


def _round_trip(b):
    with connected(b, uid("rt"), V311) as c:
        topic = f"rt/{uid('t')}"
        c.subscribe([(topic, 1)])
        start = time.monotonic()
        c.publish(topic, b"ping", qos=1, pid=7)
        got, _ = c.recv_until(lambda p: p.type == PUBLISH, timeout=5)
        took = time.monotonic() - start
        assert got.payload == b"ping"
        c.ack_publish(got)
        c.disconnect()
    return took


def test_publish_rate_back_pressure(make_broker):
    b = make_broker({"limits": {"max_publish_rate": 200}})
    results = {}
    t = threading.Thread(target=_flood, args=(b, 600, b"m", results), daemon=True)
    t.start()
    time.sleep(0.7)
    assert t.is_alive(), f"flood finished too early: {results}"
    took = _round_trip(b)
    assert took < 0.5, took
    t.join(15)
    assert not t.is_alive()
    assert "error" not in results, results
    assert results["acks"] == 600, results
    # 200 of burst, then 400 at 200/s: about 2 s.
    assert results["elapsed"] >= 1.5, results
    assert results["elapsed"] < 10, results


def test_publish_bytes_rate_back_pressure(make_broker):
    b = make_broker({"limits": {"max_packet_size": 2048, "max_publish_bytes_rate": 20000}})
    results = {}
    # 60 packets of ~1 KB: 20 KB burst, then 40 KB at 20 KB/s.
    t = threading.Thread(target=_flood, args=(b, 60, b"p" * 1000, results), daemon=True)
    t.start()
    time.sleep(0.5)
    took = _round_trip(b)
    assert took < 0.5, took
    t.join(15)
    assert not t.is_alive()
    assert "error" not in results, results
    assert results["acks"] == 60, results
    assert results["elapsed"] >= 1.5, results


def test_publish_rate_unlimited_by_default(broker):
    results = {}
    _flood(broker, 600, b"m", results)
    assert results["acks"] == 600, results
    assert results["elapsed"] < 1.5, results
