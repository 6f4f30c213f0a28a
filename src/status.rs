//! The status page on the metrics port: `/` is a small HTML page (served from the binary, no
//! external assets) that polls `/status.json` and shows live connections, message rates, the
//! busiest topics, the listeners, drops by reason, memory, the last fifteen minutes as charts,
//! the slowest consumers, the declared queues and the deepest session queues.
//!
//! Rates are computed between two `/status.json` requests (at most once a second; viewers in
//! between share the last result; the first request measures from the start), so nothing
//! runs while nobody looks. Topic rates are the broker's decayed per-topic counts
//! ([`crate::broker::topics`]); the charts are its ring buffer of points
//! ([`crate::broker::history`]), drawn as inline SVG by the page's own script; the slowest
//! consumers are ranked when someone looks ([`crate::broker::lag`]).

use crate::broker::lag::ConsumerLag;
use crate::broker::Broker;
use std::fmt::Write;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Entries shown in the topic and queue tables.
const TOP: usize = 10;
/// Minimum time between two recomputations.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Counter values at the last snapshot, for rates.
struct Previous {
    at: Instant,
    received: u64,
    sent: u64,
    bytes_received: u64,
    bytes_sent: u64,
}

#[derive(Default)]
struct State {
    previous: Option<Previous>,
    json: String,
}

/// The last `/status.json` body and what its rates are computed against.
#[derive(Default)]
pub struct Status {
    state: Mutex<State>,
}

impl Status {
    /// The JSON document for `/status.json`, recomputed if the last one is older than a second.
    pub fn json(&self, broker: &Broker) -> String {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if st.json.is_empty()
            || st
                .previous
                .as_ref()
                .is_none_or(|p| now.duration_since(p.at) >= MIN_INTERVAL)
        {
            let (json, previous) = render(broker, st.previous.as_ref(), now);
            st.json = json;
            st.previous = Some(previous);
        }
        st.json.clone()
    }
}

fn render(broker: &Broker, prev: Option<&Previous>, now: Instant) -> (String, Previous) {
    let m = &broker.metrics;
    let cur = Previous {
        at: now,
        received: m.publish_received(),
        sent: m.publish_sent(),
        bytes_received: m.bytes_received.get(),
        bytes_sent: m.bytes_sent.get(),
    };
    // The first view measures from the start: every counter was 0 then.
    let start = Previous {
        at: now.checked_sub(m.uptime()).unwrap_or(now),
        received: 0,
        sent: 0,
        bytes_received: 0,
        bytes_sent: 0,
    };
    let prev = prev.unwrap_or(&start);
    let elapsed = now.duration_since(prev.at).as_secs_f64();
    let rate = |now: u64, before: u64| {
        if elapsed > 0.0 {
            now.saturating_sub(before) as f64 / elapsed
        } else {
            0.0
        }
    };
    let topics = broker.topic_sampler.top(TOP, crate::clock::now());
    let (stats, queues) = broker.registry.stats_and_deepest(TOP);

    let mut j = String::with_capacity(2048);
    j.push('{');
    let _ = write!(
        j,
        "\"version\":\"{}\",\"uptime_seconds\":{},\"connections\":{},",
        env!("CARGO_PKG_VERSION"),
        m.uptime().as_secs(),
        m.connections.get()
    );
    let _ = write!(
        j,
        "\"sessions\":{{\"online\":{},\"offline\":{}}},\"subscriptions\":{},\"retained\":{},",
        stats.online,
        stats.offline,
        broker.subscription_count(),
        broker.retained_count()
    );
    let _ = write!(
        j,
        "\"queued\":{},\"inflight\":{},\"dropped_total\":{},",
        stats.queued,
        stats.inflight,
        m.dropped_total()
    );
    let _ = write!(
        j,
        "\"rates\":{{\"received_per_second\":{:.1},\"sent_per_second\":{:.1},\"bytes_received_per_second\":{:.1},\"bytes_sent_per_second\":{:.1}}},",
        rate(cur.received, prev.received),
        rate(cur.sent, prev.sent),
        rate(cur.bytes_received, prev.bytes_received),
        rate(cur.bytes_sent, prev.bytes_sent),
    );
    match broker.peers() {
        Some(p) => {
            j.push_str("\"cluster\":{\"node\":");
            json_string(&mut j, p.node());
            let _ = write!(j, ",\"available\":{},\"members\":[", p.available());
            for (i, n) in p.members().iter().enumerate() {
                if i > 0 {
                    j.push(',');
                }
                json_string(&mut j, n);
            }
            j.push_str("]},");
        }
        None => j.push_str("\"cluster\":null,"),
    }
    let _ = write!(
        j,
        "\"sample_every\":{},\"topic_rate_window_seconds\":{},\"top_topics\":[",
        broker.topic_sampler.every(),
        crate::broker::topics::TAU.as_secs()
    );
    for (i, (t, r)) in topics.iter().enumerate() {
        if i > 0 {
            j.push(',');
        }
        j.push_str("{\"topic\":");
        json_string(&mut j, t);
        let _ = write!(j, ",\"per_second\":{r:.1}}}");
    }
    j.push(']');
    write_operations(&mut j, broker);
    j.push_str(",\"queues\":[");
    for (i, q) in queues.iter().enumerate() {
        if i > 0 {
            j.push(',');
        }
        j.push_str("{\"client_id\":");
        json_string(&mut j, &q.client_id);
        let _ = write!(
            j,
            ",\"queued\":{},\"inflight\":{},\"online\":{}}}",
            q.queued, q.inflight, q.online
        );
    }
    j.push_str("],\"declared_queues\":[");
    for (i, q) in broker.queue_states().iter().enumerate() {
        if i > 0 {
            j.push(',');
        }
        j.push_str("{\"name\":");
        json_string(&mut j, &q.name);
        j.push_str(",\"filter\":");
        json_string(&mut j, &q.filter);
        let _ = write!(
            j,
            ",\"declared\":{},\"messages\":{},\"consumers\":{},\"oldest_age_seconds\":{}}}",
            q.declared, q.messages, q.consumers, q.oldest_age
        );
    }
    j.push_str("]}");
    (j, cur)
}

