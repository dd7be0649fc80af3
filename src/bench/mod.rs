//! `warmpool bench`: the benchmark suite users run against their own warmpool.
//!
//! The load generator talks to a running service over the public lease API only (lease, exec
//! WebSocket, release), runs jobs against one or more targets (selectors) alternately in one
//! run, and records per job the time to lease, to the first byte and to the exit. It measures
//! the machine's floor in the same run (a bare local `sh -c <command>` and a loopback HTTP
//! round trip, before and after the load) so results read as a factor of it. `--embedded`
//! starts an in-process service with the process backend and two pools that differ only in
//! warmth. `bench agents` (agents.rs) opens thousands of simulated agents against a server.
//!
//! `--floor` runs warmpool's lease API side by side with an empty server with the same routes
//! (`floor.rs`), in alternating blocks (`side.rs`), with the CPU per lease cycle read from
//! /proc (`cpu.rs`).
//!
//! Layout: this file runs the load and the baseline; `stats.rs` summarises; `report.rs`
//! prints tables and JSON; `plot.rs` draws the CDFs; `agents.rs` is the scale test;
//! `sysinfo.rs` reads a local server's RSS and CPU from /proc; `pods.rs` watches a
//! Kubernetes namespace during the load (`--pods`).

pub mod agents;
pub mod cmd;
pub mod cpu;
pub mod floor;
pub mod plot;
pub mod pods;
pub mod report;
pub mod side;
pub mod stats;
pub mod sysinfo;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::api::CreateLease;
use crate::client::Client;
use crate::protocol::ExecSpec;
use crate::spec::{Dur, PoolDef, PoolSpec, Provisioning};
pub use stats::{Sample, Summary, TargetReport};

/// One selector the load runs against, under a short name.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// Name in reports (the pool name for `--embedded`).
    pub name: String,
    /// Lease selector.
    pub selector: String,
}

