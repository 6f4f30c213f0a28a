//! Encoding primitives of the record format (see `storage::record`): its format byte and
//! decode error, big-endian integers, `u32`-length-prefixed byte strings, presence bytes and
//! bitmaps, and a bounds-checked reader. The records are built on these, never the reverse:
//! `record` → `codec`, one direction.

use crate::protocol::{MqttStr, PublishProperties, QoS};
use bytes::Bytes;

/// Format byte written at the start of every record value. Bump it when an encoding changes,
/// and keep decoding the older formats.
///
/// - 1: the first format.
/// - 2: in-flight records end with an optional shared subscription group id (a presence byte,
///   then a `u64`); every other record is as in format 1.
/// - 3: session records end with the optional user name of the session's last connection (a
///   presence byte, then the string); every other record is as in format 2.
/// - 4: queue entries (as their own record, not inside an in-flight record) end with the Unix
///   second they entered a declared queue (`u32`, 0 when unknown); every other record is as in
///   format 3.
pub const RECORD_FORMAT: u8 = 4;

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record ends early")]
    Truncated,
    #[error("{0}")]
    Invalid(&'static str),
    #[error("record format {0} is newer than this build supports ({RECORD_FORMAT})")]
    NewerFormat(u8),
    #[error("{0} unexpected bytes after the record")]
    TrailingBytes(usize),
}

pub(crate) fn put_u16(w: &mut Vec<u8>, v: u16) {
    w.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_opt_u64(w: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => w.push(0),
        Some(v) => {
            w.push(1);
            put_u64(w, v);
        }
    }
}

/// Lengths are `u32`: an MQTT packet (and so every string or payload in it) is at most
/// 256 MiB, so a larger length cannot occur; it is clamped rather than panicking.
pub(crate) fn put_len(w: &mut Vec<u8>, len: usize) {
    put_u32(w, u32::try_from(len).unwrap_or(u32::MAX));
}

pub(crate) fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_len(w, b.len());
    w.extend_from_slice(b);
}

mod prop_bits {
    pub const PAYLOAD_FORMAT: u8 = 1 << 0;
    pub const MESSAGE_EXPIRY: u8 = 1 << 1;
    pub const CONTENT_TYPE: u8 = 1 << 2;
    pub const RESPONSE_TOPIC: u8 = 1 << 3;
    pub const CORRELATION_DATA: u8 = 1 << 4;
    pub const TOPIC_ALIAS: u8 = 1 << 5;
    pub const WILL_DELAY: u8 = 1 << 6;
    pub const ALL: u8 = (1 << 7) - 1;
}

/// Properties: a presence bitmap, the present fields in bitmap order, then the user
/// properties (count, then key/value pairs).
pub(crate) fn put_properties(w: &mut Vec<u8>, p: &PublishProperties) {
    use prop_bits::*;
    let mut bits = 0u8;
    let mut set = |present: bool, bit: u8| {
        if present {
            bits |= bit;
        }
    };
    set(p.payload_format_indicator.is_some(), PAYLOAD_FORMAT);
    set(p.message_expiry_interval.is_some(), MESSAGE_EXPIRY);
    set(p.content_type.is_some(), CONTENT_TYPE);
    set(p.response_topic.is_some(), RESPONSE_TOPIC);
    set(p.correlation_data.is_some(), CORRELATION_DATA);
    set(p.topic_alias.is_some(), TOPIC_ALIAS);
    set(p.will_delay_interval.is_some(), WILL_DELAY);
    w.push(bits);
    if let Some(v) = p.payload_format_indicator {
        w.push(v);
    }
    if let Some(v) = p.message_expiry_interval {
        put_u32(w, v);
    }
    if let Some(s) = &p.content_type {
        put_bytes(w, s.as_bytes());
    }
    if let Some(s) = &p.response_topic {
        put_bytes(w, s.as_bytes());
    }
    if let Some(d) = &p.correlation_data {
        put_bytes(w, d);
    }
    if let Some(v) = p.topic_alias {
        put_u16(w, v);
    }
    if let Some(v) = p.will_delay_interval {
        put_u32(w, v);
    }
    put_len(w, p.user_properties.len());
    for (k, v) in &p.user_properties {
        put_bytes(w, k.as_bytes());
        put_bytes(w, v.as_bytes());
    }
}

/// Bounds-checked reader over one record. Byte strings are zero-copy slices of `buf`.
pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Reader {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.take(N)?);
        Ok(a)
    }

    /// Reads the format byte: any format up to [`RECORD_FORMAT`] is returned for the caller
    /// to decode; a newer one is an error that says so.
    pub(crate) fn header(&mut self) -> Result<u8, DecodeError> {
        match self.u8()? {
            0 => Err(DecodeError::Invalid("record format 0")),
            v if v <= RECORD_FORMAT => Ok(v),
            v => Err(DecodeError::NewerFormat(v)),
        }
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("flag is neither 0 nor 1")),
        }
    }

    pub(crate) fn qos(&mut self) -> Result<QoS, DecodeError> {
        QoS::from_u8(self.u8()?).ok_or(DecodeError::Invalid("QoS above 2"))
    }

    pub(crate) fn opt_u64(&mut self) -> Result<Option<u64>, DecodeError> {
        Ok(if self.bool()? {
            Some(self.u64()?)
        } else {
            None
        })
    }

    /// A count of elements each at least `min_size` bytes long, checked against the bytes
    /// left so that garbage cannot make the caller allocate gigabytes.
    pub(crate) fn count(&mut self, min_size: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }

    pub(crate) fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    pub(crate) fn mqtt_str(&mut self) -> Result<MqttStr, DecodeError> {
        MqttStr::from_bytes(self.bytes()?)
            .map_err(|_| DecodeError::Invalid("string is not MQTT UTF-8"))
    }

    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        std::str::from_utf8(&b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Invalid("string is not UTF-8"))
    }

    pub(crate) fn properties(&mut self) -> Result<PublishProperties, DecodeError> {
        use prop_bits::*;
        let bits = self.u8()?;
        if bits & !ALL != 0 {
            return Err(DecodeError::Invalid("unknown property bits"));
        }
        let has = |bit: u8| bits & bit != 0;
        let mut p = PublishProperties::default();
        if has(PAYLOAD_FORMAT) {
            p.payload_format_indicator = Some(self.u8()?);
        }
        if has(MESSAGE_EXPIRY) {
            p.message_expiry_interval = Some(self.u32()?);
        }
        if has(CONTENT_TYPE) {
            p.content_type = Some(self.mqtt_str()?);
        }
        if has(RESPONSE_TOPIC) {
            p.response_topic = Some(self.mqtt_str()?);
        }
        if has(CORRELATION_DATA) {
            p.correlation_data = Some(self.bytes()?);
        }
        if has(TOPIC_ALIAS) {
            p.topic_alias = Some(self.u16()?);
        }
        if has(WILL_DELAY) {
            p.will_delay_interval = Some(self.u32()?);
        }
        let n = self.count(8)?;
        p.user_properties.reserve(n);
        for _ in 0..n {
            let k = self.mqtt_str()?;
            let v = self.mqtt_str()?;
            p.user_properties.push((k, v));
        }
        Ok(p)
    }
}
