"""Faults against the real Tern binary: publishers that reset their connection mid-commit,
subscribers killed and taken over, the broker SIGKILLed under load.

What is promised: once the broker has sent PUBACK for a QoS 1 PUBLISH, the message reaches
every matching subscription whose queue had room, live (no broker restart needed), whatever
happens afterwards to the publisher's connection, to the subscriber's connections, or, in the
"os" and "fsync" durability modes, to the broker process itself (a persistent session's
acknowledged messages survive a SIGKILL). A message whose PUBACK the publisher never read is
not promised: it may or may not arrive, but nothing that was never published may.

How the oracle decides: every payload is unique (client + counter) and publishers record each
one whose PUBACK they read, with its topic. Subscribers acknowledge everything they are sent
and record what they receive. At the end, for every subscriber, each acknowledged payload
whose topic matches its filter must have been received at least once (QoS 1: duplicates are
fine); every received payload must be one a client published, on a topic the filter matches;
and /metrics must show the queues drained (`tern_queued_messages` back to 0, and
`tern_reservations_open` back to 0 where the broker exports it) with no `queue_full` drops
(the queue limits are far above anything these tests publish).

Regression for issue 13: a delivery to a persistent session that waits for its store commit
was applied by the *publisher's* connection after the commit, so a publisher resetting its TCP
connection mid-commit left the subscriber's queue with a place that never settled, and the
subscriber stalled until a broker restart.

test_faults_under_load draws its fault schedule from random.Random(seed): the seed is
TERN_FAULT_SEED or a fixed default and is printed in every failure message, so a failing run
replays (the schedule does; thread timing cannot).

Every wait is bounded; every thread is joined with a timeout.
"""
import os
import random
import re
import threading
import time
import traceback
import urllib.request

import pytest

import mqttraw as mq
from mqttraw import DISCONNECT, PUBACK, PUBLISH, V311, V5

BOTH = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]
DURABLE = [pytest.param("os", id="os"), pytest.param("fsync", id="fsync")]
# The five-step regression holds in every mode ("memory" keeps the session in RAM only).
EVERY_MODE = DURABLE + [pytest.param("memory", id="memory")]

EXPIRY = 3600
# Far above what any test here queues: a queue_full drop would be a loss the oracle cannot
# excuse, so none may happen.
BIG_QUEUES = {"max_queued_messages": 100_000, "max_queued_bytes": 1_000_000_000,
              "max_queued_messages_persistent": 100_000,
              "max_queued_bytes_persistent": 1_000_000_000}
NETWORK_ERRORS = (OSError, mq.Timeout, mq.Closed)


def start_broker(make_broker, durability, **limits):
    return make_broker({"storage": {"durability": durability},
                        "limits": {**BIG_QUEUES, **limits}})


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------
def connect_clean(b, version, prefix):
    c = mq.Client(b.host, b.port, version)
    c.connect(mq.uid(prefix))
    return c


def connect_persistent(b, client_id, version):
    """Clean session 0 (3.1.1) / Clean Start 0 + Session Expiry (5.0); keep alive off."""
    c = mq.Client(b.host, b.port, version)
    props = [(mq.SESSION_EXPIRY_INTERVAL, EXPIRY)] if version == V5 else None
    c.connect(client_id, clean=False, keepalive=0, properties=props)
    return c


def subscribe_qos1(c, flt):
    ack = c.subscribe([(flt, 1)])
    assert ack.codes == [1], ack


def disconnect_and_wait(c):
    """DISCONNECT, then wait (bounded) for the broker to close, so the session is detached."""
    c.try_send(mq.disconnect(c.version))
    c.wait_closed(timeout=5)
    c.close()


def burst(topic, payloads, version):
    """QoS 1 PUBLISHes with packet ids 1..n, as one buffer for one sendall."""
    return b"".join(mq.publish(topic, p, 1, i + 1, version=version)
                    for i, p in enumerate(payloads))


def publish_and_reset(b, version, topic, payloads, wait_connack=True):
    """CONNECT (clean), optionally read CONNACK, write every PUBLISH in one sendall and reset
    the connection at once (SO_LINGER 0: RST) without reading a PUBACK."""
    c = mq.Client(b.host, b.port, version)
    try:
        if wait_connack:
            c.connect(mq.uid("reset"))
            c.send(burst(topic, payloads, version))
        else:
            c.send(mq.connect(mq.uid("reset"), version=version) + burst(topic, payloads, version))
    finally:
        c.abort()


