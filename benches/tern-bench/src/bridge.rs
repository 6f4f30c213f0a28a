//! `bridge-drain`, `bridge-drain-v5`: how fast an edge broker's store-and-forward bridge
//! drains a backlog to a remote broker once the remote comes up. The edge is Tern or
//! Mosquitto (the broker under test); the remote is a Mosquitto in both runs, so only the
//! edge's bridge differs.
//!
//! One run, driven by [`run_one`] (`tern-bench run`), which owns every broker process and
//! stops them all whatever happens:
//!
//! 1. The remote's first life, "stage 0": a Mosquitto with `persistence true` listening on a
//!    port R0 the edge does not know. The edge starts with its bridge pointed at port P, where
//!    nothing listens yet; its bridge keeps retrying.
//! 2. Load phase `publish` (a `tern-bench load` process): the subscriber connects to stage 0
//!    with Clean Session 0 and a fixed client id, subscribes QoS 1 to `site17/#` and
//!    disconnects, so the remote holds its session; then one publisher sends the backlog to the
//!    edge: N QoS 1 messages of 64 bytes round-robin over `sensors/t0` .. `sensors/t9`,
//!    pipelined (at most [`WINDOW`] unacknowledged), until all are acknowledged.
//! 3. Stage 0 stops (SIGTERM: Mosquitto writes the session to `mosquitto.db`) and the remote's
//!    second life, "stage 1", starts on port P from that file: the subscriber's session is
//!    there before the bridge can connect, so whichever of the two comes first, nothing the
//!    bridge forwards is dropped for want of a subscriber.
//! 4. Load phase `drain`: the subscriber reconnects to P as soon as it listens (every 2 ms),
//!    requires its session back, and takes every message, acknowledging each. The drain is
//!    timed at the subscriber from the first message to the Nth distinct one:
//!    msg/s = (N - 1) / (t_last - t_first), so the bridges' reconnect delays (Tern: full
//!    jitter under a cap doubling from 0.5 s to 30 s; Mosquitto: `restart_timeout 1`) are
//!    not in it; the time from the remote's start to the last message is reported too.
//!
//! Timestamps of the two processes are CLOCK_MONOTONIC nanoseconds ([`mono_ns`]).

use crate::load::{
    cpu_fields, fail, publisher, unstamp, Meter, Opts, PubPlan, Seen, CONNECT_TIMEOUT,
};
use crate::mqtt::{self, Client};
use crate::run::{
    chown_to_mosquitto, dir_bytes, free_port, fresh_dir, load_with, metrics_body, num,
    spawn_mosquitto, start_tern, Broker, MosquittoSpec, RunArgs,
};
use crate::stats;
use mqttbytes::v4::Packet;
use mqttbytes::{PacketType, QoS};
use serde_json::{json, Value};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::time::{sleep, timeout_at};

/// Topics of the backlog: `sensors/t0` .. `sensors/t9`; stream id = topic index.
const TOPICS: usize = 10;
const PAYLOAD: usize = 64;
/// The backlog publisher's unacknowledged messages at most.
const WINDOW: u64 = 512;
/// Both edges' bridge window (Tern `window`, its default; Mosquitto `max_inflight_messages`:
/// measured, Mosquitto drains no faster with 1,000 than with 100).
const BRIDGE_WINDOW: u32 = 1000;
/// The subscriber at the remote.
const SUB_ID: &str = "tern-bench-bridge-sub";
const FILTER: &str = "site17/#";
/// Bound on the backlog's publishing (plus the publisher's own 10 s drain).
const PUBLISH_LIMIT: Duration = Duration::from_secs(120);
/// How long the remote may take to listen once started.
const LISTEN_WAIT: Duration = Duration::from_secs(10);
/// From the subscriber's reconnect to the first message at most: Tern's backoff cap is
/// 30 s, Mosquitto retries every second here.
const FIRST_WAIT: Duration = Duration::from_secs(45);
/// After the first message: no progress for this long ends the drain ...
const IDLE: Duration = Duration::from_secs(10);
/// ... and so does this much in all (the load process is killed after 240 s).
const DRAIN_LIMIT: Duration = Duration::from_secs(150);

/// Messages in the backlog.
pub fn messages(quick: bool) -> u64 {
    if quick {
        10_000
    } else {
        100_000
    }
}

