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
    /// mosquitto_passwd's -c, -b, -D and -U work too.
    Passwd(PasswdArgs),
    /// Cluster operations (docs/cluster.md).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The admin API of a running broker: clients, sessions, queues, kicks, purges, traces
    /// (docs/operations.md, "tern ctl").
    Ctl(tern::ctl::CtlArgs),
    /// Turn a Mosquitto 2.x configuration into a Tern one (stdout, or -o FILE); what cannot
    /// be mapped is listed on stderr (docs/migrating-from-mosquitto.md).
    Migrate(tern::migrate::MigrateArgs),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Take the single-node store in storage.dir into the cluster the configuration's
    /// [cluster] section names: its retained messages go to the cluster, its persistent
    /// sessions stay in the store (served by this node, found by the others), and the
    /// directory is marked as this node's. Then start the node as usual.
    Import,
}

/// `tern passwd`, with `mosquitto_passwd`'s flags where they mean the same.
#[derive(clap::Args)]
#[command(
    override_usage = "tern passwd [-c] FILE USER            (password prompted, or one line of stdin)\n       \
                  tern passwd [-c] -b FILE USER PASSWORD\n       \
                  tern passwd -D FILE USER\n       \
                  tern passwd -U FILE"
)]
struct PasswdArgs {
    /// -c: create FILE with USER only, replacing an existing file (mosquitto_passwd -c).
    #[arg(long = "create", conflicts_with_all = ["delete", "upgrade", "check"])]
    create: bool,
    /// Batch: the password is the third argument. It is kept in the shell's history and
    /// shown in the process list; standard input is safer.
    #[arg(short = 'b', conflicts_with_all = ["delete", "upgrade", "check"])]
    batch: bool,
    /// Delete USER from FILE instead.
    #[arg(short = 'D', long = "delete")]
    delete: bool,
    /// Hash the plain-text passwords (`user:password` lines) of FILE in place.
    #[arg(short = 'U', conflicts_with_all = ["delete", "check"])]
    upgrade: bool,
    /// Read a password from standard input; exit 0 if it is USER's, 1 if not, 2 on error.
    #[arg(long, hide = true, conflicts_with = "delete")]
    check: bool,
    /// mosquitto_passwd's hash choice: only sha512-pbkdf2, what Tern always writes.
    #[arg(short = 'H', value_name = "HASH")]
    hash: Option<String>,
    /// mosquitto_passwd's iteration count: only 101, what Tern always uses.
    #[arg(short = 'I', value_name = "ITERATIONS")]
    iterations: Option<String>,
    /// FILE and USER (and with -b, PASSWORD; with -U, FILE alone).
    #[arg(value_name = "FILE USER [PASSWORD]")]
    args: Vec<std::ffi::OsString>,
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(passwd_create_flag(std::env::args_os().collect()));
    if let Some(Command::Ctl(args)) = cli.command {
        return tern::ctl::run(args);
    }
    if let Some(Command::Migrate(args)) = cli.command {
        return tern::migrate::run(args);
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

/// `-c` is the short form of the global `--config`; after `passwd` it means what it means to
/// mosquitto_passwd, create the file, so there it is read as `--create` (up to the first
/// argument that is not an option, so a `-c` password given with `-b` stays a password).
fn passwd_create_flag(mut argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut i = 1;
    // The global options before the subcommand.
    while let Some(a) = argv.get(i).and_then(|a| a.to_str()) {
        match a {
            "-c" | "--config" => i += 2,
            _ if a.starts_with("--config=") || (a.starts_with("-c") && a.len() > 2) => i += 1,
            _ => break,
        }
    }
    if argv.get(i).is_none_or(|a| a != "passwd") {
        return argv;
    }
    i += 1;
    while let Some(a) = argv.get(i).and_then(|a| a.to_str()) {
        match a {
            "-c" => argv[i] = "--create".into(),
            "-H" | "-I" => i += 1,
            _ if a.starts_with('-') => {}
            _ => break,
        }
        i += 1;
    }
    argv
}

/// What a `tern passwd` command line asks for, once its arguments are checked.
enum PasswdOp {
    Set {
        create: bool,
        password: Option<Vec<u8>>,
    },
    Delete,
    Check,
    Upgrade,
}

/// The operation, the file and the user; or the message saying what was expected.
fn passwd_command(args: &PasswdArgs) -> Result<(PasswdOp, PathBuf, String), String> {
    use std::os::unix::ffi::OsStrExt;
    match args.hash.as_deref() {
        None | Some("sha512-pbkdf2") => {}
        Some("sha512") => return Err("-H sha512 ($6$, Mosquitto 1.x's hash) is not written by tern passwd: it writes sha512-pbkdf2 ($7$), which Mosquitto 2 writes too; $6$ lines already in a file keep working. Leave -H out".into()),
        Some(other) => return Err(format!("-H {other} is not supported: tern passwd writes sha512-pbkdf2 ($7$, 101 iterations), Mosquitto 2's default, and reads $7$ and $6$. Leave -H out")),
    }
    match args.iterations.as_deref() {
        None | Some("101") => {}
        Some(other) => return Err(format!("-I {other}: tern passwd always uses 101 iterations, Mosquitto 2's default (a different count would be checked the same way, but is not written). Leave -I out")),
    }
    let n = args.args.len();
    let (op, expected, count) = if args.upgrade {
        (
            PasswdOp::Upgrade,
            "-U expects FILE only (every plain-text password in it is hashed)",
            1,
        )
    } else if args.delete {
        (PasswdOp::Delete, "-D expects FILE USER", 2)
    } else if args.check {
        (
            PasswdOp::Check,
            "--check expects FILE USER (the password on standard input)",
            2,
        )
    } else if args.batch {
        let password = args.args.get(2).map(|p| p.as_bytes().to_vec());
        (
            PasswdOp::Set {
                create: args.create,
                password,
            },
            "-b expects FILE USER PASSWORD",
            3,
        )
    } else {
        (
            PasswdOp::Set {
                create: args.create,
                password: None,
            },
            "expects FILE USER (the password is prompted for on a terminal, else read from one line of standard input; -b FILE USER PASSWORD takes it from the command line)",
            2,
        )
    };
    if n != count {
        return Err(format!(
            "{expected}, not {n} argument{}",
            if n == 1 { "" } else { "s" }
        ));
    }
    let file = PathBuf::from(&args.args[0]);
    let user = match args.args.get(1) {
        Some(u) => u
            .to_str()
            .ok_or("the username must be UTF-8 (MQTT user names are)")?
            .to_string(),
        None => String::new(),
    };
    Ok((op, file, user))
}

/// `tern passwd`: edit a password file (no configuration needed).
fn passwd(args: &PasswdArgs) -> ExitCode {
    use tern::auth::password::{valid_username, PasswordFile};
    let (op, path, user) = match passwd_command(args) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("tern passwd: {msg}");
            return ExitCode::from(2);
        }
    };
    let load = || match PasswordFile::load(&path) {
        Ok(f) => Ok(f),
        Err(e) => {
            eprintln!("tern: {e}");
            Err(ExitCode::from(2))
        }
    };
    let (create, given) = match op {
        PasswdOp::Upgrade => return upgrade_plaintext(&path),
        PasswdOp::Check => {
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
            return if file.verify(&user, &password) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        PasswdOp::Delete => {
            let mut file = match load() {
                Ok(f) => f,
                Err(code) => return code,
            };
            if !file.remove(&user) {
                eprintln!("tern: no user {user:?} in {}", path.display());
                return ExitCode::FAILURE;
            }
            return save(&file, &path);
        }
        PasswdOp::Set { create, password } => (create, password),
    };
    if !valid_username(&user) {
        eprintln!(
            "tern: invalid username {user:?}: it must be non-empty, contain no ':' or control characters, not start with '#' and not start or end with a blank"
        );
        return ExitCode::FAILURE;
    }
    let mut file = if create || !path.exists() {
        PasswordFile::default()
    } else {
        match load() {
            Ok(f) => f,
            Err(code) => return code,
        }
    };
    let password = match given {
        Some(p) => {
            eprintln!("tern passwd: warning: a password on the command line is kept in the shell's history and shown to other users in the process list; leave -b out to be prompted for it, or give it on standard input");
            if p.is_empty() {
                eprintln!("tern: empty password refused");
                return ExitCode::FAILURE;
            }
            p
        }
        None => match read_new_password() {
            Ok(p) => p,
            Err(msg) => {
                eprintln!("tern: {msg}");
                return ExitCode::FAILURE;
            }
        },
    };
    if let Err(e) = file.set(&user, &password) {
        eprintln!("tern: {e}");
        return ExitCode::FAILURE;
    }
    save(&file, &path)
}

fn save(file: &tern::auth::password::PasswordFile, path: &std::path::Path) -> ExitCode {
    match file.save(path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tern passwd -U FILE` (mosquitto_passwd -U): every `user:password` line whose password is
/// plain text gets a `$7$` hash; hashed lines, comments and blank lines stay as they are.
/// Nothing is written unless every line is understood, so a file is never half upgraded.
fn upgrade_plaintext(path: &std::path::Path) -> ExitCode {
    use tern::auth::password::PasswordFile;
    let text = match std::fs::read(path) {
        Ok(b) => match String::from_utf8(b) {
            Ok(t) => t,
            Err(_) => {
                eprintln!("tern passwd: {} is not UTF-8 text", path.display());
                return ExitCode::from(2);
            }
        },
        Err(e) => {
            eprintln!("tern passwd: cannot read {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let blank = |c: char| c == ' ' || c == '\t';
    let mut out = String::new();
    let mut hashed = 0;
    for (i, line) in text.lines().enumerate() {
        let at = format!("{}, line {}", path.display(), i + 1);
        let trimmed = line.trim_matches(blank);
        if trimmed.is_empty() || trimmed.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let Some((user, secret)) = line.split_once(':') else {
            eprintln!("tern passwd: {at}: no ':' (user:password expected); nothing was changed");
            return ExitCode::FAILURE;
        };
        let secret_trimmed = secret.trim_matches(blank);
        if secret_trimmed.starts_with("$7$") || secret_trimmed.starts_with("$6$") {
            // Already hashed: kept (whether Tern reads it is checked with the whole file).
            out.push_str(line);
            out.push('\n');
            continue;
        }
        if secret.is_empty() {
            eprintln!("tern passwd: {at}: empty password; nothing was changed");
            return ExitCode::FAILURE;
        }
        let mut one = PasswordFile::default();
        if let Err(e) = one.set(user.trim_matches(blank), secret.as_bytes()) {
            eprintln!("tern passwd: {at}: {e}; nothing was changed");
            return ExitCode::FAILURE;
        }
        out.push_str(&one.to_text());
        hashed += 1;
    }
    if let Err(e) = PasswordFile::parse(&out, &path.display().to_string()) {
        eprintln!("tern passwd: {e}; nothing was changed");
        return ExitCode::FAILURE;
    }
    if let Err(e) = tern::auth::password::write_atomically(path, out.as_bytes()) {
        eprintln!("tern passwd: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    eprintln!(
        "tern passwd: {hashed} plain-text password{} hashed in {}",
        if hashed == 1 { "" } else { "s" },
        path.display()
    );
    ExitCode::SUCCESS
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
