//! Client-side MQTT 3.1.1: just the packets the load generator needs, encoded into and
//! decoded from plain byte buffers so many packets go out in one write and come in with one
//! read.

use bytes::{Buf, BytesMut};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBACK: u8 = 9;

fn put_len(buf: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        buf.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// CONNECT, MQTT 3.1.1, no will, no credentials; `clean` is the Clean Session flag.
pub fn connect(buf: &mut Vec<u8>, client_id: &str, keepalive: u16, clean: bool) {
    buf.push(0x10);
    put_len(buf, 10 + 2 + client_id.len());
    put_str(buf, "MQTT");
    buf.push(4); // protocol level 3.1.1
    buf.push(if clean { 0x02 } else { 0x00 });
    buf.extend_from_slice(&keepalive.to_be_bytes());
    put_str(buf, client_id);
}

pub fn subscribe(buf: &mut Vec<u8>, pid: u16, filter: &str, qos: u8) {
    buf.push(0x82);
    put_len(buf, 2 + 2 + filter.len() + 1);
    buf.extend_from_slice(&pid.to_be_bytes());
    put_str(buf, filter);
    buf.push(qos);
}

pub fn publish(buf: &mut Vec<u8>, topic: &str, qos: u8, pid: u16, payload: &[u8]) {
    buf.push(0x30 | (qos << 1));
    let id_len = if qos > 0 { 2 } else { 0 };
    put_len(buf, 2 + topic.len() + id_len + payload.len());
    put_str(buf, topic);
    if qos > 0 {
        buf.extend_from_slice(&pid.to_be_bytes());
    }
    buf.extend_from_slice(payload);
}

/// PUBACK / PUBREC / PUBREL / PUBCOMP (PUBREL carries the mandatory 0b0010 flags).
pub fn ack(buf: &mut Vec<u8>, kind: u8, pid: u16) {
    let flags = if kind == PUBREL { 0x02 } else { 0 };
    buf.push((kind << 4) | flags);
    buf.push(2);
    buf.extend_from_slice(&pid.to_be_bytes());
}

pub fn disconnect(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[0xE0, 0]);
}

/// One complete packet at the front of `buf`: (first byte, body start, total length), or
/// None when more bytes are needed.
pub fn frame(buf: &[u8]) -> io::Result<Option<(u8, usize, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut mult = 1usize;
    let mut i = 1;
    loop {
        if i >= buf.len() {
            return Ok(None);
        }
        if i > 4 {
            return Err(bad("remaining length longer than 4 bytes"));
        }
        let b = buf[i];
        len += (b & 0x7f) as usize * mult;
        mult *= 128;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let total = i + len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((buf[0], i, total)))
}

pub fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// A received PUBLISH, borrowed from the read buffer.
pub struct Publish<'a> {
    pub qos: u8,
    pub pid: u16,
    pub payload: &'a [u8],
}

pub fn parse_publish(first: u8, body: &[u8]) -> io::Result<Publish<'_>> {
    let qos = (first >> 1) & 3;
    if body.len() < 2 {
        return Err(bad("short PUBLISH"));
    }
    let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2 + tlen;
    if body.len() < at {
        return Err(bad("short PUBLISH topic"));
    }
    let mut pid = 0;
    if qos > 0 {
        if body.len() < at + 2 {
            return Err(bad("short PUBLISH packet id"));
        }
        pid = u16::from_be_bytes([body[at], body[at + 1]]);
        at += 2;
    }
    Ok(Publish {
        qos,
        pid,
        payload: &body[at..],
    })
}

pub fn ack_pid(body: &[u8]) -> io::Result<u16> {
    if body.len() < 2 {
        return Err(bad("short acknowledgement"));
    }
    Ok(u16::from_be_bytes([body[0], body[1]]))
}

/// One MQTT connection driven by a single task: packets are encoded into `wbuf` and sent
/// with one `write_all`; reads fill `rbuf` with whatever the socket has.
pub struct Client {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
    pub wbuf: Vec<u8>,
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
                wbuf: Vec::with_capacity(256),
            };
            connect(&mut c.wbuf, client_id, 0, clean);
            c.flush().await?;
            let (first, body) = c.next_packet().await?;
            if first >> 4 != CONNACK || body.len() < 2 {
                return Err(bad("expected CONNACK"));
            }
            if body[1] != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("CONNACK return code {}", body[1]),
                ));
            }
            Ok((c, body[0] & 1 == 1))
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
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> io::Result<u8> {
        subscribe(&mut self.wbuf, 1, filter, qos);
        self.flush().await?;
        let (first, body) = self.next_packet().await?;
        if first >> 4 != SUBACK || body.len() < 3 {
            return Err(bad("expected SUBACK"));
        }
        if body[2] == 0x80 {
            return Err(bad("subscription refused"));
        }
        Ok(body[2])
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Read whatever the socket has (at least one byte); EOF is an error.
    pub async fn read_more(&mut self) -> io::Result<usize> {
        if self.rbuf.capacity() - self.rbuf.len() < 16 * 1024 {
            self.rbuf.reserve(64 * 1024);
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "broker closed the connection",
            ));
        }
        Ok(n)
    }

    /// Next whole packet (handshake use only: copies the body).
    async fn next_packet(&mut self) -> io::Result<(u8, Vec<u8>)> {
        loop {
            if let Some((first, start, total)) = frame(&self.rbuf)? {
                let body = self.rbuf[start..total].to_vec();
                self.rbuf.advance(total);
                return Ok((first, body));
            }
            self.read_more().await?;
        }
    }

    /// Hand every complete packet in the read buffer to `f`, then drop them from the buffer.
    pub fn drain<F>(&mut self, mut f: F) -> io::Result<()>
    where
        F: FnMut(u8, &[u8], &mut Vec<u8>) -> io::Result<()>,
    {
        let mut pos = 0;
        while let Some((first, start, total)) = frame(&self.rbuf[pos..])? {
            f(first, &self.rbuf[pos + start..pos + total], &mut self.wbuf)?;
            pos += total;
        }
        self.rbuf.advance(pos);
        Ok(())
    }

    /// Best-effort DISCONNECT.
    pub async fn close(mut self) {
        disconnect(&mut self.wbuf);
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
        disconnect(&mut self.wbuf);
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

    #[test]
    fn publish_round_trip() {
        let mut b = Vec::new();
        publish(&mut b, "a/b", 1, 7, &[1u8; 300]);
        let (first, start, total) = frame(&b).unwrap().unwrap();
        assert_eq!(total, b.len());
        assert_eq!(start, 3); // 2-byte remaining length
        let p = parse_publish(first, &b[start..total]).unwrap();
        assert_eq!((p.qos, p.pid, p.payload.len()), (1, 7, 300));
        assert!(frame(&b[..total - 1]).unwrap().is_none());
    }

    #[test]
    fn acks() {
        let mut b = Vec::new();
        ack(&mut b, PUBREL, 0x1234);
        assert_eq!(b, vec![0x62, 2, 0x12, 0x34]);
        b.clear();
        connect(&mut b, "c", 0, true);
        assert_eq!(&b[..2], &[0x10, 13]);
        assert_eq!(b[9], 0x02);
        b.clear();
        connect(&mut b, "c", 0, false);
        assert_eq!(b[9], 0x00);
    }
}
