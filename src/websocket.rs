//! MQTT over WebSockets (MQTT 5.0 section 6, RFC 6455): the HTTP upgrade with Tern's checks,
//! then a [`WsStream`] that turns binary frames back into the byte stream the connection task
//! reads, so [`crate::connection::serve`] runs unchanged on top of it.
//!
//! The handshake accepts a request only for the configured path (else HTTP 404), only when the
//! client offers the `mqtt` (or the older `mqttv3.1`) subprotocol (else 400), and, when an
//! origin allow-list is set, only from a listed browser origin (else 403; a request without an
//! `Origin` header comes from a non-browser client and is allowed).
//!
//! MQTT does not align packets with frames: a packet may be split over several binary frames
//! and one frame may carry several packets, so reads see the concatenated frame payloads.
//! Text frames are not MQTT (close 1003); pings are answered while the broker waits to read;
//! a close frame is answered and then reads see end of stream.

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::WebSocketStream;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::{header, HeaderValue, StatusCode};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes};

/// The subprotocol MQTT 3.1.1 and 5.0 clients must offer ([MQTT-6.0.0-3]).
pub const SUBPROTOCOL: &str = "mqtt";
/// The subprotocol some MQTT 3.1 era clients offer instead.
pub const SUBPROTOCOL_V31: &str = "mqttv3.1";

/// Largest payload put in one outgoing binary frame; a longer write is split over frames.
const MAX_OUT_FRAME: usize = 64 * 1024;
/// tungstenite allocates its read buffer up front for every connection; idle clients should
/// cost little, and a busy one still reads whole frames (the buffer grows to fit a frame).
const READ_BUFFER: usize = 4 * 1024;
/// Attacker-controlled strings (path, origin) are cut to this many characters in errors.
const SHOW_MAX: usize = 100;

/// What the WebSocket listener accepts.
#[derive(Debug, Clone)]
pub struct WsOptions {
    /// The request path MQTT is served on, e.g. `/mqtt` (the query string is ignored).
    pub path: String,
    /// Browser origins allowed to connect (`scheme://host[:port]`); empty allows any.
    pub allowed_origins: Vec<String>,
    /// Largest WebSocket message (and frame) accepted from a client, in bytes.
    pub max_message_size: usize,
}

/// Why a WebSocket connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The request was for another path; answered with HTTP 404.
    #[error("WebSocket request for path {0:?} refused: not the MQTT path (HTTP 404)")]
    WrongPath(String),
    /// The client offered neither `mqtt` nor `mqttv3.1`; answered with HTTP 400.
    #[error("WebSocket request refused: the client did not offer the mqtt subprotocol (HTTP 400)")]
    NoSubprotocol,
    /// The request came from a browser origin not in the allow-list; answered with HTTP 403.
    #[error("WebSocket request refused: origin {0:?} is not allowed (HTTP 403)")]
    OriginNotAllowed(String),
    #[error("WebSocket I/O error: {0}")]
    Io(#[source] io::Error),
    /// Not a valid WebSocket upgrade request (or some other handshake failure).
    #[error("WebSocket handshake failed: {0}")]
    Protocol(#[source] Box<tungstenite::Error>),
}

impl WsError {
    /// The HTTP status the client was refused with, for handshakes refused by Tern's checks.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            WsError::WrongPath(_) => Some(404),
            WsError::NoSubprotocol => Some(400),
            WsError::OriginNotAllowed(_) => Some(403),
            WsError::Io(_) | WsError::Protocol(_) => None,
        }
    }
}

