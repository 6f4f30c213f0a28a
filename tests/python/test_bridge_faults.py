"""A seeded fault schedule against a store-and-forward bridge (docs/bridges.md), with an oracle.

Tern A bridges `sensors/#` (QoS 1) to a Mosquitto B as `site17/sensors/...`, for the bridge's
MQTT 3.1.1 and 5. While one publisher on A publishes N QoS 1 messages (payload = sequence
number, topic sensors/t{i % 5}; N is TERN_BRIDGE_FAULT_N, 3,000 by default; in bursts of BURST
over RUN_SECONDS) and a persistent subscriber on B (`site17/#`, QoS 1, fixed client id) records
everything it receives, a schedule drawn from random.Random(seed) SIGKILLs A and restarts it on
the same data dir, SIGTERMs or SIGKILLs B and restarts it on the same port and persistence dir
(sometimes SIGKILLing A too while it forwards the backlog of B's downtime), or pauses: 4-8
faults, one at a time, each fired when the publisher reaches a given message of a burst, so
that it finds messages on their way. Both clients reconnect on their own; the publisher
re-publishes (as a new message) whatever it had not read a PUBACK for. After the last fault
everything is up and the test waits (at most DRAIN_SECONDS) for the oracle:

- every sequence number A acknowledged reaches B's subscriber at least once;
- per topic, the first copies arrive in ascending order (a re-published sequence number is left
  out of this check: its copies may hold its old place in A's queue or its new one);
- duplicates (copies beyond the first) stay within (link drops + 1) x window, plus one per
  re-published message, plus what B itself delivers twice (below);
- A never dies on its own and its bridge queue drains to 0.

What is B's and not A's (Mosquitto, not under test): Mosquitto acknowledges a message before it
is on disk and saves its database only every AUTOSAVE seconds and at a clean exit. A SIGKILL of
B can therefore lose what B had acknowledged to A but not yet delivered to the subscriber, and
can replay, from its last save, what the subscriber had already received. So for each SIGKILL
of B, sequence numbers published before the kill that the subscriber had not received by then
are exempt from the loss and order checks, and the copies the subscriber received in the
AUTOSAVE + 3 s before the kill may come again; after any restart of B (SIGTERM too) B may
re-deliver its own in-flight window to the subscriber (B_INFLIGHT).

The seed is printed in every failure message and replays with TERN_BRIDGE_FAULT_SEED=n (the
schedule replays; thread timing cannot). `make test` runs SEEDS for each protocol.
Every wait is bounded; processes are stopped by the fixtures, also on failure.
"""
import collections
import os
import pwd
import queue
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time
import traceback

import pytest

from pahoutil import V311, V5, TClient, metric
from test_bridges import MOSQUITTO, WINDOW, Mosquitto, bridge_toml, free_port, wait_connected
from test_queues import wait_metric

N = int(os.environ.get("TERN_BRIDGE_FAULT_N", "3000"))
SEEDS = ([int(os.environ["TERN_BRIDGE_FAULT_SEED"])] if os.environ.get("TERN_BRIDGE_FAULT_SEED")
         else [4242, 91017])
TOPICS = 5
RUN_SECONDS = 24.0      # publishing and faults
DRAIN_SECONDS = 60.0    # at most, after the last fault and the last publish
PUB_WINDOW = 50         # publishes in flight on A
BURST = 100             # the publisher's pace: BURST messages at once, evenly over the run
AUTOSAVE = 1            # B's autosave_interval, seconds
B_INFLIGHT = 100        # B's max_inflight_messages towards the subscriber
SUB_ID = "bridge-faults-sub"
PUB_ID = "bridge-faults-pub"


