// Shared setup of the criterion benches: an engine holding 10,000 idle agents in 100 label
// sets (100 external pools of 100 agents), and an engine with one managed pool of N idle agents.

use std::time::{Duration, Instant};

use warmpool::engine::{Action, Engine, EngineConfig, Health, LeaseRequest, Unpaced};
use warmpool::labels::Expr;
use warmpool::spec::{Dur, PoolSpec};

pub const SETS: usize = 100;
pub const PER_SET: usize = 100;

pub fn labels_of(set: usize) -> Vec<String> {
    vec![
        "linux".into(),
        format!("team-{}", set % 10),
        format!("tool-{set}"),
        if set.is_multiple_of(2) {
            "amd64".into()
        } else {
            "arm64".into()
        },
    ]
}

pub fn engine_10k(now: Instant) -> Engine {
    let mut e = Engine::new(EngineConfig::default(), "bench", Box::new(Unpaced));
    for s in 0..SETS {
        let spec = PoolSpec {
            labels: labels_of(s),
            min_idle: 0,
            max_total: PER_SET as u32,
            max_uses: 0,
            external: true,
            ..PoolSpec::default()
        };
        let name = format!("set-{s}");
        e.upsert_pool(&name, spec, now);
        for i in 0..PER_SET {
            e.agent_joined(
                &format!("a-{s}-{i}"),
                &name,
                Health::default(),
                None,
                0,
                now,
            )
            .expect("joins");
        }
    }
    e
}

/// One managed pool (labels of set 0) of `n` idle agents: minIdle = maxTotal = n, maxUses 0,
/// maxAge and idleTtl far beyond any bench. Returns the engine and the agents' ids.
#[allow(dead_code)]
pub fn one_pool(n: usize, now: Instant) -> (Engine, Vec<String>) {
    let mut e = Engine::new(EngineConfig::default(), "bench", Box::new(Unpaced));
    let spec = PoolSpec {
        labels: labels_of(0),
        min_idle: n as u32,
        max_total: n as u32,
        max_uses: 0,
        idle_ttl: Dur::secs(10 * 365 * 24 * 3600),
        max_age: Dur::secs(10 * 365 * 24 * 3600),
        provisioning: warmpool::spec::Provisioning {
            max_concurrent: n as u32,
            ..Default::default()
        },
        ..PoolSpec::default()
    };
    e.upsert_pool("one", spec, now);
    let mut ids = Vec::new();
    for a in e.take_actions() {
        if let Action::Provision { agent, .. } = a {
            e.agent_started(&agent, now);
            e.agent_connected(&agent, Some("one"), Health::default(), now)
                .expect("registers");
            ids.push(agent);
        }
    }
    assert_eq!(ids.len(), n, "all provisioned at once");
    e.take_actions();
    (e, ids)
}

pub fn request(selector: &str) -> LeaseRequest {
    LeaseRequest {
        selector: Expr::parse(selector).expect("valid"),
        selector_text: selector.to_string(),
        wait: Duration::ZERO,
        ttl: Duration::from_secs(60),
        holder: "bench".into(),
        idempotency_key: None,
    }
}
