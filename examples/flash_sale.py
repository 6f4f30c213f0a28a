#!/usr/bin/env python3
"""A flash sale sends orders faster than workers can process them; the broker buffers the burst.

The story:
1. Four workers, each its own process, join the shared subscription group
   `$share/workers/shop/orders/<run id>` with a persistent session (MQTT 5 Clean Start 0 on a
   restart, Session Expiry Interval 3600). Each processes a fixed number of orders per second
   (`--rate`) and acknowledges an order only after it has processed it.
2. The shop publishes 100,000 orders (`--orders`) as fast as the broker takes them, several
   times faster than the four workers can process them (with the release build `make run`
   starts): the group's queue in the broker absorbs the burst, and each worker only ever holds
   its own in-flight window. When the queue is 3/4 full the broker pauses the publisher
   (back-pressure) instead of dropping orders.
3. Halfway through, one worker is killed with SIGKILL (a crash: no DISCONNECT, no clean-up)
   and restarted a moment later with the same client id. What it had been given and not
   finished goes to the other workers or comes back to it.
4. At the end every order id must have been processed; the example reports duplicates, the
   drain time against the ideal (orders / (workers x rate)), and the broker's resident memory
   (`process_resident_memory_bytes` from its /metrics endpoint), which stays bounded however
   large the burst: beyond 256 messages the group's queue is on disk.

QoS 1 (default) is at least once. A worker records an order as processed and then sends
PUBACK. The killed worker's unacknowledged orders go back to the group as soon as its
connection ends and other workers process them; an order the killed worker had processed whose
PUBACK never reached the broker is processed a second time. Duplicates are reported and allowed.

`--qos 2` is exactly once per group, and duplicates are a failure. That takes three things:
  * persistent worker sessions and restarting the killed worker with the same client id. The
    broker keeps a QoS 2 order that the member has not PUBREC'd with the member while its
    session lives, and re-sends it (DUP, same packet id) when the member returns; it does NOT
    hand it to another worker, which might process it a second time. A worker that never
    returns holds them until its session expires (here after an hour); then they go to the
    others: that wait is the price of exactly once. With non-persistent sessions the dead
    worker's session ends with its connection and such orders go to the others at once, and
    exactly once is impossible: the broker cannot know whether the dead worker processed an
    order before its PUBREC got out.
  * a worker that processes an order BEFORE it sends PUBREC and remembers, durably, the packet
    ids it has PUBREC'd until their PUBREL arrives (MQTT 5 section 4.3.3, "method B"). Here the
    worker's journal file is that memory: a restarted worker reloads it, so a re-sent order
    whose id it already holds gets PUBREC again without being processed again.
  * a dead worker's orders that were assigned to it but not yet sent go back to the group;
    nobody has seen them, so they cannot be duplicated.
Stock paho-mqtt sends PUBREC the moment a QoS 2 PUBLISH arrives, delivers the message at
PUBREL, and keeps that state only in memory, so a paho worker killed between its PUBREC and
its processing would lose the order. That is why the workers here, and the publisher (which
keeps up to the broker's Receive Maximum of PUBLISHes in flight), speak MQTT 5 over a plain
socket with the small codec below instead of paho.

Run against a broker started with `make run` (MQTT 127.0.0.1:1883, metrics 127.0.0.1:9883):
    .venv/bin/python examples/flash_sale.py [--host 127.0.0.1] [--port 1883]
        [--metrics-port 9883] [--orders 100000] [--workers 4] [--rate 2500] [--qos 1|2]
        [--no-kill] [--timeout 30] [--max-rss-mb 1024]
`--metrics-port 0` skips the memory and queue figures; a broker resident memory above
--max-rss-mb fails the run. Prints OK and exits 0 when every order
was processed (exactly once with --qos 2); exits non-zero otherwise. Every wait is bounded:
the run fails when no order is processed for --timeout seconds.
"""
import argparse
import glob
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

GROUP = "workers"
SESSION_EXPIRY = 3600  # a worker's session outlives its connection for an hour
KEEPALIVE = 30


