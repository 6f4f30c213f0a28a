//! The comparison driver behind `make bench`: for each scenario and round it starts a fresh
//! Tern, runs the load generator against it, stops it, then does the same with Mosquitto
//! (A B A B ...), and finally prints medians, Tern/Mosquitto ratios and targets in one
//! table, with the raw runs as JSON.

use crate::load::SCENARIOS;
use crate::stats::{self, median};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct RunArgs {
    pub scenarios: Vec<String>,
    pub rounds: usize,
    pub quick: bool,
    pub tern: PathBuf,
    pub mosquitto: PathBuf,
    pub out: PathBuf,
    pub docs: Option<PathBuf>,
    pub duration: Option<f64>,
}

const BROKERS: [&str; 2] = ["tern", "mosquitto"];
/// A load-generator run that has not finished by then is killed (every scenario bounds
/// itself far below this).
pub(crate) const LOAD_TIMEOUT: Duration = Duration::from_secs(240);

pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) struct Broker {
    child: Child,
    pub(crate) pid: u32,
    pub(crate) addr: String,
    /// Tern's Prometheus endpoint (host:port), if any
    pub(crate) metrics: Option<String>,
}

/// Tern's drop counters (`tern_messages_dropped_total{reason=...}`) from its metrics
/// endpoint, so a loss seen by the subscriber can be attributed; its storage counters
/// (group commits, syncs, operations, commit time); and how often it paused a publisher
/// because a queue it fills was 3/4 full (`tern_backpressure_pauses_total`, None when the
/// broker has no such counter).
fn scrape_metrics(addr: &str) -> Option<(Value, Value, Option<f64>)> {
    let body = metrics_body(addr)?;
    let mut m = serde_json::Map::new();
    let mut st = serde_json::Map::new();
    let mut pauses = None;
    for l in body.lines() {
        if let Some(v) = l
            .strip_prefix("tern_backpressure_pauses_total ")
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            pauses = Some(v);
        }
        if let Some(rest) = l.strip_prefix("tern_messages_dropped_total") {
            let (labels, v) = rest.rsplit_once(' ')?;
            if let Ok(v) = v.parse::<f64>() {
                m.insert(labels.to_string(), json!(v));
            }
        }
        for (name, key) in [
            ("tern_storage_commits_total ", "commits"),
            ("tern_storage_syncs_total ", "syncs"),
            ("tern_storage_ops_total ", "ops"),
            ("tern_storage_commit_seconds_sum ", "commit_seconds_sum"),
            ("tern_storage_commit_seconds_count ", "commit_seconds_count"),
        ] {
            if let Some(v) = l
                .strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
            {
                st.insert(key.into(), json!(v));
            }
        }
    }
    Some((Value::Object(m), Value::Object(st), pauses))
}

