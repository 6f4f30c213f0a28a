"""Graceful close: a refusal the client can read although it is still writing.

When Tern ends a connection with a v5 DISCONNECT reason or a refusing CONNACK (or, for 3.x, by
just closing), the client may still be writing. Closing a socket with unread input makes the
kernel answer with a TCP RST, and a client that writes then gets EPIPE/ECONNRESET and usually
gives up before reading why. So the broker writes what it has, shuts its write side down (FIN),
then reads and discards the client's input until the client closes or a bound passes (2 s,
`DRAIN_LIMIT` in src/connection/mod.rs), and only then closes.

The client here is the kind that makes this matter: a single loop that writes every turn
(answers plus filler PINGREQs) and reads whatever arrived, and that gives up at the first
failing write, as client libraries do. Raw sockets on loopback; every loop is bounded.
"""
import threading
import time

import pytest

import mqttraw
from mqttraw import (
    CONNACK, DISCONNECT, PUBREC, RECEIVE_MAXIMUM, SESSION_EXPIRY_INTERVAL, V311, V5,
    Client, check_broker_serves, connect, pingreq, publish, pubrel, uid,
)
from test_websocket import OP_BINARY, OP_CLOSE, RawWs, ws_broker  # noqa: F401 (fixture)

BOTH = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]
# The broker's drain bound (DRAIN_LIMIT) and how long the tests allow around it.
DRAIN_LIMIT = 2.0
BOUND_MARGIN = 3.0


# ---------------------------------------------------------------------------------------------
# A client that keeps writing
# ---------------------------------------------------------------------------------------------
class TcpWire:
    """mqttraw.Client's socket and packet parser, for `converse`."""

    def __init__(self, c):
        self.c = c
        self.sock = c.sock
        self.version = c.version

    def wrap(self, data):
        return data

    def feed(self, data):
        self.c.buf += data

    def parse(self):
        return self.c._try_parse()


class WsWire:
    """A RawWs connection: writes go out as masked binary frames, MQTT packets are parsed from
    the binary frames that arrive; the broker's close frame is recorded."""

    def __init__(self, ws):
        self.ws = ws
        self.sock = ws.sock
        self.version = ws.version
        self.close_frame = None

    def wrap(self, data):
        return RawWs.frame(OP_BINARY, data)

    def feed(self, data):
        self.ws.buf += data

    def parse(self):
        for _ in range(10000):
            p = self.ws._parse_packet()
            if p is not None:
                return p
            f = self.ws._parse_frame()
            if f is None:
                return None
            opcode, payload = f
            if opcode == OP_CLOSE:
                self.close_frame = payload
            elif opcode == OP_BINARY or opcode == 0:
                self.ws.mqtt_buf += payload
        raise AssertionError("too many frames")


class Outcome:
    def __init__(self):
        self.packets = []
        # How the conversation ended: "eof", "reset" (read failed), "send-error", "timeout".
        self.end = None
        self.error = None
        # Seconds from the start to the end, and to the first EOF seen on the read side.
        self.elapsed = None
        self.eof_at = None
        self.stopped_writing = False

    def __repr__(self):
        return (f"<end={self.end} error={self.error!r} elapsed={self.elapsed} "
                f"eof_at={self.eof_at} packets={self.packets[-6:]!r}>")


