//! `tern-bench cluster` (`make bench-cluster`): single-node Tern, a 3-node Tern cluster over
//! NATS JetStream, and nats-server's own MQTT listener on the same kind of three-server NATS
//! cluster, on this machine and in the same run.
//!
//! Everything listens on 127.0.0.1. For each round and each configuration the driver starts
//! what the configuration needs from nothing (fresh JetStream store and Tern data
//! directories), runs its scenarios through `tern-bench load` one after the other, and stops
//! every process (also when something fails: each process is stopped when its handle is
//! dropped). Configurations, in the order they run each round:
//!
//! | name | processes | publishers on | subscribers on |
//! |---|---|---|---|
//! | `single` | one Tern, no `[cluster]` | it | it |
//! | `cluster-same` | 3 nats-servers, Tern t1..t3 | t1 | t1 |
//! | `cluster-cross` | the same | t1 | t2 |
//! | `cluster-cross-persistent` | the same, subscribers with Clean Session 0 | t1 | t2 |
//! | `nats-mqtt-cross` | 3 nats-servers, each with an `mqtt {}` listener | n1's | n2's |
//! | `nats-mqtt-cross-persistent` | the same, subscribers with Clean Session 0 | n1's | n2's |
//!
//! Tern node ti is seeded with nats-server ni only, so t1's and t2's traffic goes through
//! different NATS servers, as the MQTT clients of the `nats-mqtt` rows do. The broker CPU of
//! a run is the sum over every broker process of the configuration (six for the cluster
//! rows, three for the nats-mqtt rows, one for single). The results: medians over rounds,
//! ratios, and the broker CPU per delivered message, in `OUT/table.md` and `OUT/results.json`,
//! and after a full run in docs/benchmarks.md between the cluster markers.

use crate::run::{
    dir_bytes, fmt_count, fmt_num, fmt_us, fresh_dir, limited, load_with, machine_common, num,
    render, sh,
};
use crate::stats::{self, median};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct ClusterArgs {
    pub rounds: usize,
    pub quick: bool,
    pub duration: Option<f64>,
    pub tern: PathBuf,
    pub nats_server: PathBuf,
    pub out: PathBuf,
    pub docs: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Single,
    Cluster,
    NatsMqtt,
}

struct Config {
    name: &'static str,
    kind: Kind,
    /// subscribers on the second node / server
    cross: bool,
    /// subscribers with Clean Session 0 (`load --persistent`)
    persistent: bool,
    scenarios: &'static [&'static str],
}

/// Every scenario the driver knows, in the order they run within a configuration.
const ALL: &[&str] = &[
    "pairs-q1",
    "fanin-q1",
    "fanout-q0",
    "durable-q1-os",
    "latency-q1",
];
/// What the persistent-session configurations run: the QoS 1 throughput and latency
/// scenarios (fanout-q0 is QoS 0, where a session keeps nothing; durable-q1-os has a
/// persistent subscriber in every configuration already).
const PERSISTENT: &[&str] = &["pairs-q1", "fanin-q1", "latency-q1"];

const CONFIGS: &[Config] = &[
    Config {
        name: "single",
        kind: Kind::Single,
        cross: false,
        persistent: false,
        scenarios: ALL,
    },
    Config {
        name: "cluster-same",
        kind: Kind::Cluster,
        cross: false,
        persistent: false,
        scenarios: ALL,
    },
    Config {
        name: "cluster-cross",
        kind: Kind::Cluster,
        cross: true,
        persistent: false,
        scenarios: ALL,
    },
    Config {
        name: "cluster-cross-persistent",
        kind: Kind::Cluster,
        cross: true,
        persistent: true,
        scenarios: PERSISTENT,
    },
    Config {
        name: "nats-mqtt-cross",
        kind: Kind::NatsMqtt,
        cross: true,
        persistent: false,
        scenarios: ALL,
    },
    Config {
        name: "nats-mqtt-cross-persistent",
        kind: Kind::NatsMqtt,
        cross: true,
        persistent: true,
        scenarios: PERSISTENT,
    },
];

/// Bounds on the start of a NATS cluster (healthy, with a meta leader) and of a Tern node
/// (its ready line; a cluster node connects and creates its streams first).
const NATS_START: Duration = Duration::from_secs(30);
const TERN_START: Duration = Duration::from_secs(45);
/// How long a process gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// `n` distinct free loopback ports (all bound at once, so none twice).
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .map_err(|e| format!("no free port: {e}"))?;
    ls.iter()
        .map(|l| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string()))
        .collect()
}

/// A process this driver started. Stopped (SIGTERM, SIGKILL after STOP_GRACE) when dropped,
/// so an error anywhere leaves nothing running.
struct Proc {
    name: String,
    child: Child,
    pid: u32,
    log: PathBuf,
    stopped: bool,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path, stdout: Stdio) -> Result<Proc, String> {
        let logf = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(logf)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc {
            name: name.into(),
            pid: child.id(),
            child,
            log: log.into(),
            stopped: false,
        })
    }

    /// Why the process is no longer running, if it is not.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(format!("{} exited: {st}", self.name)),
            Ok(None) => None,
            Err(e) => Some(format!("{}: {e}", self.name)),
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = stop_all(std::slice::from_mut(self));
        }
    }
}

