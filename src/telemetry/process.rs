//! The standard `process_*` metrics (the names and help texts of Prometheus' own client
//! libraries), read from `/proc/self` at scrape time and appended to `GET /metrics`.
//!
//! The `metrics` crate has no float counters and no collect-at-scrape hook, so these are
//! rendered as text here rather than recorded. Ops use them for the capacity figures in the
//! README (resident memory per registered device, CPU per uplink) and for `LimitNOFILE`
//! (open vs max file descriptors). On a system without `/proc` each one is simply absent.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, which the kernel fixes at 100 for
/// user space on every architecture we build for (it is not the kernel's CONFIG_HZ).
const USER_HZ: f64 = 100.0;

static START_TIME: OnceLock<f64> = OnceLock::new();

/// Remembers the process start time (called once, when the recorder is installed: the
/// first thing `run` does).
pub fn started() {
    START_TIME.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    });
}

/// What `/proc/self` says about this process.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sample {
    pub cpu_seconds: Option<f64>,
    pub threads: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

impl Sample {
    pub fn read() -> Sample {
        let read = |f: &str| std::fs::read_to_string(format!("/proc/self/{f}")).ok();
        let stat = read("stat").map(|s| parse_stat(&s)).unwrap_or_default();
        Sample {
            cpu_seconds: stat.cpu_seconds,
            threads: stat.threads,
            virtual_bytes: stat.virtual_bytes,
            resident_bytes: read("status").and_then(|s| parse_vm_rss(&s)),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: read("limits").and_then(|s| parse_max_fds(&s)),
        }
    }
}

/// CPU time, threads and virtual size from `/proc/self/stat` (proc(5)). The command name
/// (field 2) may contain spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Sample {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Sample::default();
    };
    // rest[0] is field 3 (state): field n is rest[n - 3].
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let cpu_seconds = match (num(14), num(15)) {
        (Some(utime), Some(stime)) => Some((utime + stime) as f64 / USER_HZ),
        _ => None,
    };
    Sample {
        cpu_seconds,
        threads: num(20),
        virtual_bytes: num(23),
        ..Sample::default()
    }
}

/// `VmRSS:   123456 kB` from `/proc/self/status`, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The soft limit of `Max open files` from `/proc/self/limits`.
fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Appends the process metrics in the Prometheus text format.
pub fn render(out: &mut String) {
    let s = Sample::read();
    let mut metric = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            // Writing to a String cannot fail.
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n\n"
            );
        }
    };
    metric(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        s.cpu_seconds,
    );
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        s.resident_bytes.map(|v| v as f64),
    );
    metric(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        s.virtual_bytes.map(|v| v as f64),
    );
    metric(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        s.open_fds.map(|v| v as f64),
    );
    metric(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        s.max_fds.map(|v| v as f64),
    );
    metric(
        "process_threads",
        "gauge",
        "Number of OS threads in the process.",
        s.threads.map(|v| v as f64),
    );
    metric(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        START_TIME.get().copied(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis; utime 250, stime 50 ticks,
        // 7 threads, 123456789 bytes virtual.
        let stat = "4242 (nbiot gw) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 7 0 \
                    12345 123456789 2000 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Sample {
                cpu_seconds: Some(3.0),
                threads: Some(7),
                virtual_bytes: Some(123_456_789),
                ..Sample::default()
            }
        );
        assert_eq!(parse_stat("garbage"), Sample::default());
    }

    #[test]
    fn rss_and_fd_limit() {
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t   2048 kB\nThreads: 3\n"),
            Some(2048 * 1024)
        );
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            65536                524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(65536));
    }

    #[test]
    fn renders_this_process() {
        started();
        let mut out = String::new();
        render(&mut out);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                out.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{out}"
            );
        }
        let rss: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(rss > 1e6, "a test process uses more than 1 MB: {rss}");
    }
}