impl Target {
    /// Parses `name=selector`, or a bare selector (named after itself).
    pub fn parse(s: &str) -> Target {
        match s.split_once('=') {
            Some((n, sel)) if !n.is_empty() && !n.contains(['&', '|', '!', ' ']) => Target {
                name: n.to_string(),
                selector: sel.to_string(),
            },
            _ => Target {
                name: s.to_string(),
                selector: s.to_string(),
            },
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Targets; job i runs against target i mod len.
    pub targets: Vec<Target>,
    /// Jobs in all (across targets).
    pub jobs: usize,
    /// Jobs in flight at once.
    pub concurrency: usize,
    /// Shell command each job runs (`sh -c`).
    pub command: String,
    /// Stop starting jobs after this long, even before `jobs`.
    pub duration: Option<Duration>,
    /// How long a lease request may wait for an agent.
    pub wait: Duration,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// The machine's floor, measured in the same run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Baseline {
    /// A bare local `sh -c <command>`: spawn to exit.
    pub spawn: Summary,
    /// `GET /healthz` on the same server over a kept-alive connection.
    pub http: Summary,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    /// Server URL.
    pub server: String,
    /// Command run by every job.
    pub command: String,
    /// Jobs in flight at once.
    pub concurrency: usize,
    /// Wall time of the load, seconds.
    pub seconds: f64,
    /// When the load started (the origin of each sample's `atS`), Unix time in milliseconds:
    /// to line samples up with other clocks of the same machine (e.g. dockerd's events).
    pub started_unix_ms: f64,
    /// The floor.
    pub baseline: Baseline,
    /// Per target.
    pub targets: Vec<TargetReport>,
    /// Cold over warm per figure, when the run had a `warm` and a `cold` target (or exactly
    /// two targets: the second over the first).
    pub ratios: Option<Ratios>,
    /// What the pods did (`--pods`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pods: Option<pods::PodsReport>,
    /// warmpool side by side with its floor (`--floor`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<side::FloorComparison>,
    /// Every job.
    pub samples: Vec<Sample>,
}

/// The second target's figures over the first's.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ratios {
    /// Numerator target.
    pub slow: String,
    /// Denominator target.
    pub fast: String,
    /// Of the lease times.
    pub lease: stats::Ratio,
    /// Of the times to first byte.
    pub ttfb: stats::Ratio,
    /// Of the times to exit.
    pub exit: stats::Ratio,
    /// The fast target's median time to exit over the bare spawn's median.
    pub fast_exit_over_spawn: f64,
}

/// Runs one job: lease, exec, release.
async fn job(client: &Client, target: &Target, opts: &LoadOptions, t_run: Instant) -> Sample {
    let t0 = Instant::now();
    let mut s = Sample {
        target: target.name.clone(),
        agent: None,
        at_s: t0.duration_since(t_run).as_secs_f64(),
        lease_ms: None,
        ttfb_ms: None,
        exit_ms: None,
        release_ms: None,
        exit_code: None,
        error: None,
    };
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1000.0;
    let lease = match client
        .lease(&CreateLease {
            selector: target.selector.clone(),
            wait_seconds: Some(opts.wait.as_secs_f64()),
            ttl_seconds: Some(120.0),
            holder: Some("warmpool bench".into()),
            idempotency_key: None,
        })
        .await
    {
        Ok(l) => l,
        Err(e) => {
            s.error = Some(format!("lease: {e}"));
            return s;
        }
    };
    s.lease_ms = Some(ms(Instant::now()));
    s.agent = Some(lease.agent.clone());
    if opts.command.is_empty() {
        // Lease-only: measures the lease API alone (lease, then release).
        let t = Instant::now();
        match client.release_unparsed(&lease.id).await {
            Ok(()) => s.release_ms = Some(t.elapsed().as_secs_f64() * 1000.0),
            Err(e) => s.error = Some(format!("release: {e}")),
        }
        return s;
    }
    let mut first: Option<Instant> = None;
    let spec = ExecSpec {
        script: Some(opts.command.clone()),
        ..ExecSpec::default()
    };
    let r = client
        .exec(
            &lease.id,
            spec,
            |_, data| {
                if first.is_none() && !data.is_empty() {
                    first = Some(Instant::now());
                }
            },
            std::future::pending(),
        )
        .await;
    let done = Instant::now();
    match r {
        Ok(st) => {
            s.exit_ms = Some(ms(done));
            s.ttfb_ms = Some(ms(first.unwrap_or(done)));
            s.exit_code = st.code;
            if st.code != Some(0) {
                s.error = Some(format!("job exited with {st:?}"));
            }
        }
        Err(e) => s.error = Some(format!("exec: {e}")),
    }
    let t = Instant::now();
    match client.release_unparsed(&lease.id).await {
        Ok(()) => s.release_ms = Some(t.elapsed().as_secs_f64() * 1000.0),
        Err(e) if s.error.is_none() => s.error = Some(format!("release: {e}")),
        Err(_) => {}
    }
    s
}

/// Runs the load: `concurrency` workers take job numbers in order until `jobs` (or
/// `duration`) is reached; job i runs against target i mod len, so targets alternate and a
/// drift in the machine's speed affects them alike.
pub async fn run_load(client: &Client, opts: &LoadOptions) -> (Vec<Sample>, f64) {
    run_load_from(client, opts, Instant::now()).await
}

/// [`run_load`] with the run starting at `t_run` (the origin of [`Sample::at_s`]).
async fn run_load_from(client: &Client, opts: &LoadOptions, t_run: Instant) -> (Vec<Sample>, f64) {
    let next = Arc::new(AtomicUsize::new(0));
    let bar = progress_bar(opts.jobs as u64, opts.progress);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency.max(1) {
        let (client, opts, next, bar) = (client.clone(), opts.clone(), next.clone(), bar.clone());
        workers.spawn(async move {
            let mut out = Vec::new();
            loop {
                if opts.duration.is_some_and(|d| t_run.elapsed() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.jobs {
                    break;
                }
                let target = &opts.targets[i % opts.targets.len()];
                out.push(job(&client, target, &opts, t_run).await);
                bar.inc(1);
            }
            out
        });
    }
    let mut samples = Vec::new();
    while let Some(r) = workers.join_next().await {
        samples.extend(r.unwrap_or_default());
    }
    bar.finish_and_clear();
    samples.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    (samples, t_run.elapsed().as_secs_f64())
}

/// A progress bar on stderr (hidden when stderr is not a terminal or `show` is false).
pub fn progress_bar(len: u64, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} jobs, {per_sec}, eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Measures the floor: `n` bare `sh -c <command>` spawns and `n` `GET /healthz` round trips.
pub async fn baseline_samples(
    server: &str,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    command: &str,
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    let command = if command.is_empty() { "true" } else { command };
    let mut spawn = Vec::with_capacity(n);
    let mut http = Vec::with_capacity(n);
    let http_client = reqwest::Client::builder()
        .use_preconfigured_tls(crate::tls::for_reqwest(tls))
        .build()
        .expect("HTTP client");
    let url = format!("{}/healthz", server.trim_end_matches('/'));
    // One unmeasured round trip opens the kept-alive connection.
    let _ = http_client.get(&url).send().await;
    for _ in 0..n {
        let t = Instant::now();
        let ok = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .is_ok();
        if ok {
            spawn.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let t = Instant::now();
        if let Ok(r) = http_client.get(&url).send().await
            && r.bytes().await.is_ok()
        {
            http.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    (spawn, http)
}

/// Runs the whole benchmark: baseline, load, baseline again, then the report. With `pods`
/// (a cluster client and a namespace), the pods of that namespace are watched during the load
/// (pods.rs).
pub async fn run(
    client: &Client,
    server: &str,
    opts: &LoadOptions,
    pods: Option<(kube::Client, String)>,
    floor: Option<&side::SideRun<'_>>,
) -> Result<LoadReport, String> {
    let (mut spawn, mut http) = baseline_samples(server, client.tls(), &opts.command, 25).await;
    let t_run = Instant::now();
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let watch = match &pods {
        Some((kube, ns)) => Some(pods::PodWatch::start(kube.clone(), ns, t_run).await?),
        None => None,
    };
    let (samples, seconds, comparison) = match floor {
        None => {
            let (samples, seconds) = run_load_from(client, opts, t_run).await;
            (samples, seconds, None)
        }
        Some(f) => {
            let (samples, c) = side::run(f, opts, t_run).await?;
            (samples, t_run.elapsed().as_secs_f64(), Some(c))
        }
    };
    let pods = match (watch, &pods) {
        (Some(w), Some((_, ns))) => {
            let log = w.stop();
            let max_total = client
                .pools()
                .await
                .map_err(|e| format!("reading the pools from {server}: {e}"))?
                .into_iter()
                .map(|p| (p.name, p.max_total))
                .collect();
            Some(log.report(ns, &samples, &max_total))
        }
        _ => None,
    };
    let (s2, h2) = baseline_samples(server, client.tls(), &opts.command, 25).await;
    spawn.extend(s2);
    http.extend(h2);
    let baseline = Baseline {
        spawn: Summary::of(&spawn),
        http: Summary::of(&http),
    };
    let targets: Vec<TargetReport> = match &comparison {
        None => opts
            .targets
            .iter()
            .map(|t| TargetReport::of(&t.name, &t.selector, &samples, seconds))
            .collect(),
        // Each target over the wall time of its own blocks.
        Some(c) => c
            .targets
            .iter()
            .map(|f| {
                let selector = opts
                    .targets
                    .iter()
                    .find(|t| t.name == f.name)
                    .map_or("bench && floor", |t| t.selector.as_str());
                TargetReport::of(&f.name, selector, &samples, f.seconds)
            })
            .collect(),
    };
    let pair = if comparison.is_some() {
        None
    } else {
        pick_pair(&targets)
    };
    let ratios = pair.map(|(fast, slow)| Ratios {
        slow: slow.name.clone(),
        fast: fast.name.clone(),
        lease: slow.lease.ratio_to(&fast.lease),
        ttfb: slow.ttfb.ratio_to(&fast.ttfb),
        exit: slow.exit.ratio_to(&fast.exit),
        fast_exit_over_spawn: fast.exit.p50 / baseline.spawn.p50,
    });
    Ok(LoadReport {
        server: server.to_string(),
        command: opts.command.clone(),
        concurrency: opts.concurrency,
        seconds,
        started_unix_ms,
        baseline,
        targets,
        ratios,
        pods,
        floor: comparison,
        samples,
    })
}

/// (warm, cold) when both names are there, else the first two targets.
fn pick_pair(t: &[TargetReport]) -> Option<(&TargetReport, &TargetReport)> {
    let warm = t.iter().find(|t| t.name == "warm");
    let cold = t.iter().find(|t| t.name == "cold");
    match (warm, cold) {
        (Some(w), Some(c)) => Some((w, c)),
        _ if t.len() == 2 => Some((&t[0], &t[1])),
        _ => None,
    }
}

/// The two pools of `--embedded`: identical but for `minIdle` (warm keeps `concurrency`
/// agents idle, cold none), both with one fresh agent per job (`maxUses: 1`, as a
/// pod-per-job CI does) and a provisioning pace that never throttles the load.
pub fn embedded_pools(concurrency: usize, max_uses: u32) -> Vec<PoolDef> {
    let c = concurrency.max(1) as u32;
    let pool = |name: &str, min_idle: u32| PoolDef {
        name: name.into(),
        spec: PoolSpec {
            labels: vec!["bench".into(), name.into()],
            min_idle,
            max_total: 2 * c + 2,
            max_uses,
            idle_ttl: Dur::secs(600),
            connect_timeout: Dur::secs(60),
            provisioning: Provisioning {
                per_second: 1000.0,
                burst: 2 * c + 2,
                max_concurrent: 2 * c + 2,
            },
            ..PoolSpec::default()
        },
    };
    vec![pool("warm", c), pool("cold", 0)]
}

/// Brings the pool of `selector` to the steady state of a load of `concurrency` leases at once
/// (unmeasured): holds that many leases until the pool has its `minIdle` idle agents again,
/// then releases them. The pool then holds `concurrency` more agents than `minIdle` (idle until
/// `idleTtl`), so no agent starts during a measured block: `--floor` measures the lease path,
/// not the pool's growth.
pub async fn steady_pool(
    client: &Client,
    selector: &str,
    concurrency: usize,
) -> Result<(), String> {
    let req = CreateLease {
        selector: selector.into(),
        wait_seconds: Some(120.0),
        ttl_seconds: Some(300.0),
        holder: Some("warmpool bench (warm-up)".into()),
        idempotency_key: None,
    };
    let leases =
        futures_util::future::join_all((0..concurrency.max(1)).map(|_| client.lease(&req))).await;
    let refilled = wait_warm(client, Duration::from_secs(120)).await;
    let mut failed = None;
    for l in &leases {
        match l {
            Ok(l) => {
                if let Err(e) = client.release(&l.id).await {
                    failed.get_or_insert(format!("warm-up release of {}: {e}", l.id));
                }
            }
            Err(e) => {
                failed.get_or_insert(format!("warm-up lease on {selector:?}: {e}"));
            }
        }
    }
    refilled?;
    failed.map_or(Ok(()), Err)
}

/// Waits until every pool reports at least its `minIdle` idle agents.
pub async fn wait_warm(client: &Client, limit: Duration) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let pools = client.pools().await.map_err(|e| e.to_string())?;
        if pools.iter().all(|p| p.idle >= p.min_idle) {
            return Ok(());
        }
        if t.elapsed() > limit {
            let detail: Vec<String> = pools
                .iter()
                .map(|p| format!("{}: {}/{} idle", p.name, p.idle, p.min_idle))
                .collect();
            return Err(format!(
                "pools not warm after {limit:?}: {}",
                detail.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
