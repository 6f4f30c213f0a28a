"""The admin API (`/api/v1` on the metrics port) and `tern ctl`, against the real binary.

The operator's questions, each answered against a real broker with real clients: which
consumer is falling behind (sessions with their queue and oldest age), how to get rid of a
dead session and its queue (delete, purge; still gone after a restart), who is connected
(clients with protocol, address, keep alive) and kicking one (MQTT 5 DISCONNECT 0x98).
Every JSON answer is checked against the served OpenAPI description (jsonschema), so the
description cannot drift from the code. Tokens, the audit log, TLS on the metrics port, the
refusal of a plain non-loopback API, users and ACL rules kept in their files, and SIGHUP
reloading the token file are covered too.
"""
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import jsonschema
import pytest

from conftest import TERN_BIN, Broker, _toml_value, gen_certs
from pahoutil import TIMEOUT, V311, V5, closed_by_server

VERSIONS = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]
TOKEN = "test-token-0123456789abcdef"
OTHER = "other-token-0123456789abcdef"


def token_file(tmp_path, text=f"ops:{TOKEN}\n"):
    p = tmp_path / "tokens"
    p.write_text(text)
    return str(p)


class Api:
    """Calls the admin API of broker `b` and checks every JSON answer against the OpenAPI
    description the broker serves."""

    def __init__(self, b, token=TOKEN, scheme="http", context=None):
        self.b = b
        self.token = token
        self.base = f"{scheme}://127.0.0.1:{b.metrics_port}"
        self.context = context
        with urllib.request.urlopen(self.base + "/api/v1/openapi.json", timeout=TIMEOUT,
                                    context=context) as r:
            self.spec = json.load(r)

    def raw(self, method, path, body=None, token=None, headers=None):
        h = dict(headers or {})
        tok = self.token if token is None else token
        if tok:
            h["Authorization"] = f"Bearer {tok}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT, context=self.context) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def schema_for(self, route, method, status):
        op = self.spec["paths"][route][method.lower()]
        resp = op["responses"][str(status)]
        return resp["content"]["application/json"]["schema"]

    def __call__(self, method, path, route=None, body=None, expect=200, **kw):
        status, headers, data = self.raw(method, path, body, **kw)
        assert status == expect, (method, path, status, data)
        value = json.loads(data) if data else None
        schema = self.schema_for(route or path.split("?")[0], method, status)
        # The schema's $refs point into the description's components.
        jsonschema.validate(value, {**schema, "components": self.spec["components"]})
        return value


def admin_broker(make, tmp_path, overrides=None, extra=""):
    o = {"admin": {"token_file": token_file(tmp_path)}}
    for k, v in (overrides or {}).items():
        o.setdefault(k, {}).update(v)
    return make(o, extra)


def wait_until(pred, timeout=TIMEOUT, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def ctl(b, *args, token=TOKEN, url=None, extra_env=None):
    env = dict(os.environ)
    env["TERN_ADMIN_TOKEN"] = token
    env.update(extra_env or {})
    cmd = [TERN_BIN, "ctl", "--url", url or f"http://127.0.0.1:{b.metrics_port}", *args]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=30, env=env)


# ---------------------------------------------------------------------------------------------
# Access
# ---------------------------------------------------------------------------------------------
def test_the_api_is_off_without_a_token_file(broker):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{broker.metrics_port}/api/v1/clients",
                               timeout=TIMEOUT)
    assert e.value.code == 404


def test_every_call_needs_a_token_in_force(make_broker, tmp_path):
    b = admin_broker(make_broker, tmp_path)
    api = Api(b)
    for tok in ["", "wrong-token-0123456789", TOKEN + "x"]:
        status, headers, body = api.raw("GET", "/api/v1/clients", token=tok)
        assert status == 401, (tok, status)
        assert headers.get("www-authenticate", "").startswith("Bearer"), headers
        assert "error" in json.loads(body)
    status, _, _ = api.raw("GET", "/api/v1/clients", headers={"Authorization": f"Basic {TOKEN}"},
                           token="")
    assert status == 401
    assert api("GET", "/api/v1/clients") == {"items": [], "next": None}
    # Actions too, and a refused one changes nothing.
    status, _, _ = api.raw("POST", "/api/v1/sessions/x/purge", token="nope-nope-nope-nope")
    assert status == 401


