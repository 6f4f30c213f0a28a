"""Restarting every Tern node of a cluster (one after the other, then all at once, the NATS
servers staying up) keeps what the cluster promised: retained messages are the same on every
node, including one whose data directory was wiped (they come from the cluster's retained
stream, not only from the node's store), and a persistent session comes back with its queue.
"""
import shutil
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

QUORUM_TIMEOUT = 5


def client(cid, port, clean=True, on_message=None):
    ev = threading.Event()
    res = {}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=clean)

    def on_connect(_c, _u, flags, rc, _p=None):
        res["present"] = flags.session_present
        ev.set()

    c.on_connect = on_connect
    if on_message:
        c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert ev.wait(10), f"{cid}: no CONNACK from :{port}"
    return c, res


def retained(port, flt, cid):
    got = {}
    lock = threading.Lock()

    def on_message(_c, _u, m):
        with lock:
            got[m.topic] = m.payload

    c, _ = client(cid, port, on_message=on_message)
    c.subscribe(flt, qos=1)
    time.sleep(1.0)
    c.disconnect()
    c.loop_stop()
    with lock:
        return dict(got)


def test_retained_and_sessions_survive_restarting_every_node(tern_cluster):
    nodes = tern_cluster(3, quorum_timeout=QUORUM_TIMEOUT)
    pub, _ = client("rs-pub", nodes[0].port)
    for t, v in [("rs/a", b"1"), ("rs/b", b"2"), ("rs/c/d", b"3")]:
        pub.publish(t, v, qos=1, retain=True).wait_for_publish(10)
    pub.publish("rs/b", b"", qos=1, retain=True).wait_for_publish(10)  # cleared
    want = {"rs/a": b"1", "rs/c/d": b"3"}

    # A persistent subscriber on t2 with messages queued while it is away.
    got = []
    sub, _ = client("rs-sub", nodes[1].port, clean=False, on_message=lambda c, u, m: got.append(m.payload))
    sub.subscribe("rsq/#", qos=1)
    time.sleep(0.5)
    sub.disconnect()
    sub.loop_stop()
    for i in range(50):
        pub.publish("rsq/x", f"q{i}".encode(), qos=1).wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()

    # One after the other, t3 with its data directory wiped.
    for i, n in enumerate(nodes):
        n.stop()
        if i == 2:
            shutil.rmtree(n.tmp.name + "/data", ignore_errors=True)
        n.start()
        assert retained(n.port, "rs/#", f"rs-check-{i}") == want, f"t{i + 1} after its restart"
    # All at once.
    for n in nodes:
        n.stop()
    for n in nodes:
        n.start()
    for i, n in enumerate(nodes):
        assert retained(n.port, "rs/#", f"rs-again-{i}") == want, f"t{i + 1} after all restarted"

    # The session comes back on its node with what was queued, in order.
    sub, res = client("rs-sub", nodes[1].port, clean=False, on_message=lambda c, u, m: got.append(m.payload))
    assert res["present"]
    deadline = time.time() + 15
    while len(got) < 50 and time.time() < deadline:
        time.sleep(0.1)
    assert got == [f"q{i}".encode() for i in range(50)]
    sub.disconnect()
    sub.loop_stop()


def test_node_consumer_changed_replicas_keeps_its_place(tern_cluster):
    """A node whose consumer was made with 3 replicas (cluster.consumer_replicas = 3, as every
    consumer was before that key) restarts with the default 1: its consumer is made again
    where it was acknowledged, so a persistent session on it gets everything published while
    it was down, in order, once. fast_path is off: only the consumer brings messages to t2."""
    from cluster import NatsClient

    t1, t2 = tern_cluster(2, quorum_timeout=QUORUM_TIMEOUT, consumer_replicas=3, fast_path=False)
    nats = tern_cluster.nats

    def consumer_replicas():
        with NatsClient(nats.url(0)) as nc:
            info = nc.js("CONSUMER.INFO.TERN_MSGS.t2")
        assert info and "config" in info, info
        return info["config"].get("num_replicas") or 1

    assert consumer_replicas() == 3
    got = []
    sub, _ = client("cr-sub", t2.port, clean=False, on_message=lambda c, u, m: got.append(m.payload))
    sub.subscribe("cr/#", qos=1)
    time.sleep(1.0)
    sub.disconnect()
    sub.loop_stop()
    t2.stop()
    pub, _ = client("cr-pub", t1.port)
    for i in range(50):
        pub.publish("cr/x", f"c{i}".encode(), qos=1).wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()

    with open(t2.config_path) as f:
        text = f.read()
    assert "consumer_replicas = 3" in text
    with open(t2.config_path, "w") as f:
        f.write(text.replace("consumer_replicas = 3", "consumer_replicas = 1"))
    t2.start()
    assert consumer_replicas() == 1
    sub, res = client("cr-sub", t2.port, clean=False, on_message=lambda c, u, m: got.append(m.payload))
    assert res["present"]
    deadline = time.time() + 15
    while len(got) < 50 and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    assert got == [f"c{i}".encode() for i in range(50)]
    sub.disconnect()
    sub.loop_stop()
