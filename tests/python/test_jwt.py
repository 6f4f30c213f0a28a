"""The JWT authentication backend (`[auth.jwt]`, docs/configuration.md) against the real broker
with real clients, for 3.1.1 and 5.0, next to a TLS listener whose clients are known by their
certificates.

Tokens are made here with the standard library (HS256: hmac) and the openssl CLI (RS256:
`openssl dgst -sha256 -sign`, the JWKS's `n` from `openssl rsa -modulus`), so the tests need no
JWT package. The JWKS is served by a python http.server on 127.0.0.1:0 in a thread and
changed during the tests. Everything is on 127.0.0.1, and every wait is bounded.

Timing facts from src/auth/jwt.rs and src/config/auth_jwt.rs the JWKS tests rely on:
`jwks_refresh` is at least 10 s; a token naming an unknown `kid` wakes the refresh task, which
fetches early but not sooner than 30 s after the start of its last fetch (EARLY_REFRESH_MIN),
and never later than the regular refresh. So with `jwks_refresh = "10s"` a rotation is picked
up by the regular refresh (within ~10 s), and the early fetch is only visible with a longer
`jwks_refresh` (test_an_unknown_kid_fetches_the_jwks_early_but_rate_limited, ~30 s).
"""
import base64
import hashlib
import hmac
import json
import re
import subprocess
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import mqttraw
from conftest import gen_certs
from pahoutil import V311, V5, closed_by_server, metric
from test_auth import tern_passwd

VERSIONS = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]
SECRET = b"tern test secret: at least thirty-two bytes long, as RFC 7518 asks"
AUDIENCE = "tern"
ISSUER = "https://idp.test"


def pick(version, v311, v5):
    return v5 if version == V5 else v311


def bad_credentials(version):
    """CONNACK for a token that fails: v5 0x86, 3.1.1 return code 4."""
    return pick(version, 4, 0x86)


def not_authorized(version):
    return pick(version, 5, 0x87)


def at(b, name):
    """A stand-in broker for clients: listener `name` of broker b."""
    return types.SimpleNamespace(host=b.listeners[name].host, port=b.listeners[name].port,
                                 metrics_port=b.metrics_port)


def wait_until(pred, timeout, step=0.05):
    """Polls pred until it is true or `timeout` seconds passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(step)


# --------------------------------------------------------------------------- tokens


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signing_input(header, claims):
    return (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode()))


def hs256(claims, secret=SECRET, header=None):
    """An HS256 token of `claims` signed with `secret`."""
    h = {"alg": "HS256", "typ": "JWT", **(header or {})}
    signing_input = _signing_input(h, claims)
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def claims(sub="svc", ttl=3600, **extra):
    """Claims the `fleet` broker accepts: its audience and issuer, exp `ttl` s from now."""
    c = {"sub": sub, "aud": AUDIENCE, "iss": ISSUER, "iat": int(time.time()),
         "exp": int(time.time()) + ttl}
    c.update(extra)
    return c


def openssl(*args, data=None):
    r = subprocess.run(["openssl", *args], input=data, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0, (args, r.stderr.decode("utf-8", "replace"))
    return r.stdout


class RsaKey:
    """An RSA key made by the openssl CLI: its JWK (public) and RS256 tokens (signed)."""

    def __init__(self, path):
        self.path = str(path)
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                "-out", self.path)
        modulus = openssl("rsa", "-in", self.path, "-noout", "-modulus").decode().strip()
        self.n = bytes.fromhex(modulus.split("=", 1)[1])
        text = openssl("rsa", "-in", self.path, "-noout", "-text").decode()
        self.e = int(re.search(r"publicExponent: (\d+)", text).group(1))

    def jwk(self, kid):
        e = self.e.to_bytes((self.e.bit_length() + 7) // 8, "big")
        return {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                "n": b64url(self.n), "e": b64url(e)}

    def sign(self, claims_, kid):
        signing_input = _signing_input({"alg": "RS256", "typ": "JWT", "kid": kid}, claims_)
        sig = openssl("dgst", "-sha256", "-sign", self.path, data=signing_input.encode())
        return signing_input + "." + b64url(sig)


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("rsa")
    return types.SimpleNamespace(a=RsaKey(d / "a.key"), b=RsaKey(d / "b.key"))


class JwksServer:
    """A JWKS on http://127.0.0.1:PORT/jwks.json; what it answers is changed with serve() and
    fail(). `hits` holds the time.monotonic() of every request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.status, self.body = 200, b'{"keys": []}'
        self.hits = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with outer.lock:
                    outer.hits.append(time.monotonic())
                    status, body = outer.status, outer.body
                if self.path != "/jwks.json":
                    status, body = 404, b"not here"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, *jwks):
        with self.lock:
            self.status, self.body = 200, json.dumps({"keys": list(jwks)}).encode()

    def fail(self, status=503):
        with self.lock:
            self.status, self.body = status, b"down for maintenance"

    def count(self):
        with self.lock:
            return len(self.hits)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def jwks_server():
    s = JwksServer()
    yield s
    s.close()


