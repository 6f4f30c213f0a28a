//! The load generator: one scenario against one broker, one JSON object as the result.
//!
//! Everything is measured at the subscriber: a publisher stamps (stream id, sequence number,
//! send time) into the first 20 bytes of each payload; the subscriber counts unique
//! deliveries per stream, detects gaps and duplicates, and records publish-to-delivery
//! latency. Publishers are closed-loop unless a scenario says otherwise: QoS 1/2 keeps a
//! window of unacknowledged messages, QoS 0 may run at most a fixed number of messages ahead
//! of what its subscribers have received.

use crate::mqtt::{self, Client, PublishEncoder};
use crate::stats::{self, now_ns, Histogram};
use bytes::BytesMut;
use mqttbytes::v4::Packet;
use mqttbytes::{PacketType, QoS};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tokio::time::{sleep, sleep_until, timeout_at};

pub const SCENARIOS: &[&str] = &[
    "fanin-q0",
    "fanin-q1",
    "fanin-q2",
    "fanout-q0",
    "pairs-q1",
    "fanin-q0-open",
    "latency-q1",
    "conns",
    "burst-q1",
    "durable-q1-memory",
    "durable-q1-os",
    "durable-q1-fsync",
    "bridge-drain",
    "bridge-drain-v5",
];

/// Header stamped into each payload: stream id (u32), sequence (u64), send time (u64 ns).
const STAMP: usize = 20;
/// Packets encoded per write when nothing else limits a publisher.
const BATCH: usize = 64;
/// Time allowed after sending stops for acknowledgements and deliveries to arrive.
const DRAIN: Duration = Duration::from_secs(10);
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep Alive of the idle connections of `conns`, seconds (issue 15's idle-device row).
const IDLE_KEEP_ALIVE: u16 = 60;
/// A client that used at least this much of one core over a run is likely the bottleneck.
const SATURATED: f64 = 0.9;

pub struct Opts {
    /// Where publishers (and `conns`' idle clients) connect.
    pub addr: SocketAddr,
    /// Where subscribers connect (`--sub-addr`; the same as `addr` unless given): a node of a
    /// cluster other than the publishers', for cross-node figures.
    pub sub_addr: SocketAddr,
    /// The broker process whose memory and open-file limit are read (the first of
    /// `broker_pids`).
    pub broker_pid: u32,
    /// Every process whose CPU counts as the broker's (summed): `--broker-pids`, or just
    /// `broker_pid`.
    pub broker_pids: Vec<u32>,
    /// Subscribers of the throughput and latency scenarios connect with Clean Session 0 and a
    /// client id of their own for this run (`--persistent`); their sessions are ended with a
    /// clean connect after the measurement.
    pub persistent: bool,
    pub broker: String,
    pub scenario: String,
    pub quick: bool,
    pub duration: Option<f64>,
    /// Every `--name value` option of the command line (the bridge scenarios' phase and
    /// what the driver hands from one phase to the next).
    pub args: std::collections::HashMap<String, String>,
}

pub async fn run(o: Opts) -> Value {
    let (soft, hard) = stats::raise_nofile();
    let d = Duration::from_secs_f64(o.duration.unwrap_or(if o.quick { 1.5 } else { 5.0 }));
    let mut out = match o.scenario.as_str() {
        "fanin-q0" => tput(&o, Spec::fanin(0, false), d).await,
        "fanin-q1" => tput(&o, Spec::fanin(1, false), d).await,
        "fanin-q2" => tput(&o, Spec::fanin(2, false), d).await,
        "fanin-q0-open" => tput(&o, Spec::fanin(0, true), d).await,
        "fanout-q0" => tput(&o, Spec::fanout(), d).await,
        "pairs-q1" => tput(&o, Spec::pairs(), d).await,
        // Latency is a distribution: 20 s (20,000 samples) so p99 rests on 200 of them.
        "latency-q1" => {
            let d = if o.quick || o.duration.is_some() {
                d.max(Duration::from_secs(2))
            } else {
                Duration::from_secs(20)
            };
            tput(&o, Spec::latency(), d).await
        }
        "conns" => conns(&o, soft).await,
        "burst-q1" => burst(&o).await,
        // The broker's storage mode is the driver's business (tern.toml / mosquitto.conf);
        // the load is the same for all three.
        "durable-q1-memory" | "durable-q1-os" | "durable-q1-fsync" => durable(&o, d).await,
        // Two phases, each its own process, with the driver restarting the remote between
        // them (bridge.rs).
        "bridge-drain" | "bridge-drain-v5" => crate::bridge::load(&o).await,
        s => json!({"ok": false, "error": format!("unknown scenario {s}")}),
    };
    // Every scenario answers a JSON object (built just above).
    if let Some(m) = out.as_object_mut() {
        m.insert("scenario".into(), json!(o.scenario));
        m.insert("broker".into(), json!(o.broker));
        m.insert("quick".into(), json!(o.quick));
        m.insert("client_nofile".into(), json!({"soft": soft, "hard": hard}));
        m.insert("addr".into(), json!(o.addr.to_string()));
        m.insert("sub_addr".into(), json!(o.sub_addr.to_string()));
        m.insert("broker_pids".into(), json!(o.broker_pids));
        m.insert("persistent".into(), json!(o.persistent));
        if let Some(n) = stats::proc_nofile(o.broker_pid) {
            m.insert("broker_nofile".into(), json!(n));
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// every publisher on its own topic, one subscriber on `prefix/+`
    Fanin,
    /// one topic, every subscriber on it
    Fanout,
    /// publisher i on `prefix/i`, subscriber i on `prefix/i`
    Pairs,
}

#[derive(Clone, Copy)]
struct Spec {
    prefix: &'static str,
    shape: Shape,
    pubs: usize,
    subs: usize,
    qos: u8,
    payload: usize,
    open_loop: bool,
    /// QoS 1/2: unacknowledged messages per publisher; QoS 0: messages ahead of delivery.
    window: u64,
    /// messages per second per publisher (None: as fast as the window allows)
    rate: Option<u64>,
}

impl Spec {
    fn fanin(qos: u8, open_loop: bool) -> Spec {
        Spec {
            prefix: "fanin",
            shape: Shape::Fanin,
            pubs: 8,
            subs: 1,
            qos,
            payload: 64,
            open_loop,
            window: if qos == 0 { 512 } else { 64 },
            rate: None,
        }
    }
    fn fanout() -> Spec {
        Spec {
            prefix: "fanout",
            shape: Shape::Fanout,
            pubs: 1,
            subs: 100,
            qos: 0,
            payload: 64,
            open_loop: false,
            window: 512,
            rate: None,
        }
    }
    fn pairs() -> Spec {
        Spec {
            prefix: "pairs",
            shape: Shape::Pairs,
            pubs: 100,
            subs: 100,
            qos: 1,
            payload: 256,
            open_loop: false,
            window: 64,
            rate: None,
        }
    }
    fn latency() -> Spec {
        Spec {
            prefix: "latency",
            shape: Shape::Pairs,
            pubs: 1,
            subs: 1,
            qos: 1,
            payload: 64,
            open_loop: false,
            window: 64,
            rate: Some(1000),
        }
    }
    fn topic(&self, p: usize) -> String {
        match self.shape {
            Shape::Fanout => format!("{}/all", self.prefix),
            _ => format!("{}/{p}", self.prefix),
        }
    }
    fn filter(&self, s: usize) -> String {
        match self.shape {
            Shape::Fanin => format!("{}/+", self.prefix),
            Shape::Fanout => format!("{}/all", self.prefix),
            Shape::Pairs => format!("{}/{s}", self.prefix),
        }
    }
    /// Publishers whose messages subscriber s receives.
    fn sources(&self, s: usize) -> Vec<usize> {
        match self.shape {
            Shape::Fanin => (0..self.pubs).collect(),
            Shape::Fanout => vec![0],
            Shape::Pairs => vec![s],
        }
    }
    /// Subscribers that receive publisher p's messages.
    fn receivers(&self, p: usize) -> Vec<usize> {
        match self.shape {
            Shape::Fanin => vec![0],
            Shape::Fanout => (0..self.subs).collect(),
            Shape::Pairs => vec![p],
        }
    }
}

/// Delivery counters shared between subscribers (writers) and QoS 0 publishers (readers).
pub(crate) struct Shared {
    /// delivered[sub][pub]: unique messages of publisher `pub` that `sub` has received
    delivered: Vec<Vec<AtomicU64>>,
    /// woken when a publisher's messages were delivered
    wake: Vec<Notify>,
}

fn stamp(buf: &mut [u8], id: u32, seq: u64) {
    buf[0..4].copy_from_slice(&id.to_le_bytes());
    buf[4..12].copy_from_slice(&seq.to_le_bytes());
    buf[12..20].copy_from_slice(&now_ns().to_le_bytes());
}

pub(crate) fn unstamp(p: &[u8]) -> io::Result<(usize, u64, u64)> {
    if p.len() < STAMP {
        return Err(mqtt::bad("payload without a stamp"));
    }
    let mut id = [0u8; 4];
    let mut seq = [0u8; 8];
    let mut ts = [0u8; 8];
    id.copy_from_slice(&p[0..4]);
    seq.copy_from_slice(&p[4..12]);
    ts.copy_from_slice(&p[12..20]);
    Ok((
        u32::from_le_bytes(id) as usize,
        u64::from_le_bytes(seq),
        u64::from_le_bytes(ts),
    ))
}

/// Per-subscriber delivery bookkeeping.
struct Tally {
    next: Vec<u64>,
    unique: Vec<u64>,
    dups: u64,
    gaps: u64,
    hist: Histogram,
    last_ns: u64,
}

impl Tally {
    fn new(streams: usize) -> Tally {
        Tally {
            next: vec![0; streams],
            unique: vec![0; streams],
            dups: 0,
            gaps: 0,
            hist: Histogram::default(),
            last_ns: 0,
        }
    }
    fn record(&mut self, payload: &[u8], now: u64) -> io::Result<()> {
        let (id, seq, ts) = unstamp(payload)?;
        if id >= self.next.len() {
            return Err(mqtt::bad("stream id out of range"));
        }
        self.hist.record(now.saturating_sub(ts));
        let next = &mut self.next[id];
        if seq >= *next {
            self.gaps += seq - *next;
            *next = seq + 1;
            self.unique[id] += 1;
        } else {
            self.dups += 1;
        }
        self.last_ns = now;
        Ok(())
    }
    fn total(&self) -> u64 {
        self.unique.iter().sum()
    }
}

struct SubResult {
    tally: Tally,
    error: Option<String>,
}

/// `wait_close`: after DISCONNECT, wait until the broker has closed the connection (a
/// persistent subscriber whose session is ended by a clean connect right afterwards).
async fn subscriber(
    mut c: Client,
    s: usize,
    spec: Spec,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    wait_close: bool,
) -> SubResult {
    let sources = spec.sources(s);
    let mut tally = Tally::new(spec.pubs);
    let mut published = vec![0u64; spec.pubs];
    let error = loop {
        // What the socket already has is read without arming the stop signal: the same
        // outcome as the biased select below, whose read wins when it is ready, for less.
        // (Budgeted as the read would have been, so a busy subscriber still yields.)
        match c.try_read_more() {
            Ok(true) => tokio::task::coop::consume_budget().await,
            Ok(false) => tokio::select! {
                biased;
                r = c.read_more() => if let Err(e) = r { break Some(e.to_string()) },
                _ = stop.changed() => break None,
            },
            Err(e) => break Some(e.to_string()),
        }
        let now = now_ns();
        let r = c.drain(|packet, wbuf| match packet {
            Packet::Publish(p) => {
                tally.record(&p.payload, now)?;
                match p.qos {
                    QoS::AtMostOnce => Ok(()),
                    QoS::AtLeastOnce => mqtt::ack(wbuf, PacketType::PubAck, p.pkid),
                    QoS::ExactlyOnce => mqtt::ack(wbuf, PacketType::PubRec, p.pkid),
                }
            }
            Packet::PubRel(r) => mqtt::ack(wbuf, PacketType::PubComp, r.pkid),
            _ => Ok(()),
        });
        if let Err(e) = r {
            break Some(e.to_string());
        }
        if let Err(e) = c.flush().await {
            break Some(e.to_string());
        }
        for &p in &sources {
            if tally.unique[p] != published[p] {
                published[p] = tally.unique[p];
                shared.delivered[s][p].store(published[p], Relaxed);
                shared.wake[p].notify_one();
            }
        }
    };
    if wait_close {
        c.close_and_wait(Duration::from_secs(2)).await;
    } else {
        c.close().await;
    }
    SubResult { tally, error }
}

pub(crate) struct PubResult {
    pub(crate) sent: u64,
    pub(crate) unacked: u64,
    pub(crate) error: Option<String>,
}

/// Packet-id allocator for a window of in-flight QoS 1/2 messages.
struct Ids {
    state: Vec<u8>, // 0 free, 1 awaiting PUBACK/PUBREC, 2 awaiting PUBCOMP
    next: u16,
    inflight: u64,
}

impl Ids {
    fn new() -> Ids {
        Ids {
            state: vec![0; 65536],
            next: 0,
            inflight: 0,
        }
    }
    fn alloc(&mut self) -> u16 {
        loop {
            self.next = self.next.wrapping_add(1);
            if self.next != 0 && self.state[self.next as usize] == 0 {
                self.state[self.next as usize] = 1;
                self.inflight += 1;
                return self.next;
            }
        }
    }
    /// Handle PUBACK / PUBREC / PUBCOMP; queues PUBREL for a PUBREC.
    fn on_ack(&mut self, kind: PacketType, pid: u16, wbuf: &mut BytesMut) -> io::Result<()> {
        let st = &mut self.state[pid as usize];
        match (kind, *st) {
            (PacketType::PubAck, 1) | (PacketType::PubComp, 2) => {
                *st = 0;
                self.inflight -= 1;
            }
            (PacketType::PubRec, 1) => {
                *st = 2;
                mqtt::ack(wbuf, PacketType::PubRel, pid)?;
            }
            (PacketType::PubRec, 2) => mqtt::ack(wbuf, PacketType::PubRel, pid)?,
            _ => {}
        }
        Ok(())
    }
}

/// What a publisher sends: `count` messages (None: until `end`), round-robin over `topics`
/// (the stream id in the stamp is the topic's index, the sequence counts per topic).
pub(crate) struct PubPlan {
    pub(crate) id: usize,
    pub(crate) topics: Vec<String>,
    pub(crate) qos: u8,
    pub(crate) payload: usize,
    pub(crate) window: u64,
    pub(crate) open_loop: bool,
    pub(crate) rate: Option<u64>,
    pub(crate) count: Option<u64>,
    pub(crate) start: Instant,
    pub(crate) end: Instant,
    /// subscribers to wait for (QoS 0 credit)
    pub(crate) receivers: Vec<usize>,
}

pub(crate) async fn publisher(
    mut c: Client,
    plan: PubPlan,
    shared: Option<Arc<Shared>>,
) -> PubResult {
    sleep_until(plan.start.into()).await;
    let mut encoder = match PublishEncoder::new(&plan.topics, plan.qos, plan.payload.max(STAMP)) {
        Ok(e) => e,
        Err(e) => {
            return PubResult {
                sent: 0,
                unacked: 0,
                error: Some(e.to_string()),
            }
        }
    };
    let mut seqs = vec![0u64; plan.topics.len()];
    let mut sent = 0u64;
    let mut ids = Ids::new();
    let hard_end = plan.end + DRAIN;
    let due = |n: u64| {
        plan.rate
            .map(|r| plan.start + Duration::from_nanos(n * 1_000_000_000 / r))
    };
    let error: Option<String> = 'run: loop {
        let now = Instant::now();
        let sending = now < plan.end && plan.count.map_or(true, |c| sent < c);
        if !sending && (plan.qos == 0 || ids.inflight == 0) {
            break None;
        }
        if sending {
            // how many to encode now
            let mut n = BATCH as u64;
            if let Some(c) = plan.count {
                n = n.min(c - sent);
            }
            if plan.qos > 0 {
                n = n.min(plan.window - ids.inflight);
            } else if !plan.open_loop {
                if let Some(sh) = &shared {
                    let done = plan
                        .receivers
                        .iter()
                        .map(|&s| sh.delivered[s][plan.id].load(Relaxed))
                        .min()
                        .unwrap_or(sent);
                    let ahead = sent - done;
                    if ahead >= plan.window {
                        let _ = tokio::time::timeout(
                            Duration::from_millis(5),
                            sh.wake[plan.id].notified(),
                        )
                        .await;
                        continue;
                    }
                    n = n.min(plan.window - ahead);
                }
            }
            if plan.rate.is_some() {
                // paced: send what is due now, at most one
                n = n.min(1);
                if let Some(t) = due(sent) {
                    if t > now {
                        n = 0;
                    }
                }
            }
            for _ in 0..n {
                let t = (sent % plan.topics.len() as u64) as usize;
                let pid = if plan.qos > 0 { ids.alloc() } else { 0 };
                let stream = t as u32 + plan.id as u32;
                let r = encoder.encode(&mut c.wbuf, t, pid, |p| stamp(p, stream, seqs[t]));
                if let Err(e) = r {
                    break 'run Some(e.to_string());
                }
                seqs[t] += 1;
                sent += 1;
            }
        }
        match timeout_at(hard_end.into(), c.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => break Some(e.to_string()),
            Err(_) => break Some("write stalled past the drain deadline".into()),
        }
        if plan.qos == 0 {
            if let (Some(t), true) = (due(sent), sending) {
                sleep_until(t.into()).await;
            }
            continue;
        }
        // QoS 1/2: read acknowledgements when the window is full, when done sending, or while
        // waiting for the next paced send.
        let must_read = !sending || ids.inflight >= plan.window;
        let next_due = if sending { due(sent) } else { None };
        if !must_read && next_due.is_none() {
            // window open: keep sending, but pick up whatever acks are already here
            loop {
                match c.stream.try_read_buf(&mut c.rbuf) {
                    Ok(0) => break 'run Some("broker closed the connection".into()),
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => break 'run Some(e.to_string()),
                }
            }
        } else {
            let deadline = if sending {
                next_due.unwrap_or(hard_end).min(hard_end)
            } else {
                hard_end
            };
            tokio::select! {
                r = c.read_more() => if let Err(e) = r { break Some(e.to_string()) },
                _ = sleep_until(deadline.into()) => {
                    if Instant::now() >= hard_end {
                        break Some(format!("{} messages still unacknowledged at the drain deadline", ids.inflight));
                    }
                }
            }
        }
        let r = c.drain(|packet, wbuf| match packet {
            Packet::PubAck(a) => ids.on_ack(PacketType::PubAck, a.pkid, wbuf),
            Packet::PubRec(a) => ids.on_ack(PacketType::PubRec, a.pkid, wbuf),
            Packet::PubComp(a) => ids.on_ack(PacketType::PubComp, a.pkid, wbuf),
            _ => Ok(()),
        });
        if let Err(e) = r {
            break Some(e.to_string());
        }
    };
    let unacked = ids.inflight;
    c.close().await;
    PubResult {
        sent,
        unacked,
        error,
    }
}

fn client_id(o: &Opts, role: &str, i: usize) -> String {
    format!("tb-{}-{}-{role}{i}", o.scenario, std::process::id())
}

/// Client ids of `--persistent` subscribers: unique to this run (process id and start time),
/// so no session an earlier run left in the broker is resumed.
fn persistent_id(o: &Opts, s: usize) -> String {
    static RUN: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    });
    format!(
        "tb-{}-{}-{:x}-psub{s}",
        o.scenario,
        std::process::id(),
        run % (1 << 40)
    )
}

