//! The status page on the metrics port: `/` is a small HTML page (served from the binary, no
//! external assets) that polls `/status.json` and shows live connections, message rates, the
//! busiest topics, the declared queues and the deepest session queues.
//!
//! Rates are computed between two `/status.json` requests (at most once a second; viewers in
//! between share the last result; the first request measures from the start), so nothing
//! runs while nobody looks. Topic rates come from the broker's sample of published topics
//! ([`crate::broker::topics`]).

use crate::broker::topics::SAMPLE_EVERY;
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
    let mut topics: Vec<(Box<str>, f64)> = broker
        .topic_sampler
        .take()
        .into_iter()
        .map(|(t, n)| {
            let per_second = if elapsed > 0.0 {
                (n * SAMPLE_EVERY) as f64 / elapsed
            } else {
                0.0
            };
            (t, per_second)
        })
        .collect();
    topics.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    topics.truncate(TOP);
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
    let _ = write!(j, "\"sample_every\":{SAMPLE_EVERY},\"top_topics\":[");
    for (i, (t, r)) in topics.iter().enumerate() {
        if i > 0 {
            j.push(',');
        }
        j.push_str("{\"topic\":");
        json_string(&mut j, t);
        let _ = write!(j, ",\"per_second\":{r:.1}}}");
    }
    j.push_str("],\"queues\":[");
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
pub const PAGE: &str = r#"<!doctype html>
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
</div>
<h2>Top topics by rate</h2>
<table><thead><tr><th>topic</th><th>messages / s</th></tr></thead><tbody id="topics"></tbody></table>
<h2>Declared queues</h2>
<table><thead><tr><th>queue</th><th>filter</th><th>messages</th><th>consumers</th><th>oldest (s)</th><th>state</th></tr></thead><tbody id="declared"></tbody></table>
<h2>Deepest session queues</h2>
<table><thead><tr><th>client id</th><th>queued</th><th>in flight</th><th>state</th></tr></thead><tbody id="queues"></tbody></table>
<p><small>Topic rates are estimated from one message in <span id="sample">16</span>. Raw data: <a href="status.json">status.json</a>, <a href="metrics">metrics</a>.</small></p>
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
"#;

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