def attempt(listener, version, token, cid, username="u"):
    """One raw CONNECT with `token` as the password; the CONNACK's return / reason code. An
    accepted connection is ended with DISCONNECT; a refused one must be closed by the broker."""
    c = mqttraw.Client(listener.host, listener.port, version)
    try:
        p = c.connect(cid, expect_rc=None, username=username, password=token)
        if p.rc == 0:
            c.disconnect()
        else:
            _, closed = c.wait_closed(5)
            assert closed, f"{cid}: refused (rc {p.rc:#x}) but left open"
        return p.rc
    finally:
        c.close()


def codes(listener, token, tag):
    """The CONNACK codes of `token` for 3.1.1 and 5.0, as {version: rc}."""
    return {v: attempt(listener, v, token, f"{tag}-{v}") for v in (V311, V5)}


ACCEPTED = {V311: 0, V5: 0}
REFUSED = {V311: 4, V5: 0x86}


# --------------------------------------------------------------------------- two listeners


ACL = """\
user svc
topic readwrite #
user monitor
topic read #
pattern readwrite fleet/%u/#
"""


@pytest.fixture
def fleet(make_broker, tmp_path):
    """Two listeners at once: `internal` (TCP) where services present HS256 tokens (chain
    ["jwt"], leeway 0 s, audience and issuer checked), and `devices` (TLS) where devices are
    known by their client certificate (CN d1 becomes the username) under mount point `fleet/`.
    The ACL file gives svc and monitor everything and each device its own fleet/NAME/#, so a
    token's claims are what restricts svc, and the certificate's name what restricts d1."""
    certs = gen_certs(tmp_path / "certs", cn="d1")
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(SECRET + b"\n")
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    extra = f"""
[listeners.internal]
kind = "tcp"
bind = "127.0.0.1:0"
[listeners.internal.auth]
chain = ["jwt"]

[listeners.devices]
kind = "tls"
bind = "127.0.0.1:0"
cert = "{certs.server_pem}"
key = "{certs.server_key}"
client_ca = "{certs.ca_pem}"
require_client_cert = true
use_identity_as_username = true
mount_point = "fleet/"
"""
    b = make_broker({"auth": {"allow_anonymous": False, "acl_file": str(acl)},
                     "auth.jwt": {"secret_file": str(secret), "audience": [AUDIENCE],
                                  "issuer": ISSUER, "leeway": "0s"}},
                    extra=extra)
    assert {"internal", "devices"} <= set(b.listeners), b.listeners
    b.certs = certs
    return b


SVC_ACL = {"pub": ["orders/#", "fleet/+/cmd"], "sub": ["fleet/#", "reply/%c/#"]}


def device(mkc, b, name, version, **kw):
    """A TLS client on `devices` presenting the client certificate (CN d1)."""
    c = mkc(name, version, broker=at(b, "devices"), **kw)
    c.c.tls_set(ca_certs=b.certs.ca_pem, certfile=b.certs.client_pem,
                keyfile=b.certs.client_key)
    return c