# ---------------------------------------------------------------------------------------------
# B: a Mosquitto that can be stopped and started again on the same port and persistence dir
# ---------------------------------------------------------------------------------------------
class RestartableMosquitto(Mosquitto):
    """Mosquitto as in test_bridges (persistence in its own dir, unlimited queues, 100 in
    flight) plus a periodic save every AUTOSAVE s, a log file, and stop/start. `user` is the
    one running the test: started as root, Mosquitto would otherwise switch to the user
    "mosquitto", which cannot write into the root-owned temp dir, and would persist nothing."""

    def __init__(self, port):  # not super().__init__: that starts it without autosave
        self.port = port
        self.host = "127.0.0.1"
        self.tmp = tempfile.TemporaryDirectory(prefix="mosq-faults-")
        self.conf = os.path.join(self.tmp.name, "mosquitto.conf")
        self.log_path = os.path.join(self.tmp.name, "mosquitto.log")
        with open(self.conf, "w") as f:
            f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    f"persistence true\npersistence_location {self.tmp.name}/\n"
                    f"autosave_interval {AUTOSAVE}\n"
                    f"max_queued_messages 0\nmax_inflight_messages {B_INFLIGHT}\n"
                    f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
                    f"log_dest file {self.log_path}\nlog_timestamp_format %H:%M:%S\n"
                    "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen([MOSQUITTO, "-c", self.conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.proc.kill()
        self.proc.wait(timeout=10)
        raise RuntimeError(f"mosquitto did not start (exit {self.proc.returncode}):\n"
                           + self.log())

    def stop(self, sig):
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self, last=40):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-last:])
        except OSError:
            return ""


@pytest.fixture
def mosquitto_b():
    made = []

    def start(port):
        m = RestartableMosquitto.__new__(RestartableMosquitto)
        made.append(m)   # before it starts: closed at the end even if it never came up
        m.__init__(port)
        return m

    yield start
    for m in made:
        if getattr(m, "proc", None) is not None:
            m.close()
        elif hasattr(m, "tmp"):
            m.tmp.cleanup()


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------
class Publisher:
    """Publishes sequence numbers 0..n-1 QoS 1 to sensors/t{i % TOPICS}, in bursts of BURST
    spread over RUN_SECONDS, PUB_WINDOW in flight, on one connection at a time to A (whose
    port changes when it restarts). When the connection is lost, what it had not read a
    PUBACK for is re-published, in order, first thing on the next connection."""

    def __init__(self, a, version, n):
        self.a, self.version, self.n = a, version, n
        self.acked = set()
        self.sent_at = {}           # seq -> monotonic time of its first publish
        self.reissued = set()       # published more than once
        self.refused = {}           # seq -> PUBACK reason code other than success
        self.reconnects = 0
        self.nxt = 0                # the next sequence number never published yet
        self.done = threading.Event()

    def _connect(self, stop):
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            c = TClient(self.a, PUB_ID, protocol=self.version)
            try:
                c.connect(timeout=2)
                return c
            except Exception:  # noqa: BLE001 - A is restarting
                c.close()
                stop.wait(0.1)
        if not stop.is_set():
            raise AssertionError("publisher could not connect to A for 60 s")
        return None

    def run(self, stop):
        redo = collections.deque()
        t0 = time.monotonic()
        while (self.nxt < self.n or redo) and not stop.is_set():
            c = self._connect(stop)
            if c is None:
                return
            pending = collections.deque()   # (seq, mid)
            try:
                progress = time.monotonic()
                while self.nxt < self.n or redo or pending:
                    if stop.is_set() or not c.disconnects.empty():
                        raise ConnectionError
                    while len(pending) < PUB_WINDOW and (redo or self.nxt < self.n):
                        if redo:
                            seq = redo[0]
                        else:
                            seq = self.nxt
                            due = t0 + (seq - seq % BURST) * RUN_SECONDS / self.n
                            if due > time.monotonic():
                                if pending:
                                    break       # collect acks meanwhile
                                stop.wait(due - time.monotonic())
                        info = c.c.publish(f"sensors/t{seq % TOPICS}", str(seq).encode(), qos=1)
                        if info.rc != 0:
                            raise ConnectionError
                        if redo:
                            redo.popleft()
                            self.reissued.add(seq)
                        else:
                            self.nxt += 1
                        self.sent_at.setdefault(seq, time.monotonic())
                        pending.append((seq, info.mid))
                    if not pending:
                        continue
                    seq, mid = pending[0]
                    try:
                        rc = c.wait_published(mid, timeout=0.05)
                    except AssertionError:
                        if time.monotonic() - progress > 30:
                            raise AssertionError(f"no PUBACK from A for 30 s (seq {seq})")
                        continue
                    progress = time.monotonic()
                    pending.popleft()
                    if rc in (0, None):
                        self.acked.add(seq)
                    else:
                        self.refused[seq] = rc
            except ConnectionError:
                self.reconnects += 1
                redo = collections.deque(sorted({s for s, _ in pending} | set(redo)))
            finally:
                c.close()
        self.done.set()


