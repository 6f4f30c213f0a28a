#!/usr/bin/env python3
"""Writes the committed seed corpus: hand-built MQTT 3.1.1 / 5.0 packets as raw bytes.

Run from fuzz/: python3 gen_corpus.py  (rewrites corpus/decode/, corpus/connection/ and
corpus/differential/). Every file starts with the target's selector byte (see
fuzz_targets/*.rs):
  decode:       0 = before CONNECT, 1 = MQTT 3.1.1, 2 = MQTT 5.0
  connection:   0 = input carries its own CONNECT, 1 = 3.1.1 prefix, 2/3 = 5.0 prefixes
  differential: 0 = MQTT 3.1.1, 1 = MQTT 5.0 (a CONNECT is read with its own version)
"""
import os
import struct

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)

def s(text):
    b = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(b)) + b

def u16(n): return struct.pack(">H", n)
def u32(n): return struct.pack(">I", n)

def pkt(first, body):
    return bytes([first]) + varint(len(body)) + body

def props(*items):
    body = b"".join(items)
    return varint(len(body)) + body

# property encoders (id, value)
def p_byte(i, v): return bytes([i, v])
def p_u16(i, v): return bytes([i]) + u16(v)
def p_u32(i, v): return bytes([i]) + u32(v)
def p_str(i, v): return bytes([i]) + s(v)
def p_var(i, v): return bytes([i]) + varint(v)
def p_user(k, v): return bytes([0x26]) + s(k) + s(v)

def connect(version=4, client_id="c1", clean=True, keep_alive=60, will=None, user=None,
            password=None, properties=b"", name="MQTT"):
    flags = 0x02 if clean else 0
    payload = s(client_id)
    if will:
        topic, msg, qos, retain, wprops = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        if version == 5:
            payload += props(wprops)
        payload += s(topic) + s(msg)
    if user is not None:
        flags |= 0x80
        payload += s(user)
    if password is not None:
        flags |= 0x40
        payload += s(password)
    body = s(name) + bytes([version, flags]) + u16(keep_alive)
    if version == 5:
        body += props(properties)
    return pkt(0x10, body + payload)

def publish(topic, payload=b"", qos=0, pid=1, retain=False, dup=False, v5=False, properties=b""):
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    body = s(topic)
    if qos:
        body += u16(pid)
    if v5:
        body += props(properties)
    return pkt(first, body + (payload.encode() if isinstance(payload, str) else payload))

def pubresp(kind, pid, v5=False, reason=None, properties=None):
    first = {4: 0x40, 5: 0x50, 6: 0x62, 7: 0x70}[kind]
    body = u16(pid)
    if v5 and reason is not None:
        body += bytes([reason])
        if properties is not None:
            body += props(properties)
    return pkt(first, body)

def subscribe(pid, filters, v5=False, properties=b""):
    body = u16(pid)
    if v5:
        body += props(properties)
    for f, opts in filters:
        body += s(f) + bytes([opts])
    return pkt(0x82, body)

def unsubscribe(pid, filters, v5=False, properties=b""):
    body = u16(pid)
    if v5:
        body += props(properties)
    for f in filters:
        body += s(f)
    return pkt(0xA2, body)

PINGREQ = pkt(0xC0, b"")

def disconnect(v5=False, reason=None, properties=None):
    if not v5 or reason is None:
        return pkt(0xE0, b"")
    body = bytes([reason])
    if properties is not None:
        body += props(properties)
    return pkt(0xE0, body)

def auth(reason=0x18, properties=b""):
    return pkt(0xF0, bytes([reason]) + props(properties))

# --- packets ------------------------------------------------------------------------------
C311 = connect(4, "seed311")
C311_WILL = connect(4, "seed311w", will=("will/t", "bye", 1, True, b""), user="u", password="p")
C311_PERSIST = connect(4, "seed311p", clean=False, keep_alive=0)
C31 = connect(3, "seed31", name="MQIsdp")
C311_EMPTY_ID = connect(4, "")
C5 = connect(5, "seed5", properties=p_u32(0x11, 300) + p_u16(0x21, 10) + p_u16(0x22, 5)
             + p_byte(0x19, 1) + p_byte(0x17, 1) + p_u32(0x27, 2048) + p_user("k", "v"))
