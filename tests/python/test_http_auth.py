"""The HTTP authentication backend (`[auth.http]`, docs/security.md): a real broker asking a
real HTTP service on 127.0.0.1, with paho and raw clients, for 3.1.1 and 5.0.

The service here is Python's own http.server: it decides CONNECT by password and topics by
prefix, and can hold a request until the test lets it go, so "while the service is slow"
is an order of events, not a time.
"""
import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import mqttraw
from pahoutil import V311, V5

VERSIONS = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]


def pick(version, v311, v5):
    return v5 if version == V5 else v311


class Service:
    """The authentication service: `good` passwords pass, `slow` ones wait for `release`;
    topics under `allowed/` may be published and subscribed to. Every request is recorded,
    with its body, in `events` (shared with the test, in order)."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.bodies = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                service.bodies.append((self.path, body))
                ok = False
                if self.path == "/connect":
                    if body.get("password") == "slow":
                        service.event("slow arrived")
                        service.release.wait(10)
                        service.event("slow answered")
                        ok = True
                    else:
                        ok = body.get("password") == "good"
                elif self.path == "/acl":
                    if body["topic"].startswith("slowacl/"):
                        service.event("acl arrived")
                        service.release.wait(10)
                        service.event("acl answered")
                    ok = body["topic"].startswith(("allowed/", "slowacl/"))
                status = 200 if ok else 403
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def event(self, what):
        with self.lock:
            self.events.append(what)

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service():
    s = Service()
    yield s
    s.close()


def http_broker(make_broker, connect_url, acl_url=None, timeout="5s"):
    """A broker whose `svc` listener asks the service (chain ["http"]); `tcp` stays
    anonymous."""
    http = {"connect_url": connect_url, "timeout": timeout}
    if acl_url:
        http["acl_url"] = acl_url
    extra = '[listeners.svc]\nkind = "tcp"\nbind = "127.0.0.1:0"\n' \
            '[listeners.svc.auth]\nchain = ["http"]\n'
    return make_broker({"auth.http": http}, extra=extra)


def metric(b, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=5).read()
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("version", VERSIONS)
def test_the_service_decides_connect_publish_subscribe_and_the_will(
        make_broker, mkc, service, version):
    url = f"http://127.0.0.1:{service.port}"
    b = http_broker(make_broker, url + "/connect", url + "/acl")
    svc = b.listeners["svc"]
    # CONNECT: 2xx lets in, 403 refuses (3.1.1 rc 4 / v5 0x86), with every field in the body.
    raw = mqttraw.Client(svc.host, svc.port, version)
    raw.connect("refused", expect_rc=pick(version, 4, 0x86), username="u", password=b"bad")
    raw.close()
    _, body = next((p, bd) for p, bd in service.bodies if bd.get("client_id") == "refused")
    assert body["username"] == "u" and body["password"] == "bad"
    assert body["listener"] == "svc" and body["protocol"] == pick(version, 4, 5)
    assert body["address"].startswith("127.0.0.1:")
    good = mkc("good", version, broker=svc, username="u", password="good")
    good.connect()
    # SUBSCRIBE: each filter asked (mounted form; no mount point here).
    assert good.subscribe([("allowed/#", 1), ("denied/#", 1)]) == [1, pick(version, 0x80, 0x87)]
    # PUBLISH: the allowed topic is delivered, the other refused (v5 0x87; 3.1.1 acknowledged,
    # dropped).
    watcher = mkc("watcher", version, broker=b)
    watcher.connect()
    assert watcher.subscribe("#", 1) == [1]
    good.publish("denied/x", b"no", qos=1)
    good.publish("allowed/x", b"yes", qos=1)
    m = good.get()
    assert (m.topic, m.payload) == ("allowed/x", b"yes")
    m = watcher.get()
    assert (m.topic, m.payload) == ("allowed/x", b"yes"), "denied/x must not be delivered"
    asked = [(bd["action"], bd["topic"]) for p, bd in service.bodies if p == "/acl"]
    assert ("subscribe", "denied/#") in asked and ("publish", "denied/x") in asked
    # The will is a publish too: a will topic the service refuses refuses the CONNECT.
    raw = mqttraw.Client(svc.host, svc.port, version)
    raw.connect("will-refused", expect_rc=pick(version, 5, 0x87), username="u",
                password=b"good", will={"topic": "denied/will", "payload": b"x"})
    raw.close()
    # The anonymous tcp listener never asks the service.
    before = len(service.bodies)
    other = mkc("other", version, broker=b)
    other.connect()
    other.publish("denied/y", b"fine here", qos=1)
    assert len(service.bodies) == before


@pytest.mark.parametrize("version", VERSIONS)
def test_a_v5_publisher_hears_0x87_for_a_refused_topic(make_broker, mkc, service, version):
    url = f"http://127.0.0.1:{service.port}"
    b = http_broker(make_broker, url + "/connect", url + "/acl")
    raw = mqttraw.Client(b.listeners["svc"].host, b.listeners["svc"].port, version)
    raw.connect("pub", username="u", password=b"good")
    raw.send(mqttraw.publish("denied/x", b"no", qos=1, pid=1, version=version))
    ack = raw.expect(mqttraw.PUBACK)
    assert ack.pid == 1 and (ack.rc or 0) == pick(version, 0, 0x87)
    raw.send(mqttraw.publish("allowed/x", b"yes", qos=1, pid=2, version=version))
    ack = raw.expect(mqttraw.PUBACK)
    assert ack.pid == 2 and (ack.rc or 0) in (0, 0x10)
    raw.close()


def twenty_clients_publish(mkc, b, version, events, lock):
    """20 clients on the anonymous listener: CONNECT, PUBLISH QoS 1, PUBACK; each PUBACK is
    an event."""
    for i in range(20):
        c = mkc(f"other{i}", version, broker=b)
        c.connect()
        c.publish(f"t/{i}", b"x", qos=1)  # waits for the PUBACK
        with lock:
            events.append(f"puback {i}")
        c.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_a_slow_service_holds_up_only_the_client_it_is_asked_about(
        make_broker, mkc, service, version):
    url = f"http://127.0.0.1:{service.port}"
    b = http_broker(make_broker, url + "/connect", timeout="8s")
    svc = b.listeners["svc"]
    slow = mqttraw.Client(svc.host, svc.port, version, timeout=10)
    slow.send(mqttraw.connect("slow", version=version, username="u", password=b"slow"))
    deadline = time.time() + 5
    while "slow arrived" not in service.events and time.time() < deadline:
        time.sleep(0.01)
    assert "slow arrived" in service.events
    twenty_clients_publish(mkc, b, version, service.events, service.lock)
    # Every PUBACK came while the slow CONNECT was still with the service.
    assert "slow answered" not in service.events
    service.release.set()
    assert slow.expect(mqttraw.CONNACK).rc == 0
    ev = service.events
    assert ev.index("slow answered") > max(ev.index(f"puback {i}") for i in range(20)), ev
    slow.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_a_dead_service_refuses_within_its_timeout_and_stalls_nobody(make_broker, mkc, version):
    """A service that accepts connections but never answers (a hung process): the client it
    is asked about is refused (fail closed) when `timeout` runs out, as Server unavailable
    (3.1.1 rc 3 / v5 0x88: try again later), not as bad credentials it never judged;
    meanwhile 20 other clients are served."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # never accepted: requests hang in the backlog
    port = hung.getsockname()[1]
    try:
        b = http_broker(make_broker, f"http://127.0.0.1:{port}/connect", timeout="3s")
        svc = b.listeners["svc"]
        events, lock = [], threading.Lock()
        stuck = mqttraw.Client(svc.host, svc.port, version, timeout=10)
        stuck.send(mqttraw.connect("stuck", version=version, username="u", password=b"good"))
        got = {}

        def wait_connack():
            got["p"] = stuck.expect(mqttraw.CONNACK)
            with lock:
                events.append("stuck refused")

        t = threading.Thread(target=wait_connack)
        t.start()
        twenty_clients_publish(mkc, b, version, events, lock)
        t.join(10)
        assert got["p"].rc == pick(version, 3, 0x88)
        assert events.index("stuck refused") > max(events.index(f"puback {i}")
                                                   for i in range(20)), events
        assert metric(b, 'tern_auth_http_checks_total{kind="connect",outcome="timeout"}') >= 1
        # Counted as the service's outage, not as refused credentials.
        assert metric(b, 'tern_connections_refused_total{reason="auth_unavailable"}') == 1
        assert metric(b, 'tern_listener_connections_refused_total{listener="svc",'
                         'reason="auth_unavailable"}') == 1
        assert metric(b, "tern_auth_failures_total") == 0
        stuck.close()
    finally:
        hung.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_a_takeover_while_a_publish_waits_for_the_service_drops_it_unacknowledged(
        make_broker, mkc, service, version):
    """Fault: the connection whose PUBLISH waits for the authorisation service is taken over.
    The old connection ends at once (v5 DISCONNECT 0x8E), its held PUBLISH was never
    acknowledged and is never delivered, not even when the service says yes afterwards; the
    new connection works."""
    url = f"http://127.0.0.1:{service.port}"
    b = http_broker(make_broker, url + "/connect", url + "/acl", timeout="8s")
    svc = b.listeners["svc"]
    watcher = mkc("watcher", version, broker=b)
    watcher.connect()
    assert watcher.subscribe("slowacl/#", 1) == [1]
    old = mqttraw.Client(svc.host, svc.port, version, timeout=10)
    old.connect("twin", username="u", password=b"good")
    old.send(mqttraw.publish("slowacl/x", b"held", qos=1, pid=7, version=version))
    deadline = time.time() + 5
    while "acl arrived" not in service.events and time.time() < deadline:
        time.sleep(0.01)
    assert "acl arrived" in service.events
    new = mqttraw.Client(svc.host, svc.port, version, timeout=10)
    new.connect("twin", username="u", password=b"good")
    packets, closed = old.wait_closed(5)
    assert closed
    assert not any(p.type == mqttraw.PUBACK for p in packets), packets
    if version == V5:
        assert [p.rc for p in packets if p.type == mqttraw.DISCONNECT] == [0x8E], packets
    service.release.set()
    new.send(mqttraw.publish("allowed/after", b"new", qos=1, pid=1, version=version))
    assert new.expect(mqttraw.PUBACK).pid == 1
    watcher.expect_none(0.5)
    new.close()
