//! `warmpool simulate`: replays a trace of lease requests through the real pool engine with a
//! virtual clock and a simulated provisioner, for one or more policies side by side, and
//! reports per policy the warm-hit ratio, lease waits, idle agent-hours (the cost of the bet),
//! peak agents and provisions (docs/SIZING.md).
//!
//! Layout: `trace.rs` the CSV trace format; `generate.rs` synthetic traces; `sim.rs` the
//! event-driven replay on [`crate::engine::Engine`]; `report.rs` the figures, text and JSON;
//! `plot.rs` the SVG; `cmd.rs` the subcommand. The Jenkins build-history import is
//! [`crate::jenkins::history`].
//!
//! Must not: touch the network (but for the Jenkins import), sleep, or change the engine: the
//! simulator and the live service run the same sizing code.

pub mod cmd;
pub mod generate;
pub mod plot;
pub mod report;
pub mod sim;
pub mod trace;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use report::{PolicyResult, Report, Search, SearchRow, Setup};
pub use sim::{Policy, SimConfig};
pub use trace::{Trace, TraceLease};

use crate::spec::{PoolDef, PoolSpec, Provisioning};

/// Errors of `warmpool simulate`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("cannot access {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// The trace has bad lines; one message per line.
    #[error("trace {source_name} is invalid:\n  - {}", .problems.join("\n  - "))]
    Trace {
        /// The trace's name.
        source_name: String,
        /// One message per bad line, with its number.
        problems: Vec<String>,
    },
    /// A pools file is invalid.
    #[error(transparent)]
    Spec(#[from] crate::spec::Error),
    /// A selector of the trace matches no pool of a policy.
    #[error(
        "selector {selector:?} of the trace matches no pool of policy {policy} (pools: {pools})"
    )]
    Unmatched {
        /// The selector.
        selector: String,
        /// The policy.
        policy: String,
        /// Its pools and their labels.
        pools: String,
    },
    /// A flag's value is invalid.
    #[error("{flag}: {message}")]
    Flag {
        /// The flag.
        flag: &'static str,
        /// Why.
        message: String,
    },
    /// The plot could not be drawn.
    #[error("cannot draw {path}: {message}")]
    Plot {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// The Jenkins build history could not be read.
    #[error(transparent)]
    Jenkins(#[from] crate::jenkins::history::Error),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The default wall time of a trace's start: Monday 2026-01-05 00:00 UTC.
pub fn default_start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(20_458 * 86_400)
}

/// Parses a provisioning latency range `MIN..MAX` (`1.1s..3s`, `20s..30s`, `10s..10s`).
pub fn parse_range(s: &str) -> std::result::Result<(Duration, Duration), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a range MIN..MAX like 20s..30s"))?;
    let lo = crate::spec::Dur::parse(a)?.0;
    let hi = crate::spec::Dur::parse(b)?.0;
    if lo > hi {
        return Err(format!("{s:?}: MIN is above MAX"));
    }
    Ok((lo, hi))
}

/// Parses a daily window `HH:MM..HH:MM` (UTC) into seconds of the day.
pub fn parse_window(s: &str) -> std::result::Result<(u32, u32), String> {
    let hm = |t: &str| -> Option<u32> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some((h * 60 + m) * 60)
    };
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a window HH:MM..HH:MM like 06:00..22:00"))?;
    match (hm(a), hm(b)) {
        (Some(a), Some(b)) if a != b => Ok((a % 86_400, b % 86_400)),
        _ => Err(format!(
            "{s:?} is not a window HH:MM..HH:MM like 06:00..22:00"
        )),
    }
}

/// The default warm-up: the first week when the trace is longer than 8 days (a time-of-week
/// learner has seen each hour of the week once), else none.
pub fn default_warmup(trace: &Trace) -> Duration {
    let week = Duration::from_secs(7 * 86_400);
    if trace.end() > week + Duration::from_secs(86_400) {
        week
    } else {
        Duration::ZERO
    }
}

