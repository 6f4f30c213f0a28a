//! The TOML the migration writes, by hand rather than through serde: every key says in a
//! comment which line of mosquitto.conf it came from (and what differs), in the order an
//! operator reads a configuration. Values are formatted by the `toml` crate, so strings are
//! quoted and escaped as TOML wants.

/// One table (`[listeners.tcp]`) or array-of-tables entry (`[[bridges]]`).
pub struct Table {
    pub header: String,
    /// Comment lines written above the header.
    pub notes: Vec<String>,
    /// `key = value`, with a trailing comment when not empty.
    pub keys: Vec<(String, String, String)>,
}

impl Table {
    pub fn new(header: impl Into<String>) -> Table {
        Table {
            header: header.into(),
            notes: Vec::new(),
            keys: Vec::new(),
        }
    }

    /// `value` is TOML text: a number's digits, or [`string`], [`boolean`], [`strings`].
    pub fn set(&mut self, key: &str, value: String, comment: impl Into<String>) {
        self.keys.push((key.to_string(), value, comment.into()));
    }

    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

pub fn string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

pub fn boolean(b: bool) -> String {
    b.to_string()
}

pub fn strings(items: &[&str]) -> String {
    let parts: Vec<String> = items.iter().map(|s| string(s)).collect();
    format!("[{}]", parts.join(", "))
}

/// A TOML comment of any text: one `# ` line per line of it.
pub fn comment_lines(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.is_empty() {
            out.push_str("#\n");
        } else {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The document: `head` (comment lines), the tables with a blank line between them (empty
/// ones left out), then `tail` (comment lines).
pub fn render(head: &[String], tables: &[Table], tail: &[String]) -> String {
    let mut out = String::new();
    for line in head {
        out.push_str(&comment_lines(line));
    }
    for t in tables.iter().filter(|t| !t.is_empty()) {
        out.push('\n');
        for n in &t.notes {
            out.push_str(&comment_lines(n));
        }
        out.push_str(&t.header);
        out.push('\n');
        let width = t
            .keys
            .iter()
            .map(|(k, v, _)| k.len() + 3 + v.len())
            .filter(|&w| w <= 48)
            .max()
            .unwrap_or(0);
        for (k, v, c) in &t.keys {
            let line = format!("{k} = {v}");
            if c.is_empty() {
                out.push_str(&line);
            } else {
                out.push_str(&format!("{line:<width$}  # {}", c.replace('\n', " ")));
            }
            out.push('\n');
        }
    }
    if !tail.is_empty() {
        out.push('\n');
        for line in tail {
            out.push_str(&comment_lines(line));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_valid_toml_with_comments() {
        let mut a = Table::new("[listeners.tcp]");
        a.note("from line 3");
        a.set("bind", string("0.0.0.0:1883"), "m.conf:3");
        a.set("path", string("a \"quoted\"\\path"), "");
        let mut b = Table::new("[[bridges]]");
        b.set("name", string("x"), "m.conf:9 # not a key");
        b.set("out", "[\n  { filter = \"a/#\", qos = 1 },\n]".into(), "");
        let empty = Table::new("[limits]");
        let text = render(&["head".into()], &[a, empty, b], &["tail\nmore".into()]);
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["listeners"]["tcp"]["bind"].as_str(), Some("0.0.0.0:1883"));
        assert_eq!(
            v["listeners"]["tcp"]["path"].as_str(),
            Some("a \"quoted\"\\path")
        );
        assert_eq!(v["bridges"][0]["name"].as_str(), Some("x"));
        assert!(v.get("limits").is_none());
        assert!(text.starts_with("# head\n"), "{text}");
        assert!(text.ends_with("# tail\n# more\n"), "{text}");
        assert!(text.contains("# from line 3\n[listeners.tcp]\n"), "{text}");
    }
}
