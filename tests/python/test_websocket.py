"""MQTT over WebSockets (`[listeners.ws]`, `[listeners.wss]`) against real clients.

- paho-mqtt with transport="websockets", MQTT 3.1.1 and 5.0: publish/subscribe over ws, ws and
  TCP clients seeing each other's messages (QoS 1, both directions), wss with the dev CA.
- A hand-written RFC 6455 client (below, standard library only) for what libraries hide:
  one CONNECT split over three frames, CONNECT + SUBSCRIBE joined in one frame, ping/pong,
  close, text frames, and the handshake's refusals (404 wrong path, 400 no `mqtt`
  subprotocol, 403 origin not allowed).
- The browser end-to-end test: headless Chromium with MQTT.js (tests/browser/e2e.mjs).

The ws / wss ports come from the broker's ready line (`... ws=127.0.0.1:PORT wss=...`).
Every wait is bounded.
"""
import base64
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import time
import types

import pytest

import mqttraw
from conftest import Broker, brokers, gen_certs
from pahoutil import TIMEOUT, V311, V5, TClient

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BROWSER_DIR = os.path.join(ROOT, "tests", "browser")
CHROMIUM = "/usr/bin/chromium"
WS_READY = re.compile(r"tern: ready .*\bws=(\S+):(\d+)")
WSS_READY = re.compile(r"tern: ready .*\bwss=(\S+):(\d+)")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
GOOD_ORIGIN = "http://good.example"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

VERSIONS = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]


# --------------------------------------------------------------------------- brokers


class WsBroker(Broker):
    """conftest's Broker plus TOML lines it cannot express (arrays such as allowed_origins),
    inserted at the top of their section before the first start."""

    def __init__(self, overrides, raw=None):
        self._raw = raw or {}
        super().__init__(overrides)

    def start(self):
        if self._raw:
            with open(self.config_path) as f:
                lines = f.readlines()
            out = []
            for line in lines:
                out.append(line)
                section = line.strip()[1:-1] if line.startswith("[") else None
                for key, value in self._raw.pop(section, {}).items():
                    out.append(f"{key} = {json.dumps(value)}\n")
            assert not self._raw, f"sections not in the config: {list(self._raw)}"
            with open(self.config_path, "w") as f:
                f.writelines(out)
        super().start()


def ready_port(b, pattern, what):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in list(b.log_lines):
            m = pattern.search(line)
            if m:
                return int(m.group(2))
        time.sleep(0.05)
    raise AssertionError(f"no {what}= in the ready line:\n" + b.log())