def reset_publishers_at_once(b, version, topic, wave, n, size):
    """`n` publishers connect; once all have their CONNACK they write `size` QoS 1 PUBLISHes
    each and reset together, so that many commits are still pending when the resets arrive.
    Returns every payload written."""
    clients = [connect_clean(b, version, "reset") for _ in range(n)]
    bursts = [[f"burst-{wave}-{i}-{k}".encode() for k in range(size)] for i in range(n)]
    go = threading.Barrier(n)
    errors = []

    def burst_and_reset(c, payloads):
        try:
            go.wait(10)
            c.send(burst(topic, payloads, version))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            c.abort()

    threads = [threading.Thread(target=burst_and_reset, args=(c, p), daemon=True)
               for c, p in zip(clients, bursts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not errors and not any(t.is_alive() for t in threads), errors
    return {p for payloads in bursts for p in payloads}


def publish_acked(c, topic, payloads, window=20, on_ack=None):
    """Publishes QoS 1 with at most `window` unacknowledged. Every PUBACK must come, in order,
    with reason code 0; `on_ack(payload)` is called as each one is read. Returns the payloads
    acknowledged (in order)."""
    acked = []
    for start in range(0, len(payloads), window):
        chunk = payloads[start:start + window]
        c.send(burst(topic, chunk, c.version))
        for i, p in enumerate(chunk):
            ack = c.expect_ack(PUBACK, timeout=15)
            assert ack.pid == i + 1 and ack.rc == 0, f"PUBACK for {p!r}: {ack!r}"
            acked.append(p)
            if on_ack is not None:
                on_ack(p)
    return acked


class Collector:
    """Reads one subscriber connection on a thread, acknowledging every QoS 1 PUBLISH and
    recording (topic, payload)."""

    def __init__(self, c):
        self.c = c
        self.received = []
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                p = self.c.recv(0.1)
            except mq.Timeout:
                continue
            except (mq.Closed, OSError) as e:
                self.error = e
                return
            if p.type != PUBLISH:
                self.error = AssertionError(f"unexpected packet {p!r}")
                return
            self.received.append((p.topic, p.payload))
            if p.qos:
                self.c.try_send(mq.puback(p.pid, self.c.version))

    def payloads(self):
        return {p for _, p in list(self.received)}

    def wait_for(self, want, timeout):
        """Waits until every payload in `want` was received; returns those still missing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._thread.is_alive():
            if not want - self.payloads():
                break
            time.sleep(0.05)
        return want - self.payloads()

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive(), "collector thread did not stop"


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)")


def scrape(b):
    url = f"http://127.0.0.1:{b.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def sample(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`; None when there is none."""
    total = None
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total = (total or 0.0) + float(m.group(3))
    return total


def unsettled(text):
    """What /metrics shows still waiting: queued messages, and open reservations when the
    broker exports that gauge. {} once everything settled."""
    out = {}
    queued = sample(text, "tern_queued_messages")
    if queued != 0:
        out["tern_queued_messages"] = queued
    if "tern_reservations_open" in text:
        open_ = sample(text, "tern_reservations_open")
        if open_ != 0:
            out["tern_reservations_open"] = open_
    return out


def wait_settled(b, timeout=10.0):
    """Polls /metrics until nothing is queued or reserved; returns what is left ({} = ok)."""
    deadline = time.monotonic() + timeout
    left = unsettled(scrape(b))
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = unsettled(scrape(b))
    return left


def queue_full_drops(b):
    return sample(scrape(b), "tern_messages_dropped_total", reason="queue_full") or 0.0


# ---------------------------------------------------------------------------------------------
# 1. Reset publishers must not stall a persistent subscriber (issue 13)
# ---------------------------------------------------------------------------------------------
STALL_TOPIC = "stall/t"
# Whether a reset lands before its commit completes is a race the test cannot steer; one wave
# of twenty publishers lost it about one run in ten on the unfixed broker ("os" mode), so
# there are three.
RESET_WAVES = 3


@pytest.mark.parametrize("durability", EVERY_MODE)
@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
@pytest.mark.parametrize("version", BOTH)
def test_reset_publishers_do_not_stall_a_persistent_subscriber(make_broker, version, online,
                                                               durability):
    """Waves of twenty publishers each write 20 QoS 1 PUBLISHes and reset at once (mid-commit,
    with luck: all together, so the store has a backlog when the resets arrive); then 300
    acknowledged messages must all reach the persistent subscriber, live, and its queue must
    drain to 0. Offline: the subscriber is away during the bursts (its deliveries wait on
    disk); online: it stays connected and reads all along."""
    b = start_broker(make_broker, durability)
    sub_id = mq.uid("stall-sub")
    sub = connect_persistent(b, sub_id, version)
    subscribe_qos1(sub, STALL_TOPIC)
    collector = Collector(sub).start() if online else None
    if not online:
        disconnect_and_wait(sub)

    published = set()
    for wave in range(RESET_WAVES):
        published |= reset_publishers_at_once(b, version, STALL_TOPIC, wave, n=20, size=20)

    good = [f"good-{k:03d}".encode() for k in range(300)]
    published.update(good)
    pub = connect_clean(b, version, "good-pub")
    assert publish_acked(pub, STALL_TOPIC, good) == good
    disconnect_and_wait(pub)

    if not online:
        sub = connect_persistent(b, sub_id, version)
        assert sub.connack.session_present, "persistent session lost"
        collector = Collector(sub).start()
    try:
        missing = collector.wait_for(set(good), timeout=20)
        assert not missing, (
            f"subscriber stalled: {len(missing)} of 300 acknowledged messages not delivered "
            f"within 20 s (first: {sorted(missing)[:5]}; collector error: {collector.error!r}; "
            f"metrics still show {unsettled(scrape(b))})")
        unknown = collector.payloads() - published
        assert not unknown, f"received messages nobody published: {sorted(unknown)[:5]}"
        left = wait_settled(b)
        assert not left, f"queue did not drain after everything was acknowledged: {left}"
    finally:
        collector.stop()
    assert collector.error is None, collector.error
    assert queue_full_drops(b) == 0
    disconnect_and_wait(sub)


# ---------------------------------------------------------------------------------------------
# 2. A seeded fault schedule under load
# ---------------------------------------------------------------------------------------------
DEFAULT_SEED = 13013
RUN_SECONDS = 20.0      # load with faults
DRAIN_SECONDS = 60.0    # at most, after the publishers stopped (normally a few)
IDLE_SECONDS = 4.0      # drained: nothing new for this long
SUBSCRIBERS = [("f/#", V5), ("f/+/x", V311), ("f/a/x", V5)]
PUBLISHERS = [("f/a/x", V311), ("f/b/x", V5), ("f/a/y", V311)]
FLAKY_TOPIC = "f/v/x"


def topic_matches(flt, topic):
    f, t = flt.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def guarded(errors, fn, *args):
    """A thread target that records an unexpected exception instead of losing it."""
    def run():
        try:
            fn(*args)
        except BaseException:  # noqa: BLE001 - reported by the test
            errors.append(traceback.format_exc())
    return run


def connect_retrying(b, stop, connect):
    """`connect()` until it succeeds or `stop` is set (the broker may be restarting)."""
    for _ in range(1000):
        if stop.is_set():
            return None
        try:
            return connect()
        except NETWORK_ERRORS:
            stop.wait(0.1)
    raise AssertionError("could not connect for 100 s")


class Publisher:
    """Publishes QoS 1 batches of `window`, each in one sendall, and records in `acked` the
    payloads whose PUBACK it read. Reconnects (clean) when the connection fails."""

    def __init__(self, name, topic, version, window=10, pause=0.02):
        self.name, self.topic, self.version = name, topic, version
        self.window, self.pause = window, pause
        self.acked = {}     # payload -> topic
        self.sent = {}
        self.reconnects = 0

    def run(self, b, stop):
        n = 0
        while not stop.is_set():
            c = connect_retrying(b, stop, lambda: connect_clean(b, self.version, self.name))
            if c is None:
                return
            try:
                while not stop.is_set():
                    payloads = [f"{self.name}-{n + i}".encode() for i in range(self.window)]
                    n += self.window
                    self.sent.update((p, self.topic) for p in payloads)
                    publish_acked(c, self.topic, payloads, self.window, self._record)
                    stop.wait(self.pause)
            except NETWORK_ERRORS:
                self.reconnects += 1
            finally:
                c.close()

    def _record(self, payload):
        self.acked[payload] = self.topic


class FlakyDevice:
    """Connects, bursts 5-60 QoS 1 PUBLISHes and resets (RST), a few times a second; never
    reads a PUBACK, so none of its messages is promised."""

    def __init__(self, rng):
        self.rng = rng
        self.sent = {}

    def run(self, b, stop):
        i = 0
        while not stop.is_set():
            version = self.rng.choice([V311, V5])
            payloads = [f"flaky-{i}-{k}".encode() for k in range(self.rng.randint(5, 60))]
            i += 1
            self.sent.update((p, FLAKY_TOPIC) for p in payloads)
            try:
                publish_and_reset(b, version, FLAKY_TOPIC, payloads,
                                  wait_connack=self.rng.random() < 0.7)
            except NETWORK_ERRORS:
                pass
            stop.wait(self.rng.uniform(0.1, 0.4))


class FaultySubscriber:
    """A persistent QoS 1 subscriber that acknowledges everything, records what it receives,
    and carries out the faults the controller asks for: "kill" (reset its socket, stay away a
    while, reconnect) and "takeover" (a new connection with the same client id; the broker
    must close the old one, a v5 one with DISCONNECT 0x8E)."""

    def __init__(self, idx, flt, version):
        self.flt, self.version = flt, version
        self.client_id = mq.uid(f"fsub{idx}")
        self.received = []          # (topic, payload)
        self.notes = []             # broken promises seen along the way
        self.requests = []          # (fault, offline seconds), appended by the controller
        self.busy = threading.Lock()  # held while a fault is carried out
        self.last_rx = time.monotonic()
        self.faults = 0             # faults carried out
        self.c = None

    def setup(self, b):
        c = connect_persistent(b, self.client_id, self.version)
        subscribe_qos1(c, self.flt)
        disconnect_and_wait(c)

    def _connect(self, b, stop):
        c = connect_retrying(b, stop, lambda: connect_persistent(b, self.client_id,
                                                                 self.version))
        if c is not None and not c.connack.session_present:
            self.notes.append("session not present on reconnect")
        return c

    def _handle(self, c, p):
        if p.type != PUBLISH:
            self.notes.append(f"unexpected packet {p!r}")
            return
        self.received.append((p.topic, p.payload))
        self.last_rx = time.monotonic()
        if p.qos:
            c.send(mq.puback(p.pid, c.version))

    def _takeover(self, b):
        old, self.c = self.c, None
        try:
            new = connect_persistent(b, self.client_id, self.version)
            pkts, closed = old.wait_closed(timeout=5)
        finally:
            old.close()
        for p in pkts:
            if p.type == PUBLISH:
                self.received.append((p.topic, p.payload))
        if not closed:
            self.notes.append("old connection still open 5 s after a takeover")
        elif self.version == V5 and not (pkts and pkts[-1].type == DISCONNECT
                                         and pkts[-1].rc == 0x8E):
            self.notes.append(f"v5 takeover: last packet {pkts[-1:]!r}, not DISCONNECT 0x8E")
        self.c = new

    def _fault(self, b, stop, fault, offline):
        with self.busy:
            self.faults += 1
            if fault == "kill":
                self.c.abort()
                self.c = None
                stop.wait(offline)
            else:
                self._takeover(b)

    def run(self, b, stop):
        while not stop.is_set():
            try:
                if self.c is None:
                    self.c = self._connect(b, stop)
                    if self.c is None:
                        return
                if self.requests:
                    self._fault(b, stop, *self.requests.pop(0))
                    continue
                self._handle(self.c, self.c.recv(0.1))
            except mq.Timeout:
                continue
            except NETWORK_ERRORS:
                if self.c is not None:
                    self.c.close()
                self.c = None
        if self.c is not None:
            disconnect_and_wait(self.c)


def fault_schedule(rng, n_subs):
    """[(at seconds, fault, subscriber index, seconds)] in time order: a subscriber kill (then
    that long offline) or takeover every 0.4-1.6 s, and one broker SIGKILL (then that long
    down) between 35% and 65% of the run."""
    events = []
    t = rng.uniform(0.3, 1.0)
    while t < RUN_SECONDS - 1.0:
        events.append((t, rng.choice(["kill", "takeover"]), rng.randrange(n_subs),
                       rng.uniform(0.05, 1.5)))
        t += rng.uniform(0.4, 1.6)
    events.append((rng.uniform(0.35, 0.65) * RUN_SECONDS, "sigkill", None,
                   rng.uniform(0.0, 0.5)))
    return sorted(events, key=lambda e: e[0])


def sigkill_and_restart(b, subs, downtime):
    """SIGKILL the broker while no subscriber is in the middle of a fault (so a takeover's
    checks see the broker alive), stay down `downtime` s, restart on the same data dir.
    Returns the queue_full drops counted before the kill."""
    held = []
    try:
        for s in subs:
            assert s.busy.acquire(timeout=15), "a subscriber fault did not finish in 15 s"
            held.append(s)
        drops = queue_full_drops(b)
        b.proc.kill()
        b.proc.wait(timeout=10)
        time.sleep(downtime)
        b.start()
        return drops
    finally:
        for s in held:
            s.busy.release()


def run_schedule(b, subs, events, t0):
    drops = 0.0
    for at, fault, idx, secs in events:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        if fault == "sigkill":
            drops += sigkill_and_restart(b, subs, secs)
        else:
            subs[idx].requests.append((fault, secs))
    time.sleep(max(0.0, t0 + RUN_SECONDS - time.monotonic()))
    return drops


def missing_for(sub, acked):
    want = {p for p, topic in acked.items() if topic_matches(sub.flt, topic)}
    return want - {p for _, p in list(sub.received)}


def drain(subs, acked):
    """Waits until every subscriber has everything it is owed, or all have been idle for
    IDLE_SECONDS, at most DRAIN_SECONDS."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline:
        if not any(missing_for(s, acked) for s in subs):
            return
        if all(time.monotonic() - s.last_rx > IDLE_SECONDS and not s.requests for s in subs):
            return
        time.sleep(0.1)


def misrouted(sub, published):
    """Received (topic, payload) pairs that nobody published, or not on a matching topic."""
    return [(t, p) for t, p in list(sub.received)
            if published.get(p) != t or not topic_matches(sub.flt, t)]


@pytest.mark.parametrize("durability", DURABLE)
def test_faults_under_load(make_broker, durability):
    seed = int(os.environ.get("TERN_FAULT_SEED", DEFAULT_SEED))
    rng = random.Random(seed)
    tag = f"seed {seed} (replay: TERN_FAULT_SEED={seed}), durability {durability}"
    print(tag)  # shown with any failure, also one that is not the oracle's
    b = start_broker(make_broker, durability)

    subs = [FaultySubscriber(i, flt, v) for i, (flt, v) in enumerate(SUBSCRIBERS)]
    for s in subs:
        s.setup(b)
    pubs = [Publisher(f"pub{i}", topic, v) for i, (topic, v) in enumerate(PUBLISHERS)]
    flaky = FlakyDevice(random.Random(rng.random()))
    events = fault_schedule(rng, len(subs))

    errors = []
    stop_subs, stop_pubs = threading.Event(), threading.Event()
    sub_threads = [threading.Thread(target=guarded(errors, s.run, b, stop_subs), daemon=True)
                   for s in subs]
    pub_threads = [threading.Thread(target=guarded(errors, w.run, b, stop_pubs), daemon=True)
                   for w in pubs + [flaky]]
    for t in sub_threads + pub_threads:
        t.start()
    try:
        drops = run_schedule(b, subs, events, time.monotonic())
        stop_pubs.set()
        for t in pub_threads:
            t.join(20)
        assert not any(t.is_alive() for t in pub_threads), f"a publisher hung; {tag}"

        acked = {p: topic for w in pubs for p, topic in w.acked.items()}
        drain(subs, acked)
        problems = []
        for s in subs:
            missing = missing_for(s, acked)
            if missing:
                problems.append(f"{s.flt} ({s.client_id}): {len(missing)} acknowledged "
                                f"messages never delivered, e.g. {sorted(missing)[:5]}")
        left = wait_settled(b)
        if left:
            problems.append(f"queues not drained: {left}")
    finally:
        stop_pubs.set()
        stop_subs.set()
        for t in pub_threads + sub_threads:
            t.join(15)

    published = {**flaky.sent, **{p: t for w in pubs for p, t in w.sent.items()}}
    for s in subs:
        bad = misrouted(s, published)
        if bad:
            problems.append(f"{s.flt}: received {len(bad)} messages never published on a "
                            f"matching topic, e.g. {bad[:3]}")
        problems += [f"{s.flt}: {n}" for n in s.notes[:5]]
    drops += queue_full_drops(b)
    if drops:
        problems.append(f"{drops:.0f} queue_full drops")
    problems += errors
    summary = (f"{len(acked)} acknowledged, {len(published)} published, received "
               f"{[len(s.received) for s in subs]}, subscriber faults "
               f"{[s.faults for s in subs]}, publisher reconnects {[w.reconnects for w in pubs]}")
    assert not problems, f"{tag}: {summary}\n" + "\n".join(problems)
    assert not any(t.is_alive() for t in sub_threads), f"a subscriber hung; {tag}"
    print(f"{tag}: {summary}")
