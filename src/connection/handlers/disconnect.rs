//! DISCONNECT from the client: how the connection ends (with or without the will, v5 reason
//! 0x04) and the Session Expiry Interval it may still change. The handler only decides the
//! [`Close`]; the close sequence itself (`serve`, `will.rs`) is the same for every way out.

use crate::connection::client::Client;
use crate::connection::close::Close;
use crate::protocol::ProtocolError;
use crate::protocol::{Disconnect, ReasonCode};

impl Client {
    /// The close the client's DISCONNECT asks for, after the Session Expiry Interval it may
    /// change.
    pub(super) fn handle_disconnect(&mut self, d: Disconnect) -> Close {
        if let Some(expiry) = d.session_expiry_interval {
            if self.connect_expiry == 0 && expiry != 0 {
                // [MQTT-3.14.2-2]
                return Close::Protocol(ProtocolError::Protocol(
                    "session expiry set at DISCONNECT after 0 at CONNECT",
                ));
            }
            self.session_expiry = expiry.min(self.limits.max_session_expiry_secs());
        }
        if d.reason == ReasonCode::DisconnectWithWill.as_u8() {
            Close::NormalWithWill
        } else {
            Close::Normal
        }
    }
}
