//! Hooks: the spec's fields and validation, the wire shapes, the verdict, and the engine's
//! decision at `ready`.

use std::time::{Duration, Instant};

use super::*;
use crate::engine::{
    Action, AgentState, Engine, EngineConfig, Health, LeaseDecision, LeaseRequest, Unpaced,
};
use crate::protocol::{AgentMessage, HubMessage};
use crate::spec::{PoolSpec, parse_pools};

fn result(hook: HookKind, code: i32, stderr: &str) -> HookResult {
    HookResult {
        hook,
        exit_code: Some(code),
        signal: None,
        timed_out: false,
        error: None,
        duration_ms: 5,
        stdout_bytes: 0,
        stderr_bytes: stderr.len() as u64,
        stdout: String::new(),
        stderr: stderr.into(),
    }
}

fn both(max_output_bytes: Option<u64>) -> Hooks {
    Hooks {
        cleanup: Some(CleanupHook {
            command: vec!["true".into()],
            timeout: Dur::secs(30),
        }),
        health: Some(HealthHook {
            command: vec!["true".into()],
            timeout: Dur::secs(10),
            max_output_bytes,
        }),
    }
}

#[test]
fn a_pools_file_reads_hooks_with_their_defaults() {
    let yaml = r#"
pools:
  - name: docker
    maxUses: 20
    hooks:
      cleanup: {command: [docker, system, prune, -af, --volumes], timeout: 2m}
      health:
        command: [sh, -c, "test $(docker ps -aq | wc -l) -lt 20"]
        maxOutputBytes: 0
  - name: plain
"#;
    let defs = parse_pools(yaml, "pools.yaml").unwrap();
    let h = &defs[0].spec.hooks;
    let c = h.cleanup.as_ref().unwrap();
    assert_eq!(c.command[0], "docker");
    assert_eq!(c.timeout, Dur::secs(120));
    let hc = h.health.as_ref().unwrap();
    assert_eq!(hc.timeout, DEFAULT_HEALTH_TIMEOUT);
    assert_eq!(hc.max_output_bytes, Some(0));
    assert_eq!(h.budget(), Duration::from_secs(180));
    assert!(defs[1].spec.hooks.is_empty());
    // The same spec through serde (the AgentPool path) is equal, and round-trips.
    let json = serde_json::to_value(&defs[0].spec).unwrap();
    assert_eq!(json["hooks"]["cleanup"]["timeout"], "2m");
    let back: PoolSpec = serde_json::from_value(json).unwrap();
    assert_eq!(&back, &defs[0].spec);
    // No hooks: the field is left out of the spec the API shows.
    let json = serde_json::to_value(&defs[1].spec).unwrap();
    assert!(json.get("hooks").is_none(), "{json}");
}