/// Performs the server side of the WebSocket handshake on `stream`. On refusal the HTTP error
/// response has been written before the error is returned. Not bounded in time: the caller
/// wraps it in its connect timeout (the request itself is bounded in size by tungstenite).
pub async fn accept<S>(stream: S, opts: &WsOptions) -> Result<WsStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(opts.max_message_size))
        .max_frame_size(Some(opts.max_message_size));
    let mut verdict: Option<Result<&'static str, WsError>> = None;
    // The error type is tungstenite's HTTP response; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| {
        let checked = check_request(request, opts);
        let reply = match &checked {
            Ok(subprotocol) => {
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(subprotocol),
                );
                Ok(response)
            }
            Err(refusal) => Err(refusal_response(refusal)),
        };
        verdict = Some(checked);
        reply
    };
    let result =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await;
    match (result, verdict) {
        (Ok(ws), Some(Ok(subprotocol))) => Ok(WsStream {
            ws,
            incoming: Bytes::new(),
            read_state: ReadState::Open,
            write_pending: false,
            close_queued: false,
            subprotocol,
        }),
        (Err(_), Some(Err(refusal))) => Err(refusal),
        (Err(tungstenite::Error::Io(e)), _) => Err(WsError::Io(e)),
        (Err(e), _) => Err(WsError::Protocol(Box::new(e))),
        // Unreachable in practice: a completed handshake always went through the callback.
        (Ok(_), _) => Err(WsError::Protocol(Box::new(tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::HandshakeIncomplete,
        )))),
    }
}

/// Tern's checks on an upgrade request; returns the subprotocol to answer with.
fn check_request(request: &Request, opts: &WsOptions) -> Result<&'static str, WsError> {
    let path = request.uri().path();
    if path != opts.path {
        return Err(WsError::WrongPath(shorten(path)));
    }
    let offered = || {
        request
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    let subprotocol = if offered().any(|p| p == SUBPROTOCOL) {
        SUBPROTOCOL
    } else if offered().any(|p| p == SUBPROTOCOL_V31) {
        SUBPROTOCOL_V31
    } else {
        return Err(WsError::NoSubprotocol);
    };
    if !opts.allowed_origins.is_empty() {
        for origin in request.headers().get_all(header::ORIGIN) {
            let Ok(origin) = origin.to_str() else {
                return Err(WsError::OriginNotAllowed("<not visible ASCII>".into()));
            };
            if !origin_allowed(origin, &opts.allowed_origins) {
                return Err(WsError::OriginNotAllowed(shorten(origin)));
            }
        }
    }
    Ok(subprotocol)
}

/// Exact match of a serialized origin; scheme and host are case-insensitive (and the rest of
/// an origin is a port number), so the whole comparison is. A trailing `/` in the configured
/// entry is tolerated.
fn origin_allowed(origin: &str, allowed: &[String]) -> bool {
    let origin = origin.trim();
    allowed
        .iter()
        .any(|a| a.trim().trim_end_matches('/').eq_ignore_ascii_case(origin))
}

fn shorten(s: &str) -> String {
    s.chars().take(SHOW_MAX).collect()
}