/// The operator's part of the document, each member after a comma: listeners, drops by
/// reason, memory, the slowest consumers, and the charts' points.
fn write_operations(j: &mut String, broker: &Broker) {
    let m = &broker.metrics;
    j.push_str(",\"listeners\":[");
    let mut first = true;
    for (name, l) in broker.config.listeners.iter() {
        let (Some(kind), bind) = (l.kind_for(name), l.bind) else {
            continue;
        };
        if !first {
            j.push(',');
        }
        first = false;
        let _ = write!(
            j,
            "{{\"name\":\"{}\",\"kind\":\"{}\",\"bind\":\"{bind}\",\"connections\":{}}}",
            name, // names are [A-Za-z0-9_-] (validated): nothing to escape
            kind.label(),
            m.listener_connections(name).get()
        );
    }
    let _ = write!(
        j,
        "],\"dropped\":{{\"queue_full\":{},\"expired\":{},\"too_large\":{},\"not_authorized\":{},\"no_subscribers\":{},\"retained_full\":{},\"storage_failed\":{},\"overflow\":{}}}",
        m.dropped_queue_full.get(),
        m.dropped_expired.get(),
        m.dropped_too_large.get(),
        m.dropped_not_authorized.get(),
        m.dropped_no_subscribers.get(),
        m.dropped_retain_full.get(),
        m.dropped_storage_failed.get(),
        m.dropped_overflow.get(),
    );
    match resident_bytes() {
        Some(rss) => {
            let _ = write!(j, ",\"memory\":{{\"rss_bytes\":{rss}}}");
        }
        None => j.push_str(",\"memory\":{\"rss_bytes\":null}"),
    }
    let unix = crate::storage::record::unix_now_ms() / 1000;
    let slowest = broker.slowest_consumers(TOP, unix);
    j.push_str(",\"slowest_consumers\":{\"by_oldest_age\":");
    consumers(j, &slowest.by_oldest_age);
    j.push_str(",\"by_latency\":");
    consumers(j, &slowest.by_latency);
    let _ = write!(
        j,
        "}},\"history\":{{\"interval_seconds\":{},\"columns\":[\"unix_seconds\",\"received_per_second\",\"sent_per_second\",\"queued\",\"connections\"],\"points\":[",
        crate::broker::history::INTERVAL.as_secs()
    );
    for (i, p) in broker.history.points().iter().enumerate() {
        if i > 0 {
            j.push(',');
        }
        let _ = write!(
            j,
            "[{},{:.1},{:.1},{},{}]",
            p.unix, p.received_per_second, p.sent_per_second, p.queued, p.connections
        );
    }
    j.push_str("]}");
}

