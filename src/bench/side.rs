//! `warmpool bench --floor`: warmpool's lease API side by side with its floor (floor.rs, an
//! empty server with the same routes), driven by the same load generator in lease-only mode.
//!
//! The run alternates blocks of jobs between the two targets, the order flipping every round
//! (floor, warmpool, warmpool, floor, ... : ABBA with the default two rounds), so a drift in
//! the machine's speed touches both alike. Each block runs `concurrency` workers on one target
//! only; per block it reads the CPU used (cpu.rs): the floor's threads, the warmpool server's
//! threads (or process) and its agents, and the load generator's threads. The report gives per
//! target the percentiles of lease and release, cycles per second over its own blocks, CPU
//! per lease+release cycle, and the ratios warmpool/floor.

use std::fmt::Write;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::cpu::{self, ServerCpu, Snapshot};
use super::stats::{Ratio, Sample, Summary};
use super::{LoadOptions, Target};
use crate::client::Client;

/// Name of the floor target in reports.
pub const FLOOR: &str = "floor";

/// Figures of one target over its blocks.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SideFigures {
    /// `floor`, or the warmpool target's name.
    pub name: String,
    /// Lease+release cycles attempted.
    pub cycles: usize,
    /// Cycles that failed.
    pub errors: usize,
    /// Wall time of this target's blocks, seconds.
    pub seconds: f64,
    /// Cycles that succeeded per second of this target's blocks.
    pub throughput: f64,
    /// Lease request to its 201, ms.
    pub lease: Summary,
    /// Release request to its answer, ms.
    pub release: Summary,
    /// CPU per cycle.
    pub cpu: CpuPerCycle,
}

/// CPU time per lease+release cycle, microseconds, from /proc.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CpuPerCycle {
    /// The server's threads (the floor's, or warmpool's).
    pub server_us: f64,
    /// warmpool's agent processes (zero for the floor).
    pub agents_us: f64,
    /// Server + agents.
    pub total_us: f64,
    /// The load generator's threads while this target ran.
    pub load_generator_us: f64,
}

/// warmpool's figures over the floor's.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FloorRatios {
    /// Of the lease percentiles.
    pub lease: Ratio,
    /// Of the release percentiles.
    pub release: Ratio,
    /// Of the cycles per second (warmpool's over the floor's: 1 is as fast, 0.5 half).
    pub throughput: f64,
    /// Of the CPU per cycle, server + agents over the floor server's.
    pub cpu: f64,
}

/// The side-by-side part of a report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FloorComparison {
    /// Rounds (each one block per target).
    pub rounds: usize,
    /// The blocks in the order they ran.
    pub order: Vec<String>,
    /// The floor, then warmpool.
    pub targets: Vec<SideFigures>,
    /// warmpool over the floor.
    pub ratios: FloorRatios,
    /// How the CPU was read.
    pub cpu_source: String,
}

/// The order of the blocks: floor first in even rounds, warmpool first in odd ones.
pub fn block_order(rounds: usize) -> Vec<bool> {
    (0..rounds)
        .flat_map(|r| {
            if r % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            }
        })
        .collect()
}

/// `total` split into `parts` nearly equal sizes (the first ones larger).
pub fn split(total: usize, parts: usize) -> Vec<usize> {
    let parts = parts.max(1);
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

/// What [`run`] needs besides the load options (whose single target is warmpool's).
pub struct SideRun<'a> {
    /// Client of the warmpool server.
    pub warmpool: &'a Client,
    /// Client of the floor server.
    pub floor: &'a Client,
    /// Rounds of blocks.
    pub rounds: usize,
    /// Where warmpool's CPU is read.
    pub server_cpu: ServerCpu,
    /// Before each warmpool block, wait (unmeasured) until every pool has its `minIdle` idle
    /// agents again (`--embedded`).
    pub wait_warm: bool,
}

