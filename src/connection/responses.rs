//! The broker's answers to a client's packets (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK):
//! queued in the order their packets arrived, each behind the commit it promises, and encoded
//! in one place ([`Client::send_ack`]).
//!
//! Why a queue: an acknowledgement promises that what it acknowledges is kept (the message is
//! stored for every persistent subscriber, the subscription is stored), so it waits for that
//! commit; and acknowledgements leave strictly in arrival order, so one waiting commit holds
//! back the ones behind it. With the in-memory store nothing waits and [`Client::queue_ack`]
//! writes the acknowledgement at once. The Receive Maximum accounting of QoS 1/2 PUBLISHes
//! whose acknowledgement has not gone out yet lives here too, since it counts this queue.

use super::client::Client;
use super::close::Close;
use crate::outbox::Delivery;
use crate::protocol::*;
use crate::storage::Commit;
use bytes::BytesMut;
use std::collections::VecDeque;

/// An acknowledgement waiting for the commit that covers it. Acks leave strictly in the order
/// their packets arrived, so one waiting commit holds back the ones behind it.
pub(super) struct PendingAck {
    pub(super) commit: Commit,
    pub(super) ack: Response,
    /// Retained messages for this client's own new subscription, queued right after its
    /// SUBACK. They are this connection's: if it vanishes first, the client never saw the
    /// SUBACK and subscribes again. (Deliveries to *other* sessions never wait here; the store
    /// applies them with the commit, see `Broker::submit_staged`.)
    pub(super) retained: Vec<Delivery>,
}

#[derive(Debug, Clone)]
pub(super) enum Response {
    PubAck(u16, ReasonCode),
    PubRec(u16, ReasonCode),
    PubComp(u16, ReasonCode),
    SubAck(u16, Vec<ReasonCode>),
    UnsubAck(u16, Vec<ReasonCode>),
}

#[derive(Default)]
pub(super) struct AckQueue {
    pub(super) queue: VecDeque<PendingAck>,
    /// QoS 1 PUBLISHes whose PUBACK (and refused QoS 2 ones whose PUBREC) is still in `queue`
    /// (Receive Maximum accounting; accepted QoS 2 counts through `inbound_qos2`).
    pub(super) unacked_publishes: usize,
}

impl AckQueue {
    pub(super) fn waiting(&self) -> bool {
        matches!(
            self.queue.front(),
            Some(PendingAck {
                commit: Commit::Pending(_),
                ..
            })
        )
    }

    /// Resolves when the front commit completes (or fails), recording which.
    pub(super) async fn ready(&mut self) {
        if let Some(front) = self.queue.front_mut() {
            if let Commit::Pending(rx) = &mut front.commit {
                front.commit = match rx.await {
                    Ok(()) => Commit::Done,
                    Err(_) => Commit::Failed,
                };
            }
        }
    }
}

/// Whether a failed commit behind `ack` is answered with a failure reason code instead of
/// closing the connection (asked only in a cluster, of an MQTT 5 client): a PUBACK or PUBREC.
/// The cluster's store can be out of reach for a while (no JetStream quorum) with nothing
/// wrong with this connection; the client learns its message was not accepted and may send
/// it again. 3.1.1 has no way to say so: its connection closes without the acknowledgement,
/// and the client re-sends after reconnecting.
fn refusable_ack(ack: &Response) -> bool {
    matches!(ack, Response::PubAck(..) | Response::PubRec(..))
}

/// Whether a queued acknowledgement stands for a PUBLISH the Receive Maximum counts while it
/// waits. An accepted QoS 2 PUBLISH is counted once, by its packet id in `inbound_qos2` (from
/// PUBLISH to PUBREL), not a second time while its PUBREC waits for a commit.
fn counts_against_receive_maximum(ack: &Response) -> bool {
    match ack {
        Response::PubAck(..) => true,
        Response::PubRec(_, reason) => reason.is_failure(),
        _ => false,
    }
}