/// The bridge's MQTT version in scenario `sc`.
fn protocol(sc: &str) -> &'static str {
    if sc.ends_with("-v5") {
        "5"
    } else {
        "3.1.1"
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for the driver and both load processes.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Messages of stream `t` among the first `n` sent (round-robin over the topics).
fn of_stream(n: u64, t: usize) -> u64 {
    (n + (TOPICS - 1 - t) as u64) / TOPICS as u64
}

// ---------------------------------------------------------------- load-generator side

/// `tern-bench load --scenario bridge-drain* --phase publish|drain ...`
pub async fn load(o: &Opts) -> Value {
    let mut out = match o.args.get("phase").map(String::as_str) {
        Some("publish") => publish_phase(o).await,
        Some("drain") => drain_phase(o).await,
        _ => fail(
            "bridge scenarios run in two phases (--phase publish|drain), driven by tern-bench run",
        ),
    };
    if let Some(m) = out.as_object_mut() {
        m.insert("phase".into(), json!(o.args.get("phase")));
        m.insert("bridge_protocol".into(), json!(protocol(&o.scenario)));
    }
    out
}

/// The subscriber's session at the remote (`o.sub_addr`: stage 0), then the backlog to the
/// edge (`o.addr`).
async fn publish_phase(o: &Opts) -> Value {
    let n = messages(o.quick);
    let mut errors: Vec<String> = Vec::new();
    match Client::connect_session(o.sub_addr, None, SUB_ID, true, CONNECT_TIMEOUT).await {
        Ok((c, _)) => {
            c.close_and_wait(Duration::from_secs(2)).await;
        }
        Err(e) => return fail(format!("remote subscriber connect (clean): {e}")),
    }
    let mut sub =
        match Client::connect_session(o.sub_addr, None, SUB_ID, false, CONNECT_TIMEOUT).await {
            Ok((c, _)) => c,
            Err(e) => return fail(format!("remote subscriber connect: {e}")),
        };
    match sub.subscribe(FILTER, 1).await {
        Ok(1) => {}
        Ok(q) => return fail(format!("remote granted QoS {q}, not 1")),
        Err(e) => return fail(format!("remote subscribe: {e}")),
    }
    if !sub.close_and_wait(Duration::from_secs(5)).await {
        errors.push("the remote did not close the subscriber's connection after DISCONNECT".into());
    }
    let id = format!("tb-{}-{}-pub", o.scenario, std::process::id());
    let c = match Client::connect(o.addr, None, &id, CONNECT_TIMEOUT).await {
        Ok(c) => c,
        Err(e) => return fail(format!("publisher connect to the edge: {e}")),
    };
    let pid = o.broker_pid;
    let rss0 = stats::proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let meter = Meter::start(&o.broker_pids);
    let start = Instant::now() + Duration::from_millis(20);
    let plan = PubPlan {
        id: 0,
        topics: (0..TOPICS).map(|t| format!("sensors/t{t}")).collect(),
        qos: 1,
        payload: PAYLOAD,
        window: WINDOW,
        open_loop: false,
        rate: None,
        count: Some(n),
        start,
        end: start + PUBLISH_LIMIT,
        receivers: vec![],
    };
    let r = publisher(c, plan, None).await;
    let publish_s = start.elapsed().as_secs_f64();
    let (wall, broker_cpu, client_cpu) = meter.read();
    if let Some(e) = r.error {
        errors.push(format!("publisher: {e}"));
    }
    // QoS 1 acknowledgements come back in order: the acknowledged are the first sent - unacked.
    let acked = r.sent - r.unacked;
    if acked < n {
        errors.push(format!("{acked} of {n} backlog messages acknowledged"));
    }
    let rss = stats::proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let mut out = json!({
        "ok": errors.is_empty(),
        "errors": errors,
        "messages": n,
        "sent": r.sent,
        "acked": acked,
        "publish_s": publish_s,
        "publish_rate": acked as f64 / publish_s.max(1e-9),
        "publish_window": WINDOW,
        "rss_before_kib": rss0,
        "rss_backlog_kib": rss,
        "rss_backlog_mib": rss as f64 / 1024.0,
    });
    if let Some(m) = out.as_object_mut() {
        cpu_fields(m, wall, broker_cpu, client_cpu);
    }
    out
}

/// An option the driver passes, as a number.
fn arg_u64(o: &Opts, k: &str) -> Option<u64> {
    o.args.get(k).and_then(|v| v.parse().ok())
}

/// The subscriber back at the remote (`o.addr`: stage 1, started at `--t0-ns`) takes the
/// backlog the edge's bridge forwards.
async fn drain_phase(o: &Opts) -> Value {
    let (Some(t0), Some(sent), Some(acked)) =
        (arg_u64(o, "t0-ns"), arg_u64(o, "sent"), arg_u64(o, "acked"))
    else {
        return fail("--phase drain needs --t0-ns, --sent and --acked");
    };
    let remote_pid = arg_u64(o, "remote-pid").map(|p| p as u32);
    let edge = o.broker_pid;
    let mut errors: Vec<String> = Vec::new();
    let since_t0 = |t: u64| t.saturating_sub(t0) as f64 / 1e9;
    // The edge's memory every 20 ms from the subscriber's return to the end of the drain.
    let (stop_tx, stop_rx) = watch::channel(false);
    let peak = Arc::new(AtomicU64::new(
        stats::proc_status_kib(edge, "VmRSS:").unwrap_or(0),
    ));
    let rss_start = peak.load(Relaxed);
    let sampler = {
        let (peak, mut stop) = (peak.clone(), stop_rx);
        tokio::spawn(async move {
            loop {
                if let Some(r) = stats::proc_status_kib(edge, "VmRSS:") {
                    peak.fetch_max(r, Relaxed);
                }
                tokio::select! {
                    _ = sleep(Duration::from_millis(20)) => {}
                    _ = stop.changed() => break,
                }
            }
        })
    };
    // Reconnect as soon as the remote listens.
    let listen_deadline = Instant::now() + LISTEN_WAIT;
    let mut attempts = 0u32;
    let conn = loop {
        attempts += 1;
        match Client::connect_session(o.addr, None, SUB_ID, false, CONNECT_TIMEOUT).await {
            Ok(x) => break Ok(x),
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    && Instant::now() < listen_deadline =>
            {
                sleep(Duration::from_millis(2)).await
            }
            Err(e) => break Err(e),
        }
    };
    let t_sub = mono_ns();
    let sent_per: Vec<u64> = (0..TOPICS).map(|t| of_stream(sent, t)).collect();
    let mut seen = Seen::new(&sent_per);
    let (mut t_first, mut t_last) = (0u64, 0u64);
    let mut first_read = 0u64;
    let mut timed_out = None;
    let mut present = false;
    // Edge and remote CPU from the first message to the last.
    let mut cpu_first: Option<(f64, f64, f64)> = None;
    let cpu_now = || {
        (
            stats::proc_cpu_s(edge).unwrap_or(f64::NAN),
            remote_pid.and_then(stats::proc_cpu_s).unwrap_or(f64::NAN),
            stats::self_cpu_s(),
        )
    };
    let mut cpu_last = (f64::NAN, f64::NAN, f64::NAN);
    match conn {
        Err(e) => errors.push(format!("subscriber reconnect to the remote: {e}")),
        Ok((mut c, p)) => {
            present = p;
            if !present {
                errors.push("the remote lost the subscriber's session (no session present)".into());
            }
            let start = Instant::now();
            let mut last_progress = start;
            let mut have_data = !c.rbuf.is_empty();
            let err = loop {
                if seen.unique >= sent {
                    break None;
                }
                if !have_data {
                    let until = if t_first == 0 {
                        start + FIRST_WAIT
                    } else {
                        (last_progress + IDLE).min(start + DRAIN_LIMIT)
                    };
                    match timeout_at(until.into(), c.read_more()).await {
                        Err(_) => {
                            timed_out = Some(if t_first == 0 {
                                format!(
                                    "no message within {FIRST_WAIT:?} of the subscriber's return"
                                )
                            } else {
                                format!(
                                    "drain stopped at {} of {sent} messages (no progress for {IDLE:?} or {DRAIN_LIMIT:?} in all)",
                                    seen.unique
                                )
                            });
                            break None;
                        }
                        Ok(Err(e)) => break Some(e.to_string()),
                        Ok(Ok(_)) => {}
                    }
                }
                have_data = false;
                let now = mono_ns();
                let before = seen.unique;
                let r = c.drain(|packet, wbuf| {
                    if let Packet::Publish(p) = packet {
                        let (id, seq, _) = unstamp(&p.payload)?;
                        seen.record(id, seq, p.dup);
                        if p.qos != QoS::AtMostOnce {
                            mqtt::ack(wbuf, PacketType::PubAck, p.pkid)?;
                        }
                    }
                    Ok(())
                });
                if let Err(e) = r {
                    break Some(e.to_string());
                }
                if let Err(e) = c.flush().await {
                    break Some(e.to_string());
                }
                if seen.unique > before {
                    last_progress = Instant::now();
                    if t_first == 0 {
                        t_first = now;
                        first_read = seen.unique - before;
                        cpu_first = Some(cpu_now());
                    }
                    t_last = now;
                    cpu_last = cpu_now();
                }
            };
            if let Some(e) = err {
                errors.push(format!("subscriber: {e}"));
            }
            c.close_and_wait(Duration::from_secs(2)).await;
        }
    }
    let _ = stop_tx.send(true);
    let _ = sampler.await;
    if let Some(e) = timed_out {
        errors.push(e);
    }
    let lost: u64 = (0..TOPICS)
        .map(|t| seen.missing_below(t, of_stream(acked, t)))
        .sum();
    if lost > 0 {
        errors.push(format!(
            "{lost} acknowledged messages never reached the remote subscriber"
        ));
    }
    let hwm = stats::proc_status_kib(edge, "VmHWM:").unwrap_or(0);
    let peak_kib = peak.load(Relaxed);
    let drain_s = t_last.saturating_sub(t_first) as f64 / 1e9;
    let delivered = seen.unique;
    let (edge_cpu, remote_cpu, client_cpu) = match cpu_first {
        Some(f) => (cpu_last.0 - f.0, cpu_last.1 - f.1, cpu_last.2 - f.2),
        None => (f64::NAN, f64::NAN, f64::NAN),
    };
    let rate = delivered.saturating_sub(1) as f64 / drain_s.max(1e-9);
    let mut out = json!({
        "ok": errors.is_empty(),
        "errors": errors,
        "qos": 1,
        "payload_bytes": PAYLOAD,
        "topics": TOPICS,
        "bridge_window": BRIDGE_WINDOW,
        "expected": acked,
        "delivered": delivered,
        "lost": lost,
        "duplicates": seen.dups,
        "dup_flagged": seen.dup_flagged,
        "reordered": seen.reordered,
        "unexpected": seen.unexpected,
        "session_present": present,
        "connect_attempts": attempts,
        "sub_back_after_s": since_t0(t_sub),
        "first_after_s": if t_first > 0 { since_t0(t_first) } else { f64::NAN },
        // messages already waiting when the subscriber's first read came back: > 0 when the
        // bridge was at the remote before the subscriber
        "first_read_msgs": first_read,
        "drain_s": drain_s,
        "drain_rate": rate,
        "rate": rate,
        "total_s": if t_last > 0 { since_t0(t_last) } else { f64::NAN },
        "rss_start_kib": rss_start,
        "peak_kib": peak_kib,
        "peak_rss_mib": peak_kib as f64 / 1024.0,
        "vmhwm_mib": hwm as f64 / 1024.0,
        "edge_cpu_s": edge_cpu,
        "remote_cpu_s": remote_cpu,
        "remote_cpu_cores": remote_cpu / drain_s,
        "msgs_per_broker_cpu_s": delivered as f64 / edge_cpu,
    });
    if let Some(m) = out.as_object_mut() {
        cpu_fields(m, drain_s, edge_cpu, client_cpu);
    }
    out
}

// ---------------------------------------------------------------- driver side

/// The edge Tern's bridge (appended to the comparison's tern.toml, storage `os`).
fn tern_bridge(remote_port: u16, protocol: &str) -> String {
    format!(
        r#"
[[bridges]]
name = "cloud"
address = "127.0.0.1:{remote_port}"
protocol = "{protocol}"
client_id = "tb-edge-tern"
window = {BRIDGE_WINDOW}
max_queued_messages = 1000000
out = [{{ filter = "sensors/#", qos = 1, local_prefix = "", remote_prefix = "site17/" }}]
"#
    )
}

/// The edge Mosquitto's bridge (appended to the comparison's mosquitto.conf, persistence on).
fn mosquitto_bridge(remote_port: u16, protocol: &str) -> String {
    let version = if protocol == "5" {
        "mqttv50"
    } else {
        "mqttv311"
    };
    format!(
        "\nconnection cloud\n\
         address 127.0.0.1:{remote_port}\n\
         bridge_protocol_version {version}\n\
         remote_clientid tb-edge-mosquitto\n\
         cleansession false\n\
         restart_timeout 1\n\
         bridge_attempt_unsubscribe false\n\
         notifications false\n\
         topic sensors/# out 1 \"\" site17/\n"
    )
}

/// One run of a bridge scenario with `broker` as the edge: every process it starts is
/// stopped before it returns.
#[allow(clippy::too_many_arguments)]
pub fn run_one(
    a: &RunArgs,
    sc: &str,
    broker: &str,
    round: usize,
    tmp: &Path,
    logs: &Path,
    hard: u64,
) -> Value {
    let edge_data = tmp.join(format!("{broker}-data-{sc}-{round}"));
    let remote_data = tmp.join(format!("remote-data-{sc}-{round}-{broker}"));
    let mut procs: Vec<(&'static str, Broker)> = Vec::new();
    let r = drive(
        a,
        sc,
        broker,
        round,
        tmp,
        logs,
        hard,
        &edge_data,
        &remote_data,
        &mut procs,
    );
    let mut v = r.unwrap_or_else(|e| json!({"ok": false, "errors": [e]}));
    // The remote first, so that the edge's bridge sees it go.
    let mut stop_errors = Vec::new();
    while let Some((role, b)) = procs.pop() {
        if let Some(e) = b.stop() {
            stop_errors.push(format!("{role}: {e}"));
        }
    }
    if !stop_errors.is_empty() {
        v["ok"] = json!(false);
        v["broker_stop"] = json!(stop_errors);
    }
    v["scenario"] = json!(sc);
    v["broker"] = json!(broker);
    v["durability"] = json!(if broker == "tern" {
        "os"
    } else {
        "persistence true"
    });
    v["store_bytes_after"] = json!(dir_bytes(&edge_data));
    if v["ok"].as_bool() == Some(true) {
        let _ = std::fs::remove_dir_all(&edge_data);
        let _ = std::fs::remove_dir_all(&remote_data);
    } else {
        v["store_dir"] = json!(edge_data.display().to_string());
    }
    v
}

/// The steps of [`run_one`]; each broker it starts goes into `procs` at once.
#[allow(clippy::too_many_arguments)]
fn drive(
    a: &RunArgs,
    sc: &str,
    broker: &str,
    round: usize,
    tmp: &Path,
    logs: &Path,
    hard: u64,
    edge_data: &Path,
    remote_data: &Path,
    procs: &mut Vec<(&'static str, Broker)>,
) -> Result<Value, String> {
    let proto = protocol(sc);
    let port = |what: &str| free_port().map_err(|e| format!("{what} port: {e}"));
    let (remote_port, stage0_port) = (port("remote")?, port("stage 0")?);
    fresh_dir(edge_data)?;
    fresh_dir(remote_data)?;
    chown_to_mosquitto(remote_data);
    let log = |role: &str| logs.join(format!("{role}-{broker}-{sc}-{round}.log"));
    // The remote's first life: only to take the subscriber's session.
    let stage0 = spawn_mosquitto(
        a,
        &MosquittoSpec {
            conf: tmp.join("remote0.conf"),
            port: stage0_port,
            persist: Some(remote_data),
            inflight: 1024,
            extra: String::new(),
            wait_listening: true,
        },
        &log("remote0"),
        hard,
    )?;
    let stage0_addr = stage0.addr.clone();
    procs.push(("remote (stage 0)", stage0));
    let edge = match broker {
        "tern" => start_tern(
            a,
            tmp,
            &log("edge"),
            hard,
            "os",
            edge_data,
            &tern_bridge(remote_port, proto),
        )?,
        _ => spawn_mosquitto(
            a,
            &MosquittoSpec {
                conf: tmp.join("mosquitto.conf"),
                port: port("edge")?,
                persist: Some(edge_data),
                inflight: BRIDGE_WINDOW,
                extra: mosquitto_bridge(remote_port, proto),
                wait_listening: true,
            },
            &log("edge"),
            hard,
        )?,
    };
    let (edge_addr, edge_pid, edge_metrics) = (edge.addr.clone(), edge.pid, edge.metrics.clone());
    // Stopped last: it goes first into the list.
    procs.insert(0, ("edge", edge));
    let mut args: Vec<String> = [
        "load",
        "--scenario",
        sc,
        "--broker",
        broker,
        "--phase",
        "publish",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--addr".into(), edge_addr]);
    args.extend(["--sub-addr".into(), stage0_addr]);
    args.extend(["--broker-pid".into(), edge_pid.to_string()]);
    if a.quick {
        args.push("--quick".into());
    }
    let pubv = load_with(&args)?;
    let stop0 = procs.pop().map(|(_, b)| b.stop());
    if pubv["ok"].as_bool() != Some(true) {
        return Ok(json!({"ok": false, "errors": pubv["errors"], "publish": pubv}));
    }
    if let Some(Some(e)) = stop0 {
        return Err(format!("remote stage 0: {e}"));
    }
    if !remote_data.join("mosquitto.db").exists() {
        return Err("the remote wrote no mosquitto.db at its first shutdown".into());
    }
    let (sent, acked) = (
        num(&pubv, "sent").unwrap_or(0.0) as u64,
        num(&pubv, "acked").unwrap_or(0.0) as u64,
    );
    // The remote's second life, on the port the edge's bridge is trying.
    let t0 = mono_ns();
    let stage1 = spawn_mosquitto(
        a,
        &MosquittoSpec {
            conf: tmp.join("remote1.conf"),
            port: remote_port,
            persist: Some(remote_data),
            inflight: 1024,
            extra: String::new(),
            wait_listening: false,
        },
        &log("remote1"),
        hard,
    )?;
    let (stage1_addr, stage1_pid) = (stage1.addr.clone(), stage1.pid);
    procs.push(("remote", stage1));
    let mut args: Vec<String> = [
        "load",
        "--scenario",
        sc,
        "--broker",
        broker,
        "--phase",
        "drain",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--addr".into(), stage1_addr]);
    args.extend(["--broker-pid".into(), edge_pid.to_string()]);
    args.extend(["--remote-pid".into(), stage1_pid.to_string()]);
    args.extend(["--t0-ns".into(), t0.to_string()]);
    args.extend(["--sent".into(), sent.to_string()]);
    args.extend(["--acked".into(), acked.to_string()]);
    if a.quick {
        args.push("--quick".into());
    }
    let mut v = load_with(&args)?;
    // The edge's own account (Tern): its bridge counters and any drops.
    if let Some(body) = edge_metrics.as_deref().and_then(metrics_body) {
        let mut m = serde_json::Map::new();
        for l in body.lines().filter(|l| l.starts_with("tern_bridge_")) {
            if let Some((k, x)) = l.rsplit_once(' ') {
                if let Ok(x) = x.trim().parse::<f64>() {
                    m.insert(k.to_string(), json!(x));
                }
            }
        }
        v["edge_bridge_metrics"] = Value::Object(m);
    }
    for k in [
        "publish_rate",
        "publish_s",
        "sent",
        "acked",
        "rss_backlog_mib",
        "broker_cpu_cores",
    ] {
        let key = match k {
            "broker_cpu_cores" => "publish_edge_cpu_cores",
            k => k,
        };
        v[key] = pubv[k].clone();
    }
    v["publish_errors"] = pubv["errors"].clone();
    Ok(v)
}

/// One line of progress for a bridge run.
pub fn progress(v: &Value) -> String {
    let f = |k: &str| num(v, k).unwrap_or(f64::NAN);
    format!(
        "drain {} msg/s ({} in {:.2} s; first {:.2} s after the remote started, last {:.2} s), \
         publish {} msg/s, lost {}, dups {}, edge peak RSS {:.1} MiB, edge {:.2} cores, \
         remote {:.2} cores",
        crate::run::fmt_num(f("drain_rate")),
        crate::run::fmt_num(f("delivered")),
        f("drain_s"),
        f("first_after_s"),
        f("total_s"),
        crate::run::fmt_num(f("publish_rate")),
        f("lost"),
        f("duplicates"),
        f("peak_rss_mib"),
        f("broker_cpu_cores"),
        f("remote_cpu_cores"),
    )
}

/// Scenarios driven by [`run_one`].
pub fn is_bridge(sc: &str) -> bool {
    sc.starts_with("bridge-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_split_round_robin() {
        for n in [0u64, 1, 9, 10, 11, 99_999, 100_000] {
            let total: u64 = (0..TOPICS).map(|t| of_stream(n, t)).sum();
            assert_eq!(total, n);
        }
        assert_eq!(of_stream(11, 0), 2);
        assert_eq!(of_stream(11, 1), 1);
    }
}