fn refusal_response(refusal: &WsError) -> ErrorResponse {
    let (status, body) = match refusal {
        WsError::WrongPath(_) => (StatusCode::NOT_FOUND, "Not Found: no MQTT endpoint here\n"),
        WsError::NoSubprotocol => (
            StatusCode::BAD_REQUEST,
            "Bad Request: offer the WebSocket subprotocol mqtt\n",
        ),
        WsError::OriginNotAllowed(_) => (StatusCode::FORBIDDEN, "Forbidden: origin not allowed\n"),
        WsError::Io(_) | WsError::Protocol(_) => (StatusCode::BAD_REQUEST, "Bad Request\n"),
    };
    let mut response = ErrorResponse::new(Some(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[derive(Debug)]
enum ReadState {
    Open,
    /// The client's close frame arrived: our reply is flushed, then reads see end of stream.
    Closing,
    /// The client broke the protocol: our close frame is flushed, then reads fail.
    Failing(io::ErrorKind, String),
    Eof,
    Failed(io::ErrorKind, String),
}

/// An accepted WebSocket connection as a byte stream: reads yield the payloads of the
/// client's binary frames back to back, each write goes out as one binary frame (at most
/// 64 KiB; the rest is left to the next write).
#[derive(Debug)]
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// What is left of the last binary message.
    incoming: Bytes,
    read_state: ReadState,
    /// A frame was handed to tungstenite but not yet fully written out; reads and writes
    /// keep pushing it, so it does not wait for the broker's next write.
    write_pending: bool,
    /// Our close frame (shutdown) has been queued.
    close_queued: bool,
    subprotocol: &'static str,
}

impl<S> WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// The subprotocol agreed on in the handshake (`mqtt` or `mqttv3.1`).
    pub fn subprotocol(&self) -> &'static str {
        self.subprotocol
    }

    /// The underlying stream (for example a TLS stream, to read the client certificate).
    pub fn get_ref(&self) -> &S {
        self.ws.get_ref()
    }

    /// Writes out whatever tungstenite holds (data frames, pongs, close replies) and flushes
    /// the underlying stream.
    fn poll_push(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.ws).poll_flush(cx)).map_err(to_io)?;
        self.write_pending = false;
        Poll::Ready(Ok(()))
    }

    /// [`Self::poll_push`], then flushes the underlying stream as well: once the close
    /// handshake is done tungstenite writes its last frame without flushing (a TLS stream may
    /// still hold it).
    fn poll_push_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_push(cx))?;
        Pin::new(self.ws.get_mut()).poll_flush(cx)
    }

    /// Queues a close frame for a client that broke the protocol; the read then fails.
    fn fail(&mut self, code: CloseCode, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        self.read_state = match Pin::new(&mut self.ws).start_send(Message::Close(Some(frame))) {
            Ok(()) => ReadState::Failing(io::ErrorKind::InvalidData, reason.to_string()),
            Err(_) => ReadState::Failed(io::ErrorKind::InvalidData, reason.to_string()),
        };
    }
}

impl<S> AsyncRead for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_pending {
            // Errors show on the next write; Pending has registered for writability.
            let _ = this.poll_push(cx);
        }
        loop {
            if !this.incoming.is_empty() {
                let n = this.incoming.len().min(buf.remaining());
                buf.put_slice(&this.incoming[..n]);
                this.incoming.advance(n);
                return Poll::Ready(Ok(()));
            }
            match &this.read_state {
                ReadState::Open => {}
                ReadState::Eof => return Poll::Ready(Ok(())),
                ReadState::Failed(kind, msg) => {
                    return Poll::Ready(Err(io::Error::new(*kind, msg.clone())))
                }
                ReadState::Closing => {
                    // Whether or not the reply could be written, the stream has ended.
                    let _ = ready!(this.poll_push_all(cx));
                    this.read_state = ReadState::Eof;
                    continue;
                }
                ReadState::Failing(kind, msg) => {
                    let failed = ReadState::Failed(*kind, msg.clone());
                    let _ = ready!(this.poll_push_all(cx));
                    this.read_state = failed;
                    continue;
                }
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None => this.read_state = ReadState::Eof,
                Some(Ok(Message::Binary(data))) => this.incoming = data,
                Some(Ok(Message::Text(_))) => this.fail(
                    CloseCode::Unsupported,
                    "text frames are not MQTT: use binary frames",
                ),
                // tungstenite has queued the pong; the next poll_next writes it out.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) => this.read_state = ReadState::Closing,
                Some(Err(tungstenite::Error::Capacity(_))) => {
                    this.fail(CloseCode::Size, "message too big")
                }
                Some(Err(
                    tungstenite::Error::Protocol(_)
                    | tungstenite::Error::Utf8(_)
                    | tungstenite::Error::AttackAttempt,
                )) => this.fail(CloseCode::Protocol, "WebSocket protocol error"),
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => this.read_state = ReadState::Eof,
                Some(Err(e)) => {
                    let e = to_io(e);
                    this.read_state = ReadState::Failed(e.kind(), e.to_string());
                }
            }
        }
    }
}

