//! Wall-clock milliseconds since the Unix epoch: the unit of every timestamp in pilot's REST
//! answers, in report.json and in the simulated proxies' records, so they compare directly.

use std::time::{SystemTime, UNIX_EPOCH};

/// `t` as milliseconds since the epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Now, as milliseconds since the epoch.
pub fn now_ms() -> f64 {
    unix_ms(SystemTime::now())
}
