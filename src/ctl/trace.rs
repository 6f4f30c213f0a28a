//! `tern ctl trace`: starts a trace (`POST /api/v1/traces`) and prints its events as they
//! come, until the trace's duration ends (or Ctrl-C). The events are documented in
//! docs/operations.md, "Message trace".

use super::{Client, CtlError};
use hyper::Method;
use serde_json::Value;

#[derive(clap::Args)]
pub struct TraceArgs {
    /// Messages published or received by this client.
    #[arg(long, group = "what")]
    client_id: Option<String>,
    /// Messages on exactly this topic.
    #[arg(long, group = "what")]
    topic: Option<String>,
    /// Messages whose topic matches this filter.
    #[arg(long, group = "what")]
    filter: Option<String>,
    /// How long the trace runs (e.g. 30s, 5m).
    #[arg(long, default_value = "60s")]
    duration: String,
}

/// The request body for `args`.
fn body(args: &TraceArgs) -> Result<String, CtlError> {
    let mut v = serde_json::Map::new();
    match (&args.client_id, &args.topic, &args.filter) {
        (Some(c), None, None) => v.insert("client_id".into(), Value::from(c.as_str())),
        (None, Some(t), None) => v.insert("topic".into(), Value::from(t.as_str())),
        (None, None, Some(f)) => v.insert("filter".into(), Value::from(f.as_str())),
        _ => {
            return Err(CtlError::Usage(
                "give one of --client-id, --topic, --filter".into(),
            ))
        }
    };
    v.insert("duration".into(), Value::from(args.duration.as_str()));
    Ok(Value::Object(v).to_string())
}

/// One event as a line for a person: seconds since the trace started (`t_us`; the wall clock
/// `ts` is left to `--json`), the event, then its other fields as key=value.
fn human(line: &str) -> String {
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(line) else {
        return line.to_string();
    };
    let mut out = String::new();
    let field = |k: &str| {
        map.get(k).map(|v| match v {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        })
    };
    match map.get("t_us").and_then(Value::as_u64) {
        Some(us) => out.push_str(&format!("{:>10.6} ", us as f64 / 1e6)),
        None => out.push_str(&format!("{:>10} ", "")),
    }
    out.push_str(&format!("{:<12}", field("event").unwrap_or_default()));
    for (k, v) in &map {
        if matches!(k.as_str(), "event" | "ts" | "t_us") {
            continue;
        }
        let v = match v {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        out.push_str(&format!(" {k}={v}"));
    }
    out
}

pub async fn run(c: &Client, args: TraceArgs, json: bool) -> Result<(), CtlError> {
    let body = body(&args)?;
    c.stream_lines(Method::POST, "/api/v1/traces", Some(body), |line| {
        if line.is_empty() {
            return;
        }
        if json {
            println!("{line}");
        } else {
            println!("{}", human(line));
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_selector_makes_the_body() {
        let a = TraceArgs {
            client_id: None,
            topic: Some("a/b".into()),
            filter: None,
            duration: "5s".into(),
        };
        let v: Value = serde_json::from_str(&body(&a).expect("valid")).expect("json");
        assert_eq!(v["topic"], "a/b");
        assert_eq!(v["duration"], "5s");
        let none = TraceArgs {
            client_id: None,
            topic: None,
            filter: None,
            duration: "5s".into(),
        };
        assert!(body(&none).is_err());
    }

    #[test]
    fn events_read_as_key_values() {
        let l = human(r#"{"event":"sent","ts":1,"t_us":1500000,"target":"c1","packet_id":7}"#);
        assert!(l.trim_start().starts_with("1.500000 sent"), "{l}");
        assert!(l.contains("target=c1") && l.contains("packet_id=7"), "{l}");
        assert!(!l.contains("ts=") && !l.contains("t_us="), "{l}");
        let l = human(r#"{"event":"ended","reason":"duration"}"#);
        assert!(
            l.trim_start().starts_with("ended") && l.contains("reason=duration"),
            "{l}"
        );
    }
}
