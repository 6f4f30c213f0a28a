"""Tern against real third-party command line clients: mosquitto_sub / mosquitto_pub /
mosquitto_rr (libmosquitto) speaking MQTT 3.1.1 and 5.0.

mosquitto_sub runs with -d so the test can see its SUBACK before publishing; message lines are
printed with a "MSG|" prefix through -F. Every subprocess has a timeout.
"""
import queue
import shutil
import subprocess
import threading
import time

import pytest

from pahoutil import V5, ClientFactory, PacketTypes, props

pytestmark = pytest.mark.skipif(
    not (shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub")),
    reason="mosquitto-clients not installed (make clients)")

STDBUF = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
VERSIONS = {"311": "mqttv311", "5": "mqttv5"}
FMT = "MSG|%t|%q|%r|%p"


def base(broker, version, client_id):
    return ["-h", "127.0.0.1", "-p", str(broker.port), "-V", VERSIONS[version], "-i", client_id]


class Sub:
    """A running mosquitto_sub. Lines of its stdout go to a queue."""

    def __init__(self, broker, version, client_id, topics, qos=0, count=None, extra=(),
                 fmt=FMT, wait_subscribed=True):
        # stdout is a pipe: make mosquitto_sub line-buffered so its SUBACK line shows up now.
        cmd = [*STDBUF, "mosquitto_sub", *base(broker, version, client_id), "-d", "-q", str(qos),
               "-F", fmt, "-W", "15"]
        for t in topics:
            cmd += ["-t", t]
        if count is not None:
            cmd += ["-C", str(count)]
        cmd += list(extra)
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.lines = queue.Queue()
        self.all = []
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()
        if wait_subscribed:
            self.wait_for("received SUBACK")

    def _pump(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.all.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text, timeout=8):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"mosquitto_sub: no {text!r} within {timeout}s:\n"
                                     + "\n".join(self.all))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"mosquitto_sub exited before {text!r}:\n"
                                     + "\n".join(self.all))
            if text in line:
                return line

    def finish(self, timeout=10):
        """Wait for the process to exit (-C reached); return its parsed MSG lines."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("mosquitto_sub did not exit:\n" + "\n".join(self.all))
        self._t.join(2)
        assert rc == 0, f"mosquitto_sub rc={rc}:\n" + "\n".join(self.all)
        return self.messages()

    def messages(self):
        out = []
        for line in self.all:
            if line.startswith("MSG|"):
                out.append(tuple(line.split("|")[1:]))
        return out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def pub(broker, version, client_id, topic, qos=0, message=None, lines=None, extra=()):
    """Run mosquitto_pub to completion; returns its debug output."""
    cmd = ["mosquitto_pub", *base(broker, version, client_id), "-d", "-q", str(qos), "-t", topic]
    stdin = None
    if lines is not None:
        cmd += ["-l"]
        stdin = "".join(l + "\n" for l in lines).encode()
    elif message is None:
        cmd += ["-n"]
    else:
        cmd += ["-m", message]
    cmd += list(extra)
    r = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=15)
    out = r.stdout.decode("utf-8", "replace")
    assert r.returncode == 0, f"mosquitto_pub rc={r.returncode}:\n{out}"
    assert "received CONNACK (0)" in out, out
    return out


@pytest.fixture
def subs():
    made = []
    yield made
    for s in made:
        s.kill()


@pytest.mark.parametrize("sub_v,pub_v,qos", [
    ("311", "311", 0), ("311", "311", 1), ("311", "311", 2),
    ("5", "5", 0), ("5", "5", 1), ("5", "5", 2),
    ("311", "5", 2), ("5", "311", 1),
])
def test_sub_receives_what_pub_sends(broker, subs, request, sub_v, pub_v, qos):
    """mosquitto_sub -C 3 receives the three messages mosquitto_pub sends, in order, at the
    requested QoS, with complete QoS 1 (PUBACK) / QoS 2 (PUBREC, PUBCOMP) handshakes."""
    topic = f"cli/{sub_v}/{pub_v}/{qos}"
    s = Sub(broker, sub_v, f"s-{sub_v}{pub_v}{qos}", [topic], qos=qos, count=3)
    subs.append(s)
    out = pub(broker, pub_v, f"p-{sub_v}{pub_v}{qos}", topic, qos=qos,
              lines=["first", "second", "third"])
    if qos == 1:
        assert out.count("received PUBACK") == 3, out
    if qos == 2:
        assert out.count("received PUBREC") == 3, out
        assert out.count("received PUBCOMP") == 3, out
    got = s.finish()
    assert got == [(topic, str(qos), "0", p) for p in ("first", "second", "third")]
    if qos == 1:
        assert sum("sending PUBACK" in l for l in s.all) == 3
    if qos == 2:
        assert sum("sending PUBREC" in l for l in s.all) == 3
        assert sum("received PUBREL" in l for l in s.all) == 3
        assert sum("sending PUBCOMP" in l for l in s.all) == 3


@pytest.mark.parametrize("v", ["311", "5"])
def test_qos_downgraded_to_subscription(broker, subs, v):
    """A QoS 2 publish reaches a QoS 0 / QoS 1 subscriber at the subscription's QoS."""
    s0 = Sub(broker, v, f"d0-{v}", ["down/t"], qos=0, count=1)
    s1 = Sub(broker, v, f"d1-{v}", ["down/t"], qos=1, count=1)
    subs += [s0, s1]
    pub(broker, v, f"dp-{v}", "down/t", qos=2, message="m")
    assert s0.finish() == [("down/t", "0", "0", "m")]
    assert s1.finish() == [("down/t", "1", "0", "m")]


