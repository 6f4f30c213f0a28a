"""Tern's `[listeners.tls]` listener against real TLS clients: paho-mqtt (Python's ssl / OpenSSL,
TLS 1.3 by default) and mosquitto_pub / mosquitto_sub (libmosquitto, TLS 1.2 by default).

Certificates come from certs/gen.sh (a CA, a server certificate for localhost / 127.0.0.1 and
a client certificate) generated into pytest temporary directories. The TLS port is taken from
the broker's ready line (`... tls=127.0.0.1:PORT`). Every wait is bounded.
"""
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import types

import pytest

import mqttraw
from conftest import cert_paths, gen_certs
from pahoutil import TIMEOUT, V311, V5, TClient, metric

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TLS_READY = re.compile(r"tern: ready .* tls=(\S+):(\d+)")
HANDSHAKES = "tern_tls_handshakes_total"
HAVE_MOSQUITTO = bool(shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub"))
STDBUF = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The main certificate set: CA, server (localhost, 127.0.0.1), client CN=device1."""
    return gen_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    """A second, unrelated CA with its own server and client (CN=device1) certificates."""
    return gen_certs(tmp_path_factory.mktemp("other-certs"))


def tls_port(b):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in list(b.log_lines):
            m = TLS_READY.search(line)
            if m:
                return int(m.group(2))
        time.sleep(0.05)
    raise AssertionError("no tls= in the ready line:\n" + b.log())


def start_tls(make_broker, c, client_ca=False, require_client_cert=None,
              use_identity_as_username=None, extra=None):
    """A broker with TCP, metrics and TLS listeners; b.tls_port is the TLS listener's port and
    b.tls a stand-in broker object (host/port/metrics_port) for TClient."""
    tls = {"bind": "127.0.0.1:0", "cert": c.server_pem, "key": c.server_key}
    if client_ca:
        tls["client_ca"] = c.ca_pem
    if require_client_cert is not None:
        tls["require_client_cert"] = require_client_cert
    if use_identity_as_username is not None:
        tls["use_identity_as_username"] = use_identity_as_username
    overrides = {"listeners.tls": tls}
    for k, v in (extra or {}).items():
        overrides.setdefault(k, {}).update(v)
    b = make_broker(overrides)
    b.tls_port = tls_port(b)
    b.tls = types.SimpleNamespace(host="127.0.0.1", port=b.tls_port,
                                  metrics_port=b.metrics_port)
    return b


class Clients:
    """Creates plain and TLS TClients with unique ids; closes them all at the end."""

    def __init__(self, prefix):
        self.prefix = re.sub(r"[^A-Za-z0-9_-]", "_", prefix)[-36:]
        self.made = []

    def tcp(self, b, name, protocol=V5, client_id=None, **kw):
        c = TClient(b, client_id or f"{self.prefix}-{name}", protocol=protocol, **kw)
        self.made.append(c)
        return c

    def tls(self, b, name, ca, cert=None, key=None, protocol=V5, client_id=None, **kw):
        c = TClient(b.tls, client_id or f"{self.prefix}-{name}", protocol=protocol, **kw)
        c.c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        self.made.append(c)
        return c

    def close(self):
        for c in self.made:
            c.close()


@pytest.fixture
def clients(request):
    f = Clients(request.node.name)
    yield f
    f.close()


def tls_refused(c, timeout=TIMEOUT):
    """Try to connect TClient c over TLS; returns a description of how it was refused. Fails if
    the broker accepts it (CONNACK 0) or leaves it hanging (neither CONNACK nor close).

    Depending on the TLS version the refusal shows up as an exception from connect (handshake
    failure / certificate verification on the client side) or, with TLS 1.3 where the client
    finishes its side of the handshake before the server checks the client certificate, as the
    connection closed (with an alert) before any CONNACK."""
    kw = {"clean_start": True} if c.protocol == V5 else {}
    try:
        c.c.connect(c.broker.host, c.broker.port, keepalive=60, **kw)
    except (ssl.SSLError, ssl.CertificateError, OSError) as e:
        return f"connect raised {type(e).__name__}: {e}"
    c.c.loop_start()
    c.started = True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rc, _, _ = c.connacks.get_nowait()
        except queue.Empty:
            pass
        else:
            assert rc.value != 0, f"{c.client_id}: broker accepted the connection (CONNACK 0)"
            return f"CONNACK {rc.value:#x}"
        try:
            d = c.disconnects.get_nowait()
        except queue.Empty:
            time.sleep(0.02)
            continue
        return f"closed before CONNACK ({d[0]}); paho log: {c.log_lines[-3:]}"
    raise AssertionError(f"{c.client_id}: neither CONNACK nor close within {timeout}s")


def raw_tls_connect(port, ca, cert=None, key=None, timeout=TIMEOUT):
    """A plain ssl socket (no MQTT) to the TLS port; returns the wrapped socket."""
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(s, server_hostname="127.0.0.1")


def raw_connack(sock, client_id, version, username=None, password=None):
    """Send a raw CONNECT on sock (plain or TLS) and return (return/reason code byte, whether
    the broker then closed the connection). Reads the CONNACK's bytes from the wire, so the
    3.1.1 return code is seen as sent (paho maps it to a v5 reason code)."""
    sock.settimeout(TIMEOUT)
    sock.sendall(mqttraw.connect(client_id, version=version, username=username,
                                 password=password))
    data = b""
    deadline = time.monotonic() + TIMEOUT
    while len(data) < 4 and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert len(data) >= 4 and data[0] == 0x20, f"no CONNACK: {data!r}"
    rest, closed = read_until_closed(sock, 3)
    return data[3], closed is not None


def read_until_closed(sock, timeout):
    """Read from sock until the peer closes it; returns (bytes, seconds) or (bytes, None)."""
    sock.settimeout(0.2)
    t0 = time.monotonic()
    data = b""
    while time.monotonic() - t0 < timeout:
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
            return data, time.monotonic() - t0
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk
    return data, None


def failed(b):
    return metric(b, HANDSHAKES, {"result": "failed"})


def ok(b):
    return metric(b, HANDSHAKES, {"result": "ok"})


def wait_metric(b, fn, pred, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        v = fn(b)
        if pred(v) or time.monotonic() > deadline:
            return v
        time.sleep(0.05)


def roundtrip(sub, pub, topic, payload, qos=1):
    """pub publishes on topic; sub (already subscribed) must receive exactly that."""
    pub.publish(topic, payload, qos=qos)
    m = sub.get()
    assert (m.topic, m.payload) == (topic, payload)


# --------------------------------------------------------------------------- 1. server auth


@pytest.mark.parametrize("proto", [V311, V5], ids=["v311", "v5"])
def test_server_auth_tls_and_tcp_share_the_broker(make_broker, certs, clients, proto):
    """With only a server certificate configured, paho clients that trust the CA publish and
    subscribe over TLS; a plain TCP client on the same broker receives what a TLS client
    publishes and vice versa; every TLS connection counts as a successful handshake."""
    b = start_tls(make_broker, certs)
    before_ok = ok(b)
    t1 = clients.tls(b, "tls1", certs.ca_pem, protocol=proto)
    t2 = clients.tls(b, "tls2", certs.ca_pem, protocol=proto)
    p = clients.tcp(b, "tcp", protocol=proto)
    for c in (t1, t2, p):
        assert c.connect()[0] == 0
    # The TLS clients really speak TLS (paho wrapped the socket) and the TCP one does not.
    assert isinstance(t1.c.socket(), ssl.SSLSocket)
    assert not isinstance(p.c.socket(), ssl.SSLSocket)
    assert t1.c.socket().getpeercert()["subject"] == ((("commonName", "localhost"),),)

    for c in (t1, t2, p):
        assert c.subscribe("mix/#", qos=1) == [1]
    # TLS -> TLS and TCP, TCP -> TLS, at QoS 0, 1 and 2.
    for qos in (0, 1, 2):
        t1.publish(f"mix/from-tls/{qos}", f"tls{qos}".encode(), qos=qos)
        for c in (t1, t2, p):
            m = c.get()
            assert (m.topic, m.payload) == (f"mix/from-tls/{qos}", f"tls{qos}".encode())
        p.publish(f"mix/from-tcp/{qos}", f"tcp{qos}".encode(), qos=qos)
        for c in (t1, t2, p):
            m = c.get()
            assert (m.topic, m.payload) == (f"mix/from-tcp/{qos}", f"tcp{qos}".encode())
    # A large payload crosses TLS records intact.
    big = os.urandom(200_000)
    p.publish("mix/big", big, qos=1)
    assert t2.get().payload == big
    t2.publish("mix/big2", big, qos=1)
    for c in (t1, p):
        assert c.get().payload == big

    assert wait_metric(b, ok, lambda v: v >= before_ok + 2) >= before_ok + 2
    assert failed(b) == 0
    for c in (t1, t2, p):
        c.disconnect()


def test_tls_client_with_wrong_ca_refuses_server(make_broker, certs, other_certs, clients):
    """A client that trusts another CA rejects the broker's certificate (client side verify),
    and the broker stays up for a correctly configured client."""
    b = start_tls(make_broker, certs)
    bad = clients.tls(b, "bad", other_certs.ca_pem)
    with pytest.raises(ssl.SSLCertVerificationError):
        bad.connect(expect_rc=None)
    good = clients.tls(b, "good", certs.ca_pem)
    assert good.connect()[0] == 0
    assert b.alive()


# --------------------------------------------------------------------------- 2. mosquitto


def mosq_base(port, version, client_id, c, with_cert):
    cmd = ["-h", "127.0.0.1", "-p", str(port), "-V", version, "-i", client_id,
           "--cafile", c.ca_pem]
    if with_cert:
        cmd += ["--cert", c.client_pem, "--key", c.client_key]
    return cmd


class MosqSub:
    def __init__(self, port, version, client_id, c, topic, count, with_cert=False, extra=()):
        cmd = [*STDBUF, "mosquitto_sub", *mosq_base(port, version, client_id, c, with_cert),
               "-d", "-q", "1", "-t", topic, "-C", str(count), "-W", "10",
               "-F", "MSG|%t|%p", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.lines = queue.Queue()
        self.all = []
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.all.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text, timeout=8):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"mosquitto_sub: no {text!r} in {timeout}s:\n"
                                     + "\n".join(self.all))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"mosquitto_sub exited before {text!r}:\n"
                                     + "\n".join(self.all))
            if text in line:
                return line

    def finish(self, timeout=12):
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("mosquitto_sub did not exit:\n" + "\n".join(self.all))
        self._t.join(2)
        return rc, [tuple(l.split("|")[1:]) for l in self.all if l.startswith("MSG|")]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def mosq_pub(port, version, client_id, c, topic, message, with_cert=False):
    cmd = ["mosquitto_pub", *mosq_base(port, version, client_id, c, with_cert), "-d",
           "-q", "1", "-t", topic, "-m", message]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=15)
    return r.returncode, r.stdout.decode("utf-8", "replace")


@pytest.fixture
def subs():
    made = []
    yield made
    for s in made:
        s.kill()


@pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto-clients not installed")
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients_over_tls(make_broker, certs, clients, subs, version):
    """mosquitto_sub / mosquitto_pub with --cafile exchange messages over TLS (and with a plain
    TCP paho subscriber on the same broker)."""
    b = start_tls(make_broker, certs)
    tcp = clients.tcp(b, f"tcpsub-{version}")
    tcp.connect()
    tcp.subscribe("mq/#", qos=1)
    s = MosqSub(b.tls_port, version, f"msub-{version}", certs, "mq/#", 2)
    subs.append(s)
    s.wait_for("received SUBACK")
    rc, out = mosq_pub(b.tls_port, version, f"mpub-{version}", certs, "mq/tls", "over-tls")
    assert rc == 0 and "received CONNACK (0)" in out and "received PUBACK" in out, out
    m = tcp.get()
    assert (m.topic, m.payload) == ("mq/tls", b"over-tls")
    # And a TCP publisher reaches the TLS mosquitto_sub.
    tcp.publish("mq/tcp", b"over-tcp", qos=1)
    rc, got = s.finish()
    assert rc == 0, "\n".join(s.all)
    assert got == [("mq/tls", "over-tls"), ("mq/tcp", "over-tcp")]


@pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto-clients not installed")
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients_mutual_tls(make_broker, certs, subs, version):
    """Against require_client_cert = true, mosquitto_sub/pub with --cert/--key work; a
    mosquitto_pub without a certificate is refused and the broker counts a failed handshake."""
    b = start_tls(make_broker, certs, client_ca=True, require_client_cert=True)
    s = MosqSub(b.tls_port, version, f"msub-m-{version}", certs, "mt/#", 1, with_cert=True)
    subs.append(s)
    s.wait_for("received SUBACK")
    failed_before = failed(b)
    rc, out = mosq_pub(b.tls_port, version, f"mpub-nocert-{version}", certs, "mt/x", "nocert")
    assert rc != 0, out
    assert "received CONNACK" not in out, out
    assert wait_metric(b, failed, lambda v: v > failed_before) > failed_before
    rc, out = mosq_pub(b.tls_port, version, f"mpub-m-{version}", certs, "mt/x", "mutual",
                       with_cert=True)
    assert rc == 0 and "received CONNACK (0)" in out, out
    rc, got = s.finish()
    assert rc == 0, "\n".join(s.all)
    assert got == [("mt/x", "mutual")]  # the refused publisher's message never arrived


# --------------------------------------------------------------------------- 3. client certs


@pytest.mark.parametrize("proto", [V311, V5], ids=["v311", "v5"])
def test_require_client_cert(make_broker, certs, other_certs, clients, proto):
    """require_client_cert = true: a client without a certificate, or with one from another CA,
    never gets a CONNACK (the handshake fails); the broker keeps serving clients that present
    a certificate from client_ca; failed handshakes are counted."""
    b = start_tls(make_broker, certs, client_ca=True, require_client_cert=True)
    good = clients.tls(b, "good", certs.ca_pem, certs.client_pem, certs.client_key,
                       protocol=proto)
    assert good.connect()[0] == 0
    good.subscribe("rc/#", qos=1)

    nocert = clients.tls(b, "nocert", certs.ca_pem, protocol=proto)
    how = tls_refused(nocert)
    # Client certificate from an unrelated CA (server still verified with the right CA).
    foreign = clients.tls(b, "foreign", certs.ca_pem, other_certs.client_pem,
                          other_certs.client_key, protocol=proto)
    how2 = tls_refused(foreign)
    # Any refused client that got as far as sending a PUBLISH must not have been delivered.
    good.expect_none(0.2)
    assert wait_metric(b, failed, lambda v: v >= 2) >= 2, (how, how2, b.log())
    log = b.log()
    assert log.count("TLS handshake failed") >= 2, log

    # The broker still serves: the connected client works and a new certificate holder too.
    again = clients.tls(b, "again", certs.ca_pem, certs.client_pem, certs.client_key,
                        protocol=proto)
    assert again.connect()[0] == 0
    roundtrip(good, again, "rc/after", b"still-serving")
    assert good.c.is_connected()


def test_client_ca_optional_cert(make_broker, certs, other_certs, clients):
    """client_ca without require_client_cert: clients without a certificate connect, clients
    with a valid one connect, a certificate from another CA is still refused (it is verified)."""
    b = start_tls(make_broker, certs, client_ca=True, require_client_cert=False)
    a = clients.tls(b, "nocert", certs.ca_pem)
    assert a.connect()[0] == 0
    c = clients.tls(b, "cert", certs.ca_pem, certs.client_pem, certs.client_key)
    assert c.connect()[0] == 0
    f = clients.tls(b, "foreign", certs.ca_pem, other_certs.client_pem, other_certs.client_key)
    tls_refused(f)
    assert wait_metric(b, failed, lambda v: v >= 1) >= 1


# --------------------------------------------------------------------------- 4. identity


@pytest.mark.parametrize("proto,refused_rc", [(V311, 5), (V5, 0x87)], ids=["v311", "v5"])
def test_identity_as_username(make_broker, certs, clients, proto, refused_rc):
    """use_identity_as_username = true, allow_anonymous = false: a client presenting client.pem
    (CN=device1) connects without a username (CONNACK 0) and can publish/subscribe; a plain TCP
    client without a username is refused (v5 0x87 Not authorized / 3.1.1 5) and closed."""
    b = start_tls(make_broker, certs, client_ca=True, require_client_cert=True,
                  use_identity_as_username=True, extra={"auth": {"allow_anonymous": False}})
    dev = clients.tls(b, "dev", certs.ca_pem, certs.client_pem, certs.client_key, protocol=proto)
    assert dev.connect()[0] == 0
    assert dev.subscribe("id/#", qos=1) == [1]
    dev2 = clients.tls(b, "dev2", certs.ca_pem, certs.client_pem, certs.client_key,
                       protocol=proto)
    assert dev2.connect()[0] == 0
    roundtrip(dev, dev2, "id/x", b"by-certificate")
    # The certificate's identity replaces a username the client sends (which, with no password
    # file and allow_anonymous = false, would be refused on its own).
    named = clients.tls(b, "named", certs.ca_pem, certs.client_pem, certs.client_key,
                        protocol=proto, username="mallory", password="guess")
    assert named.connect()[0] == 0
    plain_named = clients.tcp(b, "plain-named", protocol=proto, username="mallory",
                              password="guess")
    assert plain_named.connect(expect_rc=None)[0] != 0

    # On the wire: CONNACK return code 0 over TLS with the certificate and no username ...
    s = raw_tls_connect(b.tls_port, certs.ca_pem, certs.client_pem, certs.client_key)
    s.settimeout(TIMEOUT)
    s.sendall(mqttraw.connect(f"{clients.prefix}-raw", version=proto))
    head = s.recv(4)
    s.close()
    assert head[:1] == b"\x20" and head[3] == 0, head
    # ... and the refusal code for a plain TCP client without a username.
    t = socket.create_connection(("127.0.0.1", b.port), timeout=TIMEOUT)
    rc, closed = raw_connack(t, f"{clients.prefix}-anon", proto)
    t.close()
    assert rc == refused_rc, f"CONNACK {rc:#x}\n" + b.log()
    assert closed, "refused connection left open"
    anon = clients.tcp(b, "anon", protocol=proto)
    rc, _, _ = anon.connect(expect_rc=None)
    assert rc == 0x87  # paho reports 3.1.1's 5 as v5 0x87 too
    assert dev.c.is_connected()


def test_identity_as_username_without_certificate_refused(make_broker, certs, clients):
    """use_identity_as_username with an optional client certificate: a TLS client without one
    has no identity and allow_anonymous = false, so it must not get CONNACK 0; a client with a
    certificate on the same listener does."""
    b = start_tls(make_broker, certs, client_ca=True, require_client_cert=False,
                  use_identity_as_username=True, extra={"auth": {"allow_anonymous": False}})
    nocert = clients.tls(b, "nocert", certs.ca_pem)
    tls_refused(nocert)
    dev = clients.tls(b, "dev", certs.ca_pem, certs.client_pem, certs.client_key)
    assert dev.connect()[0] == 0


# --------------------------------------------------------------------------- 5. reload


def install(src, dst, keep_mtime=False):
    """Overwrite dst's certificate files in place with src's (same paths, same inodes)."""
    for name in ("ca.pem", "ca.key", "server.key", "server.pem", "client.key", "client.pem"):
        d = os.path.join(dst.dir, name)
        st = os.stat(d)
        with open(os.path.join(src.dir, name), "rb") as f:
            data = f.read()
        with open(d, "wb") as f:
            f.write(data)
        if keep_mtime:
            os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))


def wait_connects(b, clients, name, ca, cert=None, key=None, timeout=6.0):
    """Retry a new TLS client until it gets CONNACK 0; returns (client, attempts)."""
    deadline = time.monotonic() + timeout
    attempt = 0
    last = None
    while time.monotonic() < deadline:
        attempt += 1
        c = clients.tls(b, f"{name}{attempt}", ca, cert, key)
        try:
            rc, _, _ = c.connect(expect_rc=None, timeout=2)
            if rc == 0:
                return c, attempt
            last = f"CONNACK {rc:#x}"
        except (ssl.SSLError, OSError, AssertionError) as e:
            last = f"{type(e).__name__}: {e}"
        c.close()
        time.sleep(0.25)
    raise AssertionError(f"{name}: no successful connection within {timeout}s (last: {last})")


def test_certificates_reload_when_files_change(make_broker, tmp_path, clients):
    """The broker watches its certificate files: after certs/gen.sh regenerates them with a new
    CA in place, new clients trusting the new CA connect within ~5 s, clients trusting only the
    old CA are refused, and a connection made before the change stays up with its session."""
    live = gen_certs(tmp_path / "live")
    old = cert_paths(shutil.copytree(live.dir, tmp_path / "old-copy"))  # the original CA
    b = start_tls(make_broker, live)
    a = clients.tls(b, "A", old.ca_pem)
    assert a.connect()[0] == 0
    assert a.subscribe("reload/#", qos=1) == [1]

    time.sleep(0.1)
    # Regenerate with a new CA straight into the configured paths (gen.sh overwrites them one
    # after the other, so the watcher may see a half-written set first).
    t0 = time.monotonic()
    new = gen_certs(tmp_path / "live")
    assert open(new.ca_pem).read() != open(old.ca_pem).read()
    fresh, attempts = wait_connects(b, clients, "fresh", new.ca_pem)
    took = time.monotonic() - t0
    assert took < 5.5, took
    assert "reloaded" in b.log(), b.log()

    stale = clients.tls(b, "stale", old.ca_pem)
    with pytest.raises(ssl.SSLCertVerificationError):
        stale.connect(expect_rc=None)

    assert a.c.is_connected()
    assert a.disconnects.empty()
    roundtrip(a, fresh, "reload/after", b"after-reload")
    tcp = clients.tcp(b, "tcp")
    tcp.connect()
    roundtrip(a, tcp, "reload/tcp", b"tcp-after-reload")


def test_reload_failure_keeps_previous_certificates(make_broker, tmp_path, clients):
    """A reload that fails (key not matching the certificate) is logged and the previous
    certificates stay in use: new clients trusting the old CA keep connecting."""
    live = gen_certs(tmp_path / "live")
    ca = os.path.join(tmp_path, "ca-copy.pem")
    shutil.copyfile(live.ca_pem, ca)
    other = gen_certs(tmp_path / "other")
    b = start_tls(make_broker, live)
    with open(other.server_key, "rb") as f:
        data = f.read()
    with open(live.server_key, "wb") as f:  # a key that does not match server.pem
        f.write(data)
    deadline = time.monotonic() + 6
    while "reload failed" not in b.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "reload failed" in b.log(), b.log()
    c = clients.tls(b, "still", ca)
    assert c.connect()[0] == 0
    assert b.alive()


def test_sighup_reloads_certificates(make_broker, tmp_path, clients):
    """SIGHUP reloads certificate, key and client CA even when the files' modification times
    did not change (so the file watcher cannot be what reloads them): the broker stays up,
    logs "reloaded", new clients need the new CA (and a client certificate from it), and a
    connection made before stays up and keeps receiving."""
    live = gen_certs(tmp_path / "live")
    old = cert_paths(shutil.copytree(live.dir, tmp_path / "old-copy"))
    new = gen_certs(tmp_path / "new")
    b = start_tls(make_broker, live, client_ca=True, require_client_cert=True)
    a = clients.tls(b, "A", old.ca_pem, old.client_pem, old.client_key)
    assert a.connect()[0] == 0
    assert a.subscribe("hup/#", qos=1) == [1]

    install(new, live, keep_mtime=True)
    reloaded_before = b.log().count("reloaded")
    b.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while b.log().count("reloaded") <= reloaded_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.log().count("reloaded") > reloaded_before, b.log()
    assert "SIGHUP" in b.log()
    assert b.alive()

    fresh = clients.tls(b, "fresh", new.ca_pem, new.client_pem, new.client_key)
    assert fresh.connect()[0] == 0
    stale = clients.tls(b, "stale", old.ca_pem, old.client_pem, old.client_key)
    with pytest.raises(ssl.SSLCertVerificationError):
        stale.connect(expect_rc=None)
    # Server verified with the new CA, but a client certificate from the old CA: refused.
    mixed = clients.tls(b, "mixed", new.ca_pem, old.client_pem, old.client_key)
    tls_refused(mixed)

    assert a.c.is_connected() and a.disconnects.empty()
    roundtrip(a, fresh, "hup/after", b"after-sighup")
    assert b.alive()


# --------------------------------------------------------------------------- 6. handshake bound


def test_handshake_is_bounded(make_broker, certs, clients):
    """limits.connect_timeout = 1: a socket to the TLS port that sends nothing is closed within
    ~3 s, one that sends 1000 garbage bytes is closed too (at once), both count as failed
    handshakes, and a TLS client connecting meanwhile and afterwards is served."""
    b = start_tls(make_broker, certs, extra={"limits": {"connect_timeout": 1}})
    failed_before = failed(b)

    t_open = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", b.tls_port), timeout=TIMEOUT)
    garbage = socket.create_connection(("127.0.0.1", b.tls_port), timeout=TIMEOUT)
    # A proper client is not held up by the silent socket's pending handshake.
    during = clients.tls(b, "during", certs.ca_pem)
    t = time.monotonic()
    assert during.connect()[0] == 0
    assert time.monotonic() - t < 1.0

    garbage.sendall(bytes((i * 37 + 11) % 256 for i in range(1000)))
    data_g, closed_g = read_until_closed(garbage, 4)
    garbage.close()
    assert closed_g is not None, "garbage socket still open after 4 s\n" + b.log()
    assert closed_g < 2.0, closed_g
    # Whatever the broker answered (a TLS alert at most), it is no MQTT.
    assert not data_g or data_g[0] == 0x15, data_g[:16]

    t_read = time.monotonic()
    data_s, closed_s = read_until_closed(silent, 5)
    silent.close()
    assert closed_s is not None, "silent socket still open after 5 s\n" + b.log()
    open_for = t_read + closed_s - t_open
    assert 0.9 <= open_for <= 3.0, open_for
    assert data_s == b""

    # A TLS handshake that starts and then stalls (ClientHello's first bytes only) is bounded too.
    half = socket.create_connection(("127.0.0.1", b.tls_port), timeout=TIMEOUT)
    half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    _, closed_h = read_until_closed(half, 4)
    half.close()
    assert closed_h is not None and closed_h < 3.0, closed_h

    # A completed handshake followed by no CONNECT is bounded by the same limit.
    quiet = raw_tls_connect(b.tls_port, certs.ca_pem)
    _, closed_q = read_until_closed(quiet, 4)
    quiet.close()
    assert closed_q is not None and closed_q < 3.0, closed_q

    after = clients.tls(b, "after", certs.ca_pem)
    assert after.connect()[0] == 0
    after.subscribe("hs/#", qos=1)
    roundtrip(after, during, "hs/x", b"served")
    got = wait_metric(b, failed, lambda v: v >= failed_before + 3)
    assert got >= failed_before + 3, (got, b.log())
    assert b.alive()


# --------------------------------------------------------------------------- 7. takeover


@pytest.mark.parametrize("first", ["tcp", "tls"])
def test_takeover_across_transports(make_broker, certs, clients, first):
    """Same client id over TCP and over TLS: the later connection takes the session over and
    the earlier one is disconnected (v5: DISCONNECT 0x8E Session taken over)."""
    b = start_tls(make_broker, certs)
    cid = f"{clients.prefix}-same"

    def make(kind, name):
        if kind == "tcp":
            return clients.tcp(b, name, client_id=cid)
        return clients.tls(b, name, certs.ca_pem, client_id=cid)

    second_kind = "tls" if first == "tcp" else "tcp"
    one = make(first, "one")
    assert one.connect()[0] == 0
    two = make(second_kind, "two")
    assert two.connect()[0] == 0
    rc, flags, _, _ = one.wait_disconnect()
    assert flags.is_disconnect_packet_from_server, "first connection not told"
    assert one.server_disconnect and one.server_disconnect[0] == 0x8E, one.server_disconnect
    assert two.c.is_connected()
    two.subscribe("to/#", qos=1)
    p = clients.tcp(b, "p")
    p.connect()
    roundtrip(two, p, "to/x", b"to-the-winner")


@pytest.mark.parametrize("first", ["tcp", "tls"])
def test_persistent_session_moves_across_transports(make_broker, certs, clients, first):
    """A 3.1.1 persistent session made over one transport is resumed over the other one
    (session present = 1): its subscription is kept and QoS 1 messages queued while it was
    offline are delivered."""
    b = start_tls(make_broker, certs)
    cid = f"{clients.prefix}-sess"

    def make(kind, name):
        if kind == "tcp":
            return clients.tcp(b, name, protocol=V311, client_id=cid, clean_session=False)
        return clients.tls(b, name, certs.ca_pem, protocol=V311, client_id=cid,
                           clean_session=False)

    one = make(first, "one")
    rc, present, _ = one.connect()
    assert present == 0
    assert one.subscribe("sess/#", qos=1) == [1]
    one.disconnect()
    p = clients.tcp(b, "p")
    p.connect()
    p.publish("sess/queued", b"while-offline", qos=1)
    two = make("tls" if first == "tcp" else "tcp", "two")
    rc, present, _ = two.connect()
    assert present == 1
    m = two.get()
    assert (m.topic, m.payload) == ("sess/queued", b"while-offline")
    roundtrip(two, p, "sess/live", b"live")
    two.disconnect()