/// Subscribers, connected to `o.sub_addr` (with `--persistent`: Clean Session 0 and a
/// run-unique client id; a session the broker says is present counts in the second value).
async fn connect_subs(o: &Opts, spec: &Spec, prefix: &str) -> io::Result<(Vec<Client>, u64)> {
    let mut tasks = Vec::new();
    for s in 0..spec.subs {
        let (id, clean) = if o.persistent {
            (persistent_id(o, s), false)
        } else {
            (client_id(o, prefix, s), true)
        };
        let filter = spec.filter(s);
        let (addr, qos) = (o.sub_addr, spec.qos);
        tasks.push(tokio::spawn(async move {
            let (mut c, present) =
                Client::connect_session(addr, None, &id, clean, CONNECT_TIMEOUT).await?;
            c.subscribe(&filter, qos).await?;
            Ok::<_, io::Error>((c, present))
        }));
    }
    let mut out = Vec::new();
    let mut present = 0;
    for t in tasks {
        let (c, p) = t.await.map_err(io::Error::other)??;
        out.push(c);
        present += u64::from(p);
    }
    Ok((out, present))
}

/// `--persistent`: end the subscribers' sessions (a clean connect and DISCONNECT each), so
/// nothing of this run stays in a long-running broker. Bounded; returns the failures.
async fn end_persistent_sessions(o: &Opts, n: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..n)
        .map(|s| {
            let (id, addr) = (persistent_id(o, s), o.sub_addr);
            tokio::spawn(async move {
                match Client::connect_session(addr, None, &id, true, CONNECT_TIMEOUT).await {
                    Ok((c, _)) => {
                        c.close_and_wait(Duration::from_secs(2)).await;
                        None
                    }
                    Err(e) => Some(format!("ending session {id}: {e}")),
                }
            })
        })
        .collect();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Some(e)) => errors.push(e),
            Ok(None) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors
}