impl<S> AsyncWrite for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_queued {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "WebSocket closed",
            )));
        }
        // At most one frame waits in tungstenite's buffer: a client that does not read
        // holds us back here, not in memory.
        if this.write_pending {
            ready!(this.poll_push(cx))?;
        }
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(to_io)?;
        let n = buf.len().min(MAX_OUT_FRAME);
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(to_io)?;
        // The connection task does not flush after each write (TCP needs none): push the
        // frame out now; what does not fit is pushed by the next read or write.
        match this.poll_push(cx) {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
            Poll::Pending => this.write_pending = true,
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_push(cx)
    }

    /// Sends a close frame (1000, normal closure) unless the close handshake has already
    /// happened, flushes, and shuts the underlying stream down.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            if matches!(this.read_state, ReadState::Open) {
                // Anything queued before goes first; a failure here only means the close
                // frame cannot be sent either.
                if ready!(Pin::new(&mut this.ws).poll_ready(cx)).is_ok() {
                    let frame = CloseFrame {
                        code: CloseCode::Normal,
                        reason: Utf8Bytes::from_static(""),
                    };
                    let _ = Pin::new(&mut this.ws).start_send(Message::Close(Some(frame)));
                }
            }
            this.close_queued = true;
        }
        let _ = ready!(this.poll_push(cx));
        Pin::new(this.ws.get_mut()).poll_shutdown(cx)
    }
}