/// SIGTERM to every process at once, then wait for all of them (STOP_GRACE in all);
/// SIGKILL whatever is left. Returns what went wrong: processes that had exited before
/// (crashed during the run) or had to be killed.
fn stop_all(procs: &mut [Proc]) -> Vec<String> {
    let mut problems = Vec::new();
    for p in procs.iter_mut().filter(|p| !p.stopped) {
        if let Some(e) = p.exited() {
            problems.push(format!("{e} before it was stopped"));
            p.stopped = true;
        } else {
            // SAFETY: signalling our own child by pid; it has not been reaped yet.
            unsafe { libc::kill(p.pid as i32, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        let mut left = 0;
        for p in procs.iter_mut().filter(|p| !p.stopped) {
            if let Ok(Some(_)) = p.child.try_wait() {
                p.stopped = true;
            } else {
                left += 1;
            }
        }
        if left == 0 || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in procs.iter_mut().filter(|p| !p.stopped) {
        let _ = p.child.kill();
        let _ = p.child.wait();
        p.stopped = true;
        problems.push(format!(
            "{} ignored SIGTERM for {STOP_GRACE:?}; killed",
            p.name
        ));
    }
    problems
}

/// GET `path` from a loopback HTTP endpoint: (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let sa = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    Some((status, body))
}

struct NatsServer {
    proc: Proc,
    name: String,
    client_port: u16,
    monitor: String,
    mqtt_port: u16,
}

/// Three nats-servers n1..n3 in one JetStream cluster, each with an MQTT listener, their
/// stores under `dir`; returns once each answers `/healthz?js-enabled-only=true` and all name
/// the same meta leader.
fn start_nats(
    a: &ClusterArgs,
    dir: &Path,
    logs: &Path,
    hard: u64,
) -> Result<Vec<NatsServer>, String> {
    let p = free_ports(12)?;
    let routes: Vec<String> = (0..3)
        .map(|i| format!("nats-route://127.0.0.1:{}", p[i * 4 + 2]))
        .collect();
    let mut servers = Vec::new();
    for i in 0..3 {
        let name = format!("n{}", i + 1);
        let (client, monitor, route, mqtt) = (p[i * 4], p[i * 4 + 1], p[i * 4 + 2], p[i * 4 + 3]);
        let store = dir.join(&name);
        std::fs::create_dir_all(&store).map_err(|e| e.to_string())?;
        let conf = dir.join(format!("{name}.conf"));
        let text = format!(
            "# written by tern-bench cluster\n\
             server_name: {name}\n\
             listen: 127.0.0.1:{client}\n\
             http: 127.0.0.1:{monitor}\n\
             # Tern needs max_payload >= limits.max_packet_size + 4 KiB\n\
             max_payload: 8MB\n\
             jetstream {{\n  store_dir: {store:?}\n}}\n\
             cluster {{\n  name: tern-bench\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n}}\n\
             # nats-server's own MQTT 3.1.1 listener; its streams get 3 replicas like Tern's\n\
             mqtt {{\n  listen: 127.0.0.1:{mqtt}\n  stream_replicas: 3\n}}\n",
            store = store.display().to_string(),
            routes = routes.join(", "),
        );
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        let mut cmd = limited(&a.nats_server, hard);
        cmd.arg("-c").arg(&conf);
        let proc = Proc::spawn(
            &name,
            &mut cmd,
            &logs.join(format!("{name}.log")),
            Stdio::null(),
        )?;
        servers.push(NatsServer {
            proc,
            name,
            client_port: client,
            monitor: format!("127.0.0.1:{monitor}"),
            mqtt_port: mqtt,
        });
    }
    let t0 = Instant::now();
    let mut why = String::new();
    while t0.elapsed() < NATS_START {
        for s in servers.iter_mut() {
            if let Some(e) = s.proc.exited() {
                return Err(format!("{e}\n{}", s.proc.log_tail(20)));
            }
        }
        let mut leaders = Vec::new();
        why.clear();
        for s in &servers {
            match http_get(&s.monitor, "/healthz?js-enabled-only=true") {
                Some((200, _)) => {}
                other => {
                    let _ = write!(why, "{}: healthz {:?}; ", s.name, other.map(|x| x.0));
                    continue;
                }
            }
            let leader = http_get(&s.monitor, "/jsz")
                .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
                .and_then(|v| v["meta_cluster"]["leader"].as_str().map(String::from))
                .unwrap_or_default();
            if leader.is_empty() {
                let _ = write!(why, "{}: no meta leader; ", s.name);
            }
            leaders.push(leader);
        }
        if why.is_empty() && leaders.windows(2).all(|w| w[0] == w[1]) {
            return Ok(servers);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "NATS cluster not healthy within {NATS_START:?}: {why}"
    ))
}

struct TernNode {
    proc: Proc,
    addr: String,
    metrics: Option<String>,
}

/// A Tern node, running once it printed its ready line (with `cluster=NAME` for a node of a
/// cluster).
fn start_tern(
    a: &ClusterArgs,
    name: &str,
    dir: &Path,
    logs: &Path,
    hard: u64,
    cluster: Option<&str>,
) -> Result<TernNode, String> {
    let p = free_ports(2)?;
    let data = dir.join(format!("{name}-data"));
    fresh_dir(&data)?;
    let cluster_section = match cluster {
        None => String::new(),
        Some(url) => format!(
            "\n[cluster]\nnode = \"{name}\"\nnats = [\"{url}\"]\nreplicas = 3\nquorum_timeout = 5\n"
        ),
    };
    let text = format!(
        r#"# written by tern-bench cluster
[listeners.tcp]
bind = "127.0.0.1:{port}"

[metrics]
bind = "127.0.0.1:{mport}"

[storage]
dir = "{data}"
durability = "os"

[auth]
allow_anonymous = true

[limits]
max_queued_messages = 1000000
max_queued_bytes = 1073741824
max_queued_messages_persistent = 1000000
max_queued_bytes_persistent = 1073741824
max_inflight = 1024
max_connections = 1000000

[shared]
max_queued_messages = 1000000
max_queued_bytes = 1073741824

[log]
level = "warn"
{cluster_section}"#,
        port = p[0],
        mport = p[1],
        data = data.display(),
    );
    let conf = dir.join(format!("{name}.toml"));
    std::fs::write(&conf, text).map_err(|e| e.to_string())?;
    let mut cmd = limited(&a.tern, hard);
    cmd.arg("--config").arg(&conf);
    let mut proc = Proc::spawn(
        name,
        &mut cmd,
        &logs.join(format!("{name}.log")),
        Stdio::piped(),
    )?;
    let stdout = proc
        .child
        .stdout
        .take()
        .ok_or("tern's stdout was not piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line.starts_with("tern: ready") {
                let _ = tx.send(line.clone());
            }
            line.clear();
        }
    });
    let line = match rx.recv_timeout(TERN_START) {
        Ok(l) => l,
        Err(_) => {
            let why = proc.exited().unwrap_or_default();
            return Err(format!(
                "{name} printed no ready line within {TERN_START:?} {why}\n{}",
                proc.log_tail(20)
            ));
        }
    };
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(String::from)
    };
    if cluster.is_some() && field("cluster=").as_deref() != Some(name) {
        return Err(format!("{name}: ready line without cluster={name}: {line}"));
    }
    let addr = field("tcp=").ok_or_else(|| format!("{name}: unexpected ready line {line}"))?;
    Ok(TernNode {
        proc,
        addr,
        metrics: field("metrics="),
    })
}

/// What one configuration runs on.
struct Env {
    terns: Vec<TernNode>,
    nats: Vec<NatsServer>,
    pub_addr: String,
    sub_addr: String,
}

