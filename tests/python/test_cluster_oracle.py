"""A cluster is one broker: the same seeded scenario, played against a single Tern node and
against a three-node cluster with its clients spread over the nodes, delivers the same
messages to every subscriber. The single node is the oracle.

Each scenario draws (from its seed) subscribers with one to three filters out of overlapping
wildcards, each with a QoS, No Local, Retain As Published and a subscription identifier, some
with persistent sessions (some of those disconnected while messages are published, then
back); publishers, among them the subscribers themselves (No Local), publish at QoS 0-2,
some with RETAIN. What each subscriber receives, as (topic, payload, QoS, RETAIN, subscription
identifiers), must be equal as a multiset on both. A failing seed replays: the seed is in the
test id.
"""
import collections
import random
import threading
import time

import pytest
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

FILTERS = ["or/#", "or/+/x", "or/a/+", "or/a/x", "+/a/x", "or/+/+", "or/b/#", "or"]
TOPICS = ["or/a/x", "or/b/x", "or/a/y", "or/c", "or", "or/b/x/z"]
SEEDS = [11, 12, 13]
SETTLE = 15.0
# The cluster's run waits up to this long for what the single node delivered: under a loaded
# 2-core CI machine a node's consumer once delivered a remote QoS 2 message more than 2 s
# late, and "nothing new for two seconds" ended the run before it came (a delay, not a loss;
# a loss still fails, after this long).
CATCH_UP = 30.0
# Quiet time that ends the single node's run (the oracle): long enough for a loaded machine.
QUIET = 3.0


class Client:
    def __init__(self, cid, port, persistent):
        self.cid, self.port, self.persistent = cid, port, persistent
        self.got = []
        self.lock = threading.Lock()
        self.c = None

    def connect(self):
        ev = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.cid, protocol=mqtt.MQTTv5)
        c.on_connect = lambda *a: ev.set()

        def on_message(_c, _u, m):
            ids = getattr(m.properties, "SubscriptionIdentifier", None) or []
            if isinstance(ids, int):
                ids = [ids]
            with self.lock:
                self.got.append((m.topic, m.payload.decode(), m.qos, int(m.retain), tuple(sorted(ids))))

        c.on_message = on_message
        p = Properties(PacketTypes.CONNECT)
        p.SessionExpiryInterval = 600 if self.persistent else 0
        c.connect("127.0.0.1", self.port, clean_start=not self.persistent, properties=p)
        c.loop_start()
        assert ev.wait(10), f"{self.cid}: no CONNACK"
        self.c = c

    def disconnect(self):
        self.c.disconnect()
        self.c.loop_stop()
        self.c = None


def plan(seed):
    """The scenario of `seed`: subscribers with their subscriptions, and the publishes."""
    rnd = random.Random(seed)
    subs = []
    for i in range(6):
        filters = rnd.sample(FILTERS, rnd.randint(1, 3))
        opts = [(f, rnd.randint(0, 2), rnd.random() < 0.4, rnd.random() < 0.5,
                 rnd.choice([None, rnd.randint(1, 1000)])) for f in filters]
        subs.append({"persistent": rnd.random() < 0.5, "opts": opts,
                     "away": rnd.random() < 0.3})
    publishes = []
    for n in range(120):
        who = rnd.randint(0, 8)  # 0-5: a subscriber publishes (No Local), 6-8: a publisher
        publishes.append((who, rnd.choice(TOPICS), f"m{n}", rnd.randint(0, 2), rnd.random() < 0.1))
    return subs, publishes


def play(seed, ports, want=None):
    """Plays the scenario with client i on ports[i % len(ports)]; returns what each received.
    With `want` (what each subscriber got from the oracle), waits until each has that much
    or CATCH_UP has passed, instead of until nothing new came for QUIET seconds."""
    subs, publishes = plan(seed)
    clients = [Client(f"or{seed}-s{i}", ports[i % len(ports)], s["persistent"])
               for i, s in enumerate(subs)]
    pubs = [Client(f"or{seed}-p{i}", ports[(i + 1) % len(ports)], False) for i in range(3)]
    for c, s in zip(clients, subs):
        c.connect()
        for f, qos, nl, rap, sid in s["opts"]:
            props = None
            if sid is not None:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sid
            rc, _ = c.c.subscribe(f, options=SubscribeOptions(qos=qos, noLocal=nl, retainAsPublished=rap),
                                  properties=props)
            assert rc == 0
    for p in pubs:
        p.connect()
    time.sleep(1.0)  # SUBACKs in; subscriptions are installed on their node at SUBACK
    away = [c for c, s in zip(clients, subs) if s["away"] and s["persistent"]]
    for c in away:
        c.disconnect()
    everyone = clients + pubs
    for who, topic, payload, qos, retain in publishes:
        sender = everyone[who]
        if sender.c is None:
            sender = pubs[who % 3]
        info = sender.c.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            info.wait_for_publish(10)
    # QoS 0 to an away session is not queued: let what is in flight between nodes land first.
    time.sleep(1.5)
    for c in away:
        c.connect()  # the session resumes with what was queued (QoS 1/2; QoS 0 is not queued)
    if want is not None:
        deadline = time.time() + CATCH_UP
        while time.time() < deadline:
            with_all = True
            for c, w in zip(clients, want):
                with c.lock:
                    if collections.Counter(c.got) != w:
                        with_all = False
            if with_all:
                break
            time.sleep(0.2)
        time.sleep(1.0)  # anything extra shows too
    else:
        # Settled: nothing new for QUIET seconds.
        deadline = time.time() + SETTLE
        last = -1
        while time.time() < deadline:
            total = sum(len(c.got) for c in clients)
            if total == last:
                break
            last = total
            time.sleep(QUIET)
    result = []
    for c in clients:
        with c.lock:
            result.append(collections.Counter(c.got))
    for c in everyone:
        if c.c is not None:
            c.disconnect()
    return result


@pytest.mark.parametrize("seed", SEEDS)
def test_a_cluster_delivers_what_one_node_delivers(seed, make_broker, tern_cluster):
    single = make_broker({"storage": {"durability": "os"}})
    want = play(seed, [single.port])
    assert sum(sum(c.values()) for c in want) > 50, "the scenario delivers something"
    nodes = tern_cluster(3, quorum_timeout=5)
    got = play(seed, [n.port for n in nodes], want)
    for i, (w, g) in enumerate(zip(want, got)):
        missing = w - g
        extra = g - w
        assert not missing and not extra, (
            f"seed {seed}, subscriber {i} {plan(seed)[0][i]}: "
            f"missing on the cluster {sorted(missing.elements())[:10]}, "
            f"extra {sorted(extra.elements())[:10]}")
