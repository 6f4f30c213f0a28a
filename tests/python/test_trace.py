"""Message trace (`POST /api/v1/traces`, issue 18) against the real broker.

One traced message goes to three subscribers, each with its own fate, and each target's events
are asserted in order, exactly:
- `off`, a persistent session whose client is away: queued (once the commit that stores it is
  durable), then sent and acknowledged after it reconnects;
- `sh`, the member of a shared group: queued in the group's queue, sent by the member's
  connection (naming the group), acknowledged;
- `slow`, a clean session with a queue of one (`limits.max_queued_messages = 1`) and a window
  of one that it never acknowledges: the first message is sent, the second queued, the third
  dropped with reason queue_full.
The trace ends by itself at its duration, with an `ended` line. Also: a fifth trace is refused
(429) until one of four is released by its reader going away, and bad bodies are refused (400).
"""
import http.client
import json
import socket
import subprocess
import threading
import time

import pytest

from conftest import TERN_BIN
from pahoutil import TIMEOUT, V5, PacketTypes, props

TOKEN = "trace-token-0123456789abcdef"
TOPIC = "trace/t"
GROUP = f"$share/g/{TOPIC}"


@pytest.fixture
def tb(make_broker, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops:{TOKEN}\n")
    return make_broker({
        "admin": {"token_file": str(tokens)},
        "limits": {"max_queued_messages": 1},
    })


class Trace:
    """A trace's response, read line by line in a thread until it ends."""

    def __init__(self, b, body, token=TOKEN):
        self.conn = http.client.HTTPConnection("127.0.0.1", b.metrics_port, timeout=30)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.conn.request("POST", "/api/v1/traces", body=json.dumps(body), headers=headers)
        # Kept: the connection lets go of it when the response says the connection closes.
        self.sock = self.conn.sock
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}
        self.lines = []
        self.done = threading.Event()
        self.ended_at = None
        if self.status == 200:
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        else:
            self.body = self.resp.read()
            self.done.set()

    def _read(self):
        try:
            while True:
                line = self.resp.readline()
                if not line:
                    break
                self.lines.append(json.loads(line))
        except (OSError, http.client.HTTPException):
            pass
        self.ended_at = time.monotonic()
        self.done.set()

    def wait(self, timeout):
        assert self.done.wait(timeout), f"trace still running after {timeout}s: {self.lines}"

    def wait_for(self, pred, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(pred(e) for e in list(self.lines)):
                return
            time.sleep(0.02)
        raise AssertionError(f"no such event within {timeout}s: {self.lines}")

    def close(self):
        # The reader thread's file object holds the socket open: shut it down to go away.
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conn.close()


def steps(events, msg, targets):
    """(event, target) of message `msg` at any of `targets`, in stream order."""
    return [(e["event"], e.get("target")) for e in events
            if e.get("msg") == msg and e.get("target") in targets]


def test_one_message_followed_to_an_offline_a_shared_and_a_slow_subscriber(tb, mkc):
    off = mkc("off", V5, broker=tb, persistent=True)
    off.connect()
    off.subscribe(TOPIC, qos=1)
    off.disconnect()
    sh = mkc("sh", V5, broker=tb)
    sh.connect()
    sh.subscribe(GROUP, qos=1)
    # A window of one it never acknowledges: one in flight, one queued, then full.
    slow = mkc("slow", V5, broker=tb, manual_ack=True)
    slow.connect(properties=props(PacketTypes.CONNECT, ReceiveMaximum=1))
    slow.subscribe(TOPIC, qos=1)
    pub = mkc("pub", V5, broker=tb)
    pub.connect()

    duration = 4.0
    t0 = time.monotonic()
    tr = Trace(tb, {"topic": TOPIC, "duration": "4s"})
    try:
        assert tr.status == 200, tr.status
        assert tr.headers["content-type"] == "application/x-ndjson"
        tr.wait_for(lambda e: e["event"] == "started")
        for i in range(3):
            assert pub.publish(TOPIC, f"m{i}".encode(), qos=1) == 0
        # The slow subscriber has the first; the second waits in its queue of one.
        assert slow.get().payload == b"m0"
        assert [m.payload for m in sh.get_n(3)] == [b"m0", b"m1", b"m2"]
        # The offline session's client comes back and takes what was kept for it.
        off2 = mkc.again(off)
        off2.connect()
        assert [m.payload for m in off2.get_n(3)] == [b"m0", b"m1", b"m2"]
        tr.wait(duration + 5)
    finally:
        tr.close()
    elapsed = tr.ended_at - t0
    ev = tr.lines
    assert ev[0]["event"] == "started" and ev[0]["selector"] == {"topic": TOPIC}
    assert ev[-1]["event"] == "ended" and ev[-1]["reason"] == "duration", ev[-1]
    assert duration - 0.5 <= elapsed < duration + 3, elapsed
    assert not [e for e in ev if e["event"] == "overflow"]

    received = [e for e in ev if e["event"] == "received"]
    assert [e["client"] for e in received] == [pub.client_id] * 3
    m0, m1, m2 = (e["msg"] for e in received)
    assert m0 < m1 < m2
    first = received[0]
    assert (first["topic"], first["qos"], first["size"], first["retain"]) == (TOPIC, 1, 2, False)
    assert first["packet_id"] >= 1
    for e in ev[1:-1]:
        assert isinstance(e["ts"], int) and isinstance(e["t_us"], int), e
        assert e["topic"] == TOPIC, e

    # The message's own steps: received, matched (both sessions and the group), stored
    # (the offline persistent session needs it kept).
    own = [e for e in ev if e.get("msg") == m0 and "target" not in e]
    assert [e["event"] for e in own] == ["received", "matched", "stored"], own
    matched = own[1]
    assert sorted(matched["sessions"]) == sorted([off.client_id, slow.client_id])
    assert matched["groups"] == [GROUP]
    assert matched["queues"] == [] and matched["bridges"] == []
    assert own[2]["commit_us"] >= 0

    OFF, SH, SLOW = off.client_id, sh.client_id, slow.client_id
    # Each target's steps, in order.
    assert steps(ev, m0, {OFF}) == [("queued", OFF), ("sent", OFF), ("acknowledged", OFF)]
    assert steps(ev, m0, {GROUP, SH}) == [("queued", GROUP), ("sent", SH), ("acknowledged", SH)]
    assert steps(ev, m0, {SLOW}) == [("queued", SLOW), ("sent", SLOW)]
    assert steps(ev, m1, {SLOW}) == [("queued", SLOW)]
    assert steps(ev, m2, {SLOW}) == [("dropped", SLOW)]

    def one(msg, name, target):
        [e] = [e for e in ev if e.get("msg") == msg and e["event"] == name
               and e.get("target") == target]
        return e

    dropped = one(m2, "dropped", SLOW)
    assert dropped["reason"] == "queue_full"
    via_group = one(m0, "sent", SH)
    assert via_group["group"] == GROUP and via_group["qos"] == 1 and via_group["dup"] is False
    acked = one(m0, "acknowledged", SH)
    assert acked["ack"] == "PUBACK" and acked["reason"] == 0
    assert acked["packet_id"] == via_group["packet_id"]
    assert acked["latency_us"] is not None and acked["latency_us"] >= 0
    assert one(m0, "sent", OFF)["dup"] is False
    # Stored before it became visible to the offline session.
    names = [(e["event"], e.get("target")) for e in ev if e.get("msg") == m0]
    assert names.index(("stored", None)) < names.index(("queued", OFF))


def test_a_fifth_trace_waits_for_one_to_be_released(tb):
    traces = [Trace(tb, {"filter": f"a/{i}/#", "duration": "30s"}) for i in range(4)]
    try:
        assert [t.status for t in traces] == [200] * 4
        fifth = Trace(tb, {"client_id": "x", "duration": "1s"})
        assert fifth.status == 429, fifth.status
        assert "traces are active" in json.loads(fifth.body)["error"]
        # Its reader goes away: the trace is released, and the place with it.
        traces.pop().close()
        deadline = time.monotonic() + TIMEOUT
        while True:
            again = Trace(tb, {"client_id": "x", "duration": "1s"})
            if again.status == 200 or time.monotonic() > deadline:
                break
            again.close()
            time.sleep(0.1)
        assert again.status == 200, again.status
        again.wait(TIMEOUT)
        assert again.lines[-1]["event"] == "ended"
        again.close()
    finally:
        for t in traces:
            t.close()


@pytest.mark.parametrize("body", [
    {},
    {"topic": "a", "filter": "a/#"},
    {"topic": "a/+"},
    {"filter": "a/#/b"},
    {"client_id": ""},
    {"topic": "a", "duration": "soon"},
    {"topic": "a", "duration": "2h"},
    {"topic": "a", "colour": "blue"},
])
def test_a_bad_body_is_refused(tb, body):
    t = Trace(tb, body)
    assert t.status == 400, (body, t.status)
    assert json.loads(t.body)["error"]


def test_a_trace_wants_a_token(tb):
    t = Trace(tb, {"topic": "a", "duration": "1s"}, token=None)
    assert t.status == 401


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "table"])
def test_tern_ctl_trace_prints_the_events_until_the_trace_ends(tb, mkc, as_json):
    sub = mkc("sub", V5, broker=tb)
    sub.connect()
    sub.subscribe(TOPIC, qos=1)
    pub = mkc("pub", V5, broker=tb)
    pub.connect()
    cmd = [TERN_BIN, "ctl", "--url", f"http://127.0.0.1:{tb.metrics_port}", "--token", TOKEN]
    cmd += ["--json"] if as_json else []
    cmd += ["trace", "--topic", TOPIC, "--duration", "2s"]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()
        assert "started" in first, (first, p.stderr.read() if p.poll() is not None else "")
        assert pub.publish(TOPIC, b"hi", qos=1) == 0
        assert sub.get().payload == b"hi"
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert time.monotonic() - t0 >= 1.5
    lines = [first] + out.splitlines()
    if as_json:
        events = [json.loads(line)["event"] for line in lines]
    else:
        # "  1.234567 received    client=… qos=1 …": seconds since the start, then the event
        # (the first and last lines have no time).
        toks = [line.split() for line in lines]
        events = [t[1] if t[0][0].isdigit() else t[0] for t in toks]
    assert events == ["started", "received", "matched", "queued", "sent", "acknowledged",
                      "ended"], lines