async fn connect_n(o: &Opts, role: &str, n: usize) -> io::Result<Vec<Client>> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let id = client_id(o, role, i);
        let addr = o.addr;
        tasks.push(tokio::spawn(async move {
            Client::connect(addr, None, &id, CONNECT_TIMEOUT).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.map_err(io::Error::other)??);
    }
    Ok(out)
}

pub(crate) fn fail(e: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": e.to_string()})
}

/// CPU and wall clock over a measured interval.
/// The broker's CPU is summed over every process in `pids` (NaN when one is gone).
pub(crate) struct Meter {
    t0: Instant,
    broker0: f64,
    client0: f64,
    pids: Vec<u32>,
}

impl Meter {
    pub(crate) fn start(pids: &[u32]) -> Meter {
        Meter {
            t0: Instant::now(),
            broker0: stats::procs_cpu_s(pids).unwrap_or(f64::NAN),
            client0: stats::self_cpu_s(),
            pids: pids.to_vec(),
        }
    }
    /// (wall s, broker CPU s, client CPU s)
    pub(crate) fn read(&self) -> (f64, f64, f64) {
        (
            self.t0.elapsed().as_secs_f64(),
            stats::procs_cpu_s(&self.pids).unwrap_or(f64::NAN) - self.broker0,
            stats::self_cpu_s() - self.client0,
        )
    }
}

pub(crate) fn cpu_fields(
    m: &mut serde_json::Map<String, Value>,
    wall: f64,
    broker: f64,
    client: f64,
) {
    let client_cores = client / wall;
    m.insert("wall_s".into(), json!(wall));
    m.insert("broker_cpu_s".into(), json!(broker));
    m.insert("client_cpu_s".into(), json!(client));
    m.insert("broker_cpu_cores".into(), json!(broker / wall));
    m.insert("client_cpu_cores".into(), json!(client_cores));
    m.insert("client_saturated".into(), json!(client_cores >= SATURATED));
}

