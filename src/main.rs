//! The `tern` command: run the broker, or check a configuration.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tern::Config;

#[derive(Parser)]
#[command(name = "tern", version, about = "Tern MQTT broker")]
struct Cli {
    /// Configuration file (TOML). Built-in defaults apply to keys it does not set.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration and exit (non-zero with a message naming the key when invalid).
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tern: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Check) = cli.command {
        println!("tern: configuration OK");
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let running = match tern::start(config).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("tern: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("{}", running.ready_line());
        tracing::info!("{}", running.ready_line());
        wait_for_signal().await;
        tracing::info!("shutting down");
        running.shutdown(Duration::from_secs(5)).await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
