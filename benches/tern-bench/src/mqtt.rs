//! Client-side MQTT 3.1.1 through `mqttbytes` (crates.io, `v4`), an implementation
//! independent of the broker's codec, so the load generator shares no code and no
//! assumptions with what it measures.
//!
//! Many packets are encoded into one reusable write buffer and sent with one write; each read
//! appends whatever the socket has to one read buffer, and `v4::read` takes whole packets off
//! its front (an incomplete one stays for the next read).
//!
//! Costs on the hot paths: a PUBLISH is a copy of a template `mqttbytes` wrote once per topic
//! (see [`PublishEncoder`]); acknowledgements are written by their `v4` types straight into
//! the write buffer. Decoding is `v4::read` for every packet: a PUBLISH costs its topic
//! (`v4::Publish::read` returns a `String`) and the atomic reference counting of the `Bytes`
//! slices it hands out (the payload is a slice of the read buffer), several times the cost of
//! the hand-written parser this replaced (docs/benchmarks.md has the numbers).

use bytes::BytesMut;
use mqttbytes::v4::{self, Packet};
use mqttbytes::{PacketType, QoS};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Largest packet taken from a broker (the scenarios receive a few hundred bytes at most).
const MAX_PACKET: usize = 1 << 20;

pub fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn codec(e: mqttbytes::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("mqttbytes: {e:?}"))
}

pub fn qos(q: u8) -> io::Result<QoS> {
    mqttbytes::qos(q).map_err(codec)
}

/// PUBACK / PUBREC / PUBREL / PUBCOMP (`kind`, as `mqttbytes` names packet types) for packet
/// id `pkid`, appended to `buf`.
pub fn ack(buf: &mut BytesMut, kind: PacketType, pkid: u16) -> io::Result<()> {
    let r = match kind {
        PacketType::PubAck => v4::PubAck::new(pkid).write(buf),
        PacketType::PubRec => v4::PubRec::new(pkid).write(buf),
        PacketType::PubRel => v4::PubRel::new(pkid).write(buf),
        PacketType::PubComp => v4::PubComp::new(pkid).write(buf),
        other => return Err(bad(&format!("{other:?} is not an acknowledgement"))),
    };
    r.map(drop).map_err(codec)
}

/// One publisher's PUBLISH packets. `mqttbytes` writes each topic's PUBLISH once, as a
/// template (payload zeroed); a message is that template copied into the write buffer with
/// its packet id and payload written over the bytes `mqttbytes` put there. Where those are is
/// found from `mqttbytes` itself when the encoder is built: the packet id is the two bytes that
/// change when `mqttbytes` writes the same packet with another id, and the payload is what
/// `v4::read` returns from the template (the frame's tail). So every byte of the layout comes
/// from `mqttbytes`, and a message costs one copy instead of a `Publish::write` per message
/// (whose payload `Bytes` would cost two atomic reference-count updates each time). The
/// result is byte for byte what `Publish::write` gives (tested below).
pub struct PublishEncoder {
    templates: Vec<Template>,
}

struct Template {
    frame: Vec<u8>,
    /// Offset of the packet id (None at QoS 0).
    pkid_at: Option<usize>,
    payload_at: usize,
}

impl Template {
    fn new(topic: &str, q: QoS, payload_size: usize) -> io::Result<Template> {
        let write = |pkid: u16| -> io::Result<BytesMut> {
            let mut p = v4::Publish::new(topic, q, vec![0u8; payload_size]);
            p.pkid = pkid;
            let mut b = BytesMut::new();
            p.write(&mut b).map_err(codec)?;
            Ok(b)
        };
        let (a, b) = (write(0x0001)?, write(0xfffe)?);
        let pkid_at = if q == QoS::AtMostOnce {
            None
        } else {
            let diff: Vec<usize> = (0..a.len().min(b.len()))
                .filter(|&i| a[i] != b[i])
                .collect();
            match diff[..] {
                [i, j] if j == i + 1 && a.len() == b.len() && a[i..=j] == [0x00, 0x01] => Some(i),
                _ => return Err(bad("cannot find the packet id in mqttbytes' PUBLISH")),
            }
        };
        let mut check = a.clone();
        let Packet::Publish(p) = v4::read(&mut check, MAX_PACKET).map_err(codec)? else {
            return Err(bad("mqttbytes does not read its PUBLISH back"));
        };
        if !check.is_empty() || p.topic != topic || p.payload.len() != payload_size {
            return Err(bad("mqttbytes reads its PUBLISH back differently"));
        }
        Ok(Template {
            payload_at: a.len() - payload_size,
            frame: a.to_vec(),
            pkid_at,
        })
    }
}

