//! The client as subscriber: its acknowledgements of the broker's deliveries (PUBACK for
//! QoS 1; PUBREC, then PUBCOMP for QoS 2). Each settles an entry of the in-flight window: its
//! durable record, the credit it took in a shared group, and for PUBREC the PUBREL that
//! answers it.
//!
//! PUBREL, the client's release of its *own* QoS 2 publish, is in `publish.rs`; the
//! acknowledgements the broker sends are in `responses.rs`.

use crate::broker::trace::Ack;
use crate::connection::client::Client;
use crate::connection::close::Close;
use crate::protocol::ProtocolError;
use crate::protocol::*;
use crate::session::{Outbound, PubRecAction, WrongAck};
use bytes::BytesMut;

/// An acknowledgement of the wrong kind for its message (PUBCOMP for QoS 1, PUBACK for QoS 2,
/// ...) is a protocol error: v5 DISCONNECT 0x82, 3.x close.
fn wrong_ack(e: WrongAck) -> Close {
    Close::Protocol(ProtocolError::Protocol(e.0))
}

impl Client {
    /// The client acknowledges a QoS 1 delivery: it leaves the in-flight window.
    pub(super) fn handle_puback(&mut self, a: PubResponse) -> Result<(), Close> {
        // An id not in flight is a late or repeated PUBACK: nothing to do.
        if let Some(d) = self
            .state
            .inflight
            .on_puback(a.packet_id)
            .map_err(wrong_ack)?
        {
            if self.broker.tracer.active() {
                let client = &self.client_id;
                self.broker
                    .tracer
                    .acknowledged(client, &d, a.packet_id, Ack::PubAck, a.reason);
            }
            self.acknowledged(&d);
            self.qos1_finished(a.packet_id, &d);
        }
        Ok(())
    }

    /// The client received a QoS 2 delivery (or refused it): an accepted one is answered with
    /// PUBREL, held by the write gate while its released state is being stored.
    pub(super) fn handle_pubrec(
        &mut self,
        a: PubResponse,
        wbuf: &mut BytesMut,
    ) -> Result<(), Close> {
        // A shared subscription delivery: the group learns the outcome below.
        let group_delivery = match self.state.inflight.get(a.packet_id) {
            Some(Outbound::Published(d)) if d.group.is_some() => Some(d.clone()),
            _ => None,
        };
        if self.broker.tracer.active() {
            if let Some(Outbound::Published(d)) = self.state.inflight.get(a.packet_id) {
                let client = &self.client_id;
                self.broker
                    .tracer
                    .acknowledged(client, d, a.packet_id, Ack::PubRec, a.reason);
            }
        }
        // Checked before the group hears of it: a PUBREC for a QoS 1 message settles nothing.
        let action = self
            .state
            .inflight
            .on_pubrec(a.packet_id, a.reason)
            .map_err(wrong_ack)?;
        if let Some(d) = &group_delivery {
            // PUBREC (accepted or refused) settles where the message is: not back to the group.
            self.group_delivery_done(d, true, a.reason >= 0x80);
        }
        match action {
            PubRecAction::SendPubRel(reason) => {
                if reason == 0 && self.stage_released(a.packet_id) {
                    self.gate.hold_from(wbuf.len());
                }
                self.tally.packets_out[usize::from(kind::PUBREL)] += 1;
                encode_pub_response(wbuf, self.version, PUBREL, a.packet_id, reason)
            }
            PubRecAction::Finished => self.stage_inflight_done(a.packet_id),
        }
        Ok(())
    }

    /// The client completes a QoS 2 delivery: it leaves the in-flight window.
    pub(super) fn handle_pubcomp(&mut self, a: PubResponse) -> Result<(), Close> {
        // An id not in flight is a late or repeated PUBCOMP: nothing to do.
        if let Some(d) = self
            .state
            .inflight
            .on_pubcomp(a.packet_id)
            .map_err(wrong_ack)?
        {
            if self.broker.tracer.active() {
                let client = &self.client_id;
                self.broker
                    .tracer
                    .acknowledged(client, &d, a.packet_id, Ack::PubComp, a.reason);
            }
            self.acknowledged(&d);
            self.stage_inflight_done(a.packet_id);
            self.group_delivery_done(&d, false, true);
        }
        Ok(())
    }
}
