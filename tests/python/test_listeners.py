"""Named listeners (docs/configuration.md, Listeners): several listeners at once, each with
its own authentication, ACL mode, mount point and limits, against the real broker with paho
clients, for 3.1.1 and 5.0.

The base broker of conftest has the anonymous `tcp` listener; each test adds its own named
ones on port 0 and finds them in the ready line (`NAME=ADDR:PORT`).
"""
import os
import signal
import subprocess
import time
import types
import urllib.request

import pytest

from conftest import ROOT, TERN_BIN, gen_certs
from pahoutil import V311, V5, closed_by_server
from test_auth import tern_passwd

VERSIONS = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]


def pick(version, v311, v5):
    return v5 if version == V5 else v311


def metric(b, name):
    """The sum of the samples of `name` (with its label set written out, e.g.
    'x{listener="devices",reason="auth"}') on b's metrics port; 0 when absent."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=5).read()
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or (("{" not in name) and line.startswith(name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def at(b, name):
    """A stand-in broker for paho clients: listener `name` of broker b."""
    return types.SimpleNamespace(host=b.listeners[name].host, port=b.listeners[name].port)


@pytest.fixture
def fleet(make_broker, tmp_path):
    """A broker with the anonymous `tcp` listener for services and a `devices` listener with
    a password file, no anonymous clients, mount point `fleet/` and a small packet limit."""
    passwd = tmp_path / "passwd"
    tern_passwd(passwd, "d1", "pw1")
    extra = """
[listeners.devices]
kind = "tcp"
bind = "127.0.0.1:0"
mount_point = "fleet/"
[listeners.devices.auth]
allow_anonymous = false
[listeners.devices.limits]
max_packet_size = 2048
"""
    return make_broker({"auth": {"allow_anonymous": True, "password_file": str(passwd)}},
                       extra=extra)


@pytest.mark.parametrize("version", VERSIONS)
def test_each_listener_has_its_own_rules_and_the_mount_point_joins_them(fleet, mkc, version):
    b = fleet
    assert set(b.listeners) == {"tcp", "devices"}, b.listeners
    dev_at = at(b, "devices")
    # Anonymous: fine on tcp, refused on devices (3.1.1 rc 5, v5 0x87).
    anon = mkc("anon", version, broker=dev_at)
    anon.connect(expect_rc=0x87)  # paho reports 3.1.1 rc 5 as 0x87 too
    service = mkc("svc", version, broker=b)
    service.connect()
    assert service.subscribe("fleet/d1/#", 1) == [1]
    device = mkc("d1", version, broker=dev_at, username="d1", password="pw1")
    device.connect()
    assert device.subscribe("cmd/#", 1) == [1]
    # The device's topics are under the mount point for everyone else...
    device.publish("d1/temp", b"21.5", qos=1)
    m = service.get()
    assert (m.topic, m.payload) == ("fleet/d1/temp", b"21.5")
    # ...and what is published under it reaches the device without the prefix.
    service.publish("fleet/cmd/reboot", b"now", qos=1)
    m = device.get()
    assert (m.topic, m.payload) == ("cmd/reboot", b"now")
    # A message outside the mount point never reaches a device subscribed inside it.
    service.publish("cmd/reboot", b"not-for-the-fleet", qos=1)
    device.expect_none(0.3)
    # The devices listener's own packet limit: a 4 KiB publish is too large there (v5 0x95
    # DISCONNECT; 3.1.1 the connection is closed), not on tcp.
    service.publish("fleet/d1/big", b"x" * 4096, qos=1)
    assert service.get().payload == b"x" * 4096
    device.publish("big", b"y" * 4096, qos=0, wait=False)
    assert closed_by_server(device, 5) == pick(version, None, 0x95)
    assert metric(b, 'tern_listener_connections_refused_total{listener="devices",reason="auth"}') == 1
    assert metric(b, 'tern_listener_connections_refused_total{listener="tcp",reason="auth"}') == 0
    log = b.log()
    assert 'listener="devices"' in log and 'listener="tcp"' in log


@pytest.mark.parametrize("version", VERSIONS)
def test_per_message_acl_mode_grants_the_subscribe_and_filters_deliveries(
        make_broker, mkc, tmp_path, version):
    """Mosquitto's behaviour on the `legacy` listener (acl_mode = "per_message"): `#` from a
    client allowed `read devices/#` is granted and gets the devices/ messages only; on `tcp`
    (acl_mode "subscribe", the default) the same SUBSCRIBE is refused."""
    passwd = tmp_path / "passwd"
    tern_passwd(passwd, "alice", "pw")
    tern_passwd(passwd, "svc", "pw")
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic read devices/#\nuser svc\ntopic readwrite #\n")
    extra = """