impl PublishEncoder {
    pub fn new(topics: &[String], qos_level: u8, payload_size: usize) -> io::Result<Self> {
        let q = qos(qos_level)?;
        Ok(PublishEncoder {
            templates: topics
                .iter()
                .map(|t| Template::new(t, q, payload_size))
                .collect::<io::Result<_>>()?,
        })
    }

    /// Appends one PUBLISH on topic `topic` (an index into the topics given to `new`) with
    /// packet id `pkid` (ignored at QoS 0) to `buf`; `fill` writes the payload, which starts
    /// zeroed.
    pub fn encode(
        &mut self,
        buf: &mut BytesMut,
        topic: usize,
        pkid: u16,
        fill: impl FnOnce(&mut [u8]),
    ) -> io::Result<()> {
        let t = self
            .templates
            .get(topic)
            .ok_or_else(|| bad("no such topic"))?;
        let start = buf.len();
        buf.extend_from_slice(&t.frame);
        if let Some(at) = t.pkid_at {
            if pkid == 0 {
                // As mqttbytes refuses it (Error::PacketIdZero).
                buf.truncate(start);
                return Err(codec(mqttbytes::Error::PacketIdZero));
            }
            buf[start + at..start + at + 2].copy_from_slice(&pkid.to_be_bytes());
        }
        fill(&mut buf[start + t.payload_at..]);
        Ok(())
    }
}

/// One MQTT connection driven by a single task: packets are encoded into `wbuf` and sent
/// with one `write_all`; reads fill `rbuf` with whatever the socket has.
pub struct Client {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
}

impl Client {
    /// TCP connect (optionally from a chosen local address), CONNECT with a clean session,
    /// wait for CONNACK.
    pub async fn connect(
        addr: SocketAddr,
        source: Option<IpAddr>,
        client_id: &str,
        timeout: Duration,
    ) -> io::Result<Client> {
        Ok(
            Self::connect_session(addr, source, client_id, true, timeout)
                .await?
                .0,
        )
    }

    /// As `connect`, with the Clean Session flag given; also returns CONNACK's Session
    /// Present flag.
    pub async fn connect_session(
        addr: SocketAddr,
        source: Option<IpAddr>,
        client_id: &str,
        clean: bool,
        timeout: Duration,
    ) -> io::Result<(Client, bool)> {
        Self::connect_with(addr, source, client_id, clean, 0, timeout).await
    }

