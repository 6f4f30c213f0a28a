//! Reading a mosquitto.conf the way Mosquitto 2.x reads it: one directive per line, its name
//! and its arguments separated by blanks, `#` starting a comment only at the start of a line
//! (`topic # both 1` is a directive, not a comment), and `include_dir DIR` in the main file
//! reading DIR's `*.conf` files in Mosquitto's order at that point. Each directive keeps its
//! file and line, so everything the migration does not map can be pointed at.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a directive stands: the file (as the user named it, or the include directory joined
/// with the file's name) and its 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: Arc<str>,
    pub line: usize,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// One line of configuration.
#[derive(Debug, Clone)]
pub struct Directive {
    pub at: Loc,
    pub name: String,
    /// The blank-separated words after the name.
    pub args: Vec<String>,
    /// Everything after the name, blanks around it removed: a path may hold spaces.
    pub rest: String,
    /// Which reading of a file this came from. Mosquitto starts every file it reads with the
    /// default listener and no bridge, so `listener` and `connection` only reach to the end of
    /// their own file.
    pub scope: usize,
}

/// Something the migration did not carry over, and why: one line on standard error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub at: Loc,
    pub directive: String,
    pub why: String,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.at, self.directive, self.why)
    }
}

impl Report {
    pub fn new(d: &Directive, why: impl Into<String>) -> Report {
        Report {
            at: d.at.clone(),
            directive: d.name.clone(),
            why: why.into(),
        }
    }
}

/// The directives of a configuration, with the include directories read in place.
pub struct Read {
    pub directives: Vec<Directive>,
    /// Include directories that could not be read.
    pub problems: Vec<Report>,
}

/// The directives of one file's text. Mosquitto splits on spaces; tabs count as blanks here
/// too (Mosquitto would take a tab as part of a word and refuse the line).
pub fn parse_text(text: &str, file: &str, scope: usize) -> Vec<Directive> {
    let file: Arc<str> = Arc::from(file);
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_matches(|c: char| c == ' ' || c == '\t' || c == '\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.split_once([' ', '\t']) {
            Some((n, r)) => (n, r.trim_matches([' ', '\t'])),
            None => (line, ""),
        };
        out.push(Directive {
            at: Loc {
                file: file.clone(),
                line: i + 1,
            },
            name: name.to_string(),
            args: rest
                .split([' ', '\t'])
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect(),
            rest: rest.to_string(),
            scope,
        });
    }
    out
}

/// Reads `path` and the `*.conf` files of every `include_dir` in it. Only the main file's
/// `include_dir` lines are followed, as in Mosquitto; one in an included file stays a
/// directive (and is reported). The error is for the main file only.
pub fn read(path: &Path) -> Result<Read, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let name = path.display().to_string();
    let main = parse_text(&String::from_utf8_lossy(&bytes), &name, 0);
    let mut directives = Vec::new();
    let mut problems = Vec::new();
    let mut scope = 0;
    for d in main {
        if d.name != "include_dir" {
            directives.push(d);
            continue;
        }
        let Some(dir) = include_dir(path, &d.rest) else {
            problems.push(Report::new(
                &d,
                format!(
                    "cannot read the directory {:?} (nor relative to {})",
                    d.rest,
                    path.parent()
                        .map_or(".".into(), |p| p.display().to_string())
                ),
            ));
            continue;
        };
        match conf_files(&dir) {
            Ok(files) => {
                for file in files {
                    scope += 1;
                    let shown = dir.join(&file);
                    match std::fs::read(&shown) {
                        Ok(b) => directives.extend(parse_text(
                            &String::from_utf8_lossy(&b),
                            &shown.display().to_string(),
                            scope,
                        )),
                        Err(e) => problems.push(Report::new(
                            &d,
                            format!("cannot read {}: {e}", shown.display()),
                        )),
                    }
                }
            }
            Err(e) => problems.push(Report::new(
                &d,
                format!("cannot list {}: {e}", dir.display()),
            )),
        }
    }
    Ok(Read {
        directives,
        problems,
    })
}