class Subscriber:
    """A persistent QoS 1 subscriber to site17/# on B with a fixed client id; records
    (time, topic, seq) of every message it receives and reconnects when B restarts."""

    def __init__(self, b, version):
        self.b, self.version = b, version
        self.received = []          # (monotonic time, topic, seq)
        self.notes = []
        self.connects = 0

    def _on_message(self, client, userdata, m):
        self.received.append((time.monotonic(), m.topic, int(m.payload)))

    def connect(self):
        c = TClient(self.b, SUB_ID, protocol=self.version, persistent=True)
        c.c.on_message = self._on_message
        try:
            _, present, _ = c.connect(timeout=2)
        except BaseException:
            c.close()
            raise
        self.connects += 1
        return c, present

    def setup(self):
        c, _ = self.connect()
        assert c.subscribe("site17/#", 1) == [1]
        c.disconnect()

    def run(self, stop):
        c = None
        while not stop.is_set():
            if c is None:
                try:
                    c, present = self.connect()
                except Exception:  # noqa: BLE001 - B is restarting
                    stop.wait(0.1)
                    continue
                if not present:
                    self.notes.append(f"B had no session for the subscriber at connect "
                                      f"#{self.connects}: re-subscribed")
                    try:
                        c.subscribe("site17/#", 1)
                    except AssertionError:  # B went away again: next connection
                        c.close()
                        c = None
                        continue
            try:
                c.disconnects.get(timeout=0.1)
            except queue.Empty:
                continue
            c.close()
            c = None
        if c is not None:
            c.close()


