//! Latency samples and their summaries: percentiles (nearest rank), throughput and the
//! cold/warm ratios `warmpool bench` prints.

use serde::Serialize;

/// One job as the load generator saw it. Times are milliseconds from the lease request.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    /// The target (pool) name the job ran against.
    pub target: String,
    /// The agent (on Kubernetes, the pod) that served the job, once leased.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Seconds from the start of the run to the lease request.
    pub at_s: f64,
    /// Lease request to its 201 answer.
    pub lease_ms: Option<f64>,
    /// Lease request to the first byte of output (or of the exit status when the command
    /// writes nothing).
    pub ttfb_ms: Option<f64>,
    /// Lease request to the exit status.
    pub exit_ms: Option<f64>,
    /// Release request (`DELETE /v1/leases/{id}`) to its answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_ms: Option<f64>,
    /// The job's exit code.
    pub exit_code: Option<i32>,
    /// What failed, when something did.
    pub error: Option<String>,
}

/// Percentiles of one figure, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Summary {
    /// Summarises values (any order); all zero when empty.
    pub fn of(values: &[f64]) -> Summary {
        if values.is_empty() {
            return Summary::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Summary {
            n: v.len(),
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }

    /// Each percentile of `self` divided by the same of `base` (cold over warm).
    pub fn ratio_to(&self, base: &Summary) -> Ratio {
        let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        Ratio {
            p50: r(self.p50, base.p50),
            p90: r(self.p90, base.p90),
            p99: r(self.p99, base.p99),
        }
    }
}

/// A ratio per percentile.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratio {
    /// Of the medians.
    pub p50: f64,
    /// Of the 90th percentiles.
    pub p90: f64,
    /// Of the 99th percentiles.
    pub p99: f64,
}

/// Nearest-rank percentile of sorted values.
///
/// ```
/// use warmpool::bench::stats::percentile;
/// let v: Vec<f64> = (1..=100).map(f64::from).collect();
/// assert_eq!(percentile(&v, 50.0), 50.0);
/// assert_eq!(percentile(&v, 99.0), 99.0);
/// assert_eq!(percentile(&[7.0], 99.0), 7.0);
/// ```
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Figures of one target.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetReport {
    /// Target name.
    pub name: String,
    /// Its selector.
    pub selector: String,
    /// Jobs attempted.
    pub jobs: usize,
    /// Jobs that failed (lease, exec or a non-zero exit).
    pub errors: usize,
    /// Jobs finished per second over the run.
    pub throughput: f64,
    /// Lease request to 201.
    pub lease: Summary,
    /// Lease request to the first byte.
    pub ttfb: Summary,
    /// Lease request to the exit.
    pub exit: Summary,
    /// Release request to its answer.
    pub release: Summary,
    /// The first few error messages.
    pub error_examples: Vec<String>,
}

impl TargetReport {
    /// Builds the report of `name` from all samples of a run lasting `seconds`.
    pub fn of(name: &str, selector: &str, samples: &[Sample], seconds: f64) -> TargetReport {
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.target == name).collect();
        let ok: Vec<&&Sample> = mine.iter().filter(|s| s.error.is_none()).collect();
        let pick = |f: fn(&Sample) -> Option<f64>| -> Vec<f64> {
            ok.iter().filter_map(|s| f(s)).collect::<Vec<f64>>()
        };
        let mut error_examples: Vec<String> = mine.iter().filter_map(|s| s.error.clone()).collect();
        error_examples.dedup();
        error_examples.truncate(5);
        TargetReport {
            name: name.to_string(),
            selector: selector.to_string(),
            jobs: mine.len(),
            errors: mine.len() - ok.len(),
            throughput: if seconds > 0.0 {
                ok.len() as f64 / seconds
            } else {
                0.0
            },
            lease: Summary::of(&pick(|s| s.lease_ms)),
            ttfb: Summary::of(&pick(|s| s.ttfb_ms)),
            exit: Summary::of(&pick(|s| s.exit_ms)),
            release: Summary::of(&pick(|s| s.release_ms)),
            error_examples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_ratio() {
        let v: Vec<f64> = (1..=1000).map(|i| i as f64).collect();
        let s = Summary::of(&v);
        assert_eq!(
            (s.n, s.p50, s.p90, s.p99, s.max),
            (1000, 500.0, 900.0, 990.0, 1000.0)
        );
        assert_eq!(s.mean, 500.5);
        let half = Summary::of(&v.iter().map(|x| x / 2.0).collect::<Vec<_>>());
        let r = s.ratio_to(&half);
        assert_eq!((r.p50, r.p99), (2.0, 2.0));
        assert!(Summary::of(&[]).ratio_to(&Summary::default()).p50.is_nan());
    }

    #[test]
    fn reports_count_errors_apart() {
        let mk = |t: &str, ms: f64, err: bool| Sample {
            target: t.into(),
            agent: None,
            at_s: 0.0,
            lease_ms: Some(ms),
            ttfb_ms: Some(ms),
            exit_ms: Some(ms),
            release_ms: Some(ms),
            exit_code: Some(0),
            error: err.then(|| "boom".to_string()),
        };
        let s = vec![
            mk("warm", 1.0, false),
            mk("warm", 3.0, false),
            mk("warm", 99.0, true),
            mk("cold", 5.0, false),
        ];
        let r = TargetReport::of("warm", "w", &s, 2.0);
        assert_eq!((r.jobs, r.errors, r.lease.n, r.lease.max), (3, 1, 2, 3.0));
        assert_eq!(r.throughput, 1.0);
        assert_eq!(r.error_examples, ["boom"]);
    }
}