    /// As `connect_session`, with the Keep Alive (seconds) given.
    pub async fn connect_with(
        addr: SocketAddr,
        source: Option<IpAddr>,
        client_id: &str,
        clean: bool,
        keep_alive: u16,
        timeout: Duration,
    ) -> io::Result<(Client, bool)> {
        let fut = async {
            let sock = TcpSocket::new_v4()?;
            if let Some(ip) = source {
                // Choose the local port at connect(), per 4-tuple, not at bind(): a bind-time
                // search avoids every port still in TIME_WAIT and gets very slow after an
                // earlier run closed 20,000 connections.
                let one: libc::c_int = 1;
                // SAFETY: plain setsockopt on a socket we own, with a correctly sized int.
                unsafe {
                    libc::setsockopt(
                        sock.as_raw_fd(),
                        libc::IPPROTO_IP,
                        libc::IP_BIND_ADDRESS_NO_PORT,
                        &one as *const libc::c_int as *const libc::c_void,
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    );
                }
                sock.bind(SocketAddr::new(ip, 0))?;
            }
            let stream = sock.connect(addr).await?;
            stream.set_nodelay(true)?;
            let mut c = Client {
                stream,
                rbuf: BytesMut::with_capacity(1024),
                wbuf: BytesMut::with_capacity(256),
            };
            let mut connect = v4::Connect::new(client_id);
            connect.keep_alive = keep_alive;
            connect.clean_session = clean;
            connect.write(&mut c.wbuf).map_err(codec)?;
            c.flush().await?;
            let Packet::ConnAck(ack) = c.next_packet().await? else {
                return Err(bad("expected CONNACK"));
            };
            if ack.code != v4::ConnectReturnCode::Success {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("CONNACK return code {:?}", ack.code),
                ));
            }
            Ok((c, ack.session_present))
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no CONNACK in time",
            )),
        }
    }

    /// SUBSCRIBE one filter and wait for its SUBACK; returns the granted QoS.
    pub async fn subscribe(&mut self, filter: &str, qos_level: u8) -> io::Result<u8> {
        let mut sub = v4::Subscribe::new(filter, qos(qos_level)?);
        sub.pkid = 1;
        sub.write(&mut self.wbuf).map_err(codec)?;
        self.flush().await?;
        let Packet::SubAck(ack) = self.next_packet().await? else {
            return Err(bad("expected SUBACK"));
        };
        match ack.return_codes.first() {
            Some(v4::SubscribeReasonCode::Success(q)) => Ok(*q as u8),
            Some(v4::SubscribeReasonCode::Failure) => Err(bad("subscription refused")),
            None => Err(bad("SUBACK without a return code")),
        }
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    fn make_room(&mut self) {
        if self.rbuf.capacity() - self.rbuf.len() < 16 * 1024 {
            self.rbuf.reserve(64 * 1024);
        }
    }

    /// Read whatever the socket has (at least one byte); EOF is an error.
    pub async fn read_more(&mut self) -> io::Result<usize> {
        self.make_room();
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "broker closed the connection",
            ));
        }
        Ok(n)
    }

    /// As `read_more` without waiting: false when the socket has nothing now.
    pub fn try_read_more(&mut self) -> io::Result<bool> {
        self.make_room();
        match self.stream.try_read_buf(&mut self.rbuf) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "broker closed the connection",
            )),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The next whole packet in the read buffer, or None when it needs more bytes.
    fn take_packet(&mut self) -> io::Result<Option<Packet>> {
        match v4::read(&mut self.rbuf, MAX_PACKET) {
            Ok(p) => Ok(Some(p)),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(codec(e)),
        }
    }

    /// Next whole packet, reading as needed (handshake use).
    async fn next_packet(&mut self) -> io::Result<Packet> {
        loop {
            if let Some(p) = self.take_packet()? {
                return Ok(p);
            }
            self.read_more().await?;
        }
    }

    /// Hand every complete packet in the read buffer to `f`, with the write buffer for
    /// replies; an incomplete packet stays for the next read.
    pub fn drain<F>(&mut self, mut f: F) -> io::Result<()>
    where
        F: FnMut(Packet, &mut BytesMut) -> io::Result<()>,
    {
        while let Some(p) = self.take_packet()? {
            f(p, &mut self.wbuf)?;
        }
        Ok(())
    }

    fn disconnect(&mut self) {
        // Infallible for DISCONNECT (a fixed two bytes).
        let _ = v4::Disconnect.write(&mut self.wbuf);
    }

    /// Best-effort DISCONNECT.
    pub async fn close(mut self) {
        self.disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), self.flush()).await;
    }

    /// Read and discard until the broker closes the connection (an UnexpectedEof error).
    async fn read_until_closed(&mut self) -> io::Result<()> {
        loop {
            self.rbuf.clear();
            self.read_more().await?;
        }
    }

    /// DISCONNECT, then wait (at most `timeout`) until the broker closes the connection, so
    /// that it has processed the DISCONNECT; whatever arrives meanwhile is discarded. Returns
    /// whether the broker closed it in time.
    pub async fn close_and_wait(mut self, timeout: Duration) -> bool {
        self.disconnect();
        let wait = async {
            self.flush().await?;
            self.read_until_closed().await
        };
        matches!(
            tokio::time::timeout(timeout, wait).await,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The template encoding is exactly what `mqttbytes` writes for the same packet.
    #[test]
    fn publish_encoder_matches_mqttbytes_byte_for_byte() {
        for (qos_level, size, topic) in [(0, 20, "t"), (1, 64, "fanin/3"), (2, 300, "a/b/c")] {
            let mut enc = PublishEncoder::new(&[topic.to_string()], qos_level, size).unwrap();
            for pkid in [1u16, 0x1234, 0xff00, u16::MAX] {
                let mut buf = BytesMut::new();
                enc.encode(&mut buf, 0, pkid, |p| {
                    p[0] = 7;
                    p[size - 1] = 9;
                })
                .unwrap();
                let mut payload = vec![0u8; size];
                payload[0] = 7;
                payload[size - 1] = 9;
                let mut p = v4::Publish::new(topic, qos(qos_level).unwrap(), payload);
                p.pkid = if qos_level == 0 { 0 } else { pkid };
                let mut want = BytesMut::new();
                p.write(&mut want).unwrap();
                assert_eq!(buf, want, "qos {qos_level} pkid {pkid}");
                let Packet::Publish(got) = v4::read(&mut buf, MAX_PACKET).unwrap() else {
                    panic!("not a PUBLISH")
                };
                assert_eq!(got, p);
            }
        }
        let mut enc = PublishEncoder::new(&["a".to_string()], 1, 20).unwrap();
        let mut buf = BytesMut::new();
        assert!(enc.encode(&mut buf, 0, 0, |_| {}).is_err(), "packet id 0");
        assert!(enc.encode(&mut buf, 1, 9, |_| {}).is_err(), "no topic 1");
        assert!(buf.is_empty());
    }

    #[test]
    fn qos0_publish_has_no_packet_id() {
        let mut enc = PublishEncoder::new(&["t".to_string()], 0, 20).unwrap();
        let mut buf = BytesMut::new();
        enc.encode(&mut buf, 0, 5, |_| {}).unwrap();
        // 0x30, remaining length, topic length and "t", 20 payload bytes
        assert_eq!(buf.len(), 2 + 3 + 20);
        let Packet::Publish(p) = v4::read(&mut buf, MAX_PACKET).unwrap() else {
            panic!("not a PUBLISH")
        };
        assert_eq!((p.qos, p.pkid), (QoS::AtMostOnce, 0));
    }

    #[test]
    fn acks_round_trip() {
        let mut buf = BytesMut::new();
        for (k, pid) in [
            (PacketType::PubAck, 1),
            (PacketType::PubRec, 2),
            (PacketType::PubRel, 0x1234),
            (PacketType::PubComp, 4),
        ] {
            ack(&mut buf, k, pid).unwrap();
        }
        assert_eq!(&buf[8..12], &[0x62, 2, 0x12, 0x34], "PUBREL flags 0b0010");
        assert!(ack(&mut BytesMut::new(), PacketType::Publish, 1).is_err());
        let got: Vec<_> = std::iter::from_fn(|| v4::read(&mut buf, MAX_PACKET).ok()).collect();
        assert_eq!(
            got,
            vec![
                Packet::PubAck(v4::PubAck::new(1)),
                Packet::PubRec(v4::PubRec::new(2)),
                Packet::PubRel(v4::PubRel::new(0x1234)),
                Packet::PubComp(v4::PubComp::new(4)),
            ]
        );
    }
}