@pytest.mark.parametrize("version", VERSIONS)
def test_each_listener_gives_its_clients_exactly_its_own_rules(fleet, mkc, version):
    b = fleet
    internal = at(b, "internal")
    svc_token = hs256(claims("svc", acl=SVC_ACL))
    # The username sent is replaced by the token's `sub`.
    svc = mkc("svc", version, broker=internal, username="anyone", password=svc_token)
    svc.connect()
    # A token without an `acl` claim: the ACL file's rules alone (monitor may read all).
    monitor = mkc("monitor", version, broker=internal, username="anyone",
                  password=hs256(claims("monitor")))
    monitor.connect()
    assert monitor.subscribe([("orders/#", 1), ("other/#", 1)]) == [1, 1]

    # Publish: only where the `pub` claim allows. A refused one gets v5 PUBACK 0x87; 3.1.1
    # has no way to say it: acknowledged and dropped (orders/2 arriving next shows other/x
    # was not delivered).
    assert svc.publish("orders/1", b"o1", qos=1) == 0
    m = monitor.get()
    assert (m.topic, m.payload) == ("orders/1", b"o1")
    assert svc.publish("other/x", b"forbidden", qos=1) == pick(version, 0, 0x87)
    assert svc.publish("orders/2", b"o2", qos=1) == 0
    m = monitor.get()
    assert (m.topic, m.payload) == ("orders/2", b"o2")
    monitor.expect_none(0.3)

    # Subscribe: a `sub` filter must cover the whole filter; %c is the client id.
    assert svc.subscribe("#", 1) == [pick(version, 0x80, 0x87)]
    assert svc.subscribe(f"reply/{svc.client_id}/#", 1) == [1]
    assert svc.subscribe("reply/someone-else/#", 1) == [pick(version, 0x80, 0x87)]
    assert svc.subscribe("fleet/#", 1) == [1]

    # The device: its certificate, never a token; CN d1 is its username, so the ACL's
    # fleet/%u/# gives it fleet/d1/# (seen as d1/# through the mount point) and nothing more.
    d1 = device(mkc, b, "d1", version)
    d1.connect()
    assert d1.subscribe("d1/cmd", 1) == [1]
    assert d1.subscribe("#", 1) == [pick(version, 0x80, 0x87)]
    assert d1.publish("d1/temp", b"21.5", qos=1) == 0
    m = svc.get()
    assert (m.topic, m.payload) == ("fleet/d1/temp", b"21.5")
    # The service reaches the device through `fleet/+/cmd`, without the prefix on arrival.
    assert svc.publish("fleet/d1/cmd", b"reboot", qos=1) == 0
    m = d1.get()
    assert (m.topic, m.payload) == ("d1/cmd", b"reboot")
    # ...and not through anything its `pub` claim lacks, although the ACL file would allow it.
    assert svc.publish("fleet/d1/temp", b"spoofed", qos=1) == pick(version, 0, 0x87)
    assert svc.publish("fleet/d1/cmd", b"second", qos=1) == 0
    assert d1.get().payload == b"second"
    # svc's fleet/# brings its own commands back, and nothing in between.
    assert [(m.topic, m.payload) for m in svc.get_n(2)] == [
        ("fleet/d1/cmd", b"reboot"), ("fleet/d1/cmd", b"second")]

    # The same token on the devices listener is irrelevant: the certificate decides. With the
    # token's rules d1/x (fleet/d1/x) could not be published and `#` (fleet/#) could be
    # subscribed; as d1 it is the other way round.
    mixed = device(mkc, b, "mixed", version, username="svc", password=svc_token)
    mixed.connect()
    assert mixed.publish("d1/x", b"as d1", qos=1) == 0
    m = svc.get()
    assert (m.topic, m.payload) == ("fleet/d1/x", b"as d1")
    assert mixed.subscribe("#", 1) == [pick(version, 0x80, 0x87)]
    # Even a token that would be refused anywhere else changes nothing there.
    expired = device(mkc, b, "expired", version, username="svc",
                     password=hs256(claims("svc", ttl=-3600)))
    expired.connect()

    # The internal listener wants a token: none (anonymous) is Not Authorized, a password
    # that is no token is Bad Credentials (paho reports 3.1.1's 5 and 4 as 0x87 and 0x86).
    mkc("anon", version, broker=internal).connect(expect_rc=0x87)
    mkc("pw", version, broker=internal, username="svc", password="not-a-token").connect(
        expect_rc=0x86)

    log = b.log()
    for cid, user in ((svc.client_id, "svc"), (monitor.client_id, "monitor"),
                      (d1.client_id, "d1"), (mixed.client_id, "d1")):
        assert re.search(rf"client connected .*client_id={re.escape(cid)} username={user} ",
                         log), (cid, user, log)
    # Only the internal listener counted authentication refusals.
    refused = 'tern_listener_connections_refused_total'
    assert metric(b, refused, {"listener": "internal", "reason": "auth"}) == 2
    assert metric(b, refused, {"listener": "devices", "reason": "auth"}) == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_a_token_that_expires_while_connected_ends_the_connection(fleet, mkc, version):
    """leeway 0 s: the connection ends at the token's `exp`, v5 with DISCONNECT 0xA0 (Maximum
    connect time), 3.1.1 by closing it; a client whose token lives on stays connected."""
    b = fleet
    internal = at(b, "internal")
    lasting = mkc("lasting", version, broker=internal, username="u",
                  password=hs256(claims("svc")))
    lasting.connect()
    exp = int(time.time()) + 3
    short = hs256(claims("svc", exp=exp))
    c = mkc("short", version, broker=internal, username="u", password=short)
    c.connect()
    assert c.subscribe("orders/#", 1) == [1]
    assert lasting.publish("orders/1", b"while valid", qos=1) == 0
    assert c.get().payload == b"while valid"

    assert closed_by_server(c, 10) == pick(version, None, 0xA0)
    closed_at = time.time()
    # Not before exp (the broker's clock and this one are the same machine's).
    assert closed_at >= exp - 0.25, (closed_at, exp)
    assert closed_at <= exp + 3, (closed_at, exp)
    closed = lambda: metric(b, "tern_connections_closed_total",
                            {"reason": "credentials_expired"})
    assert wait_until(lambda: closed() == 1, 5), closed()
    assert "credentials expired" in b.log()
    # The same token now is refused at CONNECT, and the other client is still served.
    assert attempt(internal, version, short, f"again-{version}") == bad_credentials(version)
    assert lasting.subscribe("orders/#", 1) == [1]
    assert lasting.publish("orders/2", b"still here", qos=1) == 0
    assert lasting.get().payload == b"still here"
    assert lasting.c.is_connected()


