"""Declared queues in a cluster (docs/queues.md, "One node and a cluster"): one queue across
the nodes, kept by a JetStream consumer made when the queue is declared.

What is published on any node before any consumer exists is kept; the first consumer, on
another node, gets it all; consumers on two nodes split it; a consumer's node dying hands
what it held to the consumers elsewhere. Real nats-servers (the `nats_cluster` fixture) and
Tern nodes; every wait bounded.
"""
import collections
import time

import pytest

from pahoutil import V311, V5
from test_queues import publish_all, queue_toml

VERSIONS = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]
N = 2000


@pytest.fixture(params=VERSIONS)
def version(request):
    return request.param


def nodes(tern_cluster, n=3):
    return tern_cluster(n, quorum_timeout=2, extra=queue_toml())


def receive_all(clients, n, timeout=60):
    """Payloads (ints) per client, in the clients' order, until n distinct arrived in all."""
    got = [collections.Counter() for _ in clients]
    deadline = time.monotonic() + timeout
    while len(set().union(*got)) < n and time.monotonic() < deadline:
        for c, counts in zip(clients, got):
            for m in c.drain(0.05):
                counts[int(m.payload)] += 1
    return got


def test_the_first_consumer_on_another_node_gets_what_was_published_before(
        tern_cluster, mkc, version):
    t1, t2, _ = nodes(tern_cluster)
    pub = mkc("order-service", version, broker=t1)
    pub.connect()
    rcs = publish_all(pub, lambda i: f"shop/orders/{i % 3}", N)
    assert set(rcs) <= {0, None}, collections.Counter(rcs)
    email = mkc("email-service", version, broker=t2)
    email.connect()
    assert email.subscribe("$queue/orders", 1) == [1]
    got = [(m.topic, int(m.payload)) for m in email.get_n(N, timeout=60)]
    assert sorted(p for _, p in got) == list(range(N))
    # A cluster keeps order per topic (one topic's messages cross in batches, in order).
    for topic in {t for t, _ in got}:
        ps = [p for t, p in got if t == topic]
        assert ps == sorted(ps), f"{topic} out of order"
    email.expect_none(0.5)


def test_consumers_on_two_nodes_split_it_and_a_dead_node_loses_nothing(
        tern_cluster, mkc, version):
    """Consumers on t2 and t3 share the queue; t2 is killed (SIGKILL) while it holds
    messages: after JetStream's ack wait they go to the consumer on t3. Every message
    reaches a consumer."""
    t1, t2, t3 = nodes(tern_cluster)
    pub = mkc("pub", version, broker=t1)
    pub.connect()
    publish_all(pub, lambda i: "shop/orders/x", N)
    a = mkc("a", version, broker=t2, manual_ack=True)
    a.connect()
    assert a.subscribe("$queue/orders", 1) == [1]
    c = mkc("c", version, broker=t3)
    c.connect()
    assert c.subscribe("$queue/orders", 1) == [1]
    first = a.get_n(50, timeout=30)  # never acknowledged: t2 holds them
    t2.proc.kill()
    t2.proc.wait(timeout=10)
    (got,) = receive_all([c], N, timeout=90)
    missing = set(range(N)) - set(got)
    assert not missing, f"{len(missing)} lost, e.g. {sorted(missing)[:10]}"
    assert {int(m.payload) for m in first} <= set(got), "the dead node's messages came back"
    t2.start()  # back in the cluster (the fixture checks every node is alive at the end)


# --------------------------------------------------------------------------- bridges


def test_a_bridge_runs_on_one_node_and_moves_when_it_dies(tern_cluster, mkc):
    """Every node has the same [[bridges]] to a Mosquitto B; one node at a time runs it (a
    lease in JetStream KV). What is published on any node reaches B through it; its node is
    SIGKILLed: another node takes the lease and the queue (the cluster's), and everything
    published, before and after, reaches B; nothing that came in over the bridge goes back."""
    from test_bridges import Mosquitto, bridge_toml, free_port
    from test_queues import wait_metric
    from pahoutil import metric
    port = free_port()
    b = Mosquitto(port)
    try:
        toml = bridge_toml(port, "5", out=[("sensors/#", 1, "", "site17/"),
                                           ("alarms/#", 1, "", "site17/")],
                           inbound=[("cmd/#", 1, "", "")])
        ts = tern_cluster(3, quorum_timeout=2, extra=toml)
        deadline = time.monotonic() + 30
        running = []
        while time.monotonic() < deadline:
            running = [t for t in ts if metric(t, "tern_bridge_connected", {"bridge": "cloud"})]
            if running:
                break
            time.sleep(0.2)
        assert len(running) == 1, [t.node for t in running]
        holder = running[0]
        time.sleep(1.0)
        assert [t for t in ts if metric(t, "tern_bridge_connected", {"bridge": "cloud"})] == [holder]
        sub = mkc("cloud", V5, broker=b, persistent=True)
        sub.connect()
        assert sub.subscribe("site17/#", 1) == [1]
        others = [t for t in ts if t is not holder]
        pub = mkc("gw", V5, broker=others[0])
        pub.connect()
        half = N // 2
        assert set(publish_all(pub, lambda i: f"sensors/t{i % 4}", half)) == {0}
        holder.proc.kill()
        holder.proc.wait(timeout=10)
        rest = publish_all(pub, lambda i: f"sensors/t{(i + half) % 4}", half)
        assert set(rest) == {0}
        # Payloads are 0..half-1 twice over (the second half restarted its count): wait for
        # every (topic, payload) pair.
        want = {(f"site17/sensors/t{i % 4}", i) for i in range(half)}
        want |= {(f"site17/sensors/t{(i + half) % 4}", i) for i in range(half)}
        pairs = set()
        deadline = time.monotonic() + 90
        while not want <= pairs and time.monotonic() < deadline:
            pairs |= {(m.topic, int(m.payload)) for m in sub.drain(0.5)}
        missing = want - pairs
        assert not missing, f"{len(missing)} lost, e.g. {sorted(missing)[:5]}"
        now = []
        deadline = time.monotonic() + 20
        while len(now) != 1 and time.monotonic() < deadline:
            now = [t for t in others if metric(t, "tern_bridge_connected", {"bridge": "cloud"})]
            time.sleep(0.2)
        assert len(now) == 1, "another node runs the bridge"
        # Every `out` filter is collected (the queue's consumer has both).
        assert pub.publish("alarms/fire", b"!", qos=1) == 0
        deadline = time.monotonic() + 30
        alarm = None
        while alarm is None and time.monotonic() < deadline:
            # Second copies of what the dead node had in flight may come first.
            alarm = next((m for m in sub.drain(0.5) if m.topic.startswith("site17/alarms")),
                         None)
        assert alarm is not None and alarm.payload == b"!", "the second out filter is collected"
        # A command from B comes in once, on the node running the bridge, and is not sent
        # back out (sensors/# would not match it anyway; cmd/# is in only).
        here = mkc("here", V5, broker=others[0])
        here.connect()
        assert here.subscribe("cmd/#", 1) == [1]
        time.sleep(0.5)
        ops = mkc("ops", V5, broker=b)
        ops.connect()
        ops.publish("cmd/stop", b"now", qos=1)
        assert here.get(timeout=15).payload == b"now"
        here.expect_none(0.5)
        holder.start()  # the fixture checks every node is alive at the end
    finally:
        b.close()
