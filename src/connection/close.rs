//! Why a connection ended ([`Close`]), and what each reason implies for the rest of the close:
//! the v5 DISCONNECT reason sent, whether the client's input is drained before the socket
//! closes, whether the will is published, and the phrase the log line gives.
//!
//! One enum for every way out (a handler's protocol error, the driver's timers, a takeover,
//! shutdown, a failed commit) so that the close sequence, in `serve` and in the simulation
//! alike, asks it rather than each path deciding for itself.

use crate::metrics::CloseReason;
use crate::protocol::ProtocolError;
use crate::protocol::ReasonCode;

/// Why a connection ended.
#[derive(Debug)]
pub(super) enum Close {
    /// DISCONNECT from the client: no will.
    Normal,
    /// v5 DISCONNECT 0x04: publish the will.
    NormalWithWill,
    /// The socket closed or failed without DISCONNECT.
    PeerGone(&'static str),
    Protocol(ProtocolError),
    KeepAlive,
    TakenOver,
    /// An operator kicked the client through the admin API.
    Administrative,
    WriteStalled,
    Shutdown,
    /// The store could not keep what this client's acknowledgements depend on.
    StorageFailed,
    /// The credentials it connected with expired (a JWT's `exp`): v5 0xA0 Maximum connect
    /// time, the nearest the protocol has to "your authentication ran out".
    CredentialsExpired,
}

impl Close {
    /// The v5 DISCONNECT reason to send before closing, if any.
    pub(super) fn reason(&self) -> Option<ReasonCode> {
        match self {
            Close::Protocol(e) => Some(e.reason_code()),
            Close::KeepAlive => Some(ReasonCode::KeepAliveTimeout),
            Close::TakenOver => Some(ReasonCode::SessionTakenOver),
            Close::Administrative => Some(ReasonCode::AdministrativeAction),
            Close::Shutdown => Some(ReasonCode::ServerShuttingDown),
            Close::StorageFailed => Some(ReasonCode::ImplementationSpecificError),
            Close::CredentialsExpired => Some(ReasonCode::MaximumConnectTime),
            _ => None,
        }
    }

    /// Whether the client may still be writing when we close, so that its input is drained
    /// before the socket is closed (see `drain.rs`). Not for a peer that is gone or
    /// stopped reading (nothing to protect; it would only hold the descriptor), nor after the
    /// client's own DISCONNECT (it has finished writing).
    pub(super) fn drains(&self) -> bool {
        !matches!(
            self,
            Close::Normal | Close::NormalWithWill | Close::PeerGone(_) | Close::WriteStalled
        )
    }

    /// One phrase for the disconnect log line.
    pub(super) fn describe(&self) -> String {
        match self {
            Close::Normal => "client disconnected".into(),
            Close::NormalWithWill => "client disconnected with will".into(),
            Close::PeerGone(why) => (*why).into(),
            Close::Protocol(e) => e.to_string(),
            Close::KeepAlive => "keep alive timeout".into(),
            Close::TakenOver => "session taken over".into(),
            Close::Administrative => "kicked by an operator (admin API)".into(),
            Close::WriteStalled => "client stopped reading".into(),
            Close::Shutdown => "server shutting down".into(),
            Close::StorageFailed => "storage failure".into(),
            Close::CredentialsExpired => "credentials expired (token exp)".into(),
        }
    }

    /// The reason `tern_connections_closed_total` counts it under: a fixed label set, so a
    /// protocol error's detail or a socket error's text stays in the log line.
    pub(super) fn metric(&self) -> CloseReason {
        match self {
            Close::Normal | Close::NormalWithWill => CloseReason::ClientDisconnect,
            Close::PeerGone(_) => CloseReason::ConnectionLost,
            Close::Protocol(_) => CloseReason::ProtocolError,
            Close::KeepAlive => CloseReason::KeepAliveTimeout,
            Close::TakenOver => CloseReason::TakenOver,
            Close::Administrative => CloseReason::AdminKick,
            Close::WriteStalled => CloseReason::WriteStalled,
            Close::Shutdown => CloseReason::ServerShutdown,
            Close::StorageFailed => CloseReason::StorageFailed,
            Close::CredentialsExpired => CloseReason::CredentialsExpired,
        }
    }

    /// Whether the Will Message is published ([MQTT-3.1.2-8]: not after a normal DISCONNECT).
    pub(super) fn publishes_will(&self) -> bool {
        !matches!(self, Close::Normal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_closes_drain() {
        assert!(Close::Protocol(ProtocolError::ReceiveMaximumExceeded).drains());
        assert!(Close::KeepAlive.drains());
        assert!(Close::TakenOver.drains());
        assert!(Close::Shutdown.drains());
        assert!(Close::StorageFailed.drains());
        assert!(!Close::Normal.drains(), "the client said it is done");
        assert!(!Close::NormalWithWill.drains());
        assert!(!Close::PeerGone("x").drains(), "nobody left to read for");
        assert!(
            !Close::WriteStalled.drains(),
            "a stuck peer would only hold the socket"
        );
    }
}
