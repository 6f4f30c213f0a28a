//! `[admin] token_file`: who may call the admin API.
//!
//! One `name:token` per line; blank lines and `#` comments are skipped. The name is what the
//! audit log records for each call; the token is the bearer secret (`Authorization: Bearer
//! TOKEN`). Only SHA-256 digests of the tokens are kept in memory, and a presented token is
//! hashed and compared against each digest in constant time, so neither the comparison's
//! timing nor a memory dump gives a token away. The file is read at start and again on
//! SIGHUP; a file with an error keeps the tokens in force.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

/// Shortest token accepted: 128 bits of base64 or hex is 22-32 characters; 16 keeps out
/// `admin:admin` while allowing a hex UUID without dashes.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin.token_file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("admin.token_file {path} line {line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: &'static str,
    },
    #[error("admin.token_file {path}: no tokens (the API would refuse every call)")]
    Empty { path: String },
}

struct Token {
    name: String,
    digest: [u8; 32],
}

/// The tokens in force.
pub struct Tokens {
    path: PathBuf,
    tokens: RwLock<Vec<Token>>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

fn parse(text: &str, path: &Path) -> Result<Vec<Token>, TokenError> {
    let err = |line, message| TokenError::Line {
        path: path.display().to_string(),
        line,
        message,
    };
    let mut out: Vec<Token> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, token)) = line.split_once(':') else {
            return Err(err(i + 1, "expected NAME:TOKEN"));
        };
        let name = name.trim();
        let token = token.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
        {
            return Err(err(
                i + 1,
                "the name may hold letters, digits, '-', '_', '.', '@'",
            ));
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(err(i + 1, "the token is shorter than 16 characters"));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(i + 1, "the token holds a space or control character"));
        }
        if out.iter().any(|t| t.name == name) {
            return Err(err(i + 1, "this name is given twice"));
        }
        out.push(Token {
            name: name.to_string(),
            digest: digest(token.as_bytes()),
        });
    }
    if out.is_empty() {
        return Err(TokenError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(out)
}

fn read(path: &Path) -> Result<Vec<Token>, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, path)
}

/// Tokens read from a file, not yet in force (a reload checks every part first).
pub struct PreparedTokens(Vec<Token>);

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, TokenError> {
        Ok(Tokens {
            path: path.to_path_buf(),
            tokens: RwLock::new(read(path)?),
        })
    }

    /// Reads `path` (the file named by the new configuration) without applying it.
    pub fn prepare(path: &Path) -> Result<PreparedTokens, TokenError> {
        read(path).map(PreparedTokens)
    }

    pub fn install(&self, p: PreparedTokens) {
        let n = p.0.len();
        *self.tokens.write().unwrap_or_else(PoisonError::into_inner) = p.0;
        tracing::info!(tokens = n, path = %self.path.display(), "admin tokens reloaded");
    }

    /// The name of the token `presented`, if it is one in force.
    pub fn check(&self, presented: &[u8]) -> Option<String> {
        let d = digest(presented);
        let tokens = self.tokens.read().unwrap_or_else(PoisonError::into_inner);
        // Every digest is compared (no early exit), each in constant time.
        let mut found = None;
        for t in tokens.iter() {
            if crate::auth::password::constant_time_eq(&t.digest, &d) {
                found = Some(t.name.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("tokens")
    }

    #[test]
    fn names_and_tokens_are_read_and_checked() {
        let t = parse(
            "# operators\nalice:0123456789abcdef0123\n\n ci-bot : s3cr3t-t0ken-for-ci \n",
            p(),
        )
        .expect("valid");
        let tokens = Tokens {
            path: p().into(),
            tokens: RwLock::new(t),
        };
        assert_eq!(
            tokens.check(b"0123456789abcdef0123").as_deref(),
            Some("alice")
        );
        assert_eq!(
            tokens.check(b"s3cr3t-t0ken-for-ci").as_deref(),
            Some("ci-bot")
        );
        assert_eq!(tokens.check(b"0123456789abcdef012"), None);
        assert_eq!(tokens.check(b""), None);
        assert_eq!(tokens.check(b"alice"), None);
    }

    #[test]
    fn bad_files_say_which_line() {
        for (text, want) in [
            ("alice\n", "line 1: expected NAME:TOKEN"),
            (
                "a:0123456789abcdef\nb:short\n",
                "line 2: the token is shorter",
            ),
            ("a b:0123456789abcdef\n", "line 1: the name may hold"),
            (
                "a:0123456789abcdef\na:0123456789abcdefgh\n",
                "line 2: this name is given twice",
            ),
            ("# nothing\n", "no tokens"),
        ] {
            let e = parse(text, p()).err().expect(text).to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn install_replaces_the_tokens() {
        let tokens = Tokens {
            path: p().into(),
            tokens: RwLock::new(parse("a:aaaaaaaaaaaaaaaa\n", p()).expect("valid")),
        };
        tokens.install(PreparedTokens(
            parse("b:bbbbbbbbbbbbbbbb\n", p()).expect("valid"),
        ));
        assert_eq!(tokens.check(b"aaaaaaaaaaaaaaaa"), None);
        assert_eq!(tokens.check(b"bbbbbbbbbbbbbbbb").as_deref(), Some("b"));
    }
}
