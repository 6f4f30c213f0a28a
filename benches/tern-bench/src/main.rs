//! tern-bench: Tern vs Mosquitto.
//!
//! `tern-bench run` starts each broker in turn and compares them (what `make bench` calls);
//! `tern-bench cluster` compares single-node Tern, a 3-node Tern cluster and nats-server's
//! own MQTT listener on one NATS cluster (`make bench-cluster`);
//! `tern-bench load` runs one scenario against a running broker and prints one JSON line.

mod bridge;
mod cluster;
mod load;
mod mqtt;
mod run;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage:
  tern-bench run [--scenarios \"a b ...\"] [--rounds N] [--quick] [--duration SECS]
                 [--tern PATH] [--mosquitto PATH] [--out DIR] [--docs FILE]
  tern-bench cluster [--rounds N] [--quick] [--duration SECS] [--tern PATH]
                     [--nats-server PATH] [--out DIR] [--docs FILE]
  tern-bench load --scenario NAME --addr HOST:PORT (--broker-pid PID | --broker-pids PID,PID,...)
                  [--sub-addr HOST:PORT] [--persistent] [--broker NAME] [--quick]
                  [--duration SECS]
                  (bridge-drain*: --phase publish|drain and what `run` passes; see bridge.rs)
  tern-bench list";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let mut opts = std::collections::HashMap::new();
    let mut flags = std::collections::HashSet::new();
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        let Some(name) = a.strip_prefix("--") else {
            eprintln!("tern-bench: unexpected argument {a}\n{USAGE}");
            return ExitCode::from(2);
        };
        if name == "quick" || name == "help" || name == "persistent" {
            flags.insert(name.to_string());
            i += 1;
        } else if let Some(v) = args.get(i + 1) {
            opts.insert(name.to_string(), v.clone());
            i += 2;
        } else {
            eprintln!("tern-bench: --{name} needs a value\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    if flags.contains("help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let duration = match opts.get("duration").map(|d| d.parse::<f64>()) {
        None => None,
        Some(Ok(d)) if d > 0.0 && d <= 60.0 => Some(d),
        Some(_) => {
            eprintln!("tern-bench: --duration must be between 0 and 60 seconds");
            return ExitCode::from(2);
        }
    };
    match cmd.as_str() {
        "list" => {
            for s in load::SCENARIOS {
                println!("{s}");
            }
            ExitCode::SUCCESS
        }
        "load" => {
            // --broker-pids: several processes whose CPU is summed (a cluster); --broker-pid:
            // one. The first is the one whose memory is read.
            let pids: Option<Vec<u32>> = match (opts.get("broker-pids"), opts.get("broker-pid")) {
                (Some(list), _) => list
                    .split(',')
                    .filter(|p| !p.trim().is_empty())
                    .map(|p| p.trim().parse().ok())
                    .collect::<Option<Vec<u32>>>()
                    .filter(|v| !v.is_empty()),
                (None, Some(p)) => p.parse().ok().map(|p| vec![p]),
                (None, None) => None,
            };
            let (Some(sc), Some(addr), Some(pids)) = (
                opts.get("scenario"),
                opts.get("addr").and_then(|a| a.parse().ok()),
                pids,
            ) else {
                eprintln!(
                    "tern-bench load: --scenario, --addr and --broker-pid (or --broker-pids) \
                     are required"
                );
                return ExitCode::from(2);
            };
            let sub_addr = match opts.get("sub-addr").map(|a| a.parse()) {
                None => addr,
                Some(Ok(a)) => a,
                Some(Err(_)) => {
                    eprintln!("tern-bench load: --sub-addr must be HOST:PORT");
                    return ExitCode::from(2);
                }
            };
            let o = load::Opts {
                addr,
                sub_addr,
                broker_pid: pids[0],
                broker_pids: pids,
                persistent: flags.contains("persistent"),
                broker: opts
                    .get("broker")
                    .cloned()
                    .unwrap_or_else(|| "broker".into()),
                scenario: sc.clone(),
                quick: flags.contains("quick"),
                duration,
                args: opts.clone(),
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tern-bench: runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let v = rt.block_on(load::run(o));
            println!("{v}");
            // Do not wait for lingering connection tasks.
            rt.shutdown_background();
            ExitCode::SUCCESS
        }
        "run" => {
            let scenarios: Vec<String> = match opts.get("scenarios") {
                Some(s) if !s.trim().is_empty() => s
                    .split([' ', ','])
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect(),
                _ => load::SCENARIOS.iter().map(|s| s.to_string()).collect(),
            };
            if let Some(bad) = scenarios
                .iter()
                .find(|s| !load::SCENARIOS.contains(&s.as_str()))
            {
                eprintln!(
                    "tern-bench: unknown scenario {bad}; known: {}",
                    load::SCENARIOS.join(" ")
                );
                return ExitCode::from(2);
            }
            let quick = flags.contains("quick");
            let rounds = match opts.get("rounds").filter(|r| !r.is_empty()) {
                Some(r) => match r.parse::<usize>() {
                    Ok(n) if (1..=20).contains(&n) => n,
                    _ => {
                        eprintln!("tern-bench: --rounds must be 1..=20");
                        return ExitCode::from(2);
                    }
                },
                None if quick => 1,
                None => 3,
            };
            let path =
                |k: &str, d: &str| PathBuf::from(opts.get(k).map(String::as_str).unwrap_or(d));
            let a = run::RunArgs {
                scenarios,
                rounds,
                quick,
                tern: path("tern", "target/release/tern"),
                mosquitto: path("mosquitto", "/usr/sbin/mosquitto"),
                out: path("out", "target/bench"),
                docs: opts.get("docs").map(PathBuf::from),
                duration,
            };
            ExitCode::from(run::run(a) as u8)
        }
        "cluster" => {
            let quick = flags.contains("quick");
            let rounds = match opts.get("rounds").filter(|r| !r.is_empty()) {
                Some(r) => match r.parse::<usize>() {
                    Ok(n) if (1..=20).contains(&n) => n,
                    _ => {
                        eprintln!("tern-bench: --rounds must be 1..=20");
                        return ExitCode::from(2);
                    }
                },
                None if quick => 1,
                None => 3,
            };
            let path =
                |k: &str, d: &str| PathBuf::from(opts.get(k).map(String::as_str).unwrap_or(d));
            let a = cluster::ClusterArgs {
                rounds,
                quick,
                duration,
                tern: path("tern", "target/release/tern"),
                nats_server: path("nats-server", ".venv/bin/nats-server"),
                out: path("out", "target/bench-cluster"),
                docs: opts.get("docs").map(PathBuf::from),
            };
            ExitCode::from(cluster::run(a) as u8)
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
