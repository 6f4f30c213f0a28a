"""What deploy/ ships for operators, checked without Grafana or a Prometheus server (issue 18,
operator basics): every PromQL expression of the Grafana dashboard (deploy/grafana/tern.json)
and of the alert rules (deploy/prometheus/tern-alerts.yml) names only metrics a running broker
really exports, and the rules pass `promtool check rules` (Debian's prometheus package; `make
test` installs it with deploy/scripts/install-promtool.sh, its service kept from starting).

The broker is started with a TLS and a WebSocket listener, a declared queue, a bridge and a
shared subscription group, so that every labelled family has series. Metric names are taken
from an expression by removing strings, label matchers, ranges and label lists, then every
identifier that is not a PromQL function or keyword must be an exported sample name (a
histogram's `_bucket`, `_sum` and `_count` included) or `up`, which Prometheus makes itself.
"""
import json
import os
import re
import shutil
import subprocess

import pytest

import mqttraw as mr
from conftest import ROOT
from mqttraw import uid
from test_metrics_exposition import exported_names, full_broker
from test_operations import http_get

DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "tern.json")
ALERTS = os.path.join(ROOT, "deploy", "prometheus", "tern-alerts.yml")

# Series Prometheus makes itself for every target, not exported by Tern.
SYNTHETIC = {"up"}
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes",
    "clamp", "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "delta",
    "deriv", "floor", "group", "histogram_quantile", "idelta", "increase", "irate",
    "label_replace", "last_over_time", "max", "max_over_time", "min", "min_over_time",
    "predict_linear", "quantile", "quantile_over_time", "rate", "resets", "round", "scalar",
    "sort", "sort_desc", "stddev", "stdvar", "sum", "sum_over_time", "time", "timestamp",
    "topk", "vector",
}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan"}


def metric_names(expr):
    """The metric names a PromQL expression reads."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        tok = m.group(0)
        if tok.lower() in KEYWORDS:
            continue
        if tok in FUNCTIONS and e[m.end():].lstrip().startswith("("):
            continue
        names.add(tok)
    return names


def unknown_names(exprs, exported):
    """{expression: names it reads that the broker does not export}, for the failing ones."""
    out = {}
    for e in exprs:
        names = metric_names(e)
        assert names, f"no metric in {e!r}"
        missing = sorted(n for n in names if n not in exported and n not in SYNTHETIC)
        if missing:
            out[e] = missing
    return out


def dashboard_exprs():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = []
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            exprs.append(t["expr"])
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", q)
            assert m, q
            exprs.append(m.group(1))
    return exprs


def alert_exprs():
    """The rules' `expr:` lines. Each is one line (promtool checks the YAML itself): a count of
    `- alert:` against `expr:` makes sure none was missed."""
    with open(ALERTS) as f:
        text = f.read()
    exprs = re.findall(r"^\s+expr:\s*(.+?)\s*$", text, re.M)
    alerts = re.findall(r"^\s+- alert:\s*(\w+)", text, re.M)
    assert len(exprs) == len(alerts) and alerts, (alerts, exprs)
    assert not any(e.startswith(("|", ">")) for e in exprs), "multi-line expr"
    return dict(zip(alerts, exprs))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from conftest import Broker
    made = []

    def make(overrides=None, extra=""):
        b = Broker(overrides, extra)
        made.append(b)
        return b
    b = full_broker(make, tmp_path_factory.mktemp("deploy"))
    try:
        c = mr.Client.to(b, mr.V5)
        c.connect(uid("deploy"))
        c.subscribe([("$share/g/deploy/#", 1)])
        status, text, _ = http_get(b, "/metrics")
        assert status == 200
        names = exported_names(text)
        c.disconnect()
        assert b.alive(), b.log()
        return names
    finally:
        for m in made:
            m.close()


def test_the_name_extraction():
    assert metric_names('histogram_quantile(0.99, sum by (instance, le) '
                        '(rate(tern_storage_commit_seconds_bucket{job="tern"}[5m]))) > 0.1') \
        == {"tern_storage_commit_seconds_bucket"}
    assert metric_names("tern_queue_messages / tern_queue_max_messages > 0.9") == \
        {"tern_queue_messages", "tern_queue_max_messages"}
    assert metric_names('tern_cluster_available == 0 and on (instance, job) '
                        'max_over_time(tern_cluster_members[1h]) > 0') == \
        {"tern_cluster_available", "tern_cluster_members"}
    assert metric_names('sum(x{instance=~"$instance", at_most="+Inf"}) - sum(y{a="b"})') == \
        {"x", "y"}
    # A misspelt function is read as a metric name, so the check below fails on it.
    assert metric_names("rat(tern_bytes_total[5m])") == {"rat", "tern_bytes_total"}


def test_a_wrong_name_is_caught(exported):
    assert unknown_names(["rate(tern_connections_total[5m])"], exported) == \
        {"rate(tern_connections_total[5m])": ["tern_connections_total"]}
    assert unknown_names(["tern_connections_open"], exported) == {}


def test_every_dashboard_query_reads_exported_metrics(exported):
    exprs = dashboard_exprs()
    assert len(exprs) >= 20, exprs
    assert unknown_names(exprs, exported) == {}
    covered = set().union(*(metric_names(e) for e in exprs))
    # The panels the issue asks for, by the metric each reads.
    for name in ["tern_connections_open", "tern_messages_received_total",
                 "tern_messages_sent_total", "tern_messages_dropped_total",
                 "tern_queued_messages", "tern_queued_bytes", "tern_queue_oldest_age_seconds",
                 "tern_storage_commit_seconds_bucket", "tern_cluster_available",
                 "tern_bridge_connected"]:
        assert name in covered, name


def test_every_alert_reads_exported_metrics(exported):
    alerts = alert_exprs()
    for name in ["TernDown", "TernMessagesDropped", "TernConsumerLagHigh", "TernQueueNearBound",
                 "TernStorageCommitSlow", "TernTLSCertificateExpiringSoon",
                 "TernConfigReloadFailed", "TernClusterUnavailable", "TernBridgeDisconnected",
                 "TernAuthServiceUnavailable"]:
        assert name in alerts, name
    assert unknown_names(alerts.values(), exported) == {}


def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (make test installs it: deploy/scripts/install-promtool.sh)")
    return path


def test_the_alert_rules_pass_promtool(tmp_path):
    tool = promtool()
    r = subprocess.run([tool, "check", "rules", ALERTS], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(alert_exprs())
    assert f"SUCCESS: {n} rules found" in r.stdout, r.stdout
    # And promtool does refuse a broken rule.
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n"
                   "        expr: sum(rate(tern_bytes_total[5m])\n")
    r = subprocess.run([tool, "check", "rules", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0, r.stdout
