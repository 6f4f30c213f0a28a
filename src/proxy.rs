//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): on a listener
//! behind a load balancer with `proxy_protocol = true`, every connection starts with a header
//! naming the client's address, and the MQTT bytes (or the TLS ClientHello) follow it.
//!
//! [`parse`] is sans-IO: it looks at the bytes received so far and says either how many more
//! a header needs at least or, once it is whole, its length and the client's address.
//! [`read_header`] drives it on a stream and reads exactly the header, never a byte past it:
//! a client's CONNECT (or ClientHello) sent in the same segment as the header stays in the
//! stream for whoever reads next, so the caller needs no buffer of leftovers and the stream
//! can go to the TLS acceptor or the WebSocket handshake unchanged. That is possible because
//! [`Parsed::NeedMore`] gives a lower bound on what is missing: a v2 header says its length in
//! its first 16 bytes, and a v1 header is read in steps no longer than the shortest line that
//! could still complete it (the fields still missing, each a character and a space, and the
//! CRLF), a few reads of a few bytes for a typical `PROXY TCP4 ...` line.
//!
//! Which bytes form a header, and when more are needed, is decided here; the fields of a
//! whole header are read by the `ppp` crate (v1's TCP4 and TCP6 lines, v2's command,
//! family and addresses). Its own partial-input answers are not used: for v1 they can call a
//! header cut right after a space invalid, and it has no notion of reading exactly a header
//! from a socket.
//!
//! What the source address is: the client's for v1 `TCP4`/`TCP6` and v2 `PROXY` over IPv4 or
//! IPv6; none (use the socket's peer) for v1 `UNKNOWN`, v2 `LOCAL` (a load balancer's health
//! check) and v2 `PROXY` with an unspecified or UNIX family, as the specification says.
//! Anything else is an error and the connection is to be closed: no header at all (a client
//! that connected past the load balancer), an unknown version, command, family or protocol, a
//! v2 length too short for its addresses, a v1 line over 107 bytes or not in its grammar.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest v1 header, CRLF included (the specification's bound:
/// `PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n`).
pub const V1_MAX_LEN: usize = 107;
/// The shortest v1 header: `PROXY UNKNOWN\r\n`. A v2 header is at least 16 bytes.
const V1_MIN_LEN: usize = 15;
const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version and command, family and protocol, length.
const V2_FIXED_LEN: usize = 16;

/// What the bytes received so far are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole header yet. Every valid header that starts with these bytes has at least
    /// `at_least` (≥ 1) bytes more, so reading that many never reads into what follows it.
    NeedMore { at_least: usize },
    /// A whole header, the first `header_len` bytes; `source` is the client's address, or
    /// None when the connection's own peer address is to be used (v1 `UNKNOWN`, v2 `LOCAL`,
    /// v2 with an unspecified or UNIX address family).
    Done {
        source: Option<SocketAddr>,
        header_len: usize,
    },
}

/// Why a connection's PROXY header was refused; the listener closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The connection does not start with a PROXY header (v1 `PROXY ` or v2's signature).
    #[error("no PROXY protocol header (the connection starts with {0:02x?})")]
    Missing(Vec<u8>),
    /// A v1 header without its CRLF within 107 bytes.
    #[error("PROXY protocol v1 header longer than {V1_MAX_LEN} bytes")]
    TooLong,
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(String),
    /// The peer closed the connection inside the header.
    #[error("connection closed inside the PROXY protocol header")]
    Closed,
    #[error("no whole PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid(message: impl std::fmt::Display) -> ProxyError {
    ProxyError::Invalid(message.to_string())
}

/// Looks at the first bytes of a connection (all received so far; bytes after a whole header
/// are left alone). An error means no bytes to come can make a valid header of these.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    match buf.first() {
        None => Ok(Parsed::NeedMore {
            at_least: V1_MIN_LEN,
        }),
        Some(b'\r') => parse_v2(buf),
        Some(b'P') => parse_v1(buf),
        Some(_) => Err(missing(buf)),
    }
}