@pytest.mark.parametrize("v", ["311", "5"])
def test_retained_with_r(broker, subs, v):
    """mosquitto_pub -r stores a retained message a later mosquitto_sub gets with RETAIN=1;
    -r -n deletes it, so the next subscriber only gets live messages (RETAIN=0)."""
    pub(broker, v, f"rp-{v}", "cliret/t", qos=1, message="kept", extra=["-r"])
    s = Sub(broker, v, f"rs-{v}", ["cliret/t"], qos=1, count=1)
    subs.append(s)
    assert s.finish() == [("cliret/t", "1", "1", "kept")]
    pub(broker, v, f"rp2-{v}", "cliret/t", qos=1, message="newer", extra=["-r"])
    s = Sub(broker, v, f"rs2-{v}", ["cliret/#"], qos=0, count=1)
    subs.append(s)
    assert s.finish() == [("cliret/t", "0", "1", "newer")]
    pub(broker, v, f"rp3-{v}", "cliret/t", qos=1, extra=["-r"])  # -n: empty retained deletes
    s = Sub(broker, v, f"rs3-{v}", ["cliret/t"], qos=1, count=1)
    subs.append(s)
    time.sleep(0.3)
    pub(broker, v, f"rp4-{v}", "cliret/t", qos=1, message="live")
    assert s.finish() == [("cliret/t", "1", "0", "live")]


@pytest.mark.parametrize("v", ["311", "5"])
def test_persistent_session_queue(broker, subs, v):
    """mosquitto_sub -c (persistent session; v5 with -x 60) subscribes and exits; QoS 1 messages
    published meanwhile are delivered when it comes back; QoS 0 ones are not."""
    cid = f"persist-{v}"
    extra = ["-c"] + (["-x", "60"] if v == "5" else [])
    first = Sub(broker, v, cid, ["clip/t"], qos=1, extra=extra + ["-E"], wait_subscribed=False)
    subs.append(first)
    assert first.finish() == []
    pub(broker, v, f"pp-{v}", "clip/t", qos=1, lines=["a", "b"])
    pub(broker, v, f"pq-{v}", "clip/t", qos=0, message="zero")
    pub(broker, v, f"pr-{v}", "clip/t", qos=1, message="c")
    again = Sub(broker, v, cid, ["clip/t"], qos=1, count=3, extra=extra, wait_subscribed=False)
    subs.append(again)
    got = again.finish()
    assert got == [("clip/t", "1", "0", p) for p in ("a", "b", "c")]
    assert any("received CONNACK (0)" in l or "received CONNACK" in l for l in again.all)


