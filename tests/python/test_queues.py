"""Declared durable queues (`[[queues]]`, `$queue/NAME`, docs/queues.md) with real paho
clients, for MQTT 3.1.1 and 5.0 from one scenario each.

The 2 AM order: what is published before any consumer exists is kept, across a SIGKILL, for
the first consumer ever; consumers split a queue and one killed mid-stream loses nothing;
overflow in both modes; an undeclared queue is refused; reload adds and removes queues.
QUEUE_N (10,000 by default; `make soak` sets TERN_QUEUE_N=100000) sizes the long runs.
"""
import collections
import os
import signal
import subprocess
import sys
import time

import pytest

import conftest
from pahoutil import V311, V5, TIMEOUT, metric

VERSIONS = [V311, V5]
QUEUE_N = int(os.environ.get("TERN_QUEUE_N", "10000"))


@pytest.fixture(params=VERSIONS)
def version(request):
    return request.param


def queue_toml(name="orders", filter="shop/orders/#", **kw):
    lines = [f'[[queues]]\nname = "{name}"\nfilter = "{filter}"\n']
    for k, v in kw.items():
        lines.append(f"{k} = {v!r}\n" if isinstance(v, int) else f'{k} = "{v}"\n')
    return "".join(lines)


def publish_all(pub, topic_of, n, window=200, timeout=60):
    """Publishes n QoS 1 messages (payload = index) with up to `window` in flight; returns
    the reason codes in order (None for 3.1.1)."""
    pending = collections.deque()
    rcs = [None] * n
    for i in range(n):
        pending.append((i, pub.publish(topic_of(i), str(i).encode(), qos=1, wait=False)))
        while len(pending) >= window:
            j, mid = pending.popleft()
            rcs[j] = pub.wait_published(mid, timeout=timeout)
    while pending:
        j, mid = pending.popleft()
        rcs[j] = pub.wait_published(mid, timeout=timeout)
    return rcs