impl Env {
    /// Every broker process: the Tern nodes, then the nats-servers.
    fn pids(&self) -> Vec<u32> {
        self.terns
            .iter()
            .map(|t| t.proc.pid)
            .chain(self.nats.iter().map(|n| n.proc.pid))
            .collect()
    }

    /// CPU seconds so far of every broker process, by name (t1.., n1.., single).
    fn cpu_by_process(&self) -> BTreeMap<String, f64> {
        self.terns
            .iter()
            .map(|t| &t.proc)
            .chain(self.nats.iter().map(|n| &n.proc))
            .map(|p| (p.name.clone(), stats::proc_cpu_s(p.pid).unwrap_or(f64::NAN)))
            .collect()
    }

    /// Every broker process's log and its current length (what a scenario adds is read
    /// from there).
    fn log_marks(&self) -> Vec<(String, PathBuf, u64)> {
        self.terns
            .iter()
            .map(|t| &t.proc)
            .chain(self.nats.iter().map(|n| &n.proc))
            .map(|p| {
                let len = std::fs::metadata(&p.log).map_or(0, |m| m.len());
                (p.name.clone(), p.log.clone(), len)
            })
            .collect()
    }

    fn dead(&mut self) -> Vec<String> {
        self.terns
            .iter_mut()
            .map(|t| &mut t.proc)
            .chain(self.nats.iter_mut().map(|n| &mut n.proc))
            .filter_map(|p| p.exited().map(|e| format!("{e}: {}", p.log_tail(5))))
            .collect()
    }

    /// The Tern nodes first (so they do not spend the shutdown reconnecting), then NATS.
    fn stop(self) -> Vec<String> {
        let Env { terns, nats, .. } = self;
        let mut tp: Vec<Proc> = terns.into_iter().map(|t| t.proc).collect();
        let mut problems = stop_all(&mut tp);
        let mut np: Vec<Proc> = nats.into_iter().map(|n| n.proc).collect();
        problems.extend(stop_all(&mut np));
        problems
    }

    /// Tern's counters that tell where messages went (drops, cluster traffic, refusals),
    /// summed over its nodes: `name{labels}` -> value.
    fn tern_counters(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for t in &self.terns {
            let Some(addr) = &t.metrics else { continue };
            let Some((200, body)) = http_get(addr, "/metrics") else {
                continue;
            };
            for l in body.lines() {
                // Counters only (gauges such as tern_cluster_members do not add up).
                let name = l.split(['{', ' ']).next().unwrap_or("");
                if !(name.starts_with("tern_cluster_") || name == "tern_messages_dropped_total")
                    || !name.ends_with("_total")
                {
                    continue;
                }
                if let Some((k, v)) = l.rsplit_once(' ') {
                    if let Ok(v) = v.parse::<f64>() {
                        *m.entry(format!("{}:{k}", t.proc.name)).or_insert(0.0) += v;
                    }
                }
            }
        }
        m
    }
}

/// Most time `settle` waits.
const SETTLE: Duration = Duration::from_secs(30);
/// `settle`'s window for the processes' CPU.
const SETTLE_WINDOW: Duration = Duration::from_millis(500);

