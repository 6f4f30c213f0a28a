//! Users and ACL rules at runtime, kept in the configured files.
//!
//! The password file and the ACL file stay the one source of truth: a call reads the file,
//! changes it, checks the result with the same parser the broker loads it with, writes it
//! atomically (`auth::password::write_atomically`) and reloads the authoriser from it, so
//! `tern check`, a SIGHUP and a restart all see what the API made. Without the file
//! configured, the call answers 409 and changes nothing: there is nowhere to keep the change.

use super::{audited, Admin, ApiError, Caller};
use crate::auth::acl;
use crate::auth::password::{valid_username, write_atomically, PasswordFile};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;
use std::path::PathBuf;

fn password_path(admin: &Admin) -> Result<PathBuf, ApiError> {
    admin.broker.auth.settings().password_file.ok_or_else(|| {
        ApiError::Conflict("no auth.password_file is configured: users cannot be kept".into())
    })
}

fn acl_path(admin: &Admin) -> Result<PathBuf, ApiError> {
    admin.broker.auth.settings().acl_file.ok_or_else(|| {
        ApiError::Conflict("no auth.acl_file is configured: rules cannot be kept".into())
    })
}

/// The ACL file's path and text.
fn read_acl(admin: &Admin) -> Result<(PathBuf, String), ApiError> {
    let path = acl_path(admin)?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ApiError::Failed(format!("{}: {e}", path.display())))?;
    Ok((path, text))
}

/// Re-reads both files into the authoriser (what a SIGHUP does for `[auth]`).
fn reload_auth(admin: &Admin) -> Result<(), ApiError> {
    let prepared = admin
        .broker
        .auth
        .prepare_here(&admin.broker.auth.settings())
        .map_err(|e| ApiError::Failed(format!("written, but the reload failed: {e}")))?;
    admin.broker.auth.install(prepared);
    Ok(())
}

/// `GET /users`: the user names in the password file (never their hashes).
pub(super) async fn list(State(admin): State<Admin>) -> Result<Response, ApiError> {
    let path = password_path(&admin)?;
    let file = PasswordFile::load(&path).map_err(|e| ApiError::Failed(e.to_string()))?;
    let users: Vec<&str> = file.usernames().collect();
    Ok(Json(json!({ "items": users, "next": null })).into_response())
}

/// Body of `PUT /users/{name}`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct SetPassword {
    password: String,
}

/// `PUT /users/{name}` `{"password": "..."}`: adds the user or changes its password.
pub(super) async fn set(
    State(admin): State<Admin>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(body): Json<SetPassword>,
) -> Response {
    let _files = admin.files.lock().await;
    let r = (|| {
        if !valid_username(&name) {
            return Err(ApiError::BadRequest(format!(
                "{name:?} is not a valid user name"
            )));
        }
        if body.password.is_empty() {
            return Err(ApiError::BadRequest("the password is empty".into()));
        }
        let path = password_path(&admin)?;
        let mut file = match PasswordFile::load(&path) {
            Ok(f) => f,
            Err(e) => return Err(ApiError::Failed(e.to_string())),
        };
        let existed = file.contains(&name);
        file.set(&name, body.password.as_bytes())
            .map_err(|e| ApiError::Failed(e.to_string()))?;
        file.save(&path)
            .map_err(|e| ApiError::Failed(e.to_string()))?;
        reload_auth(&admin)?;
        Ok(json!({ "user": name, "created": !existed }))
    })();
    audited(&caller, "set_user", &name, r)
}

/// `DELETE /users/{name}`. Connected clients of that user stay connected (their CONNECT was
/// authenticated); kick them to make them authenticate again.
pub(super) async fn remove(
    State(admin): State<Admin>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    let _files = admin.files.lock().await;
    let r = (|| {
        let path = password_path(&admin)?;
        let mut file = PasswordFile::load(&path).map_err(|e| ApiError::Failed(e.to_string()))?;
        if !file.remove(&name) {
            return Err(ApiError::NotFound(format!("no user {name:?}")));
        }
        file.save(&path)
            .map_err(|e| ApiError::Failed(e.to_string()))?;
        reload_auth(&admin)?;
        Ok(json!({ "user": name, "deleted": true }))
    })();
    audited(&caller, "delete_user", &name, r)
}

/// One ACL rule, as the API takes and gives it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub(super) struct Rule {
    /// `topic` (belongs to `user`'s section, or the anonymous one when `user` is null) or
    /// `pattern` (applies to everyone; `user` must be null).
    kind: String,
    #[serde(default)]
    user: Option<String>,
    /// `read`, `write`, `readwrite` or `deny`.
    access: String,
    filter: String,
}