/// The text of Tern's Prometheus endpoint at `addr` (bounded: 5 s per read).
pub(crate) fn metrics_body(addr: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The storage a scenario runs with: `durable-q1-MODE` uses Tern's durability MODE (and
/// Mosquitto's persistence unless MODE is memory); every other scenario runs in memory.
fn durability_of(scenario: &str) -> &str {
    scenario.strip_prefix("durable-q1-").unwrap_or("memory")
}

/// Bytes in the files under `dir` (0 when it does not exist).
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A fresh, empty directory (an earlier run's is removed).
pub(crate) fn fresh_dir(dir: &Path) -> Result<(), String> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Mosquitto started as root switches to the `mosquitto` user: give it its data directory.
pub(crate) fn chown_to_mosquitto(dir: &Path) {
    // SAFETY: geteuid has no preconditions; getpwnam gets a NUL-terminated name and its
    // result is only read before any other passwd call.
    unsafe {
        if libc::geteuid() != 0 {
            return;
        }
        let pw = libc::getpwnam(c"mosquitto".as_ptr());
        if !pw.is_null() {
            let _ = std::os::unix::fs::chown(dir, Some((*pw).pw_uid), Some((*pw).pw_gid));
        }
    }
}

impl Broker {
    /// SIGTERM, then SIGKILL after 10 s; what went wrong, if anything.
    pub(crate) fn stop(mut self) -> Option<String> {
        let early = match self.child.try_wait() {
            Ok(Some(st)) => Some(format!("broker exited during the run: {st}")),
            _ => None,
        };
        if early.is_none() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            return Some("broker ignored SIGTERM for 10 s; killed".into());
        }
        early
    }
}

/// Run the brokers under the machine's hard open-file limit (the load generator raises its
/// own soft limit itself).
pub(crate) fn limited(bin: &Path, hard: u64) -> Command {
    if Path::new("/usr/bin/prlimit").exists() {
        let mut c = Command::new("/usr/bin/prlimit");
        c.arg(format!("--nofile={hard}:{hard}")).arg("--").arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// `extra`: appended to tern.toml (the bridge scenarios' `[[bridges]]`).
pub(crate) fn start_tern(
    a: &RunArgs,
    tmp: &Path,
    log: &Path,
    hard: u64,
    durability: &str,
    data: &Path,
    extra: &str,
) -> Result<Broker, String> {
    let (port, mport) = (
        free_port().map_err(|e| e.to_string())?,
        free_port().map_err(|e| e.to_string())?,
    );
    let conf = tmp.join("tern.toml");
    let text = format!(
        r#"# written by tern-bench: settings equivalent to mosquitto.conf beside it
[listeners.tcp]
bind = "127.0.0.1:{port}"

[metrics]
bind = "127.0.0.1:{mport}"

[storage]
dir = "{}"
durability = "{durability}"

[auth]
allow_anonymous = true

[limits]
max_queued_messages = 1000000
max_queued_bytes = 1073741824
max_queued_messages_persistent = 1000000
max_queued_bytes_persistent = 1073741824
max_inflight = 1024
max_connections = 1000000

# Shared subscription groups buffer as much as a Mosquitto client queue does here.
[shared]
max_queued_messages = 1000000
max_queued_bytes = 1073741824

[log]
level = "warn"
{extra}"#,
        data.display()
    );
    std::fs::write(&conf, text).map_err(|e| e.to_string())?;
    let logf = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let mut child = limited(&a.tern, hard)
        .arg("--config")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", a.tern.display()))?;
    let pid = child.id();
    let stdout = child
        .stdout
        .take()
        .ok_or("the broker's stdout was not piped")?;
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
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => {
            let field = |k: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .map(String::from)
            };
            let Some(addr) = field("tcp=") else {
                return Err(format!("unexpected ready line: {line}"));
            };
            Ok(Broker {
                child,
                pid,
                addr,
                metrics: field("metrics="),
            })
        }
        Err(_) => {
            let b = Broker {
                child,
                pid,
                addr: String::new(),
                metrics: None,
            };
            let _ = b.stop();
            Err(format!(
                "tern did not print its ready line (log: {})",
                log.display()
            ))
        }
    }
}

/// `persist`: a data directory for `persistence true` (None: `persistence false`).
fn start_mosquitto(
    a: &RunArgs,
    tmp: &Path,
    log: &Path,
    hard: u64,
    persist: Option<&Path>,
) -> Result<Broker, String> {
    spawn_mosquitto(
        a,
        &MosquittoSpec {
            conf: tmp.join("mosquitto.conf"),
            port: free_port().map_err(|e| e.to_string())?,
            persist,
            inflight: 1024,
            extra: String::new(),
            wait_listening: true,
        },
        log,
        hard,
    )
}

/// One Mosquitto process: the settings of the comparison (`mosquitto.conf` in
/// docs/benchmarks.md) with these differences.
pub(crate) struct MosquittoSpec<'a> {
    /// Where its configuration is written.
    pub conf: PathBuf,
    /// Its one listener, on 127.0.0.1.
    pub port: u16,
    /// A data directory for `persistence true` (None: `persistence false`).
    pub persist: Option<&'a Path>,
    /// `max_inflight_messages`.
    pub inflight: u32,
    /// Appended to the configuration (a bridge's `connection` section).
    pub extra: String,
    /// Return only once it accepts TCP connections (at most 10 s); false: return at once.
    pub wait_listening: bool,
}

pub(crate) fn spawn_mosquitto(
    a: &RunArgs,
    spec: &MosquittoSpec,
    log: &Path,
    hard: u64,
) -> Result<Broker, String> {
    let port = spec.port;
    let persistence = match spec.persist {
        None => "persistence false\n".to_string(),
        Some(dir) => {
            chown_to_mosquitto(dir);
            // Mosquitto's usual durable setting: it writes its whole state to
            // mosquitto.db every autosave_interval seconds (1800 is the default) and at
            // shutdown, never per message.
            format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1800\n",
                dir.display()
            )
        }
    };
    let (inflight, extra) = (spec.inflight, &spec.extra);
    let text = format!(
        "# written by tern-bench: settings equivalent to tern.toml beside it\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         {persistence}\
         max_queued_messages 1000000\n\
         max_queued_bytes 1073741824\n\
         max_inflight_messages {inflight}\n\
         max_connections -1\n\
         set_tcp_nodelay true\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         {extra}"
    );
    std::fs::write(&spec.conf, text).map_err(|e| e.to_string())?;
    let logf = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let child = limited(&a.mosquitto, hard)
        .arg("-c")
        .arg(&spec.conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", a.mosquitto.display()))?;
    let pid = child.id();
    let addr = format!("127.0.0.1:{port}");
    let mut b = Broker {
        child,
        pid,
        addr,
        metrics: None,
    };
    if !spec.wait_listening {
        return Ok(b);
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if std::net::TcpStream::connect(&b.addr).is_ok() {
            return Ok(b);
        }
        if let Ok(Some(st)) = b.child.try_wait() {
            return Err(format!(
                "mosquitto exited at start: {st} (log: {})",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    b.addr.clear();
    let _ = b.stop();
    Err("mosquitto did not start listening".into())
}

/// Run the load generator for one scenario against one broker; its last stdout line is the
/// JSON result.
fn load(a: &RunArgs, scenario: &str, broker: &str, b: &Broker) -> Result<Value, String> {
    let mut args: Vec<String> = ["load", "--scenario", scenario, "--broker", broker]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--addr".into(), b.addr.clone()]);
    args.extend(["--broker-pid".into(), b.pid.to_string()]);
    if a.quick {
        args.push("--quick".into());
    }
    if let Some(d) = a.duration {
        args.extend(["--duration".into(), d.to_string()]);
    }
    load_with(&args)
}

/// Run this executable with `args` (a `load` command line), killed after LOAD_TIMEOUT; its
/// last stdout line that is a JSON object is the result.
pub(crate) fn load_with(args: &[String]) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(args);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or("the load generator's stdout was not piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let out = match rx.recv_timeout(LOAD_TIMEOUT) {
        Ok(s) => s,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "load generator still running after {LOAD_TIMEOUT:?}; killed"
            ));
        }
    };
    let st = child.wait().map_err(|e| e.to_string())?;
    let line = out.lines().rev().find(|l| l.starts_with('{'));
    match line {
        Some(l) => serde_json::from_str(l).map_err(|e| format!("bad JSON from load: {e}")),
        None => Err(format!("load generator printed no result ({st})")),
    }
}