class Fail(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# A minimal MQTT 5 codec over a plain socket
# ---------------------------------------------------------------------------------------------
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
P_SESSION_EXPIRY, P_RECEIVE_MAXIMUM = 0x11, 0x21

# Property id -> encoding, to step over the properties of CONNACK / SUBACK / DISCONNECT.
_PROP_KIND = {}
_PROP_KIND.update({p: 1 for p in (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A)})
_PROP_KIND.update({p: 2 for p in (0x13, 0x21, 0x22, 0x23)})
_PROP_KIND.update({p: 4 for p in (0x02, 0x11, 0x18, 0x27)})
_PROP_KIND.update({p: "varint" for p in (0x0B,)})
_PROP_KIND.update({p: "bytes" for p in (0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F)})
_PROP_KIND.update({p: "pair" for p in (0x26,)})


def _varint(n):
    out = bytearray()
    while True:
        n, b = divmod(n, 128)
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf, pos):
    value, mult = 0, 1
    while True:
        b = buf[pos]
        pos += 1
        value += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            return value, pos


def _str(s):
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(raw)) + raw


def _packet(first, body):
    return bytes([first]) + _varint(len(body)) + body


def _props(pairs):
    body = b""
    for pid, value in pairs:
        if pid == P_SESSION_EXPIRY:
            body += bytes([pid]) + struct.pack("!I", value)
        elif pid == P_RECEIVE_MAXIMUM:
            body += bytes([pid]) + struct.pack("!H", value)
        else:
            raise ValueError(pid)
    return _varint(len(body)) + body


def _parse_props(body, pos):
    """Properties at `pos` as {id: value} (the last value of a repeated one); returns the
    dict and the position after them."""
    length, pos = _read_varint(body, pos)
    end = pos + length
    out = {}
    while pos < end:
        pid = body[pos]
        pos += 1
        kind = _PROP_KIND.get(pid)
        if kind in (1, 2, 4):
            out[pid] = int.from_bytes(body[pos:pos + kind], "big")
            pos += kind
        elif kind == "varint":
            out[pid], pos = _read_varint(body, pos)
        elif kind == "bytes":
            n = struct.unpack_from("!H", body, pos)[0]
            out[pid] = body[pos + 2:pos + 2 + n]
            pos += 2 + n
        elif kind == "pair":
            for _ in range(2):
                pos += 2 + struct.unpack_from("!H", body, pos)[0]
        else:
            raise Fail(f"unknown property {pid:#x} from the broker")
    return out, end


def enc_connect(client_id, clean_start, session_expiry, keepalive=KEEPALIVE):
    vh = _str("MQTT") + bytes([5, 0x02 if clean_start else 0]) + struct.pack("!H", keepalive)
    vh += _props([(P_SESSION_EXPIRY, session_expiry)] if session_expiry else [])
    return _packet(CONNECT << 4, vh + _str(client_id))


def enc_publish(topic, payload, qos, pid):
    body = _str(topic) + (struct.pack("!H", pid) if qos else b"") + b"\x00" + payload
    return _packet((PUBLISH << 4) | (qos << 1), body)


def enc_ack(ptype, pid):
    # Reason code Success with no properties may be left out (MQTT 5 section 3.4.2.1).
    return _packet((ptype << 4) | (0x02 if ptype == PUBREL else 0), struct.pack("!H", pid))


def enc_subscribe(pid, topic_filter, qos):
    return _packet((SUBSCRIBE << 4) | 0x02,
                   struct.pack("!H", pid) + b"\x00" + _str(topic_filter) + bytes([qos]))


def enc_disconnect(session_expiry=None):
    if session_expiry is None:
        return _packet(DISCONNECT << 4, b"")
    return _packet(DISCONNECT << 4, b"\x00" + _props([(P_SESSION_EXPIRY, session_expiry)]))


def dec_publish(flags, body):
    """(qos, dup, packet id, topic, payload) of a PUBLISH body."""
    qos = (flags >> 1) & 3
    tl = struct.unpack_from("!H", body, 0)[0]
    topic = body[2:2 + tl]
    pos = 2 + tl
    pid = None
    if qos:
        pid = struct.unpack_from("!H", body, pos)[0]
        pos += 2
    plen, pos = _read_varint(body, pos)
    return qos, bool(flags & 0x08), pid, topic, body[pos + plen:]


