//! Replays small traces whose figures can be computed by hand.

use std::time::Duration;

use super::*;

fn cfg(lo: u64, hi: u64) -> SimConfig {
    SimConfig {
        provision: (Duration::from_secs(lo), Duration::from_secs(hi)),
        cleanup: Duration::from_secs(1),
        terminate: Duration::from_secs(1),
        tick: Duration::from_secs(1),
        seed: 1,
        start: default_start(),
        warmup: Duration::ZERO,
        wait: Duration::from_secs(3600),
        quiet: None,
    }
}

fn trace(text: &str) -> Trace {
    trace::parse(
        &format!("at_seconds,selector,duration_seconds\n{text}"),
        "t",
    )
    .unwrap()
}

/// minIdle 1, provisioning exactly 10 s, a fresh agent per lease, leases at 0 s and 5 s for a
/// minute each. The pool starts warm (one idle agent at 0 s). 0 s: warm; the engine provisions
/// the minIdle replacement (ready at 10 s). 5 s: nothing idle, so it waits; the engine provisions
/// one more for it (ready at 15 s). 10 s: the replacement serves the waiter (waited 5 s).
/// 15 s: one agent idle until the end at 70 s (the second job ends 60 s after 10 s): 55 idle
/// agent-seconds. Peak: 3 agents (two leased or provisioning, one provisioning) from 5 s to 15 s.
#[test]
fn hand_computed_trace() {
    let t = trace("0,linux,60\n5,linux,60\n");
    let r = simulate(&t, "t", &[baseline(&t, 1, 10)], &cfg(10, 10), None).unwrap();
    let p = &r.policies[0];
    assert_eq!(p.name, "minIdle-1");
    assert_eq!((p.leases, p.warm, p.cold, p.failed), (2, 1, 1, 0));
    assert_eq!(p.warm_hit_ratio, 0.5);
    assert_eq!(p.waits, vec![0.0, 5.0]);
    assert_eq!(p.wait_seconds.p50, 0.0);
    assert_eq!(p.wait_seconds.p90, 5.0);
    assert_eq!(p.wait_seconds.p99, 5.0);
    assert!(
        (p.idle_agent_hours * 3600.0 - 55.0).abs() < 1e-6,
        "{}",
        p.idle_agent_hours * 3600.0
    );
    assert_eq!(p.peak_agents, 3);
    assert_eq!(p.provisions, 2);
    assert_eq!(p.measured_to_seconds, 70.0);
}

/// Reused agents (maxUses 0) clean up for the simulated cleanup time, then serve again warm.
#[test]
fn reuse_after_cleanup() {
    let t = trace("0,linux,10\n10.5,linux,10\n11.5,linux,10\n");
    let mut pol = baseline(&t, 1, 1);
    pol.pools[0].spec.max_uses = 0;
    let r = simulate(&t, "t", &[pol], &cfg(10, 10), None).unwrap();
    let p = &r.policies[0];
    // 10 s: released, cleaning until 11 s. 10.5 s: waits 0.5 s for it; 11.5 s: waits until the
    // second job ends at 21 s and its cleanup at 22 s (maxTotal 1: nothing else can start).
    assert_eq!((p.warm, p.cold), (1, 2));
    assert_eq!(p.waits, vec![0.0, 0.5, 10.5]);
    assert_eq!(p.provisions, 0);
}

#[test]
fn unmatched_selector_names_selector_and_policy() {
    let t = trace("0,windows,60\n");
    let e = simulate(
        &t,
        "t",
        &[baseline(&trace("0,linux,1\n"), 1, 10)],
        &cfg(1, 1),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("\"windows\"") && e.contains("minIdle-1"), "{e}");
}

#[test]
fn search_finds_the_smallest_min_idle() {
    // Ten leases in one second: only minIdle >= 10 serves them all warm.
    let lines: String = (0..10).map(|i| format!("0.{i},linux,60\n")).collect();
    let t = trace(&lines);
    let c = cfg(10, 10);
    let s = search_min_idle(&t, &baseline(&t, 0, 50), &c, 1.0, 64);
    assert_eq!(s.smallest, Some(10), "{s:?}");
    assert!(s.rows.windows(2).all(|w| w[0].min_idle < w[1].min_idle));
    let s = search_min_idle(&t, &baseline(&t, 0, 50), &c, 0.5, 64);
    assert_eq!(s.smallest, Some(5), "{s:?}");
}

