"""What only MQTT 3.1.1 (and 3.1) has, as seen by a real library client, paho-mqtt 2.x: the
MQTT 3.1 protocol name "MQIsdp" and the refusal of an empty ClientId without a clean session.
The scenarios 3.1.1 shares with 5.0 are written once, for both, in test_paho.py.

Each test gets its own broker process (conftest `broker` / `make_broker`) on ephemeral loopback
ports. Statement ids such as [MQTT-3.1.3-8] refer to the MQTT 3.1.1 specification.
"""
import re
import time

import pytest

from pahoutil import (TIMEOUT, V31, V311, V5, ClientFactory)

P = V311


# --------------------------------------------------------------------------- connect


@pytest.mark.parametrize("partner", [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")])
def test_mqtt31_mqisdp_client_can_publish_and_subscribe(mk, partner):
    """An MQTT 3.1 client (protocol name MQIsdp, level 3) is accepted and can exchange messages
    with a 3.1.1 or a 5.0 client."""
    old = mk("v31", V31)
    old.c._client_id = b"v31-old"
    rc, sp, _ = old.connect()
    assert rc == 0
    assert old.subscribe("v31/t", 1) == [1]
    new = mk("p", partner)
    new.connect()
    assert new.subscribe("v31/back", 1) == [1]
    new.publish("v31/t", b"to-31", qos=1)
    m = old.get()
    assert (m.topic, m.payload, m.qos) == ("v31/t", b"to-31", 1)
    old.publish("v31/back", b"from-31", qos=1)
    m = new.get()
    assert (m.topic, m.payload, m.qos) == ("v31/back", b"from-31", 1)


def test_empty_client_id_without_clean_session_rejected(mk):
    """A zero-byte ClientId with CleanSession=0 is refused with CONNACK return code 0x02
    (identifier rejected) [MQTT-3.1.3-8]."""
    c = mk("emptyp", P, clean_session=False)
    c.c._client_id = b""
    # paho retries with a random id after a 0x02 refusal when reconnect_on_failure is on; the
    # refusal itself is visible in its log line "Received CONNACK (flags, 2)".
    c.c._reconnect_on_failure = True
    c.c.connect(c.broker.host, c.broker.port, 60)
    c.c.loop_start()
    deadline = time.monotonic() + TIMEOUT
    pat = re.compile(r"Received CONNACK \((0|False), 2\)")
    while time.monotonic() < deadline and not any(pat.search(l) for l in c.log_lines):
        time.sleep(0.05)
    assert any(pat.search(l) for l in c.log_lines), c.log_lines
    c.c._reconnect_on_failure = False