/// Whether every Tern node has read every QoS 1/2 message the other nodes published
/// (`tern_cluster_messages_total` in/stream against the others' out/stream).
fn stream_caught_up(c: &BTreeMap<String, f64>, nodes: &[String]) -> bool {
    let get = |node: &str, dir: &str| {
        c.get(&format!(
            "{node}:tern_cluster_messages_total{{direction=\"{dir}\",path=\"stream\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    nodes.iter().all(|n| {
        let from_others: f64 = nodes
            .iter()
            .filter(|m| *m != n)
            .map(|m| get(m, "out"))
            .sum();
        get(n, "in") >= from_others
    })
}

/// Wait (at most SETTLE) until the brokers have done what the last scenario left them: in a
/// Tern cluster every node reads every message, and the nodes without subscribers may still
/// be reading when the subscribers have everything; that work belongs to the scenario that
/// caused it, not to the next one. Settled: every node has read the others' stream messages
/// and the processes together used less than 0.05 cores each (plus 0.1) over SETTLE_WINDOW.
/// Returns (seconds waited, settled).
fn settle(env: &Env) -> (f64, bool) {
    let t0 = Instant::now();
    let nodes: Vec<String> = env.terns.iter().map(|t| t.proc.name.clone()).collect();
    let limit = 0.05 * env.pids().len() as f64 + 0.1;
    loop {
        let cpu0: f64 = env.cpu_by_process().values().sum();
        std::thread::sleep(SETTLE_WINDOW);
        let cores =
            (env.cpu_by_process().values().sum::<f64>() - cpu0) / SETTLE_WINDOW.as_secs_f64();
        let caught_up = nodes.len() < 2 || stream_caught_up(&env.tern_counters(), &nodes);
        if caught_up && cores < limit {
            return (t0.elapsed().as_secs_f64(), true);
        }
        if t0.elapsed() >= SETTLE {
            return (t0.elapsed().as_secs_f64(), false);
        }
    }
}

/// How long the MQTT warm-up may take in all.
const WARM_UP: Duration = Duration::from_secs(60);

/// One MQTT CONNECT (clean) and DISCONNECT to each address, retried until WARM_UP: the first
/// MQTT connection to a fresh nats-server cluster creates the account's `$MQTT_*` streams
/// (three replicas), and nats-server closes it when that takes longer than its internal
/// 5 s request timeout, which happens here. That should land neither in the first scenario's
/// setup nor fail it. Returns the attempts it took.
fn warm_up(addrs: &[String]) -> Result<usize, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut attempts = 0;
    rt.block_on(async {
        for a in addrs {
            let sa = a.parse().map_err(|e| format!("{a}: {e}"))?;
            loop {
                attempts += 1;
                match crate::mqtt::Client::connect(sa, None, "tb-warm-up", Duration::from_secs(20))
                    .await
                {
                    Ok(c) => {
                        c.close_and_wait(Duration::from_secs(5)).await;
                        break;
                    }
                    Err(e) if t0.elapsed() >= WARM_UP => {
                        return Err(format!(
                            "warm-up connect to {a}: {e} ({attempts} attempts in {WARM_UP:?})"
                        ))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        Ok(attempts)
    })
}

fn start_env(
    a: &ClusterArgs,
    cfg: &Config,
    dir: &Path,
    logs: &Path,
    hard: u64,
) -> Result<Env, String> {
    match cfg.kind {
        Kind::Single => {
            let t = start_tern(a, "single", dir, logs, hard, None)?;
            let addr = t.addr.clone();
            Ok(Env {
                terns: vec![t],
                nats: vec![],
                pub_addr: addr.clone(),
                sub_addr: addr,
            })
        }
        Kind::Cluster => {
            let nats = start_nats(a, dir, logs, hard)?;
            let mut env = Env {
                terns: vec![],
                nats,
                pub_addr: String::new(),
                sub_addr: String::new(),
            };
            for i in 0..3 {
                let url = format!("nats://127.0.0.1:{}", env.nats[i].client_port);
                let t = start_tern(a, &format!("t{}", i + 1), dir, logs, hard, Some(&url))?;
                env.terns.push(t);
            }
            env.pub_addr = env.terns[0].addr.clone();
            env.sub_addr = env.terns[usize::from(cfg.cross)].addr.clone();
            Ok(env)
        }
        Kind::NatsMqtt => {
            let nats = start_nats(a, dir, logs, hard)?;
            let addr = |i: usize| format!("127.0.0.1:{}", nats[i].mqtt_port);
            let env = Env {
                pub_addr: addr(0),
                sub_addr: addr(usize::from(cfg.cross)),
                terns: vec![],
                nats,
            };
            let n = warm_up(&[env.pub_addr.clone(), env.sub_addr.clone()])?;
            if n > 2 {
                eprintln!("[{}] MQTT warm-up took {n} connection attempts", cfg.name);
            }
            Ok(env)
        }
    }
}

/// Warning and error lines a log got after byte `from` (while the scenarios ran, not at
/// start-up or shutdown): how many, and the first few.
fn log_problems(path: &Path, from: u64) -> (usize, Vec<String>) {
    let bytes = std::fs::read(path).unwrap_or_default();
    let from = (from as usize).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[from..]);
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains(" WARN ")
                || l.contains(" ERROR ")
                || l.contains("[ERR]")
                || l.contains("[WRN]")
                || l.contains("[FTL]")
        })
        .collect();
    (
        bad.len(),
        bad.iter().take(5).map(|s| s.to_string()).collect(),
    )
}

fn progress(v: &Value) -> String {
    let f = |k: &str| num(v, k).unwrap_or(f64::NAN);
    let mut s = if v["scenario"]
        .as_str()
        .is_some_and(|s| s.starts_with("durable-"))
    {
        format!(
            "publish {} msg/s, drain {} msg/s, lost {}, dups {}",
            fmt_num(f("publish_rate")),
            fmt_num(f("drain_rate")),
            f("lost"),
            f("duplicates")
        )
    } else {
        format!(
            "{} msg/s, p50 {} p99 {}, lost {}, dups {}",
            fmt_num(f("rate")),
            fmt_us(f("p50_us")),
            fmt_us(f("p99_us")),
            f("lost"),
            f("duplicates")
        )
    };
    let _ = write!(
        s,
        " (brokers {:.2} cores, {:.1} µs CPU/msg; client {:.2} cores)",
        f("broker_cpu_cores"),
        1e6 / f("msgs_per_broker_cpu_s"),
        f("client_cpu_cores")
    );
    if let (Some(cpu), Some(n)) = (num(v, "broker_cpu_s_settled"), num(v, "delivered")) {
        let _ = write!(
            s,
            " [settled after {:.1} s: {:.1} µs CPU/msg]",
            f("settle_s"),
            cpu * 1e6 / n.max(1.0)
        );
    }
    if v["settled"].as_bool() == Some(false) {
        let _ = write!(s, " [NOT SETTLED within {SETTLE:?}]");
    }
    if v["ok"].as_bool() != Some(true) {
        let _ = write!(s, " ERRORS: {}", v["errors"]);
    }
    s
}

pub fn run(a: ClusterArgs) -> i32 {
    let (_, hard) = stats::raise_nofile();
    if let Err(e) = std::fs::create_dir_all(&a.out) {
        eprintln!("tern-bench: cannot create {}: {e}", a.out.display());
        return 1;
    }
    // Absolute, so the paths in the brokers' configuration files do not depend on their
    // working directory.
    let out = std::fs::canonicalize(&a.out).unwrap_or_else(|_| a.out.clone());
    let tmp = out.join("tmp");
    let logs_root = out.join("logs");
    for d in [&out, &tmp, &logs_root] {
        if let Err(e) = std::fs::create_dir_all(d) {
            eprintln!("tern-bench: cannot create {}: {e}", d.display());
            return 1;
        }
    }
    for (what, p) in [("tern", &a.tern), ("nats-server", &a.nats_server)] {
        if !p.exists() {
            eprintln!("tern-bench cluster: {what} not found at {}", p.display());
            return 2;
        }
    }
    let mut machine = machine_common(&a.tern);
    machine["nats_server_version"] = json!(sh(&a.nats_server.to_string_lossy(), &["--version"]));
    eprintln!(
        "tern-bench cluster: {} rounds{} on {} CPUs ({}), {}, load average {}",
        a.rounds,
        if a.quick { " (quick)" } else { "" },
        machine["nproc"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["nats_server_version"].as_str().unwrap_or("?"),
        machine["loadavg"].as_str().unwrap_or("?")
    );
    let t_all = Instant::now();
    let mut runs: Vec<Value> = Vec::new();
    let mut envs: Vec<Value> = Vec::new();
    for round in 1..=a.rounds {
        for cfg in CONFIGS {
            let tag = format!("{}-r{round}", cfg.name);
            let dir = tmp.join(&tag);
            let logs = logs_root.join(&tag);
            let t_env = Instant::now();
            let started = fresh_dir(&dir)
                .and_then(|()| fresh_dir(&logs))
                .and_then(|()| start_env(&a, cfg, &dir, &logs, hard));
            let mut env = match started {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("[{tag}] could not start: {e}");
                    for sc in cfg.scenarios {
                        runs.push(json!({
                            "ok": false, "errors": [format!("start: {e}")],
                            "config": cfg.name, "scenario": sc, "round": round,
                        }));
                    }
                    envs.push(json!({"config": cfg.name, "round": round, "start_error": e}));
                    continue;
                }
            };
            let (settle0, settled0) = settle(&env);
            if !settled0 {
                eprintln!("[{tag}] not quiet {SETTLE:?} after start; going on");
            }
            let start_s = t_env.elapsed().as_secs_f64();
            let pids = env.pids();
            let marks = env.log_marks();
            let mut all_ok = true;
            for sc in cfg.scenarios {
                let mut args: Vec<String> = vec![
                    "load".into(),
                    "--scenario".into(),
                    sc.to_string(),
                    "--broker".into(),
                    cfg.name.into(),
                    "--addr".into(),
                    env.pub_addr.clone(),
                    "--sub-addr".into(),
                    env.sub_addr.clone(),
                    "--broker-pids".into(),
                    pids.iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                ];
                if cfg.persistent {
                    args.push("--persistent".into());
                }
                if a.quick {
                    args.push("--quick".into());
                }
                if let Some(d) = a.duration {
                    args.extend(["--duration".into(), d.to_string()]);
                }
                let before = env.tern_counters();
                let cpu0 = env.cpu_by_process();
                let r = load_with(&args);
                let (settle_s, settled) = settle(&env);
                let cpu1 = env.cpu_by_process();
                let after = env.tern_counters();
                let mut v = r.unwrap_or_else(|e| json!({"ok": false, "errors": [e]}));
                v["config"] = json!(cfg.name);
                v["scenario"] = json!(sc);
                v["round"] = json!(round);
                let delta: serde_json::Map<String, Value> = after
                    .iter()
                    .filter_map(|(k, x)| {
                        let d = x - before.get(k).copied().unwrap_or(0.0);
                        (d != 0.0).then(|| (k.clone(), json!(d)))
                    })
                    .collect();
                if !delta.is_empty() {
                    v["tern_counters"] = Value::Object(delta);
                }
                // From the start of the load process (set-up included) until the brokers had
                // settled after it: what the scenario cost each process.
                let by_proc: serde_json::Map<String, Value> = cpu1
                    .iter()
                    .map(|(k, x)| {
                        (
                            k.clone(),
                            json!(x - cpu0.get(k).copied().unwrap_or(f64::NAN)),
                        )
                    })
                    .collect();
                v["broker_cpu_s_settled"] =
                    json!(by_proc.values().filter_map(Value::as_f64).sum::<f64>());
                v["cpu_s_by_process"] = Value::Object(by_proc);
                v["settle_s"] = json!(settle_s);
                v["settled"] = json!(settled);
                let dead = env.dead();
                if !dead.is_empty() {
                    v["ok"] = json!(false);
                    v["broker_exited"] = json!(dead);
                }
                all_ok &= v["ok"].as_bool() == Some(true);
                eprintln!(
                    "[{sc} {round}/{}] {:26} {}",
                    a.rounds,
                    cfg.name,
                    progress(&v)
                );
                runs.push(v);
                if !dead.is_empty() {
                    eprintln!("[{tag}] a broker process exited: {dead:?}; next configuration");
                    break;
                }
            }
            // Read before the shutdown, whose reconnect and broken-pipe lines are expected.
            let mut log_notes = serde_json::Map::new();
            for (name, log, from) in &marks {
                let (n, first) = log_problems(log, *from);
                if n > 0 {
                    log_notes.insert(name.clone(), json!({"count": n, "first": first}));
                }
            }
            let stop = env.stop();
            let store_bytes = dir_bytes(&dir);
            if !stop.is_empty() {
                eprintln!("[{tag}] stopping: {stop:?}");
            }
            if !log_notes.is_empty() {
                eprintln!(
                    "[{tag}] warnings/errors in logs (under {}): {}",
                    logs.display(),
                    Value::Object(log_notes.clone())
                );
            }
            envs.push(json!({
                "config": cfg.name, "round": round, "start_s": start_s,
                "settle_after_start_s": settle0, "settled_after_start": settled0,
                "stop_problems": stop, "store_bytes": store_bytes,
                "log_problems": log_notes, "logs": logs.display().to_string(),
            }));
            // Stores are large (every QoS 1 message, three times); kept only when a run failed.
            if all_ok && stop.is_empty() {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    let minutes = t_all.elapsed().as_secs_f64() / 60.0;
    machine["loadavg_end"] = json!(std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim());
    let (tables, rows) = summarize(&runs);
    println!("\n{tables}");
    let full = !a.quick && a.duration.is_none() && a.rounds >= 3;
    let md = markdown(&machine, &a, &tables, minutes);
    let results = json!({
        "machine": machine,
        "rounds": a.rounds,
        "quick": a.quick,
        "duration": a.duration,
        "full_run": full,
        "minutes": minutes,
        "configs": CONFIGS.iter().map(|c| json!({
            "name": c.name, "cross": c.cross, "persistent": c.persistent,
            "scenarios": c.scenarios,
        })).collect::<Vec<_>>(),
        "rows": rows,
        "environments": envs,
        "runs": runs,
    });
    let json_path = out.join("results.json");
    let md_path = out.join("table.md");
    let _ = std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    );
    let _ = std::fs::write(&md_path, &md);
    eprintln!(
        "tern-bench cluster: {minutes:.1} min; wrote {} and {}",
        json_path.display(),
        md_path.display()
    );
    if let (true, Some(docs)) = (full, &a.docs) {
        match update_docs(docs, &md) {
            Ok(()) => eprintln!("tern-bench cluster: full run; updated {}", docs.display()),
            Err(e) => eprintln!(
                "tern-bench cluster: could not update {}: {e}",
                docs.display()
            ),
        }
    }
    0
}

/// One figure of the table: its key in the load generator's JSON, and whether lower is better.
struct Metric {
    scenario: &'static str,
    label: &'static str,
    key: &'static str,
    latency: bool,
    /// the issue's target on Tern cluster-cross ÷ nats-mqtt-cross (both session kinds)
    target: Option<Target>,
}

#[derive(Clone, Copy)]
enum Target {
    AtLeast(f64),
    Below(f64),
}

const METRICS: &[Metric] = &[
    Metric {
        scenario: "pairs-q1",
        label: "delivered msg/s",
        key: "rate",
        latency: false,
        target: Some(Target::AtLeast(2.0)),
    },
    Metric {
        scenario: "fanin-q1",
        label: "delivered msg/s",
        key: "rate",
        latency: false,
        target: Some(Target::AtLeast(2.0)),
    },
    Metric {
        scenario: "fanout-q0",
        label: "delivered msg/s (each copy)",
        key: "rate",
        latency: false,
        target: None,
    },
    Metric {
        scenario: "durable-q1-os",
        label: "publish msg/s (acked, sub offline)",
        key: "publish_rate",
        latency: false,
        target: None,
    },
    Metric {
        scenario: "durable-q1-os",
        label: "drain msg/s (after reconnect)",
        key: "drain_rate",
        latency: false,
        target: None,
    },
    Metric {
        scenario: "latency-q1",
        label: "latency p50",
        key: "p50_us",
        latency: true,
        target: None,
    },
    Metric {
        scenario: "latency-q1",
        label: "latency p99",
        key: "p99_us",
        latency: true,
        target: Some(Target::Below(1.0)),
    },
];

const LABELS: &[(&str, &str)] = &[
    ("single", "single"),
    ("cluster-same", "cluster same-node"),
    ("cluster-cross", "cluster cross-node"),
    ("cluster-cross-persistent", "cluster cross-node, persistent"),
    ("nats-mqtt-cross", "nats-mqtt cross, clean"),
    ("nats-mqtt-cross-persistent", "nats-mqtt cross, persistent"),
];

fn runs_of<'a>(runs: &'a [Value], cfg: &str, sc: &str) -> Vec<&'a Value> {
    runs.iter()
        .filter(|r| r["config"] == cfg && r["scenario"] == sc)
        .collect()
}

/// Median over the runs that finished without errors (NaN when none did).
fn med_ok(rs: &[&Value], key: &str) -> f64 {
    let mut v: Vec<f64> = rs
        .iter()
        .filter(|r| r["ok"].as_bool() == Some(true))
        .filter_map(|r| num(r, key))
        .collect();
    median(&mut v)
}

/// Broker CPU microseconds per delivered message (durable: per message drained), median
/// over the runs without errors. The CPU is every broker process's from the start of the
/// load process until the brokers had settled after it (see `settle`).
fn us_per_msg(rs: &[&Value]) -> f64 {
    let mut v: Vec<f64> = rs
        .iter()
        .filter(|r| r["ok"].as_bool() == Some(true))
        .filter_map(|r| {
            let n = num(r, "delivered").filter(|&n| n > 0.0)?;
            Some(num(r, "broker_cpu_s_settled")? * 1e6 / n)
        })
        .collect();
    median(&mut v)
}

/// Broker CPU microseconds per delivered message over the load generator's measured interval
/// (from the first send until the last delivery; durable: both phases), median over the runs
/// without errors.
fn us_per_msg_run(rs: &[&Value]) -> f64 {
    let mut v: Vec<f64> = rs
        .iter()
        .filter(|r| r["ok"].as_bool() == Some(true))
        .filter_map(|r| num(r, "msgs_per_broker_cpu_s"))
        .filter(|&x| x > 0.0)
        .map(|x| 1e6 / x)
        .collect();
    median(&mut v)
}

/// Share of the broker CPU the Tern nodes used (the rest: the nats-servers), median over
/// the runs without errors; from the per-process CPU over each load process's lifetime.
fn tern_share(rs: &[&Value]) -> f64 {
    let mut v: Vec<f64> = rs
        .iter()
        .filter(|r| r["ok"].as_bool() == Some(true))
        .filter_map(|r| r["cpu_s_by_process"].as_object())
        .filter_map(|m| {
            let all: f64 = m.values().filter_map(Value::as_f64).sum();
            let tern: f64 = m
                .iter()
                .filter(|(k, _)| !k.starts_with('n'))
                .filter_map(|(_, x)| x.as_f64())
                .sum();
            (all > 0.0).then_some(tern / all)
        })
        .collect();
    median(&mut v)
}

fn us_s(x: f64) -> String {
    if x.is_finite() {
        format!("{} µs", fmt_num(x))
    } else {
        "-".into()
    }
}

fn ratio_s(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}x")
    } else {
        "-".into()
    }
}

