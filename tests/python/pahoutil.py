"""Small helpers around paho-mqtt 2.x for the Tern library-client tests.

Every wait is bounded (TIMEOUT seconds unless told otherwise). Each TClient runs paho's network
loop in a background thread (loop_start) with reconnect_on_failure=False, so a connection the
broker closes stays closed and is observable through `disconnects`.
"""
import queue
import re
import socket
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

TIMEOUT = 5.0
# Session Expiry Interval of a 5.0 `persistent` client: long enough to outlive any test.
SESSION_EXPIRY = 300
V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5
V31 = mqtt.MQTTv31

__all__ = [
    "TIMEOUT", "SESSION_EXPIRY", "V311", "V5", "V31", "TClient", "ClientFactory", "Properties",
    "PacketTypes", "ReasonCode", "SubscribeOptions", "props", "metric", "mqtt", "Will",
    "disconnect_reason", "split_packets",
]


def props(packet_type, **kw):
    """Properties(packet_type) with the given attributes set, e.g. props(PacketTypes.CONNECT,
    SessionExpiryInterval=60). UserProperty may be a list of (key, value) pairs."""
    p = Properties(packet_type)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def metric(broker, name, labels=None):
    """Value of a Prometheus sample from the broker's /metrics endpoint (0.0 when absent)."""
    url = f"http://127.0.0.1:{broker.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        text = resp.read().decode("utf-8")
    want = {}
    if labels:
        want = dict(labels)
    total = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in want.items()):
            total = (total or 0.0) + float(m.group(4))
    return total if total is not None else 0.0


_PUBLISH_LOG = re.compile(r"Received PUBLISH \(d(\d), q(\d), r(\d), m(\d+)\), '(.*?)', ")


def disconnect_reason(packets):
    """The reason code of the DISCONNECT among `packets` (from TClient.read_until_close) that the
    broker sent before closing; None if it sent none (3.1.1 has no DISCONNECT from the server).
    PINGRESPs to a PINGREQ paho sent before it was paused are skipped."""
    rest = [(first, body) for first, body in packets if first != 0xD0]
    if not rest:
        return None
    first, body = rest[0]
    assert first == 0xE0 and len(body) >= 1, packets
    return body[0]


def split_packets(data):
    """Split raw MQTT bytes into [(first byte, body)]; a truncated tail is returned as
    (None, rest)."""
    out = []
    i = 0
    while i < len(data):
        first = data[i]
        j = i + 1
        length, mult = 0, 1
        while True:
            if j >= len(data):
                return out + [(None, data[i:])]
            b = data[j]
            j += 1
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        if j + length > len(data):
            return out + [(None, data[i:])]
        out.append((first, data[j:j + length]))
        i = j + length
    return out


class Will:
    def __init__(self, topic, payload=b"", qos=0, retain=False, properties=None):
        self.topic, self.payload, self.qos, self.retain, self.properties = (
            topic, payload, qos, retain, properties)


