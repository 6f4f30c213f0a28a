//! `tern migrate`: a Mosquitto 2.x configuration turned into Tern's.
//!
//! Mosquitto users have a mosquitto.conf, a password file and an ACL file. The files work
//! unchanged (Tern reads both formats), so what needs translating is the configuration. This
//! reads it as Mosquitto does (`parse.rs`: lines, `include_dir`), maps each directive to the
//! Tern key that means the same (`listeners.rs`, `general.rs`: authentication, persistence,
//! limits, logs; `bridges.rs`), and writes TOML whose every key names the line it came from
//! (`emit.rs`). What has no Tern equivalent, or maps only in part, is listed on standard
//! error, one line each (`FILE:LINE: DIRECTIVE: why`), and again at the end of the TOML, so
//! nothing is dropped without a word. Where Mosquitto's default differs from Tern's and
//! matters to a client (no persistence, ACLs applied per message, a 3.1.1 bridge), the
//! migrated file states Mosquitto's value.
//!
//! It uses nothing of the broker: its input is text and its output is text, checked by
//! `tern check` like any configuration.

mod bridges;
mod emit;
mod general;
mod listeners;
pub mod parse;

use parse::{Directive, Loc, Report};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A value and the line that set it.
pub(crate) type At<T> = Option<(T, Loc)>;

/// Who may connect, and the files: broker-wide, or one listener's with
/// `per_listener_settings true`.
#[derive(Debug, Default)]
pub struct Security {
    pub password_file: At<String>,
    pub acl_file: At<String>,
    pub allow_anonymous: At<bool>,
}

/// `tern migrate MOSQUITTO_CONF [-o OUT.toml]`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The Mosquitto configuration (its include_dir directories are read too).
    #[arg(value_name = "MOSQUITTO_CONF")]
    pub input: PathBuf,
    /// Write the Tern configuration to this file instead of standard output; bridge
    /// passwords go to files beside it (mode 0600).
    #[arg(short = 'o', long = "output", value_name = "OUT.toml")]
    pub output: Option<PathBuf>,
}

/// What the mapping needs besides the directives.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The input as named on the command line, for the header.
    pub source: String,
    /// Where bridge passwords are written (the output's directory, absolute); `None` when the
    /// output goes to standard output: then the user is told to write them.
    pub secret_dir: Option<PathBuf>,
    /// This host's name: Mosquitto's default bridge client id is `NAME.HOSTNAME`.
    pub hostname: Option<String>,
}

/// A password to store in a file of its own (`secret_file` of a bridge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub path: PathBuf,
    pub password: String,
}

/// The result: the TOML, what was not mapped (for standard error), what needed no key, and
/// the secrets to write.
#[derive(Debug, Clone)]
pub struct Migration {
    pub toml: String,
    pub not_mapped: Vec<Report>,
    pub equivalent: Vec<Report>,
    pub secrets: Vec<Secret>,
}

/// The listener and the bridge a directive applies to, per file read (Mosquitto starts each
/// file with the default listener and no bridge).
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    listener: Option<usize>,
    bridge: Option<usize>,
}

/// Everything read so far.
pub(crate) struct State {
    /// `per_listener_settings true`: authentication is per listener.
    per_listener: At<bool>,
    general: general::General,
    listeners: listeners::Listeners,
    bridges: Vec<bridges::Bridge>,
    cursors: HashMap<usize, Cursor>,
    /// No listener at all: Mosquitto 2's local only mode.
    local_only: bool,
    not_mapped: Vec<Report>,
    equivalent: Vec<Report>,
}

impl State {
    fn cursor(&mut self, scope: usize) -> &mut Cursor {
        self.cursors.entry(scope).or_default()
    }

    /// Not carried over: the user must look at it.
    pub(crate) fn not_mapped(&mut self, d: &Directive, why: impl Into<String>) {
        self.not_mapped.push(Report::new(d, why));
    }

    /// Needs no key: Tern already behaves so.
    pub(crate) fn equivalent(&mut self, d: &Directive, why: impl Into<String>) {
        self.equivalent.push(Report::new(d, why));
    }

    fn per_listener(&self) -> bool {
        self.per_listener.as_ref().is_some_and(|(on, _)| *on)
    }
}