def converse(wire, first=b"", answer=None, stop=None, forever=False, timeout=8.0,
             turn=0.002, read_every=10):
    """Sends `first`, then every `turn` seconds writes whatever `answer(packet)` returned for
    the packets read so far (else a few PINGREQs); its reader lags behind its writer and takes
    what arrived only every `read_every` turns, like a client busy publishing.

    - `stop(packet)` true: the client has its answer and stops writing; it reads on until EOF.
      A 3.x client with nothing to read stops writing at EOF.
    - A failing write ends the conversation ("send-error"), as it does for a client library:
      what it had not read yet is lost to it.
    - With `forever`, it never stops writing, even after EOF, until a write fails.
    """
    out = Outcome()
    start = time.monotonic()
    deadline = start + timeout
    wire.sock.setblocking(False)
    pending = wire.wrap(first) if first else b""
    filler = wire.wrap(pingreq() * 4)
    for i in range(int(timeout / turn) + 1):
        if time.monotonic() >= deadline:
            out.end = "timeout"
            break
        if forever or not out.stopped_writing:
            if not pending:
                pending = filler
            try:
                n = wire.sock.send(pending)
                pending = pending[n:]
            except BlockingIOError:
                pass
            except OSError as e:
                out.end, out.error = "send-error", e
                break
        time.sleep(turn)
        if out.eof_at is not None or (not out.stopped_writing and (i + 1) % read_every):
            continue
        data = None
        for _ in range(1000):
            try:
                chunk = wire.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:
                out.end, out.error = "reset", e
                break
            if not chunk:
                out.eof_at = time.monotonic() - start
                out.stopped_writing = True
                break
            data = (data or b"") + chunk
        if data:
            wire.feed(data)
            for _ in range(10000):
                p = wire.parse()
                if p is None:
                    break
                out.packets.append(p)
                if answer is not None:
                    reply = answer(p)
                    if reply:
                        pending += wire.wrap(reply)
                if stop is not None and stop(p):
                    out.stopped_writing = True
        if out.end == "reset":
            break
        if out.eof_at is not None and not forever:
            out.end = "eof"
            break
    out.elapsed = time.monotonic() - start
    wire.sock.setblocking(True)
    return out


def answer_pubrec(version):
    """A QoS 2 publisher's answers: PUBREL for every PUBREC."""
    return lambda p: pubrel(p.pid, version) if p.type == PUBREC else None


def is_disconnect(p):
    return p.type == DISCONNECT


def without_pings(packets):
    return [p for p in packets if p.type != mqttraw.PINGRESP]


def tcp_client(b, version, client_id=None, **kw):
    c = Client.to(b, version, timeout=10)
    c.connect(client_id or uid("gc"), **kw)
    return c