class TClient:
    """A paho client with queues for everything the broker sends back.

    persistent=True: a session that outlives the connection and is resumed on reconnect, in
    either version: 3.1.1 CleanSession=0; 5.0 Clean Start=0 with a Session Expiry Interval of
    SESSION_EXPIRY (unless connect() is given clean_start / properties)."""

    def __init__(self, broker, client_id, protocol=V5, clean_session=True, manual_ack=False,
                 username=None, password=None, persistent=False):
        self.broker = broker
        self.client_id = client_id
        self.protocol = protocol
        self.persistent = persistent
        kwargs = dict(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=False,
            manual_ack=manual_ack,
        )
        if protocol != V5:
            kwargs["clean_session"] = clean_session and not persistent
        self.c = mqtt.Client(**kwargs)
        self.c.max_inflight_messages_set(100)
        # The broker, not paho, must judge topic filters: let invalid ones through.
        self.c._filter_wildcard_len_check = lambda sub: mqtt.MQTT_ERR_SUCCESS
        if username is not None:
            self.c.username_pw_set(username, password)
        self.messages = queue.Queue()
        self.connacks = queue.Queue()
        self.disconnects = queue.Queue()
        self.log_lines = []
        self._lock = threading.Condition()
        self._subacks = {}
        self._unsubacks = {}
        self._pubacks = {}
        self.puback_order = []
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_publish = self._on_publish
        self.c.on_log = self._on_log
        # paho 2.1 only decodes a DISCONNECT reason code when the packet also carries properties
        # (remaining length > 2), so a minimal "e0 01 8e" is reported as 0x00. Record the raw
        # variable header of a server DISCONNECT and take the reason code from there.
        self.server_disconnect = None
        orig_handle_disconnect = self.c._handle_disconnect

        def handle_disconnect():
            self.server_disconnect = bytes(self.c._in_packet["packet"])
            return orig_handle_disconnect()

        self.c._handle_disconnect = handle_disconnect
        self.started = False

    # ---- callbacks (network thread) ----
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connacks.put((reason_code, flags, properties))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if flags.is_disconnect_packet_from_server and self.server_disconnect is not None:
            raw = self.server_disconnect
            reason_code = ReasonCode(PacketTypes.DISCONNECT, identifier=raw[0] if raw else 0)
        self.disconnects.put((reason_code, flags, properties, time.monotonic()))

    def _on_message(self, client, userdata, message):
        self.messages.put(message)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._lock:
            self._subacks[mid] = [rc.value for rc in reason_codes]
            self._lock.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        with self._lock:
            self._unsubacks[mid] = [rc.value for rc in reason_codes]
            self._lock.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._lock:
            self._pubacks[mid] = reason_code.value if reason_code is not None else None
            self.puback_order.append(mid)
            self._lock.notify_all()

    def _on_log(self, client, userdata, level, buf):
        self.log_lines.append(buf)

    def wire_publishes(self):
        """(topic, qos, dup, mid) of every PUBLISH received, in wire order (from paho's log; paho
        hands QoS 2 messages to on_message only at PUBREL, so on_message order can differ)."""
        out = []
        for line in list(self.log_lines):
            m = _PUBLISH_LOG.match(line)
            if m:
                out.append((m.group(5), int(m.group(2)), m.group(1) == "1", int(m.group(4))))
        return out

    def _wait_for(self, table, mid, timeout):
        deadline = time.monotonic() + timeout
        with self._lock:
            while mid not in table:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.client_id}: no acknowledgement for mid {mid}")
                self._lock.wait(left)
            return table.pop(mid)

    # ---- operations ----
    def connect(self, clean_start=None, keepalive=60, properties=None, will=None,
                expect_rc=0, timeout=TIMEOUT):
        """Connect and wait for the CONNACK; returns (reason_code_value, session_present, props).
        clean_start (5.0) defaults to not persistent."""
        if will is not None:
            self.c.will_set(will.topic, will.payload, will.qos, will.retain, will.properties)
        kw = dict(keepalive=keepalive)
        if self.protocol == V5:
            kw["clean_start"] = not self.persistent if clean_start is None else clean_start
            if properties is None and self.persistent:
                properties = props(PacketTypes.CONNECT, SessionExpiryInterval=SESSION_EXPIRY)
            kw["properties"] = properties
        self.c.connect(self.broker.host, self.broker.port, **kw)
        self.c.loop_start()
        self.started = True
        try:
            rc, flags, cprops = self.connacks.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: no CONNACK within {timeout}s")
        if expect_rc is not None:
            assert rc.value == expect_rc, f"{self.client_id}: CONNACK {rc} ({rc.value:#x})"
        return rc.value, flags.session_present, cprops

    def subscribe(self, topic, qos=0, options=None, properties=None, timeout=TIMEOUT):
        """Subscribe and wait for the SUBACK; returns the list of reason code values."""
        if isinstance(topic, list):
            rc, mid = self.c.subscribe(topic, properties=properties)
        elif options is not None:
            rc, mid = self.c.subscribe(topic, options=options, properties=properties)
        else:
            rc, mid = self.c.subscribe(topic, qos, properties=properties)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        return self._wait_for(self._subacks, mid, timeout)

    def unsubscribe(self, topic, properties=None, timeout=TIMEOUT):
        rc, mid = self.c.unsubscribe(topic, properties=properties)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        return self._wait_for(self._unsubacks, mid, timeout)

    def publish(self, topic, payload=b"", qos=0, retain=False, properties=None, wait=True,
                timeout=TIMEOUT, closes=False):
        """Publish; with wait=True wait for the handshake to finish and return the reason code
        value of the PUBACK / PUBCOMP (None for QoS 0). With wait=False return the mid.
        closes=True: this PUBLISH makes the broker close the connection. The broker can read it
        and close before paho's publish() returns, whose network thread then reports "not
        connected" for a packet that was written: that is accepted then."""
        info = self.c.publish(topic, payload, qos, retain, properties)
        ok = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN) if closes else (mqtt.MQTT_ERR_SUCCESS,)
        assert info.rc in ok, info.rc
        if not wait:
            return info.mid
        return self._wait_for(self._pubacks, info.mid, timeout)

    def wait_published(self, mid, timeout=TIMEOUT):
        return self._wait_for(self._pubacks, mid, timeout)

    def get(self, timeout=TIMEOUT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: expected a message within {timeout}s")

    def get_n(self, n, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            left = deadline - time.monotonic()
            try:
                out.append(self.messages.get(timeout=max(left, 0.001)))
            except queue.Empty:
                raise AssertionError(
                    f"{self.client_id}: expected {n} messages, got {len(out)}: "
                    f"{[(m.topic, m.payload) for m in out]}")
        return out

    def expect_none(self, wait=0.5):
        """Assert that no message arrives within `wait` seconds."""
        try:
            m = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(
            f"{self.client_id}: unexpected message {m.topic!r} {m.payload!r} qos={m.qos} "
            f"retain={m.retain}")

    def drain(self, wait=0.3):
        out = []
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                return out

    def wait_disconnect(self, timeout=TIMEOUT):
        try:
            return self.disconnects.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: still connected after {timeout}s")

    def disconnect(self, reasoncode=None, properties=None, timeout=TIMEOUT):
        """Normal DISCONNECT; waits until paho has closed the connection."""
        self.c.disconnect(reasoncode=reasoncode, properties=properties)
        self.wait_disconnect(timeout)
        self._stop_loop()

    def drop(self, timeout=TIMEOUT):
        """Abnormal close: shut the TCP connection down without sending DISCONNECT."""
        sock = self.c.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.wait_disconnect(timeout)
        self._stop_loop()

    def pause(self):
        """Stop paho's network loop (no more reads, writes or PINGREQs); the socket stays open."""
        self._stop_loop()

    def send_batched(self, fn):
        """Stop the network loop, let `fn` issue paho calls whose packets are collected instead of
        written, then write them all at once. Afterwards the socket belongs to the test (use
        read_until_close)."""
        self.pause()
        real = self.c.socket()
        buf = bytearray()

        class Collect:
            def send(self, data):
                buf.extend(data)
                return len(data)

            def __getattr__(self, name):
                return getattr(real, name)

        self.c._sock = Collect()
        try:
            fn()
        finally:
            self.c._sock = real
        real.setblocking(True)
        real.settimeout(TIMEOUT)
        real.sendall(bytes(buf))

    def read_until_close(self, timeout=6.0):
        """After pause()/send_batched(): read raw bytes until the broker closes the connection.
        Returns (packets, seconds until close or None). packets: [(first byte, body bytes)]."""
        sock = self.c.socket()
        sock.setblocking(True)
        sock.settimeout(timeout)
        t0 = time.monotonic()
        data = b""
        closed = None
        while time.monotonic() - t0 < timeout:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except OSError:
                chunk = b""
            if not chunk:
                closed = time.monotonic() - t0
                break
            data += chunk
        return split_packets(data), closed

    def _stop_loop(self, timeout=3.0):
        t = self.c._thread
        self.c._thread_terminate = True
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self.c._thread = None
        self.started = False

    def close(self):
        """Best-effort teardown used by the fixtures."""
        try:
            if self.c.is_connected():
                self.c.disconnect()
                try:
                    self.disconnects.get(timeout=1.0)
                except queue.Empty:
                    pass
        except Exception:
            pass
        try:
            self._stop_loop(timeout=2.0)
        except Exception:
            pass
        try:
            sock = self.c.socket()
            if sock is not None:
                sock.close()
        except Exception:
            pass


class ClientFactory:
    """Creates TClients with unique ids derived from the test name and closes them at the end."""

    def __init__(self, broker, prefix):
        self.broker = broker
        self.prefix = re.sub(r"[^A-Za-z0-9_-]", "_", prefix)[-40:]
        self.clients = []
        self.counter = 0

    def __call__(self, name, protocol=V5, broker=None, **kw):
        c = TClient(broker or self.broker, f"{self.prefix}-{name}", protocol=protocol, **kw)
        self.clients.append(c)
        return c

    def again(self, old, **kw):
        """A new client with the same ClientId (protocol and persistence) as `old`."""
        kw.setdefault("protocol", old.protocol)
        kw.setdefault("persistent", old.persistent)
        c = TClient(old.broker, old.client_id, **kw)
        self.clients.append(c)
        return c

    def close(self):
        for c in self.clients:
            c.close()


def closed_by_server(c, timeout):
    """Waits until c's connection ends; the reason code of the broker's DISCONNECT, or None
    when the broker just closed the connection (all it can do in 3.1.1)."""
    reason, flags, _, _ = c.wait_disconnect(timeout)
    return reason.value if flags.is_disconnect_packet_from_server else None


def take_all(c):
    """The messages c has received so far, without waiting."""
    out = []
    while True:
        try:
            out.append(c.messages.get_nowait())
        except queue.Empty:
            return out
