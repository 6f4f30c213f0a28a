"""`tern migrate` (docs/migrating-from-mosquitto.md): a Mosquitto site's configuration, with its
password file, ACL file and certificates, migrated and served by Tern.

The site: a plain listener and a TLS listener asking for client certificates (certificates made
with openssl by certs/gen.sh in the test's directory), users in a password file made with
`tern passwd`, an ACL, persistence, limits, and a bridge (to a port nothing listens on: it keeps
retrying, which is all a bridge does until its remote is there). Ports are free loopback ports
picked before the file is written, since `listener 0` means a unix socket to Mosquitto.
"""
import os
import queue
import re
import socket
import stat
import subprocess
import threading
import time
import types

import pytest

from conftest import TERN_BIN, gen_certs
from pahoutil import V311, V5, TClient

VERSIONS = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]

ACL = """\
# devices/ for alice (read only), everything for the publisher
user alice
topic read devices/#

user bob
topic readwrite #
"""

CONF = """\
# The edge broker of site 17
listener {tcp} 127.0.0.1
listener {tls} 127.0.0.1
cafile {ca}
certfile {cert}
keyfile {key}
require_certificate true

allow_anonymous false
password_file {passwd}
acl_file {acl}

persistence true
persistence_location {data}
autosave_interval 300
max_inflight_messages 40
max_queued_messages 5000
message_size_limit 262144
persistent_client_expiration 14d
sys_interval 30
log_type error
log_type warning
log_type information
log_dest stdout

connection cloud
address 127.0.0.1:{remote}
topic sensors/# out 1 "" site17/
topic cmd/# in 1 "" site17/
remote_username edge17
remote_password s3cr3t uplink
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tern(*args, stdin=b"", env=None):
    return subprocess.run([TERN_BIN, *map(str, args)], input=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60, env=env)


def line_of(text, start):
    """1-based number of the first line of `text` starting with `start`."""
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith(start):
            return i
    raise AssertionError(f"no line starting with {start!r}")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("mosquitto")
    certs = gen_certs(d / "certs")
    passwd = d / "passwd"
    for user, pw in [("alice", "alice-pw"), ("bob", "bob-pw")]:
        r = tern("passwd", "-b", passwd, user, pw)
        assert r.returncode == 0, r.stderr
    (d / "acl").write_text(ACL)
    ports = types.SimpleNamespace(tcp=free_port(), tls=free_port(), remote=free_port())
    conf = CONF.format(tcp=ports.tcp, tls=ports.tls, remote=ports.remote, ca=certs.ca_pem,
                       cert=certs.server_pem, key=certs.server_key, passwd=passwd,
                       acl=d / "acl", data=d / "data")
    (d / "mosquitto.conf").write_text(conf)
    out = d / "tern" / "tern.toml"
    out.parent.mkdir()
    r = tern("migrate", d / "mosquitto.conf", "-o", out)
    return types.SimpleNamespace(dir=d, certs=certs, ports=ports, conf=conf, out=out, run=r)


def test_migrate_writes_the_config_and_lists_what_it_could_not_map(site):
    r = site.run
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"", "with -o the TOML goes to the file"
    err = r.stderr.decode().splitlines()
    name = str(site.dir / "mosquitto.conf")
    # One line per directive not mapped, FILE:LINE: DIRECTIVE: why, then the count.
    *reports, summary = err
    for line in reports:
        assert re.match(rf"^{re.escape(name)}:\d+: [a-z_.0-9]+: \S", line), line
    assert summary.startswith(f"tern migrate: wrote {site.out}, 1 bridge password file"), summary
    assert summary.endswith(f"; {len(reports)} directives not mapped (listed above)"), summary

    def reported(directive):
        n = line_of(site.conf, directive + " ")
        found = [l for l in reports if l.startswith(f"{name}:{n}: {directive}: ")]
        assert found, f"{directive} (line {n}) not reported:\n" + "\n".join(err)
        return found[0]

    assert "periodic save" in reported("autosave_interval")
    assert "standard error" in reported("log_dest")
    assert "headroom" in reported("message_size_limit")
    assert "bridge:cloud" in reported("connection")
    assert not any(": max_inflight_messages: " in l for l in reports)

    text = site.out.read_text()
    assert 'acl_mode = "per_message"' in text
    assert f'password_file = "{site.dir / "passwd"}"' in text, "the paths are kept"
    assert "s3cr3t" not in text, "the bridge's password is not in the configuration"
    # ... but in its own file beside it, readable by its owner only.
    secret = site.out.parent / "bridge-cloud.secret"
    assert secret.read_bytes() == b"s3cr3t uplink"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert f'secret_file = "{secret}"' in text
    # What was not mapped is also in the file, as comments.
    assert f"#   {name}:{line_of(site.conf, 'autosave_interval')}: autosave_interval:" in text


def test_stdout_and_an_unknown_directive(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text("listener 1883 127.0.0.1\nfrobnicate yes\n"
                    "connection c\naddress h\ntopic a/# out\nremote_password pw\n")
    r = tern("migrate", conf)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith("# Tern configuration migrated from")
    assert "[listeners.tcp]" in r.stdout.decode()
    err = r.stderr.decode()
    assert f"{conf}:2: frobnicate: not a Mosquitto 2.0 directive" in err
    # On standard output the password cannot go to a file of its own: the user is told.
    assert f"{conf}:6: remote_password: " in err and "bridge-c.secret" in err
    assert os.listdir(tmp_path) == ["m.conf"], "nothing written beside it"
    r = tern("migrate", tmp_path / "missing.conf")
    assert r.returncode == 2
    assert b"missing.conf" in r.stderr


def test_include_dir_is_followed(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "b.conf").write_text("max_queued_messages 77\n")
    (tmp_path / "conf.d" / "a.conf").write_text("\nbogus 1\n")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener 1883 127.0.0.1\ninclude_dir {tmp_path / 'conf.d'}\n")
    r = tern("migrate", conf)
    assert r.returncode == 0, r.stderr
    assert "max_queued_messages = 77" in r.stdout.decode()
    assert f"{tmp_path / 'conf.d' / 'a.conf'}:2: bogus: " in r.stderr.decode()


@pytest.fixture(scope="module")
def broker(site):
    """Tern on the migrated configuration, checked first by `tern check`."""
    env = dict(os.environ, TERN__METRICS__BIND="127.0.0.1:0")
    r = tern("check", "--config", site.out, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr).decode() + site.out.read_text()
    assert b"configuration OK" in r.stdout
    proc = subprocess.Popen([TERN_BIN, "--config", str(site.out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    listeners = None
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("tern: ready "):
            listeners = {m.group(1): types.SimpleNamespace(host=m.group(2), port=int(m.group(3)))
                         for m in re.finditer(r"(\w+)=(\S+):(\d+)", line)}
            break
    if listeners is None:
        proc.kill()
        raise AssertionError("tern did not become ready:\n" + "".join(lines)
                             + proc.stdout.read())
    # Keep reading its output so it never blocks on a full pipe.
    threading.Thread(target=lambda: [lines.append(l) for l in proc.stdout], daemon=True).start()
    yield types.SimpleNamespace(proc=proc, listeners=listeners, log=lines)
    alive = proc.poll() is None
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert alive, "tern died during the tests:\n" + "".join(lines)


def client(b, site, listener, name, version, user, password):
    c = TClient(b.listeners[listener], name, protocol=version, username=user, password=password)
    if listener == "tls":
        c.c.tls_set(ca_certs=site.certs.ca_pem, certfile=site.certs.client_pem,
                    keyfile=site.certs.client_key)
    return c


def test_the_listeners_are_where_mosquitto_had_them(site, broker):
    assert broker.listeners["tcp"].port == site.ports.tcp
    assert broker.listeners["tls"].port == site.ports.tls
    assert (site.dir / "data" / "tern").is_dir(), "storage.dir from persistence_location"


@pytest.mark.parametrize("version", VERSIONS)
def test_users_and_acl_serve_the_same_clients(site, broker, version):
    """alice, allowed to read devices/# only, subscribes to # as she did on Mosquitto (over TLS
    with her certificate); bob publishes on the plain listener. She is granted the subscription
    and gets the devices/ messages only."""
    v = "5" if version == V5 else "311"
    alice = client(broker, site, "tls", f"alice-{v}", version, "alice", "alice-pw")
    bob = client(broker, site, "tcp", f"bob-{v}", version, "bob", "bob-pw")
    try:
        alice.connect()
        assert alice.subscribe("#", qos=1) == [1], "granted, as on Mosquitto"
        bob.connect()
        for topic in ["devices/d1/temp", "other/secret", "devices/d2/temp"]:
            bob.publish(topic, topic.encode(), qos=1)
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                got.append(alice.messages.get(timeout=0.2).topic)
            except queue.Empty:
                pass
        # The marker comes after the others on the same connection: once alice has it, she
        # would have had other/secret too.
        bob.publish("devices/end", b"", qos=1)
        end = alice.messages.get(timeout=5).topic
        assert got == ["devices/d1/temp", "devices/d2/temp"] and end == "devices/end"
        assert alice.messages.empty()
    finally:
        alice.c.disconnect()
        bob.c.disconnect()
        alice.c.loop_stop()
        bob.c.loop_stop()


@pytest.mark.parametrize("version", VERSIONS)
def test_wrong_password_and_anonymous_are_refused(site, broker, version):
    v = "5" if version == V5 else "311"
    wrong = client(broker, site, "tcp", f"mallory-{v}", version, "alice", "guess")
    anon = client(broker, site, "tcp", f"anon-{v}", version, None, None)
    try:
        # Tern: bad user name or password (Mosquitto says not authorized: the page's "Refused
        # CONNECT"). paho reports 3.1.1's return codes 4 and 5 as 0x86 and 0x87 too.
        rc, _, _ = wrong.connect(expect_rc=None)
        assert rc == 0x86, hex(rc)
        rc, _, _ = anon.connect(expect_rc=None)
        assert rc == 0x87, hex(rc)
    finally:
        wrong.c.loop_stop()
        anon.c.loop_stop()
