//! Human-readable output of `warmpool bench`: aligned tables of percentiles per target and
//! figure, the baseline, and the ratios. JSON output is the serde form of the reports.

use std::fmt::Write;

use super::{LoadReport, Summary};

pub use crate::client::table;

fn f(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Percentile cells of a summary.
pub fn cells(s: &Summary) -> Vec<String> {
    vec![s.n.to_string(), f(s.p50), f(s.p90), f(s.p99), f(s.max)]
}

/// The table `warmpool bench` prints.
pub fn render(r: &LoadReport) -> String {
    let mut out = String::new();
    let jobs: usize = r.targets.iter().map(|t| t.jobs).sum();
    let _ = writeln!(
        out,
        "warmpool bench: {jobs} jobs at concurrency {} running `{}` against {} in {:.1} s",
        r.concurrency, r.command, r.server, r.seconds
    );
    if let Some(c) = &r.floor {
        return render_floor(r, c, out);
    }
    let mut rows = vec![
        ["TARGET", "FIGURE (ms)", "N", "P50", "P90", "P99", "MAX"]
            .map(String::from)
            .to_vec(),
    ];
    for (name, s) in [
        ("baseline", ("bare sh -c spawn", &r.baseline.spawn)),
        ("baseline", ("loopback HTTP", &r.baseline.http)),
    ] {
        let mut cells_ = vec![name.to_string(), s.0.to_string()];
        cells_.extend(cells(s.1));
        rows.push(cells_);
    }
    for t in &r.targets {
        for (fig, s) in [
            ("lease (to 201)", &t.lease),
            ("first byte", &t.ttfb),
            ("exit", &t.exit),
        ] {
            let mut c = vec![t.name.clone(), fig.to_string()];
            c.extend(cells(s));
            rows.push(c);
        }
    }
    out.push_str(&table(&rows));
    let mut rows = vec![
        ["TARGET", "SELECTOR", "JOBS", "ERRORS", "JOBS/S"]
            .map(String::from)
            .to_vec(),
    ];
    for t in &r.targets {
        rows.push(vec![
            t.name.clone(),
            t.selector.clone(),
            t.jobs.to_string(),
            t.errors.to_string(),
            format!("{:.1}", t.throughput),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    for t in r.targets.iter().filter(|t| t.errors > 0) {
        for e in &t.error_examples {
            let _ = writeln!(out, "  {} error: {e}", t.name);
        }
    }
    if let Some(p) = &r.pods {
        out.push_str(&render_pods(p));
    }
    if let Some(q) = &r.ratios {
        let _ = writeln!(
            out,
            "\n{}/{} ratio: lease p50 {:.1}x p99 {:.1}x; first byte p50 {:.1}x p99 {:.1}x; exit p50 {:.1}x p99 {:.1}x",
            q.slow,
            q.fast,
            q.lease.p50,
            q.lease.p99,
            q.ttfb.p50,
            q.ttfb.p99,
            q.exit.p50,
            q.exit.p99
        );
        let _ = writeln!(
            out,
            "{} exit p50 is {:.2}x the bare local spawn p50 ({} ms vs {} ms)",
            q.fast,
            q.fast_exit_over_spawn,
            f(r.targets
                .iter()
                .find(|t| t.name == q.fast)
                .map_or(0.0, |t| t.exit.p50)),
            f(r.baseline.spawn.p50)
        );
    }
    out
}

/// The `--floor` report: the baseline, then warmpool and the floor side by side.
fn render_floor(r: &LoadReport, c: &super::side::FloorComparison, mut out: String) -> String {
    let mut rows = vec![
        ["BASELINE", "FIGURE (ms)", "N", "P50", "P90", "P99", "MAX"]
            .map(String::from)
            .to_vec(),
    ];
    let mut row = vec!["baseline".to_string(), "loopback HTTP".to_string()];
    row.extend(cells(&r.baseline.http));
    rows.push(row);
    out.push_str(&table(&rows));
    out.push('\n');
    out.push_str(&super::side::render(c));
    for t in r.targets.iter().filter(|t| t.errors > 0) {
        for e in &t.error_examples {
            let _ = writeln!(out, "  {} error: {e}", t.name);
        }
    }
    out
}

/// The `--pods` part: each pool's pods, and the split of cold starts.
fn render_pods(p: &super::pods::PodsReport) -> String {
    let mut out = format!("\npods in namespace {}:\n", p.namespace);
    let mut rows = vec![
        ["POOL", "PODS CREATED", "PEAK PODS THAT MAY RUN", "MAXTOTAL"]
            .map(String::from)
            .to_vec(),
    ];
    for q in &p.pools {
        rows.push(vec![
            q.pool.clone(),
            q.created.to_string(),
            q.peak.to_string(),
            q.max_total.map_or("?".into(), |m| m.to_string()),
        ]);
    }
    out.push_str(&table(&rows));
    if !p.cold_starts.is_empty() {
        out.push_str("\njobs that waited for a new pod, ms from the lease request:\n");
        let mut rows = vec![
            ["TARGET", "MILESTONE", "N", "P50", "P90", "P99", "MAX"]
                .map(String::from)
                .to_vec(),
        ];
        for c in &p.cold_starts {
            for (m, s) in [
                ("pod created", &c.created),
                ("pod Running (kubelet)", &c.running),
                ("agent connected, leased", &c.lease),
                ("first byte", &c.ttfb),
            ] {
                if s.n == 0 {
                    continue;
                }
                let mut row = vec![c.target.clone(), m.to_string()];
                row.extend(cells(s));
                rows.push(row);
            }
        }
        out.push_str(&table(&rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&[
            vec!["A".into(), "BB".into()],
            vec!["ccc".into(), "d".into()],
        ]);
        assert_eq!(t, "A    BB\nccc  d\n");
        assert_eq!(f(1234.5), "1234");
        assert_eq!(f(12.34), "12.3");
        assert_eq!(f(0.1234), "0.12");
    }
}
