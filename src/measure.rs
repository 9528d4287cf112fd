//! Process cost as Linux reports it: CPU seconds (utime + stime) and peak RSS (VmHWM).

/// Clock ticks per second for /proc/PID/stat times (USER_HZ, 100 on Linux).
const CLK_TCK: f64 = 100.0;

#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ProcStats {
    pub cpu_s: f64,
    /// CPU seconds of the children this process has waited for (a finished wrk run, say).
    pub children_cpu_s: f64,
    pub peak_rss_mb: f64,
    pub rss_mb: f64,
}

/// Reads CPU and memory of `pid`; `None` when the process is gone or /proc is unavailable.
pub fn proc_stats(pid: u32) -> Option<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let cutime: f64 = f.get(13)?.parse().ok()?;
    let cstime: f64 = f.get(14)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some(ProcStats {
        cpu_s: (utime + stime) / CLK_TCK,
        children_cpu_s: (cutime + cstime) / CLK_TCK,
        peak_rss_mb: kb("VmHWM:") / 1024.0,
        rss_mb: kb("VmRSS:") / 1024.0,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_process() {
        let s = super::proc_stats(std::process::id()).expect("/proc is readable");
        assert!(s.peak_rss_mb > 0.0 && s.peak_rss_mb >= s.rss_mb);
        assert!(s.cpu_s >= 0.0);
    }
}

/// The machine a measurement ran on.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Machine {
    pub cores: usize,
    pub memory_mb: u64,
}

/// Cores and memory of this machine (from /proc/meminfo).
pub fn machine() -> Machine {
    let memory_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024);
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_mb,
    }
}