@pytest.fixture
def ws_broker():
    """Factory: ws_broker(path=None, allowed_origins=None, wss=None) starts Tern with TCP,
    metrics and a WebSocket listener (and a wss one when `wss` is a cert namespace).
    Returned broker has ws_port (and wss_port)."""

    def start(path=None, allowed_origins=None, wss=None, extra=None):
        ws = {"bind": "127.0.0.1:0"}
        if path is not None:
            ws["path"] = path
        overrides = {"listeners.ws": ws}
        raw = {}
        if allowed_origins is not None:
            raw["listeners.ws"] = {"allowed_origins": allowed_origins}
        if wss is not None:
            overrides["listeners.wss"] = {"bind": "127.0.0.1:0", "cert": wss.server_pem,
                                          "key": wss.server_key}
            if path is not None:
                overrides["listeners.wss"]["path"] = path
        for k, v in (extra or {}).items():
            overrides.setdefault(k, {}).update(v)
        b = WsBroker(overrides, raw)
        try:
            b.ws_port = ready_port(b, WS_READY, "ws")
            if wss is not None:
                b.wss_port = ready_port(b, WSS_READY, "wss")
        except BaseException:
            b.close()
            raise
        return b

    yield from brokers(check_alive=True, make=start)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Dev CA + server certificate for localhost / 127.0.0.1 (certs/gen.sh)."""
    return gen_certs(tmp_path_factory.mktemp("ws-certs"))


# --------------------------------------------------------------------------- paho clients


class Clients:
    """paho TClients over TCP, ws or wss with unique ids; all closed at the end."""

    def __init__(self, prefix):
        self.prefix = re.sub(r"[^A-Za-z0-9_-]", "_", prefix)[-36:]
        self.made = []

    def _make(self, target, name, protocol):
        c = TClient(target, f"{self.prefix}-{name}", protocol=protocol)
        self.made.append(c)
        return c

    def tcp(self, b, name, protocol=V5):
        return self._make(b, name, protocol)

    def ws(self, b, name, protocol=V5, path="/mqtt", headers=None, tls_ca=None):
        port = b.wss_port if tls_ca else b.ws_port
        target = types.SimpleNamespace(host="127.0.0.1", port=port, metrics_port=b.metrics_port)
        c = self._make(target, name, protocol)
        c.c.transport = "websockets"
        c.c.ws_set_options(path=path, headers=headers)
        if tls_ca:
            c.c.tls_set(ca_certs=tls_ca)
        return c

    def close(self):
        for c in self.made:
            c.close()


@pytest.fixture
def clients(request):
    f = Clients(request.node.name)
    yield f
    f.close()


def topic(name):
    return f"ws-test/{mqttraw.uid(name)}"


# --------------------------------------------------------------------------- raw RFC 6455 client


class RawWs:
    """A minimal WebSocket client: the upgrade request, masked frames out, frames in; MQTT
    packets are parsed from the concatenated binary payloads. Every read has a deadline."""

    def __init__(self, port, path="/mqtt", protocols="mqtt", origin=None, version=V311,
                 timeout=TIMEOUT):
        self.version = version
        self.timeout = timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"]
        if protocols is not None:
            lines.append(f"Sec-WebSocket-Protocol: {protocols}")
        if origin is not None:
            lines.append(f"Origin: {origin}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buf = bytearray()
        self.eof = False
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if not self._fill(deadline):
                raise AssertionError(f"connection closed during the handshake: {bytes(self.buf)!r}")
        end = self.buf.index(b"\r\n\r\n")
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[:end + 4]
        self.status_line = head[0]
        self.status = int(head[0].split()[1])
        self.headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        if self.status == 101:
            want = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
            assert self.headers.get("sec-websocket-accept") == want, self.headers
        self.mqtt_buf = bytearray()
        self.pongs = []
        self.close_frame = None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self, deadline):
        return mqttraw.fill_from_socket(self, deadline)

    def body(self, timeout=None):
        """The rest of an HTTP error response (until the broker closes)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self._fill(deadline):
            pass
        return bytes(self.buf)

    # -- frames ----------------------------------------------------------------------------
    @staticmethod
    def frame(opcode, payload=b"", fin=True, mask=True):
        b0 = (0x80 if fin else 0) | opcode
        n = len(payload)
        mbit = 0x80 if mask else 0
        if n < 126:
            hdr = bytes([b0, mbit | n])
        elif n < 65536:
            hdr = bytes([b0, mbit | 126]) + struct.pack("!H", n)
        else:
            hdr = bytes([b0, mbit | 127]) + struct.pack("!Q", n)
        if not mask:
            return hdr + payload
        key = os.urandom(4)
        return hdr + key + bytes(c ^ key[i % 4] for i, c in enumerate(payload))

    def send_frame(self, opcode, payload=b"", fin=True, mask=True):
        self.sock.sendall(self.frame(opcode, payload, fin, mask))

    def send_binary(self, *parts):
        """Each part as one binary frame."""
        for p in parts:
            self.send_frame(OP_BINARY, p)

    def recv_frame(self, timeout=None):
        """(opcode, payload), or None when the broker closed the connection."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            f = self._parse_frame()
            if f is not None:
                return f
            if not self._fill(deadline):
                return None

    def _parse_frame(self):
        b = self.buf
        if len(b) < 2:
            return None
        opcode = b[0] & 0x0F
        assert b[0] & 0x70 == 0, "reserved bits set by the server"
        assert not b[1] & 0x80, "server frames must not be masked"
        n = b[1] & 0x7F
        pos = 2
        if n == 126:
            if len(b) < 4:
                return None
            n = struct.unpack("!H", b[2:4])[0]
            pos = 4
        elif n == 127:
            if len(b) < 10:
                return None
            n = struct.unpack("!Q", b[2:10])[0]
            pos = 10
        if len(b) < pos + n:
            return None
        payload = bytes(b[pos:pos + n])
        del b[:pos + n]
        return opcode, payload

    # -- MQTT over the frames ----------------------------------------------------------------
    def recv_packet(self, timeout=None):
        """The next MQTT packet from the broker's binary frames (pongs and a close frame are
        recorded on the way). Fails on EOF or a text frame."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            p = self._parse_packet()
            if p is not None:
                return p
            f = self.recv_frame(max(deadline - time.monotonic(), 0.01))
            if f is None:
                raise AssertionError(f"connection closed (close frame {self.close_frame}) "
                                     f"with {bytes(self.mqtt_buf)!r} pending")
            opcode, payload = f
            if opcode == OP_BINARY or opcode == OP_CONT:
                self.mqtt_buf += payload
            elif opcode == OP_PONG:
                self.pongs.append(payload)
            elif opcode == OP_CLOSE:
                self.close_frame = payload
            else:
                raise AssertionError(f"unexpected frame opcode {opcode:#x}: {payload[:40]!r}")

    def _parse_packet(self):
        b = self.mqtt_buf
        if len(b) < 2:
            return None
        try:
            length, pos = mqttraw.decode_varint(b, 1)
        except mqttraw.MalformedError:
            return None
        if len(b) < pos + length:
            return None
        raw = bytes(b[:pos + length])
        del b[:pos + length]
        return mqttraw.decode(raw[0], raw[pos:], self.version, raw)

    def connect(self, client_id=None, **kw):
        """CONNECT in one frame; returns the CONNACK."""
        self.send_binary(mqttraw.connect(client_id or mqttraw.uid("rawws"), version=self.version,
                                         **kw))
        p = self.recv_packet()
        assert p.type == mqttraw.CONNACK, p
        return p

    def wait_closed(self, timeout=None):
        """Read until the broker closes the TCP connection; returns the frames seen."""
        frames = []
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            f = self.recv_frame(max(deadline - time.monotonic(), 0.01))
            if f is None:
                return frames
            frames.append(f)


