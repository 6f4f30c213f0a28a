//! `tern ctl`: the admin API (`admin/`) for a person at a terminal. Tables by default,
//! `--json` for scripts (the API's own JSON: one object per answer, a listing's pages joined
//! into one array). Where the broker is and the token come from flags or the environment
//! (`TERN_ADMIN_URL`, `TERN_ADMIN_TOKEN`), so a token need not appear in `ps` output.

mod client;
mod trace;

pub use client::{Client, CtlError};
use hyper::Method;
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;

/// Rows a listing fetches at most unless `--max` says otherwise (pages of 1,000).
const DEFAULT_MAX: usize = 10_000;

#[derive(clap::Args)]
pub struct CtlArgs {
    /// Where the metrics port (which serves the API) is.
    #[arg(long, env = "TERN_ADMIN_URL", default_value = "http://127.0.0.1:9883")]
    url: String,
    /// A token of `admin.token_file` (the part after `name:`).
    #[arg(long, env = "TERN_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the token from this file: its first line, `name:token` or the token alone.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the broker's certificate, for an https:// URL.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(clap::Subcommand)]
enum CtlCommand {
    /// Connected clients.
    Clients {
        #[arg(long, default_value_t = DEFAULT_MAX)]
        max: usize,
    },
    /// Sessions (persistent ones kept for absent clients, and connected ones).
    Sessions {
        /// Only sessions whose client is away.
        #[arg(long, conflicts_with = "online")]
        offline: bool,
        /// Only sessions whose client is connected.
        #[arg(long)]
        online: bool,
        #[arg(long, default_value_t = DEFAULT_MAX)]
        max: usize,
    },
    /// One session with its subscriptions.
    Session { client_id: String },
    /// Subscriptions of a client, or the clients subscribed with a filter.
    Subscriptions {
        #[arg(long, conflicts_with = "filter", required_unless_present = "filter")]
        client: Option<String>,
        #[arg(long)]
        filter: Option<String>,
    },
    /// Shared groups, declared queues and bridges' queues.
    Groups,
    /// Retained messages matching a filter.
    Retained {
        #[arg(long, default_value = "#")]
        filter: String,
        #[arg(long, default_value_t = DEFAULT_MAX)]
        max: usize,
    },
    /// Close a client's connection (MQTT 5: DISCONNECT 0x98 Administrative action).
    Kick { client_id: String },
    /// Delete a session with its queue and stored state (a connected client is kicked).
    DeleteSession { client_id: String },
    /// Drop what waits in a session's queue.
    Purge { client_id: String },
    /// Drop what waits in a group's queue (`$share/G/F`, `$queue/NAME`, `$bridge/NAME`).
    PurgeGroup { key: String },
    /// Clear the retained message of a topic.
    DeleteRetained { topic: String },
    /// Follow messages through the broker (JSON lines; see docs/operations.md).
    Trace(trace::TraceArgs),
}

/// Runs `tern ctl` and says how it went.
pub fn run(args: CtlArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern ctl: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(dispatch(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ CtlError::Usage(_)) => {
            eprintln!("tern ctl: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("tern ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token(args: &CtlArgs) -> Result<String, CtlError> {
    if let Some(t) = &args.token {
        return Ok(t.clone());
    }
    let Some(path) = &args.token_file else {
        return Err(CtlError::Usage(
            "no token: give --token, TERN_ADMIN_TOKEN or --token-file".into(),
        ));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| CtlError::Usage(format!("--token-file {}: {e}", path.display())))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| CtlError::Usage(format!("--token-file {}: empty", path.display())))?;
    Ok(line
        .split_once(':')
        .map_or(line, |(_, t)| t)
        .trim()
        .to_string())
}

async fn dispatch(args: CtlArgs) -> Result<(), CtlError> {
    let c = Client::new(&args.url, token(&args)?, args.ca.clone())?;
    let json = args.json;
    use client::encode;
    match args.command {
        CtlCommand::Clients { max } => {
            let items = listing(&c, "/api/v1/clients?", max).await?;
            show_list(
                json,
                &items,
                &[
                    ("CLIENT ID", "client_id"),
                    ("USER", "username"),
                    ("ADDRESS", "address"),
                    ("PROTO", "protocol"),
                    ("KEEPALIVE", "keep_alive"),
                    ("INFLIGHT", "inflight"),
                    ("QUEUED", "queued"),
                    ("OLDEST S", "oldest_age_seconds"),
                ],
            )
        }
        CtlCommand::Sessions {
            offline,
            online,
            max,
        } => {
            let state = if offline {
                "offline"
            } else if online {
                "online"
            } else {
                "all"
            };
            let items = listing(&c, &format!("/api/v1/sessions?state={state}&"), max).await?;
            show_list(
                json,
                &items,
                &[
                    ("CLIENT ID", "client_id"),
                    ("ONLINE", "online"),
                    ("QUEUED", "queued"),
                    ("INFLIGHT", "inflight"),
                    ("OLDEST S", "oldest_age_seconds"),
                    ("EXPIRES IN S", "expires_in_seconds"),
                    ("SUBS", "subscriptions"),
                ],
            )
        }
        CtlCommand::Session { client_id } => {
            let a = c
                .call(
                    Method::GET,
                    &format!("/api/v1/sessions/{}", encode(&client_id)),
                    None,
                )
                .await?;
            let v: Value = parse(&a.body)?;
            if json {
                println!("{v}");
            } else {
                for k in [
                    "client_id",
                    "online",
                    "persistent",
                    "username",
                    "queued",
                    "inflight",
                    "oldest_age_seconds",
                    "expires_in_seconds",
                ] {
                    println!("{k:<20} {}", cell(v.get(k)));
                }
                let subs = v
                    .get("subscriptions")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                println!();
                show_list(false, &subs, &[("FILTER", "filter"), ("QOS", "qos")])?;
            }
            Ok(())
        }
        CtlCommand::Subscriptions { client, filter } => {
            let q = match (client, filter) {
                (Some(id), _) => format!("/api/v1/subscriptions?client={}&", encode(&id)),
                (None, Some(f)) => format!("/api/v1/subscriptions?filter={}&", encode(&f)),
                (None, None) => return Err(CtlError::Usage("--client or --filter".into())),
            };
            let items = listing(&c, &q, DEFAULT_MAX).await?;
            show_list(
                json,
                &items,
                &[
                    ("CLIENT ID", "client_id"),
                    ("FILTER", "filter"),
                    ("QOS", "qos"),
                    ("NO LOCAL", "no_local"),
                ],
            )
        }
        CtlCommand::Groups => {
            let items = listing(&c, "/api/v1/groups?", DEFAULT_MAX).await?;
            let rows: Vec<Value> = items
                .into_iter()
                .map(|mut g| {
                    let n = g
                        .get("members")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len);
                    g["member_count"] = Value::from(n);
                    g
                })
                .collect();
            show_list(
                json,
                &rows,
                &[
                    ("KEY", "key"),
                    ("KIND", "kind"),
                    ("MEMBERS", "member_count"),
                    ("QUEUED", "queued"),
                    ("OLDEST S", "oldest_age_seconds"),
                ],
            )
        }
        CtlCommand::Retained { filter, max } => {
            let items = listing(
                &c,
                &format!("/api/v1/retained?filter={}&", encode(&filter)),
                max,
            )
            .await?;
            show_list(
                json,
                &items,
                &[("TOPIC", "topic"), ("QOS", "qos"), ("SIZE", "size")],
            )
        }
        CtlCommand::Kick { client_id } => {
            act(
                &c,
                json,
                Method::DELETE,
                &format!("/api/v1/clients/{}", encode(&client_id)),
                &format!("kicked {client_id}"),
            )
            .await
        }
        CtlCommand::DeleteSession { client_id } => {
            act(
                &c,
                json,
                Method::DELETE,
                &format!("/api/v1/sessions/{}", encode(&client_id)),
                &format!("deleted the session of {client_id}"),
            )
            .await
        }
        CtlCommand::Purge { client_id } => {
            act(
                &c,
                json,
                Method::POST,
                &format!("/api/v1/sessions/{}/purge", encode(&client_id)),
                &format!("purged the queue of {client_id}"),
            )
            .await
        }
        CtlCommand::PurgeGroup { key } => {
            act(
                &c,
                json,
                Method::POST,
                &format!("/api/v1/groups/purge?key={}", encode(&key)),
                &format!("purged the queue of {key}"),
            )
            .await
        }
        CtlCommand::DeleteRetained { topic } => {
            act(
                &c,
                json,
                Method::DELETE,
                &format!("/api/v1/retained?topic={}", encode(&topic)),
                &format!("cleared the retained message of {topic}"),
            )
            .await
        }
        CtlCommand::Trace(t) => trace::run(&c, t, json).await,
    }
}

fn parse(body: &[u8]) -> Result<Value, CtlError> {
    serde_json::from_slice(body).map_err(|e| CtlError::Io(format!("answer is not JSON: {e}")))
}

/// Every page of a listing, up to `max` items. `path` ends with `?` or `&`.
async fn listing(c: &Client, path: &str, max: usize) -> Result<Vec<Value>, CtlError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let limit = (max - out.len()).clamp(1, crate::admin::MAX_LIMIT);
        let mut q = format!("{path}limit={limit}");
        if let Some(a) = &after {
            q.push_str(&format!("&after={}", client::encode(a)));
        }
        let v = parse(&c.call(Method::GET, &q, None).await?.body)?;
        if let Some(items) = v.get("items").and_then(Value::as_array) {
            out.extend(items.iter().cloned());
        }
        after = v.get("next").and_then(Value::as_str).map(str::to_string);
        if after.is_none() || out.len() >= max {
            out.truncate(max);
            return Ok(out);
        }
    }
}

async fn act(
    c: &Client,
    json: bool,
    method: Method,
    path: &str,
    said: &str,
) -> Result<(), CtlError> {
    let a = c.call(method, path, None).await?;
    if json {
        println!("{}", String::from_utf8_lossy(&a.body).trim());
    } else {
        let v = parse(&a.body)?;
        match v.get("purged") {
            Some(n) => println!("{said}: {n} messages"),
            None => println!("{said}"),
        }
    }
    Ok(())
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// A table of `items` with `columns` (header, JSON key), or the items as one JSON array.
fn show_list(json: bool, items: &[Value], columns: &[(&str, &str)]) -> Result<(), CtlError> {
    if json {
        println!("{}", Value::from(items.to_vec()));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| columns.iter().map(|(_, k)| cell(i.get(*k))).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(n, (h, _))| {
            rows.iter()
                .map(|r| r[n].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (n, c) in cells.iter().enumerate() {
            if n + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[n]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(columns.iter().map(|(h, _)| *h).collect());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        println!("(none)");
    }
    Ok(())
}