fn latency_fields(m: &mut serde_json::Map<String, Value>, h: &Histogram) {
    let us = |v: u64| v as f64 / 1000.0;
    m.insert("latency_samples".into(), json!(h.total));
    m.insert("p50_us".into(), json!(us(h.quantile(0.50))));
    m.insert("p99_us".into(), json!(us(h.quantile(0.99))));
    m.insert("p999_us".into(), json!(us(h.quantile(0.999))));
    m.insert("max_us".into(), json!(us(h.max)));
}

/// Throughput / latency scenarios: fan-in, fan-out, pairs, paced latency.
async fn tput(o: &Opts, spec: Spec, duration: Duration) -> Value {
    let (subs, sessions_present) = match connect_subs(o, &spec, "sub").await {
        Ok(s) => s,
        Err(e) => return fail(format!("subscriber setup: {e}")),
    };
    let pubs = match connect_n(o, "pub", spec.pubs).await {
        Ok(p) => p,
        Err(e) => return fail(format!("publisher setup: {e}")),
    };
    sleep(Duration::from_millis(200)).await;
    let shared = Arc::new(Shared {
        delivered: (0..spec.subs)
            .map(|_| (0..spec.pubs).map(|_| AtomicU64::new(0)).collect())
            .collect(),
        wake: (0..spec.pubs).map(|_| Notify::new()).collect(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let meter = Meter::start(&o.broker_pids);
    let start = Instant::now() + Duration::from_millis(20);
    let start_ns = now_ns() + 20_000_000;
    let end = start + duration;
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(s, c)| {
            let (shared, stop) = (shared.clone(), stop_rx.clone());
            tokio::spawn(subscriber(c, s, spec, shared, stop, o.persistent))
        })
        .collect();
    let pub_tasks: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(p, c)| {
            let plan = PubPlan {
                id: p,
                topics: vec![spec.topic(p)],
                qos: spec.qos,
                payload: spec.payload,
                window: spec.window,
                open_loop: spec.open_loop,
                rate: spec.rate,
                count: None,
                start,
                end,
                receivers: spec.receivers(p),
            };
            tokio::spawn(publisher(c, plan, Some(shared.clone())))
        })
        .collect();
    let mut sent = vec![0u64; spec.pubs];
    let mut unacked = 0;
    let mut errors: Vec<String> = Vec::new();
    for (p, t) in pub_tasks.into_iter().enumerate() {
        match t.await {
            Ok(r) => {
                sent[p] = r.sent;
                unacked += r.unacked;
                if let Some(e) = r.error {
                    errors.push(format!("publisher {p}: {e}"));
                }
            }
            Err(e) => errors.push(format!("publisher {p}: {e}")),
        }
    }
    let send_s = start.elapsed().as_secs_f64();
    // Drain: wait until every subscriber has every message, or progress stops.
    let expected: Vec<u64> = (0..spec.subs)
        .map(|s| spec.sources(s).iter().map(|&p| sent[p]).sum())
        .collect();
    let total_expected: u64 = expected.iter().sum();
    let drain_deadline = Instant::now() + DRAIN;
    let idle_limit = Duration::from_millis(if spec.open_loop { 1000 } else { 3000 });
    let mut last_total = u64::MAX;
    let mut last_change = Instant::now();
    loop {
        let total: u64 = shared
            .delivered
            .iter()
            .map(|row| row.iter().map(|a| a.load(Relaxed)).sum::<u64>())
            .sum();
        if total >= total_expected || Instant::now() >= drain_deadline {
            break;
        }
        if total != last_total {
            last_total = total;
            last_change = Instant::now();
        } else if last_change.elapsed() >= idle_limit {
            break;
        }
        sleep(Duration::from_millis(2)).await;
    }
    let (wall, broker_cpu, client_cpu) = meter.read();
    let _ = stop_tx.send(true);
    let mut hist = Histogram::default();
    let (mut delivered, mut dups, mut gaps, mut last_ns) = (0u64, 0u64, 0u64, start_ns);
    for (s, t) in sub_tasks.into_iter().enumerate() {
        match t.await {
            Ok(r) => {
                hist.merge(&r.tally.hist);
                delivered += r.tally.total();
                dups += r.tally.dups;
                gaps += r.tally.gaps;
                last_ns = last_ns.max(r.tally.last_ns);
                if let Some(e) = r.error {
                    errors.push(format!("subscriber {s}: {e}"));
                }
            }
            Err(e) => errors.push(format!("subscriber {s}: {e}")),
        }
    }
    let active_s = (last_ns.saturating_sub(start_ns) as f64 / 1e9).max(1e-9);
    let lost = total_expected.saturating_sub(delivered);
    if sessions_present > 0 {
        errors.push(format!(
            "{sessions_present} persistent subscribers found a session present on a run-unique client id"
        ));
    }
    let cleanup_errors = if o.persistent {
        end_persistent_sessions(o, spec.subs).await
    } else {
        Vec::new()
    };
    let mut out = json!({
        "ok": errors.is_empty(),
        "qos": spec.qos,
        "publishers": spec.pubs,
        "subscribers": spec.subs,
        "payload_bytes": spec.payload,
        "open_loop": spec.open_loop,
        "window": spec.window,
        "rate_per_publisher": spec.rate,
        "send_s": send_s,
        "active_s": active_s,
        "sent": sent.iter().sum::<u64>(),
        "expected": total_expected,
        "delivered": delivered,
        "lost": lost,
        "loss_pct": if total_expected > 0 { lost as f64 * 100.0 / total_expected as f64 } else { 0.0 },
        "duplicates": dups,
        "gaps": gaps,
        "unacked": unacked,
        "rate": delivered as f64 / active_s,
        "msgs_per_broker_cpu_s": delivered as f64 / broker_cpu,
        "errors": errors,
    });
    if o.persistent {
        out["sessions_present"] = json!(sessions_present);
        out["session_cleanup_errors"] = json!(cleanup_errors);
    }
    // Every scenario answers a JSON object (built just above).
    if let Some(m) = out.as_object_mut() {
        cpu_fields(m, wall, broker_cpu, client_cpu);
        latency_fields(m, &hist);
    }
    out
}

/// burst-q1: the one topic the burst goes to, and the shared subscription its workers take.
const BURST_TOPIC: &str = "burst/orders";
const BURST_FILTER: &str = "$share/workers/burst/orders";
const BURST_WORKERS: usize = 4;
/// Messages per second each worker processes (and acknowledges).
const BURST_RATE: u64 = 5_000;
/// The drain stops when no message has been processed for this long.
const BURST_IDLE: Duration = Duration::from_secs(3);

/// burst-q1: one publisher sends 100,000 QoS 1 messages (20,000 in quick mode) to
/// `burst/orders` as fast as the broker acknowledges them (at most 512 unacknowledged); four
/// workers share the subscription `$share/workers/burst/orders` and each processes 5,000
/// msg/s, so the ideal drain time is messages / 20,000 msg/s (5 s; 1 s quick). Every message
/// must reach some worker at least once.
async fn burst(o: &Opts) -> Value {
    let total: u64 = if o.quick { 20_000 } else { 100_000 };
    let rate = BURST_RATE;
    let ideal_s = total as f64 / (BURST_WORKERS as u64 * rate) as f64;
    let mut subs = Vec::new();
    for s in 0..BURST_WORKERS {
        let id = client_id(o, "worker", s);
        let mut c = match Client::connect(o.sub_addr, None, &id, CONNECT_TIMEOUT).await {
            Ok(c) => c,
            Err(e) => return fail(format!("worker {s} connect: {e}")),
        };
        match c.subscribe(BURST_FILTER, 1).await {
            Ok(1) => subs.push(c),
            Ok(q) => return fail(format!("worker {s}: {BURST_FILTER} granted QoS {q}, not 1")),
            Err(e) => return fail(format!("worker {s}: subscribe {BURST_FILTER}: {e}")),
        }
    }
    let publ = match Client::connect(o.addr, None, &client_id(o, "pub", 0), CONNECT_TIMEOUT).await {
        Ok(c) => c,
        Err(e) => return fail(format!("publisher connect: {e}")),
    };
    sleep(Duration::from_millis(200)).await;
    let pid = o.broker_pid;
    let rss0 = stats::proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let hwm0 = stats::proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    let (stop_tx, stop_rx) = watch::channel(false);
    let peak = Arc::new(AtomicU64::new(rss0));
    let sampler = {
        let (peak, mut stop) = (peak.clone(), stop_rx.clone());
        tokio::spawn(async move {
            loop {
                if let Some(r) = stats::proc_status_kib(pid, "VmRSS:") {
                    peak.fetch_max(r, Relaxed);
                }
                tokio::select! {
                    _ = sleep(Duration::from_millis(20)) => {}
                    _ = stop.changed() => break,
                }
            }
        })
    };
    let meter = Meter::start(&o.broker_pids);
    let start = Instant::now() + Duration::from_millis(20);
    let start_ns = now_ns() + 20_000_000;
    let board = Arc::new(Board::new(total));
    let workers: Vec<_> = subs
        .into_iter()
        .map(|c| tokio::spawn(worker(c, rate, board.clone(), stop_rx.clone())))
        .collect();
    let plan = PubPlan {
        id: 0,
        topics: vec![BURST_TOPIC.into()],
        qos: 1,
        payload: 64,
        window: 512,
        open_loop: false,
        rate: None,
        count: Some(total),
        start,
        end: start + Duration::from_secs(60),
        receivers: vec![],
    };
    let pr = tokio::spawn(publisher(publ, plan, None)).await;
    let publish_s = start.elapsed().as_secs_f64();
    let mut errors = Vec::new();
    let (sent, unacked) = match pr {
        Ok(r) => {
            if let Some(e) = r.error {
                errors.push(format!("publisher: {e}"));
            }
            (r.sent, r.unacked)
        }
        Err(e) => {
            errors.push(format!("publisher: {e}"));
            (0, 0)
        }
    };
    let acked = sent - unacked;
    // Drain: until every message sent has been processed, nothing has been processed for
    // BURST_IDLE, or the ideal drain time plus DRAIN has passed.
    let deadline =
        (start + Duration::from_secs_f64(ideal_s) + DRAIN).max(Instant::now() + BURST_IDLE);
    let (mut last, mut last_change) = (u64::MAX, Instant::now());
    loop {
        let u = board.unique.load(Relaxed);
        if u >= sent || Instant::now() >= deadline {
            break;
        }
        if u != last {
            (last, last_change) = (u, Instant::now());
        } else if last_change.elapsed() >= BURST_IDLE {
            break;
        }
        sleep(Duration::from_millis(5)).await;
    }
    let (wall, broker_cpu, client_cpu) = meter.read();
    let _ = stop_tx.send(true);
    let _ = sampler.await;
    let mut hist = Histogram::default();
    let (mut dups, mut dup_flagged, mut unexpected, mut left) = (0u64, 0u64, 0u64, 0u64);
    let (mut first_ns, mut last_ns) = (u64::MAX, start_ns);
    let mut per_worker = Vec::new();
    let mut arrived_per_worker = Vec::new();
    for (s, t) in workers.into_iter().enumerate() {
        match t.await {
            Ok(r) => {
                hist.merge(&r.hist);
                dups += r.dups;
                dup_flagged += r.dup_flagged;
                unexpected += r.unexpected;
                left += r.left;
                if r.arrived > 0 {
                    first_ns = first_ns.min(r.first_ns);
                }
                last_ns = last_ns.max(r.last_ns);
                per_worker.push(r.processed);
                arrived_per_worker.push(r.arrived);
                if let Some(e) = r.error {
                    errors.push(format!("worker {s}: {e}"));
                }
            }
            Err(e) => errors.push(format!("worker {s}: {e}")),
        }
    }
    let hwm = stats::proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    let peak_kib = peak.load(Relaxed).max(hwm);
    let drain_s = last_ns.saturating_sub(start_ns) as f64 / 1e9;
    // QoS 1 acknowledgements come back in order: the acknowledged messages are the first
    // `acked` sent. Sent but never acknowledged (a publisher error) and not delivered
    // either: not a loss.
    let lost = Board::missing_below(&board.arrived, acked);
    let unacked_missing = Board::missing_below(&board.arrived, sent) - lost;
    let unprocessed = Board::missing_below(&board.processed, sent);
    let processed_unique = board.unique.load(Relaxed);
    if lost > 0 {
        errors.push(format!(
            "{lost} acknowledged messages never reached a worker"
        ));
    }
    if unprocessed > lost + unacked_missing {
        errors.push(format!(
            "drain stopped at {processed_unique} of {sent} messages processed"
        ));
    }
    if unexpected > 0 {
        errors.push(format!(
            "{unexpected} deliveries that are not messages of this burst"
        ));
    }
    let wmin = per_worker.iter().copied().min().unwrap_or(0);
    let wmax = per_worker.iter().copied().max().unwrap_or(0);
    let mut out = json!({
        "ok": errors.is_empty(),
        "qos": 1,
        "messages": total,
        "topic": BURST_TOPIC,
        "filter": BURST_FILTER,
        "consumers": BURST_WORKERS,
        "consumer_rate": rate,
        "local_backlog": LOCAL_BACKLOG,
        "sent": sent,
        "acked": acked,
        "unacked": unacked,
        "expected": acked,
        "delivered": processed_unique,
        "lost": lost,
        "loss_pct": if acked > 0 { lost as f64 * 100.0 / acked as f64 } else { 0.0 },
        "unacked_not_delivered": unacked_missing,
        "unprocessed": unprocessed,
        "left_in_workers": left,
        "duplicates": dups,
        "dup_flagged": dup_flagged,
        "unexpected": unexpected,
        "per_consumer": per_worker,
        "per_consumer_arrived": arrived_per_worker,
        "consumer_min": wmin,
        "consumer_max": wmax,
        "consumer_even": total as f64 / BURST_WORKERS as f64,
        "publish_s": publish_s,
        "publish_rate": acked as f64 / publish_s.max(1e-9),
        "first_delivery_ms": if first_ns == u64::MAX { f64::NAN } else { first_ns.saturating_sub(start_ns) as f64 / 1e6 },
        "drain_s": drain_s,
        "ideal_drain_s": ideal_s,
        "drain_vs_ideal": drain_s / ideal_s,
        "rss_before_kib": rss0,
        "hwm_before_kib": hwm0,
        "peak_rss_kib": peak.load(Relaxed),
        "vmhwm_kib": hwm,
        "peak_kib": peak_kib,
        "peak_rss_mib": peak_kib as f64 / 1024.0,
        "rate": processed_unique as f64 / drain_s.max(1e-9),
        "msgs_per_broker_cpu_s": processed_unique as f64 / broker_cpu,
        "errors": errors,
    });
    // Every scenario answers a JSON object (built just above).
    if let Some(m) = out.as_object_mut() {
        cpu_fields(m, wall, broker_cpu, client_cpu);
        latency_fields(m, &hist);
    }
    out
}

/// Which messages of the burst (the sequence numbers of stream 0) have reached a worker, and
/// which a worker has processed; shared by the workers.
struct Board {
    arrived: Vec<AtomicU64>,
    processed: Vec<AtomicU64>,
    /// distinct messages processed
    unique: AtomicU64,
    total: u64,
}

impl Board {
    fn new(total: u64) -> Board {
        let words = || (0..total.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Board {
            arrived: words(),
            processed: words(),
            unique: AtomicU64::new(0),
            total,
        }
    }
    /// Sets `seq`'s bit; true when it was not set before.
    fn set(bits: &[AtomicU64], seq: u64) -> bool {
        let bit = 1u64 << (seq % 64);
        bits[(seq / 64) as usize].fetch_or(bit, Relaxed) & bit == 0
    }
    /// Sequence numbers below `n` whose bit is not set.
    fn missing_below(bits: &[AtomicU64], n: u64) -> u64 {
        (0..n)
            .filter(|&q| bits[(q / 64) as usize].load(Relaxed) & (1 << (q % 64)) == 0)
            .count() as u64
    }
}

/// durable-q1-*: publishers per run, each on its own topic `durable/<n>`.
const DURABLE_PUBS: usize = 8;
/// Messages per publisher at most: 800,000 in all, below both brokers' queue limit
/// (max_queued_messages 1,000,000), so a full queue never drops an acknowledged message.
const DURABLE_MAX_PER_PUB: u64 = 100_000;
/// Bound on the drain after the subscriber reconnects: overall, and without progress.
const DURABLE_DRAIN: Duration = Duration::from_secs(60);
const DURABLE_IDLE: Duration = Duration::from_secs(5);
/// The persistent subscriber's client id (the same in every run: each run gets a fresh
/// broker, and the load generator clears a leftover session first).
const DURABLE_SUB_ID: &str = "tern-bench-durable-sub";

/// Which sequence numbers of each stream a subscriber has received.
pub(crate) struct Seen {
    bits: Vec<Vec<u64>>,
    /// messages published per stream
    sent: Vec<u64>,
    max_next: Vec<u64>,
    pub(crate) unique: u64,
    pub(crate) dups: u64,
    pub(crate) dup_flagged: u64,
    pub(crate) reordered: u64,
    /// stream id or sequence outside what was published
    pub(crate) unexpected: u64,
}

impl Seen {
    pub(crate) fn new(sent: &[u64]) -> Seen {
        Seen {
            bits: sent
                .iter()
                .map(|&n| vec![0; n.div_ceil(64) as usize])
                .collect(),
            sent: sent.to_vec(),
            max_next: vec![0; sent.len()],
            unique: 0,
            dups: 0,
            dup_flagged: 0,
            reordered: 0,
            unexpected: 0,
        }
    }
    pub(crate) fn record(&mut self, id: usize, seq: u64, dup_flag: bool) {
        if dup_flag {
            self.dup_flagged += 1;
        }
        if !matches!(self.sent.get(id), Some(&n) if seq < n) {
            self.unexpected += 1;
            return;
        }
        let w = &mut self.bits[id][(seq / 64) as usize];
        let bit = 1u64 << (seq % 64);
        if *w & bit != 0 {
            self.dups += 1;
            return;
        }
        *w |= bit;
        self.unique += 1;
        if seq < self.max_next[id] {
            self.reordered += 1;
        } else {
            self.max_next[id] = seq + 1;
        }
    }
    /// Sequence numbers below `n` of stream `id` never received.
    pub(crate) fn missing_below(&self, id: usize, n: u64) -> u64 {
        (0..n)
            .filter(|&q| self.bits[id][(q / 64) as usize] & (1 << (q % 64)) == 0)
            .count() as u64
    }
}

/// durable-q1-*: a persistent subscriber (clean session 0, fixed client id) subscribes QoS 1
/// to `durable/#` and goes away; 8 publishers publish QoS 1 (256 B, 64 unacknowledged each)
/// to `durable/<n>` for `d` (or 100,000 messages each); then the subscriber comes back
/// (session present) and drains its queue. Every acknowledged message must be delivered.
async fn durable(o: &Opts, d: Duration) -> Value {
    let pid = o.broker_pid;
    let mut errors: Vec<String> = Vec::new();
    // A leftover session of an earlier run against the same broker: clear it.
    match Client::connect_session(o.sub_addr, None, DURABLE_SUB_ID, true, CONNECT_TIMEOUT).await {
        Ok((c, _)) => {
            c.close_and_wait(Duration::from_secs(2)).await;
        }
        Err(e) => return fail(format!("subscriber connect (clean): {e}")),
    }
    let (mut sub, present0) =
        match Client::connect_session(o.sub_addr, None, DURABLE_SUB_ID, false, CONNECT_TIMEOUT)
            .await
        {
            Ok(x) => x,
            Err(e) => return fail(format!("subscriber connect: {e}")),
        };
    if present0 {
        errors.push("session present on the first persistent connect".into());
    }
    match sub.subscribe("durable/#", 1).await {
        Ok(1) => {}
        Ok(q) => return fail(format!("subscription granted QoS {q}, not 1")),
        Err(e) => return fail(format!("subscribe: {e}")),
    }
    // Offline for certain before anything is published: the broker has closed the
    // connection in response to DISCONNECT.
    let went_away = sub.close_and_wait(Duration::from_secs(5)).await;
    if !went_away {
        errors.push("broker did not close the subscriber's connection after DISCONNECT".into());
    }
    let pubs = match connect_n(o, "pub", DURABLE_PUBS).await {
        Ok(p) => p,
        Err(e) => return fail(format!("publisher setup: {e}")),
    };
    sleep(Duration::from_millis(200)).await;
    let rss0 = stats::proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let (stop_tx, stop_rx) = watch::channel(false);
    let peak = Arc::new(AtomicU64::new(rss0));
    let sampler = {
        let (peak, mut stop) = (peak.clone(), stop_rx.clone());
        tokio::spawn(async move {
            loop {
                if let Some(r) = stats::proc_status_kib(pid, "VmRSS:") {
                    peak.fetch_max(r, Relaxed);
                }
                tokio::select! {
                    _ = sleep(Duration::from_millis(20)) => {}
                    _ = stop.changed() => break,
                }
            }
        })
    };
    // Publish phase: the subscriber is offline, everything goes to its queue.
    let meter = Meter::start(&o.broker_pids);
    let start = Instant::now() + Duration::from_millis(20);
    let tasks: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(p, c)| {
            let plan = PubPlan {
                id: p,
                topics: vec![format!("durable/{p}")],
                qos: 1,
                payload: 256,
                window: 64,
                open_loop: false,
                rate: None,
                count: Some(DURABLE_MAX_PER_PUB),
                start,
                end: start + d,
                receivers: vec![],
            };
            tokio::spawn(async move {
                let r = publisher(c, plan, None).await;
                (r, Instant::now())
            })
        })
        .collect();
    let mut sent = vec![0u64; DURABLE_PUBS];
    let mut acked = [0u64; DURABLE_PUBS];
    let mut last_ack = start;
    for (p, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok((r, done)) => {
                sent[p] = r.sent;
                // QoS 1 acknowledgements come back in order: the acknowledged messages are
                // the first sent - unacked.
                acked[p] = r.sent - r.unacked;
                last_ack = last_ack.max(done);
                if let Some(e) = r.error {
                    errors.push(format!("publisher {p}: {e}"));
                }
            }
            Err(e) => errors.push(format!("publisher {p}: {e}")),
        }
    }
    let publish_s = last_ack.saturating_duration_since(start).as_secs_f64();
    let (pub_wall, pub_bcpu, _) = meter.read();
    let rss_offline = stats::proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let sent_total: u64 = sent.iter().sum();
    let acked_total: u64 = acked.iter().sum();

    // Drain phase: the subscriber comes back and takes everything.
    let dmeter = Meter::start(&o.broker_pids);
    let t_back = Instant::now();
    let mut seen = Seen::new(&sent);
    let (mut first_s, mut last_s) = (f64::NAN, 0.0f64);
    let mut timed_out = false;
    let mut present = false;
    match Client::connect_session(o.sub_addr, None, DURABLE_SUB_ID, false, CONNECT_TIMEOUT).await {
        Err(e) => errors.push(format!("subscriber reconnect: {e}")),
        Ok((mut c, p)) => {
            present = p;
            if !present {
                errors.push("no session present when the subscriber came back".into());
            }
            let deadline = t_back + DURABLE_DRAIN;
            let mut last_progress = Instant::now();
            // Packets that came with the CONNACK are already in the read buffer.
            let mut have_data = !c.rbuf.is_empty();
            let err = loop {
                if seen.unique >= sent_total {
                    break None;
                }
                if !have_data {
                    let until = (last_progress + DURABLE_IDLE).min(deadline);
                    match timeout_at(until.into(), c.read_more()).await {
                        Err(_) => {
                            timed_out = true;
                            break None;
                        }
                        Ok(Err(e)) => break Some(e.to_string()),
                        Ok(Ok(_)) => {}
                    }
                }
                have_data = false;
                let before = seen.unique + seen.dups;
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
                if seen.unique + seen.dups > before {
                    last_progress = Instant::now();
                    let t = t_back.elapsed().as_secs_f64();
                    if first_s.is_nan() {
                        first_s = t;
                    }
                    last_s = t;
                }
            };
            if let Some(e) = err {
                errors.push(format!("subscriber: {e}"));
            }
            c.close_and_wait(Duration::from_secs(2)).await;
        }
    }
    let (drain_wall, drain_bcpu, _) = dmeter.read();
    let (wall, broker_cpu, client_cpu) = meter.read();
    let _ = stop_tx.send(true);
    let _ = sampler.await;
    // Leave nothing behind in a long-running broker: a clean connect ends the session.
    if let Ok((c, _)) =
        Client::connect_session(o.sub_addr, None, DURABLE_SUB_ID, true, CONNECT_TIMEOUT).await
    {
        c.close().await;
    }
    let hwm = stats::proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    let peak_kib = peak.load(Relaxed).max(hwm);
    let lost: u64 = (0..DURABLE_PUBS)
        .map(|p| seen.missing_below(p, acked[p]))
        .sum();
    // Sent but never acknowledged (a publisher error) and not delivered either: not a loss.
    let unacked_missing: u64 = (0..DURABLE_PUBS)
        .map(|p| seen.missing_below(p, sent[p]) - seen.missing_below(p, acked[p]))
        .sum();
    if lost > 0 {
        errors.push(format!("{lost} acknowledged messages never delivered"));
    }
    if timed_out {
        errors.push(format!(
            "drain stopped at {} of {sent_total} messages (no progress for {DURABLE_IDLE:?} or {DURABLE_DRAIN:?} in all)",
            seen.unique
        ));
    }
    let delivered = seen.unique;
    let mut out = json!({
        "ok": errors.is_empty(),
        "errors": errors,
        "qos": 1,
        "publishers": DURABLE_PUBS,
        "payload_bytes": 256,
        "window": 64,
        "max_per_publisher": DURABLE_MAX_PER_PUB,
        "subscriber_went_away": went_away,
        "session_present": present,
        "sent": sent_total,
        "acked": acked_total,
        "unacked": sent_total - acked_total,
        "publish_s": publish_s,
        "publish_rate": acked_total as f64 / publish_s.max(1e-9),
        "expected": acked_total,
        "delivered": delivered,
        "lost": lost,
        "loss_pct": if acked_total > 0 { lost as f64 * 100.0 / acked_total as f64 } else { 0.0 },
        "unacked_not_delivered": unacked_missing,
        "duplicates": seen.dups,
        "dup_flagged": seen.dup_flagged,
        "reordered": seen.reordered,
        "unexpected": seen.unexpected,
        "drain_timed_out": timed_out,
        "first_delivery_ms": first_s * 1000.0,
        "drain_s": last_s,
        "drain_rate": delivered as f64 / last_s.max(1e-9),
        // the resource table's msg/s: acknowledged publishes per second while offline
        "rate": acked_total as f64 / publish_s.max(1e-9),
        "rss_before_kib": rss0,
        "rss_offline_kib": rss_offline,
        "rss_offline_mib": rss_offline as f64 / 1024.0,
        "vmhwm_kib": hwm,
        "peak_kib": peak_kib,
        "peak_rss_mib": peak_kib as f64 / 1024.0,
        "publish_broker_cpu_cores": pub_bcpu / pub_wall,
        "drain_broker_cpu_cores": drain_bcpu / drain_wall,
        "publish_msgs_per_broker_cpu_s": acked_total as f64 / pub_bcpu,
        "msgs_per_broker_cpu_s": delivered as f64 / broker_cpu,
    });
    // Every scenario answers a JSON object (built just above).
    if let Some(m) = out.as_object_mut() {
        cpu_fields(m, wall, broker_cpu, client_cpu);
    }
    out
}

