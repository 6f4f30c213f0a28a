#!/usr/bin/env python3
"""Request-reply over MQTT 5: Response Topic + Correlation Data.

- A responder (a "time service") subscribes to service/time/request.
- A requester connects asking for Response Information (Request Response Information = 1).
  The broker answers with a reply topic reserved for this client, "reply/<client id>" by
  default (mqtt.response_prefix); if it returns none, the requester uses "reply/<client id>".
  The requester subscribes to that topic.
- The requester publishes a request carrying Response Topic and a random Correlation Data.
- The responder publishes its answer to the Response Topic, copying the Correlation Data.
- The requester matches the answer to its request by the Correlation Data.

Neither side knows the other's address or identity; the broker carries both directions.

Run against a broker started with `make run`:
    .venv/bin/python examples/request_reply.py [--host 127.0.0.1] [--port 1883]
Prints OK and exits 0 when the story worked; exits non-zero otherwise.
"""
import argparse
import datetime
import os
import sys
import uuid

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from endpoint import Endpoint, Fail

REQUEST_TOPIC = "service/time/request"


def start_responder(host, port, timeout, client_id):
    responder = Endpoint(client_id, timeout)

    def on_request(client, userdata, msg):
        response_topic = getattr(msg.properties, "ResponseTopic", None)
        if not response_topic:
            return  # not a request we can answer
        reply = Properties(PacketTypes.PUBLISH)
        correlation = getattr(msg.properties, "CorrelationData", None)
        if correlation is not None:
            reply.CorrelationData = correlation  # copied untouched
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        client.publish(response_topic, now.encode(), qos=1, properties=reply)
        print(f"responder: answered a request on {response_topic}")

    responder.client.on_message = on_request
    responder.connect(host, port, clean_start=True)
    responder.subscribe(REQUEST_TOPIC, qos=1)
    print(f"responder: subscribed to {REQUEST_TOPIC}")
    return responder


def run(host, port, timeout):
    run_id = uuid.uuid4().hex[:8]
    responder = start_responder(host, port, timeout, f"time-service-{run_id}")
    requester = None
    try:
        requester_id = f"dashboard-{run_id}"
        requester = Endpoint(requester_id, timeout)
        props = Properties(PacketTypes.CONNECT)
        props.RequestResponseInformation = 1
        requester.connect(host, port, clean_start=True, properties=props)
        _, _, connack_props = requester.connack
        response_info = getattr(connack_props, "ResponseInformation", None)
        if response_info:
            response_topic = response_info
            print(f"requester: broker gave Response Information {response_info!r}")
        else:
            response_topic = f"reply/{requester_id}"
            print(f"requester: no Response Information, using {response_topic!r}")
        requester.subscribe(response_topic, qos=1)

        correlation = os.urandom(16)
        request = Properties(PacketTypes.PUBLISH)
        request.ResponseTopic = response_topic
        request.CorrelationData = correlation
        requester.publish(REQUEST_TOPIC, b"what time is it?", qos=1, properties=request)
        print(f"requester: sent request, correlation data {correlation.hex()}")

        requester.wait_messages(1)
        answer = requester.messages[0]
        got = getattr(answer.properties, "CorrelationData", None)
        if answer.topic != response_topic:
            raise Fail(f"answer arrived on {answer.topic!r}, expected {response_topic!r}")
        if got != correlation:
            raise Fail(f"correlation data mismatch: sent {correlation!r}, got {got!r}")
        print(f"requester: got answer {answer.payload.decode()!r}, correlation data matches")
    finally:
        if requester is not None:
            requester.disconnect()
        responder.disconnect()


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
