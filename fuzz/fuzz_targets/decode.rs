//! `decode`: the packet decoder on arbitrary bytes.
//!
//! The first input byte picks the protocol state the decoder is in (before CONNECT, MQTT
//! 3.1.1, MQTT 5.0); the rest is fed to `decode_packet` repeatedly until it asks for more
//! bytes or returns an error, as the connection task does with its read buffer. Before
//! CONNECT, a decoded CONNECT switches the decoder to the version it announced, so one input
//! can cover a CONNECT followed by later packets. Besides "never panics", each step checks
//! the decoder's bookkeeping: a decoded packet consumes exactly the size it reports, an
//! incomplete packet consumes nothing, and a known size is larger than what is buffered.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tern::protocol::{decode_packet, DecodeOutcome, Packet, ProtocolVersion};

/// Small, so the oversize refusal is reached; still above a typical CONNECT.
const MAX_PACKET_SIZE: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let mut version = match selector % 3 {
        0 => None,
        1 => Some(ProtocolVersion::V3_1_1),
        _ => Some(ProtocolVersion::V5),
    };
    let mut buf = BytesMut::from(rest);
    // Each decoded packet consumes at least its 2-byte fixed header, so this terminates;
    // the bound only guards against a decoder that stops consuming.
    for _ in 0..=rest.len() {
        let before = buf.len();
        match decode_packet(&mut buf, version, MAX_PACKET_SIZE) {
            Ok(DecodeOutcome::Packet(packet, size)) => {
                assert!(size >= 2, "packet of {size} bytes");
                assert!(
                    size <= MAX_PACKET_SIZE,
                    "packet of {size} bytes over the limit"
                );
                assert_eq!(before - buf.len(), size, "consumed != reported size");
                if let Packet::Connect(c) = &packet {
                    assert!(version.is_none(), "CONNECT decoded after CONNECT");
                    version = Some(c.version);
                } else {
                    assert!(version.is_some(), "non-CONNECT decoded before CONNECT");
                }
                // Debug-format the packet: walks every field (strings, properties).
                let _ = format!("{packet:?}");
            }
            Ok(DecodeOutcome::Incomplete(need)) => {
                assert_eq!(buf.len(), before, "Incomplete consumed bytes");
                if let Some(total) = need {
                    assert!(
                        total > before,
                        "Incomplete({total}) with {before} bytes buffered"
                    );
                }
                return;
            }
            Err(e) => {
                let _ = e.to_string();
                return;
            }
        }
    }
    panic!("decoder made no progress");
});
