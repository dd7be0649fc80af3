// Shared setup of the criterion benches: an engine holding 10,000 idle agents in 100 label
// sets (100 external pools of 100 agents).

use std::time::{Duration, Instant};

use warmpool::engine::{Engine, EngineConfig, Health, LeaseRequest, Unpaced};
use warmpool::labels::Expr;
use warmpool::spec::PoolSpec;

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