def close_code(payload):
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


@pytest.fixture
def raw_ws():
    made = []

    def factory(*a, **kw):
        c = RawWs(*a, **kw)
        made.append(c)
        return c

    yield factory
    for c in made:
        c.close()


# --------------------------------------------------------------------------- paho over ws


@pytest.mark.parametrize("protocol", VERSIONS)
def test_paho_publish_subscribe_over_websocket(ws_broker, clients, protocol):
    b = ws_broker()
    c = clients.ws(b, "c", protocol)
    c.connect()
    t = topic("self")
    assert c.subscribe(t, qos=1) == [1]
    assert c.publish(t, b"over websockets", qos=1) == 0
    m = c.get()
    assert (m.topic, m.payload, m.qos) == (t, b"over websockets", 1)
    c.disconnect()


@pytest.mark.parametrize("protocol", VERSIONS)
def test_websocket_and_tcp_clients_see_each_other(ws_broker, clients, protocol):
    b = ws_broker()
    ws = clients.ws(b, "ws", protocol)
    tcp = clients.tcp(b, "tcp", protocol)
    ws.connect()
    tcp.connect()
    down, up = topic("down"), topic("up")
    assert ws.subscribe(down, qos=1) == [1]
    assert tcp.subscribe(up, qos=1) == [1]
    # TCP -> ws, including a payload larger than one outgoing WebSocket frame (64 KiB).
    big = bytes(i % 251 for i in range(200_000))
    for payload in (b"from tcp", big):
        assert tcp.publish(down, payload, qos=1) == 0
        m = ws.get()
        assert (m.topic, m.qos) == (down, 1)
        assert m.payload == payload
    # ws -> TCP
    for payload in (b"from ws", big):
        assert ws.publish(up, payload, qos=1) == 0
        m = tcp.get()
        assert (m.topic, m.qos) == (up, 1)
        assert m.payload == payload
    ws.disconnect()
    tcp.disconnect()


