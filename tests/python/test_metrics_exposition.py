"""The /metrics exposition as Prometheus tooling reads it (issue 18, operator basics), against
the real binary, parsed by the official Python client's parser
(`prometheus_client.parser.text_string_to_metric_families`).

The format rules: every family has one HELP and one TYPE line; no two families collide once
the parser has normalised their names (a counter `X_total` is family `X`, so a gauge `X` next
to it is merged into it and one of them is lost); counters end in `_total`; `le` labels only
on histogram buckets; every name says its unit (or the thing it counts), except 0/1 gauges and
`_info`. Then the metrics issue 18 added are driven by real traffic: connections per listener,
closes by reason, queued bytes, the TLS certificate's expiry (and its reload), reload results,
and CPU seconds that move by less than a second. `exported_names()` is the set the dashboard
and alert tests (test_deploy.py) check their queries against. Every wait is bounded.
"""
import os
import re
import socket
import ssl
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mqttraw as mr
from conftest import gen_certs
from mqttraw import uid
from test_operations import http_get, reload, scrape, wait_line
from test_tls import raw_tls_connect

TIMEOUT = 10

# Words that say what a metric measures: a unit (seconds, bytes) or the thing counted.
UNITS = {
    "seconds", "bytes", "messages", "connections", "sessions", "subscriptions", "packets",
    "handshakes", "members", "consumers", "errors", "failures", "pauses", "publishes",
    "deliveries", "takeovers", "remakes", "commits", "syncs", "ops", "reconnects", "submits",
    "reservations", "fds", "threads", "reloads", "checks",
}
QUEUE_EXTRA = '[[queues]]\nname = "expo"\nfilter = "expo/q/#"\n'
BRIDGE_EXTRA = ('[[bridges]]\nname = "expo"\naddress = "127.0.0.1:1"\n'
                'out = [{ filter = "expo/b/#" }]\n')


def families(text):
    return list(text_string_to_metric_families(text))


def check_exposition(text):
    """Every format rule above, on one exposition; returns the parsed families."""
    help_lines = re.findall(r"^# HELP (\S+) ", text, re.M)
    type_lines = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
    assert len(help_lines) == len(set(help_lines)), "a HELP line twice"
    assert len(type_lines) == len({n for n, _ in type_lines}), "a TYPE line twice"
    typed = dict(type_lines)
    assert set(help_lines) == set(typed), (set(help_lines) ^ set(typed))
    fams = families(text)
    names = [f.name for f in fams]
    # The parser merges a gauge X with a counter X_total (both family X): then there are fewer
    # families than TYPE lines, or a name twice.
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert len(fams) == len(typed), (len(fams), len(typed))
    declared = set(typed)
    for f in fams:
        assert f.documentation, f"{f.name}: no HELP text"
        assert f.type in ("counter", "gauge", "histogram", "summary"), (f.name, f.type)
    for name, kind in typed.items():
        base = name[:-len("_total")] if name.endswith("_total") else name
        if kind == "counter":
            assert name.endswith("_total"), f"counter {name} without _total"
        else:
            assert not name.endswith("_total"), f"{kind} {name} ends in _total"
            # X (not a counter) next to a counter X_total: the collision of issue 18.
            assert f"{name}_total" not in declared, f"{name} collides with {name}_total"
        words = set(base.split("_"))
        boolean = re.match(r"1 (while|when|if)\b", _help(text, name) or "")
        assert words & UNITS or name.endswith("_info") or boolean, \
            f"{name}: no unit in its name (one of {sorted(UNITS)}), and not a 0/1 gauge"
    for f in fams:
        for s in f.samples:
            if "le" in s.labels:
                assert f.type == "histogram" and s.name.endswith("_bucket"), \
                    f"`le` on {s.name} ({f.type}): only histogram buckets have it"
            if "quantile" in s.labels:
                assert f.type == "summary", s.name
            if f.type == "counter":
                assert s.name.endswith(("_total", "_created")), s.name
    return fams


def _help(text, name):
    m = re.search(r"^# HELP " + re.escape(name) + r" (.*)$", text, re.M)
    return m.group(1) if m else None


def exported_names(text):
    """Every sample name of an exposition (histograms: `_bucket`, `_sum`, `_count`)."""
    return {s.name for f in families(text) for s in f.samples} | set(
        re.findall(r"^# TYPE (\S+) ", text, re.M))


def full_broker(make_broker, tmp_path, **listeners):
    """A broker with every kind of family present: TLS and WebSocket listeners, a declared
    queue, a bridge (to a port where nothing listens) and, once a client subscribes, a shared
    group."""
    certs = gen_certs(tmp_path / "certs")
    overrides = {
        "listeners.tls": {"bind": "127.0.0.1:0", "cert": certs.server_pem,
                          "key": certs.server_key},
        "listeners.ws": {"bind": "127.0.0.1:0"},
    }
    overrides.update(listeners)
    b = make_broker(overrides, extra=QUEUE_EXTRA + BRIDGE_EXTRA)
    b.certs = certs
    ready = next(l for l in b.log_lines if "tern: ready" in l)
    b.tls_port = int(re.search(r" tls=\S+:(\d+)", ready).group(1))
    b.ws_port = int(re.search(r" ws=\S+:(\d+)", ready).group(1))
    return b


