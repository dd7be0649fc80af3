//! What one replay measured, per policy: the [`Recorder`] the simulator feeds (leases warm or
//! cold and their waits, idle and total agents over time), the finished [`PolicyResult`], and
//! the whole [`Report`] as text or JSON.
//!
//! Pure: formatting only; nothing here runs the engine.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::sim::SimConfig;

/// Lease wait percentiles, in seconds (granted leases; warm ones waited 0).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Waits {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Longest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// The figures of one policy over the measured period.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyResult {
    /// The policy's name.
    pub name: String,
    /// Lease requests that arrived in the measured period.
    pub leases: u64,
    /// Granted at once (an idle agent was ready at request time).
    pub warm: u64,
    /// Granted after waiting.
    pub cold: u64,
    /// Never granted (the wait ran out, or no pool matches the selector).
    pub failed: u64,
    /// warm / leases.
    pub warm_hit_ratio: f64,
    /// Lease waits.
    pub wait_seconds: Waits,
    /// Agent-hours spent idle (the cost of the bet).
    pub idle_agent_hours: f64,
    /// Agent-hours of every agent in any state.
    pub agent_hours: f64,
    /// Idle agent-hours inside the daily `--quiet` window, when one is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quiet_idle_agent_hours: Option<f64>,
    /// Idle agent-hours by hour of the day (UTC, of the trace's wall time), 0 to 23.
    pub idle_agent_hours_by_hour: Vec<f64>,
    /// Most agents at once, any state.
    pub peak_agents: u32,
    /// Agents provisioned.
    pub provisions: u64,
    /// Start of the measured period, seconds from the trace's start.
    pub measured_from_seconds: f64,
    /// End of the replay, seconds from the trace's start.
    pub measured_to_seconds: f64,
    /// Wall time the replay took.
    pub wall_seconds: f64,
    /// Every granted lease's wait in seconds (for the plot).
    #[serde(skip)]
    pub waits: Vec<f64>,
    /// (hours from the trace's start, idle agents, all agents), sampled.
    #[serde(skip)]
    pub timeline: Vec<(f64, u32, u32)>,
    /// Leases the engine itself reported warm (`Observation::Leased`), warm-up included: the
    /// same as `warm` without a warm-up (tests).
    #[serde(skip)]
    pub engine_warm: u64,
}

/// What the simulator reports while it runs.
pub struct Recorder {
    warmup: Duration,
    quiet: Option<(u32, u32)>,
    start_of_day: u64,
    step: Duration,
    next_sample: Duration,
    waits: Vec<f64>,
    warm: u64,
    cold: u64,
    failed: u64,
    idle_s: f64,
    agent_s: f64,
    quiet_s: f64,
    by_hour: [f64; 24],
    peak: u32,
    /// Provisions in the measured period (counted by the simulator).
    pub provisions: u64,
    /// Leases the engine reported warm.
    pub engine_warm: u64,
    timeline: Vec<(f64, u32, u32)>,
}