fn missing(buf: &[u8]) -> ProxyError {
    ProxyError::Missing(buf.iter().take(16).copied().collect())
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(missing(buf));
    }
    // The version and command, family and protocol are checked as soon as they are here, so
    // garbage after a signature is refused without waiting for the length it claims.
    if let Some(&ver_cmd) = buf.get(12) {
        if ver_cmd >> 4 != 2 {
            return Err(invalid(format_args!(
                "version {} after the v2 signature",
                ver_cmd >> 4
            )));
        }
        if ver_cmd & 0x0f > 1 {
            return Err(invalid(format_args!("v2 command {:#x}", ver_cmd & 0x0f)));
        }
    }
    let mut address_len = 0;
    if let Some(&family_protocol) = buf.get(13) {
        address_len = match family_protocol >> 4 {
            0 => 0,
            1 => 12,
            2 => 36,
            3 => 216,
            f => return Err(invalid(format_args!("v2 address family {f:#x}"))),
        };
        if family_protocol & 0x0f > 2 {
            return Err(invalid(format_args!(
                "v2 transport protocol {:#x}",
                family_protocol & 0x0f
            )));
        }
    }
    if buf.len() < V2_FIXED_LEN {
        return Ok(Parsed::NeedMore {
            at_least: V2_FIXED_LEN - buf.len(),
        });
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let local = buf[12] & 0x0f == 0;
    // LOCAL ignores the address block, whatever its family says.
    if !local && len < address_len {
        return Err(invalid(format_args!(
            "v2 length {len} is shorter than its addresses ({address_len} bytes)"
        )));
    }
    let header_len = V2_FIXED_LEN + len;
    if buf.len() < header_len {
        return Ok(Parsed::NeedMore {
            at_least: header_len - buf.len(),
        });
    }
    if local {
        return Ok(Parsed::Done {
            source: None,
            header_len,
        });
    }
    let header = ppp::v2::Header::try_from(&buf[..header_len]).map_err(invalid)?;
    let source = match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        // The specification lets the receiver use the connection's own addresses here.
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    };
    Ok(Parsed::Done { source, header_len })
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(missing(buf));
    }
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    // The line is printable US-ASCII up to its CR, which must be followed by LF.
    let Some(cr) = window.iter().position(|&b| !(b' '..=b'~').contains(&b)) else {
        if window.len() == V1_MAX_LEN {
            return Err(ProxyError::TooLong);
        }
        return Ok(Parsed::NeedMore {
            at_least: v1_at_least(window),
        });
    };
    if window[cr] != b'\r' {
        return Err(invalid(format_args!(
            "v1 byte {:#04x} at {cr} (the line is printable ASCII up to its CRLF)",
            window[cr]
        )));
    }
    match window.get(cr + 1) {
        None if window.len() == V1_MAX_LEN => return Err(ProxyError::TooLong),
        None => return Ok(Parsed::NeedMore { at_least: 1 }),
        Some(b'\n') => {}
        Some(_) => return Err(invalid("v1 CR not followed by LF")),
    }
    let header_len = cr + 2;
    let line = &buf[..header_len];
    // UNKNOWN: the rest of the line is ignored and the connection's own addresses are used.
    if line.starts_with(b"PROXY UNKNOWN ") || line == b"PROXY UNKNOWN\r\n" {
        return Ok(Parsed::Done {
            source: None,
            header_len,
        });
    }
    let header = ppp::v1::Header::try_from(line).map_err(invalid)?;
    let source = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    };
    Ok(Parsed::Done { source, header_len })
}

/// A lower bound on what a v1 line without its CR yet still needs: at least the shortest
/// header's length in all, and for `TCP4`/`TCP6` each missing field (a space and a
/// character; a character for a field begun empty) and the CRLF.
fn v1_at_least(line: &[u8]) -> usize {
    let shortest = V1_MIN_LEN.saturating_sub(line.len());
    let fields = line
        .strip_prefix(b"PROXY TCP4 ")
        .or_else(|| line.strip_prefix(b"PROXY TCP6 "));
    let needed = match fields {
        // Source, destination, source port, destination port; the last one here may be cut.
        Some(fields) => {
            let present = fields.split(|&b| b == b' ').count();
            let empty_last = fields.is_empty() || fields.ends_with(b" ");
            2 * 4usize.saturating_sub(present) + usize::from(empty_last) + 2
        }
        None => 2,
    };
    shortest.max(needed)
}

