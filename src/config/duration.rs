//! Durations: the one way every time key of the configuration is read.
//!
//! A time key holds a [`std::time::Duration`] and accepts two forms:
//!
//! - an **integer**, in the unit the key has always had (its *integer unit*): seconds for every
//!   time key today, so `write_timeout = 30`, `TERN__LIMITS__WRITE_TIMEOUT=30` and
//!   `write_timeout = "30"` all mean 30 seconds, exactly as before units existed;
//! - a **string with a unit**: a non-negative integer followed by `ms`, `s`, `m`, `h` or `d`
//!   (milliseconds, seconds, minutes, hours, days of 24 hours), optionally with spaces between:
//!   `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"14d"`.
//!
//! Deliberately not accepted: fractions (`"1.5h"`: write `"90m"`), combinations (`"1h30m"`),
//! weeks (`"14d"` says what `"2w"` would, with one unit fewer to learn), months and years (no
//! fixed length), upper-case units (`"5M"` reads as months), and negative numbers. Anything else is an error naming the key, such as
//! ``configuration key `limits.write_timeout`: invalid duration "3 parsecs": expected an
//! integer number of seconds or a number with a unit ms, s, m, h, d``.
//!
//! The integer unit belongs to the key, not to the value: a field says it with
//! `#[serde(with = "duration::seconds")]`. A key whose name carries another unit (a future
//! `*_ms` key) would get a sibling module passing [`Unit::Millis`] to the same functions, so
//! its integers keep meaning milliseconds while `"2s"` works there too.
//!
//! Serialising (what the reload diff and the docs check compare) writes the integer in the
//! key's unit when the duration is a whole number of it, else the canonical string
//! ([`display`]): `30` and `"30s"` read into the same value and serialise identically, so a
//! reload that rewrites one as the other changes nothing.
//!
//! Parsing is overflow-safe: a number too large for a `Duration` in its unit is an error, never
//! a wrap or a panic. Ranges that depend on the key (at least 1 s, whole seconds, at most
//! 65535 s ...) are checked by validation, which names the key too.

use serde::{de, Deserializer, Serializer};
use std::fmt;
use std::time::Duration;

/// A unit a duration's number can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Millis,
    Seconds,
    Minutes,
    Hours,
    Days,
}

impl Unit {
    /// Every unit with its suffix, largest first (the order [`display`] tries them in).
    const ALL: [Unit; 5] = [
        Unit::Days,
        Unit::Hours,
        Unit::Minutes,
        Unit::Seconds,
        Unit::Millis,
    ];

    /// What follows the number in a string.
    pub fn suffix(self) -> &'static str {
        match self {
            Unit::Millis => "ms",
            Unit::Seconds => "s",
            Unit::Minutes => "m",
            Unit::Hours => "h",
            Unit::Days => "d",
        }
    }

    /// Its name in "an integer number of ...".
    fn name(self) -> &'static str {
        match self {
            Unit::Millis => "milliseconds",
            Unit::Seconds => "seconds",
            Unit::Minutes => "minutes",
            Unit::Hours => "hours",
            Unit::Days => "days",
        }
    }

    fn nanos(self) -> u128 {
        const MS: u128 = 1_000_000;
        match self {
            Unit::Millis => MS,
            Unit::Seconds => 1000 * MS,
            Unit::Minutes => 60_000 * MS,
            Unit::Hours => 3_600_000 * MS,
            Unit::Days => 86_400_000 * MS,
        }
    }

    /// `n` of this unit; `None` when that does not fit in a `Duration`.
    pub fn times(self, n: u64) -> Option<Duration> {
        let secs = match self {
            Unit::Millis => return Some(Duration::from_millis(n)),
            Unit::Seconds => 1,
            Unit::Minutes => 60,
            Unit::Hours => 3600,
            Unit::Days => 86_400,
        };
        n.checked_mul(secs).map(Duration::from_secs)
    }

    fn of_suffix(s: &str) -> Option<Unit> {
        Unit::ALL.into_iter().find(|u| u.suffix() == s)
    }
}

/// Why a value is not a duration. Its text is the whole message after the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not an integer and not a number with a known unit; `value` as written (strings quoted).
    #[error(
        "invalid duration {value}: expected an integer number of {} or a number with a unit ms, s, m, h, d",
        .integer_unit.name()
    )]
    Invalid { value: String, integer_unit: Unit },
    /// A number too large for a `Duration` in its unit.
    #[error("invalid duration {value}: too large")]
    TooLarge { value: String },
}

/// The start of every [`DurationError`] message; loading recognises these errors by it to put
/// the key in front (`ConfigError::from_loader`).
pub(super) const ERROR_PREFIX: &str = "invalid duration ";

