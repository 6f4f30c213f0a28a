//! Password authentication against a Mosquitto-format password file (`[auth] password_file`).
//!
//! One user per line, `username:hash`, where the hash is either
//!
//! * `$7$<iterations>$<base64 salt>$<base64 hash>`: PBKDF2-HMAC-SHA512, what `mosquitto_passwd`
//!   (Mosquitto 2.x) writes: a 12-byte salt, a 64-byte hash and 101 iterations by default; or
//! * `$6$<base64 salt>$<base64 hash>`: SHA-512 of the password followed by the salt, Mosquitto
//!   1.x's format, accepted so old files keep working.
//!
//! Base64 is the standard alphabet with padding. Blank lines and lines starting with `#` are
//! ignored (and kept by [`PasswordFile::to_text`]). Anything else that does not parse is an
//! error naming the file and the line: a broker that silently dropped a user would lock that
//! user out with no explanation.
//!
//! A file written by `tern passwd` is accepted by Mosquitto and the other way round.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use sha2::{Digest, Sha512};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Mosquitto's default PBKDF2 iteration count (`PW_DEFAULT_ITERATIONS` in mosquitto_passwd 2.x).
pub const DEFAULT_ITERATIONS: u32 = 101;
/// Mosquitto's salt length (`SALT_LEN`), in bytes.
pub const SALT_LEN: usize = 12;
/// Length of a SHA-512 digest and of the PBKDF2 output Mosquitto stores, in bytes.
pub const HASH_LEN: usize = 64;

/// Base64, standard alphabet. Writes padding (as Mosquitto does); reads with or without.
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("cannot read password file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write password file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("password file {origin}, line {line}: {reason}")]
    Malformed {
        origin: String,
        line: usize,
        reason: String,
    },
    #[error("invalid username {0:?}: it must be non-empty, contain no ':' or control characters, not start with '#' and not start or end with a blank")]
    InvalidUsername(String),
    #[error("cannot get random bytes for a salt: {0}")]
    Random(String),
}

/// A stored password hash.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Hash {
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// `$6$`: SHA-512(password || salt).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
}

impl Hash {
    /// Hash `password` the way this entry was hashed and compare in constant time.
    fn matches(&self, password: &[u8]) -> bool {
        match self {
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = [0u8; HASH_LEN];
                #[cfg(test)]
                tests::PBKDF2_ROUNDS.with(|c| c.set(c.get() + u64::from(*iterations)));
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                constant_time_eq(&out, hash)
            }
            Hash::Sha512 { salt, hash } => {
                let mut d = Sha512::new();
                d.update(password);
                d.update(salt);
                constant_time_eq(&d.finalize(), hash)
            }
        }
    }

    fn encode(&self) -> String {
        match self {
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => format!("$7${iterations}${}${}", B64.encode(salt), B64.encode(hash)),
            Hash::Sha512 { salt, hash } => format!("$6${}${}", B64.encode(salt), B64.encode(hash)),
        }
    }

    /// Parse the part after `username:`; the error is the reason, without the location.
    fn parse(text: &str) -> Result<Hash, String> {
        let decode = |what: &str, s: &str| -> Result<Vec<u8>, String> {
            let v = B64
                .decode(s)
                .map_err(|e| format!("{what} is not valid base64 ({e})"))?;
            if v.is_empty() {
                return Err(format!("{what} is empty"));
            }
            Ok(v)
        };
        let hash_of = |s: &str| -> Result<Vec<u8>, String> {
            let h = decode("hash", s)?;
            if h.len() != HASH_LEN {
                return Err(format!(
                    "hash is {} bytes, expected {HASH_LEN} (SHA-512)",
                    h.len()
                ));
            }
            Ok(h)
        };
        if let Some(rest) = text.strip_prefix("$7$") {
            let parts: Vec<&str> = rest.split('$').collect();
            let [iterations, salt, hash] = parts[..] else {
                return Err("expected $7$<iterations>$<salt>$<hash>".into());
            };
            let iterations: u32 = iterations.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                format!("iteration count {iterations:?} is not a positive integer")
            })?;
            Ok(Hash::Pbkdf2Sha512 {
                iterations,
                salt: decode("salt", salt)?,
                hash: hash_of(hash)?,
            })
        } else if let Some(rest) = text.strip_prefix("$6$") {
            let parts: Vec<&str> = rest.split('$').collect();
            let [salt, hash] = parts[..] else {
                return Err("expected $6$<salt>$<hash>".into());
            };
            Ok(Hash::Sha512 {
                salt: decode("salt", salt)?,
                hash: hash_of(hash)?,
            })
        } else if text.is_empty() {
            Err("no password hash after ':'".into())
        } else {
            Err("unsupported password hash (expected $7$... or $6$...; plain-text passwords are not accepted, hash the file with `tern passwd` or `mosquitto_passwd -U`)".into())
        }
    }
}

