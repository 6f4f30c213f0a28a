"""The small blocking MQTT 5 client (paho-mqtt 2.x) the examples share: every wait is bounded
by a timeout, and failures raise `Fail` with a message for the reader."""
import threading

import paho.mqtt.client as mqtt


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