def wait_metric(b, name, labels, want, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    got = metric(b, name, labels)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = metric(b, name, labels)
    return got


def test_first_consumer_ever_gets_what_was_published_before_it_across_a_kill(
        stoppable, mkc, version):
    """QUEUE_N QoS 1 publishes with no consumer anywhere are all acknowledged 0x00; the broker
    is SIGKILLed and restarted; the first consumer ever of $queue/orders gets all of them, in
    order, and nothing more."""
    b = stoppable({}, extra=queue_toml())
    pub = mkc("order-service", version, broker=b)
    pub.connect()
    rcs = publish_all(pub, lambda i: f"shop/orders/{i % 7}", QUEUE_N)
    assert set(rcs) <= {0, None}, collections.Counter(rcs)
    assert wait_metric(b, "tern_queue_messages", {"queue": "orders"}, QUEUE_N) == QUEUE_N
    pub.close()
    b.proc.kill()
    b.proc.wait(timeout=10)
    b.start()
    assert metric(b, "tern_queue_messages", {"queue": "orders"}) == QUEUE_N
    assert metric(b, "tern_queue_oldest_age_seconds", {"kind": "queue", "name": "orders"}) >= 0
    email = mkc("email-service", version, broker=b)
    email.connect()
    assert email.subscribe("$queue/orders", 1) == [1]
    got = [int(m.payload) for m in email.get_n(QUEUE_N, timeout=120)]
    assert got == list(range(QUEUE_N))
    email.expect_none(0.3)
    assert wait_metric(b, "tern_queue_messages", {"queue": "orders"}, 0) == 0
    assert metric(b, "tern_queue_messages_delivered_total", {"queue": "orders"}) == QUEUE_N


def test_consumers_split_a_queue_and_a_killed_one_loses_nothing(make_broker, mkc, version):
    """Two consumers share the queue (each message to one of them); one is killed (its socket
    dropped, no DISCONNECT) partway: what it had not acknowledged goes to the other. Oracle:
    every message reached a consumer; duplicates only of those the killed one had in flight."""
    n = QUEUE_N
    b = make_broker({}, extra=queue_toml())
    pub = mkc("pub", version, broker=b)
    pub.connect()
    publish_all(pub, lambda i: "shop/orders/x", n)
    a = mkc("a", version, broker=b)
    c = mkc("c", version, broker=b)
    a.connect()
    c.connect()
    assert a.subscribe("$queue/orders", 1) == [1]
    assert c.subscribe("$queue/orders", 1) == [1]
    first = a.get_n(n // 8, timeout=60)
    a.drop()
    seen_a = {int(m.payload) for m in first + a.drain(0.1)}
    seen_c = collections.Counter()
    seen = set(seen_a)
    deadline = time.monotonic() + 120
    while len(seen) < n and time.monotonic() < deadline:
        try:
            m = c.messages.get(timeout=1)
        except Exception:
            continue
        p = int(m.payload)
        seen_c[p] += 1
        seen.add(p)
    assert seen == set(range(n)), "lost: %d" % (n - len(seen))
    assert seen_c, "the second consumer shared the work"
    assert max(seen_c.values()) == 1, "no message twice to the same consumer"
    # A second copy only for what the killed consumer held unfinished (its in-flight window).
    assert len(seen_a & set(seen_c)) <= 100 + 256
    assert wait_metric(b, "tern_queue_messages", {"queue": "orders"}, 0) == 0


@pytest.mark.parametrize("overflow", ["reject", "drop_oldest"])
def test_overflow_refuses_or_drops_the_oldest_and_counts(make_broker, mkc, version, overflow):
    """max_messages = 5, 8 publishes with no consumer. reject: the last 3 are not queued (v5:
    PUBACK 0x97, nothing else took them), counted as queue_full; the consumer gets 0..4.
    drop_oldest: all acknowledged 0x00, the 3 oldest dropped (counted as overflow); the
    consumer gets 3..7."""
    b = make_broker({}, extra=queue_toml(max_messages=5, overflow=overflow))
    pub = mkc("pub", version, broker=b)
    pub.connect()
    rcs = [pub.publish("shop/orders/1", str(i).encode(), qos=1) for i in range(8)]
    if overflow == "reject":
        want_rcs = [0] * 5 + [0x97] * 3 if version == V5 else [0] * 8
        kept, reason = list(range(5)), "queue_full"
    else:
        want_rcs = [0] * 8
        kept, reason = list(range(3, 8)), "overflow"
    assert rcs == want_rcs, rcs
    assert wait_metric(b, "tern_queue_messages_dropped_total", {"queue": "orders", "reason": reason}, 3) == 3
    assert metric(b, "tern_messages_dropped_total", {"reason": reason}) == 3
    c = mkc("c", version, broker=b)
    c.connect()
    c.subscribe("$queue/orders", 1)
    assert [int(m.payload) for m in c.get_n(5)] == kept
    c.expect_none(0.3)


def test_an_undeclared_queue_is_refused_and_qos_0_is_not_queued(make_broker, mkc, version):
    """SUBSCRIBE to an undeclared $queue/NAME: SUBACK 0x8F (3.1.1: 0x80); a malformed queue
    name likewise. A QoS 0 publish is not kept by a queue (PUBACK-less, nothing queued), and a
    QoS 0 consumer gets QoS 0 deliveries of QoS 1 messages."""
    b = make_broker({}, extra=queue_toml())
    c = mkc("c", version, broker=b)
    c.connect()
    refused = 0x8F if version == V5 else 0x80
    assert c.subscribe("$queue/nope", 1) == [refused]
    assert c.subscribe("$queue/a/b", 1) == [refused]
    pub = mkc("pub", version, broker=b)
    pub.connect()
    pub.publish("shop/orders/1", b"fire-and-forget", qos=0)
    pub.publish("shop/orders/1", b"kept", qos=1)
    assert wait_metric(b, "tern_queue_messages", {"queue": "orders"}, 1) == 1
    assert c.subscribe("$queue/orders", 0) == [0]
    m = c.get()
    assert (m.payload, m.qos) == (b"kept", 0)
    c.expect_none(0.3)


def test_reload_adds_a_queue_and_a_removed_one_keeps_its_messages(make_broker, mkc, version):
    """SIGHUP with a new [[queues]]: it collects from then on. SIGHUP without it: it stops
    collecting; what it holds stays for its consumers until drained."""
    b = make_broker({})
    pub = mkc("pub", version, broker=b)
    pub.connect()
    pub.publish("shop/orders/1", b"before", qos=1)
    with open(b.config_path, "a") as f:
        f.write(queue_toml())
    reloads = b.log().count("configuration reloaded")
    b.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while b.log().count("configuration reloaded") == reloads and time.monotonic() < deadline:
        time.sleep(0.05)
    pub.publish("shop/orders/1", b"after", qos=1)
    assert wait_metric(b, "tern_queue_messages", {"queue": "orders"}, 1) == 1
    # Removed again: a publish is no longer kept, the one it has stays.
    text = open(b.config_path).read()
    with open(b.config_path, "w") as f:
        f.write(text[:text.index("[[queues]]")])
    reloads = b.log().count("configuration reloaded")
    b.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while b.log().count("configuration reloaded") == reloads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "no longer declared" in b.log()
    pub.publish("shop/orders/1", b"not kept", qos=1)
    c = mkc("c", version, broker=b)
    c.connect()
    assert c.subscribe("$queue/orders", 1) == [1], "still there while it holds messages"
    assert c.get().payload == b"after"
    c.expect_none(0.3)


def test_the_acl_governs_a_queue_like_a_topic(make_broker, mkc, tmp_path, version):
    """`topic read $queue/orders` lets a consumer have the queue's messages, whatever their
    topics (shop/orders/1 is not readable by it); a declared queue it has no rule for is
    refused as not authorised (3.1.1: 0x80)."""
    acl = tmp_path / "acl"
    acl.write_text("topic write shop/#\ntopic read $queue/orders\n")
    b = make_broker({"auth": {"acl_file": str(acl)}},
                    extra=queue_toml() + queue_toml(name="audit", filter="shop/#"))
    c = mkc("c", version, broker=b)
    c.connect()
    assert c.subscribe("$queue/audit", 1) == [0x87 if version == V5 else 0x80]
    assert c.subscribe("shop/orders/#", 1) == [0x87 if version == V5 else 0x80]
    assert c.subscribe("$queue/orders", 1) == [1]
    pub = mkc("pub", version, broker=b)
    pub.connect()
    pub.publish("shop/orders/1", b"o1", qos=1)
    assert c.get().payload == b"o1"
    # Both queues collected it (several queues may collect one message).
    assert wait_metric(b, "tern_queue_messages", {"queue": "audit"}, 1) == 1


def test_the_durable_queue_example_tells_its_story(make_broker):
    """examples/durable_queue.py against a broker declaring its queue as config/default.toml
    does: it exits 0 and says OK."""
    b = make_broker({}, extra=queue_toml(name="examples", filter="examples/queue/#"))
    r = subprocess.run(
        [sys.executable, os.path.join(conftest.ROOT, "examples", "durable_queue.py"),
         "--port", str(b.port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("OK"), r.stdout