/// Messages a worker reads ahead of what it has processed.
const LOCAL_BACKLOG: usize = 256;

struct WorkerResult {
    /// PUBLISH packets received, duplicates included
    arrived: u64,
    /// messages processed and acknowledged, duplicates included
    processed: u64,
    /// arrivals of a message that had already reached this or another worker
    dups: u64,
    /// arrivals with the DUP flag set
    dup_flagged: u64,
    /// deliveries whose stamp is no message of this burst
    unexpected: u64,
    /// received but not yet processed when the run stopped
    left: u64,
    /// publish-to-arrival latency
    hist: Histogram,
    first_ns: u64,
    /// when it last acknowledged (finished processing) a message
    last_ns: u64,
    error: Option<String>,
}

/// One worker of the shared subscription: a plain MQTT client that "processes" each message
/// for 1/rate s, one at a time, and acknowledges it (PUBACK) when done. A message's
/// processing starts when it has arrived and the previous one is done, so an idle worker
/// banks no capacity. It reads at most about LOCAL_BACKLOG messages ahead of its processing;
/// the rest waits in the broker, which sends a client no more than its in-flight window of
/// unacknowledged QoS 1 messages: that window is what levels the load across the workers.
async fn worker(
    mut c: Client,
    rate: u64,
    board: Arc<Board>,
    mut stop: watch::Receiver<bool>,
) -> WorkerResult {
    let per_msg = Duration::from_nanos(1_000_000_000 / rate);
    let mut r = WorkerResult {
        arrived: 0,
        processed: 0,
        dups: 0,
        dup_flagged: 0,
        unexpected: 0,
        left: 0,
        hist: Histogram::default(),
        first_ns: 0,
        last_ns: 0,
        error: None,
    };
    // (packet id to acknowledge, sequence number if a message of the burst, arrival)
    let mut queue: VecDeque<(Option<u16>, Option<u64>, Instant)> = VecDeque::new();
    // when the message being processed is done
    let mut free_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let error = loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break None,
            // Read only while the local backlog is short, as an application that reads as
            // it processes.
            res = c.read_more(), if queue.len() < LOCAL_BACKLOG => {
                if let Err(e) = res { break Some(e.to_string()) }
                let (now, at) = (now_ns(), Instant::now());
                let res = c.drain(|packet, _| {
                    if let Packet::Publish(p) = packet {
                        let (id, seq, ts) = unstamp(&p.payload)?;
                        r.arrived += 1;
                        if p.dup {
                            r.dup_flagged += 1;
                        }
                        r.hist.record(now.saturating_sub(ts));
                        let seq = (id == 0 && seq < board.total).then_some(seq);
                        match seq {
                            Some(q) if !Board::set(&board.arrived, q) => r.dups += 1,
                            Some(_) => {}
                            None => r.unexpected += 1,
                        }
                        queue.push_back(((p.qos != QoS::AtMostOnce).then_some(p.pkid), seq, at));
                    }
                    Ok(())
                });
                if let Err(e) = res { break Some(e.to_string()) }
                if r.first_ns == 0 && r.arrived > 0 {
                    r.first_ns = now;
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let mut k = 0;
                let mut failed = None;
                while let Some(&(pid, seq, at)) = queue.front() {
                    let done = free_at.map_or(at, |f| f.max(at)) + per_msg;
                    if done > now {
                        break;
                    }
                    queue.pop_front();
                    free_at = Some(done);
                    if let Some(pid) = pid {
                        if let Err(e) = mqtt::ack(&mut c.wbuf, PacketType::PubAck, pid) {
                            failed = Some(e);
                            break;
                        }
                    }
                    if let Some(q) = seq {
                        if Board::set(&board.processed, q) {
                            board.unique.fetch_add(1, Relaxed);
                        }
                    }
                    k += 1;
                }
                if let Some(e) = failed {
                    break Some(e.to_string());
                }
                if k > 0 {
                    r.processed += k;
                    r.last_ns = now_ns();
                    match tokio::time::timeout(DRAIN, c.flush()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break Some(e.to_string()),
                        Err(_) => break Some("acknowledgements not written in time".into()),
                    }
                }
            }
        }
    };
    r.left = queue.len() as u64;
    r.error = error;
    c.close().await;
    r
}