pub(crate) fn num(v: &Value, k: &str) -> Option<f64> {
    v.get(k)?.as_f64().filter(|x| x.is_finite())
}

fn progress(v: &Value) -> String {
    let f = |k: &str| num(v, k).unwrap_or(f64::NAN);
    let mut s = match v["scenario"].as_str().unwrap_or("") {
        "conns" => format!(
            "{} conn/s (broker {:.2} cores, CPUs {:.0}% idle), {:.2} KiB/conn at {}, max {} \
             ({:.2} KiB/conn, {} conn/s 256 at once)",
            fmt_num(f("connect_rate")),
            f("connect_broker_cores"),
            f("connect_cpu_idle_pct"),
            f("kib_per_conn"),
            fmt_num(f("idle_opened")),
            fmt_num(f("max_opened")),
            f("kib_per_conn_max"),
            fmt_num(f("max_phase_rate"))
        ),
        "burst-q1" => format!(
            "publish {} msg/s, drain {:.2} s (ideal {:.2}), per consumer {}, lost {}, \
             dups {}, peak RSS {:.1} MiB",
            fmt_num(f("publish_rate")),
            f("drain_s"),
            f("ideal_drain_s"),
            v["per_consumer"],
            f("lost"),
            f("duplicates"),
            f("peak_rss_mib"),
        ),
        sc if sc.starts_with("durable-") => {
            let mut s = format!(
                "publish {} msg/s ({} acked in {:.2} s), drain {} msg/s ({:.2} s, first after {:.1} ms), \
                 lost {}, dups {}, peak RSS {:.1} MiB (offline {:.1})",
                fmt_num(f("publish_rate")),
                fmt_num(f("acked")),
                f("publish_s"),
                fmt_num(f("drain_rate")),
                f("drain_s"),
                f("first_delivery_ms"),
                f("lost"),
                f("duplicates"),
                f("peak_rss_mib"),
                f("rss_offline_mib"),
            );
            let st = &v["broker_storage"];
            if let Some(c) = num(st, "commits").filter(|&c| c > 0.0) {
                let _ = write!(
                    s,
                    ", {} commits ({} synced, mean {:.2} ms)",
                    fmt_num(c),
                    fmt_num(num(st, "syncs").unwrap_or(f64::NAN)),
                    num(st, "commit_seconds_sum").unwrap_or(f64::NAN) * 1000.0
                        / num(st, "commit_seconds_count").unwrap_or(f64::NAN)
                );
            }
            s
        }
        _ => format!(
            "{} msg/s, p50 {} p99 {}, lost {}",
            fmt_num(f("rate")),
            fmt_us(f("p50_us")),
            fmt_us(f("p99_us")),
            f("lost")
        ),
    };
    let _ = write!(
        s,
        " (broker {:.2} cores, client {:.2} cores)",
        f("broker_cpu_cores"),
        f("client_cpu_cores")
    );
    if v["client_saturated"].as_bool() == Some(true) {
        s.push_str(" [client-saturated]");
    }
    if let Some(d) = v["broker_dropped"].as_object() {
        for (k, n) in d {
            if n.as_f64().unwrap_or(0.0) > 0.0 {
                let _ = write!(s, " [broker dropped{k}: {n}]");
            }
        }
    }
    if let Some(n) = num(v, "broker_backpressure_pauses").filter(|&n| n > 0.0) {
        let _ = write!(s, " [broker paused publishers {n} times]");
    }
    if v["ok"].as_bool() != Some(true) {
        let _ = write!(s, " ERRORS: {}", v["errors"]);
    }
    s
}