/// A DNS-1123 pool name for a selector (`linux && go` -> `linux-go`), unique among `taken`.
fn pool_name(selector: &str, taken: &[PoolDef]) -> String {
    let mut base: String = selector
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while base.contains("--") {
        base = base.replace("--", "-");
    }
    let mut base: String = base.trim_matches('-').chars().take(50).collect();
    base = base.trim_end_matches('-').to_string();
    if base.is_empty() {
        base = "any".into();
    }
    let mut name = base.clone();
    let mut n = 2;
    while taken.iter().any(|d| d.name == name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}

/// The pool spec of the built-in policies for one selector: its atoms as labels, a fresh agent
/// per lease (`maxUses: 1`, the spec's default), `maxTotal`, and provisioning fast enough for
/// the field's 20-30 s starts under bursts (50 in flight, 10 a second, bursts of 20).
pub fn template(selector: &str, min_idle: u32, max_total: u32) -> PoolSpec {
    let labels = crate::labels::Expr::parse(selector)
        .map(|e| e.atoms().into_iter().map(str::to_string).collect())
        .unwrap_or_default();
    PoolSpec {
        labels,
        min_idle: min_idle.min(max_total),
        max_total,
        provisioning: Provisioning {
            per_second: 10.0,
            burst: 20,
            max_concurrent: 50,
        },
        ..PoolSpec::default()
    }
}

/// The fixed-minIdle baseline: one pool per selector of the trace, [`template`].
pub fn baseline(trace: &Trace, min_idle: u32, max_total: u32) -> Policy {
    let mut pools = Vec::new();
    for s in trace.selectors() {
        let name = pool_name(&s, &pools);
        pools.push(PoolDef {
            name,
            spec: template(&s, min_idle, max_total),
        });
    }
    Policy {
        name: format!("minIdle-{min_idle}"),
        pools,
    }
}

/// The forecast policy: the baseline's pools with `minIdle: 0` and `warmHitTarget: target`,
/// and `scaleToZeroAfter` when given (named `forecast`, or `forecast-stz`).
pub fn forecast(
    trace: &Trace,
    target: f64,
    max_total: u32,
    scale_to_zero_after: Option<Duration>,
) -> Policy {
    let mut p = baseline(trace, 0, max_total);
    p.name = match scale_to_zero_after {
        Some(_) => "forecast-stz".into(),
        None => "forecast".into(),
    };
    for d in &mut p.pools {
        d.spec.warm_hit_target = Some(target);
        d.spec.scale_to_zero_after = scale_to_zero_after.map(crate::spec::Dur);
    }
    p
}

/// The built-in policies for a trace: the fixed-minIdle baseline ([`baseline`]), the forecast
/// policy for `target` ([`forecast`]), and, with `scale_to_zero_after`, the forecast policy
/// with scale-to-zero.
pub fn builtin(
    trace: &Trace,
    min_idle: u32,
    max_total: u32,
    target: f64,
    scale_to_zero_after: Option<Duration>,
) -> Vec<Policy> {
    let mut v = vec![
        baseline(trace, min_idle, max_total),
        forecast(trace, target, max_total, None),
    ];
    if scale_to_zero_after.is_some() {
        v.push(forecast(trace, target, max_total, scale_to_zero_after));
    }
    v
}

/// A policy from a pools file (the format of `warmpool serve --pools`), named by its file.
pub fn policy_file(path: &Path) -> Result<Policy> {
    let pools = crate::spec::load_file(path)?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string());
    Ok(Policy { name, pools })
}

