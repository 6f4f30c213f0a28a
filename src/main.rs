//! The `tern` command: run the broker, or check a configuration.

#![deny(clippy::unwrap_used, clippy::expect_used)]

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tern::Config;

/// jemalloc instead of glibc's malloc: the storage thread allocates and frees a key and a
/// value per store operation, from a different thread than the connections that made them
/// (figures in docs/benchmarks.md and the Cargo.toml comment).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts. Pages freed under load go back to the OS within a
/// quarter of a second (from one background thread) instead of after jemalloc's default ten
/// seconds, and are not kept "muzzy" either: RSS then follows what is held. Measured with
/// `test_offline_queue_lives_on_disk`: RSS growth for 30 MB queued on disk 35 MB with the
/// defaults, 24 MB with these (glibc: 21 MB); throughput as with the defaults.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: Option<&'static u8> = Some(
    &b"background_thread:true,max_background_threads:1,dirty_decay_ms:250,muzzy_decay_ms:0\0"[0],
);

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
    /// Add or update USER in a Mosquitto-format password file (created, mode 0600, if missing).
    /// The password is read from standard input (one line) or, on a terminal, prompted twice.
    Passwd(PasswdArgs),
    /// Cluster operations (docs/cluster.md).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The admin API of a running broker: clients, sessions, queues, kicks, purges, traces
    /// (docs/operations.md, "tern ctl").
    Ctl(tern::ctl::CtlArgs),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Take the single-node store in storage.dir into the cluster the configuration's
    /// [cluster] section names: its retained messages go to the cluster, its persistent
    /// sessions stay in the store (served by this node, found by the others), and the
    /// directory is marked as this node's. Then start the node as usual.
    Import,
}

#[derive(clap::Args)]
struct PasswdArgs {
    /// Delete USER from FILE instead.
    #[arg(short = 'D', long = "delete")]
    delete: bool,
    /// Read a password from standard input; exit 0 if it is USER's, 1 if not, 2 on error.
    #[arg(long, hide = true, conflicts_with = "delete")]
    check: bool,
    /// The password file.
    file: PathBuf,
    /// The username.
    user: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Ctl(args)) = cli.command {
        return tern::ctl::run(args);
    }
    if let Some(Command::Passwd(args)) = &cli.command {
        return passwd(args);
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tern: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Cluster(ClusterCommand::Import)) = cli.command {
        return cluster_import(config);
    }
    if let Some(Command::Check) = cli.command {
        // The files the configuration names are read as the broker would read them.
        if let Err(e) = tern::auth::Authorizer::prepare(&config.auth) {
            eprintln!("tern: {e}");
            return ExitCode::from(2);
        }
        // TLS files as the listener reads them; what would not stop it (an X.509 v1
        // certificate, a stale CRL) is a warning on stderr and the check still passes.
        for (name, l) in config.listeners.iter() {
            if let Some(tls) = l.tls() {
                match tern::tls::TlsReloader::prepare(&tls) {
                    Ok(prepared) => {
                        for w in prepared.warnings() {
                            eprintln!("tern: listeners.{name}: warning: {w}");
                        }
                    }
                    Err(e) => {
                        eprintln!("tern: listeners.{name}: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
        }
        println!("tern: configuration OK");
        return ExitCode::SUCCESS;
    }
    let log = match tern::logging::init(&config.log) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("tern: cannot start logging: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config_path = cli.config.clone();
    let threads = config.server.threads();
    let runtime = match runtime(threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Handlers first: a signal sent as soon as the ready line appears (or during startup)
        // must find them installed, not the default action (SIGHUP would kill the process).
        let signals = Signals::install();
        let mut running = match tern::start(config).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("tern: {e}");
                return ExitCode::FAILURE;
            }
        };
        running.set_log_handle(log);
        println!("{}", running.ready_line());
        tracing::info!(threads, "{}", running.ready_line());
        signals.wait(&running, config_path.as_deref()).await;
        tracing::info!("shutting down");
        running.shutdown(Duration::from_secs(5)).await;
        ExitCode::SUCCESS
    })
}

fn cluster_import(config: tern::Config) -> ExitCode {
    let log = tern::logging::init(&config.log);
    let runtime = match runtime(1) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(tern::import(config));
    drop(log);
    match result {
        Ok(what) => {
            println!("tern: imported into the cluster: {what}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The tokio runtime serving connections: with one thread, tokio's single-threaded
/// scheduler (no work stealing, no worker to wake: a publisher's task wakes its subscriber's
/// on the same thread); with more, the work-stealing one. docs/operations.md, "Threads",
/// has the measurements behind the default.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// SIGTERM, SIGINT and SIGHUP, caught from before startup to shutdown.
struct Signals {
    unix: Option<(
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    )>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let unix = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Some((term, int, hup)),
            _ => None,
        };
        Signals { unix }
    }

    /// Runs until SIGTERM or SIGINT; SIGHUP reloads what can change without a restart.
    async fn wait(self, running: &tern::Running, config: Option<&std::path::Path>) {
        let Some((mut term, mut int, mut hup)) = self.unix else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    // A file that does not parse counts as a failed reload too.
                    let result = running.reload_from(config);
                    if let Err(e) = result {
                        tracing::error!("reload rejected, keeping the running configuration: {e}");
                    }
                }
            }
        }
    }
}

