//! The broker's one source of monotonic time.
//!
//! Everything below the connection driver that needs "now" (message expiry, session expiry,
//! takeovers, delayed wills, the expiry sweep) reads it here, never `std::time::Instant::now()`
//! directly, and the connection core takes it as an argument from its driver. In production
//! this is the system's monotonic clock. Under a tokio runtime whose clock is paused (the
//! deterministic simulation in `tests/`, and unit tests), it is the simulated clock, so a
//! whole broker runs on simulated time: timers (`tokio::time`) and the instants compared
//! against them agree.
//!
//! Wall-clock time (`SystemTime`, for records that must mean something after a restart) is
//! not simulated.

use std::time::Instant;

/// Now, on the runtime's clock (simulated when the runtime's clock is paused).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
