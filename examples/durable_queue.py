#!/usr/bin/env python3
"""Temporal decoupling all the way: a consumer that did not exist yet gets what was published.

The "2 AM order": with plain MQTT a message published before any subscriber exists is gone.
A declared queue (`[[queues]]` in the configuration, docs/queues.md) collects it instead.

1. The order service publishes 5 QoS 1 orders to examples/queue/<run id>/orders. Nobody has
   ever subscribed to them: each is still acknowledged with PUBACK 0x00, because the queue
   `examples` (declared in config/default.toml for this example) stored it.
2. The email service connects for the first time ever and subscribes to $queue/examples: the
   5 orders arrive, in order.

Run against a broker started with `make run`:
    .venv/bin/python examples/durable_queue.py [--host 127.0.0.1] [--port 1883]
Prints OK and exits 0 when the story worked; exits non-zero otherwise. The queue is shared by
every run: orders an earlier, interrupted run left in it are taken and skipped.
"""
import argparse
import sys
import time
import uuid

from endpoint import Endpoint, Fail

COUNT = 5


def run(host, port, timeout):
    run_id = uuid.uuid4().hex[:8]
    topic = f"examples/queue/{run_id}/orders"

    # 1. The producer publishes while no consumer of these orders exists anywhere.
    producer = Endpoint(f"order-service-{run_id}", timeout)
    producer.connect(host, port, clean_start=True)
    sent = [f"order {n}".encode() for n in range(1, COUNT + 1)]
    for payload in sent:
        producer.publish(topic, payload, qos=1)  # PUBACK 0x00: stored in the queue
    producer.disconnect()
    print(f"order service: published {COUNT} QoS 1 orders to {topic}, all acknowledged")

    # 2. The consumer, deployed later, subscribes to the queue for the first time.
    consumer = Endpoint(f"email-service-{run_id}", timeout)
    consumer.connect(host, port, clean_start=True)
    try:
        try:
            consumer.subscribe("$queue/examples", qos=1)
        except Fail as e:
            raise Fail(f"{e}: is the queue `examples` declared (config/default.toml)?")
        print("email service: subscribed to $queue/examples for the first time")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ours = [m.payload for m in list(consumer.messages) if m.topic == topic]
            if len(ours) >= COUNT:
                break
            time.sleep(0.05)
        ours = [m for m in list(consumer.messages) if m.topic == topic]
        for m in ours:
            print(f"email service: received {m.payload.decode()!r} on {m.topic} (QoS {m.qos})")
        got = [m.payload for m in ours]
        if got != sent:
            raise Fail(f"expected {sent}, got {got}")
    finally:
        consumer.disconnect()


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