[listeners.legacy]
kind = "tcp"
bind = "127.0.0.1:0"
[listeners.legacy.auth]
acl_mode = "per_message"
"""
    b = make_broker({"auth": {"allow_anonymous": False, "password_file": str(passwd),
                              "acl_file": str(acl)}}, extra=extra)
    strict = mkc("strict", version, broker=b, username="alice", password="pw")
    strict.connect()
    assert strict.subscribe("#", 1) == [pick(version, 0x80, 0x87)]
    legacy = mkc("legacy", version, broker=at(b, "legacy"), username="alice", password="pw")
    legacy.connect()
    assert legacy.subscribe("#", 1) == [1]
    svc = mkc("svc", version, broker=b, username="svc", password="pw")
    svc.connect()
    svc.publish("other/x", b"secret", qos=1)
    svc.publish("devices/d1", b"reading", qos=1)
    m = legacy.get()
    assert (m.topic, m.payload) == ("devices/d1", b"reading")
    legacy.expect_none(0.3)


def test_a_listener_needs_a_kind_and_old_configs_pass_check(tmp_path):
    def check(text, env=None):
        p = tmp_path / "t.toml"
        p.write_text(text)
        return subprocess.run([TERN_BIN, "--config", str(p), "check"], capture_output=True,
                              text=True, timeout=30, env=env)

    r = check('[listeners.internal]\nbind = "127.0.0.1:1883"\n')
    assert r.returncode == 2 and "listeners.internal.kind" in r.stderr, r.stderr
    r = check('[listeners.internal]\nkind = "tcp"\nbind = "127.0.0.1:1883"\ncert = "x.pem"\n')
    assert r.returncode == 2 and "listeners.internal.cert" in r.stderr, r.stderr
    # Configurations written for one listener of each kind still mean what they meant.
    r = subprocess.run([TERN_BIN, "--config", os.path.join(ROOT, "config", "default.toml"),
                        "check"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    old = f"""
[listeners.tcp]
bind = "127.0.0.1:1883"
[listeners.ws]
bind = "127.0.0.1:8080"
path = "/mqtt"
allowed_origins = ["https://app.example.com"]
[listeners.tls]
bind = "127.0.0.1:8883"
cert = "{tmp_path}/server.pem"
key = "{tmp_path}/server.key"
client_ca = "{tmp_path}/ca.pem"
require_client_cert = true
"""
    gen_certs(tmp_path)
    r = check(old)
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, TERN__LISTENERS__TCP__BIND="127.0.0.1:1999")
    r = check("", env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("version", VERSIONS)
def test_a_reload_changes_a_listeners_auth_and_limits_but_not_its_mount_point(
        make_broker, mkc, version):
    extra_before = """
