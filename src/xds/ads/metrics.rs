//! The ADS server's counters and histograms, rendered in Prometheus' text format for pilot's
//! `GET /metrics`. Lock-free (atomics): every push and ACK records here.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::xds::{type_short, PUSH_ORDER};

/// Prometheus histogram with fixed bucket bounds in seconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Counters for `/metrics`, per type in [`PUSH_ORDER`] order.
#[derive(Debug)]
pub struct Metrics {
    pub pushes: [AtomicU64; 5],
    pub bytes_sent: [AtomicU64; 5],
    pub nacks: [AtomicU64; 5],
    pub stale_requests: AtomicU64,
    pub connected: AtomicU64,
    pub snapshots_built: AtomicU64,
    pub push_latency: Histogram,
    pub ack_latency: Histogram,
    pub snapshot_build: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            pushes: Default::default(),
            bytes_sent: Default::default(),
            nacks: Default::default(),
            stale_requests: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            snapshots_built: AtomicU64::new(0),
            push_latency: Histogram::new(LATENCY_BOUNDS),
            ack_latency: Histogram::new(LATENCY_BOUNDS),
            snapshot_build: Histogram::new(LATENCY_BOUNDS),
        }
    }
}

pub(super) fn type_index(type_url: &str) -> usize {
    PUSH_ORDER.iter().position(|t| *t == type_url).unwrap_or(0)
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for (name, help, vals) in [
            (
                "meshbench_pilot_xds_pushes_total",
                "xDS responses sent",
                &self.pushes,
            ),
            (
                "meshbench_pilot_xds_bytes_sent_total",
                "Encoded bytes of xDS responses sent",
                &self.bytes_sent,
            ),
            (
                "meshbench_pilot_xds_nacks_total",
                "NACKs received",
                &self.nacks,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (t, v) in PUSH_ORDER.iter().zip(vals) {
                let _ = writeln!(
                    out,
                    "{name}{{type=\"{}\"}} {}",
                    type_short(t),
                    v.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP meshbench_pilot_xds_stale_requests_total Requests ignored for a stale nonce\n# TYPE meshbench_pilot_xds_stale_requests_total counter\nmeshbench_pilot_xds_stale_requests_total {}",
            self.stale_requests.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshbench_pilot_xds_connected_proxies ADS streams open\n# TYPE meshbench_pilot_xds_connected_proxies gauge\nmeshbench_pilot_xds_connected_proxies {}",
            self.connected.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshbench_pilot_snapshots_built_total Snapshots built\n# TYPE meshbench_pilot_snapshots_built_total counter\nmeshbench_pilot_snapshots_built_total {}",
            self.snapshots_built.load(Ordering::Relaxed)
        );
        self.push_latency.render(
            "meshbench_pilot_push_latency_seconds",
            "Config change accepted -> response sent",
            &mut out,
        );
        self.ack_latency.render(
            "meshbench_pilot_ack_latency_seconds",
            "Config change accepted -> proxy ACKed every type",
            &mut out,
        );
        self.snapshot_build.render(
            "meshbench_pilot_snapshot_build_seconds",
            "Time to translate and encode a snapshot",
            &mut out,
        );
        out
    }
}
