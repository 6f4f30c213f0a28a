//! Log output: `tracing` events to stderr as text or JSON lines, with a level filter that a
//! reload can replace while the broker runs.
//!
//! Levels, by convention in this code base: `info` for what an operator wants in a normal log
//! (start, stop, reload, one line per connect and disconnect with its reason), `warn` for
//! conditions that need attention (drops, failed reloads), `debug` and `trace` for anything
//! per packet or per message.

use crate::config::{LogConfig, LogFormat};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The embedded store's crates log its housekeeping at info (about twenty lines per start);
/// they are held at warn unless the directive names them.
const QUIET_DEPENDENCIES: [&str; 2] = ["fjall", "lsm_tree"];

/// `directive` plus `crate=warn` for each quiet dependency it does not mention.
fn filter(directive: &str) -> Result<EnvFilter, String> {
    let mut d = directive.to_string();
    for dep in QUIET_DEPENDENCIES {
        if !directive.contains(dep) {
            d.push_str(&format!(",{dep}=warn"));
        }
    }
    EnvFilter::try_new(&d).map_err(|e| e.to_string())
}

/// Replaces the level filter of the installed subscriber.
#[derive(Clone)]
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

impl LogHandle {
    /// Parses `directive` (as `log.level`) and makes it the filter of every later event.
    pub fn set_level(&self, directive: &str) -> Result<(), String> {
        self.0.reload(filter(directive)?).map_err(|e| e.to_string())
    }
}

/// Installs the process-wide subscriber. Call once, before anything logs.
pub fn init(cfg: &LogConfig) -> Result<LogHandle, String> {
    let (filter, handle) = reload::Layer::new(filter(&cfg.level)?);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match cfg.format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(LogHandle(handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_crates_are_quiet_unless_named() {
        let f = filter("info").unwrap().to_string();
        assert!(
            f.contains("fjall=warn") && f.contains("lsm_tree=warn"),
            "{f}"
        );
        let f = filter("info,fjall=debug").unwrap().to_string();
        assert!(
            f.contains("fjall=debug") && !f.contains("fjall=warn"),
            "{f}"
        );
        assert!(filter("info,[").is_err());
    }
}
