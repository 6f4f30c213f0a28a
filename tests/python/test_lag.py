"""Consumer lag and the status page against the real broker (issue 18, parts 3 and 4).

- A declared queue with a slow consumer: `tern_queue_oldest_age_seconds{kind="queue"}` grows
  while nobody takes its messages, and `tern_queue_delivery_latency_seconds{kind="queue"}`
  counts exactly the messages acknowledged, each at least as late as it waited.
- A `$share` group: the same histogram (kind="shared", name="SHARE/FILTER"), gone with the
  group.
- The status page (`/status.json`): a burst to an offline persistent session rises in the
  charts' queued series, the session leads the slowest consumers by oldest message and then
  by latency once it drains, the burst is levelled in the series; listeners, drops by reason,
  memory and topic rates are there.

No timing assertion is about speed: ages and latencies are compared with waits the test made
itself (a message that waited a second is at least a second late).
"""
import json
import time
import urllib.request

from pahoutil import V5, TIMEOUT, metric
from test_queues import queue_toml


def status(b):
    url = f"http://127.0.0.1:{b.metrics_port}/status.json"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        return json.loads(r.read().decode("utf-8"))


def wait_for(what, probe, timeout=20.0, every=0.2):
    """Polls probe() until it returns something truthy (returned), at most `timeout` s."""
    deadline = time.monotonic() + timeout
    got = probe()
    while not got and time.monotonic() < deadline:
        time.sleep(every)
        got = probe()
    assert got, f"{what}: not within {timeout}s"
    return got


def samples(b, name, labels):
    """Every sample line of family `name` whose labels include `labels`: {suffix+le: value}."""
    url = f"http://127.0.0.1:{b.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        text = r.read().decode("utf-8")
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return [line for line in text.splitlines()
            if line.startswith(name) and all(w in line for w in want)]


def test_a_declared_queue_with_a_slow_consumer(make_broker, mkc):
    b = make_broker({}, extra=queue_toml("orders", "shop/orders/#"))
    q = {"kind": "queue", "name": "orders"}
    pub = mkc("pub", V5, broker=b)
    pub.connect()
    for i in range(5):
        pub.publish("shop/orders/1", str(i).encode(), qos=1)
    assert metric(b, "tern_queue_delivery_latency_seconds_count", q) == 0
    # Nobody consumes: the oldest message's age grows with the time.
    first = wait_for("an oldest age of 1 s",
                     lambda: metric(b, "tern_queue_oldest_age_seconds", q) >= 1 and
                     metric(b, "tern_queue_oldest_age_seconds", q))
    wait_for("the age grows",
             lambda: metric(b, "tern_queue_oldest_age_seconds", q) >= first + 1)
    waited = time.monotonic()

    # A consumer that holds its acknowledgements.
    slow = mkc("slow", V5, broker=b, manual_ack=True)
    slow.connect()
    assert slow.subscribe("$queue/orders", 1) == [1]
    got = slow.get_n(5)
    time.sleep(0.3)
    assert metric(b, "tern_queue_delivery_latency_seconds_count", q) == 0, "nothing acknowledged"
    for m in got[:3]:
        slow.c.ack(m.mid, m.qos)
    wait_for("3 acknowledged",
             lambda: metric(b, "tern_queue_delivery_latency_seconds_count", q) == 3)
    # Each waited at least `first + 1` seconds between its publish and its PUBACK.
    assert metric(b, "tern_queue_delivery_latency_seconds_sum", q) >= 3 * (first + 1)
    assert metric(b, "tern_queue_delivery_latency_seconds_bucket", {**q, "le": "0.5"}) == 0
    for m in got[3:]:
        slow.c.ack(m.mid, m.qos)
    wait_for("5 acknowledged",
             lambda: metric(b, "tern_queue_delivery_latency_seconds_count", q) == 5)
    assert metric(b, "tern_queue_oldest_age_seconds", q) == 0, "drained"
    assert time.monotonic() - waited < 60

    # The status page ranks the queue and its consumer by latency.
    s = status(b)
    by_latency = s["slowest_consumers"]["by_latency"]
    names = [(c["kind"], c["name"]) for c in by_latency]
    assert ("queue", "orders") in names, by_latency
    assert ("session", slow.client_id) in names, by_latency
    for c in by_latency:
        if c["name"] in ("orders", slow.client_id):
            assert c["latency_ms"] >= 1000 * (first + 1) * 0.5, c  # a moving average