/// One line of the file, in order: users, and the comments and blank lines between them.
#[derive(Clone, Debug)]
enum Line {
    User { username: String, hash: Hash },
    Other(String),
}

/// A parsed password file.
#[derive(Clone, Debug, Default)]
pub struct PasswordFile {
    lines: Vec<Line>,
    /// Username to its index in `lines`.
    index: HashMap<String, usize>,
}

/// The hash spent on unknown users, so a failed login takes as long whether or not the user
/// exists. Same cost as a default `$7$` entry; the values are irrelevant.
fn dummy_hash() -> Hash {
    Hash::Pbkdf2Sha512 {
        iterations: DEFAULT_ITERATIONS,
        salt: vec![0x5a; SALT_LEN],
        hash: vec![0; HASH_LEN],
    }
}

/// Mosquitto trims spaces and tabs around the username and the hash.
fn trim_blanks(s: &str) -> &str {
    s.trim_matches(|c| c == ' ' || c == '\t')
}

/// Whether `username` can be written to a password file and read back as itself (by Tern and
/// by Mosquitto).
pub fn valid_username(username: &str) -> bool {
    !username.is_empty()
        && !username.starts_with('#')
        && trim_blanks(username) == username
        && !username.contains(':')
        && !username.chars().any(char::is_control)
}

