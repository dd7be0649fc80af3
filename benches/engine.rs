//! The engine's event costs against the size of a pool (issue 15: lease, release and ready must
//! cost O(1) amortised in the pool's size):
//! - one managed pool of N idle agents (N = 100, 1,000, 10,000): a lease granted, released and
//!   the agent ready again (three events), and one heartbeat;
//! - 10,000 idle agents in 100 external pools of 100: the same cycle and heartbeat;
//! - 10,000 idle agents in one pool: a tick with nothing due, and 50 ms of a service's life
//!   (one tick plus the heartbeats 10,000 agents send in 50 ms at one per 15 s).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use warmpool::engine::{Engine, Health, LeaseDecision};

mod common;

/// One lease + release + ready cycle at `t`; returns the number of actions.
fn cycle(e: &mut Engine, req: &warmpool::engine::LeaseRequest, t: Instant) -> usize {
    let Ok(LeaseDecision::Granted(l)) = e.request_lease(req.clone(), t) else {
        panic!("granted")
    };
    e.release(&l.id, t).unwrap();
    e.agent_ready(&l.agent, Health::default(), t);
    e.take_actions().len()
}

fn one_pool(c: &mut Criterion) {
    let req = common::request("linux && tool-0");
    let mut g = c.benchmark_group("one pool");
    for n in [100usize, 1_000, 10_000] {
        let t0 = Instant::now();
        let (mut e, ids) = common::one_pool(n, t0);
        let mut t = t0;
        g.bench_with_input(
            BenchmarkId::new("lease + release + ready (3 events)", n),
            &n,
            |b, _| {
                b.iter(|| {
                    t += Duration::from_micros(1);
                    cycle(&mut e, &req, t)
                })
            },
        );
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("heartbeat", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % ids.len();
                e.agent_heartbeat(black_box(&ids[i]), Health::default(), t)
            })
        });
    }
    g.finish();

    let t0 = Instant::now();
    let (mut e, ids) = common::one_pool(10_000, t0);
    c.bench_function("tick (10k agents in one pool)", |b| {
        b.iter(|| {
            e.tick(t0);
            e.take_actions().len()
        })
    });
    // 50 ms of a service with 10,000 idle agents: one tick (every 50 ms) and the heartbeats of
    // 50 ms (10,000 agents, one each per 15 s: 33 per tick). Time runs on, so every agent's
    // heartbeat deadline comes up and is pushed back once per heartbeat timeout.
    let per_tick = ids.len() * 50 / 15_000;
    let mut t = t0;
    let mut i = 0usize;
    c.bench_function("50 ms of service: tick + 33 heartbeats (10k agents)", |b| {
        b.iter(|| {
            t += Duration::from_millis(50);
            for _ in 0..per_tick {
                i = (i + 1) % ids.len();
                e.agent_heartbeat(&ids[i], Health::default(), t);
            }
            e.tick(t);
            assert!(e.take_actions().is_empty(), "an agent was lost");
        })
    });
}

fn external_pools(c: &mut Criterion) {
    let t0 = Instant::now();
    let mut e = common::engine_10k(t0);
    let req = common::request("linux && tool-7");
    let mut t = t0;
    c.bench_function("lease + release + ready (3 events, 10k agents)", |b| {
        b.iter(|| {
            t += Duration::from_micros(1);
            cycle(&mut e, &req, t)
        })
    });
    let ids: Vec<String> = (0..common::PER_SET).map(|i| format!("a-7-{i}")).collect();
    let mut i = 0usize;
    c.bench_function("heartbeat (10k agents)", |b| {
        b.iter(|| {
            i = (i + 1) % ids.len();
            e.agent_heartbeat(black_box(&ids[i]), Health::default(), t)
        })
    });
    c.bench_function("tick (10k agents)", |b| {
        b.iter(|| {
            e.tick(t);
            e.take_actions().len()
        })
    });
}

criterion_group!(benches, one_pool, external_pools);
criterion_main!(benches);