def wait_closed_in_log(b, client_id, why, timeout=5.0):
    """Waits for the broker's "connection closed" line for `client_id` giving `why`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("connection closed" in line and client_id in line and why in line
               for line in list(b.log_lines)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no 'connection closed' for {client_id} ({why}):\n{b.log()}")


def assert_read_then_eof(out, expected):
    """The client read `expected` (type, reason) pairs (PINGRESPs aside), never failed a write
    before it had them, and then saw a clean EOF."""
    got = [(p.type, p.rc) for p in without_pings(out.packets)]
    assert got == expected, out
    assert out.end == "eof", out


# ---------------------------------------------------------------------------------------------
# (a) Receive Maximum exceeded while answering PUBRECs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", BOTH)
def test_receive_maximum_exceeded_is_read_while_writing(make_broker, version):
    """v5: Receive Maximum 4, five QoS 2 PUBLISHes, every PUBREC answered with PUBREL and
    PINGREQs written all along: the client reads the four PUBRECs and DISCONNECT 0x93
    [MQTT-3.3.4-7], then EOF. 3.1.1 has no Receive Maximum: its bound is
    limits.max_inbound_qos2 (close without DISCONNECT): four PUBRECs, then a clean EOF."""
    limit = 4
    b = make_broker({"limits": {"receive_maximum": limit, "max_inbound_qos2": limit}})
    c = tcp_client(b, version)
    if version == V5:
        assert c.connack.props.get(RECEIVE_MAXIMUM) == limit, c.connack
    burst = b"".join(publish("gc/rm", b"x", qos=2, pid=i, version=version)
                     for i in range(1, limit + 2))
    out = converse(TcpWire(c), burst, answer=answer_pubrec(version), stop=is_disconnect)
    got = without_pings(out.packets)
    assert [p.pid for p in got if p.type == PUBREC] == list(range(1, limit + 1)), out
    if version == V5:
        assert (got[-1].type, got[-1].rc) == (DISCONNECT, 0x93), out
        assert got[-1].type == DISCONNECT and len(got) == limit + 1, out
    else:
        assert len(got) == limit, out
    assert out.end == "eof", out
    c.close()
    check_broker_serves(b, version=version)


# ---------------------------------------------------------------------------------------------
# (b) Packet too large
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", BOTH)
def test_packet_too_large_is_read_while_writing(make_broker, version):
    """A PUBLISH over limits.max_packet_size: the broker decides from the header alone, so the
    rest of the packet and everything after it are still unread when it closes. v5 reads
    DISCONNECT 0x95 then EOF; 3.1.1 a clean EOF; neither gets a failing write."""
    b = make_broker({"limits": {"max_packet_size": 1024}})
    c = tcp_client(b, version)
    big = publish("gc/big", b"x" * 20000, qos=1, pid=1, version=version)
    out = converse(TcpWire(c), big, stop=is_disconnect)
    assert_read_then_eof(out, [(DISCONNECT, 0x95)] if version == V5 else [])
    c.close()
    check_broker_serves(b, version=version)


# ---------------------------------------------------------------------------------------------
# (c) Refusing CONNACK while the client writes right after CONNECT
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version,rc", [
    pytest.param(V311, 0x04, id="v311-0x04"),
    pytest.param(V5, 0x86, id="v5-0x86"),
])
def test_bad_credentials_connack_is_read_while_writing(make_broker, version, rc):
    """auth.allow_anonymous = false and no password file: a username is refused (3.1.1 0x04,
    v5 0x86). The client pipelines PINGREQs right behind CONNECT and keeps writing; it reads
    the CONNACK, then EOF."""
    b = make_broker({"auth": {"allow_anonymous": False}})
    c = Client.to(b, version, timeout=10)
    first = connect(uid("cred"), version=version, username="nobody", password=b"wrong")
    out = converse(TcpWire(c), first, stop=lambda p: p.type == CONNACK)
    assert_read_then_eof(out, [(CONNACK, rc)])
    assert out.packets[0].session_present is False
    c.close()


@pytest.mark.parametrize("level", [
    pytest.param(6, id="MQTT-level6-[MQTT-3.1.2-2]"),
    pytest.param(255, id="MQTT-level255-[MQTT-3.1.2-2]"),
])
def test_bad_protocol_level_connack_is_read_while_writing(broker, level):
    """A refusal before the session exists (in `serve`, before CONNECT is accepted): CONNACK
    0x01 in 3.1.1 form, read although the client keeps writing behind its CONNECT."""
    c = Client.to(broker, V311, timeout=10)
    first = connect(uid("lvl"), version=level, protocol_name="MQTT")
    out = converse(TcpWire(c), first, stop=lambda p: p.type == CONNACK)
    assert [p.raw for p in out.packets] == [b"\x20\x02\x00\x01"], out
    assert out.end == "eof", out
    c.close()
    check_broker_serves(broker)


# ---------------------------------------------------------------------------------------------
# (d) The drain is bounded, and nobody else waits for it
# ---------------------------------------------------------------------------------------------
def test_client_that_never_stops_writing_is_closed_after_the_bound(make_broker):
    """A v5 client that breaks the protocol and then writes forever: it reads DISCONNECT 0x95
    and EOF at once, and about DRAIN_LIMIT later the broker closes, so its writes fail (well
    within 5 s). Meanwhile other clients are served, and the same client id reconnects and gets
    its persistent session back at once: the session is handed back before the drain."""
    b = make_broker({"limits": {"max_packet_size": 1024}})
    cid = uid("forever")
    persistent = dict(clean=False, properties=[(SESSION_EXPIRY_INTERVAL, 300)])
    c = tcp_client(b, V5, cid, **persistent)
    c.subscribe([(f"gc/{cid}", 1)])
    result = {}

    def run():
        result["out"] = converse(TcpWire(c), publish("gc/big", b"x" * 5000, qos=1, pid=1,
                                                     version=V5),
                                 forever=True, timeout=10)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    # Once the broker has closed that connection (it now drains): a reconnect with its client
    # id is not held up by the drain.
    wait_closed_in_log(b, cid, "exceeds the maximum")
    started = time.monotonic()
    again = Client.to(b, V5, timeout=5)
    ack = again.connect(cid, **persistent)
    took = time.monotonic() - started
    assert ack.session_present is True, ack
    assert took < 1.0, f"reconnect took {took:.2f}s: the session waited for the drain"
    again.disconnect()
    check_broker_serves(b, version=V5)
    t.join(15)
    assert not t.is_alive()
    out = result["out"]
    got = [(p.type, p.rc) for p in without_pings(out.packets)]
    assert got == [(DISCONNECT, 0x95)], out
    assert out.eof_at is not None and out.eof_at < 1.0, out
    assert out.end in ("send-error", "reset"), out
    # Cut off after the bound, not before and not much later.
    assert DRAIN_LIMIT - 0.5 <= out.elapsed <= DRAIN_LIMIT + BOUND_MARGIN, out
    c.close()


def test_many_draining_clients_do_not_stop_the_broker(make_broker):
    """Twenty clients at once break the protocol and keep writing: each reads its DISCONNECT,
    the broker keeps serving others meanwhile, and all are closed within the bound."""
    b = make_broker({"limits": {"max_packet_size": 1024}})
    clients = [tcp_client(b, V5) for _ in range(20)]
    results = [None] * len(clients)

    def run(i):
        results[i] = converse(TcpWire(clients[i]),
                              publish("gc/big", b"x" * 5000, qos=1, pid=1, version=V5),
                              forever=True, timeout=10)

    threads = [threading.Thread(target=run, args=(i,), daemon=True)
               for i in range(len(clients))]
    for t in threads:
        t.start()
    check_broker_serves(b, version=V5)
    for t in threads:
        t.join(15)
    for out in results:
        assert out is not None
        assert [(p.type, p.rc) for p in without_pings(out.packets)] == [(DISCONNECT, 0x95)], out
        assert out.end in ("send-error", "reset"), out
        assert out.elapsed <= DRAIN_LIMIT + BOUND_MARGIN, out
    for c in clients:
        c.close()


# ---------------------------------------------------------------------------------------------
# WebSocket: the same drain through the WebSocket stream
# ---------------------------------------------------------------------------------------------
def ws_client(b, version=V5):
    ws = RawWs(b.ws_port, version=version, timeout=10)
    assert ws.status == 101
    ack = ws.connect(uid("gcws"))
    assert ack.rc == 0, ack
    return ws, ack


def test_websocket_receive_maximum_exceeded_is_read_while_writing(ws_broker):
    """(a) over WebSocket: the DISCONNECT 0x93 arrives in a binary frame, then the broker's
    close frame, then EOF; the client's frames written meanwhile do not reset the connection."""
    limit = 4
    b = ws_broker(extra={"limits": {"receive_maximum": limit}})
    ws, ack = ws_client(b)
    assert ack.props.get(RECEIVE_MAXIMUM) == limit, ack
    burst = b"".join(publish("gc/rm", b"x", qos=2, pid=i, version=V5)
                     for i in range(1, limit + 2))
    wire = WsWire(ws)
    out = converse(wire, burst, answer=answer_pubrec(V5), stop=is_disconnect)
    got = without_pings(out.packets)
    assert [p.pid for p in got if p.type == PUBREC] == list(range(1, limit + 1)), out
    assert (got[-1].type, got[-1].rc) == (DISCONNECT, 0x93), out
    assert out.end == "eof", out
    assert wire.close_frame is not None, "the broker's close frame"
    ws.close()


def test_websocket_packet_too_large_is_read_while_writing(ws_broker):
    """(b) over WebSocket: DISCONNECT 0x95, the close frame, EOF; no failing write."""
    b = ws_broker(extra={"limits": {"max_packet_size": 1024}})
    ws, _ = ws_client(b)
    wire = WsWire(ws)
    big = publish("gc/big", b"x" * 20000, qos=1, pid=1, version=V5)
    out = converse(wire, big, stop=is_disconnect)
    assert_read_then_eof(out, [(DISCONNECT, 0x95)])
    assert wire.close_frame is not None
    ws.close()