class Closed(Exception):
    """The broker closed the connection."""


class Conn:
    """One MQTT 5 connection with a bounded packet reader."""

    def __init__(self, host, port, timeout):
        self.timeout = timeout
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise Fail(f"cannot connect to {host}:{port}: {e} (is the broker running?)")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pending = []  # packets read along with one that expect() returned
        self.last_sent = time.monotonic()

    def send(self, data):
        self.sock.sendall(data)
        self.last_sent = time.monotonic()

    def _parse(self):
        out, buf, pos = [], self.buf, 0
        while len(buf) - pos >= 2:
            length, mult, i, complete = 0, 1, pos + 1, False
            while i < len(buf) and i < pos + 5:
                b = buf[i]
                i += 1
                length += (b & 0x7F) * mult
                mult *= 128
                if not b & 0x80:
                    complete = True
                    break
            if not complete or len(buf) - i < length:
                break
            out.append((buf[pos] >> 4, buf[pos] & 0x0F, bytes(buf[i:i + length])))
            pos = i + length
        del buf[:pos]
        return out

    def read(self, timeout):
        """Complete packets as [(type, flags, body)]; [] when none arrive within `timeout`."""
        pkts, self.pending = self.pending + self._parse(), []
        if pkts:
            return pkts
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 18)
            except socket.timeout:
                return []
            except OSError as e:
                raise Closed(str(e))
            if not chunk:
                raise Closed("connection closed by the broker")
            self.buf += chunk
            pkts = self._parse()
            if pkts:
                return pkts

    def expect(self, ptype, what):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            pkts = self.read(deadline - time.monotonic())
            for i, (t, flags, body) in enumerate(pkts):
                if t == ptype:
                    self.pending = pkts[i + 1:] + self.pending
                    return flags, body
                if t == DISCONNECT:
                    raise Fail(f"broker sent DISCONNECT {body[:1].hex()} waiting for {what}")
                if t != PINGRESP:
                    raise Fail(f"unexpected packet type {t} waiting for {what}")
        raise Fail(f"timed out after {self.timeout}s waiting for {what}")

    def connect(self, client_id, clean_start, session_expiry):
        """Returns (session present, CONNACK properties)."""
        self.send(enc_connect(client_id, clean_start, session_expiry))
        _, body = self.expect(CONNACK, "CONNACK")
        if body[1] >= 0x80:
            raise Fail(f"{client_id}: connection refused, reason code {body[1]:#x}")
        props, _ = _parse_props(body, 2)
        return bool(body[0] & 1), props

    def subscribe(self, topic_filter, qos):
        self.send(enc_subscribe(1, topic_filter, qos))
        _, body = self.expect(SUBACK, "SUBACK")
        _, pos = _parse_props(body, 2)
        if body[pos] != qos:
            raise Fail(f"subscription to {topic_filter} not granted at QoS {qos}: "
                       f"reason code {body[pos]:#x}")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def end_session(host, port, client_id, timeout=5.0):
    """Connects as `client_id` with a clean start and Session Expiry 0, then disconnects: the
    broker forgets the session (and its group membership). Best effort."""
    try:
        c = Conn(host, port, timeout)
        try:
            c.connect(client_id, clean_start=True, session_expiry=0)
            c.send(enc_disconnect())
        finally:
            c.close()
    except (Fail, Closed, OSError):
        pass


# ---------------------------------------------------------------------------------------------
# The worker: its own process
# ---------------------------------------------------------------------------------------------
# Each incarnation of a worker appends to its own journal file, `<client id>.<n>.log`:
#   "P <packet id> <order id> <dup>\n"  order processed (written before PUBACK / PUBREC is
#                                      sent); dup = the PUBLISH's DUP flag (a re-send)
#   "S <packet id>\n"  QoS 2: a re-sent PUBLISH of an order already processed, not processed
#   "R <packet id>\n"  QoS 2: PUBREL received, the packet id is free again
# os.write() of one short line to an O_APPEND file reaches the kernel whole or not at all, so a
# SIGKILL cannot lose a line that was written; a torn last line is ignored anyway.
ORDER = re.compile(rb'"order": (\d+)')


