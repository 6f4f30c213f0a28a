"""Authentication and authorisation against the real broker: `[auth] password_file`,
`acl_file` (Mosquitto syntax), will checks at CONNECT, retained-message filtering, SIGHUP
reloads and refusing to start on malformed files.

Reason codes are read from the raw bytes the broker sends (mqttraw), with one cross-check
through paho's v5 reason codes. Password files are always made with `tern passwd`.
"""
import os
import re
import signal
import subprocess
import time

import pytest

import mqttraw as mr
from conftest import TERN_BIN
from mqttraw import PUBLISH, V311, V5, uid
from pahoutil import metric

VERSIONS = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]

USERS = {
    "alice": "alice-pw",
    "bob": "bob pw with spaces",
    "carol": "c\u00e4rol-pw",
    "writer": "writer-pw",
    "reader": "reader-pw",
    "auditor": "auditor-pw",
}

ACL_BASIC = """\
# anonymous section: intentionally empty

user alice
topic readwrite a/#

user bob
topic read a/b

pattern readwrite users/%u/#
"""


def bad_credentials(version):
    return 0x86 if version == V5 else 4


def not_authorized(version):
    return 0x87 if version == V5 else 5


def sub_refused(version):
    return 0x87 if version == V5 else 0x80


def tern_passwd(path, user, password):
    r = subprocess.run(
        [TERN_BIN, "passwd", str(path), user],
        input=password.encode("utf-8") + b"\n",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")


def write(path, text):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@pytest.fixture
def env(make_broker, tmp_path):
    """Starts brokers with a password file (made by `tern passwd`) and an optional ACL; keeps
    track of raw clients and closes them afterwards."""

    class Env:
        def __init__(self):
            self.clients = []
            self.passwd = tmp_path / "passwd"
            self.acl = tmp_path / "acl"

        def start(self, acl=None, users=("alice", "bob"), allow_anonymous=False,
                  overrides=None):
            for u in users:
                tern_passwd(self.passwd, u, USERS[u])
            auth = {"allow_anonymous": allow_anonymous, "password_file": str(self.passwd)}
            if acl is not None:
                write(self.acl, acl)
                auth["acl_file"] = str(self.acl)
            self.broker = make_broker(dict(overrides or {}, auth=auth))
            return self.broker

        def client(self, version, user=None, password=None, expect_rc=0, cid=None, **kw):
            c = mr.Client.to(self.broker, version)
            self.clients.append(c)
            if user is not None and password is None:
                password = USERS[user]
            c.connect(cid or uid(user or "anon"), expect_rc=expect_rc, username=user,
                      password=password, **kw)
            return c

    e = Env()
    yield e
    for c in e.clients:
        c.close()


def next_publish(c, timeout=5.0):
    """The next PUBLISH the client receives (acknowledged if QoS > 0)."""
    p, _ = c.recv_until(lambda p: p.type == PUBLISH, timeout=timeout)
    if p.qos:
        c.ack_publish(p)
    return p


def expect_next(c, topic, payload, timeout=5.0):
    """The very next message is (topic, payload): nothing else was delivered before it."""
    p = next_publish(c, timeout)
    assert (p.topic, p.payload) == (topic, payload), (
        f"expected {topic!r} {payload!r} next, got {p!r}")
    return p


def closed_after_refusal(c):
    pkts, closed = c.wait_closed(timeout=5)
    assert closed and not pkts, f"connection not closed after a refused CONNECT: {pkts!r}"


def publish_rc(c, topic, payload, qos, pid):
    """Publish and return the reason code of the final acknowledgement (PUBACK, or the PUBREC
    when it is an error, else the PUBCOMP)."""
    ack = c.publish(topic, payload, qos=qos, pid=pid)
    return ack.rc or 0


def wait_log(broker, text, count, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker.log().count(text) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"log never showed {text!r} x{count}:\n{broker.log()}")


# -------------------------------------------------------------------------------------------
# 1. Password file
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_password_file(env, version):
    b = env.start(users=("alice", "bob", "carol"))
    # Good credentials (the file was made by `tern passwd`; passwords with spaces and non-ASCII
    # characters included).
    for user in ("alice", "bob", "carol"):
        c = env.client(version, user)
        assert c.connack.rc == 0
        assert c.ping().type == mr.PINGRESP
        c.disconnect()

    cases = [
        ("wrong password", dict(user="alice", password="alice-pw!"), bad_credentials(version)),
        ("another user's password", dict(user="alice", password=USERS["bob"]),
         bad_credentials(version)),
        ("empty password", dict(user="alice", password=""), bad_credentials(version)),
        ("username without password", dict(user="alice", password=None, nopw=True),
         bad_credentials(version)),
        ("unknown user", dict(user="mallory", password="alice-pw"), bad_credentials(version)),
        ("no username", dict(user=None, password=None), not_authorized(version)),
    ]
    for what, kw, rc in cases:
        c = mr.Client.to(b, version)
        env.clients.append(c)
        password = kw["password"]
        c.send(mr.connect(uid("bad"), version=version, username=kw["user"],
                          password=None if kw.get("nopw") else password))
        p = c.expect(mr.CONNACK)
        assert p.rc == rc, f"{what}: CONNACK rc {p.rc:#x}, expected {rc:#x}: {p!r}"
        assert p.session_present is False, f"{what}: {p!r}"
        closed_after_refusal(c)

    # The broker still serves a good login after the refusals.
    c = env.client(version, "alice")
    c.disconnect()


def test_password_file_reason_codes_seen_by_paho(env):
    """Cross-check with paho: a v5 client sees 0x86 'Bad user name or password' and 0x87
    'Not authorized'."""
    from pahoutil import TClient, V5 as PV5

    b = env.start()
    ok = TClient(b, uid("paho-ok"), PV5, username="alice", password=USERS["alice"])
    bad = TClient(b, uid("paho-bad"), PV5, username="alice", password="nope")
    anon = TClient(b, uid("paho-anon"), PV5)
    try:
        assert ok.connect()[0] == 0
        rc, _, _ = bad.connect(expect_rc=None)
        assert rc == 0x86, hex(rc)
        rc, _, _ = anon.connect(expect_rc=None)
        assert rc == 0x87, hex(rc)
    finally:
        for t in (ok, bad, anon):
            t.c.disconnect()
            t.c.loop_stop()


# -------------------------------------------------------------------------------------------
# 2. ACL: topic rules, patterns, anonymous section
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_acl_rules(env, version):
    b = env.start(ACL_BASIC, allow_anonymous=True)
    refused = sub_refused(version)
    denied_pub = 0x87 if version == V5 else 0
    alice = env.client(version, "alice")
    bob = env.client(version, "bob")

    # bob: '#' is not covered by his rules, a/b is.
    assert bob.subscribe([("#", 1), ("a/b", 1)], pid=1).codes == [refused, 1]
    assert alice.subscribe([("a/#", 1)], pid=2).codes == [1]

    # alice may write a/b and bob may read it.
    assert publish_rc(alice, "a/b", b"from-alice", 1, 10) == 0
    expect_next(bob, "a/b", b"from-alice")
    expect_next(alice, "a/b", b"from-alice")
    # a/c reaches alice but not bob (his '#' was refused, so no duplicate of a/b either).
    assert publish_rc(alice, "a/c", b"not-for-bob", 1, 11) == 0
    expect_next(alice, "a/c", b"not-for-bob")
    assert publish_rc(alice, "a/b", b"marker-1", 1, 12) == 0
    expect_next(bob, "a/b", b"marker-1")
    expect_next(alice, "a/b", b"marker-1")

    # bob may only read a/b: his publishes are refused (v5 0x87; 3.1.1 acknowledged normally)
    # and never delivered, at any QoS.
    bob.publish("a/b", b"bob-qos0", qos=0)
    assert publish_rc(bob, "a/b", b"bob-qos1", 1, 20) == denied_pub
    ack2 = bob.publish("a/b", b"bob-qos2", qos=2, pid=21)
    if version == V5:
        assert ack2.type == mr.PUBREC and ack2.rc == 0x87, ack2
    else:
        assert ack2.type == mr.PUBCOMP and ack2.pubrec.rc == 0, ack2
    assert publish_rc(alice, "a/b", b"marker-2", 1, 13) == 0
    expect_next(alice, "a/b", b"marker-2")
    expect_next(bob, "a/b", b"marker-2")
    assert bob.ping().type == mr.PINGRESP  # the refusals did not cost bob his connection

    # Patterns: users/%u/# for each user, and nothing wider.
    assert alice.subscribe([("users/#", 1), ("users/alice/#", 1), ("users/+/x", 1)],
                           pid=3).codes == [refused, 1, refused]
    assert bob.subscribe([("users/bob/#", 1)], pid=4).codes == [1]
    assert publish_rc(bob, "users/bob/x", b"bob-to-self", 1, 22) == 0
    expect_next(bob, "users/bob/x", b"bob-to-self")
    # alice may not write under bob's tree; her own tree works.
    assert publish_rc(alice, "users/bob/x", b"alice-in-bobs-tree", 1, 14) == denied_pub
    assert publish_rc(alice, "users/alice/y", b"alice-to-self", 1, 15) == 0
    expect_next(alice, "users/alice/y", b"alice-to-self")  # and not bob's users/bob/x
    assert publish_rc(alice, "a/b", b"marker-3", 1, 16) == 0
    expect_next(bob, "a/b", b"marker-3")  # alice's users/bob/x was not delivered
    expect_next(alice, "a/b", b"marker-3")

    # The anonymous section is empty: an anonymous client may connect but read/write nothing.
    anon = env.client(version)
    assert anon.subscribe([("a/b", 1), ("#", 1), ("users/#", 1)], pid=5).codes == [
        refused, refused, refused]
    assert publish_rc(anon, "a/b", b"anon", 1, 30) == denied_pub
    assert publish_rc(alice, "a/b", b"marker-4", 1, 17) == 0
    expect_next(bob, "a/b", b"marker-4")
    expect_next(alice, "a/b", b"marker-4")
    anon.assert_silent(0.3)


# -------------------------------------------------------------------------------------------
# 3. Retained messages
# -------------------------------------------------------------------------------------------
ACL_RETAINED = """\
user writer
topic readwrite #

user reader
topic read +/x
topic deny secret/#

user auditor
topic read #
"""


def collect_until(c, topics_needed, duration_after=0.3, timeout=5.0):
    """PUBLISHes (acknowledged) until every topic in topics_needed arrived, plus whatever
    arrives within duration_after seconds more."""
    got = []
    deadline = time.monotonic() + timeout
    while not set(topics_needed) <= {p.topic for p in got}:
        left = deadline - time.monotonic()
        assert left > 0, f"only got {got!r}, wanted {topics_needed!r}"
        got.append(next_publish(c, left))
    end = time.monotonic() + duration_after
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        try:
            got.append(next_publish(c, left))
        except (mr.Timeout, mr.Closed):
            break
    return got


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_messages_respect_acl(env, version):
    env.start(ACL_RETAINED, users=("writer", "reader", "auditor"))
    refused = sub_refused(version)
    writer = env.client(version, "writer")
    # 0x10 (No matching subscribers) is a success code too.
    assert writer.publish("secret/x", b"classified", qos=1, pid=2, retain=True).rc in (0, 0x10)
    assert writer.publish("other/x", b"public", qos=1, pid=3, retain=True).rc in (0, 0x10)

    # Control: a user who may read everything does get both retained messages.
    auditor = env.client(version, "auditor")
    assert auditor.subscribe([("#", 1)], pid=1).codes == [1]
    got = collect_until(auditor, ["secret/x", "other/x"])
    assert sorted((p.topic, p.payload, p.retain) for p in got) == [
        ("other/x", b"public", True), ("secret/x", b"classified", True)], got

    # The reader may subscribe to +/x (only partly overlapped by the deny) but not to the
    # denied part, nor to anything its read rules do not cover.
    reader = env.client(version, "reader")
    assert reader.subscribe([("secret/x", 1), ("secret/#", 1), ("#", 1), ("+/+", 1)],
                            pid=1).codes == [refused] * 4
    assert reader.subscribe([("+/x", 1)], pid=2).codes == [1]
    got = collect_until(reader, ["other/x"], duration_after=0.5)
    assert [(p.topic, p.payload, p.retain) for p in got] == [("other/x", b"public", True)], (
        f"retained delivery to reader: {got!r}")

    # Live messages follow the same rule.
    writer.publish("secret/x", b"live-secret", qos=1, pid=4)
    writer.publish("other/x", b"live-public", qos=1, pid=5)
    expect_next(reader, "other/x", b"live-public")
    expect_next(auditor, "secret/x", b"live-secret")
    expect_next(auditor, "other/x", b"live-public")

    # A second subscribe to the same filter re-sends retained messages: still filtered.
    assert reader.subscribe([("+/x", 1)], pid=3).codes == [1]
    got = collect_until(reader, ["other/x"], duration_after=0.5)
    assert [(p.topic, p.payload) for p in got] == [("other/x", b"public")], got


# -------------------------------------------------------------------------------------------
# 4. Will messages
# -------------------------------------------------------------------------------------------
ACL_WILL = """\
user carol
topic readwrite c/#
topic read r/#
"""


@pytest.mark.parametrize("version", VERSIONS)
def test_will_topic_needs_write_access(env, version):
    b = env.start(ACL_WILL, users=("carol",))
    for topic in ("x/forbidden", "r/read-only", "cc/x"):
        c = mr.Client.to(b, version)
        env.clients.append(c)
        c.send(mr.connect(uid("will"), version=version, username="carol",
                          password=USERS["carol"],
                          will=dict(topic=topic, payload=b"bye", qos=1)))
        p = c.expect(mr.CONNACK)
        assert p.rc == not_authorized(version), f"will on {topic}: {p!r}"
        closed_after_refusal(c)

    # A will where carol may write is accepted and published when she goes away abruptly.
    watcher = env.client(version, "carol")
    assert watcher.subscribe([("c/#", 1)], pid=1).codes == [1]
    dying = env.client(version, "carol", will=dict(topic="c/will", payload=b"bye", qos=1))
    dying.abort()
    expect_next(watcher, "c/will", b"bye")


# -------------------------------------------------------------------------------------------
# 5. SIGHUP reload
# -------------------------------------------------------------------------------------------
ACL_BEFORE = """\
user alice
topic readwrite a/#
user bob
topic read a/b
user carol
topic read a/#
"""

ACL_AFTER = """\
user alice
topic readwrite a/#
user bob
topic readwrite a/b
user dave
topic read a/#
"""

# Would let bob write anywhere if any of it were applied.
ACL_BROKEN = """\
user bob
topic readwrite #
topic raed a/#
"""

RELOADED = "password file and ACL reloaded"
RELOAD_FAILED = "auth reload failed"


def test_sighup_reload_applies_to_connected_clients(env):
    b = env.start(ACL_BEFORE, users=("alice", "bob", "carol"))
    alice = env.client(V311, "alice")
    bob = env.client(V5, "bob")
    carol = env.client(V5, "carol")
    assert alice.subscribe([("a/#", 1)], pid=1).codes == [1]
    assert bob.subscribe([("a/b", 1)], pid=1).codes == [1]
    assert carol.subscribe([("a/#", 1)], pid=1).codes == [1]

    # Before: bob may not write a/b; dave does not exist.
    assert publish_rc(bob, "a/b", b"too-early", 1, 1) == 0x87
    assert publish_rc(alice, "a/b", b"m0", 1, 1) == 0
    for c in (alice, bob, carol):
        expect_next(c, "a/b", b"m0")
    c = env.client(V5, "dave", password="dave-pw", expect_rc=0x86)
    closed_after_refusal(c)

    # Reload: bob gains write on a/b, carol loses read, dave is added.
    write(env.acl, ACL_AFTER)
    tern_passwd(env.passwd, "dave", "dave-pw")
    b.proc.send_signal(signal.SIGHUP)
    wait_log(b, RELOADED, 1)

    assert publish_rc(bob, "a/b", b"after-reload", 1, 2) == 0
    expect_next(alice, "a/b", b"after-reload")
    expect_next(bob, "a/b", b"after-reload")
    assert publish_rc(bob, "a/c", b"still-denied", 1, 3) == 0x87
    # carol's existing subscription no longer delivers (checked per message) ...
    carol.assert_silent(0.5)
    # ... and she cannot subscribe anew.
    assert carol.subscribe([("a/b", 1)], pid=2).codes == [0x87]
    dave = env.client(V5, "dave", password="dave-pw")
    assert dave.subscribe([("a/#", 1)], pid=1).codes == [1]
    # Nobody was disconnected: the same sockets still answer.
    for c in (alice, bob, carol):
        assert c.ping().type == mr.PINGRESP
    assert b.log().count(RELOAD_FAILED) == 0

    # A reload with a syntax error is refused and the previous rules stay in force.
    write(env.acl, ACL_BROKEN)
    b.proc.send_signal(signal.SIGHUP)
    wait_log(b, RELOAD_FAILED, 1)
    assert b.log().count(RELOADED) == 1, b.log()
    assert publish_rc(bob, "a/x", b"broken-grant", 1, 4) == 0x87
    assert publish_rc(bob, "a/b", b"still-allowed", 1, 5) == 0
    expect_next(alice, "a/b", b"still-allowed")  # not bob's a/x before it
    expect_next(bob, "a/b", b"still-allowed")
    expect_next(dave, "a/b", b"still-allowed")
    carol.assert_silent(0.3)
    for c in (alice, bob, carol, dave):
        assert c.ping().type == mr.PINGRESP
    assert b.alive()


ACL_QUEUE_BEFORE = """\
user alice
topic readwrite a/#
user carol
topic read a/#
"""

ACL_QUEUE_AFTER = """\
user alice
topic readwrite a/#
user carol
topic read a/open
"""


@pytest.mark.parametrize("version", VERSIONS)
def test_sighup_applies_to_messages_queued_for_offline_session(env, version):
    """Deliveries are checked per message at delivery time: a message queued for an offline
    persistent session before a reload that revokes read access is not delivered after it."""
    b = env.start(ACL_QUEUE_BEFORE, users=("alice", "carol"))
    cid = uid("carol-persistent")
    kw = dict(clean=False)
    if version == V5:
        kw["properties"] = {mr.SESSION_EXPIRY_INTERVAL: 300}
    carol = env.client(version, "carol", cid=cid, **kw)
    assert carol.subscribe([("a/#", 1)], pid=1).codes == [1]
    carol.disconnect()
    alice = env.client(version, "alice")
    time.sleep(0.2)  # let the broker finish closing carol's connection
    assert publish_rc(alice, "a/secret", b"queued-secret", 1, 1) in (0, 0x10)
    assert publish_rc(alice, "a/open", b"queued-open", 1, 2) in (0, 0x10)

    write(env.acl, ACL_QUEUE_AFTER)
    b.proc.send_signal(signal.SIGHUP)
    wait_log(b, RELOADED, 1)

    carol = env.client(version, "carol", cid=cid, **kw)
    assert carol.connack.session_present is True, carol.connack
    expect_next(carol, "a/open", b"queued-open")
    carol.assert_silent(0.5)


def dropped_not_authorized(b):
    return metric(b, "tern_messages_dropped_total", {"reason": "not_authorized"})


@pytest.mark.parametrize("durability", ["os", "memory"])
@pytest.mark.parametrize("filt", ["a/#", "$share/g/a/#"], ids=["plain", "shared"])
@pytest.mark.parametrize("version", VERSIONS)
def test_sighup_applies_to_in_flight_messages_resent_on_reconnect(env, version, filt, durability):
    """A reload that revokes read access also covers messages that were sent but not
    acknowledged when the client went away: on its return the broker does not re-send them
    (QoS 1 unacknowledged, QoS 2 before PUBREC; counted as dropped, not_authorized). The
    exchanges it must finish still go: the PUBREL of a QoS 2 message the client already
    PUBREC'd, and the DUP re-send of a message the client may still read. A revoked QoS 2
    message may be closed with a PUBREL (frees the packet id a client that did get it still
    holds), never re-sent as a PUBLISH."""
    b = env.start(ACL_QUEUE_BEFORE, users=("alice", "carol"),
                  overrides={"storage": {"durability": durability}})
    cid = uid("carol-inflight")
    kw = dict(clean=False)
    if version == V5:
        kw["properties"] = {mr.SESSION_EXPIRY_INTERVAL: 300}
    carol = env.client(version, "carol", cid=cid, **kw)
    assert carol.subscribe([(filt, 2)], pid=1).codes == [2]
    alice = env.client(version, "alice")

    def sent_to_carol(topic, payload, qos, pid):
        assert publish_rc(alice, topic, payload, qos, pid) in (0, 0x10)
        p, _ = carol.recv_until(lambda p: p.type == PUBLISH)
        assert (p.topic, p.payload, p.qos) == (topic, payload, qos), p
        return p

    sent_to_carol("a/open", b"open-1", 1, 1)            # not acknowledged; still readable
    sent_to_carol("a/secret", b"secret-1", 1, 2)        # not acknowledged
    q2_sent = sent_to_carol("a/secret", b"secret-2", 2, 3)  # no PUBREC
    q2_recd = sent_to_carol("a/secret", b"secret-3", 2, 4)  # PUBREC'd, PUBREL seen, no PUBCOMP
    carol.send(mr.pubrec(q2_recd.pid, version))
    assert carol.expect_ack(mr.PUBREL).pid == q2_recd.pid
    time.sleep(0.2)  # let the broker store the PUBREL state
    carol.abort()
    time.sleep(0.2)  # let the broker finish closing carol's connection
    dropped_before = dropped_not_authorized(b)

    write(env.acl, ACL_QUEUE_AFTER)
    b.proc.send_signal(signal.SIGHUP)
    wait_log(b, RELOADED, 1)

    carol = env.client(version, "carol", cid=cid, **kw)
    assert carol.connack.session_present is True, carol.connack
    got = carol.collect(1.0)
    leaked = [p for p in got if p.type == PUBLISH and p.topic == "a/secret"]
    assert not leaked, f"revoked in-flight messages re-sent after the reload: {leaked!r}"
    opened = [p for p in got if p.type == PUBLISH]
    assert [(p.topic, p.payload) for p in opened] == [("a/open", b"open-1")], got
    rels = [p.pid for p in got if p.type == mr.PUBREL]
    assert q2_recd.pid in rels, f"PUBREL of a PUBREC'd message not re-sent: {got!r}"
    assert set(rels) <= {q2_recd.pid, q2_sent.pid}, got
    assert len(got) == len(opened) + len(rels), got
    for p in opened:
        carol.ack_publish(p)
    for pid in rels:
        carol.send(mr.pubcomp(pid, version))
    # Both revoked messages that were not finished count as dropped, not authorized.
    deadline = time.monotonic() + 5
    while dropped_not_authorized(b) - dropped_before < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dropped_not_authorized(b) - dropped_before == 2

    # The session goes on: packet ids freed by the dropped messages are reused safely.
    for i in range(4):
        payload = b"after-%d" % i
        assert publish_rc(alice, "a/open", payload, 2, 10 + i) == 0
        expect_next(carol, "a/open", payload)
    assert publish_rc(alice, "a/secret", b"after-secret", 1, 20) in (0, 0x10)
    carol.assert_silent(0.3)
    assert carol.ping().type == mr.PINGRESP


@pytest.mark.parametrize("version", VERSIONS)
def test_restored_offline_session_keeps_its_user_for_acl_checks(env, version):
    """A persistent session recovered after a restart is checked against the ACL as the user
    it last connected as: a message published to it while its client is still away (after the
    restart) is acknowledged, queued and delivered, not dropped as not authorized."""
    b = env.start(ACL_QUEUE_BEFORE, users=("alice", "carol"))
    cid = uid("carol-restart")
    kw = dict(clean=False)
    if version == V5:
        kw["properties"] = {mr.SESSION_EXPIRY_INTERVAL: 300}
    carol = env.client(version, "carol", cid=cid, **kw)
    assert carol.subscribe([("a/#", 1)], pid=1).codes == [1]
    carol.disconnect()
    time.sleep(0.2)  # let the broker store carol's disconnect
    b.stop()
    b.start()
    alice = env.client(version, "alice")
    assert publish_rc(alice, "a/open", b"after-restart", 1, 1) == 0
    carol = env.client(version, "carol", cid=cid, **kw)
    assert carol.connack.session_present is True, carol.connack
    expect_next(carol, "a/open", b"after-restart")


# -------------------------------------------------------------------------------------------
# 6. Refusing to start on malformed files
# -------------------------------------------------------------------------------------------
def run_tern_expecting_failure(tmp_path, password_file, acl_file):
    cfg = tmp_path / "tern.toml"
    cfg.write_text(
        "[listeners.tcp]\nbind = \"127.0.0.1:0\"\n"
        "[metrics]\nbind = \"127.0.0.1:0\"\n"
        f"[storage]\ndir = \"{tmp_path / 'data'}\"\n"
        "[auth]\nallow_anonymous = false\n"
        f"password_file = \"{password_file}\"\nacl_file = \"{acl_file}\"\n")
    proc = subprocess.Popen([TERN_BIN, "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("tern kept running despite a malformed auth file:\n" + out)
    assert "tern: ready" not in out, out
    assert proc.returncode != 0, out
    return out


def names_line(out, path, line):
    return (f"{path}:{line}" in out
            or re.search(rf"{re.escape(str(path))}\D[^\n]*\bline {line}\b", out) is not None)


def test_refuses_to_start_with_malformed_acl(tmp_path):
    passwd = tmp_path / "passwd"
    tern_passwd(passwd, "alice", USERS["alice"])
    acl = tmp_path / "acl"
    acl.write_text("# comment\nuser alice\ntopic readwrite a/#\n\ntopic raed b/#\n")
    out = run_tern_expecting_failure(tmp_path, passwd, acl)
    assert names_line(out, acl, 5), out

    acl.write_text("user alice\nfrobnicate a/#\n")
    out = run_tern_expecting_failure(tmp_path, passwd, acl)
    assert names_line(out, acl, 2), out

    missing = tmp_path / "no-such-acl"
    out = run_tern_expecting_failure(tmp_path, passwd, missing)
    assert str(missing) in out, out


def test_refuses_to_start_with_malformed_password_file(tmp_path):
    passwd = tmp_path / "passwd"
    tern_passwd(passwd, "alice", USERS["alice"])
    tern_passwd(passwd, "bob", USERS["bob"])
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite a/#\n")
    good = passwd.read_text()
    passwd.write_text(good + "this line has no colon\n")
    out = run_tern_expecting_failure(tmp_path, passwd, acl)
    assert names_line(out, passwd, 3), out

    passwd.write_text("# users\n" + good.splitlines()[0] + "\nbob:$7$not-a-hash\n")
    out = run_tern_expecting_failure(tmp_path, passwd, acl)
    assert names_line(out, passwd, 3), out

    missing = tmp_path / "no-such-passwd"
    out = run_tern_expecting_failure(tmp_path, missing, acl)
    assert str(missing) in out, out
