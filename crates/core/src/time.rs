//! Monotonic time as the core sees it: a number the driver passes in.

use std::time::Duration;

/// A point on a monotonic clock, in nanoseconds from an origin the driver chooses. The core never
/// reads a clock; the daemon converts `std::time::Instant`, the simulation counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// The origin.
    pub const ZERO: Time = Time(0);

    /// This time plus a duration (saturating).
    pub fn plus(self, duration: Duration) -> Time {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        Time(self.0.saturating_add(nanos))
    }

    /// Time elapsed since `earlier` (zero if `earlier` is later).
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}