def journal_paths(journal_dir, client_id):
    paths = glob.glob(os.path.join(journal_dir, f"{client_id}.*.log"))
    return sorted(paths, key=lambda p: int(p.rsplit(".", 2)[1]))


def read_journal(path):
    """Complete lines of a journal as [(kind, packet id, order id or None)]."""
    with open(path, "rb") as f:
        data = f.read()
    out = []
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn or empty
        parts = line.split()
        if len(parts) == 4 and parts[0] == b"P":
            out.append(("P", int(parts[1]), int(parts[2])))
        elif len(parts) == 2 and parts[0] == b"R":
            out.append(("R", int(parts[1]), None))
    return out


def worker_main(argv):
    ap = argparse.ArgumentParser(prog="flash_sale.py worker")
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--filter", required=True)
    ap.add_argument("--qos", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--journal-dir", required=True)
    ap.add_argument("--resume", action="store_true", help="Clean Start 0: resume the session")
    ap.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    # QoS 2 receive state ("method B"): packet ids PUBREC'd (or about to be) and not yet
    # released, rebuilt from the journals of this worker's earlier incarnations.
    awaiting_rel = set()
    earlier = journal_paths(a.journal_dir, a.client_id)
    for path in earlier:
        for kind, pid, _ in read_journal(path):
            if kind == "P" and a.qos == 2:
                awaiting_rel.add(pid)
            elif kind == "R":
                awaiting_rel.discard(pid)
    n = int(earlier[-1].rsplit(".", 2)[1]) + 1 if earlier else 0
    path = os.path.join(a.journal_dir, f"{a.client_id}.{n}.log")
    journal = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    conn = Conn(a.host, a.port, a.timeout)
    present, _ = conn.connect(a.client_id, clean_start=not a.resume,
                              session_expiry=SESSION_EXPIRY)
    if not present:
        conn.subscribe(a.filter, a.qos)
    print(f"ready session_present={int(present)}", flush=True)

    interval = 1.0 / a.rate
    due = time.monotonic()
    try:
        while not stop.is_set():
            try:
                pkts = conn.read(0.5)
            except Closed as e:
                print(f"{a.client_id}: {e}", file=sys.stderr)
                return 3
            for t, flags, body in pkts:
                if t == PUBLISH:
                    qos, dup, pid, _, payload = dec_publish(flags, body)
                    if qos == 2 and pid in awaiting_rel:
                        # Processed before (by this worker or an earlier incarnation); the
                        # broker did not get the PUBREC. Acknowledge, do not process again.
                        os.write(journal, b"S %d\n" % pid)
                        conn.send(enc_ack(PUBREC, pid))
                        continue
                    # "Process" the order: at a fixed rate, then record it.
                    now = time.monotonic()
                    if due > now:
                        time.sleep(due - now)
                    due = max(due + interval, time.monotonic() - 0.05)
                    m = ORDER.search(payload)
                    order = int(m.group(1)) if m else -1
                    os.write(journal, b"P %d %d %d\n" % (pid or 0, order, dup))
                    if qos == 1:
                        conn.send(enc_ack(PUBACK, pid))
                    elif qos == 2:
                        awaiting_rel.add(pid)
                        conn.send(enc_ack(PUBREC, pid))
                elif t == PUBREL:
                    pid = struct.unpack_from("!H", body, 0)[0]
                    awaiting_rel.discard(pid)
                    os.write(journal, b"R %d\n" % pid)
                    conn.send(enc_ack(PUBCOMP, pid))
                elif t == DISCONNECT:
                    print(f"{a.client_id}: DISCONNECT {body[:1].hex()} from the broker",
                          file=sys.stderr)
                    return 3
            if time.monotonic() - conn.last_sent > KEEPALIVE / 2:
                conn.send(_packet(PINGREQ << 4, b""))
        # Done: leave for good. Session Expiry 0 ends the session and with it the membership.
        conn.send(enc_disconnect(session_expiry=0))
        return 0
    finally:
        conn.close()
        os.close(journal)


# ---------------------------------------------------------------------------------------------
# The shop: bursts orders as fast as the broker acknowledges them
# ---------------------------------------------------------------------------------------------
class Publisher:
    def __init__(self, host, port, client_id, topic, orders, qos, timeout):
        self.host, self.port, self.client_id = host, port, client_id
        self.topic, self.orders, self.qos, self.timeout = topic, orders, qos, timeout
        self.acked = 0
        self.error = None
        self.stop = threading.Event()
        self.started = self.finished = None
        self.thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self):
        self.thread.start()

    def _run(self):
        try:
            self._publish_all()
        except (Fail, Closed, OSError) as e:
            self.error = f"publisher: {e}"

    def _publish_all(self):
        conn = Conn(self.host, self.port, self.timeout)
        try:
            _, props = conn.connect(self.client_id, clean_start=True, session_expiry=0)
            # Keep as many PUBLISHes in flight as the broker allows (its Receive Maximum).
            window = min(props.get(P_RECEIVE_MAXIMUM, 65535), 1024)
            free = list(range(window, 0, -1))  # packet ids
            inflight = {}  # packet id -> order id
            next_order = 0
            self.started = time.monotonic()
            last_progress = time.monotonic()
            topic = self.topic.encode()
            while next_order < self.orders or inflight:
                if self.stop.is_set():
                    return
                out = bytearray()
                while next_order < self.orders and free:
                    pid = free.pop()
                    payload = b'{"order": %d, "sku": "TICKET-%d", "qty": 1}' % (
                        next_order, next_order % 97)
                    out += enc_publish(topic, payload, self.qos, pid)
                    inflight[pid] = next_order
                    next_order += 1
                if out:
                    conn.send(bytes(out))
                pkts = conn.read(1.0)
                if not pkts:
                    if time.monotonic() - last_progress > self.timeout:
                        raise Fail(f"no acknowledgement for {self.timeout}s "
                                   f"({len(inflight)} in flight, {self.acked} acknowledged)")
                    continue
                last_progress = time.monotonic()
                out = bytearray()
                for t, _, body in pkts:
                    pid = struct.unpack_from("!H", body, 0)[0] if len(body) >= 2 else None
                    rc = body[2] if len(body) > 2 else 0
                    if t in (PUBACK, PUBREC) and rc >= 0x80:
                        raise Fail(f"order {inflight.get(pid)} refused: reason code {rc:#x}")
                    if t in (PUBACK, PUBREC) and rc == 0x10:
                        raise Fail("no matching subscribers: the workers are not subscribed")
                    if t == PUBACK or t == PUBCOMP:
                        inflight.pop(pid)
                        free.append(pid)
                        self.acked += 1
                    elif t == PUBREC:
                        out += enc_ack(PUBREL, pid)
                    elif t == DISCONNECT:
                        raise Fail(f"broker sent DISCONNECT {body[:1].hex()}")
                if out:
                    conn.send(bytes(out))
            self.finished = time.monotonic()
            conn.send(enc_disconnect())
        finally:
            conn.close()