/// Reads `text` as a duration: an integer in `integer_unit`, or a number with a unit.
pub fn parse(text: &str, integer_unit: Unit) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid {
        value: format!("{text:?}"),
        integer_unit,
    };
    let trimmed = text.trim();
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(digits);
    if number.is_empty() {
        return Err(invalid());
    }
    let suffix = suffix.trim_start();
    let unit = if suffix.is_empty() {
        integer_unit
    } else {
        Unit::of_suffix(suffix).ok_or_else(invalid)?
    };
    // Only ASCII digits are left, so the one way to fail is a number beyond u64.
    let n: u64 = number.parse().map_err(|_| DurationError::TooLarge {
        value: format!("{text:?}"),
    })?;
    unit.times(n).ok_or_else(|| DurationError::TooLarge {
        value: format!("{text:?}"),
    })
}

/// The canonical string of `d`: its number in the largest unit that holds it exactly (`"90m"`,
/// `"1500ms"`, `"0s"`). Below a millisecond it is rounded down to one (no key is that fine).
pub fn display(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    for unit in Unit::ALL {
        if nanos.is_multiple_of(unit.nanos()) {
            return format!("{}{}", nanos / unit.nanos(), unit.suffix());
        }
    }
    format!("{}ms", d.as_millis())
}

/// Serde for a time key whose integers are seconds: `#[serde(with = "duration::seconds")]`.
pub mod seconds {
    use super::Unit;
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::deserialize_in(d, Unit::Seconds)
    }

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        super::serialize_in(value, Unit::Seconds, s)
    }
}

/// [`seconds`] for an optional key (`Option<Duration>`, absent = `None`); with
/// `#[serde(default)]` on the field.
pub mod option_seconds {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::time::Duration;

    #[derive(Deserialize, Serialize)]
    struct Seconds(#[serde(with = "super::seconds")] Duration);

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Some(Seconds::deserialize(d)?.0))
    }

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => Seconds(*v).serialize(s),
            None => s.serialize_none(),
        }
    }
}

fn deserialize_in<'de, D: Deserializer<'de>>(d: D, unit: Unit) -> Result<Duration, D::Error> {
    d.deserialize_any(Visitor(unit))
}

/// An integer in the key's unit when `value` is a whole number of it (and fits TOML's i64),
/// else the canonical string.
fn serialize_in<S: Serializer>(value: &Duration, unit: Unit, s: S) -> Result<S::Ok, S::Error> {
    let nanos = value.as_nanos();
    if nanos.is_multiple_of(unit.nanos()) {
        if let Ok(n) = i64::try_from(nanos / unit.nanos()) {
            return s.serialize_i64(n);
        }
    }
    s.serialize_str(&display(*value))
}

struct Visitor(Unit);

impl Visitor {
    fn invalid<E: de::Error>(&self, value: impl fmt::Display) -> E {
        E::custom(DurationError::Invalid {
            value: value.to_string(),
            integer_unit: self.0,
        })
    }
}