/// First error of the runs of one configuration and scenario, shortened.
fn first_error(rs: &[&Value]) -> Option<String> {
    rs.iter()
        .filter(|r| r["ok"].as_bool() != Some(true))
        .find_map(|r| {
            r["errors"]
                .as_array()
                .and_then(|e| e.first())
                .and_then(Value::as_str)
                .map(String::from)
                .or_else(|| r["broker_exited"].as_array().map(|d| format!("{d:?}")))
        })
        .map(|e| {
            let e: String = e.chars().take(160).collect();
            e.replace('|', "/").replace('\n', " ")
        })
}

/// The tables (markdown) and the main table's rows as JSON.
fn summarize(runs: &[Value]) -> (String, Vec<Value>) {
    let mut notes: Vec<String> = Vec::new();
    let mut note_of: BTreeMap<(String, String), usize> = BTreeMap::new();
    // A cell: the median, or why there is none.
    let mut cell = |cfg: &Config, sc: &str, key: &str, latency: bool| -> (f64, String) {
        if !cfg.scenarios.contains(&sc) {
            return (f64::NAN, "not run".into());
        }
        let rs = runs_of(runs, cfg.name, sc);
        let failed = rs
            .iter()
            .filter(|r| r["ok"].as_bool() != Some(true))
            .count();
        let v = med_ok(&rs, key);
        let mut s = if !v.is_finite() {
            "n/a".to_string()
        } else if latency {
            fmt_us(v)
        } else {
            fmt_num(v)
        };
        if failed > 0 {
            let k = (cfg.name.to_string(), sc.to_string());
            let n = *note_of.entry(k).or_insert_with(|| {
                notes.push(format!(
                    "{} {sc}: {failed} of {} runs had errors; first: {}",
                    cfg.name,
                    rs.len(),
                    first_error(&rs).unwrap_or_default()
                ));
                notes.len()
            });
            let _ = write!(s, " [{n}]");
        }
        (v, s)
    };
    let cfg = |name: &str| CONFIGS.iter().find(|c| c.name == name);
    let mut header: Vec<String> = vec!["scenario".into(), "metric (median)".into()];
    header.extend(LABELS.iter().map(|l| l.1.to_string()));
    header.extend([
        "Tern ÷ NATS, clean".into(),
        "Tern ÷ NATS, persistent".into(),
        "cross ÷ single".into(),
        "target".into(),
        String::new(),
    ]);
    let mut rows: Vec<[String; 13]> = Vec::new();
    let mut json_rows = Vec::new();
    for m in METRICS {
        let mut vals = BTreeMap::new();
        let mut cells = Vec::new();
        for (name, _) in LABELS {
            let Some(c) = cfg(name) else { continue };
            let (v, s) = cell(c, m.scenario, m.key, m.latency);
            vals.insert(*name, v);
            cells.push(s);
        }
        let get = |k: &str| vals.get(k).copied().unwrap_or(f64::NAN);
        let clean = get("cluster-cross") / get("nats-mqtt-cross");
        let persistent = get("cluster-cross-persistent") / get("nats-mqtt-cross-persistent");
        let vs_single = get("cluster-cross") / get("single");
        let (target, met) = match m.target {
            None => (String::new(), None),
            Some(t) => {
                let present: Vec<f64> = [clean, persistent]
                    .into_iter()
                    .filter(|x| x.is_finite())
                    .collect();
                let ok = |x: f64| match t {
                    Target::AtLeast(y) => x >= y,
                    Target::Below(y) => x < y,
                };
                let label = match t {
                    Target::AtLeast(y) => format!("Tern ÷ NATS ≥ {y}x"),
                    Target::Below(y) => format!("Tern ÷ NATS < {y}x"),
                };
                let met = if present.len() < 2 {
                    None
                } else {
                    Some(present.iter().all(|&x| ok(x)))
                };
                (label, met)
            }
        };
        let met_s = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None if m.target.is_some() => "n/a",
            None => "",
        };
        json_rows.push(json!({
            "scenario": m.scenario, "metric": m.label, "key": m.key,
            "values": vals.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "tern_vs_nats_clean": clean, "tern_vs_nats_persistent": persistent,
            "cross_vs_single": vs_single, "target": target, "met": met,
        }));
        let mut row: Vec<String> = vec![m.scenario.into(), m.label.into()];
        row.extend(cells);
        row.extend([
            ratio_s(clean),
            ratio_s(persistent),
            ratio_s(vs_single),
            target,
            met_s.into(),
        ]);
        if let Ok(r) = <[String; 13]>::try_from(row) {
            rows.push(r);
        }
    }
    // Loss and duplicates over every run (QoS 1 scenarios: must be 0 lost).
    for (label, key) in [
        ("QoS 1 messages lost, all runs", "lost"),
        ("duplicates, all runs", "duplicates"),
    ] {
        let mut row: Vec<String> = vec!["QoS 1 (all)".into(), label.into()];
        let mut vals = serde_json::Map::new();
        for (name, _) in LABELS {
            let total: f64 = runs
                .iter()
                .filter(|r| r["config"] == *name && r["scenario"] != "fanout-q0")
                .filter_map(|r| num(r, key))
                .sum::<f64>()
                + 0.0;
            vals.insert(name.to_string(), json!(total));
            row.push(fmt_count(total));
        }
        row.extend(["-".into(), "-".into(), "-".into()]);
        let lost_total: f64 = vals
            .iter()
            .filter(|(k, _)| k.starts_with("single") || k.starts_with("cluster"))
            .filter_map(|(_, v)| v.as_f64())
            .sum();
        if key == "lost" {
            row.push("Tern = 0".into());
            row.push(if lost_total == 0.0 { "met" } else { "MISSED" }.into());
        } else {
            row.extend([String::new(), String::new()]);
        }
        json_rows
            .push(json!({"scenario": "QoS 1 (all)", "metric": label, "key": key, "values": vals}));
        if let Ok(r) = <[String; 13]>::try_from(row) {
            rows.push(r);
        }
    }
    let mut out = String::new();
    render(
        &mut out,
        &<[String; 13]>::try_from(header)
            .unwrap_or_else(|_| std::array::from_fn(|_| String::new())),
        &rows,
    );
    // Broker CPU per message, and the cross-node cost.
    let mut cheader: Vec<String> = vec!["scenario".into()];
    cheader.extend(LABELS.iter().map(|l| l.1.to_string()));
    cheader.extend([
        "cross-node cost (cross − single)".into(),
        "of it in Tern nodes".into(),
        "of it in nats-servers".into(),
        "same-node cost (same − single)".into(),
    ]);
    let mut crows: Vec<[String; 11]> = Vec::new();
    for sc in ALL {
        let mut row = vec![sc.to_string()];
        let mut vals = BTreeMap::new();
        for (name, _) in LABELS {
            let Some(c) = cfg(name) else { continue };
            let v = if c.scenarios.contains(sc) {
                us_per_msg(&runs_of(runs, name, sc))
            } else {
                f64::NAN
            };
            vals.insert(*name, v);
            row.push(if v.is_finite() {
                us_s(v)
            } else if c.scenarios.contains(sc) {
                "n/a".into()
            } else {
                "not run".into()
            });
        }
        let get = |k: &str| vals.get(k).copied().unwrap_or(f64::NAN);
        let share = tern_share(&runs_of(runs, "cluster-cross", sc));
        let cross = get("cluster-cross");
        let cost = cross - get("single");
        let in_tern = cross * share - get("single");
        let in_nats = cross * (1.0 - share);
        let same = get("cluster-same") - get("single");
        row.extend([us_s(cost), us_s(in_tern), us_s(in_nats), us_s(same)]);
        json_rows.push(json!({
            "scenario": sc, "metric": "broker CPU µs per message",
            "values": vals.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "cross_node_cost_us": cost,
            "cross_node_cost_in_tern_us": in_tern,
            "cross_node_cost_in_nats_us": in_nats,
            "cluster_cross_tern_share": share,
            "same_node_cost_us": same,
        }));
        if let Ok(r) = <[String; 11]>::try_from(row) {
            crows.push(r);
        }
    }
    out.push('\n');
    render(
        &mut out,
        &<[String; 11]>::try_from(cheader)
            .unwrap_or_else(|_| std::array::from_fn(|_| String::new())),
        &crows,
    );
    // Per configuration and scenario: what the brokers and the load generator spent.
    let rheader = [
        "scenario",
        "configuration",
        "msg/s",
        "p50",
        "p99",
        "p99.9",
        "broker CPU",
        "µs/msg (run)",
        "µs/msg (until settled)",
        "client CPU",
        "lost",
        "dups",
        "runs with errors",
        "client-bound",
    ]
    .map(String::from);
    let mut rrows: Vec<[String; 14]> = Vec::new();
    for sc in ALL {
        for c in CONFIGS.iter().filter(|c| c.scenarios.contains(sc)) {
            let rs = runs_of(runs, c.name, sc);
            if rs.is_empty() {
                continue;
            }
            let failed = rs
                .iter()
                .filter(|r| r["ok"].as_bool() != Some(true))
                .count();
            let sat = rs
                .iter()
                .filter(|r| r["client_saturated"].as_bool() == Some(true))
                .count();
            let rate_key = if sc.starts_with("durable-") {
                "publish_rate"
            } else {
                "rate"
            };
            let sum = |k: &str| fmt_count(rs.iter().filter_map(|r| num(r, k)).sum::<f64>() + 0.0);
            let cores = |k: &str| {
                let x = med_ok(&rs, k);
                if x.is_finite() {
                    format!("{x:.2} cores")
                } else {
                    "-".into()
                }
            };
            rrows.push([
                sc.to_string(),
                c.name.into(),
                fmt_num(med_ok(&rs, rate_key)),
                fmt_us(med_ok(&rs, "p50_us")),
                fmt_us(med_ok(&rs, "p99_us")),
                fmt_us(med_ok(&rs, "p999_us")),
                cores("broker_cpu_cores"),
                us_s(us_per_msg_run(&rs)),
                us_s(us_per_msg(&rs)),
                cores("client_cpu_cores"),
                sum("lost"),
                sum("duplicates"),
                format!("{failed}/{}", rs.len()),
                format!("{sat}/{}", rs.len()),
            ]);
        }
    }
    out.push('\n');
    render(&mut out, &rheader, &rrows);
    if !notes.is_empty() {
        out.push('\n');
        for (i, n) in notes.iter().enumerate() {
            let _ = writeln!(out, "[{}] {n}", i + 1);
        }
    }
    (out, json_rows)
}

