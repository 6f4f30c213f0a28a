//! `connection`: the whole per-connection state machine (`tern::connection::serve`) fed with
//! fuzzer bytes, against a real in-process broker.
//!
//! One broker (memory storage, no metrics endpoint, anonymous clients) is started lazily on a
//! current-thread tokio runtime kept in a static. Per input, a `tokio::io::duplex` pair stands
//! in for the socket: `serve` gets one end, the input is written into the other, which is then
//! closed for writing, and everything the broker sends back is drained until it closes too.
//!
//! The first input byte picks a prefix so the fuzzer reaches post-CONNECT states without
//! having to invent a CONNECT first (selector % 4):
//!   0: no prefix (the input must start with its own CONNECT)
//!   1: MQTT 3.1.1 CONNECT, clean session, client id "fuzz311"
//!   2: MQTT 5.0 CONNECT, clean start, client id "fuzz5", Topic Alias Maximum 10
//!   3: MQTT 5.0 CONNECT, clean start, client id "fuzz5b", Receive Maximum 2
//!
//! A panic inside `serve` (in its spawned task) is turned into a panic here, so libFuzzer
//! records it as a crash. A `serve` that does not finish within the time limit after its
//! peer closed is told to shut down; if it still does not finish it is reported as a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tern::broker::Broker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::watch;

const CONFIG: &str = r#"
[listeners.tcp]
bind = "127.0.0.1:0"
[metrics]
[storage]
durability = "memory"
[auth]
allow_anonymous = true
[limits]
max_packet_size = 4096
max_queued_messages = 64
max_queued_bytes = 65536
max_retained_messages = 256
max_inbound_qos2 = 16
connect_timeout = 1
write_timeout = 1
[log]
level = "off"
"#;

/// How long `serve` may take to finish once its peer has closed.
const FINISH: Duration = Duration::from_millis(200);

struct Harness {
    rt: Runtime,
    // Kept alive: dropping it would not stop the broker, but it owns the listener tasks.
    _running: tern::Running,
    broker: Arc<Broker>,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let config = tern::Config::from_toml(CONFIG).expect("fuzz configuration is valid");
        let running = rt
            .block_on(tern::start(config))
            .expect("in-process broker starts");
        let broker = running.broker().clone();
        Harness {
            rt,
            _running: running,
            broker,
        }
    })
}

/// 3.1.1 CONNECT: clean session, keep alive 60, client id "fuzz311".
const CONNECT_V311: &[u8] = &[
    0x10, 0x13, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x07, b'f', b'u',
    b'z', b'z', b'3', b'1', b'1',
];
/// 5.0 CONNECT: clean start, keep alive 60, Topic Alias Maximum 10, client id "fuzz5".
const CONNECT_V5: &[u8] = &[
    0x10, 0x15, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x03, 0x22, 0x00, 0x0a,
    0x00, 0x05, b'f', b'u', b'z', b'z', b'5',
];
/// 5.0 CONNECT: clean start, keep alive 60, Receive Maximum 2, client id "fuzz5b".
const CONNECT_V5_B: &[u8] = &[
    0x10, 0x16, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x03, 0x21, 0x00, 0x02,
    0x00, 0x06, b'f', b'u', b'z', b'z', b'5', b'b',
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let prefix: &[u8] = match selector % 4 {
        0 => &[],
        1 => CONNECT_V311,
        2 => CONNECT_V5,
        _ => CONNECT_V5_B,
    };
    let h = harness();
    let broker = h.broker.clone();
    h.rt.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut task = tokio::spawn(tern::connection::serve(
            server,
            peer,
            broker,
            shutdown_rx,
            None,
        ));
        // Write and read concurrently: the broker's replies must be drained or its writes
        // (and so its reads) stall once the duplex buffer is full.
        let (mut rd, mut wr) = tokio::io::split(client);
        let write = async {
            let _ = wr.write_all(prefix).await;
            let _ = wr.write_all(rest).await;
            let _ = wr.shutdown().await;
        };
        let read = async {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
        };
        let io = async { tokio::join!(write, read) };
        let _ = tokio::time::timeout(FINISH, io).await;
        // Gone for good: any write the broker still attempts fails, as on a reset socket.
        drop(rd);
        drop(wr);
        let result = match tokio::time::timeout(FINISH, &mut task).await {
            Ok(r) => r,
            Err(_) => {
                // Still running after its peer closed: ask it to stop like a broker shutdown.
                let _ = shutdown_tx.send(true);
                match tokio::time::timeout(FINISH, &mut task).await {
                    Ok(r) => r,
                    Err(_) => {
                        task.abort();
                        panic!("serve did not finish after peer close and shutdown");
                    }
                }
            }
        };
        if let Err(e) = result {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    });
});
