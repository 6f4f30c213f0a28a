//! What a connected client's packets do: `handle_<packet>` for inbound, `send_<packet>` for
//! outbound. Everything here writes into the connection's write buffer and calls the broker;
//! no socket I/O happens in this file.

mod acks;
mod publish;
mod subscribe;

use super::client::Client;
use super::Close;
use crate::error::ProtocolError;
use crate::protocol::*;
use bytes::BytesMut;

impl Client {
    /// Decodes and handles every complete packet in `rbuf`.
    pub fn process_input(&mut self, rbuf: &mut BytesMut, wbuf: &mut BytesMut) -> Result<(), Close> {
        let max = self.limits.max_packet_size as usize;
        loop {
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

    fn handle_packet(&mut self, packet: Packet, wbuf: &mut BytesMut) -> Result<(), Close> {
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
                encode_pingresp(wbuf);
                self.tally.packets_out[usize::from(kind::PINGRESP)] += 1;
                Ok(())
            }
            Packet::Disconnect(d) => Err(self.handle_disconnect(d)),
            Packet::Auth(_) => Err(Close::Protocol(ProtocolError::Protocol(
                "AUTH without an authentication method",
            ))),
            Packet::Connect(_) => Err(Close::Protocol(ProtocolError::Protocol("second CONNECT"))),
        }
    }

    /// `limits.max_topic_length` and `limits.max_topic_levels` for a topic name or filter.
    pub(super) fn topic_within_limits(&self, topic: &str) -> bool {
        self.limits.topic_within(topic)
    }

    fn handle_disconnect(&mut self, d: Disconnect) -> Close {
        if let Some(expiry) = d.session_expiry_interval {
            if self.connect_expiry == 0 && expiry != 0 {
                // [MQTT-3.14.2-2]
                return Close::Protocol(ProtocolError::Protocol(
                    "session expiry set at DISCONNECT after 0 at CONNECT",
                ));
            }
            self.session_expiry = expiry.min(self.limits.max_session_expiry);
        }
        if d.reason == ReasonCode::DisconnectWithWill.as_u8() {
            Close::NormalWithWill
        } else {
            Close::Normal
        }
    }
}