/// Sets `slot` from `d`; a value set before is reported as overridden (the last one counts in
/// Mosquitto too).
pub(crate) fn assign<T>(reports: &mut Vec<Report>, slot: &mut At<T>, value: T, d: &Directive) {
    if let Some((_, before)) = slot.take() {
        reports.push(Report {
            at: before,
            directive: d.name.clone(),
            why: format!("overridden by {} (the last one counts)", d.at),
        });
    }
    *slot = Some((value, d.at.clone()));
}

/// A directive's one argument as a Mosquitto boolean (`true`/`false`, `1`/`0`).
pub(crate) fn flag(st: &mut State, d: &Directive) -> Option<bool> {
    match d.args.first().map(String::as_str) {
        Some("true" | "1") if d.args.len() == 1 => Some(true),
        Some("false" | "0") if d.args.len() == 1 => Some(false),
        _ => {
            st.not_mapped(d, format!("expects true or false, not {:?}", d.rest));
            None
        }
    }
}

/// A directive's one argument as a number.
pub(crate) fn number<T: std::str::FromStr>(st: &mut State, d: &Directive) -> Option<T> {
    match d.args.first().map(|a| a.parse::<T>()) {
        Some(Ok(n)) if d.args.len() == 1 => Some(n),
        _ => {
            st.not_mapped(d, format!("expects a number, not {:?}", d.rest));
            None
        }
    }
}

/// A directive's value as one string (the rest of the line: paths may hold spaces).
pub(crate) fn text(st: &mut State, d: &Directive) -> Option<String> {
    if d.rest.is_empty() {
        st.not_mapped(d, "expects a value");
        None
    } else {
        Some(d.rest.clone())
    }
}

/// Maps `directives` (as [`parse::read`] returns them) to a Tern configuration.
pub fn migrate(directives: &[Directive], opts: &Options) -> Migration {
    // Mosquitto wants per_listener_settings before any security option, and once true it
    // stays true; it is read first here, so its place in the file does not matter.
    let mut per_listener: At<bool> = None;
    for d in directives
        .iter()
        .filter(|d| d.name == "per_listener_settings")
    {
        let on = d.args.first().is_some_and(|a| a == "true" || a == "1");
        if !per_listener.as_ref().is_some_and(|(was, _)| *was) {
            per_listener = Some((on, d.at.clone()));
        }
    }
    let mut st = State {
        per_listener,
        general: general::General::default(),
        listeners: listeners::Listeners::default(),
        bridges: Vec::new(),
        cursors: HashMap::new(),
        local_only: false,
        not_mapped: Vec::new(),
        equivalent: Vec::new(),
    };
    for d in directives {
        if d.name == "per_listener_settings" {
            continue;
        }
        if listeners::handle(&mut st, d)
            || bridges::handle(&mut st, d)
            || general::handle(&mut st, d)
        {
            continue;
        }
        if d.name == "include_dir" {
            st.not_mapped(
                d,
                "only the main file's include_dir is read (as Mosquitto does); this one was not",
            );
        } else {
            st.not_mapped(
                d,
                "not a Mosquitto 2.0 directive tern migrate knows: nothing was made of it",
            );
        }
    }
    render(st, opts)
}

fn render(mut st: State, opts: &Options) -> Migration {
    let mut planned = listeners::plan(&mut st);
    let (auth, acl_file) = general::auth(&mut st, &mut planned);
    let wide = listeners::broker_wide(&mut st, &planned);
    let mut tables = listeners::tables(planned);
    tables.push(auth);
    tables.extend(general::tables(&mut st, wide));
    let (bridge_tables, secrets) = bridges::tables(&mut st, opts, acl_file.as_deref());
    tables.extend(bridge_tables);

    let mut head = vec![
        format!(
            "Tern configuration migrated from {} by `tern migrate`.",
            opts.source
        ),
        "Each key names the mosquitto.conf line it came from. Check it with\n`tern check --config THIS_FILE`; what differs from Mosquitto is in\ndocs/migrating-from-mosquitto.md.".to_string(),
    ];
    if let Some((true, at)) = &st.per_listener {
        head.push(format!(
            "per_listener_settings true ({at}): authentication is set per listener ([listeners.NAME.auth])."
        ));
    }
    let mut not_mapped = st.not_mapped;
    not_mapped.sort_by(|a, b| order(&a.at, &b.at));
    let mut equivalent = st.equivalent;
    equivalent.sort_by(|a, b| order(&a.at, &b.at));
    let mut tail = Vec::new();
    if !not_mapped.is_empty() {
        tail.push(
            "Not mapped (also printed on standard error when this file was made):".to_string(),
        );
        tail.extend(not_mapped.iter().map(|r| format!("  {r}")));
    }
    if !equivalent.is_empty() {
        tail.push("Already Tern's behaviour, no key needed:".to_string());
        tail.extend(equivalent.iter().map(|r| format!("  {r}")));
    }
    Migration {
        toml: emit::render(&head, &tables, &tail),
        not_mapped,
        equivalent,
        secrets,
    }
}