C5_WILL = connect(5, "seed5w", will=("will/v5", "gone", 2, False,
                                     p_u32(0x18, 5) + p_byte(0x01, 1) + p_str(0x03, "text/plain")
                                     + p_str(0x08, "resp/t") + p_str(0x09, "corr")
                                     + p_u32(0x02, 60)),
                  user="u5", password="p5", properties=p_u32(0x11, 0))
C5_AUTH = connect(5, "seed5a", properties=p_str(0x15, "SCRAM-SHA-1") + p_str(0x16, "data"))
C5_EMPTY_ID = connect(5, "", clean=True)

P311 = [
    publish("a/b", "hello"),
    publish("a/b", "retained", retain=True),
    publish("a/b", "", retain=True),
    publish("q1/t", "one", qos=1, pid=1),
    publish("q2/t", "two", qos=2, pid=2),
    publish("q2/t", "two", qos=2, pid=2, dup=True),
    pubresp(6, 2),
    pubresp(4, 1), pubresp(5, 3), pubresp(7, 3),
    subscribe(3, [("a/#", 0), ("+/t", 1), ("q2/t", 2), ("$SYS/#", 0)]),
    unsubscribe(4, ["a/#", "+/t"]),
    PINGREQ,
    disconnect(),
]
P5 = [
    publish("a/b", "hello", v5=True),
    publish("a/b", "retained", retain=True, v5=True, properties=p_u32(0x02, 30)),
    publish("alias/t", "x", v5=True, properties=p_u16(0x23, 1)),
    publish("", "y", v5=True, properties=p_u16(0x23, 1)),
    publish("rr/t", "req", qos=1, pid=7, v5=True,
            properties=p_str(0x08, "reply/seed5") + p_str(0x09, "id-1") + p_byte(0x01, 1)
            + p_str(0x03, "application/json") + p_user("a", "b")),
    publish("q2/t", "two", qos=2, pid=8, v5=True),
    pubresp(6, 8, v5=True, reason=0),
    pubresp(4, 1, v5=True, reason=0x10, properties=p_str(0x1F, "no subscribers")),
    pubresp(5, 2, v5=True),
    pubresp(7, 2, v5=True, reason=0x92, properties=b""),
    subscribe(9, [("a/#", 0x01), ("x/+", 0x06), ("$share/g/s/t", 0x02), ("q2/t", 0x2E)],
              v5=True, properties=p_var(0x0B, 42) + p_user("sub", "x")),
    unsubscribe(10, ["a/#", "$share/g/s/t"], v5=True, properties=p_user("u", "v")),
    PINGREQ,
    auth(0x19, p_str(0x15, "SCRAM-SHA-1")),
    disconnect(v5=True, reason=0x04, properties=p_u32(0x11, 10) + p_str(0x1F, "bye")),
    disconnect(v5=True),
]