impl PasswordFile {
    /// Read and parse a password file. Errors name the file (and the line when it is malformed).
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswordError::Read {
            path: path.display().to_string(),
            source,
        })?;
        PasswordFile::parse(&text, &path.display().to_string())
    }

    /// Parse the text of a password file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<PasswordFile, PasswordError> {
        let mut file = PasswordFile::default();
        for (i, raw) in text.lines().enumerate() {
            let malformed = |reason: String| PasswordError::Malformed {
                origin: origin.to_string(),
                line: i + 1,
                reason,
            };
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if trim_blanks(line).is_empty() || line.starts_with('#') {
                file.lines.push(Line::Other(line.to_string()));
                continue;
            }
            let Some((username, hash)) = line.split_once(':') else {
                return Err(malformed("expected username:hash".into()));
            };
            let username = trim_blanks(username);
            if username.is_empty() {
                return Err(malformed("empty username".into()));
            }
            if file.index.contains_key(username) {
                return Err(malformed(format!("user {username:?} appears twice")));
            }
            let hash = Hash::parse(trim_blanks(hash)).map_err(malformed)?;
            file.index.insert(username.to_string(), file.lines.len());
            file.lines.push(Line::User {
                username: username.to_string(),
                hash,
            });
        }
        Ok(file)
    }

    /// Whether `password` is `username`'s. Unknown users cost the same hashing time as known
    /// ones, and the final comparison is constant-time.
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        match self.hash_of(username) {
            Some(hash) => hash.matches(password),
            None => {
                let _ = std::hint::black_box(dummy_hash().matches(password));
                false
            }
        }
    }

    fn hash_of(&self, username: &str) -> Option<&Hash> {
        match self.lines.get(*self.index.get(username)?) {
            Some(Line::User { hash, .. }) => Some(hash),
            _ => None,
        }
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains(&self, username: &str) -> bool {
        self.index.contains_key(username)
    }

    /// Usernames in file order.
    pub fn usernames(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().filter_map(|l| match l {
            Line::User { username, .. } => Some(username.as_str()),
            Line::Other(_) => None,
        })
    }

    /// Add `username` or replace its password: a new random salt, `$7$`, Mosquitto's default
    /// iteration count. An existing user keeps its place in the file; a new one is appended.
    pub fn set(&mut self, username: &str, password: &[u8]) -> Result<(), PasswordError> {
        if !valid_username(username) {
            return Err(PasswordError::InvalidUsername(username.to_string()));
        }
        let mut salt = vec![0u8; SALT_LEN];
        getrandom::fill(&mut salt).map_err(|e| PasswordError::Random(e.to_string()))?;
        let mut out = vec![0u8; HASH_LEN];
        pbkdf2::pbkdf2_hmac::<Sha512>(password, &salt, DEFAULT_ITERATIONS, &mut out);
        let hash = Hash::Pbkdf2Sha512 {
            iterations: DEFAULT_ITERATIONS,
            salt,
            hash: out,
        };
        let entry = Line::User {
            username: username.to_string(),
            hash,
        };
        match self.index.get(username) {
            Some(&i) => self.lines[i] = entry,
            None => {
                self.index.insert(username.to_string(), self.lines.len());
                self.lines.push(entry);
            }
        }
        Ok(())
    }

    /// Remove `username`; false when there was no such user.
    pub fn remove(&mut self, username: &str) -> bool {
        let Some(i) = self.index.remove(username) else {
            return false;
        };
        self.lines.remove(i);
        for v in self.index.values_mut() {
            if *v > i {
                *v -= 1;
            }
        }
        true
    }

    /// The file's text: original order (comments and blank lines kept), new users at the end.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            match line {
                Line::User { username, hash } => {
                    out.push_str(username);
                    out.push(':');
                    out.push_str(&hash.encode());
                }
                Line::Other(text) => out.push_str(text),
            }
            out.push('\n');
        }
        out
    }

    /// Write [`to_text`](Self::to_text) to `path` atomically ([`write_atomically`]).
    pub fn save(&self, path: &Path) -> Result<(), PasswordError> {
        write_atomically(path, self.to_text().as_bytes()).map_err(|source| PasswordError::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

/// Writes `content` to `path` atomically: a temporary file in the same directory, fsync,
/// rename over `path`, fsync the directory. A new file gets mode 0600; an existing one keeps
/// its mode (and, where permitted, its owner). A symlink is followed. The password and ACL
/// files are written so (`tern passwd`, the admin API), so a crash leaves the old file or
/// the new one, never half of one.
pub fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let target: PathBuf = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_path_buf(),
        Err(e) => return Err(e),
    };
    let existing = match std::fs::metadata(&target) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let mut nonce = [0u8; 6];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        if let Some(m) = &existing {
            f.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
            // Keep the owner (e.g. a file owned by the broker's user, edited as root); a
            // user who cannot chown gets a file of their own, as with any editor.
            let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
        }
        f.write_all(content)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &target)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Compare two byte strings in time that depends only on their lengths, not their contents.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    thread_local! {
        /// PBKDF2 rounds this thread computed (see `unknown_users_spend_the_hashing_time`).
        pub(super) static PBKDF2_ROUNDS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    use super::*;

    // Made by `mosquitto_passwd -b` 2.0.11 (password "secret") and `-H sha512` (password "hunter2").
    const MOSQ_7: &str = "alice:$7$101$thf+ZbKx1M+BBZLt$oAfvDhQAjBK0LYAGOAv2Px6oC605buEdtg2r3zzDF6zsNF0yO3qGxHPQHer4bpvVB5i8AajBw/EHN+iU1t33zg==";
    const MOSQ_6: &str = "olduser:$6$Fj3M2BoKAw7TzFmx$jPZHWsotJkVujc5Kc5LGSkUYboHX/wEalQD0sSD3ut+P0KdbPep79ZpXpMsECyxEy3fqjUtq4CfpUxndXEo+CQ==";

    fn sha512_line(user: &str, password: &[u8], salt: &[u8]) -> String {
        let mut d = Sha512::new();
        d.update(password);
        d.update(salt);
        format!(
            "{user}:$6${}${}",
            B64.encode(salt),
            B64.encode(d.finalize())
        )
    }

    #[test]
    fn verifies_mosquitto_pbkdf2_line() {
        let f = PasswordFile::parse(MOSQ_7, "t").unwrap();
        assert_eq!(f.len(), 1);
        assert!(f.verify("alice", b"secret"));
        assert!(!f.verify("alice", b"secreT"));
        assert!(!f.verify("alice", b""));
        assert!(!f.verify("bob", b"secret"));
    }

    #[test]
    fn verifies_mosquitto_sha512_line() {
        let f = PasswordFile::parse(MOSQ_6, "t").unwrap();
        assert!(f.verify("olduser", b"hunter2"));
        assert!(!f.verify("olduser", b"hunter"));
        assert_eq!(f.to_text(), format!("{MOSQ_6}\n"));
    }

    #[test]
    fn verifies_sha512_line() {
        let text = sha512_line("old", b"hunter2", b"0123456789ab");
        let f = PasswordFile::parse(&text, "t").unwrap();
        assert!(f.verify("old", b"hunter2"));
        assert!(!f.verify("old", b"hunter3"));
        // The text written back is the text read.
        assert_eq!(f.to_text(), format!("{text}\n"));
    }

    #[test]
    fn comments_blanks_and_order_are_kept() {
        let text = format!(
            "# users\n\n{MOSQ_7}\r\n  \n{}\n",
            sha512_line("bob", b"pw", b"saltsaltsalt")
        );
        let mut f = PasswordFile::parse(&text, "t").unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f.usernames().collect::<Vec<_>>(), ["alice", "bob"]);
        f.set("carol", b"c").unwrap();
        f.set("alice", b"new").unwrap();
        let out = f.to_text();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "# users");
        assert_eq!(lines[1], "");
        assert!(lines[2].starts_with("alice:$7$101$"));
        assert_eq!(lines[3], "  ");
        assert!(lines[4].starts_with("bob:$6$"));
        assert!(lines[5].starts_with("carol:$7$101$"));
        let g = PasswordFile::parse(&out, "t").unwrap();
        assert_eq!(g.len(), 3);
        assert!(g.verify("alice", b"new"));
        assert!(!g.verify("alice", b"secret"));
        assert!(g.verify("bob", b"pw"));
        assert!(g.verify("carol", b"c"));
    }

    #[test]
    fn set_writes_mosquitto_shape_and_round_trips() {
        let mut f = PasswordFile::default();
        assert!(f.is_empty());
        f.set("u", b"p\xffbinary").unwrap();
        let text = f.to_text();
        let hash = text.trim_end().strip_prefix("u:$7$101$").unwrap();
        let (salt, h) = hash.split_once('$').unwrap();
        assert_eq!(B64.decode(salt).unwrap().len(), SALT_LEN);
        assert_eq!(B64.decode(h).unwrap().len(), HASH_LEN);
        assert!(h.ends_with("=="), "padded like Mosquitto: {h}");
        let g = PasswordFile::parse(&text, "t").unwrap();
        assert!(g.verify("u", b"p\xffbinary"));
        // New salt each time.
        let mut f2 = PasswordFile::default();
        f2.set("u", b"p\xffbinary").unwrap();
        assert_ne!(f2.to_text(), text);
    }

    #[test]
    fn remove_user() {
        let mut f = PasswordFile::default();
        for u in ["a", "b", "c"] {
            f.set(u, u.as_bytes()).unwrap();
        }
        assert!(f.remove("b"));
        assert!(!f.remove("b"));
        assert_eq!(f.len(), 2);
        assert!(f.verify("c", b"c"));
        f.set("a", b"x").unwrap();
        assert_eq!(f.usernames().collect::<Vec<_>>(), ["a", "c"]);
        assert!(f.verify("a", b"x"));
    }

    #[test]
    fn invalid_usernames_are_refused() {
        let mut f = PasswordFile::default();
        for u in ["", "a:b", "#x", " a", "a\t", "a\nb", "a\0"] {
            assert!(
                matches!(f.set(u, b"p"), Err(PasswordError::InvalidUsername(_))),
                "{u:?}"
            );
        }
        assert!(f.is_empty());
        f.set("user name with spaces", b"p").unwrap();
        f.set("ünïcode", b"p").unwrap();
        let g = PasswordFile::parse(&f.to_text(), "t").unwrap();
        assert!(g.verify("user name with spaces", b"p"));
        assert!(g.verify("ünïcode", b"p"));
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let good = MOSQ_7;
        let cases = [
            "nocolon".to_string(),
            ":$7$101$AAAA$AAAA".to_string(),
            "bob:plaintext".to_string(),
            "bob:".to_string(),
            "bob:$7$101$thf+ZbKx1M+BBZLt".to_string(),
            "bob:$7$0$thf+ZbKx1M+BBZLt$AAAA".to_string(),
            "bob:$7$x$thf+ZbKx1M+BBZLt$AAAA".to_string(),
            "bob:$7$101$!!!$AAAA".to_string(),
            "bob:$7$101$$AAAA".to_string(),
            "bob:$7$101$thf+ZbKx1M+BBZLt$AAAA".to_string(), // 3-byte hash
            "bob:$6$onlyone".to_string(),
            "bob:$5$a$b".to_string(),
            good.to_string(), // duplicate user
        ];
        for bad in cases {
            let text = format!("# c\n{good}\n\n{bad}\n");
            match PasswordFile::parse(&text, "/etc/tern/passwd") {
                Err(e @ PasswordError::Malformed { line: 4, .. }) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("/etc/tern/passwd") && msg.contains("line 4"),
                        "{msg}"
                    );
                    // The message never echoes the hash material.
                    assert!(!msg.contains("oAfvDhQAj"), "{msg}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn load_names_missing_file() {
        let e = PasswordFile::load(Path::new("/nonexistent/tern-pw")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/tern-pw"), "{e}");
    }

    #[test]
    fn save_is_atomic_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tern-pw-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("passwd");
        let _ = std::fs::remove_file(&path);
        let mut f = PasswordFile::default();
        f.set("a", b"1").unwrap();
        f.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let mut g = PasswordFile::load(&path).unwrap();
        g.set("b", b"2").unwrap();
        g.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "an existing file keeps its mode");
        let h = PasswordFile::load(&path).unwrap();
        assert!(h.verify("a", b"1") && h.verify("b", b"2"));
        let leftovers = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn constant_time_helper() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"bbc"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        let a = [0u8; 64];
        let mut b = a;
        b[63] = 1;
        assert!(!constant_time_eq(&a, &b));
    }

    #[test]
    fn unknown_users_spend_the_hashing_time() {
        // Counted, not timed (a timing test is noise on a loaded machine): a refused unknown
        // user runs PBKDF2 with the rounds of a default entry, at least those of a real one.
        let f = PasswordFile::parse(MOSQ_7, "t").unwrap();
        let rounds = |user: &str| {
            PBKDF2_ROUNDS.with(|c| c.set(0));
            assert!(!f.verify(user, b"x"));
            PBKDF2_ROUNDS.with(|c| c.get())
        };
        let unknown = rounds("nobody");
        let known = rounds("alice");
        assert_eq!(unknown, u64::from(DEFAULT_ITERATIONS));
        assert!(
            known > 0 && unknown >= known,
            "unknown {unknown} vs known {known}"
        );
    }
}
