//! The `[listeners.tls]` listener against rumqttc as a real rustls client: certificates come
//! from certs/gen.sh (CA, server cert for localhost / 127.0.0.1, client cert CN=device1)
//! generated into a temporary directory per test. Every wait is bounded.

use crate::common::{cid, v3, WAIT};
use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A certificate set written by certs/gen.sh; the directory is removed on drop.
pub(crate) struct Certs {
    dir: PathBuf,
}

impl Certs {
    pub(crate) fn generate() -> Certs {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tern-it-certs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/gen.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .output()
            .expect("run certs/gen.sh");
        assert!(
            out.status.success(),
            "certs/gen.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Certs { dir }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    }

    /// The `[listeners.tls]` table for this certificate set.
    fn listener_toml(&self, require_client_cert: bool) -> String {
        format!(
            "[listeners.tls]\nbind = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
             require_client_cert = {require_client_cert}\n",
            self.path("server.pem").display().to_string(),
            self.path("server.key").display().to_string(),
            self.path("ca.pem").display().to_string(),
        )
    }

    /// rumqttc options for a TLS connection to `port`, with or without the client certificate.
    fn tls_opts(&self, id: &str, port: u16, with_client_cert: bool) -> MqttOptions {
        let mut o = v3::opts(id, port);
        let client_auth =
            with_client_cert.then(|| (self.read("client.pem"), self.read("client.key")));
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: self.read("ca.pem"),
            alpn: None,
            client_auth,
        }));
        o
    }
}

/// An in-process broker with both the TCP and the TLS listener (common::Broker does not expose
/// the TLS address).
pub(crate) struct TlsBroker {
    running: tern::Running,
    tcp_port: u16,
    pub(crate) tls_port: u16,
    data_dir: PathBuf,
}

impl TlsBroker {
    pub(crate) async fn start(certs: &Certs, require_client_cert: bool) -> TlsBroker {
        let data_dir = certs.path("data");
        let text = format!(
            "[listeners.tcp]\nbind = \"127.0.0.1:0\"\n{}[metrics]\nbind = \"127.0.0.1:0\"\n\
             [auth]\nallow_anonymous = true\n[storage]\ndir = {:?}\n",
            certs.listener_toml(require_client_cert),
            data_dir.display().to_string(),
        );
        let config = tern::Config::from_toml(&text).expect("test configuration is valid");
        let running = tokio::time::timeout(WAIT, tern::start(config))
            .await
            .expect("broker started in time")
            .expect("broker starts");
        let tcp_port = running.tcp_addr().expect("tcp listener bound").port();
        let tls_port = running.tls_addr().expect("tls listener bound").port();
        TlsBroker {
            running,
            tcp_port,
            tls_port,
            data_dir,
        }
    }

    pub(crate) async fn stop(self) {
        tokio::time::timeout(
            Duration::from_secs(5),
            self.running.shutdown(Duration::from_millis(500)),
        )
        .await
        .expect("broker shut down in time");
        let _ = std::fs::remove_dir_all(self.data_dir);
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Drives a fresh event loop until CONNACK (Ok) or the first error (Err), bounded by WAIT.
async fn connect_outcome(o: MqttOptions) -> Result<(), ConnectionError> {
    let (_client, mut eventloop) = AsyncClient::new(o, 16);
    tokio::time::timeout(WAIT, async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(c))) => {
                    assert_eq!(c.code, rumqttc::ConnectReturnCode::Success, "{c:?}");
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("TLS connect attempt finished (CONNACK or error) in time")
}

#[tokio::test]
async fn tls_client_with_certificate_publishes_to_tcp_subscriber() {
    let certs = Certs::generate();
    let b = TlsBroker::start(&certs, false).await;
    let tls_port = b.tls_port;

    let mut sub = v3::connect(b.tcp_port, &cid("tcp-sub")).await;
    sub.subscribe("tls/+/data", QoS::AtLeastOnce).await;

    let mut publisher = v3::connect_with(certs.tls_opts(&cid("tls-pub"), tls_port, true)).await;
    assert_eq!(publisher.connack.code, rumqttc::ConnectReturnCode::Success);
    publisher
        .publish("tls/dev1/data", QoS::AtLeastOnce, false, b"over tls")
        .await;
    publisher
        .publish("tls/dev1/data", QoS::AtMostOnce, false, b"qos0 over tls")
        .await;

    let p = sub.recv_publish().await;
    assert_eq!(p.topic, "tls/dev1/data");
    assert_eq!(&p.payload[..], b"over tls");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"qos0 over tls");

    // And the other direction: a TCP publisher reaches a TLS subscriber.
    publisher.subscribe("tcp/to/tls", QoS::AtLeastOnce).await;
    sub.publish("tcp/to/tls", QoS::AtLeastOnce, false, b"back")
        .await;
    let p = publisher.recv_publish().await;
    assert_eq!(&p.payload[..], b"back");

    publisher.disconnect().await;
    sub.disconnect().await;
    b.stop().await;
}

#[tokio::test]
async fn tls_required_client_cert_refuses_client_without_one() {
    let certs = Certs::generate();
    let b = TlsBroker::start(&certs, true).await;
    let tls_port = b.tls_port;

    // Without a client certificate the handshake (or the first read after it) fails.
    let started = std::time::Instant::now();
    let outcome = connect_outcome(certs.tls_opts(&cid("tls-nocert"), tls_port, false)).await;
    match outcome {
        // TLS 1.3: the client may finish its side of the handshake before the server's alert
        // arrives, so the refusal can surface as a TLS error or as an I/O error on the next read.
        Err(ConnectionError::Tls(_) | ConnectionError::Io(_)) => {}
        other => panic!(
            "a TLS client without a certificate must fail at the TLS level although \
             require_client_cert = true; got {other:?}"
        ),
    }
    assert!(
        started.elapsed() < WAIT,
        "refusal took {:?}",
        started.elapsed()
    );

    // The same listener still accepts a client that presents its certificate.
    connect_outcome(certs.tls_opts(&cid("tls-cert"), tls_port, true))
        .await
        .expect("a client with a valid certificate connects");

    // The broker keeps serving after the refused handshake.
    let mut c = v3::connect_with(certs.tls_opts(&cid("tls-after"), tls_port, true)).await;
    c.subscribe("after/refusal", QoS::AtLeastOnce).await;
    c.publish("after/refusal", QoS::AtLeastOnce, false, b"ok")
        .await;
    let p = c.recv_publish().await;
    assert_eq!(&p.payload[..], b"ok");
    c.disconnect().await;
    b.stop().await;
}
