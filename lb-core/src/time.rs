//! Time as the hot path counts it: `now` is monotonic nanoseconds passed in by the caller
//! (nothing in `lb-core` reads a clock), and durations are converted once, off the hot path.

use std::time::Duration;

/// A duration in nanoseconds, saturating at `u64::MAX` (about 584 years).
#[must_use]
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