/// Checks that every selector of the trace matches a pool of every policy.
pub fn check(trace: &Trace, policies: &[Policy]) -> Result<()> {
    for s in trace.selectors() {
        let e = crate::labels::Expr::parse(&s).map_err(|e| Error::Flag {
            flag: "--trace",
            message: format!("selector {s:?}: {e}"),
        })?;
        for p in policies {
            let ok = p.pools.iter().any(|d| {
                !d.spec.external && d.spec.jenkins.is_none() && e.matches(&d.spec.label_set())
            });
            if !ok {
                return Err(Error::Unmatched {
                    selector: s.clone(),
                    policy: p.name.clone(),
                    pools: p
                        .pools
                        .iter()
                        .map(|d| format!("{}: [{}]", d.name, d.spec.labels.join(", ")))
                        .collect::<Vec<_>>()
                        .join("; "),
                });
            }
        }
    }
    Ok(())
}

/// The same policy with every pool's `minIdle` set to `n` (`maxTotal` raised to it if needed).
fn with_min_idle(template: &Policy, n: u32) -> Policy {
    let mut p = template.clone();
    p.name = format!("minIdle-{n}");
    for d in &mut p.pools {
        d.spec.min_idle = n;
        d.spec.max_total = d.spec.max_total.max(n);
    }
    p
}

/// Finds the smallest fixed `minIdle` (the same in every pool of `template`) whose warm-hit
/// ratio reaches `target`: doubling from 0 until it does (at most `limit`), then bisecting.
pub fn search_min_idle(
    trace: &Trace,
    template: &Policy,
    cfg: &SimConfig,
    target: f64,
    limit: u32,
) -> Search {
    let mut rows: Vec<SearchRow> = Vec::new();
    let try_n = |n: u32, rows: &mut Vec<SearchRow>| -> bool {
        let r = sim::run(trace, &with_min_idle(template, n), cfg);
        rows.push(SearchRow {
            min_idle: n,
            warm_hit_ratio: r.warm_hit_ratio,
            idle_agent_hours: r.idle_agent_hours,
            wait_p99_seconds: r.wait_seconds.p99,
        });
        r.warm_hit_ratio >= target
    };
    let mut below: Option<u32> = None;
    let mut n = 0;
    let found = loop {
        if try_n(n, &mut rows) {
            break Some(n);
        }
        below = Some(n);
        if n >= limit {
            break None;
        }
        n = if n == 0 { 1 } else { (n * 2).min(limit) };
    };
    let smallest = found.map(|mut hi| {
        let mut lo = below.map_or(0, |b| b + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if try_n(mid, &mut rows) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        hi
    });
    rows.sort_by_key(|r| r.min_idle);
    rows.dedup_by_key(|r| r.min_idle);
    Search {
        target,
        smallest,
        rows,
    }
}

/// Replays `trace` for each policy (and the search, if asked) and builds the report.
pub fn simulate(
    trace: &Trace,
    trace_name: &str,
    policies: &[Policy],
    cfg: &SimConfig,
    search: Option<(&Policy, f64, u32)>,
) -> Result<Report> {
    let started = Instant::now();
    check(trace, policies)?;
    if let Some((t, _, _)) = search {
        check(trace, std::slice::from_ref(t))?;
    }
    let results = policies.iter().map(|p| sim::run(trace, p, cfg)).collect();
    let search = search.map(|(t, target, limit)| search_min_idle(trace, t, cfg, target, limit));
    Ok(Report {
        setup: Setup {
            trace: trace_name.to_string(),
            trace_leases: trace.leases.len(),
            start: humantime::format_rfc3339_seconds(cfg.start).to_string(),
            trace_seconds: trace.end().as_secs_f64(),
            warmup_seconds: cfg.warmup.as_secs_f64(),
            provision_seconds: (cfg.provision.0.as_secs_f64(), cfg.provision.1.as_secs_f64()),
            cleanup_seconds: cfg.cleanup.as_secs_f64(),
            terminate_seconds: cfg.terminate.as_secs_f64(),
            tick_seconds: cfg.tick.as_secs_f64(),
            seed: cfg.seed,
        },
        policies: results,
        search,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests;