/// conns: open 10,000 idle connections (MQTT 3.1.1 CONNECT/CONNACK, keep alive 60 like an idle
/// device; the scenario ends well within the 90 s the broker allows) and measure the
/// broker's RSS per connection and the connect rate; then keep opening until the open-file
/// limit (ours or the broker's) stops us.
async fn conns(o: &Opts, soft: u64) -> Value {
    let pid = o.broker_pid;
    let first_n: usize = if o.quick { 2_000 } else { 10_000 };
    let reserve = 64; // descriptors kept for stdio, epoll, the runtime
    let cap = if o.quick {
        4_000
    } else {
        (soft as usize).saturating_sub(reserve)
    };
    let port_range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join("-");
    let ports_per_source = {
        let v: Vec<u64> = port_range
            .split('-')
            .filter_map(|s| s.parse().ok())
            .collect();
        if v.len() == 2 {
            v[1] - v[0] + 1
        } else {
            28_000
        }
    };
    // Several loopback source addresses (bound before connect) so ephemeral ports do not
    // run out: each source address has its own port space towards the broker.
    let sources_n = ((cap as u64 * 2) / ports_per_source + 1).clamp(4, 32) as usize;
    // A block of source addresses of its own per run (127.B.C.1..), so connections an
    // earlier run left in TIME_WAIT do not share its port space.
    let me = std::process::id();
    let (b, c) = (10 + ((me >> 8) % 200) as u8, (me % 256) as u8);
    let sources: Vec<IpAddr> = (0..sources_n)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, b, c, 1 + i as u8)))
        .collect();
    sleep(Duration::from_millis(200)).await;
    let rss0 = stats::proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let meter = Meter::start(&o.broker_pids);
    let held: Arc<Mutex<Vec<tokio::net::TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
    // The connect-rate phase measured on its own: whose CPU it took, and how much of the
    // machine nobody used (then the rate is the handshake's round trip, not a broker's limit).
    let phase = Meter::start(&o.broker_pids);
    let sys0 = stats::system_cpu_ticks();
    let (n1, secs1, err1) = open_conns(o, 0, first_n, &sources, &held, CONNECTORS).await;
    let (phase_wall, phase_broker, phase_client) = phase.read();
    let phase_idle = stats::idle_pct(sys0, stats::system_cpu_ticks());
    sleep(Duration::from_millis(1000)).await;
    let rss1 = stats::proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let (n2, secs2, err2) = if n1 == first_n && cap > first_n {
        // The rest as a storm: more clients at once than a small listen backlog holds.
        open_conns(o, first_n, cap, &sources, &held, STORM_CONNECTORS).await
    } else {
        (0, 0.0, None)
    };
    sleep(Duration::from_millis(1000)).await;
    let rss2 = stats::proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let (wall, broker_cpu, client_cpu) = meter.read();
    // Are they all still open (the broker must not drop idle keep-alive-0 connections)?
    let mut streams = std::mem::take(
        &mut *held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut closed = 0u64;
    let mut buf = [0u8; 16];
    for s in &streams {
        match s.try_read(&mut buf) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok(_) | Err(_) => closed += 1,
        }
    }
    let total = n1 + n2;
    let t_close = Instant::now();
    streams.clear();
    let close_s = t_close.elapsed().as_secs_f64();
    let kib = |a: u64, b: u64, n: usize| {
        if n == 0 {
            f64::NAN
        } else {
            (b as f64 - a as f64) / n as f64
        }
    };
    let errors: Vec<String> = err1.into_iter().chain(err2.clone()).collect();
    let mut out = json!({
        "ok": n1 == first_n && closed == 0,
        "errors": errors,
        "idle_target": first_n,
        "idle_opened": n1,
        "connect_s": secs1,
        "connect_rate": n1 as f64 / secs1.max(1e-9),
        "connect_broker_cores": phase_broker / phase_wall.max(1e-9),
        "connect_client_cores": phase_client / phase_wall.max(1e-9),
        "connect_cpu_idle_pct": phase_idle,
        "rss_before_kib": rss0,
        "rss_idle_kib": rss1,
        "kib_per_conn": kib(rss0, rss1, n1),
        "max_attempted": cap,
        "max_opened": total,
        "max_phase_rate": n2 as f64 / secs2.max(1e-9),
        "max_stop_reason": err2,
        "rss_max_kib": rss2,
        "kib_per_conn_max": kib(rss0, rss2, total),
        "closed_by_broker": closed,
        "close_s": close_s,
        "source_addresses": sources_n,
        "source_first": sources[0].to_string(),
        "ephemeral_ports": port_range,
        "lost": 0,
    });
    // Every scenario answers a JSON object (built just above).
    if let Some(m) = out.as_object_mut() {
        cpu_fields(m, wall, broker_cpu, client_cpu);
    }
    out
}