impl Client {
    /// Sends `ack` now when nothing is ahead of it and its commit is done (the common case
    /// with the in-memory store), else queues it behind the others.
    pub(super) fn queue_ack(
        &mut self,
        commit: Commit,
        ack: Response,
        retained: Vec<Delivery>,
        wbuf: &mut BytesMut,
    ) {
        if counts_against_receive_maximum(&ack) {
            self.acks.unacked_publishes += 1;
        }
        if self.acks.queue.is_empty() && matches!(commit, Commit::Done) {
            self.send_ack(&ack, wbuf);
            self.queue_retained(retained);
        } else {
            self.acks.queue.push_back(PendingAck {
                commit,
                ack,
                retained,
            });
        }
    }

    /// Retained messages for a subscription this client just made, after its SUBACK.
    fn queue_retained(&self, retained: Vec<Delivery>) {
        for d in retained {
            self.broker.push(&self.handle, d);
        }
    }

    /// Moves acknowledgements whose commits are done into the write buffer, in order.
    pub(super) fn release_acks(&mut self, wbuf: &mut BytesMut) -> Result<(), Close> {
        let refusable = self.version.is_v5() && self.broker.peers().is_some();
        while let Some(front) = self.acks.queue.front_mut() {
            let failed = match &mut front.commit {
                Commit::Done => false,
                Commit::Failed => true,
                Commit::Pending(rx) => match rx.try_recv() {
                    Ok(()) => false,
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return Ok(()),
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => true,
                },
            };
            if failed && !(refusable && refusable_ack(&front.ack)) {
                // The store failed: never acknowledge what it did not keep.
                return Err(Close::StorageFailed);
            }
            let Some(mut p) = self.acks.queue.pop_front() else {
                break;
            };
            if failed {
                p.ack = self.refused(p.ack);
            }
            self.send_ack(&p.ack, wbuf);
            self.queue_retained(p.retained);
        }
        Ok(())
    }

    /// `ack` turned into its refusal: 0x83 Implementation specific error, "the PUBLISH is
    /// valid but the receiver is not willing to accept it". A QoS 2 exchange ends with a
    /// PUBREC whose reason is 0x80 or above, so its packet id is forgotten.
    fn refused(&mut self, ack: Response) -> Response {
        let r = ReasonCode::ImplementationSpecificError;
        match ack {
            Response::PubAck(id, _) => Response::PubAck(id, r),
            Response::PubRec(id, _) => {
                self.state.inbound_qos2.remove(&id);
                // Counted by `queue_ack` as accepted (through `inbound_qos2`); a refused
                // PUBREC counts against Receive Maximum while queued, and `send_ack` takes
                // one off for it.
                self.acks.unacked_publishes += 1;
                Response::PubRec(id, r)
            }
            other => other,
        }
    }

    /// Encodes one acknowledgement: the one place a Response becomes bytes.
    fn send_ack(&mut self, ack: &Response, wbuf: &mut BytesMut) {
        let v = self.version;
        let k = match ack {
            Response::PubAck(..) => kind::PUBACK,
            Response::PubRec(..) => kind::PUBREC,
            Response::PubComp(..) => kind::PUBCOMP,
            Response::SubAck(..) => kind::SUBACK,
            Response::UnsubAck(..) => kind::UNSUBACK,
        };
        self.tally.packets_out[usize::from(k)] += 1;
        if counts_against_receive_maximum(ack) {
            // Counted in by `queue_ack`: no longer waiting.
            self.acks.unacked_publishes -= 1;
        }
        match ack {
            Response::PubAck(id, r) => encode_pub_response(wbuf, v, PUBACK, *id, r.as_u8()),
            Response::PubRec(id, r) => encode_pub_response(wbuf, v, PUBREC, *id, r.as_u8()),
            Response::PubComp(id, r) => encode_pub_response(wbuf, v, PUBCOMP, *id, r.as_u8()),
            Response::SubAck(id, codes) => {
                let raw: Vec<u8> = codes.iter().map(|c| c.as_u8()).collect();
                encode_suback(wbuf, v, *id, &raw)
            }
            Response::UnsubAck(id, codes) => {
                let raw: Vec<u8> = codes.iter().map(|c| c.as_u8()).collect();
                encode_unsuback(wbuf, v, *id, &raw)
            }
        }
    }
}