def test_sighup_rereads_the_token_file(make_broker, tmp_path):
    b = admin_broker(make_broker, tmp_path)
    api = Api(b)
    assert api.raw("GET", "/api/v1/clients")[0] == 200
    (tmp_path / "tokens").write_text(f"ci:{OTHER}\n")
    mark = len(b.log_lines)
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any("admin tokens reloaded" in l for l in b.log_lines[mark:]),
               what="the reload")
    assert api.raw("GET", "/api/v1/clients")[0] == 401
    assert api.raw("GET", "/api/v1/clients", token=OTHER)[0] == 200
    # A broken file keeps the tokens in force.
    (tmp_path / "tokens").write_text("ci:short\n")
    mark = len(b.log_lines)
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any("token" in l and "shorter" in l for l in b.log_lines[mark:]),
               what="the refused reload")
    assert api.raw("GET", "/api/v1/clients", token=OTHER)[0] == 200


def check_config(tmp_path, sections):
    cfg = tmp_path / "c.toml"
    text = ""
    for section, values in sections.items():
        text += f"[{section}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
    cfg.write_text(text)
    return subprocess.run([TERN_BIN, "check", "--config", str(cfg)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=30)


def test_a_plain_api_beyond_loopback_is_refused_unless_allowed(tmp_path):
    tf = token_file(tmp_path)
    r = check_config(tmp_path, {"metrics": {"bind": "0.0.0.0:9883"}, "admin": {"token_file": tf}})
    assert r.returncode != 0
    assert "admin.token_file" in r.stdout and "in clear" in r.stdout, r.stdout
    r = check_config(tmp_path, {"metrics": {"bind": "0.0.0.0:9883"},
                                "admin": {"token_file": tf, "allow_insecure_remote": True}})
    assert r.returncode == 0, r.stdout
    r = check_config(tmp_path, {"metrics": {"bind": "127.0.0.1:9883"}, "admin": {"token_file": tf}})
    assert r.returncode == 0, r.stdout
    r = check_config(tmp_path, {"metrics": {"bind": "0.0.0.0:9883", "cert": "c.pem"},
                                "admin": {"token_file": tf}})
    assert r.returncode != 0 and "go together" in r.stdout, r.stdout


def test_the_metrics_port_speaks_tls_and_ctl_follows(make_broker, tmp_path, mkc):
    certs = gen_certs(tmp_path / "certs")
    b = admin_broker(make_broker, tmp_path,
                     {"metrics": {"cert": certs.server_pem, "key": certs.server_key}})
    ctx = ssl.create_default_context(cafile=certs.ca_pem)
    api = Api(b, scheme="https", context=ctx)
    c = mkc("tls-seen", V5, broker=b)
    c.connect()
    items = api("GET", "/api/v1/clients")["items"]
    assert [i["client_id"] for i in items] == [c.client_id]
    assert items[0]["listener"] == "tcp"  # MQTT over TCP; the API itself over TLS
    # Plain HTTP gets no answer from a TLS port.
    with pytest.raises(Exception):
        urllib.request.urlopen(f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=2)
    r = ctl(b, "--ca", certs.ca_pem, "clients", url=f"https://localhost:{b.metrics_port}")
    assert r.returncode == 0, r.stderr
    assert c.client_id in r.stdout
    r = ctl(b, "clients", url=f"https://localhost:{b.metrics_port}")
    assert r.returncode == 2 and "--ca" in r.stderr


# ---------------------------------------------------------------------------------------------
# Who is connected, who is falling behind
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_clients_and_sessions_answer_who_is_behind(make_broker, tmp_path, mkc, version):
    b = admin_broker(make_broker, tmp_path)
    api = Api(b)
    away = mkc("away", version, broker=b, persistent=True)
    away.connect()
    assert away.subscribe("lag/#", 1) == [1]
    away.disconnect()
    pub = mkc("pub", version, broker=b)
    pub.connect(keepalive=42)
    for i in range(25):
        pub.publish(f"lag/{i}", b"x" * 10, qos=1)

    clients = api("GET", "/api/v1/clients")["items"]
    assert [c["client_id"] for c in clients] == [pub.client_id]
    c = clients[0]
    assert c["protocol"] == ("5.0" if version == V5 else "3.1.1")
    assert c["listener"] == "tcp"
    assert c["keep_alive"] == 42
    assert c["address"].startswith("127.0.0.1:")
    assert c["connected_since_ms"] > 0
    one = api("GET", "/api/v1/clients/" + urllib.parse.quote(pub.client_id, safe=""),
              route="/api/v1/clients/{id}")
    assert one["client_id"] == pub.client_id

    offline = api("GET", "/api/v1/sessions?state=offline")["items"]
    assert [s["client_id"] for s in offline] == [away.client_id]
    s = offline[0]
    assert (s["online"], s["persistent"], s["queued"], s["subscriptions"]) == (False, True, 25, 1)
    assert s["oldest_age_seconds"] >= 0
    assert s["expires_in_seconds"] is not None or version == V311
    online = api("GET", "/api/v1/sessions?state=online")["items"]
    assert [x["client_id"] for x in online] == [pub.client_id]
    detail = api("GET", "/api/v1/sessions/" + urllib.parse.quote(away.client_id, safe=""),
                 route="/api/v1/sessions/{id}")
    assert [x["filter"] for x in detail["subscriptions"]] == ["lag/#"]
    assert detail["subscriptions"][0]["qos"] == 1
    subs = api("GET", "/api/v1/subscriptions?client=" + urllib.parse.quote(away.client_id))
    assert [x["filter"] for x in subs["items"]] == ["lag/#"]
    by_filter = api("GET", "/api/v1/subscriptions?filter=" + urllib.parse.quote("lag/#"))
    assert [x["client_id"] for x in by_filter["items"]] == [away.client_id]
    api("GET", "/api/v1/sessions?state=sideways", route="/api/v1/sessions", expect=400)
    api("GET", "/api/v1/sessions/nobody", route="/api/v1/sessions/{id}", expect=404)
    api("GET", "/api/v1/subscriptions", expect=400)


def test_pages_follow_the_cursor_without_gaps_or_repeats(make_broker, tmp_path, mkc):
    b = admin_broker(make_broker, tmp_path)
    api = Api(b)
    ids = []
    for i in range(23):
        c = mkc(f"page{i:02d}", V5, broker=b, persistent=True)
        c.connect()
        c.disconnect()
        ids.append(c.client_id)
    seen, after, pages = [], None, 0
    while True:
        q = "/api/v1/sessions?limit=10" + (f"&after={urllib.parse.quote(after)}" if after else "")
        page = api("GET", q, route="/api/v1/sessions")
        pages += 1
        assert len(page["items"]) <= 10
        seen += [s["client_id"] for s in page["items"]]
        after = page["next"]
        if after is None:
            break
        assert pages < 10
    assert seen == sorted(ids) and pages == 3
    api("GET", "/api/v1/sessions?limit=0", route="/api/v1/sessions", expect=400)
    api("GET", "/api/v1/sessions?limit=1001", route="/api/v1/sessions", expect=400)


# ---------------------------------------------------------------------------------------------
# Getting rid of things
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_kick_closes_the_connection_with_administrative_action(make_broker, tmp_path, mkc,
                                                               version):
    b = admin_broker(make_broker, tmp_path)
    api = Api(b)
    c = mkc("kicked", version, broker=b, persistent=True)
    c.connect()
    assert c.subscribe("k/#", 1) == [1]
    path = "/api/v1/clients/" + urllib.parse.quote(c.client_id, safe="")
    assert api("DELETE", path, route="/api/v1/clients/{id}")["kicked"] is True
    reason = closed_by_server(c, TIMEOUT)
    assert reason == (0x98 if version == V5 else None)
    # The session stays (persistent), now offline; kicking again finds nobody connected.
    wait_until(lambda: api("GET", "/api/v1/sessions?state=offline")["items"], what="offline")
    api("DELETE", path, route="/api/v1/clients/{id}", expect=404)
    audit = [l for l in b.log_lines if "admin action" in l and "kick" in l]
    assert audit and "ops" in audit[0] and c.client_id in audit[0], audit


@pytest.mark.parametrize("version", VERSIONS)
def test_a_deleted_session_and_its_queue_stay_gone_after_a_restart(stoppable, tmp_path, mkc,
                                                                   version):
    b = admin_broker(stoppable, tmp_path)
    api = Api(b)
    dead = mkc("dead", version, broker=b, persistent=True)
    dead.connect()
    assert dead.subscribe("dead/#", 1) == [1]
    dead.disconnect()
    live = mkc("live", version, broker=b, persistent=True)
    live.connect()
    assert live.subscribe("dead/#", 1) == [1]
    pub = mkc("pub", version, broker=b)
    pub.connect()
    for i in range(50):
        pub.publish("dead/x", str(i).encode(), qos=1)
    live.get_n(50)
    path = "/api/v1/sessions/" + urllib.parse.quote(dead.client_id, safe="")
    r = api("DELETE", path, route="/api/v1/sessions/{id}")
    assert r["deleted"] is True and r["queued"] == 50
    api("GET", path, route="/api/v1/sessions/{id}", expect=404)
    # A connected client's session: kicked, then gone.
    r = api("DELETE", "/api/v1/sessions/" + urllib.parse.quote(live.client_id, safe=""),
            route="/api/v1/sessions/{id}")
    assert r["deleted"] is True and r["kicked"] is True
    closed_by_server(live, TIMEOUT)
    pub.disconnect()
    b.stop()
    b.start()
    api = Api(b)
    assert api("GET", "/api/v1/sessions")["items"] == []
    again = mkc.again(dead)
    rc, present, _ = again.connect()
    assert not present
    again.expect_none(0.5)


def test_purge_empties_a_queue_in_memory_and_on_disk(stoppable, tmp_path, mkc):
    b = admin_broker(stoppable, tmp_path)
    api = Api(b)
    away = mkc("purged", V5, broker=b, persistent=True)
    away.connect()
    assert away.subscribe("p/#", 1) == [1]
    away.disconnect()
    pub = mkc("pub", V5, broker=b)
    pub.connect()
    for i in range(40):
        pub.publish("p/x", str(i).encode(), qos=1)
    before = api("GET", "/api/v1/sessions?state=offline")["items"][0]
    assert before["queued"] == 40
    path = f"/api/v1/sessions/{urllib.parse.quote(away.client_id, safe='')}/purge"
    assert api("POST", path, route="/api/v1/sessions/{id}/purge")["purged"] == 40
    assert api("GET", "/api/v1/sessions?state=offline")["items"][0]["queued"] == 0
    # Later messages queue again; the purge took only what was there.
    pub.publish("p/x", b"after", qos=1)
    pub.disconnect()
    b.stop()
    b.start()
    back = mkc.again(away)
    rc, present, _ = back.connect()
    assert present
    assert back.get().payload == b"after"
    back.expect_none(0.5)
    api = Api(b)
    api("POST", "/api/v1/sessions/nobody/purge", route="/api/v1/sessions/{id}/purge", expect=404)


def test_groups_and_declared_queues_are_listed_and_purged(make_broker, tmp_path, mkc):
    b = admin_broker(make_broker, tmp_path,
                     extra='[[queues]]\nname = "orders"\nfilter = "orders/#"\n')
    api = Api(b)
    m = mkc("member", V5, broker=b)
    m.connect()
    assert m.subscribe("$share/g/s/#", 1) == [1]
    pub = mkc("pub", V5, broker=b)
    pub.connect()
    for i in range(12):
        pub.publish("orders/new", str(i).encode(), qos=1)
    groups = {g["key"]: g for g in api("GET", "/api/v1/groups")["items"]}
    assert set(groups) == {"$queue/orders", "$share/g/s/#"}, groups
    q = groups["$queue/orders"]
    assert (q["kind"], q["name"], q["filters"], q["queued"], q["members"]) == \
        ("queue", "orders", ["orders/#"], 12, [])
    g = groups["$share/g/s/#"]
    assert g["kind"] == "shared" and [x["client_id"] for x in g["members"]] == [m.client_id]
    r = api("POST", "/api/v1/groups/purge?key=" + urllib.parse.quote("$queue/orders", safe=""),
            route="/api/v1/groups/purge")
    assert r["purged"] == 12
    groups = {g["key"]: g for g in api("GET", "/api/v1/groups")["items"]}
    assert groups["$queue/orders"]["queued"] == 0
    consumer = mkc("consumer", V5, broker=b)
    consumer.connect()
    assert consumer.subscribe("$queue/orders", 1) == [1]
    consumer.expect_none(0.5)
    api("POST", "/api/v1/groups/purge?key=nope", route="/api/v1/groups/purge", expect=404)


def test_retained_messages_are_listed_and_cleared(make_broker, tmp_path, mkc):
    b = admin_broker(make_broker, tmp_path)
    api = Api(b)
    pub = mkc("pub", V5, broker=b)
    pub.connect()
    pub.publish("r/b", b"B" * 2000, qos=1, retain=True)
    pub.publish("r/a", b"A", qos=1, retain=True)
    pub.publish("other", b"O", qos=1, retain=True)
    items = api("GET", "/api/v1/retained?filter=" + urllib.parse.quote("r/#"),
                route="/api/v1/retained")["items"]
    assert [i["topic"] for i in items] == ["r/a", "r/b"]
    assert items[1]["size"] == 2000 and items[1]["truncated"] is True
    page1 = api("GET", "/api/v1/retained?limit=2", route="/api/v1/retained")
    assert [i["topic"] for i in page1["items"]] == ["other", "r/a"] and page1["next"] == "r/a"
    page2 = api("GET", "/api/v1/retained?limit=2&after=r%2Fa", route="/api/v1/retained")
    assert [i["topic"] for i in page2["items"]] == ["r/b"] and page2["next"] is None
    api("DELETE", "/api/v1/retained?topic=" + urllib.parse.quote("r/a", safe=""),
        route="/api/v1/retained")
    api("DELETE", "/api/v1/retained?topic=r%2Fa", route="/api/v1/retained", expect=404)
    api("DELETE", "/api/v1/retained?topic=r%2F%23", route="/api/v1/retained", expect=400)
    late = mkc("late", V5, broker=b)
    late.connect()
    late.subscribe("r/#", 1)
    assert [m.topic for m in late.get_n(1)] == ["r/b"]
    late.expect_none(0.5)


# ---------------------------------------------------------------------------------------------
# Users and ACL rules, kept in their files
# ---------------------------------------------------------------------------------------------
def test_users_and_rules_change_at_runtime_and_in_the_files(make_broker, tmp_path, mkc):
    pw = tmp_path / "passwd"
    pw.write_text("")
    acl = tmp_path / "acl"
    acl.write_text("user admin\ntopic readwrite #\n")
    b = admin_broker(make_broker, tmp_path, {"auth": {"allow_anonymous": False,
                                                      "password_file": str(pw),
                                                      "acl_file": str(acl)}})
    api = Api(b)
    r = api("PUT", "/api/v1/users/dev1", route="/api/v1/users/{name}",
            body={"password": "s3cret"})
    assert r == {"user": "dev1", "created": True}
    assert api("GET", "/api/v1/users")["items"] == ["dev1"]
    assert pw.read_text().startswith("dev1:$7$")
    c = mkc("dev1", V5, broker=b, username="dev1", password="s3cret")
    c.connect()
    # No rule grants dev1 anything yet: its subscription is refused.
    assert c.subscribe("dev/1/#", 1) == [0x87]
    rule = {"kind": "topic", "user": "dev1", "access": "read", "filter": "dev/1/#"}
    assert api("POST", "/api/v1/acl", body=rule)["added"] == rule
    api("POST", "/api/v1/acl", body=rule, expect=409)
    assert rule in api("GET", "/api/v1/acl")["items"]
    assert "user dev1\ntopic read dev/1/#" in acl.read_text()
    assert c.subscribe("dev/1/#", 1) == [1]
    # `tern check` reads the same files as valid.
    r = subprocess.run([TERN_BIN, "check", "--config", b.config_path], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=30)
    assert r.returncode == 0, r.stdout
    assert api("DELETE", "/api/v1/acl", body=rule)["removed"] == rule
    api("DELETE", "/api/v1/acl", body=rule, expect=404)
    api("POST", "/api/v1/acl", body={**rule, "access": "everything"}, expect=400)
    assert api("DELETE", "/api/v1/users/dev1", route="/api/v1/users/{name}")["deleted"] is True
    api("DELETE", "/api/v1/users/dev1", route="/api/v1/users/{name}", expect=404)
    refused = mkc("dev1b", V5, broker=b, username="dev1", password="s3cret")
    rc, _, _ = refused.connect(expect_rc=None)
    assert rc in (0x86, 0x87)
    assert [l for l in b.log_lines if "admin action" in l and "set_user" in l]


def test_user_calls_without_files_change_nothing(make_broker, tmp_path):
    b = admin_broker(make_broker, tmp_path)
    api = Api(b)
    api("PUT", "/api/v1/users/x", route="/api/v1/users/{name}", body={"password": "p"},
        expect=409)
    api("GET", "/api/v1/acl", expect=409)
    api("POST", "/api/v1/acl", body={"kind": "topic", "access": "read", "filter": "a"},
        expect=409)


# ---------------------------------------------------------------------------------------------
# tern ctl
# ---------------------------------------------------------------------------------------------
def test_ctl_answers_in_tables_and_json(make_broker, tmp_path, mkc):
    b = admin_broker(make_broker, tmp_path)
    away = mkc("ctl-away", V311, broker=b, persistent=True)
    away.connect()
    away.subscribe("c/#", 1)
    away.disconnect()
    here = mkc("ctl-here", V5, broker=b)
    here.connect()
    for i in range(7):
        here.publish("c/x", b"m", qos=1)
    r = ctl(b, "clients")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["CLIENT", "ID", "USER"], lines
    assert any(l.startswith(here.client_id) and "5.0" in l for l in lines[1:]), lines
    r = ctl(b, "sessions", "--offline", "--json")
    rows = json.loads(r.stdout)
    assert [(s["client_id"], s["queued"]) for s in rows] == [(away.client_id, 7)]
    r = ctl(b, "purge", away.client_id)
    assert r.returncode == 0 and "7 messages" in r.stdout, (r.stdout, r.stderr)
    r = ctl(b, "kick", here.client_id)
    assert r.returncode == 0, r.stderr
    assert closed_by_server(here, TIMEOUT) == 0x98
    r = ctl(b, "kick", here.client_id)
    assert r.returncode == 1 and "404" in r.stderr, r.stderr
    r = ctl(b, "clients", token="wrong-token-0123456789")
    assert r.returncode == 1 and "401" in r.stderr
    tf = tmp_path / "mine"
    tf.write_text(f"ops:{TOKEN}\n")
    env = {k: v for k, v in os.environ.items() if k != "TERN_ADMIN_TOKEN"}
    r = subprocess.run([TERN_BIN, "ctl", "--url", f"http://127.0.0.1:{b.metrics_port}",
                        "--token-file", str(tf), "sessions"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=30, env=env)
    assert r.returncode == 0 and away.client_id in r.stdout, r.stderr
    r = subprocess.run([TERN_BIN, "ctl", "--url", f"http://127.0.0.1:{b.metrics_port}",
                        "sessions"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=30, env=env)
    assert r.returncode == 2 and "no token" in r.stderr


def test_the_description_covers_every_route(make_broker, tmp_path):
    """Every route the broker answers is in openapi.json, and every path there is answered
    (not 404) by the broker."""
    b = admin_broker(make_broker, tmp_path)
    api = Api(b)
    for route, methods in api.spec["paths"].items():
        concrete = route.replace("{id}", "nobody").replace("{name}", "nobody")
        for method in methods:
            body = {} if method in ("post", "put", "delete") else None
            status, _, data = api.raw(method.upper(), concrete, body=body)
            if status == 404:
                # The route's own 404 (a JSON error), not the port's "not found".
                assert "error" in json.loads(data), (method, route)
            # Documented, or axum's own refusal of a missing query or body field.
            assert str(status) in methods[method]["responses"] or status in (400, 415, 422), \
                (method, route, status, data)


# ---------------------------------------------------------------------------------------------
# A cluster: any node's API sees every node
# ---------------------------------------------------------------------------------------------
def test_a_cluster_lists_and_acts_across_nodes(tern_cluster, mkc, tmp_path):
    """The API on t1 lists the clients and sessions of t1 and t2 (t2's API is off: it answers
    t1 over the cluster anyway), pages through both in client id order, and kicks, purges and
    deletes on t2."""
    tf = token_file(tmp_path)
    t1 = tern_cluster.node("t1", overrides={"admin": {"token_file": tf}}, quorum_timeout=5)
    t2 = tern_cluster.node("t2", quorum_timeout=5)
    mine = mkc("a-on-t1", V5, broker=t1)
    mine.connect()
    there = mkc("b-on-t2", V5, broker=t2)
    there.connect()
    away = mkc("c-away-t2", V5, broker=t2, persistent=True)
    away.connect()
    assert away.subscribe("f/#", 1) == [1]
    away.disconnect()
    api = Api(t1)
    clients = api("GET", "/api/v1/clients")["items"]
    assert [(c["client_id"], c["node"]) for c in clients] == \
        [(mine.client_id, "t1"), (there.client_id, "t2")]
    seen, after = [], None
    for _ in range(5):
        q = "/api/v1/sessions?limit=1" + (f"&after={urllib.parse.quote(after)}" if after else "")
        page = api("GET", q, route="/api/v1/sessions")
        seen += [(s["client_id"], s["node"], s["online"]) for s in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert seen == [(mine.client_id, "t1", True), (there.client_id, "t2", True),
                    (away.client_id, "t2", False)], seen
    subs = api("GET", "/api/v1/subscriptions?client=" + urllib.parse.quote(away.client_id))
    assert [s["filter"] for s in subs["items"]] == ["f/#"]
    one = api("GET", "/api/v1/clients/" + urllib.parse.quote(there.client_id, safe=""),
              route="/api/v1/clients/{id}")
    assert one["node"] == "t2"
    pub = mkc("pub", V5, broker=t1)
    pub.connect()
    for i in range(5):
        assert pub.publish("f/x", str(i).encode(), qos=1, timeout=15) == 0
    wait_until(lambda: api("GET", "/api/v1/sessions?state=offline")["items"][0]["queued"] == 5,
               timeout=15, what="the queue on t2")
    path = f"/api/v1/sessions/{urllib.parse.quote(away.client_id, safe='')}"
    assert api("POST", path + "/purge", route="/api/v1/sessions/{id}/purge")["purged"] == 5
    r = api("DELETE", "/api/v1/clients/" + urllib.parse.quote(there.client_id, safe=""),
            route="/api/v1/clients/{id}")
    assert r["kicked"] is True
    assert closed_by_server(there, TIMEOUT) == 0x98
    assert api("DELETE", path, route="/api/v1/sessions/{id}")["deleted"] is True
    api("GET", path, route="/api/v1/sessions/{id}", expect=404)
    api("DELETE", "/api/v1/clients/nobody", route="/api/v1/clients/{id}", expect=404)