fn markdown(machine: &Value, a: &ClusterArgs, tables: &str, minutes: f64) -> String {
    let s = |k: &str| machine[k].as_str().unwrap_or("?").to_string();
    format!(
        "Run of {date}: {rounds} rounds{quick}{dur}, {minutes:.0} minutes.\n\n\
         - Machine: {nproc} CPUs ({cpu}), {mem}, kernel {kernel}; every broker process and the \
         load generator share these CPUs\n\
         - Tern: commit {commit} ({tv}), release build\n\
         - NATS: {nv} (three servers, one JetStream cluster)\n\
         - Load average at start: {load}; at the end: {load_end} (other work on the machine \
         shares the CPUs too)\n\n\
         {tables}",
        date = s("date"),
        rounds = a.rounds,
        quick = if a.quick { " (quick mode)" } else { "" },
        dur = a
            .duration
            .map(|d| format!(", --duration {d}"))
            .unwrap_or_default(),
        nproc = machine["nproc"],
        cpu = s("cpu"),
        mem = s("memory"),
        kernel = s("kernel"),
        commit = s("tern_commit"),
        tv = s("tern_version"),
        nv = s("nats_server_version"),
        load = s("loadavg"),
        load_end = s("loadavg_end"),
    )
}

const BEGIN: &str = "<!-- tern-bench:cluster:begin -->";
const END: &str = "<!-- tern-bench:cluster:end -->";