# ---------------------------------------------------------------------------------------------
# Broker metrics
# ---------------------------------------------------------------------------------------------
def fetch_metrics(host, metrics_port, timeout=5.0):
    """The broker's /metrics as [(name, labels, value)]; None when unreachable."""
    try:
        with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics",
                                    timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out = []
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
            out.append((m.group(1), labels, float(m.group(4))))
    return out


def pick(samples, name, labels=None):
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for n, got, v in samples
               if n == name and all(got.get(k) == x for k, x in (labels or {}).items()))


def scrape(host, metrics_port, name, labels=None, timeout=5.0):
    """Sum of the samples of `name` whose labels include `labels`; None when unreachable."""
    samples = fetch_metrics(host, metrics_port, timeout)
    return None if samples is None else pick(samples, name, labels)


class Sampler:
    """Samples the broker's resident memory and the group's figures every 0.25 s (the group's
    series go away when the group ends, so the last values seen are kept)."""

    def __init__(self, host, metrics_port, topic):
        self.host, self.port = host, metrics_port
        self.labels = {"group": GROUP, "filter": topic}
        self.rss = []
        self.queued_peak = 0
        self.redelivered = 0
        self.dropped = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def sample(self):
        samples = fetch_metrics(self.host, self.port)
        if samples is None:
            return
        self.rss.append(pick(samples, "process_resident_memory_bytes"))
        self.queued_peak = max(self.queued_peak,
                               int(pick(samples, "tern_shared_queued_messages", self.labels)))
        # Counters of this run's group: they only grow while the group exists.
        self.redelivered = max(self.redelivered,
                               int(pick(samples, "tern_shared_messages_redelivered_total", self.labels)))
        self.dropped = max(self.dropped,
                           int(pick(samples, "tern_shared_messages_dropped_total", self.labels)))

    def _run(self):
        while not self.stop.wait(0.25):
            self.sample()


