#!/usr/bin/env python3
"""Fan-out: one event reaches every service whose topic filter matches it.

Three services subscribe with different filters:
    audit      events/#                 every event
    mailer     events/+/created         "created" events of any kind
    warehouse  events/orders/created    exactly this topic
One event published once to events/orders/created is received by all three. The publisher
does not know who listens; adding a fourth service needs no change to it.

Run against a broker started with `make run`:
    .venv/bin/python examples/fan_out.py [--host 127.0.0.1] [--port 1883]
Prints OK and exits 0 when the story worked; exits non-zero otherwise.
"""
import argparse
import json
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt

TOPIC = "events/orders/created"
SERVICES = {
    "audit": "events/#",
    "mailer": "events/+/created",
    "warehouse": "events/orders/created",
}


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

    services = {}
    for name, topic_filter in SERVICES.items():
        service = Endpoint(f"{name}-{run_id}", timeout)
        service.connect(host, port, clean_start=True)
        service.subscribe(topic_filter, qos=1)
        services[name] = service
        print(f"{name}: subscribed to {topic_filter}")

    try:
        # The event carries the run id so events from other publishers are ignored here.
        event = json.dumps({"run": run_id, "order": 42, "total": "19.90"}).encode()
        publisher = Endpoint(f"shop-{run_id}", timeout)
        publisher.connect(host, port, clean_start=True)
        publisher.publish(TOPIC, event, qos=1)
        publisher.disconnect()
        print(f"shop: published one event to {TOPIC}")

        def mine(service):
            return [m for m in service.messages if m.payload == event]

        for name, service in services.items():
            service.wait_until(lambda: len(mine(service)) >= 1, f"the event at {name}")
        time.sleep(0.5)  # give a duplicate the chance to show up
        for name, service in services.items():
            copies = mine(service)
            if len(copies) != 1:
                raise Fail(f"{name} received {len(copies)} copies, expected exactly 1")
            print(f"{name}: received {copies[0].payload.decode()} on {copies[0].topic}")
    finally:
        for service in services.values():
            service.disconnect()


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
