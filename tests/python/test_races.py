"""Something that happens right after a disconnect must see that disconnect (issue 13).

Found by an independent broker suite: a client that sends DISCONNECT and connects again at once
raced the broker, which could handle the new CONNECT (a takeover of the old connection) before
it had read the DISCONNECT on the old socket:
  * v5 DISCONNECT with Session Expiry 0, then CONNECT with clean start 0: CONNACK said Session
    Present 1 (4 of 7 runs) although the session had ended;
  * a normal DISCONNECT (0x00), then an immediate CONNECT: the will was published (2 of 7),
    which [MQTT-3.14.4-3] forbids.

Each test writes DISCONNECT and the new CONNECT back to back (two sockets, no wait between) and
repeats it, so that the broker sees the new CONNECT first most of the time. Raw sockets, so the
bytes go out exactly then. Both protocol versions where the scenario exists.
"""
import pytest

from mqttraw import (
    CONNACK, V311, V5, Client, connect, disconnect, uid, Timeout,
)

SESSION_EXPIRY = 0x11
ROUNDS = 15
BOTH = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]


def test_session_ended_at_disconnect_is_not_present_after_an_immediate_reconnect(broker):
    """v5: CONNECT with Session Expiry 3600, DISCONNECT setting it to 0 (MQTT 5.0 3.1.2.11.2:
    the session ends when the connection closes), and CONNECT with clean start 0 at once:
    Session Present must be 0 ([MQTT-3.2.2-2] a new session), every round."""
    for r in range(ROUNDS):
        cid = uid("race-sp")
        a = Client.to(broker, V5)
        a.connect(cid, clean=False, properties={SESSION_EXPIRY: 3600})
        a.subscribe([("race/sp", 1)])
        b = Client.to(broker, V5)
        # Back to back: DISCONNECT on the old socket, CONNECT on the new one.
        a.send(disconnect(V5, 0, {SESSION_EXPIRY: 0}))
        b.send(connect(cid, version=V5, clean=False, properties={SESSION_EXPIRY: 3600}))
        ack = b.expect(CONNACK)
        assert ack.rc == 0, ack
        assert not ack.session_present, f"round {r}: session present after it ended"
        a.close()
        b.disconnect(0, {SESSION_EXPIRY: 0})


@pytest.mark.parametrize("version", BOTH)
def test_no_will_after_a_normal_disconnect_and_an_immediate_reconnect(broker, version):
    """DISCONNECT (0x00) then CONNECT with the same client id at once: the old connection ended
    normally, so its will is never published ([MQTT-3.14.4-3]), however the two race."""
    watcher = Client.to(broker, version)
    watcher.connect(uid("race-w"))
    topic = f"race/will/{uid('t')}"
    watcher.subscribe([(topic, 1)])
    for r in range(ROUNDS):
        cid = uid("race-will")
        will = dict(topic=topic, payload=f"will-{r}".encode(), qos=1)
        a = Client.to(broker, version)
        a.connect(cid, clean=True, will=will)
        b = Client.to(broker, version)
        a.send(disconnect(version, 0 if version == V5 else None))
        b.send(connect(cid, version=version, clean=True))
        assert b.expect(CONNACK).rc == 0
        a.close()
        b.disconnect()
    # A published will would have arrived by now; give it a moment more.
    try:
        p = watcher.recv(timeout=1.0)
    except Timeout:
        p = None
    assert p is None, f"will published after a normal DISCONNECT: {p!r}"
    watcher.disconnect()


@pytest.mark.parametrize("version", BOTH)
def test_will_still_published_when_taken_over_without_disconnect(broker, version):
    """The counterpart: a connection taken over without DISCONNECT is a lost connection, and
    its will is published ([MQTT-3.1.2-8]); so the fix above did not just silence wills."""
    watcher = Client.to(broker, version)
    watcher.connect(uid("race-w2"))
    topic = f"race/will2/{uid('t')}"
    watcher.subscribe([(topic, 1)])
    cid = uid("race-take")
    a = Client.to(broker, version)
    a.connect(cid, clean=True, will=dict(topic=topic, payload=b"lost", qos=1))
    b = Client.to(broker, version)
    b.connect(cid, clean=True)
    p = watcher.recv(timeout=5.0)
    assert p.topic == topic and p.payload == b"lost", p
    a.close()
    b.disconnect()
    watcher.disconnect()
