"""A tiny raw MQTT 3.1 / 3.1.1 / 5.0 client for conformance tests.

It builds every byte itself with `struct` and talks over a plain `socket`, so tests can send
exactly the (possibly broken) packets they mean and see exactly what the broker answers:
no auto-acknowledgement, no packet id renumbering, no retries. It deliberately shares no code
with paho or the broker's own codec.

Encoding helpers return `bytes`; `Client` wraps a socket with a bounded, timeout-driven packet
reader that decodes CONNACK, PUBLISH, PUBACK/PUBREC/PUBREL/PUBCOMP, SUBACK, UNSUBACK, PINGRESP,
DISCONNECT and AUTH, including v5 reason codes and properties.
"""
import itertools
import os
import socket
import struct
import time

# ---------------------------------------------------------------------------------------------
# Packet types and constants
# ---------------------------------------------------------------------------------------------
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = (
    8, 9, 10, 11, 12, 13, 14, 15)

TYPE_NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}

V31, V311, V5 = 3, 4, 5

# v5 property identifiers
PAYLOAD_FORMAT_INDICATOR = 0x01
MESSAGE_EXPIRY_INTERVAL = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_IDENTIFIER = 0x0B
SESSION_EXPIRY_INTERVAL = 0x11
ASSIGNED_CLIENT_IDENTIFIER = 0x12
SERVER_KEEP_ALIVE = 0x13
AUTHENTICATION_METHOD = 0x15
AUTHENTICATION_DATA = 0x16
REQUEST_PROBLEM_INFORMATION = 0x17
WILL_DELAY_INTERVAL = 0x18
REQUEST_RESPONSE_INFORMATION = 0x19
RESPONSE_INFORMATION = 0x1A
SERVER_REFERENCE = 0x1C
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
SHARED_SUBSCRIPTION_AVAILABLE = 0x2A

PROP_TYPES = {
    0x01: "byte", 0x02: "u32", 0x03: "str", 0x08: "str", 0x09: "bin", 0x0B: "varint",
    0x11: "u32", 0x12: "str", 0x13: "u16", 0x15: "str", 0x16: "bin", 0x17: "byte",
    0x18: "u32", 0x19: "byte", 0x1A: "str", 0x1C: "str", 0x1F: "str", 0x21: "u16",
    0x22: "u16", 0x23: "u16", 0x24: "byte", 0x25: "byte", 0x26: "pair", 0x27: "u32",
    0x28: "byte", 0x29: "byte", 0x2A: "byte",
}


class MalformedError(Exception):
    """The bytes received from the broker do not decode as MQTT."""


class Timeout(AssertionError):
    """No (complete) packet arrived within the allowed time."""


class Closed(AssertionError):
    """The broker closed the connection."""


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------
def varint(n):
    """Variable Byte Integer (remaining length, property lengths, subscription ids)."""
    if n < 0 or n > 268_435_455:
        raise ValueError("varint out of range")
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        if n:
            byte |= 0x80
        out.append(byte)
        if not n:
            return bytes(out)


def u8(n):
    return struct.pack("!B", n)


def u16(n):
    return struct.pack("!H", n)


def u32(n):
    return struct.pack("!I", n)


def string(s):
    """UTF-8 string with a 2-byte length. `bytes` are sent as-is (for invalid UTF-8 tests)."""
    raw = s if isinstance(s, (bytes, bytearray)) else s.encode("utf-8")
    return u16(len(raw)) + bytes(raw)


def binary(b):
    return u16(len(b)) + bytes(b)


def prop(pid, value):
    """One v5 property: identifier + value encoded by the property's type."""
    kind = PROP_TYPES[pid]
    head = varint(pid)
    if kind == "byte":
        return head + u8(value)
    if kind == "u16":
        return head + u16(value)
    if kind == "u32":
        return head + u32(value)
    if kind == "varint":
        return head + varint(value)
    if kind == "str":
        return head + string(value)
    if kind == "bin":
        return head + binary(value)
    if kind == "pair":
        k, v = value
        return head + string(k) + string(v)
    raise ValueError(kind)


def props(items=None):
    """Encode a v5 property block: varint length + properties.

    `items` is a list of (id, value) pairs (order kept, repeats allowed), a dict, or raw bytes
    (already-encoded properties, for malformed tests)."""
    if items is None:
        body = b""
    elif isinstance(items, (bytes, bytearray)):
        body = bytes(items)
    else:
        pairs = items.items() if isinstance(items, dict) else items
        body = b"".join(prop(k, v) for k, v in pairs)
    return varint(len(body)) + body