impl de::Visitor<'_> for Visitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "an integer number of {} or a number with a unit ms, s, m, h, d",
            self.0.name()
        )
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
        self.0.times(n).ok_or_else(|| {
            E::custom(DurationError::TooLarge {
                value: n.to_string(),
            })
        })
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(self.invalid(n)),
        }
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Duration, E> {
        Err(self.invalid(n))
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Duration, E> {
        Err(self.invalid(b))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        parse(text, self.0).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    const MS: fn(u64) -> Duration = Duration::from_millis;
    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn parses_integers_in_the_keys_unit_and_numbers_with_units() {
        for (text, unit, want) in [
            ("30", Unit::Seconds, S(30)),
            ("0", Unit::Seconds, S(0)),
            (" 30 ", Unit::Seconds, S(30)),
            ("007", Unit::Seconds, S(7)),
            ("250", Unit::Millis, MS(250)),
            ("500ms", Unit::Seconds, MS(500)),
            ("500ms", Unit::Millis, MS(500)),
            ("1500ms", Unit::Seconds, MS(1500)),
            ("30s", Unit::Seconds, S(30)),
            ("30s", Unit::Millis, S(30)),
            ("30 s", Unit::Seconds, S(30)),
            ("0s", Unit::Seconds, S(0)),
            ("5m", Unit::Seconds, S(300)),
            ("2h", Unit::Seconds, S(7200)),
            ("14d", Unit::Seconds, S(14 * 86_400)),
            ("4294967295", Unit::Seconds, S(4_294_967_295)),
            ("18446744073709551615", Unit::Seconds, S(u64::MAX)),
            ("18446744073709551615ms", Unit::Seconds, MS(u64::MAX)),
            (
                "213503982334601d",
                Unit::Seconds,
                S(213_503_982_334_601 * 86_400),
            ),
        ] {
            assert_eq!(parse(text, unit), Ok(want), "{text:?} in {unit:?}");
        }
    }

    #[test]
    fn refuses_nonsense_saying_what_is_expected() {
        for text in [
            "",
            " ",
            "s",
            "ms",
            "3 parsecs",
            "30x",
            "1.5h",
            "1h30m",
            "-5s",
            "+5s",
            "5 m s",
            "2w",
            "1y",
            "5M",
            "30S",
            "1e3",
            "0x10",
            "thirty",
            "30s ago",
            "٣s",
        ] {
            let err = parse(text, Unit::Seconds).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid duration {text:?}: expected an integer number of seconds or a number with a unit ms, s, m, h, d"
                )
            );
        }
        let err = parse("soon", Unit::Millis).unwrap_err().to_string();
        assert!(err.contains("integer number of milliseconds"), "{err}");
    }

    /// Loading finds these errors by their prefix to name the key first.
    #[test]
    fn every_error_starts_with_the_prefix_loading_looks_for() {
        for err in [
            parse("x", Unit::Seconds).unwrap_err(),
            parse("99999999999999999999", Unit::Seconds).unwrap_err(),
        ] {
            assert!(err.to_string().starts_with(ERROR_PREFIX), "{err}");
        }
    }

    #[test]
    fn refuses_what_overflows() {
        for text in [
            "18446744073709551616",
            "18446744073709551616ms",
            "99999999999999999999999999s",
            "213503982334602d",
            "307445734561825861m",
            "5124095576030432h",
        ] {
            assert_eq!(
                parse(text, Unit::Seconds),
                Err(DurationError::TooLarge {
                    value: format!("{text:?}")
                }),
                "{text}"
            );
        }
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        for (d, want) in [
            (S(0), "0s"),
            (MS(1500), "1500ms"),
            (S(30), "30s"),
            (S(90), "90s"),
            (S(5400), "90m"),
            (S(7200), "2h"),
            (S(14 * 86_400), "14d"),
            (Duration::from_nanos(1_500_000), "1ms"),
        ] {
            assert_eq!(display(d), want);
            if d.subsec_nanos().is_multiple_of(1_000_000) {
                assert_eq!(parse(want, Unit::Seconds), Ok(d), "round trip {want}");
            }
        }
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    struct Keys {
        #[serde(with = "seconds")]
        t: Duration,
    }

    /// Through the `config` crate, as the broker loads: a TOML file and environment values
    /// (which arrive as strings, or as integers when they look like one).
    #[test]
    fn reads_both_forms_from_toml_and_from_the_environment() {
        let from_toml = |text: &str| {
            config::Config::builder()
                .add_source(config::File::from_str(text, config::FileFormat::Toml))
                .build()
                .and_then(|c| c.try_deserialize::<Keys>())
        };
        for (text, want) in [
            ("t = 30", S(30)),
            ("t = \"30\"", S(30)),
            ("t = \"30s\"", S(30)),
            ("t = \"500ms\"", MS(500)),
            ("t = \"2h\"", S(7200)),
        ] {
            assert_eq!(from_toml(text).map(|k| k.t).ok(), Some(want), "{text}");
        }
        for (text, shown) in [
            ("t = \"3 parsecs\"", "invalid duration \"3 parsecs\""),
            ("t = -1", "invalid duration -1"),
            ("t = 1.5", "invalid duration 1.5"),
            ("t = true", "invalid duration true"),
        ] {
            let err = from_toml(text).unwrap_err().to_string();
            assert!(err.starts_with(shown), "{text}: {err}");
            assert!(err.contains("for key `t`"), "{text}: {err}");
        }

        let from_env = |value: &str| {
            let vars = [("KEYS__T".to_string(), value.to_string())];
            config::Config::builder()
                .add_source(
                    config::Environment::with_prefix("KEYS")
                        .prefix_separator("__")
                        .source(Some(vars.into_iter().collect()))
                        .try_parsing(true),
                )
                .build()
                .and_then(|c| c.try_deserialize::<Keys>())
        };
        assert_eq!(from_env("30").map(|k| k.t).ok(), Some(S(30)));
        assert_eq!(from_env("5m").map(|k| k.t).ok(), Some(S(300)));
        assert_eq!(from_env("250ms").map(|k| k.t).ok(), Some(MS(250)));
        let err = from_env("3 parsecs").unwrap_err().to_string();
        assert!(err.contains("invalid duration \"3 parsecs\""), "{err}");
    }

    #[test]
    fn serialises_whole_units_as_integers_and_the_rest_as_strings() {
        let to_toml = |t: Duration| toml::to_string(&Keys { t }).ok();
        assert_eq!(to_toml(S(30)).as_deref(), Some("t = 30\n"));
        assert_eq!(to_toml(MS(1500)).as_deref(), Some("t = \"1500ms\"\n"));
        assert_eq!(
            to_toml(S(u64::MAX)).as_deref(),
            Some("t = \"18446744073709551615s\"\n")
        );
        for t in [S(0), S(30), MS(1500), S(u64::MAX)] {
            let text = to_toml(t).unwrap_or_default();
            assert_eq!(
                toml::from_str::<Keys>(&text).ok(),
                Some(Keys { t }),
                "{text}"
            );
        }
    }
}