/// `tern passwd`: edit a password file (no configuration needed).
fn passwd(args: &PasswdArgs) -> ExitCode {
    use tern::auth::password::{valid_username, PasswordFile};
    let exists = args.file.exists();
    let load = || match PasswordFile::load(&args.file) {
        Ok(f) => Ok(f),
        Err(e) => {
            eprintln!("tern: {e}");
            Err(ExitCode::from(2))
        }
    };
    if args.check {
        let file = match load() {
            Ok(f) => f,
            Err(code) => return code,
        };
        let password = match read_stdin_line() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("tern: cannot read the password: {e}");
                return ExitCode::from(2);
            }
        };
        return if file.verify(&args.user, &password) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let mut file = if exists || args.delete {
        match load() {
            Ok(f) => f,
            Err(code) => return code,
        }
    } else {
        PasswordFile::default()
    };
    if args.delete {
        if !file.remove(&args.user) {
            eprintln!("tern: no user {:?} in {}", args.user, args.file.display());
            return ExitCode::FAILURE;
        }
    } else {
        if !valid_username(&args.user) {
            eprintln!(
                "tern: invalid username {:?}: it must be non-empty, contain no ':' or control characters, not start with '#' and not start or end with a blank",
                args.user
            );
            return ExitCode::FAILURE;
        }
        let password = match read_new_password() {
            Ok(p) => p,
            Err(msg) => {
                eprintln!("tern: {msg}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = file.set(&args.user, &password) {
            eprintln!("tern: {e}");
            return ExitCode::FAILURE;
        }
    }
    match file.save(&args.file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One line of standard input, without its line ending.
fn read_stdin_line() -> std::io::Result<Vec<u8>> {
    use std::io::BufRead;
    let mut line = Vec::new();
    std::io::stdin().lock().read_until(b'\n', &mut line)?;
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    Ok(line)
}

/// The new password: prompted twice without echo on a terminal, else one line of stdin.
fn read_new_password() -> Result<Vec<u8>, String> {
    let password = if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let first = prompt_hidden("Password: ")?;
        if first.is_empty() {
            return Err("empty password refused".into());
        }
        let second = prompt_hidden("Reenter password: ")?;
        if first != second {
            return Err("passwords do not match".into());
        }
        first
    } else {
        read_stdin_line().map_err(|e| format!("cannot read the password: {e}"))?
    };
    if password.is_empty() {
        return Err("empty password refused".into());
    }
    Ok(password)
}

/// Prompt on stderr and read a line from the terminal on stdin with echo turned off.
fn prompt_hidden(prompt: &str) -> Result<Vec<u8>, String> {
    use std::io::Write;
    /// Restores the terminal's settings when dropped, whatever happens in between.
    struct Restore(libc::termios);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: tcsetattr on stdin with settings tcgetattr returned for it.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
        }
    }
    // Echo goes off before the prompt shows: what is typed once the prompt is visible must
    // be neither echoed nor discarded (TCSAFLUSH after the prompt dropped a password typed
    // or pasted at once, and the test typing at the prompt caught it).
    // SAFETY: termios is plain data; tcgetattr fills it in for a terminal fd.
    let mut term: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut term) } != 0 {
        return Err(format!(
            "cannot read the terminal's settings: {}",
            std::io::Error::last_os_error()
        ));
    }
    let restore = Restore(term);
    let mut quiet = term;
    quiet.c_lflag &= !(libc::ECHO | libc::ECHONL);
    quiet.c_lflag |= libc::ICANON;
    // SAFETY: as above, with a copy of the settings read.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &quiet) } != 0 {
        return Err(format!(
            "cannot turn off echo: {}",
            std::io::Error::last_os_error()
        ));
    }
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let line = read_stdin_line();
    drop(restore);
    eprintln!();
    line.map_err(|e| format!("cannot read the password: {e}"))
}
