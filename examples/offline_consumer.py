#!/usr/bin/env python3
"""Temporal decoupling: a consumer that was offline gets what was published meanwhile.

1. The consumer connects with a persistent session (MQTT 5, Session Expiry Interval 3600 s),
   subscribes to orders with QoS 1, and disconnects.
2. A producer publishes 5 QoS 1 messages while the consumer is away. The broker keeps them in
   the consumer's offline queue.
3. The consumer reconnects with clean_start=False: the broker resumes the session (Session
   Present = 1) and delivers all 5 messages.

Run against a broker started with `make run`:
    .venv/bin/python examples/offline_consumer.py [--host 127.0.0.1] [--port 1883]
Prints OK and exits 0 when the story worked; exits non-zero otherwise.
"""
import argparse
import sys
import uuid

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from endpoint import Endpoint, Fail

COUNT = 5


def run(host, port, timeout):
    run_id = uuid.uuid4().hex[:8]
    consumer_id = f"billing-{run_id}"
    topic = f"examples/offline/{run_id}/orders"

    # 1. The consumer creates a persistent session and subscribes, then goes away.
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600  # keep the session one hour after disconnect
    consumer = Endpoint(consumer_id, timeout)
    consumer.connect(host, port, clean_start=True, properties=props)
    consumer.subscribe(topic, qos=1)
    consumer.disconnect()
    print(f"consumer {consumer_id}: subscribed to {topic} at QoS 1, now offline")

    # 2. The producer publishes while the consumer is offline; it does not wait for it.
    producer = Endpoint(f"shop-{run_id}", timeout)
    producer.connect(host, port, clean_start=True)
    sent = [f"order {n}".encode() for n in range(1, COUNT + 1)]
    for payload in sent:
        producer.publish(topic, payload, qos=1)  # returns once the broker sent PUBACK
    producer.disconnect()
    print(f"producer: published {COUNT} QoS 1 messages, all acknowledged by the broker")

    # 3. The consumer comes back, resumes its session and gets the backlog.
    consumer = Endpoint(consumer_id, timeout)
    flags = consumer.connect(host, port, clean_start=False, properties=props)
    try:
        if not flags.session_present:
            raise Fail("the broker did not resume the session (Session Present = 0)")
        consumer.wait_messages(COUNT)
        got = [m.payload for m in consumer.messages]
        for m in consumer.messages:
            print(f"consumer: received {m.payload.decode()!r} on {m.topic} (QoS {m.qos})")
        if got != sent:
            raise Fail(f"expected {sent}, got {got}")
    finally:
        # Clean up: end the session now instead of leaving it for an hour.
        end = Properties(PacketTypes.DISCONNECT)
        end.SessionExpiryInterval = 0
        consumer.disconnect(properties=end)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per step")
    args = parser.parse_args()
    try:
        run(args.host, args.port, args.timeout)
    except Fail as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
