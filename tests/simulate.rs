//! `warmpool simulate` end to end: the binary's replay (text, JSON, plot, pools files side by
//! side, trace errors), its generators, the Jenkins build-history import against the Jenkins
//! double, and the live check: a short trace replayed live against a real `warmpool serve`
//! (process backend, leases through the API) and simulated give warm-hit ratios within a few
//! points.

#[path = "support/jenkins.rs"]
mod jenkins;
mod support;

use std::process::{Command, Output};

use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_warmpool");

fn simulate(args: &[&str]) -> Output {
    Command::new(EXE)
        .arg("simulate")
        .args(args)
        .env_remove("WARMPOOL_CA_FILE")
        .output()
        .expect("warmpool runs")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// The hand-computed trace of `simulate::tests::hand_computed_trace`, through the binary:
/// JSON shape and figures, the text table, the SVG.
#[test]
fn replay_json_text_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let trace = write(
        &dir,
        "t.csv",
        "at_seconds,selector,duration_seconds\n0,linux,60\n5,linux,60\n",
    );
    let svg = dir.path().join("p.svg");
    let o = simulate(&[
        "--trace",
        &trace,
        "--provision",
        "10s..10s",
        "--min-idle",
        "1",
        "--output",
        "json",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let p = &v["policies"][0];
    assert_eq!(p["name"], "minIdle-1");
    assert_eq!(p["leases"], 2);
    assert_eq!(p["warm"], 1);
    assert_eq!(p["cold"], 1);
    assert_eq!(p["warmHitRatio"], 0.5);
    assert_eq!(p["waitSeconds"]["p50"], 0.0);
    assert_eq!(p["waitSeconds"]["p99"], 5.0);
    assert!((p["idleAgentHours"].as_f64().unwrap() * 3600.0 - 55.0).abs() < 1e-6);
    assert_eq!(p["peakAgents"], 3);
    assert_eq!(p["provisions"], 2);
    assert_eq!(p["idleAgentHoursByHour"].as_array().unwrap().len(), 24);
    // Without --pools, the forecast policy runs beside the baseline.
    assert_eq!(v["policies"][1]["name"], "forecast");
    assert_eq!(v["policies"][1]["leases"], 2);
    assert_eq!(
        v["setup"]["provisionSeconds"],
        serde_json::json!([10.0, 10.0])
    );
    assert_eq!(v["setup"]["start"], "2026-01-05T00:00:00Z");
    assert_eq!(v["setup"]["warmupSeconds"], 0.0);
    assert!(v["wallSeconds"].as_f64().is_some());
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("minIdle-1"),
        "{svg:.200}"
    );

    let text = stdout(&simulate(&[
        "--trace",
        &trace,
        "--provision",
        "10s..10s",
        "--min-idle",
        "1",
    ]));
    assert!(text.contains("minIdle-1"), "{text}");
    assert!(text.contains("0.5000"), "{text}");
    assert!(text.contains("no warm-up"), "{text}");
}

/// Two pools files side by side, and the search for the smallest fixed minIdle.
#[test]
fn pools_files_side_by_side_and_search() {
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (0..6).map(|i| format!("{i},linux && go,60\n")).collect();
    let trace = write(
        &dir,
        "t.csv",
        &format!("at_seconds,selector,duration_seconds\n{lines}"),
    );
    let small = write(
        &dir,
        "small.yaml",
        "pools:\n  - name: go\n    labels: [linux, go]\n    minIdle: 1\n    maxTotal: 20\n",
    );
    let big = write(
        &dir,
        "big.yaml",
        "pools:\n  - name: go\n    labels: [linux, go]\n    minIdle: 6\n    maxTotal: 20\n",
    );
    let o = simulate(&[
        "--trace",
        &trace,
        "--provision",
        "20s..30s",
        "--pools",
        &small,
        "--pools",
        &big,
        "--search-min-idle",
        "--target",
        "1",
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["policies"][0]["name"], "small");
    assert_eq!(v["policies"][0]["warm"], 1);
    assert_eq!(v["policies"][1]["name"], "big");
    assert_eq!(v["policies"][1]["warmHitRatio"], 1.0);
    assert_eq!(v["search"]["smallest"], 6);
    let rows = v["search"]["rows"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["minIdle"] == 5 && r["warmHitRatio"].as_f64() < Some(1.0))
    );

    // A selector no pool of a policy matches is named, with the policy.
    let other = write(
        &dir,
        "other.yaml",
        "pools:\n  - name: win\n    labels: [windows]\n",
    );
    let o = simulate(&[
        "--trace",
        &trace,
        "--provision",
        "1s..2s",
        "--pools",
        &other,
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("\"linux && go\"") && err.contains("policy other"),
        "{err}"
    );
}

#[test]
fn trace_errors_name_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let trace = write(
        &dir,
        "bad.csv",
        "at_seconds,selector,duration_seconds\n0,linux,60\nx,linux,60\n3,linux ||,60\n",
    );
    let o = simulate(&["--trace", &trace, "--provision", "1s..2s"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.csv"), "{err}");
    assert!(err.contains("line 3: at_seconds \"x\""), "{err}");
    assert!(err.contains("line 4: selector \"linux ||\""), "{err}");
    let o = simulate(&["--trace", &trace, "--provision", "3s..1s"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("MIN is above MAX"));
}

#[test]
fn generators_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    for profile in ["weekday", "burst", "nightly", "flat"] {
        let gen_to = |seed: &str, name: &str| {
            let f = dir.path().join(name);
            let o = simulate(&[
                "--generate",
                profile,
                "--weeks",
                "1",
                "--rate",
                "2",
                "--seed",
                seed,
                "--selector",
                "linux && go",
                "--output",
                f.to_str().unwrap(),
            ]);
            stdout(&o);
            std::fs::read_to_string(f).unwrap()
        };
        let a = gen_to("3", "a.csv");
        assert_eq!(a, gen_to("3", "b.csv"), "{profile}");
        assert_ne!(a, gen_to("4", "c.csv"), "{profile}");
        assert!(
            a.starts_with("# start: 2026-01-05T00:00:00Z\nat_seconds,selector,duration_seconds\n")
        );
        assert!(
            a.lines().nth(2).unwrap().contains(",linux && go,"),
            "{profile}"
        );
        assert!(a.lines().count() > 100, "{profile}");
    }
}

/// The build history of the Jenkins double becomes a trace: builds at their scheduled start
/// from the earliest, their durations, the job's `assignedNode` (or `--selector`), folders by
/// full name, running builds left out; every job when none is named.
#[tokio::test]
async fn jenkins_history_import() {
    let j = jenkins::JenkinsDouble::start(jenkins::JenkinsConfig::default()).await;
    let (user, token) = j.credentials();
    let t0 = 1_767_571_200_000u64; // 2026-01-05T00:00:00Z
    j.add_job("build-go", Some("linux && go"));
    j.add_build("build-go", t0 + 10_000, 300_000);
    j.add_build("build-go", t0 + 70_500, 120_000);
    j.add_build("build-go", t0 + 90_000, 0); // still running
    j.add_job("team/nightly", None);
    j.add_build("team/nightly", t0, 3_600_000);
    j.add_job("team/idle", None);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace.csv");
    let args = |jobs: &[&str]| {
        let mut a = vec![
            "simulate".to_string(),
            "--jenkins".into(),
            j.url().to_string(),
            "--jenkins-user".into(),
            user.clone(),
            "--jenkins-token".into(),
            token.clone(),
            "--selector".into(),
            "linux".into(),
            "--write-trace".into(),
            out.display().to_string(),
        ];
        for job in jobs {
            a.push("--job".into());
            a.push(job.to_string());
        }
        a
    };
    let run = |a: Vec<String>| async move {
        let o = tokio::process::Command::new(EXE)
            .args(a)
            .output()
            .await
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let expected = "# start: 2026-01-05T00:00:00Z\nat_seconds,selector,duration_seconds\n0,linux,3600\n10,linux && go,300\n70.5,linux && go,120\n";
    run(args(&["build-go", "team/nightly"])).await;
    assert_eq!(std::fs::read_to_string(&out).unwrap(), expected);
    run(args(&[])).await;
    assert_eq!(std::fs::read_to_string(&out).unwrap(), expected);
    let eps: Vec<_> = j.requests().into_iter().map(|r| r.path).collect();
    assert!(
        eps.contains(&"/job/team/job/nightly/api/json".to_string()),
        "{eps:?}"
    );
    assert!(
        eps.contains(&"/job/build-go/config.xml".to_string()),
        "{eps:?}"
    );

    // Bad credentials: the error names the URL and the status.
    let mut bad = args(&["build-go"]);
    bad[6] = "wrong".into();
    let o = tokio::process::Command::new(EXE)
        .args(bad)
        .output()
        .await
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("job/build-go/api/json") && err.contains("401"),
        "{err}"
    );
    j.shutdown();
}

/// THE LIVE CHECK. A 60 s trace (Poisson, 3 leases a second, jobs of 0.5-2.5 s) replayed live
/// against a real service (process backend, real `warmpool agent` processes, leases through the
/// HTTP API with the trace's timing) and simulated with the provisioning latency measured in
/// the same run (the 5th to 95th percentile of provision-to-idle of the live agents) give
/// warm-hit ratios within 0.08 of each other. Same pools file on both sides: minIdle 1, a fresh
/// agent per lease, so every lease needs a provision and the latency decides the ratio.
/// Live, a lease is warm when the service granted it at once
/// (`warmpool_lease_requests_total{result="granted"}` against `queued`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_and_simulated_warm_hit_ratios_agree() {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    use warmpool::engine::AgentState;
    use warmpool::simulate::{Policy, SimConfig, generate::Rng, sim, trace};

    const TOLERANCE: f64 = 0.08;
    let pools = "pools:\n  - name: p\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 40\n    maxUses: 1\n    provisioning: {perSecond: 100, burst: 100, maxConcurrent: 40}\n";
    // The trace: Poisson arrivals at 3/s for 60 s.
    let mut rng = Rng::new(42);
    let mut text = String::from("at_seconds,selector,duration_seconds\n");
    let mut t = 0.0;
    loop {
        t += -(1.0 - rng.unit()).ln() / 3.0;
        if t >= 60.0 {
            break;
        }
        text.push_str(&format!("{t:.3},linux,{:.3}\n", 0.5 + 2.0 * rng.unit()));
    }
    let tr = trace::parse(&text, "live").unwrap();

    let h = support::start_pools(pools).await;
    h.wait_idle("p", 1).await;
    // Provision-to-idle of every agent seen idle before its first lease (`since` is when it
    // became idle, exactly).
    let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let svc = h.server.svc.clone();
        let samples = samples.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let fresh: Vec<(String, f64)> = svc.read(|e| {
                    e.agents()
                        .filter(|a| a.state == AgentState::Idle && a.uses == 0)
                        .map(|a| (a.id.clone(), (a.since - a.created).as_secs_f64()))
                        .collect()
                });
                for (id, s) in fresh {
                    if seen.insert(id) {
                        samples.lock().unwrap().push(s);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let granted0 = h
        .server
        .svc
        .metrics
        .lease_requests
        .with_label_values(&["granted"])
        .get();
    let queued0 = h
        .server
        .svc
        .metrics
        .lease_requests
        .with_label_values(&["queued"])
        .get();
    let start = tokio::time::Instant::now();
    let mut jobs = Vec::new();
    for l in tr.leases.clone() {
        let client = h.client.clone();
        jobs.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + l.at).await;
            let lease = client
                .lease(&warmpool::api::CreateLease {
                    selector: l.selector.clone(),
                    wait_seconds: Some(30.0),
                    ttl_seconds: Some(60.0),
                    holder: Some("live check".into()),
                    idempotency_key: None,
                })
                .await
                .expect("lease granted");
            tokio::time::sleep(l.duration).await;
            client.release(&lease.id).await.expect("released");
        }));
    }
    let t0 = Instant::now();
    for j in jobs {
        j.await.unwrap();
    }
    let live_wall = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.await.unwrap();
    let granted = h
        .server
        .svc
        .metrics
        .lease_requests
        .with_label_values(&["granted"])
        .get()
        - granted0;
    let queued = h
        .server
        .svc
        .metrics
        .lease_requests
        .with_label_values(&["queued"])
        .get()
        - queued0;
    h.server.shutdown().await;
    assert_eq!((granted + queued) as usize, tr.leases.len());
    let live = granted as f64 / tr.leases.len() as f64;

    let mut s = samples.lock().unwrap().clone();
    s.sort_by(f64::total_cmp);
    assert!(s.len() >= 20, "{} provision samples", s.len());
    let pick = |q: f64| s[((q * s.len() as f64) as usize).min(s.len() - 1)];
    let (lo, hi) = (pick(0.05), pick(0.95));
    let cfg = SimConfig {
        provision: (Duration::from_secs_f64(lo), Duration::from_secs_f64(hi)),
        cleanup: Duration::from_millis(5),
        terminate: Duration::from_millis(50),
        tick: Duration::from_millis(20),
        seed: 1,
        start: warmpool::simulate::default_start(),
        warmup: Duration::ZERO,
        wait: Duration::from_secs(30),
        quiet: None,
    };
    let policy = Policy {
        name: "live".into(),
        pools: warmpool::spec::parse_pools(pools, "live").unwrap(),
    };
    let r = sim::run(&tr, &policy, &cfg);
    let simulated = r.warm_hit_ratio;
    eprintln!(
        "live check: {} leases in {:.1}s; provision-to-idle p5 {lo:.3}s p95 {hi:.3}s ({} samples); warm-hit live {live:.3}, simulated {simulated:.3}",
        tr.leases.len(),
        live_wall.as_secs_f64(),
        s.len()
    );
    assert!(
        (live - simulated).abs() <= TOLERANCE,
        "warm-hit live {live:.3} vs simulated {simulated:.3} (provision {lo:.3}s..{hi:.3}s)"
    );
}
