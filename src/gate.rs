//! `meshbench gate`: compares a run's report.json with a baseline, metric by metric, with
//! per-metric tolerances (defaults sized for noisy shared machines), prints a table and says
//! whether anything regressed (exit 1).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::report::Report;

/// Default tolerances in percent of the baseline (latency and propagation get more room:
/// they move most on a shared machine). Error rate is in percentage points.
pub fn default_tolerances() -> BTreeMap<String, f64> {
    [
        ("throughput", 20.0),
        ("latency_p50", 50.0),
        ("latency_p99", 100.0),
        ("error_rate", 0.5),
        ("propagation_ack_p99", 200.0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub metric: String,
    pub baseline: f64,
    pub current: f64,
    pub change: String,
    pub tolerance: String,
    pub regressed: bool,
}

/// Compares `current` with `baseline`. Phases are matched by name; propagation by change.
pub fn compare(
    baseline: &Report,
    current: &Report,
    tol: &BTreeMap<String, f64>,
) -> Result<Vec<Row>, String> {
    let t = |k: &str| {
        tol.get(k)
            .copied()
            .unwrap_or_else(|| default_tolerances()[k])
    };
    let mut rows = Vec::new();
    // higher_is_better: a drop beyond tol% regresses; else a rise beyond tol% regresses.
    let relative = |metric: String, b: f64, c: f64, key: &str, higher_is_better: bool| {
        let pct = if b == 0.0 { 0.0 } else { 100.0 * (c - b) / b };
        let regressed = if higher_is_better {
            pct < -t(key)
        } else {
            b > 0.0 && pct > t(key)
        };
        Row {
            metric,
            baseline: b,
            current: c,
            change: format!("{pct:+.1}%"),
            tolerance: format!("{}{}%", if higher_is_better { "-" } else { "+" }, t(key)),
            regressed,
        }
    };
    for bp in &baseline.phases {
        let Some(cp) = current.phases.iter().find(|p| p.name == bp.name) else {
            return Err(format!(
                "phase {:?} of the baseline is missing from the current report",
                bp.name
            ));
        };
        let (b, c) = (&bp.load.result, &cp.load.result);
        // Open-loop phases run at a fixed rate: their throughput says nothing.
        if b.target_rps.is_none() {
            rows.push(relative(
                format!("{} throughput (rps)", bp.name),
                b.achieved_rps,
                c.achieved_rps,
                "throughput",
                true,
            ));
        }
        rows.push(relative(
            format!("{} latency p50 (ms)", bp.name),
            b.latency_ms.p50,
            c.latency_ms.p50,
            "latency_p50",
            false,
        ));
        rows.push(relative(
            format!("{} latency p99 (ms)", bp.name),
            b.latency_ms.p99,
            c.latency_ms.p99,
            "latency_p99",
            false,
        ));
        let rate = |l: &crate::load::LoadResult| {
            if l.requests == 0 {
                0.0
            } else {
                100.0 * l.errors as f64 / l.requests as f64
            }
        };
        let (be, ce) = (rate(b), rate(c));
        rows.push(Row {
            metric: format!("{} error rate (%)", bp.name),
            baseline: be,
            current: ce,
            change: format!("{:+.2} pts", ce - be),
            tolerance: format!("+{} pts", t("error_rate")),
            regressed: ce - be > t("error_rate"),
        });
    }
    for bp in &baseline.propagation {
        let Some(cp) = current.propagation.iter().find(|p| p.change == bp.change) else {
            continue;
        };
        if let (Some(b), Some(c)) = (&bp.ack_ms, &cp.ack_ms) {
            rows.push(relative(
                format!("propagation {} ACK p99 (ms)", bp.change),
                b.p99,
                c.p99,
                "propagation_ack_p99",
                false,
            ));
        }
    }
    Ok(rows)
}

pub fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<48} {:>12} {:>12} {:>10} {:>10}  result\n",
        "metric", "baseline", "current", "change", "allowed"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<48} {:>12.3} {:>12.3} {:>10} {:>10}  {}\n",
            r.metric,
            r.baseline,
            r.current,
            r.change,
            r.tolerance,
            if r.regressed { "REGRESSED" } else { "ok" }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{LoadResult, Percentiles};
    use crate::report::{Phase, PhaseLoad};

    fn report(rps: f64, p99: f64, errors: u64) -> Report {
        let latency_ms = Percentiles {
            p50: 1.0,
            p99,
            ..Default::default()
        };
        let result = LoadResult {
            achieved_rps: rps,
            requests: 1000,
            errors,
            latency_ms,
            ..Default::default()
        };
        Report {
            phases: vec![Phase {
                name: "traffic".into(),
                load: PhaseLoad {
                    target: String::new(),
                    result,
                },
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn regressions_beyond_tolerance_fail() {
        let base = report(1000.0, 10.0, 0);
        let tol = default_tolerances();
        assert!(compare(&base, &report(900.0, 15.0, 0), &tol)
            .unwrap()
            .iter()
            .all(|r| !r.regressed));
        let rows = compare(&base, &report(700.0, 25.0, 10), &tol).unwrap();
        let bad: Vec<&str> = rows
            .iter()
            .filter(|r| r.regressed)
            .map(|r| r.metric.as_str())
            .collect();
        assert_eq!(
            bad,
            vec![
                "traffic throughput (rps)",
                "traffic latency p99 (ms)",
                "traffic error rate (%)"
            ]
        );
        let mut loose = tol.clone();
        loose.insert("throughput".into(), 40.0);
        assert!(!compare(&base, &report(700.0, 10.0, 0), &loose).unwrap()[0].regressed);
        assert!(compare(&base, &Report::default(), &tol).is_err());
    }
}