# --------------------------------------------------------------------------- refused tokens


@pytest.fixture
def chained(make_broker, tmp_path):
    """`internal` with chain ["jwt", "password_file"] and the default 5 s leeway."""
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(SECRET)
    passwd = tmp_path / "passwd"
    tern_passwd(passwd, "alice", "alice-pw")
    extra = """
[listeners.internal]
kind = "tcp"
bind = "127.0.0.1:0"
[listeners.internal.auth]
chain = ["jwt", "password_file"]
"""
    return make_broker({"auth": {"allow_anonymous": False, "password_file": str(passwd)},
                        "auth.jwt": {"secret_file": str(secret), "audience": [AUDIENCE],
                                     "issuer": ISSUER}},
                       extra=extra)


@pytest.mark.parametrize("version", VERSIONS)
def test_tokens_that_fail_are_refused_and_passwords_fall_through(chained, version):
    listener = at(chained, "internal")
    now = int(time.time())
    good = claims("svc")
    tampered = hs256(good).split(".")
    tampered[1] = b64url(json.dumps(claims("root")).encode())
    cases = {
        "valid": (hs256(good), 0),
        # Within the 5 s leeway: still accepted.
        "just expired, within the leeway": (hs256({**good, "exp": now - 2}), 0),
        "expired": (hs256({**good, "exp": now - 60}), bad_credentials(version)),
        "not valid yet": (hs256({**good, "nbf": now + 60}), bad_credentials(version)),
        "wrong audience": (hs256({**good, "aud": "another-service"}), bad_credentials(version)),
        "no audience": (hs256({k: v for k, v in good.items() if k != "aud"}),
                        bad_credentials(version)),
        "wrong issuer": (hs256({**good, "iss": "https://evil.test"}), bad_credentials(version)),
        "no exp": (hs256({k: v for k, v in good.items() if k != "exp"}),
                   bad_credentials(version)),
        "wrong signature": (hs256(good, secret=b"another secret, also thirty-two bytes long"),
                            bad_credentials(version)),
        "payload changed after signing": (".".join(tampered), bad_credentials(version)),
        "unsigned (alg none)": (_signing_input({"alg": "none"}, good) + ".",
                                bad_credentials(version)),
        "malformed acl claim": (hs256({**good, "acl": ["orders/#"]}), bad_credentials(version)),
    }
    got = {name: attempt(listener, version, token, f"tok-{i}-{version}")
           for i, (name, (token, _)) in enumerate(cases.items())}
    assert got == {name: rc for name, (_, rc) in cases.items()}

    # What is no token passes to the password file, which decides for the users it knows.
    assert attempt(listener, version, "alice-pw", f"pw-ok-{version}", username="alice") == 0
    assert (attempt(listener, version, "wrong", f"pw-bad-{version}", username="alice")
            == bad_credentials(version))
    # A user neither knows: refused (a username nobody vouched for).
    assert (attempt(listener, version, "x", f"pw-nobody-{version}", username="bob")
            == bad_credentials(version))
    # A token that fails is final: it does not fall through to alice's file entry.
    expired = cases["expired"][0]
    assert (attempt(listener, version, expired, f"pw-tok-{version}", username="alice")
            == bad_credentials(version))
    # No credentials at all, anonymous clients not allowed.
    c = mqttraw.Client(listener.host, listener.port, version)
    try:
        assert c.connect(f"anon-{version}", expect_rc=None).rc == not_authorized(version)
    finally:
        c.close()
    log = chained.log()
    assert "connection refused: bad user name or password" in log