fn to_io(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "WebSocket closed")
        }
        tungstenite::Error::Protocol(_)
        | tungstenite::Error::Capacity(_)
        | tungstenite::Error::Utf8(_)
        | tungstenite::Error::AttackAttempt => io::Error::new(io::ErrorKind::InvalidData, e),
        other => io::Error::other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::handshake::client::{
        Request as ClientRequest, Response as ClientResponse,
    };

    type Client = WebSocketStream<DuplexStream>;

    /// A v3.1.1 CONNECT for client id "ws-test" (clean session, keep alive 60).
    const CONNECT: &[u8] = &[
        0x10, 0x13, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x07, b'w',
        b's', b'-', b't', b'e', b's', b't',
    ];
    /// SUBSCRIBE packet id 1 to "a/b" at QoS 1.
    const SUBSCRIBE: &[u8] = &[0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01];

    fn opts() -> WsOptions {
        WsOptions {
            path: "/mqtt".into(),
            allowed_origins: Vec::new(),
            max_message_size: 1 << 20,
        }
    }

    fn request(url: &str, protocols: Option<&str>, origin: Option<&str>) -> ClientRequest {
        let mut req = url.into_client_request().unwrap();
        if let Some(p) = protocols {
            req.headers_mut()
                .insert(header::SEC_WEBSOCKET_PROTOCOL, p.parse().unwrap());
        }
        if let Some(o) = origin {
            req.headers_mut().insert(header::ORIGIN, o.parse().unwrap());
        }
        req
    }

    /// Runs both sides of a handshake over an in-memory pipe.
    async fn handshake(
        req: ClientRequest,
        opts: &WsOptions,
    ) -> (
        Result<WsStream<DuplexStream>, WsError>,
        Result<(Client, ClientResponse), tungstenite::Error>,
    ) {
        let (server_io, client_io) = duplex(256 * 1024);
        let client = tokio_tungstenite::client_async(req, client_io);
        let server = accept(server_io, opts);
        tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(server, client)
        })
        .await
        .expect("handshake timed out")
    }

    async fn connected(opts: &WsOptions) -> (WsStream<DuplexStream>, Client) {
        let (server, client) =
            handshake(request("ws://localhost/mqtt", Some("mqtt"), None), opts).await;
        (server.unwrap(), client.unwrap().0)
    }

    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("timed out")
    }

    fn refused_status(client: Result<(Client, ClientResponse), tungstenite::Error>) -> u16 {
        match client {
            Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("unexpected client error {e}"),
            Ok(_) => panic!("client was accepted"),
        }
    }

    #[tokio::test]
    async fn connect_split_over_three_frames_reads_back_whole() {
        let (mut server, mut client) = connected(&opts()).await;
        for part in [&CONNECT[..1], &CONNECT[1..7], &CONNECT[7..]] {
            client
                .send(Message::Binary(Bytes::copy_from_slice(part)))
                .await
                .unwrap();
        }
        let mut got = vec![0u8; CONNECT.len()];
        within(server.read_exact(&mut got)).await.unwrap();
        assert_eq!(got, CONNECT);
    }

    #[tokio::test]
    async fn two_packets_joined_in_one_frame() {
        let (mut server, mut client) = connected(&opts()).await;
        let joined = [CONNECT, SUBSCRIBE].concat();
        client
            .send(Message::Binary(joined.clone().into()))
            .await
            .unwrap();
        // Small reads: the rest of a frame is kept for the next read.
        let mut got = Vec::new();
        let mut chunk = [0u8; 7];
        while got.len() < joined.len() {
            let n = within(server.read(&mut chunk)).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, joined);
    }

    #[tokio::test]
    async fn ping_is_answered_while_the_server_only_reads() {
        let (mut server, mut client) = connected(&opts()).await;
        // The broker sits in read and never writes or flushes.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let n = server.read(&mut buf).await;
            (n.map(|n| buf[..n].to_vec()), server)
        });
        client
            .send(Message::Ping(Bytes::from_static(b"hello")))
            .await
            .unwrap();
        let reply = within(client.next()).await.unwrap().unwrap();
        assert_eq!(reply, Message::Pong(Bytes::from_static(b"hello")));
        // The read is still waiting for data and gets it.
        client
            .send(Message::Binary(Bytes::from_static(CONNECT)))
            .await
            .unwrap();
        let (got, _server) = within(reader).await.unwrap();
        assert_eq!(got.unwrap(), CONNECT);
    }

    #[tokio::test]
    async fn close_frame_is_answered_then_eof() {
        let (mut server, mut client) = connected(&opts()).await;
        client
            .send(Message::Binary(Bytes::from_static(CONNECT)))
            .await
            .unwrap();
        client
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: Utf8Bytes::from_static("bye"),
            })))
            .await
            .unwrap();
        let mut all = Vec::new();
        within(server.read_to_end(&mut all)).await.unwrap();
        assert_eq!(all, CONNECT, "data before the close is delivered, then EOF");
        // Further reads stay at EOF.
        let mut buf = [0u8; 4];
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        // The client got our close reply.
        match within(client.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
            other => panic!("expected a close reply, got {other:?}"),
        }
        // Writing after the close fails cleanly.
        assert!(server.write(b"x").await.is_err());
        drop(server);
        assert!(within(client.next()).await.is_none());
    }

    #[tokio::test]
    async fn wrong_path_is_refused_with_404() {
        let (server, client) =
            handshake(request("ws://localhost/other", Some("mqtt"), None), &opts()).await;
        assert!(matches!(server, Err(WsError::WrongPath(ref p)) if p == "/other"));
        assert_eq!(refused_status(client), 404);
        // Also a prefix or a trailing slash is another path.
        let (server, client) =
            handshake(request("ws://localhost/mqtt/", Some("mqtt"), None), &opts()).await;
        assert_eq!(server.err().and_then(|e| e.http_status()), Some(404));
        assert_eq!(refused_status(client), 404);
    }

    #[tokio::test]
    async fn query_string_is_ignored() {
        let (server, client) = handshake(
            request("ws://localhost/mqtt?token=abc", Some("mqtt"), None),
            &opts(),
        )
        .await;
        assert!(server.is_ok());
        assert!(client.is_ok());
    }

    #[tokio::test]
    async fn no_mqtt_subprotocol_is_refused_with_400() {
        let (server, client) = handshake(request("ws://localhost/mqtt", None, None), &opts()).await;
        assert!(matches!(server, Err(WsError::NoSubprotocol)));
        assert_eq!(refused_status(client), 400);
        let (server, client) = handshake(
            request("ws://localhost/mqtt", Some("wamp, mqttv5, MQTT"), None),
            &opts(),
        )
        .await;
        assert!(matches!(server, Err(WsError::NoSubprotocol)));
        assert_eq!(refused_status(client), 400);
    }

    #[tokio::test]
    async fn subprotocol_is_echoed() {
        let (server, client) = handshake(
            request("ws://localhost/mqtt", Some("mqttv3.1"), None),
            &opts(),
        )
        .await;
        assert_eq!(server.unwrap().subprotocol(), "mqttv3.1");
        let (_, resp) = client.unwrap();
        assert_eq!(
            resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).unwrap(),
            "mqttv3.1"
        );
        // mqtt is preferred when both are offered, whatever the order.
        let (server, client) = handshake(
            request("ws://localhost/mqtt", Some("mqttv3.1, mqtt"), None),
            &opts(),
        )
        .await;
        assert_eq!(server.unwrap().subprotocol(), "mqtt");
        let (_, resp) = client.unwrap();
        assert_eq!(
            resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).unwrap(),
            "mqtt"
        );
    }

    #[tokio::test]
    async fn origin_allow_list() {
        let mut o = opts();
        o.allowed_origins = vec![
            "http://good.example".into(),
            "https://app.example:8443/".into(),
        ];
        let url = "ws://localhost/mqtt";
        let (server, client) =
            handshake(request(url, Some("mqtt"), Some("http://evil.example")), &o).await;
        assert!(
            matches!(server, Err(WsError::OriginNotAllowed(ref s)) if s == "http://evil.example")
        );
        assert_eq!(refused_status(client), 403);
        // A longer host or another port is another origin.
        for bad in ["http://good.example.evil", "http://good.example:81", "null"] {
            let (server, client) = handshake(request(url, Some("mqtt"), Some(bad)), &o).await;
            assert_eq!(
                server.err().and_then(|e| e.http_status()),
                Some(403),
                "{bad}"
            );
            assert_eq!(refused_status(client), 403);
        }
        for good in [
            "http://good.example",
            "HTTP://Good.Example",
            "https://app.example:8443",
        ] {
            let (server, client) = handshake(request(url, Some("mqtt"), Some(good)), &o).await;
            assert!(server.is_ok(), "{good}");
            assert!(client.is_ok(), "{good}");
        }
        // Non-browser clients send no Origin.
        let (server, client) = handshake(request(url, Some("mqtt"), None), &o).await;
        assert!(server.is_ok());
        assert!(client.is_ok());
        // Without an allow-list any origin is accepted.
        let (server, _) = handshake(
            request(url, Some("mqtt"), Some("http://evil.example")),
            &opts(),
        )
        .await;
        assert!(server.is_ok());
    }

    #[tokio::test]
    async fn text_frame_is_an_error_and_closes_with_1003() {
        let (mut server, mut client) = connected(&opts()).await;
        client.send(Message::text("hello")).await.unwrap();
        let mut buf = [0u8; 16];
        let err = within(server.read(&mut buf)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        match within(client.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(frame.code, CloseCode::Unsupported)
            }
            other => panic!("expected close 1003, got {other:?}"),
        }
        // The error sticks.
        assert!(server.read(&mut buf).await.is_err());
    }

    #[tokio::test]
    async fn oversized_message_is_refused_with_1009() {
        let mut o = opts();
        o.max_message_size = 1024;
        let (mut server, mut client) = connected(&o).await;
        client
            .send(Message::Binary(vec![0u8; 4096].into()))
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        let err = within(server.read(&mut buf)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        match within(client.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
            other => panic!("expected close 1009, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn writes_arrive_as_binary_frames() {
        let (mut server, mut client) = connected(&opts()).await;
        server.write_all(b"\x20\x02\x00\x00").await.unwrap();
        assert_eq!(
            within(client.next()).await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(b"\x20\x02\x00\x00"))
        );
        // A write bigger than one frame is split; the bytes arrive in order.
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn(async move {
            server.write_all(&big).await.unwrap();
            server.flush().await.unwrap();
            (big, server)
        });
        let mut got = Vec::new();
        let mut frames = 0;
        while got.len() < 200_000 {
            match within(client.next()).await {
                Some(Ok(Message::Binary(b))) => {
                    assert!(b.len() <= MAX_OUT_FRAME);
                    got.extend_from_slice(&b);
                    frames += 1;
                }
                other => panic!("expected binary frames, got {other:?}"),
            }
        }
        let (big, _server) = within(writer).await.unwrap();
        assert_eq!(got, big);
        assert!(frames >= 4);
    }

    #[tokio::test]
    async fn writes_go_out_without_flush_when_the_pipe_was_full() {
        // A tiny pipe: a frame cannot be written in one go, and the broker never flushes;
        // its pending reads push the rest out.
        let o = opts();
        let (server_io, client_io) = duplex(64);
        let req = request("ws://localhost/mqtt", Some("mqtt"), None);
        let (server, client) = within(async {
            tokio::join!(
                accept(server_io, &o),
                tokio_tungstenite::client_async(req, client_io)
            )
        })
        .await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap().0);
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let n = server.write(&data).await.unwrap();
        assert_eq!(n, data.len());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let _ = server.read(&mut buf).await;
        });
        assert_eq!(
            within(client.next()).await.unwrap().unwrap(),
            Message::Binary(data.into())
        );
        reader.abort();
    }

    #[tokio::test]
    async fn shutdown_sends_close_1000() {
        let (mut server, mut client) = connected(&opts()).await;
        server.write_all(b"\xe0\x00").await.unwrap();
        within(server.shutdown()).await.unwrap();
        assert_eq!(
            within(client.next()).await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(b"\xe0\x00"))
        );
        match within(client.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
            other => panic!("expected close 1000, got {other:?}"),
        }
        assert!(server.write(b"x").await.is_err());
    }

    #[tokio::test]
    async fn garbage_never_panics() {
        // Not an HTTP request at all.
        let (server_io, mut client_io) = duplex(4096);
        let server = tokio::spawn(async move { accept(server_io, &opts()).await.map(|_| ()) });
        client_io
            .write_all(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\r\n\r\n")
            .await
            .unwrap();
        drop(client_io);
        assert!(within(server).await.unwrap().is_err());
        // A plain HTTP GET without the upgrade headers.
        let (server_io, mut client_io) = duplex(4096);
        let server = tokio::spawn(async move { accept(server_io, &opts()).await.map(|_| ()) });
        client_io
            .write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(matches!(
            within(server).await.unwrap(),
            Err(WsError::Protocol(_))
        ));
        // After the handshake: unmasked and reserved-bit frames, a bad opcode, random bytes.
        for junk in [
            &b"\x82\x03abc"[..],
            b"\xf2\x80\x00\x00\x00\x00",
            b"\x83\x80\x00\x00\x00\x00",
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x88\x81\x00\x00\x00\x00\x01",
        ] {
            let o = opts();
            let (server_io, client_io) = duplex(4096);
            let req = request("ws://localhost/mqtt", Some("mqtt"), None);
            let (server, client) = within(async {
                tokio::join!(
                    accept(server_io, &o),
                    tokio_tungstenite::client_async(req, client_io)
                )
            })
            .await;
            let mut server = server.unwrap();
            let mut raw = client.unwrap().0.into_inner();
            raw.write_all(junk).await.unwrap();
            let mut buf = [0u8; 16];
            let r = within(server.read(&mut buf)).await;
            assert!(r.is_err(), "junk {junk:?} read as {r:?}");
        }
    }

    #[test]
    fn origin_matching() {
        let allowed = vec!["http://good.example".to_string()];
        assert!(origin_allowed("http://good.example", &allowed));
        assert!(origin_allowed("HTTP://GOOD.EXAMPLE", &allowed));
        assert!(!origin_allowed("https://good.example", &allowed));
        assert!(!origin_allowed("http://good.example:8080", &allowed));
        assert!(!origin_allowed("", &allowed));
    }
}