/// Reads a PROXY header (v1 or v2) from the start of `stream`, all of it within `timeout`,
/// and not a byte more: what follows the header (MQTT, a TLS ClientHello) is still in
/// `stream`. Returns the client's address, or None when the header says to use the socket's
/// peer address (v1 `UNKNOWN`, v2 `LOCAL`, a v2 unspecified or UNIX family). A connection
/// without a valid header is an error: close it.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyError> {
    match tokio::time::timeout(timeout, read_exactly_the_header(stream)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::Timeout(timeout)),
    }
}

async fn read_exactly_the_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut buf = Vec::with_capacity(V1_MAX_LEN);
    loop {
        match parse(&buf)? {
            Parsed::Done { source, .. } => return Ok(source),
            Parsed::NeedMore { at_least } => {
                let start = buf.len();
                buf.resize(start + at_least, 0);
                if let Err(e) = stream.read_exact(&mut buf[start..]).await {
                    return Err(match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => ProxyError::Closed,
                        _ => ProxyError::Io(e),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;

    /// An MQTT 3.1.1 CONNECT (client id "a"), what follows the header.
    const CONNECT: &[u8] = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01a";

    fn v2(ver_cmd: u8, family_protocol: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(ver_cmd);
        h.push(family_protocol);
        h.extend_from_slice(&u16::try_from(body.len()).expect("length").to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v2_ipv4(src: [u8; 4], sport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[10, 0, 0, 1]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&1883u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(0x21, 0x11, &body)
    }

    fn v2_ipv6(src: Ipv6Addr, sport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut body = src.octets().to_vec();
        body.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&8883u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(0x21, 0x21, &body)
    }

    /// TLVs as AWS and HAProxy send them: PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, a NOOP.
    fn tlvs() -> Vec<u8> {
        let mut t = vec![0x01, 0x00, 0x04];
        t.extend_from_slice(b"mqtt");
        t.extend_from_slice(&[0x02, 0x00, 0x0b]);
        t.extend_from_slice(b"example.com");
        t.extend_from_slice(&[0x04, 0x00, 0x02, 0, 0]);
        t
    }

    fn done(buf: &[u8]) -> (Option<SocketAddr>, usize) {
        match parse(buf) {
            Ok(Parsed::Done { source, header_len }) => (source, header_len),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("address"))
    }

    fn with_connect(header: &[u8]) -> Vec<u8> {
        [header, CONNECT].concat()
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 1883\r\n";
        assert_eq!(done(&with_connect(h)), (addr("192.0.2.7:56324"), h.len()));
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 8883\r\n";
        assert_eq!(
            done(&with_connect(h)),
            (addr("[2001:db8::7]:40000"), h.len())
        );
        let h = b"PROXY TCP6 ::ffff:192.0.2.7 :: 1 2\r\n";
        assert_eq!(done(h), (addr("[::ffff:192.0.2.7]:1"), h.len()));
        for h in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN 192.0.2.7 10.0.0.1 56324 1883\r\n",
            b"PROXY UNKNOWN anything at all, up to the CRLF\r\n",
        ] {
            assert_eq!(done(&with_connect(h)), (None, h.len()));
        }
        // The longest header there is, 107 bytes.
        let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let longest = format!("PROXY UNKNOWN {f} {f} 65535 65535\r\n");
        assert_eq!(longest.len(), V1_MAX_LEN);
        assert_eq!(done(longest.as_bytes()), (None, V1_MAX_LEN));
        let longest = format!("PROXY TCP6 {f} {f} 65535 65535\r\n");
        assert_eq!(done(longest.as_bytes()).1, longest.len());
    }

    #[test]
    fn v1_refusals() {
        for bad in [
            &b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n"[..],
            b"PROXY tcp4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 192.0.2.300 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 01 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2 3\r\n",
            b"PROXY TCP4  192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2 \r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\rX",
            b"PROXY TCP4 192.0.2.7\t10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.\xc3\xa9 10.0.0.1 1 2\r\n",
        ] {
            let r = parse(bad);
            assert!(
                matches!(r, Err(ProxyError::Invalid(_))),
                "{:?}: {r:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // No CRLF within 107 bytes.
        let long = format!("PROXY UNKNOWN {}", "x".repeat(100));
        assert!(matches!(parse(long.as_bytes()), Err(ProxyError::TooLong)));
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(92));
        assert_eq!(long.len(), 108);
        assert!(matches!(parse(long.as_bytes()), Err(ProxyError::TooLong)));
    }

    #[test]
    fn v2_ipv4_ipv6_local_unspec_unix_and_tlvs() {
        let h = v2_ipv4([192, 0, 2, 7], 56324, &[]);
        assert_eq!(h.len(), 28);
        assert_eq!(done(&with_connect(&h)), (addr("192.0.2.7:56324"), 28));
        let h = v2_ipv4([192, 0, 2, 7], 56324, &tlvs());
        assert_eq!(done(&with_connect(&h)), (addr("192.0.2.7:56324"), h.len()));
        let src = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
        let h = v2_ipv6(src, 40000, &tlvs());
        assert_eq!(
            done(&with_connect(&h)),
            (Some(SocketAddr::from((src, 40000))), h.len())
        );
        // LOCAL (health checks): the socket's address, whatever follows in the block.
        let h = v2(0x20, 0x00, &[]);
        assert_eq!(done(&with_connect(&h)), (None, 16));
        let mut local = v2_ipv4([192, 0, 2, 7], 1, &[]);
        local[12] = 0x20;
        assert_eq!(done(&local), (None, 28));
        let h = v2(0x20, 0x11, &[1, 2, 3]);
        assert_eq!(done(&h), (None, 19));
        // PROXY with an unspecified family, or UNIX sockets: the socket's address too.
        let h = v2(0x21, 0x00, &tlvs());
        assert_eq!(done(&h), (None, h.len()));
        let h = v2(0x21, 0x31, &[0; 216]);
        assert_eq!(done(&h), (None, 232));
        // Over UDP (DGRAM) the addresses are still the client's.
        let mut h = v2_ipv4([192, 0, 2, 7], 5, &[]);
        h[13] = 0x12;
        assert_eq!(done(&h), (addr("192.0.2.7:5"), 28));
    }

    #[test]
    fn v2_refusals_as_soon_as_the_byte_is_there() {
        let ok = v2_ipv4([192, 0, 2, 7], 56324, &[]);
        for (at, byte) in [
            (12, 0x11), // version 1 in a v2 signature
            (12, 0x31), // version 3
            (12, 0x22), // command 2
            (13, 0x41), // family 4
            (13, 0x13), // protocol 3
        ] {
            let mut bad = ok.clone();
            bad[at] = byte;
            let r = parse(&bad[..=at]);
            assert!(
                matches!(r, Err(ProxyError::Invalid(_))),
                "{at} {byte:#x}: {r:?}"
            );
            assert!(matches!(parse(&bad), Err(ProxyError::Invalid(_))));
        }
        // A length shorter than the family's addresses, known at 16 bytes.
        for (family, len) in [(0x11, 11u16), (0x21, 35), (0x31, 215)] {
            let mut bad = v2(0x21, family, &[]);
            bad[14..16].copy_from_slice(&len.to_be_bytes());
            assert!(
                matches!(parse(&bad), Err(ProxyError::Invalid(_))),
                "{family:#x}"
            );
        }
    }

    #[test]
    fn anything_else_is_no_header() {
        for bad in [
            CONNECT,
            b"GET /mqtt HTTP/1.1\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"PROXX TCP4 ...",
            b"proxy TCP4",
            b"\r\n\r\n\0\r\nQUIX\n",
            b"\r\n\r\nGET",
            b" PROXY",
            b"PROXY\r\n",
        ] {
            let r = parse(bad);
            assert!(matches!(r, Err(ProxyError::Missing(_))), "{bad:?}: {r:?}");
        }
        // The first byte tells: nothing more is waited for.
        assert!(matches!(parse(&CONNECT[..1]), Err(ProxyError::Missing(_))));
        assert!(matches!(parse(b"\x16"), Err(ProxyError::Missing(_))));
    }

    #[test]
    fn truncated_headers_ask_for_no_more_than_they_miss() {
        let headers: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 1883\r\n".to_vec(),
            b"PROXY TCP4 1.1.1.1 1.1.1.1 1 1\r\n".to_vec(),
            b"PROXY TCP6 :: :: 1 1\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY UNKNOWN 1 2 3 4\r\n".to_vec(),
            v2_ipv4([192, 0, 2, 7], 56324, &tlvs()),
            v2_ipv6(Ipv6Addr::LOCALHOST, 1, &[]),
            v2(0x20, 0x00, &[]),
        ];
        for h in headers {
            for cut in 0..h.len() {
                match parse(&h[..cut]) {
                    Ok(Parsed::NeedMore { at_least }) => {
                        assert!(
                            (1..=h.len() - cut).contains(&at_least),
                            "{:?} cut at {cut}: {at_least}",
                            String::from_utf8_lossy(&h)
                        )
                    }
                    other => panic!("{:?} cut at {cut}: {other:?}", String::from_utf8_lossy(&h)),
                }
            }
        }
        // A v2 header asks for its whole rest once its length is known, TLVs and all.
        let h = v2_ipv4([192, 0, 2, 7], 56324, &tlvs());
        assert_eq!(
            parse(&h[..16]).expect("parse"),
            Parsed::NeedMore {
                at_least: h.len() - 16
            }
        );
    }

    /// A stream that hands out its bytes in the given pieces, one per read, then EOF.
    struct Pieces {
        pieces: std::collections::VecDeque<Vec<u8>>,
        reads: usize,
    }

    impl Pieces {
        fn new(bytes: &[u8], cuts: &[usize]) -> Pieces {
            let mut pieces = std::collections::VecDeque::new();
            let mut at = 0;
            for &c in cuts {
                let c = c.clamp(at, bytes.len());
                pieces.push_back(bytes[at..c].to_vec());
                at = c;
            }
            pieces.push_back(bytes[at..].to_vec());
            pieces.retain(|p| !p.is_empty());
            Pieces { pieces, reads: 0 }
        }

        async fn rest(mut self) -> Vec<u8> {
            let mut rest = Vec::new();
            self.read_to_end(&mut rest).await.expect("read");
            rest
        }
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.reads += 1;
            if let Some(mut p) = self.pieces.pop_front() {
                let n = p.len().min(buf.remaining());
                buf.put_slice(&p[..n]);
                if n < p.len() {
                    self.pieces.push_front(p.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn read_header_leaves_what_follows_in_the_stream() {
        let cases: Vec<(Vec<u8>, Option<SocketAddr>)> = vec![
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 1883\r\n".to_vec(),
                addr("192.0.2.7:56324"),
            ),
            (b"PROXY UNKNOWN\r\n".to_vec(), None),
            (
                v2_ipv4([192, 0, 2, 7], 56324, &tlvs()),
                addr("192.0.2.7:56324"),
            ),
            (v2(0x20, 0x00, &[]), None),
        ];
        for (header, source) in cases {
            // In one segment with the CONNECT, and byte by byte.
            let bytes = with_connect(&header);
            let mut s = Pieces::new(&bytes, &[]);
            assert_eq!(read_header(&mut s, WAIT).await.expect("header"), source);
            assert_eq!(s.rest().await, CONNECT);
            let cuts: Vec<usize> = (1..bytes.len()).collect();
            let mut s = Pieces::new(&bytes, &cuts);
            assert_eq!(read_header(&mut s, WAIT).await.expect("header"), source);
            assert_eq!(s.rest().await, CONNECT);
        }
        // A typical v1 line takes a few reads, not one per byte.
        let bytes = with_connect(b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 1883\r\n");
        let mut s = Pieces::new(&bytes, &[]);
        read_header(&mut s, WAIT).await.expect("header");
        assert!(s.reads <= 12, "{} reads", s.reads);
    }

    #[tokio::test]
    async fn read_header_errors() {
        let mut s = Pieces::new(CONNECT, &[]);
        assert!(matches!(
            read_header(&mut s, WAIT).await,
            Err(ProxyError::Missing(_))
        ));
        let mut s = Pieces::new(b"PROXY TCP4 192.0.2.7 10.0", &[]);
        assert!(matches!(
            read_header(&mut s, WAIT).await,
            Err(ProxyError::Closed)
        ));
        let mut s = Pieces::new(&v2_ipv4([1, 2, 3, 4], 1, &[])[..20], &[]);
        assert!(matches!(
            read_header(&mut s, WAIT).await,
            Err(ProxyError::Closed)
        ));
        let mut s = Pieces::new(format!("PROXY UNKNOWN {}", "x".repeat(200)).as_bytes(), &[]);
        assert!(matches!(
            read_header(&mut s, WAIT).await,
            Err(ProxyError::TooLong)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn read_header_is_bounded_by_its_timeout() {
        let (mut server, mut client) = tokio::io::duplex(1024);
        // Part of a header, then silence.
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PROXY TCP4 ")
            .await
            .expect("write");
        let r = read_header(&mut server, Duration::from_secs(3)).await;
        assert!(matches!(r, Err(ProxyError::Timeout(_))), "{r:?}");
        drop(client);
    }

    /// A valid header of each kind with the source address it names.
    fn any_header() -> impl Strategy<Value = (Vec<u8>, Option<SocketAddr>)> {
        let v4 = any::<[u8; 4]>;
        let v6 = any::<[u8; 16]>;
        let tlvs = proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)),
            0..4,
        )
        .prop_map(|ts| {
            let mut out = Vec::new();
            for (t, v) in ts {
                out.push(t);
                out.extend_from_slice(&(v.len() as u16).to_be_bytes());
                out.extend_from_slice(&v);
            }
            out
        });
        prop_oneof![
            (v4(), any::<u16>(), any::<u16>()).prop_map(|(a, p, q)| {
                let a = Ipv4Addr::from(a);
                let line = format!("PROXY TCP4 {a} 10.0.0.1 {p} {q}\r\n");
                (line.into_bytes(), Some(SocketAddr::from((a, p))))
            }),
            (v6(), any::<u16>(), any::<u16>()).prop_map(|(a, p, q)| {
                let a = Ipv6Addr::from(a);
                let line = format!("PROXY TCP6 {a} ::1 {p} {q}\r\n");
                (line.into_bytes(), Some(SocketAddr::from((a, p))))
            }),
            "[ -~]{0,60}".prop_map(|rest| {
                let line = if rest.is_empty() {
                    "PROXY UNKNOWN\r\n".to_string()
                } else {
                    format!("PROXY UNKNOWN {rest}\r\n")
                };
                (line.into_bytes(), None)
            }),
            (v4(), any::<u16>(), tlvs.clone()).prop_map(|(a, p, t)| {
                (
                    v2_ipv4(a, p, &t),
                    Some(SocketAddr::from((Ipv4Addr::from(a), p))),
                )
            }),
            (v6(), any::<u16>(), tlvs.clone()).prop_map(|(a, p, t)| {
                let a = Ipv6Addr::from(a);
                (v2_ipv6(a, p, &t), Some(SocketAddr::from((a, p))))
            }),
            tlvs.prop_map(|t| (v2(0x20, 0x00, &t), None)),
        ]
    }

    proptest! {
        /// Whatever the header and however it arrives, it is read whole and only it: the
        /// bytes behind it come out of the stream unchanged; and no prefix of it is asked for
        /// more bytes than it misses.
        #[test]
        fn any_header_in_any_pieces(
            (header, source) in any_header(),
            after in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            for cut in 0..header.len() {
                match parse(&header[..cut]) {
                    Ok(Parsed::NeedMore { at_least }) => {
                        prop_assert!((1..=header.len() - cut).contains(&at_least))
                    }
                    other => prop_assert!(false, "cut at {}: {:?}", cut, other),
                }
            }
            let bytes = [&header[..], &after[..]].concat();
            prop_assert_eq!(
                parse(&bytes).expect("parse"),
                Parsed::Done { source, header_len: header.len() }
            );
            let mut cuts = cuts;
            cuts.sort_unstable();
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("rt");
            let (got, rest) = rt.block_on(async {
                let mut s = Pieces::new(&bytes, &cuts);
                let got = read_header(&mut s, WAIT).await.expect("header");
                (got, s.rest().await)
            });
            prop_assert_eq!(got, source);
            prop_assert_eq!(rest, after);
        }

        /// Arbitrary bytes never make it panic, and a header found is within them.
        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Parsed::Done { header_len, .. }) = parse(&bytes) {
                prop_assert!(header_len <= bytes.len());
            }
        }

        /// Nor do bytes that start like a header.
        #[test]
        fn arbitrary_bytes_after_a_signature(
            v2_sig in any::<bool>(),
            rest in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let start: &[u8] = if v2_sig { V2_SIGNATURE } else { b"PROXY " };
            let bytes = [start, &rest[..]].concat();
            if let Ok(Parsed::Done { header_len, .. }) = parse(&bytes) {
                prop_assert!(header_len <= bytes.len());
            }
        }
    }
}
