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
import time
import uuid

from endpoint import Endpoint, Fail


TOPIC = "events/orders/created"
SERVICES = {
    "audit": "events/#",
    "mailer": "events/+/created",
    "warehouse": "events/orders/created",
}


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