def test_websocket_session_is_the_same_session_as_tcp(ws_broker, clients):
    """Same broker, same sessions: a persistent session made over TCP resumes over ws."""
    b = ws_broker()
    t = topic("resume")
    cid = mqttraw.uid("resume")
    tcp = TClient(b, cid, protocol=V311, clean_session=False)
    clients.made.append(tcp)
    tcp.connect()
    assert tcp.subscribe(t, qos=1) == [1]
    tcp.disconnect()
    pub = clients.tcp(b, "pub", V311)
    pub.connect()
    assert pub.publish(t, b"queued while away", qos=1) == 0
    target = types.SimpleNamespace(host="127.0.0.1", port=b.ws_port, metrics_port=b.metrics_port)
    back = TClient(target, cid, protocol=V311, clean_session=False)
    clients.made.append(back)
    back.c.transport = "websockets"
    back.c.ws_set_options(path="/mqtt")
    _, session_present, _ = back.connect()
    assert session_present
    m = back.get()
    assert (m.topic, m.payload, m.qos) == (t, b"queued while away", 1)


def test_custom_path(ws_broker, clients, raw_ws):
    b = ws_broker(path="/ws/broker")
    assert raw_ws(b.ws_port, path="/mqtt").status == 404
    c = clients.ws(b, "c", V5, path="/ws/broker")
    c.connect()
    c.disconnect()


@pytest.mark.parametrize("protocol", VERSIONS)
def test_wss_with_the_dev_ca(ws_broker, clients, certs, protocol):
    b = ws_broker(wss=certs)
    s = clients.ws(b, "wss", protocol, tls_ca=certs.ca_pem)
    tcp = clients.tcp(b, "tcp", protocol)
    s.connect()
    tcp.connect()
    down, up = topic("wss-down"), topic("wss-up")
    assert s.subscribe(down, qos=1) == [1]
    assert tcp.subscribe(up, qos=1) == [1]
    assert tcp.publish(down, b"to wss", qos=1) == 0
    assert s.get().payload == b"to wss"
    assert s.publish(up, b"from wss", qos=1) == 0
    assert tcp.get().payload == b"from wss"
    s.disconnect()
    tcp.disconnect()


def test_wss_refuses_an_untrusted_client_handshake(ws_broker, certs):
    """The wss port speaks TLS only: a client that does not trust the CA fails, and plain ws
    to the wss port gets no upgrade."""
    b = ws_broker(wss=certs)
    ctx = ssl.create_default_context()  # system roots: not the dev CA
    with socket.create_connection(("127.0.0.1", b.wss_port), timeout=TIMEOUT) as s:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(s, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", b.wss_port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n")
        got = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass
        assert b"101" not in got, got
    assert b.alive()


# --------------------------------------------------------------------------- raw frames


@pytest.mark.parametrize("version", [pytest.param(mqttraw.V311, id="v311"),
                                     pytest.param(mqttraw.V5, id="v5")])
def test_connect_split_over_three_frames(ws_broker, raw_ws, version):
    b = ws_broker()
    c = raw_ws(b.ws_port, version=version)
    assert c.status == 101
    assert c.headers.get("sec-websocket-protocol") == "mqtt"
    pkt = mqttraw.connect(mqttraw.uid("split"), version=version)
    c.send_binary(pkt[:1], pkt[1:9], pkt[9:])
    p = c.recv_packet()
    assert p.type == mqttraw.CONNACK and p.rc == 0, p
    # The stream goes on working: a PINGREQ split over two frames.
    c.send_binary(mqttraw.pingreq()[:1], mqttraw.pingreq()[1:])
    assert c.recv_packet().type == mqttraw.PINGRESP


def test_connect_and_subscribe_joined_in_one_frame(ws_broker, raw_ws):
    b = ws_broker()
    c = raw_ws(b.ws_port)
    t = topic("joined")
    c.send_binary(mqttraw.connect(mqttraw.uid("joined")) + mqttraw.subscribe(1, [(t, 1)]))
    p = c.recv_packet()
    assert p.type == mqttraw.CONNACK and p.rc == 0, p
    p = c.recv_packet()
    assert p.type == mqttraw.SUBACK and p.pid == 1 and p.codes == [1], p
    # Packet boundaries anywhere: a PUBLISH and half a PINGREQ in one frame, the rest in the next.
    pub = mqttraw.publish(t, b"joined payload", qos=0)
    ping = mqttraw.pingreq()
    c.send_binary(pub + ping[:1], ping[1:])
    got = sorted((c.recv_packet(), c.recv_packet()), key=lambda p: p.type)
    assert got[0].type == mqttraw.PUBLISH and got[0].payload == b"joined payload", got
    assert got[1].type == mqttraw.PINGRESP, got