def packet(ptype, flags, body):
    """Fixed header (type, flags, remaining length) + body."""
    return u8((ptype << 4) | flags) + varint(len(body)) + bytes(body)


def connect(client_id, version=V311, clean=True, keepalive=60, will=None, username=None,
            password=None, properties=None, reserved=False, protocol_name=None, flags=None):
    """CONNECT. `will` = dict(topic, payload, qos=0, retain=False, properties=None).

    `flags` overrides the computed connect flags byte (for malformed tests)."""
    if protocol_name is None:
        protocol_name = "MQIsdp" if version == V31 else "MQTT"
    f = 0
    if clean:
        f |= 0x02
    if will is not None:
        f |= 0x04 | (will.get("qos", 0) << 3)
        if will.get("retain"):
            f |= 0x20
    if password is not None:
        f |= 0x40
    if username is not None:
        f |= 0x80
    if reserved:
        f |= 0x01
    if flags is not None:
        f = flags
    vh = string(protocol_name) + u8(version) + u8(f) + u16(keepalive)
    if version == V5:
        vh += props(properties)
    payload = string(client_id)
    if will is not None:
        if version == V5:
            payload += props(will.get("properties"))
        payload += string(will["topic"]) + binary(will.get("payload", b""))
    if username is not None:
        payload += string(username)
    if password is not None:
        payload += binary(password if isinstance(password, bytes) else password.encode())
    return packet(CONNECT, 0, vh + payload)


def publish(topic, payload=b"", qos=0, pid=None, retain=False, dup=False, version=V311,
            properties=None):
    if isinstance(payload, str):
        payload = payload.encode()
    flags = (0x08 if dup else 0) | ((qos & 3) << 1) | (0x01 if retain else 0)
    vh = string(topic)
    if qos:
        vh += u16(pid if pid is not None else 1)
    if version == V5:
        vh += props(properties)
    return packet(PUBLISH, flags, vh + payload)


def ack(ptype, pid, version=V311, rc=None, properties=None):
    """PUBACK / PUBREC / PUBREL / PUBCOMP (PUBREL gets its mandatory 0b0010 flags)."""
    body = u16(pid)
    if version == V5 and (rc is not None or properties is not None):
        body += u8(rc or 0)
        if properties is not None:
            body += props(properties)
    return packet(ptype, 0x02 if ptype == PUBREL else 0, body)


def puback(pid, version=V311, rc=None, properties=None):
    return ack(PUBACK, pid, version, rc, properties)


def pubrec(pid, version=V311, rc=None, properties=None):
    return ack(PUBREC, pid, version, rc, properties)


def pubrel(pid, version=V311, rc=None, properties=None):
    return ack(PUBREL, pid, version, rc, properties)


def pubcomp(pid, version=V311, rc=None, properties=None):
    return ack(PUBCOMP, pid, version, rc, properties)


def subscribe(pid, filters, version=V311, properties=None):
    """`filters`: list of (topic filter, options byte); in 3.1.1 the options byte is the QoS."""
    body = u16(pid)
    if version == V5:
        body += props(properties)
    for flt, opts in filters:
        body += string(flt) + u8(opts)
    return packet(SUBSCRIBE, 0x02, body)


def sub_options(qos, no_local=False, retain_as_published=False, retain_handling=0):
    return qos | (0x04 if no_local else 0) | (0x08 if retain_as_published else 0) | (
        retain_handling << 4)


def unsubscribe(pid, filters, version=V311, properties=None):
    body = u16(pid)
    if version == V5:
        body += props(properties)
    for flt in filters:
        body += string(flt)
    return packet(UNSUBSCRIBE, 0x02, body)


def pingreq():
    return b"\xc0\x00"


def disconnect(version=V311, rc=None, properties=None):
    if version != V5 or (rc is None and properties is None):
        return b"\xe0\x00"
    body = u8(rc or 0)
    if properties is not None:
        body += props(properties)
    return packet(DISCONNECT, 0, body)


def auth(rc=0x18, properties=None):
    return packet(AUTH, 0, u8(rc) + props(properties))


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
def decode_varint(buf, pos):
    """Returns (value, new position). Raises MalformedError on a 5th byte / truncation."""
    value, mult = 0, 1
    for i in range(4):
        if pos >= len(buf):
            raise MalformedError("truncated varint")
        b = buf[pos]
        pos += 1
        value += (b & 0x7F) * mult
        if not b & 0x80:
            return value, pos
        mult *= 128
    raise MalformedError("varint longer than 4 bytes")