impl Rule {
    fn check(&self) -> Result<(), ApiError> {
        let bad = |m: &str| Err(ApiError::BadRequest(m.to_string()));
        if !matches!(self.kind.as_str(), "topic" | "pattern") {
            return bad("kind must be topic or pattern");
        }
        if self.kind == "pattern" && self.user.is_some() {
            return bad("a pattern applies to every client: leave user out");
        }
        if !matches!(
            self.access.as_str(),
            "read" | "write" | "readwrite" | "deny"
        ) {
            return bad("access must be read, write, readwrite or deny");
        }
        if self.filter.is_empty() || self.filter.contains(['\n', '\r']) {
            return bad("the filter is empty or spans lines");
        }
        if let Some(u) = &self.user {
            if u.is_empty() || u.contains(['\n', '\r']) {
                return bad("the user name is empty or spans lines");
            }
        }
        Ok(())
    }

    fn line(&self) -> String {
        format!("{} {} {}", self.kind, self.access, self.filter)
    }
}

/// What a line of an ACL file is, for editing it.
enum Line<'a> {
    User(&'a str),
    Rule {
        kind: &'a str,
        access: &'a str,
        filter: &'a str,
    },
    Other,
}

fn classify(line: &str) -> Line<'_> {
    let t = line.trim();
    if let Some(rest) = t.strip_prefix("user ") {
        return Line::User(rest.trim());
    }
    for kind in ["topic", "pattern"] {
        if let Some(rest) = t.strip_prefix(kind).and_then(|r| r.strip_prefix(' ')) {
            let rest = rest.trim();
            return match rest.split_once(' ') {
                Some((a, f)) if matches!(a, "read" | "write" | "readwrite" | "deny") => {
                    Line::Rule {
                        kind,
                        access: a,
                        filter: f.trim(),
                    }
                }
                // No access word: the whole rest is the filter, read and write.
                _ => Line::Rule {
                    kind,
                    access: "readwrite",
                    filter: rest,
                },
            };
        }
    }
    Line::Other
}

/// Every rule of an ACL file's text, with its section.
fn rules_of(text: &str) -> Vec<Rule> {
    let mut user: Option<&str> = None;
    let mut out = Vec::new();
    for line in text.lines() {
        match classify(line) {
            Line::User(u) => user = Some(u),
            Line::Rule {
                kind,
                access,
                filter,
            } => out.push(Rule {
                kind: kind.to_string(),
                user: if kind == "topic" {
                    user.map(str::to_string)
                } else {
                    None
                },
                access: access.to_string(),
                filter: filter.to_string(),
            }),
            Line::Other => {}
        }
    }
    out
}

