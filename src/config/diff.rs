//! What a reload compares: the keys whose values differ between two configurations.

use super::Config;

impl Config {
    /// Every key whose value differs between `self` and `new`, as `(key, old, new)` with dotted
    /// key paths (`limits.max_packet_size`); a key present in only one of them shows as
    /// `(unset)` on the other side. Reload uses it to say what changed.
    pub fn diff(&self, new: &Config) -> Vec<(String, String, String)> {
        fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        flatten(&key, v, out);
                    }
                }
                other => out.push((prefix.to_string(), other.to_string())),
            }
        }
        let flat = |c: &Config| {
            let mut out = Vec::new();
            // Serialising plain data into a TOML value cannot fail; an empty map would only
            // make the report say less.
            if let Ok(v) = toml::Value::try_from(c) {
                flatten("", &v, &mut out);
            }
            out.into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let (a, b) = (flat(self), flat(new));
        let unset = || "(unset)".to_string();
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| {
                (
                    k.clone(),
                    a.get(k).cloned().unwrap_or_else(unset),
                    b.get(k).cloned().unwrap_or_else(unset),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_changed_keys_with_old_and_new_values() {
        let a = Config::from_toml("[limits]\nmax_packet_size = 2000\n").unwrap();
        let b = Config::from_toml(
            "[limits]\nmax_packet_size = 3000\n[log]\nformat = \"json\"\n[auth]\nacl_file = \"x\"\n",
        )
        .unwrap();
        let d = a.diff(&b);
        assert_eq!(
            d,
            vec![
                ("auth.acl_file".into(), "(unset)".into(), "\"x\"".into()),
                (
                    "limits.max_packet_size".into(),
                    "2000".into(),
                    "3000".into()
                ),
                ("log.format".into(), "\"text\"".into(), "\"json\"".into()),
            ]
        );
        assert!(a.diff(&a.clone()).is_empty());
    }

    /// The diff compares parsed values: a time key rewritten in another form is no change.
    #[test]
    fn diff_compares_durations_by_value_not_spelling() {
        let a = Config::from_toml(
            "[limits]\nwrite_timeout = 30\nconnect_timeout = 60\n[sys_topics]\ninterval = 10\n",
        )
        .unwrap();
        let b = Config::from_toml(
            "[limits]\nwrite_timeout = \"30s\"\nconnect_timeout = \"1m\"\n[sys_topics]\ninterval = \"10\"\n",
        )
        .unwrap();
        assert!(a.diff(&b).is_empty(), "{:?}", a.diff(&b));
        let c =
            Config::from_toml("[limits]\nwrite_timeout = \"5m\"\nconnect_timeout = \"1500ms\"\n")
                .unwrap();
        assert_eq!(
            a.diff(&c),
            vec![
                (
                    "limits.connect_timeout".into(),
                    "60".into(),
                    "\"1500ms\"".into()
                ),
                ("limits.write_timeout".into(), "30".into(), "300".into()),
            ]
        );
    }
}