# --------------------------------------------------------------------------- JWKS


def jwks_broker(make_broker, server, refresh, max_stale="2m"):
    extra = """
[listeners.internal]
kind = "tcp"
bind = "127.0.0.1:0"
[listeners.internal.auth]
chain = ["jwt"]
"""
    b = make_broker({"auth": {"allow_anonymous": False},
                     "auth.jwt": {"jwks_url": server.url, "jwks_refresh": refresh,
                                  "jwks_max_stale": max_stale, "jwks_timeout": "2s"}},
                    extra=extra)
    # The first fetch runs in the background after startup: wait for it.
    assert wait_until(lambda: "JWKS fetched" in b.log(), 10), b.log()
    return b


def test_jwks_rotation_and_outage(make_broker, jwks_server, rsa_keys):
    """jwks_refresh 10 s (the least allowed): a rotation to A+B lets kid b in after the next
    fetch, a set of B alone shuts kid a out after the one after, and while the JWKS answers
    503 the last good keys (B) still verify (jwks_max_stale 2 min)."""
    server, a, bk = jwks_server, rsa_keys.a, rsa_keys.b
    server.serve(a.jwk("a"))
    b = jwks_broker(make_broker, server, refresh="10s")
    internal = at(b, "internal")
    token_a = a.sign({"sub": "svc-a", "exp": int(time.time()) + 3600}, "a")
    token_b = bk.sign({"sub": "svc-b", "exp": int(time.time()) + 3600}, "b")
    assert codes(internal, token_a, "a1") == ACCEPTED
    # B's key under kid "a" (the right kid, the wrong key) and a kid the set lacks.
    assert codes(internal, bk.sign({"sub": "x", "exp": int(time.time()) + 3600}, "a"),
                 "a-forged") == REFUSED

    # Rotation: the provider publishes B beside A.
    server.serve(a.jwk("a"), bk.jwk("b"))
    before = server.count()
    first = codes(internal, token_b, "b0")
    if server.count() == before:
        # No fetch since the rotation: the broker cannot know kid b yet.
        assert first == REFUSED
    assert wait_until(lambda: codes(internal, token_b, "b1") == ACCEPTED, 15, step=0.5), \
        f"kid b not accepted after {server.count() - before} fetches:\n{b.log()}"
    assert server.count() > before
    assert codes(internal, token_a, "a2") == ACCEPTED

    # A is withdrawn: the set holds B alone; after the next fetch kid a is refused.
    server.serve(bk.jwk("b"))
    before = server.count()
    assert wait_until(lambda: codes(internal, token_a, "a3") == REFUSED, 15, step=0.5), \
        b.log()
    assert server.count() > before
    assert codes(internal, token_b, "b2") == ACCEPTED

    # Outage: the JWKS answers 503. The keys of the last good fetch stay in use.
    server.fail(503)
    before = server.count()
    assert wait_until(lambda: server.count() > before
                      and "JWKS refresh failed; the last good keys stay valid" in b.log(),
                      15), b.log()
    assert "503" in b.log()
    assert metric(b, "tern_auth_jwks_fetch_failures_total") >= 1
    assert codes(internal, token_b, "b3") == ACCEPTED
    assert codes(internal, token_a, "a4") == REFUSED
    assert b.alive()