# ---------------------------------------------------------------------------------------------
# The story
# ---------------------------------------------------------------------------------------------
class Worker:
    """A worker process (and its restarts)."""

    def __init__(self, index, run_id, host, port, topic_filter, qos, rate, journal_dir,
                 timeout):
        self.client_id = f"worker-{run_id}-{index}"
        self.args = [sys.executable, os.path.abspath(__file__), "worker", "--host", host,
                     "--port", str(port), "--client-id", self.client_id,
                     "--filter", topic_filter, "--qos", str(qos), "--rate", str(rate),
                     "--journal-dir", journal_dir, "--timeout", str(timeout)]
        self.timeout = timeout
        self.proc = None

    def start(self, resume=False):
        self.proc = subprocess.Popen(self.args + (["--resume"] if resume else []),
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)

    def wait_ready(self):
        deadline = time.monotonic() + self.timeout
        line = b""
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(self.proc.stdout.fileno(), 256)
            if not chunk:
                break
            line += chunk
        if not line.startswith(b"ready"):
            self.proc.kill()
            raise Fail(f"{self.client_id} did not start (exit status {self.proc.poll()})")
        return b"session_present=1" in line

    def alive(self):
        return self.proc is not None and self.proc.poll() is None


class Tally:
    """Reads the workers' journals as they grow: which order ids were processed, how often."""

    def __init__(self, journal_dir, run_id, orders):
        self.pattern = os.path.join(journal_dir, f"worker-{run_id}-*.log")
        self.counts = bytearray(orders)  # processing count per order id (saturates at 255)
        self.distinct = 0
        self.processed = 0
        self.resent = 0  # processed from a PUBLISH with DUP=1
        self.recognised = 0  # QoS 2 re-sends of orders already processed (not processed again)
        self.unknown = 0
        self.offsets = {}

    def poll(self):
        for path in glob.glob(self.pattern):
            with open(path, "rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1  # complete lines only; the rest is read next time
            self.offsets[path] = self.offsets.get(path, 0) + end
            for line in data[:end].splitlines():
                if line.startswith(b"S "):
                    self.recognised += 1
                if not line.startswith(b"P "):
                    continue
                _, _, order, dup = line.split()
                order = int(order)
                self.resent += dup == b"1"
                if not 0 <= order < len(self.counts):
                    self.unknown += 1
                    continue
                self.processed += 1
                if self.counts[order] == 0:
                    self.distinct += 1
                if self.counts[order] < 255:
                    self.counts[order] += 1

    def missing(self):
        return [i for i, c in enumerate(self.counts) if c == 0]

    def duplicates(self):
        return sum(c - 1 for c in self.counts if c > 1)


def run(host="127.0.0.1", port=1883, metrics_port=9883, orders=100_000, workers=4, rate=2500,
        qos=1, kill_one=True, restart=True, timeout=30.0, max_rss_mb=1024, log=print,
        journal_dir=None):
    """Runs the story; returns a dict of results. Raises Fail when an order was not processed,
    (QoS 2) processed twice, or a step timed out. `timeout`: seconds without progress.
    `journal_dir`: keep the workers' journals there (default: a temporary directory)."""
    if qos not in (1, 2):
        raise Fail("--qos must be 1 or 2")
    if qos == 2 and kill_one and not restart:
        raise Fail("exactly once with a killed worker needs it restarted (see the docstring)")
    run_id = uuid.uuid4().hex[:8]
    topic = f"shop/orders/{run_id}"
    topic_filter = f"$share/{GROUP}/{topic}"
    ideal = orders / (workers * rate)
    # No progress for `timeout` seconds fails the run; so does running past this cap.
    hard_deadline = time.monotonic() + 4 * ideal + 10 * timeout
    labels = {"group": GROUP, "filter": topic}
    results = {"orders": orders, "workers": workers, "rate": rate, "qos": qos,
               "ideal_s": ideal, "killed": None, "restarted": False}

    with tempfile.TemporaryDirectory(prefix="flash-sale-") as tmp:
        journal_dir = journal_dir or tmp
        os.makedirs(journal_dir, exist_ok=True)
        pool = [Worker(i, run_id, host, port, topic_filter, qos, rate, journal_dir, timeout)
                for i in range(workers)]
        sampler = publisher = None
        clean_exit = False
        try:
            for w in pool:
                w.start()
            for w in pool:
                w.wait_ready()
            log(f"{workers} workers in {topic_filter} at QoS {qos}, {rate:g} orders/s each "
                f"(ideal drain {ideal:.1f}s for {orders} orders)")
            metrics = metrics_port and scrape(host, metrics_port, "tern_shared_members",
                                              labels) is not None
            if metrics:
                pauses0 = scrape(host, metrics_port, "tern_backpressure_pauses_total")
                sampler = Sampler(host, metrics_port, topic)
                sampler.sample()
                results["rss_start"] = sampler.rss[0] if sampler.rss else None
                sampler.thread.start()

            tally = Tally(journal_dir, run_id, orders)
            publisher = Publisher(host, port, f"shop-{run_id}", topic, orders, qos, timeout)
            t0 = time.monotonic()
            publisher.start()
            last, last_change = -1, time.monotonic()
            while tally.distinct < orders:
                time.sleep(0.1)
                tally.poll()
                if publisher.error:
                    raise Fail(publisher.error)
                now = time.monotonic()
                if tally.distinct != last:
                    last, last_change = tally.distinct, now
                elif now - last_change > timeout:
                    raise Fail(f"no order processed for {timeout}s: {tally.distinct} of "
                               f"{orders} processed, publisher acknowledged {publisher.acked}")
                if now > hard_deadline:
                    raise Fail(f"gave up: {tally.distinct} of {orders} processed")
                for w in pool:
                    if not w.alive() and not (w is pool[0] and results["killed"] is not None):
                        raise Fail(f"{w.client_id} exited with status {w.proc.poll()}")
                if kill_one and results["killed"] is None and tally.distinct >= orders // 2:
                    victim = pool[0]
                    victim.proc.kill()  # SIGKILL: no DISCONNECT, no clean-up
                    victim.proc.wait(timeout=10)
                    results["killed"] = tally.distinct
                    log(f"killed {victim.client_id} with SIGKILL after {tally.distinct} orders")
                    if restart:
                        time.sleep(0.5)
                        victim.start(resume=True)
                        if not victim.wait_ready():
                            raise Fail(f"{victim.client_id}: session not resumed")
                        results["restarted"] = True
                        log(f"restarted {victim.client_id}: session resumed")
            drained = time.monotonic() - t0
            publisher.thread.join(timeout)
            if publisher.thread.is_alive() or publisher.error:
                raise Fail(publisher.error or "publisher did not finish")

            # Quiet period: late duplicates (redeliveries) would show up now.
            quiet_since, seen = time.monotonic(), tally.processed
            while time.monotonic() - quiet_since < 1.0:
                time.sleep(0.1)
                tally.poll()
                if tally.processed != seen:
                    quiet_since, seen = time.monotonic(), tally.processed
                if time.monotonic() > hard_deadline:
                    break

            # The workers leave (Session Expiry 0 ends their sessions and the group).
            for w in pool:
                if w.alive():
                    w.proc.terminate()
            for w in pool:
                try:
                    w.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
            clean_exit = all(w.proc.returncode == 0 for w in pool)
            tally.poll()
            if sampler:
                sampler.stop.set()
                sampler.thread.join(5)
                sampler.sample()
        finally:
            if publisher is not None:
                publisher.stop.set()
            for w in pool:
                if w.alive():
                    w.proc.kill()
                    w.proc.wait(10)
            if sampler:
                sampler.stop.set()
            if not clean_exit:
                for w in pool:
                    end_session(host, port, w.client_id)

        missing = tally.missing()
        results.update({
            "processed": tally.processed,
            "distinct": tally.distinct,
            "missing": len(missing),
            "duplicates": tally.duplicates(),
            "resent": tally.resent,
            "recognised": tally.recognised,
            "drain_s": drained,
            "publish_s": (publisher.finished or time.monotonic()) - publisher.started,
        })
        if metrics:
            results["rss_peak"] = max(sampler.rss) if sampler.rss else None
            results["queued_peak"] = sampler.queued_peak
            results["redelivered"] = sampler.redelivered
            results["dropped"] = sampler.dropped
            results["backpressure_pauses"] = (
                scrape(host, metrics_port, "tern_backpressure_pauses_total") - pauses0)
            # The group ended when its last member left, so its series are gone: the peak
            # and the sampler's view are what is left to report.

    log(f"published {orders} orders in {results['publish_s']:.1f}s; processed "
        f"{results['distinct']} distinct orders in {results['drain_s']:.1f}s "
        f"(ideal {ideal:.1f}s, {results['drain_s'] / ideal:.2f}x), "
        f"{results['duplicates']} duplicates; {results['resent']} processed from re-sent "
        f"PUBLISHes (DUP=1), {results['recognised']} re-sent ones recognised as done")
    if metrics and results["rss_peak"]:
        log(f"broker memory: {results['rss_start'] / 2**20:.0f} MiB at start, peak "
            f"{results['rss_peak'] / 2**20:.0f} MiB; group queue peak "
            f"{results['queued_peak']} orders; back-pressure pauses "
            f"{results['backpressure_pauses']:.0f}; given back to the group by a leaving "
            f"worker {results['redelivered']}; dropped {results['dropped']}")
    if missing:
        raise Fail(f"{len(missing)} orders never processed, e.g. {missing[:10]}")
    if tally.unknown:
        raise Fail(f"{tally.unknown} processed messages were not orders of this run")
    if metrics and results["dropped"]:
        raise Fail(f"the group's queue dropped {results['dropped']} orders")
    if qos == 2 and results["duplicates"]:
        raise Fail(f"QoS 2: {results['duplicates']} orders processed more than once")
    if metrics and results["rss_peak"] and results["rss_peak"] > max_rss_mb * 2**20:
        raise Fail(f"broker resident memory peaked at {results['rss_peak'] / 2**20:.0f} MiB "
                   f"(limit {max_rss_mb} MiB)")
    return results


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--metrics-port", type=int, default=9883, help="0: no metrics")
    ap.add_argument("--orders", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rate", type=float, default=2500, help="orders per second per worker")
    ap.add_argument("--qos", type=int, choices=(1, 2), default=1)
    ap.add_argument("--no-kill", action="store_true", help="do not kill a worker halfway")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="seconds without progress before giving up")
    ap.add_argument("--max-rss-mb", type=float, default=1024,
                    help="fail when the broker's resident memory exceeds this")
    a = ap.parse_args()
    if a.workers < 1 or a.orders < 1 or a.rate <= 0:
        ap.error("--workers, --orders and --rate must be positive")
    try:
        r = run(a.host, a.port, a.metrics_port, a.orders, a.workers, a.rate, a.qos,
                kill_one=not a.no_kill, timeout=a.timeout, max_rss_mb=a.max_rss_mb)
    except Fail as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    rss = f", broker RSS peak {r['rss_peak'] / 2**20:.0f} MiB" if r.get("rss_peak") else ""
    print(f"OK {r['distinct']} orders processed ({r['duplicates']} duplicates) in "
          f"{r['drain_s']:.1f}s, ideal {r['ideal_s']:.1f}s{rss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