/// Seconds since the Unix epoch of a wall time (0 before it).
fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Recorder {
    /// A recorder for a trace ending at `end`.
    pub fn new(cfg: &SimConfig, end: Duration) -> Recorder {
        Recorder {
            warmup: cfg.warmup,
            quiet: cfg.quiet,
            start_of_day: unix(cfg.start) % 86_400,
            step: (end / 1500).max(Duration::from_secs(1)),
            next_sample: Duration::ZERO,
            waits: Vec::new(),
            warm: 0,
            cold: 0,
            failed: 0,
            idle_s: 0.0,
            agent_s: 0.0,
            quiet_s: 0.0,
            by_hour: [0.0; 24],
            peak: 0,
            provisions: 0,
            engine_warm: 0,
            timeline: Vec::new(),
        }
    }

    /// One measured lease: warm or not, and its wait (None: never granted).
    pub fn lease(&mut self, warm: bool, wait: Option<Duration>) {
        match wait {
            Some(w) => {
                if warm {
                    self.warm += 1;
                } else {
                    self.cold += 1;
                }
                self.waits.push(w.as_secs_f64());
            }
            None => self.failed += 1,
        }
    }

    fn in_quiet(&self, second_of_day: u32) -> bool {
        match self.quiet {
            Some((a, b)) if a <= b => (a..b).contains(&second_of_day),
            Some((a, b)) => second_of_day >= a || second_of_day < b,
            None => false,
        }
    }

    /// From `from` to `to` there were `idle` idle agents out of `total`.
    pub fn interval(&mut self, from: Duration, to: Duration, idle: u32, total: u32) {
        while self.next_sample < to {
            self.timeline
                .push((self.next_sample.as_secs_f64() / 3600.0, idle, total));
            self.next_sample += self.step;
        }
        let from = from.max(self.warmup);
        if to <= from {
            return;
        }
        self.peak = self.peak.max(total);
        self.agent_s += (to - from).as_secs_f64() * f64::from(total);
        if idle == 0 {
            return;
        }
        // In pieces of at most a minute, each put in the hour of day it starts in.
        let mut t = from;
        while t < to {
            let piece = (to - t).min(Duration::from_secs(60));
            let s = piece.as_secs_f64() * f64::from(idle);
            let sod = ((self.start_of_day + t.as_secs()) % 86_400) as u32;
            self.idle_s += s;
            self.by_hour[(sod / 3600) as usize] += s;
            if self.in_quiet(sod) {
                self.quiet_s += s;
            }
            t += piece;
        }
    }

    /// The result, at the end of the replay.
    pub fn finish(mut self, name: &str, end: Duration, wall: Duration) -> PolicyResult {
        self.waits.sort_by(f64::total_cmp);
        let leases = self.warm + self.cold + self.failed;
        PolicyResult {
            name: name.to_string(),
            leases,
            warm: self.warm,
            cold: self.cold,
            failed: self.failed,
            warm_hit_ratio: if leases == 0 {
                0.0
            } else {
                self.warm as f64 / leases as f64
            },
            wait_seconds: waits(&self.waits),
            idle_agent_hours: self.idle_s / 3600.0,
            agent_hours: self.agent_s / 3600.0,
            quiet_idle_agent_hours: self.quiet.map(|_| self.quiet_s / 3600.0),
            idle_agent_hours_by_hour: self.by_hour.iter().map(|s| s / 3600.0).collect(),
            peak_agents: self.peak,
            provisions: self.provisions,
            measured_from_seconds: self.warmup.as_secs_f64(),
            measured_to_seconds: end.as_secs_f64(),
            wall_seconds: wall.as_secs_f64(),
            waits: self.waits,
            timeline: self.timeline,
            engine_warm: self.engine_warm,
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn waits(sorted: &[f64]) -> Waits {
    Waits {
        p50: percentile(sorted, 0.50),
        p90: percentile(sorted, 0.90),
        p99: percentile(sorted, 0.99),
        max: sorted.last().copied().unwrap_or(0.0),
        mean: if sorted.is_empty() {
            0.0
        } else {
            sorted.iter().sum::<f64>() / sorted.len() as f64
        },
    }
}

/// One row of a `--search-min-idle` table.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SearchRow {
    /// The fixed minIdle tried.
    pub min_idle: u32,
    /// Its warm-hit ratio.
    pub warm_hit_ratio: f64,
    /// Its idle agent-hours.
    pub idle_agent_hours: f64,
    /// Its lease wait p99, seconds.
    pub wait_p99_seconds: f64,
}

/// The result of `--search-min-idle`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Search {
    /// The warm-hit ratio looked for.
    pub target: f64,
    /// The smallest fixed minIdle reaching it (None: none up to the largest tried).
    pub smallest: Option<u32>,
    /// Every minIdle tried, ascending.
    pub rows: Vec<SearchRow>,
}

/// The settings a report was made with.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Setup {
    /// The trace's name (its file).
    pub trace: String,
    /// Its lease requests.
    pub trace_leases: usize,
    /// Wall time of its start (RFC 3339).
    pub start: String,
    /// Its length in seconds (the last job's end).
    pub trace_seconds: f64,
    /// Excluded from the figures, seconds.
    pub warmup_seconds: f64,
    /// Provision latency range, seconds.
    pub provision_seconds: (f64, f64),
    /// Simulated cleanup after a release, seconds.
    pub cleanup_seconds: f64,
    /// Simulated termination, seconds.
    pub terminate_seconds: f64,
    /// Virtual time between engine ticks, seconds.
    pub tick_seconds: f64,
    /// Seed of the provision latencies.
    pub seed: u64,
}