/// Replace what is between the cluster markers; a file without them gets a short section
/// with the markers at its end.
fn update_docs(path: &Path, md: &str) -> std::io::Result<()> {
    let doc = std::fs::read_to_string(path)?;
    let new = match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{BEGIN}\n{md}{}", &doc[..b], &doc[e..]),
        _ => format!(
            "{}\n\n## Cluster\n\n`make bench-cluster` (`tern-bench cluster`): single-node Tern, a \
             3-node Tern cluster and nats-server's MQTT listener on one three-server NATS \
             cluster; see benches/tern-bench/src/cluster.rs.\n\n{BEGIN}\n{md}{END}\n",
            doc.trim_end()
        ),
    };
    std::fs::write(path, new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caught_up_compares_each_node_with_the_others() {
        let key = |n: &str, d: &str| {
            format!("{n}:tern_cluster_messages_total{{direction=\"{d}\",path=\"stream\"}}")
        };
        let nodes: Vec<String> = ["t1", "t2", "t3"].map(String::from).to_vec();
        let mut c = BTreeMap::new();
        c.insert(key("t1", "out"), 100.0);
        c.insert(key("t2", "in"), 100.0);
        c.insert(key("t3", "in"), 90.0);
        assert!(!stream_caught_up(&c, &nodes));
        c.insert(key("t3", "in"), 100.0);
        assert!(stream_caught_up(&c, &nodes));
        c.insert(key("t2", "out"), 5.0);
        assert!(
            !stream_caught_up(&c, &nodes),
            "t1 and t3 have not read t2's"
        );
    }

    #[test]
    fn ports_are_distinct() {
        let p = free_ports(20).unwrap();
        let mut q = p.clone();
        q.sort();
        q.dedup();
        assert_eq!(p.len(), q.len());
    }

    #[test]
    fn docs_block_is_replaced_or_added() {
        let dir = std::env::temp_dir().join(format!("tb-docs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("b.md");
        std::fs::write(&f, "# B\n\ntext\n").unwrap();
        update_docs(&f, "one\n").unwrap();
        let t = std::fs::read_to_string(&f).unwrap();
        assert!(t.starts_with("# B\n\ntext\n\n## Cluster"), "{t}");
        assert!(t.contains(&format!("{BEGIN}\none\n{END}")), "{t}");
        update_docs(&f, "two\n").unwrap();
        let t2 = std::fs::read_to_string(&f).unwrap();
        assert_eq!(t2, t.replace("one\n", "two\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn summary_marks_failures_and_missing_scenarios() {
        let mut runs = Vec::new();
        for (cfg, rate) in [
            ("single", 100.0),
            ("cluster-cross", 50.0),
            ("nats-mqtt-cross", 10.0),
        ] {
            runs.push(json!({"config": cfg, "scenario": "pairs-q1", "ok": true,
                "rate": rate, "delivered": rate, "broker_cpu_s_settled": 1.0,
                "lost": 0, "duplicates": 0}));
        }
        runs.push(
            json!({"config": "nats-mqtt-cross-persistent", "scenario": "pairs-q1",
            "ok": false, "errors": ["subscriber setup: refused"]}),
        );
        let (t, rows) = summarize(&runs);
        let pairs = &rows[0];
        assert_eq!(pairs["tern_vs_nats_clean"], json!(5.0));
        assert_eq!(pairs["cross_vs_single"], json!(0.5));
        assert!(t.contains("n/a [1]"), "{t}");
        assert!(t.contains("[1] nats-mqtt-cross-persistent pairs-q1: 1 of 1 runs had errors; first: subscriber setup: refused"), "{t}");
        // cross-node cost: 1e6/50 - 1e6/100 µs
        let cost = rows
            .iter()
            .find(|r| r["scenario"] == "pairs-q1" && r.get("cross_node_cost_us").is_some())
            .unwrap();
        assert_eq!(cost["cross_node_cost_us"], json!(10_000.0));
        assert!(
            t.contains("not run"),
            "fanout-q0 is not run with persistent sessions"
        );
    }
}