#[test]
fn one_message_per_bad_hook_field() {
    let yaml = r#"
pools:
  - name: p
    hooks:
      cleanup: {command: "docker system prune", timeout: soon, retries: 3}
      health: {timeout: 5s, maxOutputBytes: -1}
      warmup: {command: [true]}
"#;
    let err = parse_pools(yaml, "pools.yaml").unwrap_err().to_string();
    for want in [
        "pools[0].hooks.cleanup.command: invalid type: string",
        "pools[0].hooks.cleanup.timeout: \"soon\" is not a duration",
        "pools[0].hooks.cleanup.retries: unknown field",
        "pools[0].hooks.health.command: missing",
        "pools[0].hooks.health.maxOutputBytes: invalid value",
        "pools[0].hooks.warmup: unknown field",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert_eq!(
        err.matches("\n  - ").count(),
        6,
        "one line per field:\n{err}"
    );

    // Semantic checks once the types are right.
    let yaml = r#"
pools:
  - name: p
    hooks:
      cleanup: {command: [], timeout: 0s}
      health: {command: [""], timeout: 0}
"#;
    let err = parse_pools(yaml, "f").unwrap_err().to_string();
    for want in [
        "pools[0].hooks.cleanup.command: must name a program",
        "pools[0].hooks.cleanup.timeout: must be longer than 0s",
        "pools[0].hooks.health.command: must name a program",
        "pools[0].hooks.health.timeout: must be longer than 0s",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    // The AgentPool path (serde, then validate) names fields the same way.
    let spec: PoolSpec =
        serde_json::from_str(r#"{"hooks":{"health":{"command":[],"timeout":"0s"}}}"#).unwrap();
    assert_eq!(
        spec.validate("spec."),
        [
            "spec.hooks.health.command: must name a program",
            "spec.hooks.health.timeout: must be longer than 0s"
        ]
    );
    assert!(serde_json::from_str::<PoolSpec>(r#"{"hooks":{"health":{"cmd":["x"]}}}"#).is_err());
    // Jenkins agents are Jenkins nodes: warmpool runs nothing on them between builds.
    let yaml = "pools:\n  - name: j\n    jenkins: {url: \"https://jenkins.example.com/\", labels: linux}\n    hooks: {health: {command: [\"true\"]}}\n";
    let err = parse_pools(yaml, "f").unwrap_err().to_string();
    assert!(
        err.contains("pools[0].hooks: a Jenkins pool's agents are Jenkins nodes"),
        "{err}"
    );
    let yaml = "pools:\n  - name: p\n    hooks: [cleanup]\n";
    let err = parse_pools(yaml, "f").unwrap_err().to_string();
    assert!(err.contains("pools[0].hooks: must be a mapping"), "{err}");
}

#[test]
fn wire_shapes() {
    let release = HubMessage::Release {
        lease: "l-1".into(),
        hooks: both(Some(0)),
        quiet: false,
    };
    let j = serde_json::to_string(&release).unwrap();
    assert_eq!(
        j,
        r#"{"type":"release","lease":"l-1","hooks":{"cleanup":{"command":["true"],"timeout":"30s"},"health":{"command":["true"],"timeout":"10s","maxOutputBytes":0}}}"#
    );
    assert_eq!(serde_json::from_str::<HubMessage>(&j).unwrap(), release);
    // Without hooks the message is what it always was, both ways.
    let plain = HubMessage::Release {
        lease: "l-1".into(),
        hooks: Hooks::default(),
        quiet: false,
    };
    let j = serde_json::to_string(&plain).unwrap();
    assert_eq!(j, r#"{"type":"release","lease":"l-1"}"#);
    // A quiet release says so; an agent that does not know the field reads a plain release.
    let quiet = HubMessage::Release {
        lease: "l-1".into(),
        hooks: Hooks::default(),
        quiet: true,
    };
    let j = serde_json::to_string(&quiet).unwrap();
    assert_eq!(j, r#"{"type":"release","lease":"l-1","quiet":true}"#);
    assert_eq!(serde_json::from_str::<HubMessage>(&j).unwrap(), quiet);
    let ready: AgentMessage = serde_json::from_str(
        r#"{"type":"ready","lease":"l-1","hooks":[{"hook":"health","exitCode":3,"durationMs":12,"stdoutBytes":0,"stderrBytes":4,"stderr":"bad\n"}]}"#,
    )
    .unwrap();
    let AgentMessage::Ready { hooks, .. } = &ready else {
        panic!("{ready:?}")
    };
    assert_eq!(hooks[0], {
        let mut r = result(HookKind::Health, 3, "bad\n");
        r.duration_ms = 12;
        r
    });
    let old: AgentMessage = serde_json::from_str(r#"{"type":"ready","lease":"l-1"}"#).unwrap();
    assert!(matches!(old, AgentMessage::Ready { hooks, .. } if hooks.is_empty()));
}

#[test]
fn verdicts() {
    let spec = both(Some(10));
    let ok = [
        result(HookKind::Cleanup, 0, ""),
        result(HookKind::Health, 0, ""),
    ];
    assert_eq!(verdict(&spec, &ok), None);
    assert_eq!(verdict(&Hooks::default(), &[]), None);

    let (kind, why) = verdict(
        &spec,
        &[result(HookKind::Cleanup, 2, "prune: daemon gone\n")],
    )
    .unwrap();
    assert_eq!(kind, HookKind::Cleanup);
    assert_eq!(why, "cleanup hook exit code 2: prune: daemon gone");

    let mut hung = result(HookKind::Health, 0, "");
    hung.exit_code = None;
    hung.signal = Some(9);
    hung.timed_out = true;
    hung.duration_ms = 10_000;
    let (kind, why) = verdict(&spec, &[ok[0].clone(), hung]).unwrap();
    assert_eq!(kind, HookKind::Health);
    assert_eq!(
        why,
        "health hook timed out after 10s; its process group was killed"
    );

    let mut chatty = result(HookKind::Health, 0, "");
    chatty.stdout_bytes = 11;
    chatty.stdout = "c1\nc2\nc3\nc4".into();
    let (_, why) = verdict(&spec, &[ok[0].clone(), chatty.clone()]).unwrap();
    assert_eq!(
        why,
        "health hook printed 11 bytes (maxOutputBytes 10): c1\nc2\nc3\nc4"
    );
    // Without a limit, output alone is no failure.
    assert_eq!(verdict(&both(None), &[ok[0].clone(), chatty]), None);

    // A configured hook without a result (an agent that predates hooks) is not trusted.
    let (kind, why) = verdict(&spec, &ok[..1]).unwrap();
    assert_eq!(
        (kind, why.as_str()),
        (HookKind::Health, "agent reported no health result")
    );
    let mut missing = result(HookKind::Cleanup, 0, "");
    missing.exit_code = None;
    missing.error = Some("docker: No such file or directory (os error 2)".into());
    let (_, why) = verdict(&spec, &[missing]).unwrap();
    assert_eq!(
        why,
        "cleanup hook could not start: docker: No such file or directory (os error 2)"
    );
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// An engine with pool `p` (maxUses 0, minIdle 1) and `hooks`, one agent leased and released:
/// returns the engine, the agent id and the time.
fn released(hooks: Hooks) -> (Engine, String, Instant) {
    let mut e = Engine::new(EngineConfig::default(), "t", Box::new(Unpaced));
    let t0 = Instant::now();
    let spec = PoolSpec {
        labels: vec!["linux".into()],
        min_idle: 1,
        max_total: 3,
        max_uses: 0,
        hooks,
        ..PoolSpec::default()
    };
    e.upsert_pool("p", spec, t0);
    for a in e.take_actions() {
        if let Action::Provision { agent, pool } = a {
            e.agent_started(&agent, t0);
            e.agent_connected(&agent, Some(&pool), Health::default(), t0)
                .unwrap();
        }
    }
    let req = LeaseRequest {
        selector: crate::labels::Expr::parse("linux").unwrap(),
        selector_text: "linux".into(),
        wait: ms(0),
        ttl: ms(60_000),
        holder: "test".into(),
        idempotency_key: None,
    };
    let Ok(LeaseDecision::Granted(l)) = e.request_lease(req, t0) else {
        panic!("granted")
    };
    e.release(&l.id, t0 + ms(1)).unwrap();
    assert_eq!(e.agent(&l.agent).unwrap().state, AgentState::Cleaning);
    e.take_actions();
    (e, l.agent, t0)
}

#[test]
fn engine_recycles_at_ready_when_a_hook_failed_and_reuses_when_they_pass() {
    let (mut e, agent, t0) = released(both(None));
    e.agent_ready_after_hooks(
        &agent,
        Health::default(),
        &[
            result(HookKind::Cleanup, 0, ""),
            result(HookKind::Health, 1, "3 stopped containers\n"),
        ],
        t0 + ms(2),
    );
    let a = e.agent(&agent).unwrap();
    assert_eq!(a.state, AgentState::Terminating);
    let reason = a.terminate_reason.clone().unwrap();
    assert_eq!(reason.as_str(), "health-check-failed");
    assert_eq!(
        reason.to_string(),
        "health-check-failed: health hook exit code 1: 3 stopped containers"
    );
    let acts = e.take_actions();
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Terminate { agent: x, .. } if *x == agent))
    );
    // The replacement comes from the pool's ordinary sizing (and so its rate limit).
    assert!(e.agents().any(|a| a.state == AgentState::Provisioning));
    let s = &e.pool_status()[0];
    assert_eq!(s.hook_failures_total, 1);
    assert_eq!(
        s.last_hook_failure.as_deref(),
        Some(format!("agent {agent}: health hook exit code 1: 3 stopped containers").as_str())
    );

    // Passing hooks: back to idle, and the pool's last failure is cleared.
    let (mut e, agent, t0) = released(both(None));
    e.agent_ready_after_hooks(
        &agent,
        Health::default(),
        &[result(HookKind::Cleanup, 2, "no daemon")],
        t0 + ms(2),
    );
    assert_eq!(
        e.agent(&agent)
            .unwrap()
            .terminate_reason
            .as_ref()
            .unwrap()
            .as_str(),
        "cleanup-failed"
    );
    let next = e
        .agents()
        .find(|a| a.state != AgentState::Terminating)
        .map(|a| a.id.clone());
    e.take_actions();
    // Bring the replacement up, lease and release it, and let it pass.
    let next = next.unwrap_or_else(|| panic!("a replacement exists"));
    e.agent_started(&next, t0 + ms(3));
    e.agent_connected(&next, Some("p"), Health::default(), t0 + ms(3))
        .unwrap();
    let req = LeaseRequest {
        selector: crate::labels::Expr::parse("linux").unwrap(),
        selector_text: "linux".into(),
        wait: ms(0),
        ttl: ms(60_000),
        holder: "test".into(),
        idempotency_key: None,
    };
    let Ok(LeaseDecision::Granted(l)) = e.request_lease(req, t0 + ms(4)) else {
        panic!("granted")
    };
    e.release(&l.id, t0 + ms(5)).unwrap();
    e.agent_ready_after_hooks(
        &l.agent,
        Health::default(),
        &[
            result(HookKind::Cleanup, 0, ""),
            result(HookKind::Health, 0, ""),
        ],
        t0 + ms(6),
    );
    assert_eq!(e.agent(&l.agent).unwrap().state, AgentState::Idle);
    let s = &e.pool_status()[0];
    assert_eq!(
        (s.hook_failures_total, s.last_hook_failure.as_deref()),
        (1, None)
    );
}

#[test]
fn hooks_extend_the_cleanup_deadline_by_their_timeouts() {
    // cleanup_timeout is 120 s by default; the hooks may take 40 s more.
    let (mut e, agent, t0) = released(both(None));
    // Heartbeats keep coming while the hooks run.
    for s in (20..=140).step_by(20) {
        let now = t0 + Duration::from_secs(s);
        e.agent_heartbeat(&agent, Health::default(), now);
        e.tick(now);
    }
    assert_eq!(e.agent(&agent).unwrap().state, AgentState::Cleaning);
    e.agent_heartbeat(&agent, Health::default(), t0 + Duration::from_secs(160));
    e.tick(t0 + Duration::from_secs(161));
    let a = e.agent(&agent).unwrap();
    assert_eq!(a.state, AgentState::Terminating);
    assert_eq!(
        a.terminate_reason.as_ref().unwrap().as_str(),
        "cleanup-timeout"
    );
}