def guarded(errors, fn, *args):
    def run():
        try:
            fn(*args)
        except BaseException:  # noqa: BLE001 - reported by the test
            errors.append(traceback.format_exc())
    return run


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------
def fault_schedule(rng):
    """[(burst, offset, fault, downtime seconds, then)]: 4-8 faults on distinct bursts at
    least 3 apart (time to come back before the next), each fired when the publisher reaches
    message `offset` of its burst, so that it finds messages on their way (A forwards a burst
    in a few tens of milliseconds). `then` (B faults only, half of them): once B is back, SIGKILL
    A when the subscriber has received `then` more messages, in the middle of the backlog B's
    downtime left in A's queue."""
    bursts = -(-N // BURST)
    n = rng.randint(4, 8)
    gap = max(1, min(3, (bursts - 1) // n))
    # n burst indexes in [0, bursts), pairwise at least `gap` apart.
    picks = sorted(rng.sample(range(bursts - (n - 1) * (gap - 1)), n))
    out = []
    for k, p in enumerate(picks):
        fault = rng.choice(["kill_a", "kill_a", "term_b", "kill_b", "pause"])
        down = rng.uniform(0.0, 0.8) if fault == "kill_a" else rng.uniform(0.3, 1.5)
        then = rng.randrange(60) if fault.endswith("_b") and rng.random() < 0.5 else None
        out.append((p + k * (gap - 1), rng.randrange(BURST), fault, round(down, 2), then))
    return out


class Run:
    """What the schedule did, for the oracle."""

    def __init__(self):
        self.a_kills = 0
        self.flush_kills = 0        # of which in the middle of a backlog after B came back
        self.b_restarts = 0
        self.b_kills = []           # monotonic time of each SIGKILL of B
        self.a_resent = 0.0         # tern_bridge_messages_resent_total summed over A's lives
        self.late = 0               # faults fired at their deadline, not at their message
        self.problems = []


def a_counter(a, name):
    try:
        return metric(a, name, {"bridge": "cloud"})
    except OSError:
        return 0.0


def kill_a(a, run, down):
    run.a_resent += a_counter(a, "tern_bridge_messages_resent_total")
    a.proc.kill()
    a.proc.wait(timeout=10)
    time.sleep(down)
    a.start()
    run.a_kills += 1


def wait_until(cond, deadline):
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)
    return True


def run_schedule(a, b, pub, sub, events, t0, run):
    gap = RUN_SECONDS * BURST / N
    for burst, offset, fault, down, then in events:
        trigger = burst * BURST + offset
        if not wait_until(lambda: pub.nxt > trigger or pub.done.is_set(),
                          t0 + (burst + 1) * gap + 10):
            run.late += 1
        if not a.alive():
            run.problems.append(f"A exited by itself (code {a.proc.returncode}) before the "
                                f"fault at burst {burst}")
            return
        if fault == "kill_a":
            kill_a(a, run, down)
        elif fault in ("term_b", "kill_b"):
            if fault == "kill_b":
                run.b_kills.append(time.monotonic())
            b.stop(signal.SIGKILL if fault == "kill_b" else signal.SIGTERM)
            time.sleep(down)
            base = len(sub.received)
            b.start()
            run.b_restarts += 1
            if then is not None:
                if not wait_until(lambda: len(sub.received) >= base + then + 1,
                                  time.monotonic() + 10):
                    run.late += 1
                run.flush_kills += 1
                kill_a(a, run, 0.0)
        else:
            time.sleep(down)
    time.sleep(max(0.0, t0 + RUN_SECONDS - time.monotonic()))


# ---------------------------------------------------------------------------------------------
# Oracle
# ---------------------------------------------------------------------------------------------
def exempt_by_b_kills(pub, received, b_kills):
    """Sequence numbers B may have lost to a SIGKILL: published before it and not received by
    the subscriber by then."""
    out = set()
    for k in b_kills:
        got = {s for t, _, s in received if t <= k}
        out |= {s for s, t in pub.sent_at.items() if t <= k} - got
    return out


def b_replay_allowance(received, b_kills):
    """Copies the subscriber received in the AUTOSAVE + 3 s before each SIGKILL of B (B's last
    save may predate their acknowledgement, so B may send them again; Mosquitto 2.0 saves
    about every 2 x AUTOSAVE s)."""
    return sum(1 for k in b_kills for t, _, _ in received if k - AUTOSAVE - 3.0 <= t <= k + 0.5)


def order_violations(received, skip):
    """Per topic, (topic, earlier seq, later seq) where a first copy arrived after a first copy
    of a higher sequence number; `skip` is left out."""
    firsts = collections.defaultdict(list)
    seen = set()
    for _, topic, s in received:
        if s not in seen:
            seen.add(s)
            if s not in skip:
                firsts[topic].append(s)
    bad = []
    for topic, ss in sorted(firsts.items()):
        high = -1
        for s in ss:
            if s < high:
                bad.append((topic, high, s))
            high = max(high, s)
    return bad


def tail(lines, n=60):
    return "".join(lines[-n:])


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_bridge_under_a_seeded_fault_schedule(stoppable, mosquitto_b, protocol, seed):
    rng = random.Random(seed)
    tag = (f"seed {seed} (replay: TERN_BRIDGE_FAULT_SEED={seed}), protocol {protocol}, "
           f"N {N}")
    events = fault_schedule(rng)
    print(f"{tag}: schedule {events}")  # shown with any failure
    version = V311 if protocol == "3.1.1" else V5

    port = free_port()
    b = mosquitto_b(port)
    sub = Subscriber(b, version)
    sub.setup()
    # A clean stop saves B's database: the subscriber's session survives any later SIGKILL.
    b.stop(signal.SIGTERM)
    b.start()
    a = stoppable({}, extra=bridge_toml(port, protocol, out=[("sensors/#", 1, "", "site17/")]))
    wait_connected(a)

    pub = Publisher(a, version, N)
    run = Run()
    errors = []
    stop_pub, stop_sub = threading.Event(), threading.Event()
    threads = [threading.Thread(target=guarded(errors, pub.run, stop_pub), daemon=True),
               threading.Thread(target=guarded(errors, sub.run, stop_sub), daemon=True)]
    for t in threads:
        t.start()
    try:
        run_schedule(a, b, pub, sub, events, time.monotonic(), run)
        deadline = time.monotonic() + DRAIN_SECONDS
        while not pub.done.is_set() and not errors and time.monotonic() < deadline:
            pub.done.wait(0.1)
        if not pub.done.is_set():
            run.problems.append(f"the publisher did not finish ({len(pub.acked)} acknowledged)")
        exempt = exempt_by_b_kills(pub, list(sub.received), run.b_kills)
        while time.monotonic() < deadline and not errors:
            missing = pub.acked - exempt - {s for _, _, s in list(sub.received)}
            if not missing:
                break
            time.sleep(0.1)
        queued = wait_metric(a, "tern_bridge_queued_messages", {"bridge": "cloud"}, 0,
                             timeout=max(1.0, deadline - time.monotonic()))
        if queued:
            run.problems.append(f"A's bridge queue did not drain: {queued:.0f} left")
        time.sleep(0.5)  # late duplicates
        run.a_resent += a_counter(a, "tern_bridge_messages_resent_total")
    finally:
        stop_pub.set()
        stop_sub.set()
        for t in threads:
            t.join(15)
    if not a.alive():
        run.problems.append(f"A exited by itself (code {a.proc.returncode})")
    if not b.alive():
        run.problems.append(f"B exited by itself (code {b.proc.returncode})")

    received = list(sub.received)
    copies = collections.Counter(s for _, _, s in received)
    exempt = exempt_by_b_kills(pub, received, run.b_kills)
    lost = sorted(pub.acked - exempt - set(copies))
    never = sorted(set(copies) - set(pub.sent_at))
    bad_order = order_violations(received, pub.reissued | exempt)
    dups = sum(c - 1 for c in copies.values())
    drops = run.a_kills + run.b_restarts
    allowed = ((drops + 1) * WINDOW + len(pub.reissued) + run.b_restarts * B_INFLIGHT
               + b_replay_allowance(received, run.b_kills))
    wrong_topic = [(t, s) for _, t, s in received if t != f"site17/sensors/t{s % TOPICS}"]

    problems = list(run.problems)
    if lost:
        problems.append(f"{len(lost)} sequence numbers acknowledged by A never reached B, "
                        f"e.g. {lost[:20]}")
    if bad_order:
        problems.append(f"{len(bad_order)} first copies out of order per topic "
                        f"(topic, higher seq first, lower seq after), e.g. {bad_order[:10]}")
    if dups > allowed:
        problems.append(f"{dups} duplicates, more than the {allowed} allowed")
    if never:
        problems.append(f"received sequence numbers never published: {never[:10]}")
    if wrong_topic:
        problems.append(f"received on the wrong topic: {wrong_topic[:5]}")
    if pub.refused:
        problems.append(f"A refused publishes: {sorted(pub.refused.items())[:5]}")
    problems += sub.notes + errors
    summary = (f"{len(pub.acked)} acknowledged by A of {len(pub.sent_at)} published, "
               f"{len(pub.reissued)} re-published, {len(received)} copies received "
               f"({len(copies)} distinct, {dups} duplicates, allowed {allowed}), "
               f"{len(exempt)} exempt by B SIGKILLs ({len(exempt - set(copies))} of them "
               f"missing), A killed {run.a_kills}x, B restarted {run.b_restarts}x "
               f"({len(run.b_kills)} SIGKILL), A resent {run.a_resent:.0f}, "
               f"publisher reconnects {pub.reconnects}, subscriber connects {sub.connects}, "
               f"{run.late} faults fired late")
    if problems:
        pytest.fail(f"{tag}: {summary}\nschedule {events}\n" + "\n".join(problems)
                    + f"\n---- A (last 60 log lines):\n{tail(a.log_lines)}"
                    + f"\n---- B (last 40 log lines):\n{b.log()}", pytrace=False)
    assert not any(t.is_alive() for t in threads), f"a client thread hung; {tag}"
    print(f"{tag}: {summary}")
