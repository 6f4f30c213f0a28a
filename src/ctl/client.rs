//! The HTTP client of `tern ctl`: one request per connection over hyper's HTTP/1 client
//! connection (as the server side answers, `http.rs`), in plain TCP for `http://` and rustls
//! for `https://` (the server's certificate checked against `--ca`, as a bridge checks its
//! remote's: an operator's CLI trusts whom it is told to).

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::client::conn::http1;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Longest a request waits for its answer's head (a trace's body then streams longer).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer body read into memory (a page of a listing is far smaller).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Why a call failed, as the CLI prints it.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach {url}: {message}")]
    Connect { url: String, message: String },
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
    #[error("{0}")]
    Io(String),
}

/// Where the API is and how to authenticate.
pub struct Client {
    scheme_tls: bool,
    host: String,
    port: u16,
    /// Path prefix before `/api/v1` (none usually).
    base: String,
    token: String,
    ca: Option<PathBuf>,
}

/// An answer: status and body.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Client {
    /// `url` like `http://127.0.0.1:9883` or `https://broker.example:9883`.
    pub fn new(url: &str, token: String, ca: Option<PathBuf>) -> Result<Client, CtlError> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(CtlError::Usage(format!(
                "--url {url:?}: give http://HOST:PORT or https://HOST:PORT"
            )));
        };
        let (authority, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/').to_string()),
            None => (rest, String::new()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse() {
                Ok(p) => (h.trim_start_matches('[').trim_end_matches(']'), p),
                Err(_) => return Err(CtlError::Usage(format!("--url {url:?}: bad port"))),
            },
            _ => (
                authority.trim_start_matches('[').trim_end_matches(']'),
                if tls { 443 } else { 80 },
            ),
        };
        if tls && ca.is_none() {
            return Err(CtlError::Usage(
                "an https:// URL needs --ca FILE (the CA that signed the broker's certificate)"
                    .into(),
            ));
        }
        Ok(Client {
            scheme_tls: tls,
            host: host.to_string(),
            port,
            base,
            token,
            ca,
        })
    }

    fn url(&self) -> String {
        format!(
            "{}://{}:{}",
            if self.scheme_tls { "https" } else { "http" },
            self.host,
            self.port
        )
    }

    async fn connect(&self) -> Result<Box<dyn Io>, CtlError> {
        let err = |message: String| CtlError::Connect {
            url: self.url(),
            message,
        };
        let tcp = tokio::time::timeout(
            ANSWER_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| err("timed out".into()))?
        .map_err(|e| err(e.to_string()))?;
        if !self.scheme_tls {
            return Ok(Box::new(tcp));
        }
        let ca = self.ca.as_deref().ok_or_else(|| err("no --ca".into()))?;
        let config = crate::tls::client_config(ca, None).map_err(|e| err(e.to_string()))?;
        let name =
            ServerName::try_from(self.host.clone()).map_err(|e| err(format!("host name: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(&config))
            .connect(name, tcp)
            .await
            .map_err(|e| err(format!("TLS: {e}")))?;
        Ok(Box::new(stream))
    }

    /// Sends one request; returns the answer's status and its body as a stream.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        json: Option<String>,
    ) -> Result<(StatusCode, Body), CtlError> {
        let io = self.connect().await?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| CtlError::Io(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.base))
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            );
        let body = match json {
            Some(j) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                Body::from(j)
            }
            None => Body::empty(),
        };
        let req = req.body(body).map_err(|e| CtlError::Io(e.to_string()))?;
        let resp = tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| CtlError::Io("no answer within 30 s".into()))?
            .map_err(|e| CtlError::Io(e.to_string()))?;
        let status = resp.status();
        Ok((status, Body::new(resp.into_body())))
    }

    /// Sends one request and reads the whole answer; an error status becomes
    /// [`CtlError::Api`] with the API's `error` text.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        json: Option<String>,
    ) -> Result<Answer, CtlError> {
        let (status, body) = self.send(method, path_and_query, json).await?;
        let body = axum::body::to_bytes(body, MAX_BODY)
            .await
            .map_err(|e| CtlError::Io(e.to_string()))?;
        if !status.is_success() {
            return Err(api_error(status, &body));
        }
        Ok(Answer { status, body })
    }

    /// Streams the answer's body to `line`, one call per line, until it ends.
    pub async fn stream_lines(
        &self,
        method: Method,
        path_and_query: &str,
        json: Option<String>,
        mut line: impl FnMut(&str),
    ) -> Result<(), CtlError> {
        let (status, body) = self.send(method, path_and_query, json).await?;
        if !status.is_success() {
            let body = axum::body::to_bytes(body, MAX_BODY)
                .await
                .map_err(|e| CtlError::Io(e.to_string()))?;
            return Err(api_error(status, &body));
        }
        let mut stream = body.into_data_stream();
        let mut pending = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| CtlError::Io(e.to_string()))?;
            pending.extend_from_slice(&chunk);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let rest = pending.split_off(i + 1);
                line(String::from_utf8_lossy(&pending[..i]).trim_end());
                pending = rest;
            }
        }
        if !pending.is_empty() {
            line(String::from_utf8_lossy(&pending).trim_end());
        }
        Ok(())
    }
}

/// An error answer as the CLI shows it: the API's `error` text, else the body.
fn api_error(status: StatusCode, body: &[u8]) -> CtlError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    CtlError::Api {
        status: status.as_u16(),
        message,
    }
}

/// `s` percent-encoded for a path segment or a query value (everything but unreserved
/// characters), so client ids and topics with `/`, `+`, `#`, spaces or `$` travel intact.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split() {
        let c = Client::new("http://127.0.0.1:9883", "t".into(), None).expect("valid");
        assert_eq!(
            (c.host.as_str(), c.port, c.base.as_str()),
            ("127.0.0.1", 9883, "")
        );
        let c = Client::new("http://[::1]:9000/tern/", "t".into(), None).expect("valid");
        assert_eq!(
            (c.host.as_str(), c.port, c.base.as_str()),
            ("::1", 9000, "/tern")
        );
        assert!(Client::new("https://localhost:9883", "t".into(), None).is_err());
        assert!(Client::new("ftp://x", "t".into(), None).is_err());
    }

    #[test]
    fn encoding_keeps_only_unreserved() {
        assert_eq!(encode("a/b c#+$é"), "a%2Fb%20c%23%2B%24%C3%A9");
        assert_eq!(encode("dev-1_2.3~"), "dev-1_2.3~");
    }
}