def test_large_publish_over_many_frames_reaches_tcp(ws_broker, raw_ws, clients):
    b = ws_broker()
    tcp = clients.tcp(b, "tcp", V311)
    tcp.connect()
    t = topic("many-frames")
    assert tcp.subscribe(t, qos=1) == [1]
    c = raw_ws(b.ws_port)
    c.connect()
    payload = os.urandom(300_000)
    pkt = mqttraw.publish(t, payload, qos=1, pid=7)
    step = 47_000
    c.send_binary(*[pkt[i:i + step] for i in range(0, len(pkt), step)])
    ack = c.recv_packet()
    assert ack.type == mqttraw.PUBACK and ack.pid == 7, ack
    assert tcp.get().payload == payload


def test_fragmented_message_is_one_stream(ws_broker, raw_ws):
    """A message split into WebSocket fragments (continuation frames) reads as its bytes."""
    b = ws_broker()
    c = raw_ws(b.ws_port)
    pkt = mqttraw.connect(mqttraw.uid("frag"))
    c.send_frame(OP_BINARY, pkt[:5], fin=False)
    c.send_frame(OP_CONT, pkt[5:12], fin=False)
    c.send_frame(OP_CONT, pkt[12:], fin=True)
    p = c.recv_packet()
    assert p.type == mqttraw.CONNACK and p.rc == 0, p


def test_ping_gets_pong(ws_broker, raw_ws):
    b = ws_broker()
    c = raw_ws(b.ws_port)
    c.connect()
    # The broker has nothing to write: the pong must still go out.
    c.send_frame(OP_PING, b"tern?")
    f = c.recv_frame()
    assert f == (OP_PONG, b"tern?"), f
    # Also a ping before CONNECT, while the broker waits for it.
    d = raw_ws(b.ws_port)
    d.send_frame(OP_PING, b"early")
    assert d.recv_frame() == (OP_PONG, b"early")
    assert d.connect().rc == 0


def test_close_frame_is_answered_and_ends_the_connection(ws_broker, raw_ws):
    b = ws_broker()
    c = raw_ws(b.ws_port)
    c.connect()
    c.send_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye")
    frames = c.wait_closed()
    closes = [p for op, p in frames if op == OP_CLOSE]
    assert closes and close_code(closes[0]) == 1000, frames
    assert b.alive()


def test_text_frame_closes_with_1003(ws_broker, raw_ws):
    b = ws_broker()
    c = raw_ws(b.ws_port)
    c.connect()
    c.send_frame(OP_TEXT, b"\x10\x00 not MQTT")
    frames = c.wait_closed()
    closes = [p for op, p in frames if op == OP_CLOSE]
    assert closes and close_code(closes[0]) == 1003, frames


def test_unmasked_frame_is_a_protocol_error(ws_broker, raw_ws):
    b = ws_broker()
    c = raw_ws(b.ws_port)
    c.connect()
    c.send_frame(OP_BINARY, mqttraw.pingreq(), mask=False)
    frames = c.wait_closed()
    closes = [p for op, p in frames if op == OP_CLOSE]
    assert closes and close_code(closes[0]) == 1002, frames
    assert b.alive()


def test_server_disconnect_sends_a_close_frame(ws_broker, raw_ws):
    """When the broker ends the connection (here: a second CONNECT, a protocol error) the
    client sees a WebSocket close frame, not only a dropped socket."""
    b = ws_broker()
    c = raw_ws(b.ws_port, version=mqttraw.V5)
    c.connect()
    c.send_binary(mqttraw.connect(mqttraw.uid("again"), version=mqttraw.V5))
    p = c.recv_packet()
    assert p.type == mqttraw.DISCONNECT and p.rc == 0x82, p
    frames = c.wait_closed()
    closes = [pl for op, pl in frames if op == OP_CLOSE] + (
        [c.close_frame] if c.close_frame is not None else [])
    assert closes and close_code(closes[0]) == 1000, frames


# --------------------------------------------------------------------------- handshake


def test_wrong_path_is_404(ws_broker, raw_ws):
    b = ws_broker()
    for path in ("/", "/mqtt/", "/mqttx", "/other"):
        c = raw_ws(b.ws_port, path=path)
        assert c.status == 404, (path, c.status_line)
    # The query string is not part of the path.
    c = raw_ws(b.ws_port, path="/mqtt?token=abc")
    assert c.status == 101
    assert c.connect().rc == 0