[listeners.devices]
kind = "tcp"
bind = "127.0.0.1:0"
mount_point = "fleet/"
[listeners.devices.auth]
allow_anonymous = false
"""
    b = make_broker({}, extra=extra_before)
    dev_at = at(b, "devices")
    mkc("before", version, broker=dev_at).connect(expect_rc=0x87)  # paho reports 3.1.1 rc 5 as 0x87 too
    with open(b.config_path) as f:
        text = f.read()
    text = text.replace('allow_anonymous = false\n', 'allow_anonymous = true\n', 1)
    text = text.replace('mount_point = "fleet/"', 'mount_point = "other/"', 1)
    with open(b.config_path, "w") as f:
        f.write(text)
    b.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 10
    while "configuration reloaded" not in b.log() and time.time() < deadline:
        time.sleep(0.05)
    log = b.log()
    assert "listeners.devices.auth.allow_anonymous false -> true" in log, log
    assert "listeners.devices.mount_point" in log and "after a restart" in log, log
    svc = mkc("svc", version, broker=b)
    svc.connect()
    assert svc.subscribe("fleet/#", 1) == [1]
    after = mkc("after", version, broker=dev_at)
    after.connect()
    after.publish("x", b"still fleet/", qos=1)
    assert svc.get().topic == "fleet/x"


def proxy_v2(src, dst):
    """A PROXY protocol v2 header (PROXY command, TCP over IPv4) naming src as the client."""
    import ipaddress
    import struct
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    addrs = (ipaddress.IPv4Address(src[0]).packed + ipaddress.IPv4Address(dst[0]).packed
             + struct.pack("!HH", src[1], dst[1]))
    return sig + bytes([0x21, 0x11]) + struct.pack("!H", len(addrs)) + addrs


@pytest.mark.parametrize("header", ["v1", "v2", "v2-in-one-segment-with-connect", "none"])
def test_proxy_protocol_names_the_client_behind_the_load_balancer(make_broker, header):
    """`proxy_protocol = true`: the address in the header (here 127.8.9.10:5555, a loopback
    address as the rules of the house ask) is the client's in the log; a connection that
    starts with MQTT instead of a header is closed and counted."""
    import mqttraw
    b = make_broker({}, extra='[listeners.lb]\nkind = "tcp"\nbind = "127.0.0.1:0"\n'
                                'proxy_protocol = true\n')
    lb = b.listeners["lb"]
    c = mqttraw.Client(lb.host, lb.port, mqttraw.V311)
    cid = f"behind-lb-{header}"
    if header == "v1":
        c.send(f"PROXY TCP4 127.8.9.10 127.0.0.1 5555 {lb.port}\r\n".encode())
    elif header.startswith("v2"):
        h = proxy_v2(("127.8.9.10", 5555), ("127.0.0.1", lb.port))
        if header == "v2":
            c.send(h)
        else:
            # The header and CONNECT in one write: the broker must not read past the header.
            c.send(h + mqttraw.connect(cid, version=mqttraw.V311))
            assert c.expect(mqttraw.CONNACK).rc == 0
    if header == "none":
        c.send(mqttraw.connect(cid, version=mqttraw.V311))
        _, closed = c.wait_closed(5)
        assert closed
        deadline = time.time() + 5
        while time.time() < deadline and metric(
                b, 'tern_listener_connections_refused_total{listener="lb",reason="proxy_header"}') < 1:
            time.sleep(0.05)
        assert metric(
            b, 'tern_listener_connections_refused_total{listener="lb",reason="proxy_header"}') == 1
        assert "no valid PROXY protocol header" in b.log()
        return
    if header != "v2-in-one-segment-with-connect":
        c.connect(cid)
    deadline = time.time() + 5
    line = ""
    while time.time() < deadline:
        line = next((l for l in b.log().splitlines()
                     if "client connected" in l and cid in l), "")
        if line:
            break
        time.sleep(0.05)
    assert "127.8.9.10:5555" in line and 'listener="lb"' in line, line
    c.close()


def test_a_listeners_own_connection_limit_closes_only_its_door(make_broker, mkc):
    """`[listeners.NAME.limits] max_connections = 2`: a third connection there is closed at
    accept and counted for that listener; the other listener still takes clients."""
    import mqttraw
    b = make_broker({}, extra='[listeners.small]\nkind = "tcp"\nbind = "127.0.0.1:0"\n'
                                '[listeners.small.limits]\nmax_connections = 2\n')
    small = b.listeners["small"]
    held = [mqttraw.Client(small.host, small.port, mqttraw.V311) for _ in range(2)]
    for i, c in enumerate(held):
        c.connect(f"small-{i}")
    third = mqttraw.Client(small.host, small.port, mqttraw.V311)
    third.try_send(mqttraw.connect("small-2", version=mqttraw.V311))
    _, closed = third.wait_closed(5)
    assert closed
    assert metric(b, 'tern_listener_connections_refused_total{listener="small",'
                     'reason="max_connections"}') == 1
    other = mkc("elsewhere", V5, broker=b)
    other.connect()
    # A place frees when a connection on the listener ends.
    held[0].close()
    deadline = time.time() + 5
    while True:
        again = mqttraw.Client(small.host, small.port, mqttraw.V311)
        again.try_send(mqttraw.connect("small-3", version=mqttraw.V311))
        try:
            assert again.expect(mqttraw.CONNACK).rc == 0
            break
        except AssertionError:
            again.close()
            assert time.time() < deadline, "the freed place was never given back"
            time.sleep(0.1)
    again.close()
    held[1].close()
