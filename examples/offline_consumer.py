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
import threading
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

COUNT = 5


class Fail(Exception):
    pass


class Endpoint:
    """A paho-mqtt 2.x MQTT 5 client with bounded, blocking connect/subscribe/publish."""

    def __init__(self, client_id, timeout):
        self.timeout = timeout
        self.cond = threading.Condition()
        self.connack = None
        self.acks = {}  # mid -> reason code(s) of SUBACK / PUBACK
        self.messages = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_ack
        self.client.on_publish = self._on_ack
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.connack = (flags, reason_code, properties)
            self.cond.notify_all()

    def _on_ack(self, client, userdata, mid, reason_code, properties):
        with self.cond:
            self.acks[mid] = reason_code
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def wait_until(self, predicate, what):
        with self.cond:
            if not self.cond.wait_for(predicate, timeout=self.timeout):
                raise Fail(f"timed out after {self.timeout}s waiting for {what}")

    def connect(self, host, port, clean_start, properties=None):
        try:
            self.client.connect(
                host, port, keepalive=30, clean_start=clean_start, properties=properties
            )
        except OSError as e:
            raise Fail(f"cannot connect to {host}:{port}: {e} (is the broker running?)")
        self.client.loop_start()
        self.wait_until(lambda: self.connack is not None, "CONNACK")
        flags, reason_code, _ = self.connack
        if reason_code.is_failure:
            raise Fail(f"connection refused: {reason_code}")
        return flags

    def subscribe(self, topic_filter, qos):
        _, mid = self.client.subscribe(topic_filter, qos=qos)
        self.wait_until(lambda: mid in self.acks, "SUBACK")
        granted = self.acks[mid][0]
        if granted.is_failure or granted.value != qos:
            raise Fail(f"subscription to {topic_filter} not granted at QoS {qos}: {granted}")

    def publish(self, topic, payload, qos, properties=None):
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        self.wait_until(lambda: info.mid in self.acks, "PUBACK")
        if self.acks[info.mid].is_failure:
            raise Fail(f"publish refused: {self.acks[info.mid]}")

    def wait_messages(self, count):
        self.wait_until(lambda: len(self.messages) >= count, f"{count} messages")

    def disconnect(self, properties=None):
        self.client.disconnect(properties=properties)
        self.client.loop_stop()


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