/// `text` with `rule` added where it belongs: a user's rule at the end of that user's last
/// section (a new section at the end when there is none), an anonymous one before the first
/// `user` line, a pattern at the end.
fn with_rule(text: &str, rule: &Rule) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut at = lines.len();
    let mut new_section = false;
    match (rule.kind.as_str(), &rule.user) {
        ("topic", None) => {
            if let Some(i) = lines
                .iter()
                .position(|l| matches!(classify(l), Line::User(_)))
            {
                at = i;
            }
        }
        ("topic", Some(u)) => {
            let mut section_end = None;
            let mut inside = false;
            for (i, l) in lines.iter().enumerate() {
                if let Line::User(name) = classify(l) {
                    if inside {
                        section_end = Some(i);
                    }
                    inside = name == u;
                }
            }
            if inside {
                section_end = Some(lines.len());
            }
            match section_end {
                Some(i) => at = i,
                None => new_section = true,
            }
        }
        _ => {}
    }
    let mut out = String::new();
    for l in &lines[..at] {
        out.push_str(l);
        out.push('\n');
    }
    if new_section {
        if let Some(u) = &rule.user {
            out.push_str(&format!("\nuser {u}\n"));
        }
    }
    out.push_str(&rule.line());
    out.push('\n');
    for l in &lines[at..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// `text` without the first line that is `rule` in `rule`'s section; None when there is none.
fn without_rule(text: &str, rule: &Rule) -> Option<String> {
    let mut user: Option<&str> = None;
    let mut removed = false;
    let mut out = String::new();
    for line in text.lines() {
        let skip = !removed
            && match classify(line) {
                Line::User(u) => {
                    user = Some(u);
                    false
                }
                Line::Rule {
                    kind,
                    access,
                    filter,
                } => {
                    kind == rule.kind
                        && access == rule.access
                        && filter == rule.filter
                        && (kind == "pattern" || user == rule.user.as_deref())
                }
                Line::Other => false,
            };
        if skip {
            removed = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    removed.then_some(out)
}

/// `GET /acl`: every rule of the ACL file, in file order.
pub(super) async fn acl(State(admin): State<Admin>) -> Result<Response, ApiError> {
    let (_, text) = read_acl(&admin)?;
    Ok(Json(json!({ "items": rules_of(&text), "next": null })).into_response())
}

/// Checks `text` as the broker would load it, writes it and reloads the rules.
fn store_acl(admin: &Admin, path: &std::path::Path, text: &str) -> Result<(), ApiError> {
    acl::parse(text, &path.display().to_string())
        .map_err(|e| ApiError::BadRequest(format!("the rule makes the file invalid: {e}")))?;
    write_atomically(path, text.as_bytes())
        .map_err(|e| ApiError::Failed(format!("{}: {e}", path.display())))?;
    reload_auth(admin)
}

/// `POST /acl` with a rule: adds it.
pub(super) async fn acl_add(
    State(admin): State<Admin>,
    Extension(caller): Extension<Caller>,
    Json(rule): Json<Rule>,
) -> Response {
    let _files = admin.files.lock().await;
    let r = (|| {
        rule.check()?;
        let (path, text) = read_acl(&admin)?;
        if rules_of(&text).contains(&rule) {
            return Err(ApiError::Conflict("the rule is already there".into()));
        }
        store_acl(&admin, &path, &with_rule(&text, &rule))?;
        Ok(json!({ "added": rule }))
    })();
    audited(&caller, "add_acl_rule", &rule.line(), r)
}

/// `DELETE /acl` with a rule: removes it (its first occurrence in its section).
pub(super) async fn acl_remove(
    State(admin): State<Admin>,
    Extension(caller): Extension<Caller>,
    Json(rule): Json<Rule>,
) -> Response {
    let _files = admin.files.lock().await;
    let r = (|| {
        rule.check()?;
        let (path, text) = read_acl(&admin)?;
        let Some(next) = without_rule(&text, &rule) else {
            return Err(ApiError::NotFound("no such rule".into()));
        };
        store_acl(&admin, &path, &next)?;
        Ok(json!({ "removed": rule }))
    })();
    audited(&caller, "remove_acl_rule", &rule.line(), r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(kind: &str, user: Option<&str>, access: &str, filter: &str) -> Rule {
        Rule {
            kind: kind.into(),
            user: user.map(Into::into),
            access: access.into(),
            filter: filter.into(),
        }
    }

    const FILE: &str = "# anon\ntopic read public/#\n\nuser alice\ntopic readwrite a/#\n\nuser bob\ntopic b/#\npattern write dev/%c\n";

    #[test]
    fn rules_are_read_with_their_sections() {
        assert_eq!(
            rules_of(FILE),
            vec![
                rule("topic", None, "read", "public/#"),
                rule("topic", Some("alice"), "readwrite", "a/#"),
                rule("topic", Some("bob"), "readwrite", "b/#"),
                rule("pattern", None, "write", "dev/%c"),
            ]
        );
    }

    #[test]
    fn a_rule_goes_into_its_section_and_comes_out_again() {
        for r in [
            rule("topic", None, "deny", "public/secret"),
            rule("topic", Some("alice"), "read", "x/#"),
            rule("topic", Some("bob"), "deny", "b/secret"),
            rule("topic", Some("carol"), "read", "c/#"),
            rule("pattern", None, "read", "users/%u/#"),
        ] {
            let added = with_rule(FILE, &r);
            acl::parse(&added, "t").expect("still a valid file");
            let rules = rules_of(&added);
            assert!(rules.contains(&r), "{r:?} in\n{added}");
            assert_eq!(rules.len(), 5, "{added}");
            let removed = without_rule(&added, &r).expect("found again");
            assert_eq!(rules_of(&removed), rules_of(FILE), "{removed}");
        }
        // The anonymous rule lands before the first user line, where the parser reads it as
        // anonymous.
        let anon = with_rule(FILE, &rule("topic", None, "read", "z"));
        assert!(
            anon.find("topic read z") < anon.find("user alice"),
            "{anon}"
        );
    }

    #[test]
    fn removing_needs_the_right_section() {
        assert!(without_rule(FILE, &rule("topic", Some("bob"), "readwrite", "a/#")).is_none());
        assert!(without_rule(FILE, &rule("topic", None, "readwrite", "a/#")).is_none());
        assert!(without_rule(FILE, &rule("topic", Some("alice"), "read", "a/#")).is_none());
        assert!(without_rule(FILE, &rule("topic", Some("bob"), "readwrite", "b/#")).is_some());
    }

    #[test]
    fn rules_are_checked() {
        assert!(rule("topic", None, "read", "a").check().is_ok());
        assert!(rule("pattern", Some("u"), "read", "a").check().is_err());
        assert!(rule("topic", None, "all", "a").check().is_err());
        assert!(rule("user", None, "read", "a").check().is_err());
        assert!(rule("topic", None, "read", "a\nuser x").check().is_err());
        assert!(rule("topic", Some("x\ny"), "read", "a").check().is_err());
    }
}