pub fn run(a: RunArgs) -> i32 {
    let (_, hard) = stats::raise_nofile();
    let out = &a.out;
    let tmp = out.join("tmp");
    let logs = out.join("logs");
    for d in [out, &tmp, &logs] {
        if let Err(e) = std::fs::create_dir_all(d) {
            eprintln!("tern-bench: cannot create {}: {e}", d.display());
            return 1;
        }
    }
    let machine = machine_info(&a);
    eprintln!(
        "tern-bench: {} rounds of {:?} on {} CPUs ({}), fd limit {} (hard), load average {}",
        a.rounds,
        a.scenarios,
        machine["nproc"],
        machine["cpu"].as_str().unwrap_or("?"),
        hard,
        machine["loadavg"].as_str().unwrap_or("?")
    );
    let mut runs: Vec<Value> = Vec::new();
    for sc in &a.scenarios {
        for round in 1..=a.rounds {
            for broker in BROKERS {
                if crate::bridge::is_bridge(sc) {
                    let mut v = crate::bridge::run_one(&a, sc, broker, round, &tmp, &logs, hard);
                    v["round"] = json!(round);
                    let mut line = crate::bridge::progress(&v);
                    if v["ok"].as_bool() != Some(true) {
                        let _ = write!(line, " ERRORS: {} {}", v["errors"], v["broker_stop"]);
                    }
                    eprintln!("[{sc} {round}/{}] {broker:9} {line}", a.rounds);
                    runs.push(v);
                    continue;
                }
                let log = logs.join(format!("{broker}-{sc}-{round}.log"));
                let durability = durability_of(sc);
                // Durable scenarios get a fresh data directory per run; the others keep
                // the shared (unused) one of the in-memory configuration.
                let data = sc
                    .starts_with("durable-")
                    .then(|| tmp.join(format!("{broker}-data-{sc}-{round}")));
                let persist = data.as_deref().filter(|_| durability != "memory");
                let started =
                    data.as_deref()
                        .map_or(Ok(()), fresh_dir)
                        .and_then(|()| match broker {
                            "tern" => {
                                let dir = data.clone().unwrap_or_else(|| tmp.join("tern-data"));
                                start_tern(&a, &tmp, &log, hard, durability, &dir, "")
                            }
                            _ => start_mosquitto(&a, &tmp, &log, hard, persist),
                        });
                let mut v = match started {
                    Ok(b) => {
                        let r = load(&a, sc, broker, &b);
                        let scraped = b.metrics.as_deref().and_then(scrape_metrics);
                        let stop = b.stop();
                        let mut v = r.unwrap_or_else(|e| {
                            json!({"ok": false, "errors": [e], "scenario": sc, "broker": broker})
                        });
                        if let Some((d, st, pauses)) = scraped {
                            v["broker_dropped"] = d;
                            if let Some(n) = pauses {
                                v["broker_backpressure_pauses"] = json!(n);
                            }
                            if sc.starts_with("durable-") {
                                v["broker_storage"] = st;
                            }
                        }
                        if let Some(e) = stop {
                            v["ok"] = json!(false);
                            v["broker_stop"] = json!(e);
                        }
                        v
                    }
                    Err(e) => json!({"ok": false, "errors": [e], "scenario": sc, "broker": broker}),
                };
                v["durability"] = json!(durability);
                if let Some(dir) = &data {
                    // What the broker left on disk (after the drain and its shutdown); the
                    // directory is removed unless the run went wrong.
                    v["store_bytes_after"] = json!(dir_bytes(dir));
                    if v["ok"].as_bool() == Some(true) {
                        let _ = std::fs::remove_dir_all(dir);
                    } else {
                        v["store_dir"] = json!(dir.display().to_string());
                    }
                }
                v["round"] = json!(round);
                eprintln!("[{sc} {round}/{}] {broker:9} {}", a.rounds, progress(&v));
                runs.push(v);
            }
        }
    }
    let (table, rows) = summarize(&a, &runs);
    println!("\n{table}");
    let full = !a.quick
        && a.duration.is_none()
        && a.rounds >= 3
        && SCENARIOS.iter().all(|s| a.scenarios.iter().any(|x| x == s));
    let md = markdown(&machine, &a, &table);
    let results = json!({
        "machine": machine,
        "rounds": a.rounds,
        "quick": a.quick,
        "full_run": full,
        "scenarios": a.scenarios,
        "rows": rows,
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
        "tern-bench: wrote {} and {}",
        json_path.display(),
        md_path.display()
    );
    if let (true, Some(docs)) = (full, &a.docs) {
        match update_docs(docs, &md) {
            Ok(()) => eprintln!("tern-bench: full run; updated {}", docs.display()),
            Err(e) => eprintln!("tern-bench: could not update {}: {e}", docs.display()),
        }
    }
    0
}

const BEGIN: &str = "<!-- tern-bench:results:begin -->";
const END: &str = "<!-- tern-bench:results:end -->";

fn update_docs(path: &Path, md: &str) -> std::io::Result<()> {
    let doc = std::fs::read_to_string(path)?;
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        return Err(std::io::Error::other("result markers not found"));
    };
    let new = format!("{}{BEGIN}\n{md}{}", &doc[..b], &doc[e..]);
    std::fs::write(path, new)
}

pub(crate) fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).to_string();
            if s.trim().is_empty() {
                s = String::from_utf8_lossy(&o.stderr).to_string();
            }
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

fn machine_info(a: &RunArgs) -> Value {
    let mut m = machine_common(&a.tern);
    m["mosquitto_version"] = json!(sh(&a.mosquitto.to_string_lossy(), &["-h"]));
    m
}

/// The machine, the Tern build and the time (what both drivers record).
pub(crate) fn machine_common(tern: &Path) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse::<u64>().ok())
        .map(|k| format!("{:.1} GiB", k as f64 / 1048576.0))
        .unwrap_or_default();
    let mut commit = sh("git", &["rev-parse", "--short", "HEAD"]);
    if !sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        commit.push_str(" (with uncommitted changes)");
    }
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory": mem,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "tern_commit": commit,
        "tern_version": sh(&tern.to_string_lossy(), &["--version"]),
        "date": sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "fd_limit_hard": stats::nofile().1,
    })
}

