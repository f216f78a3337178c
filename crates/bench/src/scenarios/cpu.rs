//! CPU time and peak memory of this process and the machine, from `/proc` (Linux).

use super::proc_kib;

/// CPU time of this process and of the whole machine, from /proc (Linux), in clock ticks of
/// 10 ms (USER_HZ is 100 on every mainstream Linux build).
#[derive(Clone, Copy, Debug)]
pub(super) struct Cpu {
    process: u64,
    postgres: u64,
    nats: u64,
    busy: u64,
    total: u64,
}

impl Cpu {
    const TICK_MS: f64 = 10.0;

    pub(super) fn now() -> Option<Cpu> {
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may contain spaces) start at field 3 (state);
        // utime and stime are fields 14 and 15.
        let rest: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
        let process = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
        let sys = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = sys
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let total: u64 = cpu.iter().take(8).sum();
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        let (postgres, nats) = Self::servers();
        Some(Cpu {
            process,
            postgres,
            nats,
            busy: total.saturating_sub(idle),
            total,
        })
    }

    /// Ticks of every `postgres` and `nats-server` process (a backend that exits between two
    /// samples takes its share with it; pooled connections live through a window).
    pub(super) fn servers() -> (u64, u64) {
        let (mut pg, mut nats) = (0, 0);
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return (0, 0);
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some((head, rest))) = (stat.find('('), stat.rsplit_once(')')) else {
                continue;
            };
            let comm = head.get(open + 1..).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            match comm {
                "postgres" => pg += ticks,
                "nats-server" => nats += ticks,
                _ => {}
            }
        }
        (pg, nats)
    }

    pub(super) fn minus(&self, earlier: &Cpu) -> Cpu {
        Cpu {
            process: self.process.saturating_sub(earlier.process),
            postgres: self.postgres.saturating_sub(earlier.postgres),
            nats: self.nats.saturating_sub(earlier.nats),
            busy: self.busy.saturating_sub(earlier.busy),
            total: self.total.saturating_sub(earlier.total),
        }
    }

    pub(super) fn plus(&self, other: &Cpu) -> Cpu {
        Cpu {
            process: self.process + other.process,
            postgres: self.postgres + other.postgres,
            nats: self.nats + other.nats,
            busy: self.busy + other.busy,
            total: self.total + other.total,
        }
    }

    /// CPU milliseconds per `per` operations of a window's difference, split by process.
    pub(super) fn describe(&self, ops: u64, per: u64) -> String {
        let scale = Self::TICK_MS * per as f64 / ops.max(1) as f64;
        let rest = self
            .busy
            .saturating_sub(self.process + self.postgres + self.nats);
        format!(
            "{:.2} ms rookery process + {:.2} ms postgres + {:.2} ms nats-server + {:.2} ms other (machine {:.0}% busy)",
            self.process as f64 * scale,
            self.postgres as f64 * scale,
            self.nats as f64 * scale,
            rest as f64 * scale,
            100.0 * self.busy as f64 / (self.total as f64).max(1.0)
        )
    }

    pub(super) fn per_op(a: &Cpu, b: &Cpu, ops: u64) -> String {
        b.minus(a).describe(ops, 1)
    }

    /// Over the two windows `a..b` and `c..d`.
    pub(super) fn per_op_pair(a: &Cpu, b: &Cpu, c: &Cpu, d: &Cpu, ops: u64) -> String {
        b.minus(a).plus(&d.minus(c)).describe(ops, 1)
    }
}

/// Resets the kernel's peak-RSS mark of this process (Linux ≥ 4.0), so VmHWM covers only what
/// follows.
pub(super) fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

pub(super) fn peak_rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| proc_kib(&s, "VmHWM:"))
}
