//! PINGREQ → PINGRESP. Nothing else to do: every packet from the client already counts for
//! keep alive (the core notes the time of each read, `core.rs`), so a ping needs only its
//! answer, which promises nothing stored and so is written at once, not queued behind a
//! commit like the acknowledgements in `responses.rs`.

use crate::connection::client::Client;
use crate::protocol::{encode_pingresp, kind};
use bytes::BytesMut;

impl Client {
    /// Answers a PINGREQ.
    pub(super) fn handle_pingreq(&mut self, wbuf: &mut BytesMut) {
        encode_pingresp(wbuf);
        self.tally.packets_out[usize::from(kind::PINGRESP)] += 1;
    }
}