#[derive(Clone, Copy)]
enum Target {
    RatioAtLeast(f64),
    RatioAtMost(f64),
    TernAtMost(f64),
    Info,
}

struct RowDef {
    scenario: &'static str,
    metric: &'static str,
    key: &'static str,
    target: Target,
}

const ROWS: &[RowDef] = &[
    RowDef {
        scenario: "fanin-q0",
        metric: "delivered msg/s",
        key: "rate",
        target: Target::RatioAtLeast(3.0),
    },
    RowDef {
        scenario: "fanin-q1",
        metric: "delivered msg/s",
        key: "rate",
        target: Target::RatioAtLeast(4.0),
    },
    RowDef {
        scenario: "fanin-q2",
        metric: "delivered msg/s",
        key: "rate",
        target: Target::RatioAtLeast(20.0),
    },
    RowDef {
        scenario: "fanout-q0",
        metric: "delivered msg/s",
        key: "rate",
        target: Target::RatioAtLeast(15.0),
    },
    RowDef {
        scenario: "pairs-q1",
        metric: "delivered msg/s",
        key: "rate",
        target: Target::RatioAtLeast(8.0),
    },
    RowDef {
        scenario: "fanin-q0-open",
        metric: "delivered msg/s, open loop",
        key: "rate",
        target: Target::RatioAtLeast(1.0),
    },
    RowDef {
        scenario: "fanin-q0-open",
        metric: "loss %, open loop",
        key: "loss_pct",
        target: Target::Info,
    },
    RowDef {
        scenario: "latency-q1",
        metric: "latency p50",
        key: "p50_us",
        target: Target::RatioAtMost(0.8),
    },
    RowDef {
        scenario: "latency-q1",
        metric: "latency p99",
        key: "p99_us",
        target: Target::RatioAtMost(0.8),
    },
    RowDef {
        scenario: "latency-q1",
        metric: "latency p99.9",
        key: "p999_us",
        target: Target::Info,
    },
    RowDef {
        scenario: "conns",
        metric: "KiB broker RSS per idle conn (10k)",
        key: "kib_per_conn",
        target: Target::TernAtMost(1.0),
    },
    RowDef {
        scenario: "conns",
        metric: "connections/s",
        key: "connect_rate",
        target: Target::RatioAtLeast(1.2),
    },
    RowDef {
        scenario: "conns",
        metric: "connections/s, 256 at once, 10k to the fd limit",
        key: "max_phase_rate",
        target: Target::Info,
    },
    RowDef {
        scenario: "conns",
        metric: "connections held at fd limit",
        key: "max_opened",
        target: Target::Info,
    },
    RowDef {
        scenario: "conns",
        metric: "KiB per conn at that count",
        key: "kib_per_conn_max",
        target: Target::TernAtMost(1.0),
    },
    RowDef {
        scenario: "burst-q1",
        metric: "broker peak RSS MiB",
        key: "peak_rss_mib",
        target: Target::Info,
    },
    RowDef {
        scenario: "burst-q1",
        metric: "drain time s (ideal 5.0)",
        key: "drain_s",
        target: Target::Info,
    },
    RowDef {
        scenario: "burst-q1",
        metric: "drain time ÷ ideal",
        key: "drain_vs_ideal",
        target: Target::Info,
    },
    RowDef {
        scenario: "burst-q1",
        metric: "publish msg/s (acked)",
        key: "publish_rate",
        target: Target::Info,
    },
    RowDef {
        scenario: "burst-q1",
        metric: "msgs per consumer, min (even 25,000)",
        key: "consumer_min",
        target: Target::Info,
    },
    RowDef {
        scenario: "burst-q1",
        metric: "msgs per consumer, max",
        key: "consumer_max",
        target: Target::Info,
    },
    RowDef {
        scenario: "burst-q1",
        metric: "messages lost",
        key: "lost",
        target: Target::Info,
    },
    RowDef {
        scenario: "burst-q1",
        metric: "duplicates",
        key: "duplicates",
        target: Target::Info,
    },
    RowDef {
        scenario: "durable-q1-memory",
        metric: "publish msg/s (acked, sub offline)",
        key: "publish_rate",
        target: Target::Info,
    },
    RowDef {
        scenario: "durable-q1-memory",
        metric: "drain msg/s (after reconnect)",
        key: "drain_rate",
        target: Target::Info,
    },
    RowDef {
        scenario: "durable-q1-memory",
        metric: "broker peak RSS MiB",
        key: "peak_rss_mib",
        target: Target::Info,
    },
    RowDef {
        scenario: "durable-q1-memory",
        metric: "broker CPU cores, publish phase",
        key: "publish_broker_cpu_cores",
        target: Target::Info,
    },
    RowDef {
        scenario: "durable-q1-os",
        metric: "publish msg/s (acked, sub offline)",
        key: "publish_rate",
        target: Target::Info,
    },
    RowDef {
        scenario: "durable-q1-os",
        metric: "drain msg/s (after reconnect)",
        key: "drain_rate",
        target: Target::RatioAtLeast(1.5),
    },
    RowDef {
        scenario: "durable-q1-os",
        metric: "broker peak RSS MiB",
        key: "peak_rss_mib",
        target: Target::Info,
    },
    RowDef {
        scenario: "durable-q1-os",
        metric: "broker CPU cores, publish phase",
        key: "publish_broker_cpu_cores",
        target: Target::Info,
    },
    RowDef {
        scenario: "durable-q1-fsync",
        metric: "publish msg/s (acked, sub offline)",
        key: "publish_rate",
        target: Target::Info,
    },
    RowDef {
        scenario: "durable-q1-fsync",
        metric: "drain msg/s (after reconnect)",
        key: "drain_rate",
        target: Target::Info,
    },
    RowDef {
        scenario: "durable-q1-fsync",
        metric: "broker peak RSS MiB",
        key: "peak_rss_mib",
        target: Target::Info,
    },
    RowDef {
        scenario: "durable-q1-fsync",
        metric: "broker CPU cores, publish phase",
        key: "publish_broker_cpu_cores",
        target: Target::Info,
    },
];

