//! Debounce in front of snapshot builds, as Istio's discovery server does it: after a change,
//! wait until no further change arrives for the quiet period, but never longer than the max
//! delay since the first pending change; then build once for everything merged.
//!
//! Time comes from `tokio::time`, so tests drive it with a paused clock.

/// Longest quiet period or maximum delay pilot accepts: a change must reach the proxies
/// within minutes (Istio's default maximum is 10 s), and longer waits overflow timers.
pub const MAX_DEBOUNCE: std::time::Duration = std::time::Duration::from_secs(600);

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant as TokioInstant};

/// One accepted config change.
#[derive(Clone, Copy, Debug)]
pub struct Change {
    pub version: u64,
    pub at: Instant,
    pub at_wall: SystemTime,
}

impl Change {
    pub fn now(version: u64) -> Change {
        Change {
            version,
            at: Instant::now(),
            at_wall: SystemTime::now(),
        }
    }
}

/// What a debounce window produced: the earliest change (for latency), the newest version,
/// and how many changes were merged.
#[derive(Clone, Copy, Debug)]
pub struct Merged {
    pub first: Change,
    pub version: u64,
    pub merged: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct Debounce {
    pub quiet: Duration,
    pub max_delay: Duration,
}

impl Debounce {
    /// Runs until the sender side closes, calling `fire` once per window.
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Change>, mut fire: impl FnMut(Merged)) {
        while let Some(first) = rx.recv().await {
            let mut m = Merged {
                first,
                version: first.version,
                merged: 1,
            };
            let start = TokioInstant::now();
            let mut last = start;
            let mut closed = false;
            if self.quiet.is_zero() {
                while let Ok(c) = rx.try_recv() {
                    m.version = c.version;
                    m.merged += 1;
                }
            } else {
                loop {
                    let deadline = (last + self.quiet).min(start + self.max_delay);
                    tokio::select! {
                        c = rx.recv() => match c {
                            Some(c) => {
                                m.version = c.version;
                                m.merged += 1;
                                last = TokioInstant::now();
                            }
                            None => {
                                closed = true;
                                break;
                            }
                        },
                        _ = sleep_until(deadline) => break,
                    }
                }
            }
            fire(m);
            if closed {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn setup(
        quiet_ms: u64,
        max_ms: u64,
    ) -> (
        mpsc::UnboundedSender<Change>,
        Arc<Mutex<Vec<(u64, usize, TokioInstant)>>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let fired = Arc::new(Mutex::new(Vec::new()));
        let f = fired.clone();
        let d = Debounce {
            quiet: Duration::from_millis(quiet_ms),
            max_delay: Duration::from_millis(max_ms),
        };
        tokio::spawn(d.run(rx, move |m| {
            f.lock()
                .unwrap()
                .push((m.version, m.merged, TokioInstant::now()))
        }));
        (tx, fired)
    }

    #[tokio::test(start_paused = true)]
    async fn merges_a_burst_after_the_quiet_period() {
        let (tx, fired) = setup(100, 1000);
        let t0 = TokioInstant::now();
        for v in 1..=5 {
            tx.send(Change::now(v)).unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let f = fired.lock().unwrap().clone();
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].0, f[0].1), (5, 5));
        // last change at 120 ms + 100 ms quiet
        assert_eq!(f[0].2 - t0, Duration::from_millis(220));
    }

    #[tokio::test(start_paused = true)]
    async fn max_delay_bounds_a_steady_stream() {
        let (tx, fired) = setup(100, 300);
        let t0 = TokioInstant::now();
        // A change every 40 ms never leaves a 100 ms quiet period.
        for v in 1..=20 {
            tx.send(Change::now(v)).unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let f = fired.lock().unwrap().clone();
        assert!(f.len() >= 2, "{f:?}");
        assert_eq!(f[0].2 - t0, Duration::from_millis(300));
        // Changes sent at 0, 40, ... 280 ms (v1..v8) are in the first push.
        assert_eq!((f[0].0, f[0].1), (8, 8));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_quiet_fires_at_once() {
        let (tx, fired) = setup(0, 0);
        tx.send(Change::now(1)).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(fired.lock().unwrap().len(), 1);
    }
}