def test_missing_mqtt_subprotocol_is_400(ws_broker, raw_ws):
    b = ws_broker()
    for protocols in (None, "", "wamp", "mqttv5, MQTT"):
        c = raw_ws(b.ws_port, protocols=protocols)
        assert c.status == 400, (protocols, c.status_line)
    assert b.alive()


def test_subprotocol_selection(ws_broker, raw_ws):
    b = ws_broker()
    c = raw_ws(b.ws_port, protocols="mqttv3.1")
    assert c.status == 101
    assert c.headers.get("sec-websocket-protocol") == "mqttv3.1"
    # An MQTT 3.1 client over mqttv3.1.
    c.version = mqttraw.V31
    assert c.connect().rc == 0
    c = raw_ws(b.ws_port, protocols="mqttv3.1, mqtt")
    assert c.status == 101
    assert c.headers.get("sec-websocket-protocol") == "mqtt"


def test_origin_allow_list(ws_broker, raw_ws, clients):
    b = ws_broker(allowed_origins=[GOOD_ORIGIN])
    c = raw_ws(b.ws_port, origin="http://evil.example")
    assert c.status == 403, c.status_line
    for bad in ("http://good.example.evil", "https://good.example", "null"):
        assert raw_ws(b.ws_port, origin=bad).status == 403, bad
    for good in (GOOD_ORIGIN, "HTTP://GOOD.EXAMPLE"):
        c = raw_ws(b.ws_port, origin=good)
        assert c.status == 101, good
        assert c.connect().rc == 0
    # Non-browser clients send no Origin.
    c = raw_ws(b.ws_port)
    assert c.status == 101
    assert c.connect().rc == 0
    # paho sends Origin http://HOST:PORT by default; with an allowed one it connects.
    p = clients.ws(b, "paho", V5, headers={"Origin": GOOD_ORIGIN})
    p.connect()
    p.disconnect()


def test_refusals_and_junk_leave_the_broker_up(ws_broker):
    b = ws_broker()
    for junk in (b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00",  # MQTT on the ws port
                 b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n",  # no upgrade
                 b"\x00" * 70_000,
                 os.urandom(5000)):
        with socket.create_connection(("127.0.0.1", b.ws_port), timeout=TIMEOUT) as s:
            try:
                s.sendall(junk)
                s.settimeout(2)
                while s.recv(4096):
                    pass
            except OSError:
                pass
    c = RawWs(b.ws_port)
    try:
        assert c.status == 101
        assert c.connect().rc == 0
    finally:
        c.close()
    assert b.alive()


# --------------------------------------------------------------------------- browser


def test_browser_e2e(ws_broker):
    """Headless Debian Chromium + MQTT.js over ws://, a TCP client on the other side, and the
    status page (tests/browser/e2e.mjs). Needs `make browser-deps`."""
    if os.environ.get("TERN_SKIP_BROWSER") == "1":
        pytest.skip("TERN_SKIP_BROWSER=1")
    node = shutil.which("node")
    missing = []
    if not node:
        missing.append("node (Node.js 20+)")
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"chromium not found at {CHROMIUM}")
    for mod in ("playwright-core", "mqtt"):
        if not os.path.isdir(os.path.join(BROWSER_DIR, "node_modules", mod)):
            missing.append(f"tests/browser/node_modules/{mod}")
    if missing:
        pytest.fail("browser test cannot run: missing " + ", ".join(missing)
                    + "; run `make browser-deps` (or set TERN_SKIP_BROWSER=1 to skip)")
    b = ws_broker()
    cmd = [node, os.path.join(BROWSER_DIR, "e2e.mjs"),
           "--ws", f"ws://127.0.0.1:{b.ws_port}/mqtt",
           "--tcp", f"mqtt://127.0.0.1:{b.port}",
           "--status", f"http://127.0.0.1:{b.metrics_port}/"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                       cwd=ROOT)
    out = r.stdout.decode("utf-8", "replace")
    print(out)
    assert r.returncode == 0, f"e2e.mjs exited {r.returncode}:\n{out}\nbroker log:\n{b.log()[-4000:]}"