#[test]
fn flags() {
    assert_eq!(
        parse_range("1.1s..3s").unwrap(),
        (Duration::from_millis(1100), Duration::from_secs(3))
    );
    assert!(parse_range("3s..1s").is_err());
    assert!(parse_range("3s").is_err());
    assert_eq!(parse_window("22:00..06:00").unwrap(), (79_200, 21_600));
    assert!(parse_window("25:00..06:00").is_err());
    assert_eq!(pool_name("linux && (go || rust)", &[]), "linux-go-rust");
    assert_eq!(pool_name("", &[]), "any");
}

#[test]
fn quiet_window_and_hours() {
    // One idle agent (minIdle 1, no leases but one at the end) for two hours from 00:00.
    let t = trace("7200,linux,1\n");
    let mut c = cfg(1, 1);
    c.quiet = Some(parse_window("00:00..01:00").unwrap());
    let r = simulate(&t, "t", &[baseline(&t, 1, 10)], &c, None).unwrap();
    let p = &r.policies[0];
    assert!(
        (p.quiet_idle_agent_hours.unwrap() - 1.0).abs() < 1e-3,
        "{p:?}"
    );
    assert!((p.idle_agent_hours_by_hour[1] - 1.0).abs() < 1e-3, "{p:?}");
}

/// The engine's wall clock follows `start`: a schedule window Mondays 01:00-02:00 UTC (minIdle
/// 3) has three agents idle for leases at 01:10 when the trace starts on a Monday, none when it
/// starts on a Tuesday.
#[test]
fn schedules_read_the_trace_start() {
    let t = trace("60,linux,10\n4200,linux,10\n4201,linux,10\n4202,linux,10\n");
    let pools = crate::spec::parse_pools(
        "pools:\n  - name: p\n    labels: [linux]\n    minIdle: 0\n    schedules:\n      - {cron: '0 1 * * 1', duration: 1h, minIdle: 3}\n",
        "t",
    )
    .unwrap();
    let pol = Policy {
        name: "sched".into(),
        pools,
    };
    let mut c = cfg(10, 10);
    let r = simulate(&t, "t", std::slice::from_ref(&pol), &c, None).unwrap();
    assert_eq!((r.policies[0].warm, r.policies[0].cold), (3, 1));
    c.start = default_start() + Duration::from_secs(86_400);
    let r = simulate(&t, "t", &[pol], &c, None).unwrap();
    assert_eq!((r.policies[0].warm, r.policies[0].cold), (0, 4));
}

#[test]
fn builtin_policies() {
    let t = trace("0,linux && go,1\n");
    let p = builtin(&t, 2, 100, 0.95, Some(Duration::from_secs(600)));
    let names: Vec<&str> = p.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["minIdle-2", "forecast", "forecast-stz"]);
    assert_eq!(p[0].pools[0].spec.min_idle, 2);
    assert_eq!(p[1].pools[0].spec.warm_hit_target, Some(0.95));
    assert_eq!(p[1].pools[0].spec.min_idle, 0);
    assert_eq!(p[1].pools[0].spec.labels, ["go", "linux"]);
    assert!(p[1].pools[0].spec.scale_to_zero_after.is_none());
    assert!(p[2].pools[0].spec.scale_to_zero_after.is_some());
    for pol in &p {
        for d in &pol.pools {
            assert!(d.spec.validate("").is_empty(), "{:?}", d.spec.validate(""));
        }
    }
}

/// A lease the simulator counts warm (granted at once by `request_lease`) is one the engine
/// itself reports warm (`Observation::Leased`, behind `warmpool_leases_total{path="warm"}`),
/// for the baseline and the forecast, on a day of bursty traffic.
#[test]
fn warm_as_the_engine_counts_it() {
    let t = generate::generate(&generate::GenConfig {
        profile: generate::Profile::Burst,
        weeks: 1,
        seed: 5,
        selector: "linux".into(),
        rate_per_minute: 2.0,
        start: default_start(),
    });
    let r = simulate(
        &t,
        "t",
        &builtin(&t, 2, 200, 0.95, None),
        &cfg(20, 30),
        None,
    )
    .unwrap();
    for p in &r.policies {
        assert!(p.warm > 100, "{}: {}", p.name, p.warm);
        assert_eq!(p.warm, p.engine_warm, "{}", p.name);
    }
}