/// Runs the blocks; returns every sample and the comparison.
pub async fn run(
    side: &SideRun<'_>,
    opts: &LoadOptions,
    t_run: Instant,
) -> Result<(Vec<Sample>, FloorComparison), String> {
    let warm = opts
        .targets
        .first()
        .ok_or("--floor needs one warmpool target")?
        .clone();
    let floor = Target {
        name: FLOOR.into(),
        selector: "bench && floor".into(),
    };
    let order = block_order(side.rounds.max(1));
    // Jobs per target, then per block of that target.
    let per_target = split(opts.jobs, 2);
    let sizes = [
        split(per_target[0], side.rounds.max(1)),
        split(per_target[1], side.rounds.max(1)),
    ];
    let block_duration = opts.duration.map(|d| d / order.len() as u32);
    let mut samples = Vec::new();
    let mut seconds = [0.0f64; 2];
    let mut used = [Snapshot::default(); 2];
    let mut next = [0usize; 2];
    for &is_floor in &order {
        let k = usize::from(!is_floor);
        let jobs = sizes[k][next[k]];
        next[k] += 1;
        if !is_floor && side.wait_warm {
            super::wait_warm(side.warmpool, Duration::from_secs(120)).await?;
        }
        let block = LoadOptions {
            targets: vec![if is_floor {
                floor.clone()
            } else {
                warm.clone()
            }],
            jobs,
            duration: block_duration,
            ..opts.clone()
        };
        let client = if is_floor { side.floor } else { side.warmpool };
        let before = cpu::snapshot(side.server_cpu);
        let t = Instant::now();
        let (s, _) = super::run_load_from(client, &block, t_run).await;
        seconds[k] += t.elapsed().as_secs_f64();
        let after = cpu::snapshot(side.server_cpu);
        let d = after.since(&before);
        used[k] = Snapshot {
            server: used[k].server + d.server,
            floor: used[k].floor + d.floor,
            client: used[k].client + d.client,
            agents: used[k].agents + d.agents,
        };
        samples.extend(s);
    }
    samples.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let f = figures(&floor.name, &samples, seconds[0], &used[0], true);
    let w = figures(&warm.name, &samples, seconds[1], &used[1], false);
    let ratios = ratios(&w, &f);
    Ok((
        samples,
        FloorComparison {
            rounds: side.rounds.max(1),
            order: order
                .iter()
                .map(|&fl| {
                    if fl {
                        floor.name.clone()
                    } else {
                        warm.name.clone()
                    }
                })
                .collect(),
            targets: vec![f, w],
            ratios,
            cpu_source: match side.server_cpu {
                ServerCpu::InProcess => format!(
                    "/proc/self/task: threads {} (floor), {} (warmpool); agents: processes below this one",
                    cpu::FLOOR_THREADS,
                    cpu::SERVER_THREADS
                ),
                ServerCpu::Pid(p) => format!(
                    "/proc/self/task: threads {} (floor); warmpool: process {p} and the processes below it",
                    cpu::FLOOR_THREADS
                ),
                ServerCpu::Unknown => format!(
                    "/proc/self/task: threads {} (floor); warmpool's server is not on this machine: not read",
                    cpu::FLOOR_THREADS
                ),
            },
        },
    ))
}

/// Figures of `name` from the samples, its blocks' seconds and the CPU they used.
pub fn figures(
    name: &str,
    samples: &[Sample],
    seconds: f64,
    used: &Snapshot,
    is_floor: bool,
) -> SideFigures {
    let mine: Vec<&Sample> = samples.iter().filter(|s| s.target == name).collect();
    let ok: Vec<&&Sample> = mine.iter().filter(|s| s.error.is_none()).collect();
    let lease: Vec<f64> = ok.iter().filter_map(|s| s.lease_ms).collect();
    let release: Vec<f64> = ok.iter().filter_map(|s| s.release_ms).collect();
    let per = |d: Duration| {
        if ok.is_empty() {
            0.0
        } else {
            d.as_secs_f64() * 1e6 / ok.len() as f64
        }
    };
    let (server, agents) = if is_floor {
        (per(used.floor), 0.0)
    } else {
        (per(used.server), per(used.agents))
    };
    SideFigures {
        name: name.to_string(),
        cycles: mine.len(),
        errors: mine.len() - ok.len(),
        seconds,
        throughput: if seconds > 0.0 {
            ok.len() as f64 / seconds
        } else {
            0.0
        },
        lease: Summary::of(&lease),
        release: Summary::of(&release),
        cpu: CpuPerCycle {
            server_us: server,
            agents_us: agents,
            total_us: server + agents,
            load_generator_us: per(used.client),
        },
    }
}

/// `w` over `f`.
pub fn ratios(w: &SideFigures, f: &SideFigures) -> FloorRatios {
    let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    FloorRatios {
        lease: w.lease.ratio_to(&f.lease),
        release: w.release.ratio_to(&f.release),
        throughput: r(w.throughput, f.throughput),
        cpu: r(w.cpu.total_us, f.cpu.total_us),
    }
}

/// A ratio as `3.2x`, or `n/a` when it has no value (a zero floor figure: too few ticks).
fn times(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}x")
    } else {
        "n/a".into()
    }
}