def wait_for(b, pred, what, timeout=TIMEOUT):
    """Scrapes until pred(snap) holds; returns that snap."""
    deadline = time.monotonic() + timeout
    while True:
        snap = scrape(b)
        if pred(snap):
            return snap
        assert time.monotonic() < deadline, f"{what}:\n{snap.text}"
        time.sleep(0.05)


def test_the_exposition_follows_the_prometheus_rules(make_broker, tmp_path):
    b = full_broker(make_broker, tmp_path)
    c = mr.Client.to(b, mr.V5)
    c.connect(uid("expo"))
    c.subscribe([("$share/g/expo/s/#", 1)])
    status, text, _ = http_get(b, "/metrics")
    assert status == 200
    fams = check_exposition(text)
    names = {f.name for f in fams}
    # The families issue 18 added or renamed are there (the parser drops counters' _total).
    for name in ["tern_connections_open", "tern_connections_accepted",
                 "tern_connections_closed", "tern_listener_connections_open",
                 "tern_queued_bytes", "tern_tls_certificate_expiry_timestamp_seconds",
                 "tern_config_reloads", "tern_config_last_reload_success_timestamp_seconds",
                 "tern_config_last_reload_successful", "tern_sessions_by_queue_depth",
                 "tern_queue_max_messages", "tern_bridge_max_queued_messages",
                 "tern_shared_queued_messages", "tern_bridge_queued_messages",
                 "process_cpu_seconds"]:
        assert name in names, f"{name} missing:\n{text}"
    # The old names are gone.
    for old in ["tern_connections", "tern_session_queue_depth", "tern_shared_queued",
                "tern_bridge_queued"]:
        assert old not in names, old
    c.disconnect()


def test_the_checks_catch_what_issue_18_found():
    """The rules fail on the exposition Tern had before: a gauge and a counter merged into one
    family, and a gauge with an `le` label."""
    before = ("# HELP tern_connections Client connections open now\n"
              "# TYPE tern_connections gauge\ntern_connections 1\n"
              "# HELP tern_connections_total Client connections accepted\n"
              "# TYPE tern_connections_total counter\ntern_connections_total 3\n")
    with pytest.raises(AssertionError, match="tern_connections"):
        check_exposition(before)
    le_gauge = ("# HELP tern_sessions_by_queue_depth Sessions\n"
                "# TYPE tern_sessions_by_queue_depth gauge\n"
                'tern_sessions_by_queue_depth{le="10"} 1\n')
    with pytest.raises(AssertionError, match="`le` on"):
        check_exposition(le_gauge)
    unitless = ("# HELP tern_bridge_queued Waiting\n# TYPE tern_bridge_queued gauge\n"
                "tern_bridge_queued 1\n")
    with pytest.raises(AssertionError, match="no unit"):
        check_exposition(unitless)


def test_connections_per_listener_and_closes_by_reason(make_broker, tmp_path):
    b = full_broker(make_broker, tmp_path)
    s0 = scrape(b)

    def closed(snap, reason):
        return snap.v("tern_connections_closed_total", reason=reason)

    tcp = [mr.Client.to(b, mr.V5) for _ in range(2)]
    for c in tcp:
        c.connect(uid("lst"))
    tls = raw_tls_connect(b.tls_port, b.certs.ca_pem)
    tls.sendall(mr.connect(uid("lst-tls")))
    ws = socket.create_connection(("127.0.0.1", b.ws_port), timeout=TIMEOUT)
    snap = wait_for(b, lambda s: s.get("tern_listener_connections_open", listener="tcp") == 2
                    and s.get("tern_listener_connections_open", listener="tls") == 1
                    and s.get("tern_listener_connections_open", listener="ws") == 1
                    # 2 TCP and the TLS one once its CONNECT is handled; the WebSocket socket
                    # has not upgraded, so it is on its listener's gauge only.
                    and s.get("tern_connections_open") == 3,
                    "per-listener gauges")
    # Closes, one reason each.
    tcp[0].send(mr.disconnect(mr.V5))
    tcp[0].wait_closed()
    tcp[1].sock.close()  # no DISCONNECT: the connection is lost
    taken = uid("taken")
    first = mr.Client.to(b, mr.V311)
    first.connect(taken)
    second = mr.Client.to(b, mr.V311)
    second.connect(taken)
    first.wait_closed()
    bad = mr.Client.to(b, mr.V311)
    bad.connect(uid("bad"))
    bad.send(bytes([0xF0, 0x00]))  # packet type 15 is reserved: a protocol error
    bad.wait_closed()
    snap = wait_for(b, lambda s: all(closed(s, r) - closed(s0, r) >= 1 for r in
                                     ("client_disconnect", "connection_lost", "taken_over",
                                      "protocol_error")), "closes by reason")
    for r in ("client_disconnect", "connection_lost", "taken_over", "protocol_error"):
        assert closed(snap, r) - closed(s0, r) == 1, (r, snap.text)
    assert closed(snap, "keepalive_timeout") == closed(s0, "keepalive_timeout")
    tls.close()
    ws.close()
    second.close()
    wait_for(b, lambda s: s.get("tern_listener_connections_open", listener="tcp") == 0
             and s.get("tern_listener_connections_open", listener="tls") == 0
             and s.get("tern_listener_connections_open", listener="ws") == 0,
             "listener gauges back at 0")