class Reader:
    def __init__(self, data):
        self.data = bytes(data)
        self.pos = 0

    def remaining(self):
        return len(self.data) - self.pos

    def take(self, n):
        if self.pos + n > len(self.data):
            raise MalformedError(f"need {n} bytes, have {self.remaining()}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack("!H", self.take(2))[0]

    def u32(self):
        return struct.unpack("!I", self.take(4))[0]

    def varint(self):
        v, self.pos = decode_varint(self.data, self.pos)
        return v

    def string(self):
        raw = self.take(self.u16())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MalformedError(f"invalid UTF-8 from broker: {raw!r}") from e

    def binary(self):
        return self.take(self.u16())

    def rest(self):
        return self.take(self.remaining())


class Props(dict):
    """Decoded v5 properties: {id: value}. User properties (list of pairs, order kept) and
    subscription identifiers (list) accumulate; any other repeated id is recorded in `dups`."""

    def __init__(self):
        super().__init__()
        self.dups = []

    @property
    def user(self):
        return self.get(USER_PROPERTY, [])

    @property
    def sub_ids(self):
        return self.get(SUBSCRIPTION_IDENTIFIER, [])


def decode_props(r):
    length = r.varint()
    end = r.pos + length
    if end > len(r.data):
        raise MalformedError("property length beyond packet")
    out = Props()
    while r.pos < end:
        pid = r.varint()
        kind = PROP_TYPES.get(pid)
        if kind is None:
            raise MalformedError(f"unknown property 0x{pid:02x}")
        val = {
            "byte": r.u8, "u16": r.u16, "u32": r.u32, "varint": r.varint, "str": r.string,
            "bin": r.binary, "pair": lambda: (r.string(), r.string()),
        }[kind]()
        if pid in (USER_PROPERTY, SUBSCRIPTION_IDENTIFIER):
            out.setdefault(pid, []).append(val)
        elif pid in out:
            out.dups.append(pid)
        else:
            out[pid] = val
    if r.pos != end:
        raise MalformedError("property overran its block")
    return out


class Packet:
    """A decoded packet from the broker. Common attributes: type, flags, raw (whole packet).
    Per type: session_present, rc, props, topic, pid, payload, qos, dup, retain, codes."""

    def __init__(self, ptype, flags, body, raw):
        self.type = ptype
        self.flags = flags
        self.body = body
        self.raw = raw
        self.rc = None
        self.props = Props()
        self.pid = None
        self.codes = []
        self.topic = None
        self.payload = None
        self.qos = self.dup = self.retain = None
        self.session_present = None

    @property
    def name(self):
        return TYPE_NAMES.get(self.type, f"TYPE{self.type}")

    def __repr__(self):
        extra = []
        for attr in ("rc", "pid", "topic", "qos", "dup", "retain", "session_present"):
            v = getattr(self, attr)
            if v is not None:
                extra.append(f"{attr}={v!r}")
        if self.codes:
            extra.append(f"codes={self.codes!r}")
        if self.props:
            extra.append(f"props={dict(self.props)!r}")
        if self.payload is not None:
            extra.append(f"payload={self.payload[:40]!r}")
        return f"<{self.name} {' '.join(extra)} raw={self.raw[:64].hex(' ')}>"


def decode(first, body, version, raw=b""):
    """Decode one packet the broker sent (`first` = fixed header byte, `body` = remaining)."""
    ptype, flags = first >> 4, first & 0x0F
    p = Packet(ptype, flags, bytes(body), bytes(raw))
    r = Reader(body)
    v5 = version == V5
    if ptype == CONNACK:
        ack_flags = r.u8()
        if ack_flags & 0xFE:
            raise MalformedError("CONNACK reserved flags set")
        p.session_present = bool(ack_flags & 1)
        p.rc = r.u8()
        if v5 and r.remaining():
            p.props = decode_props(r)
    elif ptype == PUBLISH:
        p.dup = bool(flags & 0x08)
        p.qos = (flags >> 1) & 3
        p.retain = bool(flags & 1)
        if p.qos == 3:
            raise MalformedError("PUBLISH with QoS 3 from broker")
        p.topic = r.string()
        if p.qos:
            p.pid = r.u16()
        if v5:
            p.props = decode_props(r)
        p.payload = r.rest()
    elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        p.pid = r.u16()
        p.rc = 0
        if v5 and r.remaining():
            p.rc = r.u8()
            if r.remaining():
                p.props = decode_props(r)
    elif ptype == SUBACK:
        p.pid = r.u16()
        if v5:
            p.props = decode_props(r)
        p.codes = list(r.rest())
    elif ptype == UNSUBACK:
        p.pid = r.u16()
        if v5:
            p.props = decode_props(r)
            p.codes = list(r.rest())
    elif ptype == PINGRESP:
        pass
    elif ptype in (DISCONNECT, AUTH):
        p.rc = 0
        if r.remaining():
            p.rc = r.u8()
            if r.remaining():
                p.props = decode_props(r)
    else:
        raise MalformedError(f"broker sent a client-only packet type {ptype}")
    if r.remaining():
        raise MalformedError(f"{p.name}: {r.remaining()} trailing bytes")
    return p


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------
_ids = itertools.count(1)


def uid(prefix="raw"):
    """A client id / topic component unique within this test run."""
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


def fill_from_socket(conn, deadline):
    """Read more bytes from conn.sock into conn.buf (objects with sock, buf, eof). Returns
    False on EOF (and sets conn.eof); raises Timeout at the deadline."""
    if conn.eof:
        return False
    left = deadline - time.monotonic()
    if left <= 0:
        raise Timeout("timed out waiting for data")
    conn.sock.settimeout(left)
    try:
        chunk = conn.sock.recv(65536)
    except socket.timeout:
        raise Timeout("timed out waiting for data") from None
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        chunk = b""
    if not chunk:
        conn.eof = True
        return False
    conn.buf += chunk
    return True


class Client:
    """One TCP connection. Every read has a deadline; nothing blocks forever."""

    def __init__(self, host, port, version=V311, timeout=5.0):
        self.version = version
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False
        self.connack = None
        # PUBLISHes that arrived while an acknowledgement was awaited (the order of our own
        # acks and messages routed back to us is not specified); recv() returns them first.
        self.stash = []

    @classmethod
    def to(cls, broker, version=V311, timeout=5.0):
        return cls(broker.host, broker.port, version, timeout)

    # -- raw I/O ---------------------------------------------------------------------------
    def send(self, data):
        self.sock.sendall(data)

    def try_send(self, data):
        """Send, tolerating a connection the broker has already closed. Returns success."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _fill(self, deadline):
        return fill_from_socket(self, deadline)

    def _try_parse(self):
        """Pop one complete packet from the buffer, or None if incomplete."""
        if len(self.buf) < 2:
            return None
        try:
            length, pos = decode_varint(self.buf, 1)
        except MalformedError as e:
            if len(self.buf) >= 5:
                raise
            if "truncated" in str(e):
                return None
            raise
        if len(self.buf) < pos + length:
            return None
        raw = bytes(self.buf[:pos + length])
        del self.buf[:pos + length]
        return decode(raw[0], raw[pos:], self.version, raw)

    def recv(self, timeout=None):
        """Next packet. Raises Timeout if none within `timeout`, Closed on EOF."""
        if self.stash:
            return self.stash.pop(0)
        return self.recv_wire(timeout)

    def recv_wire(self, timeout=None):
        """Next packet from the socket, ignoring the stash."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            p = self._try_parse()
            if p is not None:
                return p
            if not self._fill(deadline):
                raise Closed(f"connection closed (unparsed bytes: {bytes(self.buf).hex(' ')})")

    def expect(self, ptype, timeout=None):
        p = self.recv(timeout)
        assert p.type == ptype, f"expected {TYPE_NAMES[ptype]}, got {p!r}"
        return p

    def expect_ack(self, ptype, timeout=None):
        """Next non-PUBLISH packet from the socket, which must be `ptype`; PUBLISHes that
        arrive first are kept in the stash for later recv() calls."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for _ in range(10000):
            p = self.recv_wire(max(0.001, deadline - time.monotonic()))
            if p.type == PUBLISH and ptype != PUBLISH:
                self.stash.append(p)
                continue
            assert p.type == ptype, f"expected {TYPE_NAMES[ptype]}, got {p!r}"
            return p
        raise AssertionError("too many PUBLISH packets while waiting for an ack")

    def recv_until(self, pred, timeout=None, limit=10000):
        """Read packets until pred(packet) is true; returns (matching packet, skipped list)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        skipped = []
        for _ in range(limit):
            p = self.recv(max(0.0, deadline - time.monotonic()) or 0.001)
            if pred(p):
                return p, skipped
            skipped.append(p)
        raise AssertionError(f"no matching packet within {limit} packets: {skipped!r}")

    def collect(self, duration, limit=10000):
        """All packets that arrive within `duration` seconds (stops early on EOF)."""
        deadline = time.monotonic() + duration
        out = []
        for _ in range(limit):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                out.append(self.recv(left))
            except (Timeout, Closed):
                break
        return out

    def assert_silent(self, duration=0.3):
        """Nothing arrives within `duration` seconds."""
        got = self.collect(duration)
        assert not got, f"unexpected packets: {got!r}"

    def wait_closed(self, timeout=5.0, limit=10000):
        """Read until the broker closes the socket. Returns (packets received, closed?)."""
        deadline = time.monotonic() + timeout
        out = []
        for _ in range(limit):
            try:
                out.append(self.recv(max(0.001, deadline - time.monotonic())))
            except Closed:
                return out, True
            except Timeout:
                return out, False
            except MalformedError:
                return out, self.eof
        return out, False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self):
        """Close abruptly (RST) without sending DISCONNECT."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    # -- conveniences ----------------------------------------------------------------------
    def connect(self, client_id, expect_rc=0, **kw):
        """Send CONNECT and return the CONNACK (asserting its return / reason code)."""
        self.send(connect(client_id, version=self.version, **kw))
        p = self.expect(CONNACK)
        if expect_rc is not None:
            assert p.rc == expect_rc, f"CONNACK rc {p.rc:#x} != {expect_rc:#x}: {p!r}"
        self.connack = p
        return p

    def subscribe(self, filters, pid=1, properties=None):
        """`filters`: list of (filter, options) or a single filter string (QoS 0).
        Returns the SUBACK."""
        if isinstance(filters, str):
            filters = [(filters, 0)]
        self.send(subscribe(pid, filters, self.version, properties))
        p = self.expect_ack(SUBACK)
        assert p.pid == pid, p
        return p

    def unsubscribe(self, filters, pid=1, properties=None):
        self.send(unsubscribe(pid, filters, self.version, properties))
        p = self.expect_ack(UNSUBACK)
        assert p.pid == pid, p
        return p

    def publish(self, topic, payload=b"", qos=0, pid=None, retain=False, dup=False,
                properties=None, complete=True):
        """Send a PUBLISH. With complete=True, run the QoS 1/2 handshake and return the final
        ack packet (PUBACK or PUBCOMP; for QoS 2 the PUBREC is in `.pubrec`)."""
        if qos and pid is None:
            pid = 1
        self.send(publish(topic, payload, qos, pid, retain, dup, self.version, properties))
        if not complete or qos == 0:
            return None
        if qos == 1:
            p = self.expect_ack(PUBACK)
            assert p.pid == pid, p
            return p
        rec = self.expect_ack(PUBREC)
        assert rec.pid == pid, rec
        if rec.rc is not None and rec.rc >= 0x80:
            return rec
        self.send(pubrel(pid, self.version))
        comp = self.expect_ack(PUBCOMP)
        assert comp.pid == pid, comp
        comp.pubrec = rec
        return comp

    def ack_publish(self, p):
        """Acknowledge a received PUBLISH completely (QoS 1 PUBACK, QoS 2 PUBREC+PUBCOMP)."""
        if p.qos == 1:
            self.send(puback(p.pid, self.version))
        elif p.qos == 2:
            self.send(pubrec(p.pid, self.version))
            rel = self.expect_ack(PUBREL)
            assert rel.pid == p.pid, rel
            self.send(pubcomp(p.pid, self.version))

    def ping(self, timeout=None):
        self.send(pingreq())
        return self.expect_ack(PINGRESP, timeout)

    def disconnect(self, rc=None, properties=None):
        self.try_send(disconnect(self.version, rc, properties))
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connected(broker, client_id=None, version=V311, **kw):
    """A Client that has completed CONNECT/CONNACK (rc 0)."""
    c = Client.to(broker, version)
    c.connect(client_id or uid("c"), **kw)
    return c


def check_broker_serves(broker, bystander=None, bystander_topic=None, version=V311):
    """A fresh well-behaved client can connect, publish at QoS 1 and receive its message; an
    optional `bystander` (connected earlier, subscribed to `bystander_topic` at QoS 0) also
    still receives. Raises AssertionError otherwise."""
    topic = bystander_topic or f"health/{uid('t')}"
    with connected(broker, uid("health"), version) as c:
        sub = c.subscribe([(topic, 1)])
        assert sub.codes == [1], sub
        ack_ = c.publish(topic, b"alive", qos=1, pid=11)
        assert ack_.rc in (0, None), ack_
        got, _ = c.recv_until(lambda p: p.type == PUBLISH, timeout=5)
        assert got.topic == topic and got.payload == b"alive", got
        if got.qos:
            c.ack_publish(got)
        c.disconnect()
    if bystander is not None:
        got, _ = bystander.recv_until(lambda p: p.type == PUBLISH, timeout=5)
        assert got.topic == topic and got.payload == b"alive", got