def write(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

# --- decode: one packet per file, plus a few streams ----------------------------------------
for name, c in [("connect_v311", C311), ("connect_v311_will_auth", C311_WILL),
                ("connect_v311_persist", C311_PERSIST), ("connect_v31", C31),
                ("connect_v311_empty_id", C311_EMPTY_ID), ("connect_v5_props", C5),
                ("connect_v5_will", C5_WILL), ("connect_v5_auth", C5_AUTH),
                ("connect_v5_empty_id", C5_EMPTY_ID)]:
    write("decode", name, b"\x00" + c)
names311 = ["publish_q0", "publish_retain", "publish_retain_clear", "publish_q1", "publish_q2",
            "publish_q2_dup", "pubrel", "puback", "pubrec", "pubcomp", "subscribe",
            "unsubscribe", "pingreq", "disconnect"]
for name, p in zip(names311, P311):
    write("decode", "v311_" + name, b"\x01" + p)
names5 = ["publish_q0", "publish_retain_expiry", "publish_alias_set", "publish_alias_use",
          "publish_request", "publish_q2", "pubrel", "puback_reason", "pubrec", "pubcomp_reason",
          "subscribe_options", "unsubscribe", "pingreq", "auth", "disconnect_reason",
          "disconnect"]
for name, p in zip(names5, P5):
    write("decode", "v5_" + name, b"\x02" + p)
write("decode", "stream_v311", b"\x00" + C311 + b"".join(P311))
write("decode", "stream_v5", b"\x00" + C5 + b"".join(P5))
write("decode", "v311_split_publish", b"\x01" + P311[3] + P311[4][:5])

# --- connection: whole sessions -------------------------------------------------------------
def session311(*ps): return b"".join(ps)
write("connection", "own_connect_v311", b"\x00" + C311 + b"".join(P311))
write("connection", "own_connect_v311_will", b"\x00" + C311_WILL + P311[3] + P311[12])
write("connection", "own_connect_v311_persist", b"\x00" + C311_PERSIST + P311[10] + P311[3])
write("connection", "own_connect_v31", b"\x00" + C31 + P311[0] + P311[13])
write("connection", "own_connect_v311_empty_id", b"\x00" + C311_EMPTY_ID + P311[12])
write("connection", "own_connect_v5", b"\x00" + C5 + b"".join(P5))
write("connection", "own_connect_v5_will", b"\x00" + C5_WILL + P5[0])
write("connection", "own_connect_v5_auth", b"\x00" + C5_AUTH + P5[13])
write("connection", "own_connect_v5_empty_id", b"\x00" + C5_EMPTY_ID + P5[12])
write("connection", "bad_first_packet", b"\x00" + P311[0])
write("connection", "v311_sub_pub_loop", b"\x01" + P311[10] + P311[0] + P311[1] + P311[3]
      + P311[4] + P311[6] + P311[7] + P311[8] + P311[9])
write("connection", "v311_retain_then_sub", b"\x01" + P311[1] + P311[10] + P311[2])
write("connection", "v311_qos2_flow", b"\x01" + P311[4] + P311[5] + P311[6])
write("connection", "v311_unsub_ping_disc", b"\x01" + P311[11] + P311[12] + P311[13])
write("connection", "v311_second_connect", b"\x01" + C311)
write("connection", "v5_sub_pub_loop", b"\x02" + P5[10] + P5[0] + P5[1] + P5[4] + P5[5] + P5[6]
      + P5[7] + P5[8] + P5[9])
write("connection", "v5_alias", b"\x02" + P5[10] + P5[2] + P5[3])
write("connection", "v5_request_response", b"\x02"
      + subscribe(1, [("reply/fuzz5/#", 0x01)], v5=True) + P5[4])
write("connection", "v5_auth_disconnect", b"\x02" + P5[13] + P5[14])
write("connection", "v5_receive_max", b"\x03" + P5[10]
      + b"".join(publish("x/a", str(i), qos=1, pid=i + 1, v5=True) for i in range(4)))
write("connection", "v5_unsub_disc", b"\x03" + P5[11] + P5[15])

# --- differential: the same packets, selector 0 = 3.1.1, 1 = 5.0 ----------------------------
for name, c, sel in [("connect_v311", C311, b"\x00"), ("connect_v311_will_auth", C311_WILL, b"\x00"),
                     ("connect_v311_persist", C311_PERSIST, b"\x00"),
                     ("connect_v311_empty_id", C311_EMPTY_ID, b"\x00"),
                     ("connect_v5_props", C5, b"\x01"), ("connect_v5_will", C5_WILL, b"\x01"),
                     ("connect_v5_auth", C5_AUTH, b"\x01"), ("connect_v5_empty_id", C5_EMPTY_ID, b"\x01")]:
    write("differential", name, sel + c)
for name, p in zip(names311, P311):
    write("differential", "v311_" + name, b"\x00" + p)
for name, p in zip(names5, P5):
    write("differential", "v5_" + name, b"\x01" + p)
write("differential", "stream_v311", b"\x00" + C311 + b"".join(P311))
write("differential", "stream_v5", b"\x01" + C5 + b"".join(P5))
write("differential", "v5_puback_props", b"\x01"
      + pubresp(4, 3, v5=True, reason=0x10, properties=p_str(0x1F, "r") + p_user("k", "v")))
write("differential", "v5_subscribe_id", b"\x01"
      + subscribe(5, [("a/+", 0x15)], v5=True, properties=p_var(0x0B, 300)))
