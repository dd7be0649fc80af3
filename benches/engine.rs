//! The engine's event throughput with 10,000 agents in 100 pools: a lease granted, released and
//! the agent ready again (three events), a heartbeat, and a tick (deadline scan of every agent).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use warmpool::engine::{Health, LeaseDecision};

mod common;

fn engine(c: &mut Criterion) {
    let t0 = Instant::now();
    let mut e = common::engine_10k(t0);
    let req = common::request("linux && tool-7");
    let mut t = t0;
    c.bench_function("lease + release + ready (3 events, 10k agents)", |b| {
        b.iter(|| {
            t += Duration::from_micros(10);
            let Ok(LeaseDecision::Granted(l)) = e.request_lease(req.clone(), t) else {
                panic!("granted")
            };
            e.release(&l.id, t).unwrap();
            e.agent_ready(&l.agent, Health::default(), t);
            e.take_actions().len()
        })
    });
    let mut i = 0usize;
    c.bench_function("heartbeat (10k agents)", |b| {
        b.iter(|| {
            i = (i + 1) % common::PER_SET;
            e.agent_heartbeat(black_box(&format!("a-7-{i}")), Health::default(), t)
        })
    });
    c.bench_function("tick (10k agents)", |b| {
        b.iter(|| {
            e.tick(t);
            e.take_actions().len()
        })
    });
}

criterion_group!(benches, engine);
criterion_main!(benches);