/// Clients connecting at once in `conns`' first phase (the connect-rate row).
const CONNECTORS: usize = 64;
/// Clients connecting at once in its second phase: a reconnect storm, beyond the listen
/// backlog of `std` (128) and Mosquitto (100).
const STORM_CONNECTORS: usize = 256;

/// Open connections `from..to`, `workers` at a time; stops at the first failure.
/// Returns (opened, seconds, first error).
async fn open_conns(
    o: &Opts,
    from: usize,
    to: usize,
    sources: &[IpAddr],
    held: &Arc<Mutex<Vec<tokio::net::TcpStream>>>,
    workers: usize,
) -> (usize, f64, Option<String>) {
    let next = Arc::new(AtomicUsize::new(from));
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let first_err: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (next, stop, opened, first_err, held) = (
            next.clone(),
            stop.clone(),
            opened.clone(),
            first_err.clone(),
            held.clone(),
        );
        let sources = sources.to_vec();
        let addr = o.addr;
        let prefix = client_id(o, "idle", 0);
        tasks.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                let i = next.fetch_add(1, Relaxed);
                if i >= to {
                    break;
                }
                let src = sources[i % sources.len()];
                let id = format!("{prefix}-{i}");
                match Client::connect_with(
                    addr,
                    Some(src),
                    &id,
                    true,
                    IDLE_KEEP_ALIVE,
                    Duration::from_secs(5),
                )
                .await
                {
                    Ok((c, _)) => {
                        held.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(c.stream);
                        opened.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        stop.store(true, Relaxed);
                        let mut fe = first_err
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        if fe.is_none() {
                            *fe = Some(format!("connection {i}: {e}"));
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let err = first_err
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    (opened.load(Relaxed), secs, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_counts_loss_dups_and_reordering() {
        let mut s = Seen::new(&[100, 3]);
        for q in [0, 1, 2, 5, 4, 4] {
            s.record(0, q, q == 4);
        }
        s.record(1, 0, false);
        s.record(1, 7, false); // beyond what was published
        s.record(2, 0, false); // no such stream
        assert_eq!((s.unique, s.dups, s.reordered, s.unexpected), (6, 1, 1, 2));
        assert_eq!(s.dup_flagged, 2);
        assert_eq!(s.missing_below(0, 6), 1); // 3
        assert_eq!(s.missing_below(0, 100), 95);
        assert_eq!(s.missing_below(1, 3), 2);
    }

    #[test]
    fn board_marks_each_message_once() {
        let b = Board::new(130);
        assert_eq!(b.arrived.len(), 3);
        assert!(Board::set(&b.arrived, 0));
        assert!(Board::set(&b.arrived, 129));
        assert!(!Board::set(&b.arrived, 129));
        assert!(Board::set(&b.arrived, 64));
        assert_eq!(Board::missing_below(&b.arrived, 130), 127);
        assert_eq!(Board::missing_below(&b.arrived, 1), 0);
        assert_eq!(Board::missing_below(&b.processed, 130), 130);
    }
}