def test_keepalive_timeouts_are_counted(broker):
    s0 = scrape(broker)
    c = mr.Client.to(broker, mr.V311)
    c.connect(uid("ka"), keepalive=1)
    c.wait_closed(timeout=TIMEOUT)  # silent for 1.5 keep alives
    wait_for(broker, lambda s: s.v("tern_connections_closed_total", reason="keepalive_timeout")
             == s0.v("tern_connections_closed_total", reason="keepalive_timeout") + 1,
             "keepalive_timeout counted")


def test_queued_bytes_follow_an_offline_queue(broker):
    cid = uid("qb")
    sub = mr.Client.to(broker, mr.V311)
    sub.connect(cid, clean=False)
    sub.subscribe([("qb/#", 1)])
    sub.send(mr.disconnect())
    sub.wait_closed()
    pub = mr.Client.to(broker, mr.V311)
    pub.connect(uid("qb-pub"))
    payload = b"x" * 1000
    for i in range(10):
        pub.publish("qb/t", payload, qos=1, pid=i + 1)  # waits for its PUBACK
    snap = wait_for(broker, lambda s: s.v("tern_queued_messages") == 10, "10 queued")
    queued = snap.v("tern_queued_bytes")
    assert 10 * len(payload) <= queued <= 10 * (len(payload) + 1024), queued
    back = mr.Client.to(broker, mr.V311)
    back.connect(cid, clean=False)
    for _ in range(10):
        p = back.expect(mr.PUBLISH)
        back.send(mr.puback(p.pid))
    wait_for(broker, lambda s: s.v("tern_queued_bytes") == 0, "queued bytes back at 0")


def cert_not_after(path):
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", path],
                         capture_output=True, text=True, check=True).stdout
    when = out.strip().split("=", 1)[1]
    return ssl.cert_time_to_seconds(when)


def test_tls_expiry_and_reload_results(make_broker, tmp_path):
    b = full_broker(make_broker, tmp_path)
    snap = scrape(b)
    want = cert_not_after(b.certs.server_pem)
    assert snap.v("tern_tls_certificate_expiry_timestamp_seconds", listener="tls") == want
    ok0 = snap.v("tern_config_reloads_total", result="success")
    failed0 = snap.v("tern_config_reloads_total", result="failure")
    assert snap.v("tern_config_last_reload_successful") == 1
    started = snap.v("tern_config_last_reload_success_timestamp_seconds")
    assert abs(started - time.time()) < 3600

    # A certificate valid for 3 days replaces it; SIGHUP reloads it.
    key = os.path.join(tmp_path, "short.key")
    pem = os.path.join(tmp_path, "short.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "3", "-subj", "/CN=localhost",
                    "-keyout", key, "-out", pem], check=True, capture_output=True)
    with open(b.config_path) as f:
        original = f.read()
    mark = reload(b, text=original.replace(b.certs.server_pem, pem)
                  .replace(b.certs.server_key, key))
    wait_line(b, lambda l: "configuration reloaded" in l, since=mark)
    snap = wait_for(b, lambda s: s.v("tern_config_reloads_total", result="success") == ok0 + 1,
                    "reload counted")
    assert snap.v("tern_tls_certificate_expiry_timestamp_seconds", listener="tls") == \
        cert_not_after(pem)
    assert cert_not_after(pem) - time.time() < 4 * 86400

    # A reload the broker refuses (a key file that does not exist) is counted as a failure.
    missing = os.path.join(tmp_path, "missing.key")
    mark = reload(b, text=original.replace(b.certs.server_pem, pem)
                  .replace(b.certs.server_key, missing))
    wait_line(b, lambda l: "reload rejected" in l, since=mark)
    snap = wait_for(b, lambda s: s.v("tern_config_reloads_total", result="failure")
                    == failed0 + 1, "failed reload counted")
    assert snap.v("tern_config_last_reload_successful") == 0
    assert snap.v("tern_config_reloads_total", result="success") == ok0 + 1
    # The certificate in use did not change.
    assert snap.v("tern_tls_certificate_expiry_timestamp_seconds", listener="tls") == \
        cert_not_after(pem)


def test_cpu_seconds_move_by_fractions(broker):
    """process_cpu_seconds_total with sub-second resolution: the crate's collector moved in
    whole seconds (an integer counter), so its value was always a whole number."""
    c = mr.Client.to(broker, mr.V311)
    c.connect(uid("cpu"))
    values = []
    for i in range(20):
        c.publish("cpu/x", b"y" * 100, qos=1, pid=i + 1)  # waits for its PUBACK
        values.append(scrape(broker).v("process_cpu_seconds_total"))
    assert values == sorted(values), values
    assert any(v != int(v) for v in values), values