/// A ranking of consumers as a JSON array. A session has `inflight`, a group `members`.
fn consumers(j: &mut String, list: &[ConsumerLag]) {
    j.push('[');
    for (i, c) in list.iter().enumerate() {
        if i > 0 {
            j.push(',');
        }
        let _ = write!(j, "{{\"kind\":\"{}\",\"name\":", c.kind);
        json_string(j, &c.name);
        let (inflight, members) = if c.kind == "session" {
            (c.inflight_or_members.to_string(), "null".to_string())
        } else {
            ("null".to_string(), c.inflight_or_members.to_string())
        };
        let latency = c.latency.map_or("null".to_string(), |d| {
            format!("{:.1}", d.as_secs_f64() * 1e3)
        });
        let _ = write!(
            j,
            ",\"online\":{},\"queued\":{},\"inflight\":{inflight},\"members\":{members},\"oldest_age_seconds\":{},\"latency_ms\":{latency}}}",
            c.online, c.queued, c.oldest_age
        );
    }
    j.push(']');
}

/// The process's resident memory (Linux: `VmRSS` of `/proc/self/status`; elsewhere None). One
/// small read per refresh of the page. jemalloc's own statistics would need its control
/// crate in the library, whose allocator is the binary's choice: RSS is what the host sees.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Appends `s` as a JSON string literal. Topics and client ids come from clients: every
/// control character and the characters that could end the string or a `<script>` are escaped.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The page at `/`. Values are put into the document with `textContent` only, never as HTML:
/// topics and client ids are chosen by clients.
pub const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tern status</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.3rem; margin: 0 0 1rem; }
.cards { display: flex; flex-wrap: wrap; gap: .75rem; margin-bottom: 1.25rem; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: .5rem .8rem; min-width: 8rem; }
.card .v { font-size: 1.4rem; font-variant-numeric: tabular-nums; }
.card .k { font-size: .8rem; color: #666; }
table { border-collapse: collapse; margin-bottom: 1.25rem; min-width: 24rem; }
th, td { text-align: left; padding: .2rem .8rem .2rem 0; border-bottom: 1px solid #eee; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
#error { color: #b00; }
.charts { display: flex; flex-wrap: wrap; gap: 1rem; margin-bottom: 1.25rem; }
.chart { border: 1px solid #ccc; border-radius: 6px; padding: .4rem .6rem; }
.chart .k { font-size: .8rem; color: #666; }
.chart svg { display: block; width: 300px; height: 90px; }
.chart text { font-size: 10px; fill: #666; }
.legend-in { color: #1f6fb2; } .legend-out { color: #d9822b; }
</style>
</head>
<body>
<h1>Tern <span id="version"></span> &mdash; up <span id="uptime">?</span></h1>
<p id="cluster" hidden></p>
<p id="error"></p>
<div class="cards">
  <div class="card"><div class="v" id="connections">&ndash;</div><div class="k">connections</div></div>
  <div class="card"><div class="v" id="offline">&ndash;</div><div class="k">offline sessions</div></div>
  <div class="card"><div class="v" id="rate-in">&ndash;</div><div class="k">messages in / s</div></div>
  <div class="card"><div class="v" id="rate-out">&ndash;</div><div class="k">messages out / s</div></div>
  <div class="card"><div class="v" id="queued">&ndash;</div><div class="k">queued</div></div>
  <div class="card"><div class="v" id="inflight">&ndash;</div><div class="k">in flight</div></div>
  <div class="card"><div class="v" id="dropped">&ndash;</div><div class="k">dropped (total)</div></div>
  <div class="card"><div class="v" id="subscriptions">&ndash;</div><div class="k">subscriptions</div></div>
  <div class="card"><div class="v" id="memory">&ndash;</div><div class="k">memory (RSS)</div></div>
</div>
<h2>Last 15 minutes</h2>
<div class="charts">
  <div class="chart"><div class="k">messages / s: <span class="legend-in">in</span>, <span class="legend-out">out</span></div><svg id="chart-rates" viewBox="0 0 300 90" role="img" aria-label="messages in and out per second"></svg></div>
  <div class="chart"><div class="k">queued</div><svg id="chart-queued" viewBox="0 0 300 90" role="img" aria-label="messages queued"></svg></div>
  <div class="chart"><div class="k">connections</div><svg id="chart-connections" viewBox="0 0 300 90" role="img" aria-label="connections"></svg></div>
</div>
<h2>Slowest consumers</h2>
<p><small>By the age of their oldest waiting message (sessions, shared groups, declared queues, bridges):</small></p>
<table><thead><tr><th>kind</th><th>name</th><th>queued</th><th>in flight / members</th><th>oldest (s)</th><th>latency (ms)</th><th>state</th></tr></thead><tbody id="slowest-age"></tbody></table>
<p><small>By publish-to-acknowledge latency (a moving average of their last acknowledgements):</small></p>
<table><thead><tr><th>kind</th><th>name</th><th>queued</th><th>in flight / members</th><th>oldest (s)</th><th>latency (ms)</th><th>state</th></tr></thead><tbody id="slowest-latency"></tbody></table>
<h2>Top topics by rate</h2>
<table><thead><tr><th>topic</th><th>messages / s</th></tr></thead><tbody id="topics"></tbody></table>
<h2>Declared queues</h2>
<table><thead><tr><th>queue</th><th>filter</th><th>messages</th><th>consumers</th><th>oldest (s)</th><th>state</th></tr></thead><tbody id="declared"></tbody></table>
<h2>Deepest session queues</h2>
<table><thead><tr><th>client id</th><th>queued</th><th>in flight</th><th>state</th></tr></thead><tbody id="queues"></tbody></table>
<h2>Listeners</h2>
<table><thead><tr><th>listener</th><th>address</th><th>connections</th></tr></thead><tbody id="listeners"></tbody></table>
<h2>Dropped messages by reason</h2>
<table><thead><tr><th>reason</th><th>messages</th></tr></thead><tbody id="drops"></tbody></table>
<p><small>Topic rates are decayed counts over about the last <span id="window">30</span> s, from one message in <span id="sample">1</span>. Raw data: <a href="status.json">status.json</a>, <a href="metrics">metrics</a>.</small></p>
<script>
"use strict";
function set(id, v) { document.getElementById(id).textContent = String(v); }
function row(body, cells) {
  const tr = document.createElement("tr");
  cells.forEach(function (c, i) {
    const td = document.createElement("td");
    td.textContent = String(c);
    if (typeof c === "number") td.className = "n";
    tr.appendChild(td);
  });
  body.appendChild(tr);
}
function fill(id, rows) {
  const body = document.getElementById(id);
  body.replaceChildren();
  rows.forEach(function (r) { row(body, r); });
}
const SVG = "http://www.w3.org/2000/svg";
function svgEl(name, attrs) {
  const e = document.createElementNS(SVG, name);
  Object.keys(attrs).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
  return e;
}
function human(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(0) + "k";
  return String(Math.round(n * 10) / 10);
}
// One chart: a line per series over the points' time span, scaled to the largest value.
function chart(id, points, series) {
  const svg = document.getElementById(id);
  svg.replaceChildren();
  const W = 300, H = 90, top = 12, bottom = 78;
  if (points.length === 0) {
    const t = svgEl("text", { x: 4, y: 45 });
    t.textContent = "no points yet";
    svg.appendChild(t);
    return;
  }
  let max = 0;
  series.forEach(function (s) { points.forEach(function (p) { max = Math.max(max, p[s.col]); }); });
  const t0 = points[0][0], t1 = points[points.length - 1][0];
  const x = function (t) { return t1 > t0 ? ((t - t0) / (t1 - t0)) * (W - 4) + 2 : W - 2; };
  const y = function (v) { return max > 0 ? bottom - (v / max) * (bottom - top) : bottom; };
  svg.appendChild(svgEl("line", { x1: 0, y1: bottom, x2: W, y2: bottom, stroke: "#ccc" }));
  series.forEach(function (s) {
    const pts = points.map(function (p) { return x(p[0]).toFixed(1) + "," + y(p[s.col]).toFixed(1); });
    svg.appendChild(svgEl("polyline", { points: pts.join(" "), fill: "none", stroke: s.color,
      "stroke-width": 1.5, "data-series": s.name, "data-last": points[points.length - 1][s.col],
      "data-max": max }));
  });
  const label = svgEl("text", { x: 2, y: 10 });
  label.textContent = "max " + human(max);
  svg.appendChild(label);
  const span = svgEl("text", { x: 2, y: 88 });
  const secs = t1 - t0;
  span.textContent = "-" + (secs >= 120 ? Math.round(secs / 60) + " min" : secs + " s");
  svg.appendChild(span);
  const now = svgEl("text", { x: W - 2, y: 88, "text-anchor": "end" });
  now.textContent = "now";
  svg.appendChild(now);
}
function consumerRows(list) {
  return list.map(function (c) {
    return [c.kind, c.name, c.queued, c.kind === "session" ? c.inflight : c.members,
      c.oldest_age_seconds, c.latency_ms === null ? "\u2013" : c.latency_ms,
      c.online ? "online" : "offline"];
  });
}
async function refresh() {
  try {
    const r = await fetch("status.json", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    const s = await r.json();
    set("version", s.version);
    set("uptime", s.uptime_seconds + " s");
    const c = document.getElementById("cluster");
    c.hidden = !s.cluster;
    if (s.cluster) {
      set("cluster", "Cluster node " + s.cluster.node + " of " + s.cluster.members.join(", ") +
        (s.cluster.available ? " (quorum reachable)" : " (NO QUORUM: durable publishes refused)"));
    }
    set("connections", s.connections);
    set("offline", s.sessions.offline);
    set("rate-in", s.rates.received_per_second.toFixed(1));
    set("rate-out", s.rates.sent_per_second.toFixed(1));
    set("queued", s.queued);
    set("inflight", s.inflight);
    set("dropped", s.dropped_total);
    set("subscriptions", s.subscriptions);
    set("sample", s.sample_every);
    set("window", s.topic_rate_window_seconds);
    set("memory", s.memory.rss_bytes === null ? "?" : human(s.memory.rss_bytes) + "B");
    const pts = s.history.points;
    chart("chart-rates", pts, [{ col: 1, color: "#1f6fb2", name: "in" },
      { col: 2, color: "#d9822b", name: "out" }]);
    chart("chart-queued", pts, [{ col: 3, color: "#7a3fb2", name: "queued" }]);
    chart("chart-connections", pts, [{ col: 4, color: "#2b8a3e", name: "connections" }]);
    fill("slowest-age", consumerRows(s.slowest_consumers.by_oldest_age));
    fill("slowest-latency", consumerRows(s.slowest_consumers.by_latency));
    fill("listeners", s.listeners.map(function (l) { return [l.name + " (" + l.kind + ")", l.bind, l.connections]; }));
    fill("drops", Object.keys(s.dropped).map(function (k) { return [k, s.dropped[k]]; }));
    fill("topics", s.top_topics.map(function (t) { return [t.topic, t.per_second]; }));
    fill("queues", s.queues.map(function (q) {
      return [q.client_id, q.queued, q.inflight, q.online ? "online" : "offline"];
    }));
    fill("declared", s.declared_queues.map(function (q) {
      return [q.name, q.filter, q.messages, q.consumers, q.oldest_age_seconds,
        q.declared ? "collecting" : "draining"];
    }));
    set("error", "");
  } catch (e) {
    set("error", "cannot reach the broker: " + e.message);
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_escape_what_clients_choose() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\n</script>\u{1}\u{2028}é");
        assert_eq!(
            out,
            "\"a\\\"b\\\\c\\u000a\\u003c/script\\u003e\\u0001\\u2028é\""
        );
    }
}