/// The side-by-side tables.
pub fn render(c: &FloorComparison) -> String {
    use super::report::{cells, table};
    let mut out = format!(
        "floor: an empty axum server with the same routes, in this process; blocks ran {}\n",
        c.order.join(", ")
    );
    let mut rows = vec![
        ["TARGET", "FIGURE (ms)", "N", "P50", "P90", "P99", "MAX"]
            .map(String::from)
            .to_vec(),
    ];
    for t in &c.targets {
        for (fig, s) in [("lease (to 201)", &t.lease), ("release", &t.release)] {
            let mut row = vec![t.name.clone(), fig.to_string()];
            row.extend(cells(s));
            rows.push(row);
        }
    }
    out.push_str(&table(&rows));
    out.push('\n');
    let mut rows = vec![
        [
            "TARGET",
            "CYCLES",
            "ERRORS",
            "CYCLES/S",
            "CPU/CYCLE (us): SERVER",
            "AGENTS",
            "SERVER+AGENTS",
            "LOAD GENERATOR",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for t in &c.targets {
        rows.push(vec![
            t.name.clone(),
            t.cycles.to_string(),
            t.errors.to_string(),
            format!("{:.0}", t.throughput),
            format!("{:.0}", t.cpu.server_us),
            format!("{:.0}", t.cpu.agents_us),
            format!("{:.0}", t.cpu.total_us),
            format!("{:.0}", t.cpu.load_generator_us),
        ]);
    }
    out.push_str(&table(&rows));
    let q = &c.ratios;
    let _ = writeln!(
        out,
        "\n{}/floor ratio: lease p50 {} p99 {}; release p50 {} p99 {}; throughput {}; CPU per cycle (server + agents) {}",
        c.targets.get(1).map_or("warmpool", |t| t.name.as_str()),
        times(q.lease.p50, 1),
        times(q.lease.p99, 1),
        times(q.release.p50, 1),
        times(q.release.p99, 1),
        times(q.throughput, 2),
        times(q.cpu, 1)
    );
    let _ = writeln!(out, "CPU read from {}", c.cpu_source);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(target: &str, lease: f64, release: f64, err: bool) -> Sample {
        Sample {
            target: target.into(),
            agent: None,
            at_s: 0.0,
            lease_ms: Some(lease),
            ttfb_ms: None,
            exit_ms: None,
            release_ms: Some(release),
            exit_code: None,
            error: err.then(|| "boom".into()),
        }
    }

    #[test]
    fn blocks_alternate_and_split_evenly() {
        assert_eq!(block_order(1), [true, false]);
        assert_eq!(block_order(2), [true, false, false, true]);
        assert_eq!(block_order(3), [true, false, false, true, true, false]);
        assert_eq!(split(10, 3), [4, 3, 3]);
        assert_eq!(split(1, 2), [1, 0]);
        assert_eq!(split(5, 0), [5]);
    }

    #[test]
    fn figures_ratios_and_table() {
        let mut s = vec![
            sample("floor", 1.0, 0.5, false),
            sample("floor", 1.0, 0.5, false),
            sample("warmpool", 3.0, 2.0, false),
            sample("warmpool", 3.0, 2.0, false),
            sample("warmpool", 99.0, 99.0, true),
        ];
        s.push(sample("other", 7.0, 7.0, false));
        let used_floor = Snapshot {
            floor: Duration::from_micros(100),
            client: Duration::from_micros(50),
            ..Snapshot::default()
        };
        let used_warm = Snapshot {
            server: Duration::from_micros(400),
            agents: Duration::from_micros(200),
            floor: Duration::from_micros(999),
            client: Duration::from_micros(60),
        };
        let f = figures("floor", &s, 0.5, &used_floor, true);
        let w = figures("warmpool", &s, 1.0, &used_warm, false);
        assert_eq!((f.cycles, f.errors, f.throughput), (2, 0, 4.0));
        assert_eq!((w.cycles, w.errors, w.throughput), (3, 1, 2.0));
        assert_eq!(
            f.cpu,
            CpuPerCycle {
                server_us: 50.0,
                agents_us: 0.0,
                total_us: 50.0,
                load_generator_us: 25.0
            }
        );
        assert_eq!(
            w.cpu,
            CpuPerCycle {
                server_us: 200.0,
                agents_us: 100.0,
                total_us: 300.0,
                load_generator_us: 30.0
            }
        );
        let q = ratios(&w, &f);
        assert_eq!((q.lease.p50, q.release.p99), (3.0, 4.0));
        assert_eq!((q.throughput, q.cpu), (0.5, 6.0));
        let c = FloorComparison {
            rounds: 1,
            order: vec!["floor".into(), "warmpool".into()],
            targets: vec![f, w],
            ratios: q,
            cpu_source: "test".into(),
        };
        let text = render(&c);
        assert!(text.contains("blocks ran floor, warmpool"), "{text}");
        assert!(
            text.contains("warmpool/floor ratio: lease p50 3.0x p99 3.0x; release p50 4.0x p99 4.0x; throughput 0.50x; CPU per cycle (server + agents) 6.0x"),
            "{text}"
        );
        assert!(text.contains("release"), "{text}");
        assert_eq!(times(f64::NAN, 1), "n/a");
    }
}