def test_an_unknown_kid_fetches_the_jwks_early_but_rate_limited(make_broker, jwks_server,
                                                                 rsa_keys):
    """jwks_refresh 5 min: the first token naming kid b (published after the broker's first
    fetch) wakes an early fetch, 30 s after the first one (not sooner, however many such
    tokens arrive meanwhile); then kid b is accepted, long before the regular refresh."""
    server, a, bk = jwks_server, rsa_keys.a, rsa_keys.b
    server.serve(a.jwk("a"))
    b = jwks_broker(make_broker, server, refresh="5m", max_stale="1h")
    internal = at(b, "internal")
    assert server.count() == 1
    server.serve(a.jwk("a"), bk.jwk("b"))
    token_b = bk.sign({"sub": "svc-b", "exp": int(time.time()) + 3600}, "b")
    assert codes(internal, token_b, "b0") == REFUSED
    tries = [0]

    def accepted():
        tries[0] += 1
        return codes(internal, token_b, f"b{tries[0]}") == ACCEPTED

    assert wait_until(accepted, 45, step=1.0), f"{server.count()} fetches\n{b.log()}"
    # One early fetch for all those refused tokens, not before 30 s after the first fetch.
    assert server.count() == 2, server.count()
    gap = server.hits[1] - server.hits[0]
    assert 28 <= gap <= 45, gap
    assert tries[0] > 10, tries[0]
    # kid "c" is unknown too, but the last fetch was just now: no fetch for it.
    token_c = bk.sign({"sub": "svc-c", "exp": int(time.time()) + 3600}, "c")
    assert codes(internal, token_c, "c0") == REFUSED
    time.sleep(1)
    assert server.count() == 2


@pytest.mark.parametrize("version", VERSIONS)
def test_a_narrower_token_narrows_a_persistent_sessions_deliveries(fleet, mkc, version):
    """A persistent session subscribed to `fleet/#` under a token whose `sub` claim allowed
    it; the client comes back with a token allowing only `fleet/d1/#`: the subscription stays
    in the session, but only what the new claim covers is delivered (the claim is held on
    every delivery, as the ACL file is)."""
    b = fleet
    internal = at(b, "internal")
    wide = hs256(claims("svc", acl={"pub": [], "sub": ["fleet/#"]}))
    narrow = hs256(claims("svc", acl={"pub": [], "sub": ["fleet/d1/#"]}))
    first = mkc("sess", version, broker=internal, username="x", password=wide, persistent=True)
    first.connect()
    assert first.subscribe("fleet/#", 1) == [1]
    first.close()
    again = mkc.again(first, username="x", password=narrow)
    _, present, _ = again.connect()
    assert present
    pub = mkc("pub", version, broker=internal, username="x",
              password=hs256(claims("svc", acl={"pub": ["fleet/#"], "sub": []})))
    pub.connect()
    pub.publish("fleet/d2/t", b"not any more", qos=1)
    pub.publish("fleet/d1/t", b"still", qos=1)
    m = again.get()
    assert (m.topic, m.payload) == ("fleet/d1/t", b"still")
    again.expect_none(0.3)
