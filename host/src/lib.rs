//! q3vl-host: facts about the running process, read from `/proc` where it exists
//! (peak resident memory, CPU time), for the conversion summary and the benchmarks.
//! Each fact is `None` where the host does not report it. Which CPU this is: [`cpu`].

pub mod cpu;

/// The process's peak resident set (VmHWM), in bytes, where /proc reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time (user + system) this process has used so far, in seconds, where /proc
/// is available (10 ms resolution). On a shared machine, CPU time per phase is a
/// steadier figure than wall time.
pub fn process_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14, 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU time of every thread of this process, in seconds, with nanosecond
/// resolution (`/proc/self/task/*/schedstat`); None where unavailable.
pub fn threads_cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        // A thread may end between the listing and the read: skip it.
        let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) else {
            continue;
        };
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 * 1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
            // CPU times are optional (schedstat may be compiled out).
            assert!(process_cpu_seconds().is_none_or(|c| c >= 0.0));
            assert!(threads_cpu_seconds().is_none_or(|c| c >= 0.0));
        }
    }
}