def test_wildcards_cli(broker, subs):
    """mosquitto_sub with '+' and '#' filters; '#' does not get a client publish to "$SYS/x"."""
    s = Sub(broker, "311", "wild", ["cliw/+/x", "cliw/a/#", "#"], qos=1, count=3)
    subs.append(s)
    pub(broker, "5", "wp1", "$SYS/x", qos=1, message="sys")
    pub(broker, "311", "wp2", "cliw/b/x", qos=1, message="one")
    pub(broker, "5", "wp3", "cliw/a", qos=1, message="two")
    pub(broker, "311", "wp4", "other", qos=0, message="three")
    got = s.finish()
    assert got == [("cliw/b/x", "1", "0", "one"), ("cliw/a", "1", "0", "two"),
                   ("other", "0", "0", "three")]


def test_v5_properties_through_cli(broker, subs):
    """User properties, content type, response topic and correlation data set by mosquitto_pub
    -D reach mosquitto_sub unaltered [MQTT-3.3.2-17] [MQTT-3.3.2-20]."""
    s = Sub(broker, "5", "props-sub", ["cliprops/t"], qos=1, count=1,
            fmt="MSG|%t|%P|%C|%R|%D|%p")
    subs.append(s)
    pub(broker, "5", "props-pub", "cliprops/t", qos=1, message="body", extra=[
        "-D", "publish", "user-property", "k1", "v1",
        "-D", "publish", "user-property", "k2", "v2",
        "-D", "publish", "content-type", "text/plain",
        "-D", "publish", "response-topic", "cliprops/resp",
        "-D", "publish", "correlation-data", "abc123",
    ])
    got = s.finish()
    assert len(got) == 1
    topic, ups, ctype, rtopic, corr, payload = got[0]
    assert topic == "cliprops/t" and payload == "body"
    assert ups == "k1:v1 k2:v2"  # mosquitto_sub prints user properties as "k:v k:v", in order
    assert (ctype, rtopic, corr) == ("text/plain", "cliprops/resp", "abc123")


def test_mosquitto_rr_request_response(broker, request):
    """mosquitto_rr (v5 request/response) gets the answer of a paho responder that replies to
    the Response Topic with the Correlation Data."""
    if not shutil.which("mosquitto_rr"):
        pytest.skip("mosquitto_rr not installed")
    f = ClientFactory(broker, request.node.name)
    try:
        srv = f("srv", V5)
        srv.connect()
        srv.subscribe("clirr/req", 1)
        answered = threading.Event()

        def respond():
            m = srv.get(timeout=10)
            p = props(PacketTypes.PUBLISH)
            if hasattr(m.properties, "CorrelationData"):
                p.CorrelationData = m.properties.CorrelationData
            srv.publish(m.properties.ResponseTopic, b"pong:" + m.payload, qos=1, properties=p)
            answered.set()

        t = threading.Thread(target=respond, daemon=True)
        t.start()
        r = subprocess.run(["mosquitto_rr", "-h", "127.0.0.1", "-p", str(broker.port),
                            "-i", "rr-client", "-t", "clirr/req", "-e", "clirr/resp/rr-client",
                            "-m", "ping", "-q", "1", "-W", "10"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=15)
        out = r.stdout.decode("utf-8", "replace")
        assert r.returncode == 0, out
        assert out.strip() == "pong:ping"
        t.join(5)
        assert answered.is_set()
    finally:
        f.close()