def test_a_shared_group_latency_is_counted_and_goes_with_the_group(make_broker, mkc):
    b = make_broker()
    g = {"kind": "shared", "name": "workers/jobs/#"}
    sub = mkc("worker", V5, broker=b, manual_ack=True)
    sub.connect()
    assert sub.subscribe("$share/workers/jobs/#", 1) == [1]
    pub = mkc("pub", V5, broker=b)
    pub.connect()
    for i in range(4):
        pub.publish(f"jobs/{i}", b"x", qos=1)
    got = sub.get_n(4)
    time.sleep(1.2)
    for m in got:
        sub.c.ack(m.mid, m.qos)
    wait_for("4 acknowledged",
             lambda: metric(b, "tern_queue_delivery_latency_seconds_count", g) == 4)
    assert metric(b, "tern_queue_delivery_latency_seconds_sum", g) >= 4 * 1.2
    assert samples(b, "tern_queue_oldest_age_seconds", g), "a shared group's age is exported"
    sub.unsubscribe("$share/workers/jobs/#")
    # The group ends with its last member: its series go (bounded label set).
    wait_for("the group's series removed",
             lambda: not samples(b, "tern_queue_delivery_latency_seconds", g)
             and not samples(b, "tern_queue_oldest_age_seconds", g))


def test_status_page_charts_a_burst_and_ranks_the_offline_session(make_broker, mkc):
    b = make_broker()
    burst = 300
    laggard = mkc("laggard", V5, broker=b, persistent=True)
    laggard.connect()
    assert laggard.subscribe("burst/#", 1) == [1]
    laggard.disconnect()
    # The charts have a point before the burst.
    wait_for("a first point", lambda: status(b)["history"]["points"])
    pub = mkc("pub", V5, broker=b)
    pub.connect()
    for i in range(burst):
        pub.publish("burst/x", str(i).encode(), qos=1, wait=False)
    wait_for("the burst stored", lambda: status(b)["queued"] >= burst)

    def risen():
        pts = status(b)["history"]["points"]
        queued = [p[3] for p in pts]
        return queued if queued[0] < burst <= queued[-1] else None
    risen_series = wait_for("the queued series rises", risen, timeout=20)

    def ranked():
        s = status(b)
        top = s["slowest_consumers"]["by_oldest_age"]
        return s if top and top[0]["name"] == laggard.client_id and \
            top[0]["oldest_age_seconds"] >= 1 else None
    s = wait_for("the offline session ranked slowest", ranked)
    c = s["slowest_consumers"]["by_oldest_age"][0]
    assert (c["kind"], c["online"], c["queued"], c["inflight"]) == ("session", False, burst, 0), c
    # Around it, what an operator reads on the same page.
    assert [t["topic"] for t in s["top_topics"]][:1] == ["burst/x"], s["top_topics"]
    assert s["top_topics"][0]["per_second"] > 0
    assert [l["kind"] for l in s["listeners"]] == ["tcp"], s["listeners"]
    assert set(s["dropped"]) >= {"queue_full", "expired", "not_authorized", "no_subscribers"}
    assert s["memory"]["rss_bytes"] is None or s["memory"]["rss_bytes"] > 1 << 20
    assert s["history"]["interval_seconds"] == 5
    assert len(s["history"]["points"]) <= 180

    # The session comes back and drains: the burst is levelled in the series, and the session
    # now leads by latency (its messages waited at least a second).
    back = mkc.again(laggard)
    back.connect(clean_start=False)
    assert len(back.get_n(burst, timeout=60)) == burst

    def levelled():
        queued = [p[3] for p in status(b)["history"]["points"]]
        return queued if max(queued) >= burst and queued[-1] == 0 else None
    wait_for("the burst levelled in the series", levelled, timeout=20)
    by_latency = wait_for(
        "ranked by latency",
        lambda: [c for c in status(b)["slowest_consumers"]["by_latency"]
                 if c["name"] == laggard.client_id])
    assert by_latency[0]["latency_ms"] >= 500, by_latency
    assert risen_series
