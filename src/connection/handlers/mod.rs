//! The one dispatch from a decoded packet to its handler ([`Client::process_input`]), and the
//! handlers one file per packet family, in the way of Mosquitto's `handle_*.c` files:
//!
//! | file | packets |
//! |---|---|
//! | `publish.rs` | PUBLISH and PUBREL: the client as publisher, its QoS 1/2 flow |
//! | `acks.rs` | PUBACK, PUBREC, PUBCOMP: the client acknowledging the broker's deliveries |
//! | `subscribe.rs` | SUBSCRIBE, UNSUBSCRIBE (retained messages on subscribe, shared groups) |
//! | `ping.rs` | PINGREQ |
//! | `disconnect.rs` | DISCONNECT |
//!
//! CONNECT is not among them: it comes before there is a [`Client`] to dispatch to (it makes
//! one, `connect.rs`). AUTH and a second CONNECT are refused by the dispatch itself.
//!
//! Why one dispatch: what every packet goes through happens in one place, the same for all:
//! the decode (with this connection's version and `limits.max_packet_size`), the pause for
//! the publish budgets and back-pressure (`throttle.rs`), the tally of packets in, and the
//! handler's error becoming the [`Close`] that ends the connection. A handler writes only into
//! the write buffer, directly or through the acknowledgement queue (`responses.rs`), and calls
//! the broker; no socket I/O and no clock.

mod acks;
mod disconnect;
mod ping;
mod publish;
mod subscribe;

use super::client::Client;
use super::close::Close;
use crate::protocol::ProtocolError;
use crate::protocol::{decode_packet, DecodeOutcome, Packet};
use bytes::BytesMut;

impl Client {
    /// Decodes and handles every complete packet in `rbuf`.
    pub(in crate::connection) fn process_input(
        &mut self,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
    ) -> Result<(), Close> {
        let max = self.limits.max_packet_size as usize;
        loop {
            if self.waiting_answers() {
                // A packet waits for the authorisation service (`asking.rs`): the rest stays
                // in `rbuf`, in order, until it is handled.
                self.held_input = true;
                self.flush_tally();
                return Ok(());
            }
            if self.throttle_wait().is_some() {
                // Publish budget spent (or back-pressure): the rest stays in `rbuf` until the
                // pause ends; the connection loop comes back for it.
                self.held_input = true;
                self.flush_tally();
                return Ok(());
            }
            self.held_input = false;
            match decode_packet(rbuf, Some(self.version), max) {
                Ok(DecodeOutcome::Packet(packet, size)) => {
                    self.tally.bytes_received += size as u64;
                    if let Packet::Publish(_) = &packet {
                        self.charge_publish(size);
                    }
                    let Some(packet) = self.hold_for_answers(packet) else {
                        continue;
                    };
                    if let Err(close) = self.handle_packet(packet, wbuf) {
                        self.flush_tally();
                        return Err(close);
                    }
                }
                Ok(DecodeOutcome::Incomplete(need)) => {
                    if let Some(total) = need {
                        rbuf.reserve(total.saturating_sub(rbuf.len()));
                    }
                    self.flush_tally();
                    return Ok(());
                }
                Err(e) => {
                    self.flush_tally();
                    return Err(Close::Protocol(e));
                }
            }
        }
    }

    /// The dispatch: one arm per packet type, each calling its handler.
    pub(in crate::connection) fn handle_packet(
        &mut self,
        packet: Packet,
        wbuf: &mut BytesMut,
    ) -> Result<(), Close> {
        self.tally.packets_in[usize::from(packet.kind())] += 1;
        match packet {
            Packet::Publish(p) => self.handle_publish(p, wbuf).map_err(Close::Protocol),
            Packet::PubAck(a) => self.handle_puback(a),
            Packet::PubRec(a) => self.handle_pubrec(a, wbuf),
            Packet::PubRel(a) => {
                self.handle_pubrel(a, wbuf);
                Ok(())
            }
            Packet::PubComp(a) => self.handle_pubcomp(a),
            Packet::Subscribe(s) => self.handle_subscribe(s, wbuf),
            Packet::Unsubscribe(u) => {
                self.handle_unsubscribe(u, wbuf);
                Ok(())
            }
            Packet::PingReq => {
                self.handle_pingreq(wbuf);
                Ok(())
            }
            Packet::Disconnect(d) => Err(self.handle_disconnect(d)),
            // No enhanced authentication: a CONNECT with an Authentication Method is refused
            // (`connect.rs`), so there is no exchange an AUTH could belong to.
            Packet::Auth(_) => Err(Close::Protocol(ProtocolError::Protocol(
                "AUTH without an authentication method",
            ))),
            // The decoder already refuses it on an established connection (`decode.rs`).
            Packet::Connect(_) => Err(Close::Protocol(ProtocolError::Protocol("second CONNECT"))),
        }
    }
}