/// The rows of each bridge scenario (metric, key); no targets yet.
const BRIDGE_ROWS: &[(&str, &str)] = &[
    (
        "drain msg/s (first to last message at the remote)",
        "drain_rate",
    ),
    ("first message, s after the remote started", "first_after_s"),
    ("last message, s after the remote started", "total_s"),
    ("edge peak RSS MiB during the drain", "peak_rss_mib"),
    ("edge CPU cores during the drain", "broker_cpu_cores"),
    ("remote CPU cores during the drain", "remote_cpu_cores"),
    ("backlog publish msg/s (acked, bridge down)", "publish_rate"),
    ("duplicates at the remote", "duplicates"),
];

/// Durable QoS 1 against in-memory QoS 1, each broker against itself: (scenario, metric,
/// target on Tern's ratio). The issue's target: durable ("os") publishing at least half as
/// fast as in memory.
const DURABLE_RATIOS: &[(&str, &str, Option<f64>)] = &[
    (
        "durable-q1-os",
        "publish msg/s ÷ same broker's durable-q1-memory",
        Some(0.5),
    ),
    (
        "durable-q1-fsync",
        "publish msg/s ÷ same broker's durable-q1-memory",
        None,
    ),
];

const QOS1_SCENARIOS: &[&str] = &[
    "fanin-q1",
    "fanin-q2",
    "pairs-q1",
    "latency-q1",
    "burst-q1",
    "durable-q1-memory",
    "durable-q1-os",
    "durable-q1-fsync",
    "bridge-drain",
    "bridge-drain-v5",
];

pub(crate) fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    if x.abs() >= 1000.0 {
        let s = format!("{:.0}", x);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// Keys whose figures are message counts: shown without decimals (a median of an even
/// number of runs may still end in .5).
const COUNT_KEYS: &[&str] = &["lost", "duplicates", "consumer_min", "consumer_max"];

pub(crate) fn fmt_count(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1000.0 {
        format!("{x:.0}")
    } else {
        fmt_num(x)
    }
}

pub(crate) fn fmt_us(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x >= 1000.0 {
        format!("{} ms", fmt_num(x / 1000.0))
    } else {
        format!("{} µs", fmt_num(x))
    }
}

fn runs_of<'a>(runs: &'a [Value], sc: &str, broker: &str) -> Vec<&'a Value> {
    runs.iter()
        .filter(|r| r["scenario"] == sc && r["broker"] == broker)
        .collect()
}

fn med(runs: &[&Value], key: &str) -> f64 {
    let mut v: Vec<f64> = runs.iter().filter_map(|r| num(r, key)).collect();
    median(&mut v)
}