/// Mosquitto reads a relative `include_dir` against its working directory; the migration
/// may run elsewhere, so the main file's directory is tried second.
fn include_dir(main: &Path, arg: &str) -> Option<PathBuf> {
    if arg.is_empty() {
        return None;
    }
    let given = PathBuf::from(arg);
    if given.is_dir() {
        return Some(given);
    }
    if given.is_relative() {
        let beside = main.parent()?.join(&given);
        if beside.is_dir() {
            return Some(beside);
        }
    }
    None
}

/// The names of `dir`'s files ending in `.conf`, in the order Mosquitto loads them.
fn conf_files(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".conf") && entry.path().is_file() {
            names.push(name);
        }
    }
    names.sort_by(|a, b| mosquitto_order(a, b));
    Ok(names)
}

/// Mosquitto's include order: alphabetical without regard to case, and where two names differ
/// only in case, the upper-case letter first (`00.conf`, `A.conf`, `a.conf`, `B.conf`).
pub fn mosquitto_order(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<(u8, bool)> {
        s.bytes()
            .map(|c| (c.to_ascii_lowercase(), c.is_ascii_lowercase()))
            .collect()
    };
    key(a).cmp(&key(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_lines_and_comments() {
        let text = "# a comment\n\n  listener 1883 127.0.0.1\r\ntopic # both 1 a/ b/\npassword_file /etc/my dir/pw\n\t# indented comment\nretain_available\n";
        let d = parse_text(text, "m.conf", 0);
        let seen: Vec<(usize, &str, Vec<&str>)> = d
            .iter()
            .map(|d| {
                (
                    d.at.line,
                    d.name.as_str(),
                    d.args.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (3, "listener", vec!["1883", "127.0.0.1"]),
                (4, "topic", vec!["#", "both", "1", "a/", "b/"]),
                (5, "password_file", vec!["/etc/my", "dir/pw"]),
                (7, "retain_available", vec![]),
            ]
        );
        assert_eq!(d[2].rest, "/etc/my dir/pw");
        assert_eq!(d[0].at.to_string(), "m.conf:3");
    }

    #[test]
    fn include_order_is_mosquittos() {
        let mut names = vec!["b.conf", "A.conf", "01.conf", "a.conf", "B.conf", "00.conf"];
        names.sort_by(|a, b| mosquitto_order(a, b));
        assert_eq!(
            names,
            ["00.conf", "01.conf", "A.conf", "a.conf", "B.conf", "b.conf"]
        );
    }

    #[test]
    fn include_dir_is_read_in_place_and_in_order() {
        let t = crate::migrate::tests::TempDir::new("inc");
        let conf_d = t.0.join("conf.d");
        std::fs::create_dir(&conf_d).unwrap();
        std::fs::write(conf_d.join("b.conf"), "max_qos 1\n").unwrap();
        std::fs::write(conf_d.join("A.conf"), "\nlistener 1884\n").unwrap();
        std::fs::write(conf_d.join("notes.txt"), "not read\n").unwrap();
        let main = t.0.join("mosquitto.conf");
        // Relative to the main file's directory (the test's working directory is elsewhere).
        std::fs::write(
            &main,
            "listener 1883\ninclude_dir conf.d\nsys_interval 5\ninclude_dir missing.d\n",
        )
        .unwrap();
        let r = read(&main).unwrap();
        let seen: Vec<(String, &str, usize)> = r
            .directives
            .iter()
            .map(|d| (d.at.to_string(), d.name.as_str(), d.scope))
            .collect();
        let m = main.display().to_string();
        let a = conf_d.join("A.conf").display().to_string();
        let b = conf_d.join("b.conf").display().to_string();
        assert_eq!(
            seen,
            vec![
                (format!("{m}:1"), "listener", 0),
                (format!("{a}:2"), "listener", 1),
                (format!("{b}:1"), "max_qos", 2),
                (format!("{m}:3"), "sys_interval", 0),
            ]
        );
        assert_eq!(r.problems.len(), 1);
        assert_eq!(r.problems[0].at.to_string(), format!("{m}:4"));
        assert!(r.problems[0].why.contains("missing.d"), "{:?}", r.problems);
    }

    #[test]
    fn unreadable_main_file_is_an_error() {
        let e = read(Path::new("/nonexistent/mosquitto.conf"))
            .err()
            .unwrap();
        assert!(e.contains("/nonexistent/mosquitto.conf"), "{e}");
    }
}