/// A whole `warmpool simulate` report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// How it was made.
    pub setup: Setup,
    /// One result per policy, in the order given.
    pub policies: Vec<PolicyResult>,
    /// `--search-min-idle`'s table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<Search>,
    /// Wall time of the whole run, seconds.
    pub wall_seconds: f64,
}

fn secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2}s")
    } else {
        format!("{s:.0}s")
    }
}

impl Report {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let s = &self.setup;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "trace {}: {} leases over {:.2} days from {}; provisioning {}..{}, cleanup {}, terminate {}, tick {}, seed {}",
            s.trace,
            s.trace_leases,
            s.trace_seconds / 86_400.0,
            s.start,
            secs(s.provision_seconds.0),
            secs(s.provision_seconds.1),
            secs(s.cleanup_seconds),
            secs(s.terminate_seconds),
            secs(s.tick_seconds),
            s.seed
        );
        if s.warmup_seconds > 0.0 {
            let _ = writeln!(
                out,
                "measured: after a warm-up of {:.2} days (leases arriving in it and idle time in it are not counted)",
                s.warmup_seconds / 86_400.0
            );
        } else {
            let _ = writeln!(out, "measured: the whole trace (no warm-up)");
        }
        let quiet = self
            .policies
            .iter()
            .any(|p| p.quiet_idle_agent_hours.is_some());
        let _ = write!(
            out,
            "\n{:<16} {:>7} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}",
            "policy", "leases", "warm-hit", "wait p50", "p90", "p99", "idle ag-h", "agent-h"
        );
        if quiet {
            let _ = write!(out, " {:>10}", "quiet ag-h");
        }
        let _ = writeln!(out, " {:>6} {:>10} {:>7}", "peak", "provisions", "wall");
        for p in &self.policies {
            let _ = write!(
                out,
                "{:<16} {:>7} {:>8.4} {:>8} {:>8} {:>8} {:>10.1} {:>10.1}",
                p.name,
                p.leases,
                p.warm_hit_ratio,
                secs(p.wait_seconds.p50),
                secs(p.wait_seconds.p90),
                secs(p.wait_seconds.p99),
                p.idle_agent_hours,
                p.agent_hours,
            );
            if quiet {
                let _ = write!(out, " {:>10.1}", p.quiet_idle_agent_hours.unwrap_or(0.0));
            }
            let _ = writeln!(
                out,
                " {:>6} {:>10} {:>6.2}s",
                p.peak_agents, p.provisions, p.wall_seconds
            );
            if p.failed > 0 {
                let _ = writeln!(out, "  ({} leases never granted)", p.failed);
            }
        }
        if let Some(search) = &self.search {
            let _ = writeln!(
                out,
                "\nsmallest fixed minIdle reaching warm-hit {}: {}",
                search.target,
                search
                    .smallest
                    .map_or_else(|| "none tried".to_string(), |m| m.to_string())
            );
            let _ = writeln!(
                out,
                "{:>8} {:>8} {:>10} {:>8}",
                "minIdle", "warm-hit", "idle ag-h", "wait p99"
            );
            for r in &search.rows {
                let _ = writeln!(
                    out,
                    "{:>8} {:>8.4} {:>10.1} {:>8}",
                    r.min_idle,
                    r.warm_hit_ratio,
                    r.idle_agent_hours,
                    secs(r.wait_p99_seconds)
                );
            }
        }
        let _ = writeln!(out, "\nwall time: {:.2}s", self.wall_seconds);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[0.0, 5.0], 0.5), 0.0);
        assert_eq!(percentile(&[0.0, 5.0], 0.9), 5.0);
        assert_eq!(percentile(&[], 0.9), 0.0);
    }
}