/// Text table (markdown pipe syntax, aligned) plus the rows as JSON.
fn summarize(a: &RunArgs, runs: &[Value]) -> (String, Vec<Value>) {
    let header = [
        "scenario",
        "metric (median)",
        "Tern",
        "Mosquitto",
        "Tern/Mosq",
        "target",
        "",
        "notes",
    ];
    let mut rows: Vec<[String; 8]> = Vec::new();
    let mut json_rows = Vec::new();
    let bridge_rows: Vec<RowDef> = SCENARIOS
        .iter()
        .filter(|s| crate::bridge::is_bridge(s))
        .flat_map(|&scenario| {
            BRIDGE_ROWS.iter().map(move |&(metric, key)| RowDef {
                scenario,
                metric,
                key,
                target: Target::Info,
            })
        })
        .collect();
    for d in ROWS.iter().chain(&bridge_rows) {
        if !a.scenarios.iter().any(|s| s == d.scenario) {
            continue;
        }
        let t = runs_of(runs, d.scenario, "tern");
        let m = runs_of(runs, d.scenario, "mosquitto");
        let (tv, mv) = (med(&t, d.key), med(&m, d.key));
        let ratio = tv / mv;
        let (target, status) = match d.target {
            Target::RatioAtLeast(x) => (format!("≥ {x}x"), Some(ratio >= x)),
            Target::RatioAtMost(x) => (format!("≤ {x}x"), Some(ratio <= x)),
            Target::TernAtMost(x) => (format!("Tern ≤ {x}"), Some(tv <= x)),
            Target::Info => (String::new(), None),
        };
        let fmt = |x: f64| {
            if d.key.ends_with("_us") {
                fmt_us(x)
            } else if COUNT_KEYS.contains(&d.key) {
                fmt_count(x)
            } else {
                fmt_num(x)
            }
        };
        let notes = notes(&t, &m, d.key);
        let status_s = match status {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        };
        json_rows.push(json!({
            "scenario": d.scenario, "metric": d.metric, "key": d.key,
            "tern": tv, "mosquitto": mv, "ratio": ratio, "target": target,
            "met": status, "notes": notes,
        }));
        rows.push([
            d.scenario.into(),
            d.metric.into(),
            fmt(tv),
            fmt(mv),
            if ratio.is_finite() {
                format!("{ratio:.2}x")
            } else {
                "-".into()
            },
            target,
            status_s.into(),
            notes,
        ]);
    }
    // Durable against in-memory publishing, each broker against itself.
    for &(sc, metric, target) in DURABLE_RATIOS {
        let base = "durable-q1-memory";
        if !a.scenarios.iter().any(|s| s == sc) || !a.scenarios.iter().any(|s| s == base) {
            continue;
        }
        let of = |s: &str, b: &str| med(&runs_of(runs, s, b), "publish_rate");
        let tv = of(sc, "tern") / of(base, "tern");
        let mv = of(sc, "mosquitto") / of(base, "mosquitto");
        let status = target.map(|x| tv >= x);
        let target_s = target.map(|x| format!("Tern ≥ {x}x")).unwrap_or_default();
        let ratio_s = |x: f64| {
            if x.is_finite() {
                format!("{x:.2}x")
            } else {
                "-".into()
            }
        };
        json_rows.push(json!({
            "scenario": sc, "metric": metric, "key": "publish_rate_vs_memory",
            "tern": tv, "mosquitto": mv, "target": target_s, "met": status, "notes": "",
        }));
        rows.push([
            sc.into(),
            metric.into(),
            ratio_s(tv),
            ratio_s(mv),
            "-".into(),
            target_s,
            match status {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            }
            .into(),
            String::new(),
        ]);
    }
    // QoS >= 1 loss over every run of every QoS 1/2 scenario that ran.
    let selected: Vec<&str> = QOS1_SCENARIOS
        .iter()
        .copied()
        .filter(|s| a.scenarios.iter().any(|x| x == s))
        .collect();
    if !selected.is_empty() {
        let lost = |b: &str| -> (f64, usize) {
            let rs: Vec<&Value> = runs
                .iter()
                .filter(|r| r["broker"] == b && selected.iter().any(|s| r["scenario"] == *s))
                .collect();
            (
                rs.iter().filter_map(|r| num(r, "lost")).sum(),
                rs.iter().filter(|r| num(r, "lost").is_none()).count(),
            )
        };
        let (tl, tmissing) = lost("tern");
        let (ml, _) = lost("mosquitto");
        let ok = tl == 0.0 && tmissing == 0;
        let notes = if tmissing > 0 {
            format!("{tmissing} Tern runs without a result")
        } else {
            String::new()
        };
        json_rows.push(json!({
            "scenario": "QoS>=1 (all)", "metric": "messages lost, sum of all runs",
            "tern": tl, "mosquitto": ml, "target": "0", "met": ok, "notes": notes,
        }));
        rows.push([
            "QoS≥1 (all)".into(),
            "messages lost, all runs".into(),
            fmt_num(tl),
            fmt_num(ml),
            "-".into(),
            "Tern = 0".into(),
            if ok { "met" } else { "MISSED" }.into(),
            notes,
        ]);
    }
    let mut out = String::new();
    render(&mut out, &header.map(String::from), &rows);
    // Resource table: what each broker and the load generator spent.
    let rheader = [
        "scenario",
        "broker",
        "msg/s",
        "p50",
        "p99",
        "p99.9",
        "max",
        "broker CPU",
        "client CPU",
        "msgs/broker CPU-s",
        "lost",
        "client-bound",
    ];
    let mut rrows: Vec<[String; 12]> = Vec::new();
    for sc in &a.scenarios {
        for b in BROKERS {
            let rs = runs_of(runs, sc, b);
            if rs.is_empty() {
                continue;
            }
            let sat = rs
                .iter()
                .filter(|r| r["client_saturated"].as_bool() == Some(true))
                .count();
            let failed = rs
                .iter()
                .filter(|r| r["ok"].as_bool() != Some(true))
                .count();
            let mut lost = fmt_num(rs.iter().filter_map(|r| num(r, "lost")).sum());
            if failed > 0 {
                let _ = write!(lost, " ({failed} failed)");
            }
            rrows.push([
                sc.clone(),
                b.into(),
                fmt_num(med(&rs, "rate")),
                fmt_us(med(&rs, "p50_us")),
                fmt_us(med(&rs, "p99_us")),
                fmt_us(med(&rs, "p999_us")),
                fmt_us(med(&rs, "max_us")),
                format!("{:.2} cores", med(&rs, "broker_cpu_cores")),
                format!("{:.2} cores", med(&rs, "client_cpu_cores")),
                fmt_num(med(&rs, "msgs_per_broker_cpu_s")),
                lost,
                format!("{sat}/{}", rs.len()),
            ]);
        }
    }
    out.push('\n');
    render(&mut out, &rheader.map(String::from), &rrows);
    (out, json_rows)
}

/// A connect phase during which this share of all CPUs stayed idle, with the broker below 0.9
/// of a core, measured the handshake's round trip rather than either broker's limit.
const LATENCY_BOUND_IDLE_PCT: f64 = 25.0;

