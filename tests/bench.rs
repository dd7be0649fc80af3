//! `warmpool bench` end to end: the embedded warm/cold run and the simulated-agents scale
//! test, as a user runs them (the binary), checked for shape and completeness, never timing.

mod support;

use std::process::Command;

use support::EXE;

/// Runs `warmpool bench <args>` quietly and parses its JSON report; panics with its stderr on
/// failure.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(EXE)
        .arg("bench")
        .args(args)
        .args(["--output", "json"])
        .env("WARMPOOL_LOG", "error")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn embedded_run_reports_both_pools_baseline_ratios_and_writes_a_plot() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("cdf.svg");
    let r = bench_json(&[
        "--embedded",
        "--jobs",
        "12",
        "--concurrency",
        "2",
        "--command",
        "echo hi",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let targets = r["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2);
    for t in targets {
        assert_eq!(t["jobs"], 6, "{t}");
        assert_eq!(t["errors"], 0, "{t}");
        for fig in ["lease", "ttfb", "exit"] {
            assert_eq!(t[fig]["n"], 6, "{fig}: {t}");
            assert!(t[fig]["p50"].as_f64().unwrap() > 0.0);
        }
    }
    assert_eq!(r["samples"].as_array().unwrap().len(), 12);
    assert!(r["baseline"]["spawn"]["n"].as_u64().unwrap() >= 50);
    assert!(r["baseline"]["http"]["p50"].as_f64().unwrap() > 0.0);
    assert_eq!(r["ratios"]["slow"], "cold");
    assert!(r["ratios"]["ttfb"]["p50"].as_f64().unwrap() > 0.0);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("warm") && svg.contains("cold"));
}

#[test]
fn bad_flags_are_refused_with_a_reason() {
    let out = Command::new(EXE).args(["bench"]).output().unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--embedded"));
    let out = Command::new(EXE)
        .args(["bench", "--embedded", "--selector", "x"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("brings its own pools"));
}

#[test]
fn simulated_agents_join_and_serve_leases() {
    let r = bench_json(&[
        "agents",
        "--count",
        "40",
        "--label-sets",
        "4",
        "--measure",
        "1s",
        "--jobs",
        "40",
        "--concurrency",
        "4",
    ]);
    assert_eq!(r["agents"], 40);
    assert_eq!(r["pools"], 4);
    assert_eq!(r["jobs"], 40);
    assert_eq!(r["errors"], 0);
    assert_eq!(r["lease"]["n"], 40);
    assert!(
        r["rssMib"].as_f64().unwrap() > 1.0,
        "the started server is local: {r}"
    );
    assert!(r["idleCpuPercent"].as_f64().is_some());
}

#[test]
fn floor_run_reports_both_targets_side_by_side_with_ratios_and_cpu() {
    let r = bench_json(&[
        "--embedded",
        "--floor",
        "--jobs",
        "40",
        "--concurrency",
        "2",
    ]);
    assert_eq!(r["command"], "", "--floor defaults to lease-only");
    let f = &r["floor"];
    assert_eq!(
        f["order"],
        serde_json::json!(["floor", "warmpool", "warmpool", "floor"]),
        "two rounds, ABBA"
    );
    let targets = f["targets"].as_array().unwrap();
    let names: Vec<&str> = targets
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["floor", "warmpool"]);
    for t in targets {
        assert_eq!(
            (t["cycles"].as_u64(), t["errors"].as_u64()),
            (Some(20), Some(0)),
            "{t}"
        );
        for fig in ["lease", "release"] {
            assert_eq!(t[fig]["n"], 20, "{fig}: {t}");
            assert!(t[fig]["p99"].as_f64().unwrap() > 0.0, "{fig}: {t}");
        }
        assert!(t["throughput"].as_f64().unwrap() > 0.0, "{t}");
        for k in ["serverUs", "agentsUs", "totalUs", "loadGeneratorUs"] {
            assert!(t["cpu"][k].as_f64().is_some(), "{k}: {t}");
        }
    }
    assert_eq!(
        targets[0]["cpu"]["agentsUs"], 0.0,
        "the floor has no agents"
    );
    for k in ["lease", "release"] {
        assert!(f["ratios"][k]["p50"].as_f64().unwrap() > 0.0, "{f}");
        assert!(f["ratios"][k]["p99"].as_f64().unwrap() > 0.0, "{f}");
    }
    assert!(f["ratios"]["throughput"].as_f64().unwrap() > 0.0, "{f}");
    assert!(r["ratios"].is_null(), "no warm/cold pair in a floor run");
    // The table names the floor and prints the ratios.
    let out = Command::new(EXE)
        .args([
            "bench",
            "--embedded",
            "--floor",
            "--jobs",
            "8",
            "--concurrency",
            "1",
            "--rounds",
            "1",
        ])
        .env("WARMPOOL_LOG", "error")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("blocks ran floor, warmpool\n"), "{text}");
    assert!(text.contains("warmpool/floor ratio: lease p50"), "{text}");
    assert!(text.contains("CPU per cycle (server + agents)"), "{text}");
}

#[test]
fn floor_refuses_a_command() {
    let out = Command::new(EXE)
        .args(["bench", "--embedded", "--floor", "--command", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--floor measures the lease API alone"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--floor` measures the lease path in the steady state of its load: before the first block,
/// `steady_pool` holds `concurrency` leases until the pool has its `minIdle` idle agents again,
/// so a block of that many leases at once starts no agent (it used to grow the pool from
/// `minIdle` to `minIdle + concurrency` inside the measured blocks, agents' start-up included).
#[tokio::test]
async fn the_floor_run_brings_the_pool_to_its_steady_state_before_measuring() {
    let h = support::start_pools(
        "
pools:
  - name: steady
    labels: [steady]
    minIdle: 2
    maxTotal: 10
    maxUses: 0
",
    )
    .await;
    warmpool::bench::wait_warm(&h.client, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    warmpool::bench::steady_pool(&h.client, "steady", 3)
        .await
        .unwrap();
    let p = h.pool("steady");
    assert_eq!((p.idle, p.leased, p.total), (5, 0, 5), "{p:?}");
    // A block of 3 leases at once, as the load holds them: nothing to start.
    let held: Vec<_> =
        futures_util::future::join_all((0..3).map(|_| h.lease("steady", 5.0, 60.0))).await;
    let p = h.pool("steady");
    assert_eq!((p.idle, p.leased, p.total), (2, 3, 5), "{p:?}");
    assert_eq!(p.provisioning + p.connecting, 0, "no agent starts: {p:?}");
    for l in held {
        h.client.release(&l.id).await.unwrap();
    }
    h.server.shutdown().await;
}