/// Lines for a comment: `m.conf:3, 5, 9` when they are in one file.
pub(crate) fn locs(lines: &[Loc]) -> String {
    let mut out = String::new();
    let mut file: Option<&str> = None;
    for a in lines {
        if !out.is_empty() {
            out.push_str(", ");
        }
        if file == Some(a.file.as_ref()) {
            out.push_str(&a.line.to_string());
        } else {
            out.push_str(&a.to_string());
            file = Some(a.file.as_ref());
        }
    }
    out
}

/// Reports in file order: the main file's lines and each included file's, as they were read.
fn order(a: &Loc, b: &Loc) -> std::cmp::Ordering {
    (a.file.as_ref(), a.line).cmp(&(b.file.as_ref(), b.line))
}

/// `tern migrate`: read, map, write the TOML (and bridge passwords), list what was not mapped.
pub fn run(args: MigrateArgs) -> ExitCode {
    let read = match parse::read(&args.input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern migrate: {e}");
            return ExitCode::from(2);
        }
    };
    let secret_dir = match &args.output {
        Some(out) => match absolute_dir_of(out) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("tern migrate: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let opts = Options {
        source: args.input.display().to_string(),
        secret_dir,
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty()),
    };
    let mut m = migrate(&read.directives, &opts);
    let mut problems = read.problems;
    problems.append(&mut m.not_mapped);
    problems.sort_by(|a, b| order(&a.at, &b.at));
    for s in &m.secrets {
        if let Err(e) = write_secret(s) {
            eprintln!(
                "tern migrate: cannot write the bridge password to {}: {e}",
                s.path.display()
            );
            return ExitCode::FAILURE;
        }
    }
    match &args.output {
        Some(out) => {
            if let Err(e) = std::fs::write(out, &m.toml) {
                eprintln!("tern migrate: cannot write {}: {e}", out.display());
                return ExitCode::FAILURE;
            }
        }
        None => print!("{}", m.toml),
    }
    for r in &problems {
        eprintln!("{r}");
    }
    let written = match &args.output {
        Some(out) => format!("wrote {}", out.display()),
        None => "wrote the configuration to standard output".to_string(),
    };
    let secrets = match m.secrets.len() {
        0 => String::new(),
        n => format!(
            ", {n} bridge password file{} (mode 0600) beside it",
            if n == 1 { "" } else { "s" }
        ),
    };
    eprintln!(
        "tern migrate: {written}{secrets}; {} directive{} not mapped{}",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        if problems.is_empty() {
            ""
        } else {
            " (listed above)"
        }
    );
    ExitCode::SUCCESS
}

/// The absolute directory `out` will be written in.
fn absolute_dir_of(out: &Path) -> Result<PathBuf, String> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::canonicalize(&dir)
        .map_err(|e| format!("cannot use the directory {}: {e}", dir.display()))
}

/// The password alone in its file, readable by its owner only (whatever mode a file of that
/// name had before). A file already there is made 0600 first, so the atomic write (which
/// keeps an existing file's mode, and gives a new one 0600) never shows the password under
/// its old mode, not even between the rename and a chmod.
fn write_secret(s: &Secret) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::set_permissions(&s.path, std::fs::Permissions::from_mode(0o600)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    crate::auth::password::write_atomically(&s.path, s.password.as_bytes())
}

#[cfg(test)]
mod tests;