fn notes(t: &[&Value], m: &[&Value], key: &str) -> String {
    let mut n = Vec::new();
    for (name, rs) in [("Tern", t), ("Mosquitto", m)] {
        let failed = rs
            .iter()
            .filter(|r| r["ok"].as_bool() != Some(true))
            .count();
        if failed > 0 {
            n.push(format!("{name}: {failed}/{} runs had errors", rs.len()));
        }
        let sat = rs
            .iter()
            .filter(|r| r["client_saturated"].as_bool() == Some(true))
            .count();
        if sat > 0 && key == "rate" {
            n.push(format!(
                "{name}: load generator ≥ {:.0}% of a core in {sat}/{} runs (figure may be the client's)",
                90.0,
                rs.len()
            ));
        }
    }
    if key == "connect_rate" {
        for (name, rs) in [("Tern", t), ("Mosquitto", m)] {
            let mut idle: Vec<f64> = rs
                .iter()
                .filter_map(|r| num(r, "connect_cpu_idle_pct"))
                .collect();
            let mut broker: Vec<f64> = rs
                .iter()
                .filter_map(|r| num(r, "connect_broker_cores"))
                .collect();
            if idle.is_empty() || broker.is_empty() {
                continue;
            }
            let (idle, broker) = (stats::median(&mut idle), stats::median(&mut broker));
            if idle >= LATENCY_BOUND_IDLE_PCT && broker < 0.9 {
                n.push(format!(
                    "{name}: CPUs {idle:.0}% idle, broker {broker:.2} cores (handshake-latency-bound)"
                ));
            }
        }
    }
    if key == "publish_rate" || key == "drain_rate" {
        for (name, rs) in [("Tern", t), ("Mosquitto", m)] {
            let dups: f64 = rs.iter().filter_map(|r| num(r, "duplicates")).sum();
            if dups > 0.0 && key == "drain_rate" {
                n.push(format!("{name}: {} duplicates", fmt_num(dups)));
            }
            let lost: f64 = rs.iter().filter_map(|r| num(r, "lost")).sum();
            if lost > 0.0 {
                n.push(format!("{name} lost {}", fmt_num(lost)));
            }
        }
    }
    if key == "publish_rate" {
        let pauses: f64 = t
            .iter()
            .filter_map(|r| num(r, "broker_backpressure_pauses"))
            .sum();
        if pauses > 0.0 {
            n.push(format!(
                "Tern paused publishers {} times in {} runs (back-pressure: a queue 3/4 full)",
                fmt_count(pauses),
                t.len()
            ));
        }
    }
    if key == "rate" || key == "loss_pct" {
        let lost: f64 = t.iter().filter_map(|r| num(r, "lost")).sum();
        let is_q0 = t.first().and_then(|r| num(r, "qos")) == Some(0.0);
        if lost > 0.0 && !is_q0 {
            n.push(format!("Tern lost {lost}"));
        }
    }
    if key == "rate" || key == "loss_pct" || key == "drain_s" {
        let dropped: f64 = t
            .iter()
            .filter_map(|r| r["broker_dropped"].as_object())
            .flat_map(|o| o.values().filter_map(Value::as_f64))
            .sum();
        if dropped > 0.0 {
            n.push(format!(
                "Tern's metrics: {} dropped (queue full)",
                fmt_num(dropped)
            ));
        }
    }
    if t.is_empty() || m.is_empty() {
        n.push("no runs".into());
    }
    n.join("; ")
}

pub(crate) fn render<const N: usize>(out: &mut String, header: &[String; N], rows: &[[String; N]]) {
    let mut w = [0usize; N];
    for r in std::iter::once(header).chain(rows.iter()) {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |out: &mut String, r: &[String; N]| {
        out.push('|');
        for (i, c) in r.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            let _ = write!(out, " {c}{} |", " ".repeat(pad));
        }
        out.push('\n');
    };
    line(out, header);
    out.push('|');
    for wi in w {
        let _ = write!(out, "{}|", "-".repeat(wi + 2));
    }
    out.push('\n');
    for r in rows {
        line(out, r);
    }
}

fn markdown(machine: &Value, a: &RunArgs, table: &str) -> String {
    let s = |k: &str| machine[k].as_str().unwrap_or("?").to_string();
    format!(
        "Run of {date}: {rounds} rounds{quick}, scenarios: {sc}.\n\n\
         - Machine: {nproc} CPUs ({cpu}), {mem}, kernel {kernel}; the brokers and the load \
         generator share these CPUs\n\
         - Tern: commit {commit} ({tv}), release build\n\
         - Mosquitto: {mv}\n\
         - Open-file limit (hard): {fd}; load average at start: {load}\n\n\
         {table}",
        date = s("date"),
        rounds = a.rounds,
        quick = if a.quick { " (quick mode)" } else { "" },
        sc = a.scenarios.join(", "),
        nproc = machine["nproc"],
        cpu = s("cpu"),
        mem = s("memory"),
        kernel = s("kernel"),
        commit = s("tern_commit"),
        tv = s("tern_version"),
        mv = s("mosquitto_version"),
        fd = machine["fd_limit_hard"],
        load = s("loadavg"),
    )
}
