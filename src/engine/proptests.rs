//! Property tests of the engine: random event sequences against the invariants (no agent in
//! two leases, maxTotal never exceeded, every request and lease ends with an outcome and a
//! reason, FIFO among requests with the same selector), and the per-pool counters and indexes
//! against a from-scratch recount after every step (the drift a missed update would cause).

use std::collections::HashMap;
use std::time::Instant;

use proptest::prelude::*;

use super::tests::{engine, ms, req, spec};
use super::*;

#[derive(Debug, Clone)]
enum Op {
    Request {
        sel: usize,
        wait: u64,
        ttl: u64,
    },
    Cancel(usize),
    Release(usize),
    /// An exec is sent for a lease (its release then cleans up instead of being quiet).
    Exec(usize),
    Renew(usize),
    Start(usize),
    Connect(usize),
    FailProvision(usize),
    Heartbeat {
        agent: usize,
        sick: bool,
    },
    Ready(usize),
    Disconnect(usize),
    Exit(usize),
    Advance(u64),
    Retire(usize),
    /// Pool a's spec changes (maxAge and connectTimeout shorter or back).
    Respec(bool),
}

const SELECTORS: [&str; 7] = [
    "linux",
    "go",
    "rust",
    "linux && go",
    "windows",
    "!go",
    "policy",
];

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SELECTORS.len(), 0u64..400, 50u64..800)
            .prop_map(|(sel, wait, ttl)| Op::Request { sel, wait, ttl }),
        1 => any::<usize>().prop_map(Op::Cancel),
        3 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Exec),
        1 => any::<usize>().prop_map(Op::Renew),
        3 => any::<usize>().prop_map(Op::Start),
        3 => any::<usize>().prop_map(Op::Connect),
        1 => any::<usize>().prop_map(Op::FailProvision),
        1 => (any::<usize>(), prop::bool::weighted(0.2))
            .prop_map(|(agent, sick)| Op::Heartbeat { agent, sick }),
        3 => any::<usize>().prop_map(Op::Ready),
        1 => any::<usize>().prop_map(Op::Disconnect),
        3 => any::<usize>().prop_map(Op::Exit),
        3 => (1u64..300).prop_map(Op::Advance),
        1 => any::<usize>().prop_map(Op::Retire),
        1 => any::<bool>().prop_map(Op::Respec),
    ]
}

/// Pool c: every policy at once, on a time scale the random runs reach.
fn policy_spec() -> crate::spec::PoolSpec {
    let mut s = spec(&["linux", "policy"], 1, 4, 1);
    s.warm_hit_target = Some(0.9);
    s.scale_to_zero_after = Some(crate::spec::Dur(ms(1000)));
    s.schedules = vec![
        crate::spec::Schedule {
            cron: "0 9 * * *".into(),
            duration: crate::spec::Dur::secs(1),
            time_zone: "UTC".into(),
            min_idle: 2,
            max_total: Some(2),
        },
        crate::spec::Schedule {
            cron: "* * * * *".into(),
            duration: crate::spec::Dur::secs(2),
            time_zone: "UTC".into(),
            min_idle: 1,
            max_total: None,
        },
    ];
    s
}

fn pick<T: Clone>(v: &[T], i: usize) -> Option<T> {
    (!v.is_empty()).then(|| v[i % v.len()].clone())
}

#[derive(Default)]
struct Model {
    /// Arrival index of each request, by engine request id.
    queued: HashMap<RequestId, (usize, usize)>,
    /// Outcomes per arrival index: true = granted.
    outcomes: HashMap<usize, bool>,
    /// Grant order per selector (arrival indexes).
    grants: HashMap<usize, Vec<usize>>,
    leases: Vec<LeaseId>,
}

impl Model {
    fn absorb(&mut self, e: &Engine, acts: Vec<Action>) -> Result<(), TestCaseError> {
        for a in acts {
            match a {
                Action::Granted { request, lease } => {
                    let (arrival, sel) = self.queued.remove(&request).expect("known request");
                    prop_assert!(self.outcomes.insert(arrival, true).is_none());
                    self.grants.entry(sel).or_default().push(arrival);
                    self.leases.push(lease.id);
                }
                Action::WaitFailed { request, .. } => {
                    let (arrival, _) = self.queued.remove(&request).expect("known request");
                    prop_assert!(self.outcomes.insert(arrival, false).is_none());
                }
                Action::Provision { pool, .. } => {
                    let s = e
                        .pool_status()
                        .into_iter()
                        .find(|p| p.name == pool)
                        .unwrap();
                    prop_assert!(
                        s.total <= s.max_total,
                        "{} has {} > {}",
                        pool,
                        s.total,
                        s.max_total
                    );
                    // Nor above the cap in effect (an open window's maxTotal).
                    let cap = e.decision(&pool).unwrap().cap;
                    prop_assert!(s.total <= cap, "{} has {} > cap {}", pool, s.total, cap);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn engine_invariants_hold(ops in prop::collection::vec(arb_op(), 1..120)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut e = engine();
        // Pool c's windows: 09:00:00 for 1 s (minIdle 2, maxTotal 2) and every minute for 2 s
        // (minIdle 1); the run starts at 08:59:59.5 UTC (runs span a few seconds).
        let wall0 = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_796_115_599_500);
        e.set_wall_clock(t0, wall0);
        e.upsert_pool("a", spec(&["linux", "go"], 1, 3, 0), now);
        e.upsert_pool("b", spec(&["linux", "rust"], 0, 2, 2), now);
        e.upsert_pool("c", policy_spec(), now);
        let windows: Vec<crate::spec::Window> =
            policy_spec().schedules.iter().map(|w| w.compile().unwrap()).collect();
        let quiet = policy_spec().scale_to_zero_after.unwrap().0;
        // The last request pool c could count (any selector matching it), and the last it must
        // count (one only it matches); its creation before any.
        let mut last_any = t0;
        let mut last_own = t0;
        let mut m = Model::default();
        let mut arrivals = 0usize;
        let acts = e.take_actions();
        m.absorb(&e, acts)?;
        for op in ops {
            let by_state = |e: &Engine, s: AgentState| -> Vec<AgentId> {
                let mut v: Vec<_> = e.agents().filter(|a| a.state == s).map(|a| a.id.clone()).collect();
                v.sort();
                v
            };
            let live = |e: &Engine| -> Vec<AgentId> {
                let mut v: Vec<_> = e.agents()
                    .filter(|a| matches!(a.state, AgentState::Idle | AgentState::Leased | AgentState::Cleaning))
                    .map(|a| a.id.clone()).collect();
                v.sort();
                v
            };
            match op {
                Op::Request { sel, wait, ttl } => {
                    if ["linux", "!go", "policy"].contains(&SELECTORS[sel]) {
                        last_any = now;
                    }
                    if SELECTORS[sel] == "policy" {
                        last_own = now;
                    }
                    let arrival = arrivals;
                    arrivals += 1;
                    match e.request_lease(req(SELECTORS[sel], wait, ttl), now) {
                        Ok(LeaseDecision::Granted(l)) => {
                            m.outcomes.insert(arrival, true);
                            m.grants.entry(sel).or_default().push(arrival);
                            m.leases.push(l.id);
                        }
                        Ok(LeaseDecision::Queued(id)) => { m.queued.insert(id, (arrival, sel)); }
                        Ok(LeaseDecision::Existing(_)) => prop_assert!(false, "no keys used"),
                        Err(LeaseError::Unsatisfiable { .. }) => {
                            prop_assert_eq!(SELECTORS[sel], "windows");
                            m.outcomes.insert(arrival, false);
                        }
                        Err(_) => { m.outcomes.insert(arrival, false); }
                    }
                }
                Op::Cancel(i) => {
                    let mut ids: Vec<_> = m.queued.keys().copied().collect();
                    ids.sort();
                    if let Some(id) = pick(&ids, i) && e.cancel_request(id, now) {
                        let (arrival, _) = m.queued.remove(&id).unwrap();
                        m.outcomes.insert(arrival, false);
                    }
                }
                Op::Release(i) => {
                    if let Some(l) = pick(&m.leases, i) { let _ = e.release(&l, now); }
                }
                Op::Exec(i) => {
                    if let Some(l) = pick(&m.leases, i) { let _ = e.exec_starting(&l); }
                }
                Op::Renew(i) => {
                    if let Some(l) = pick(&m.leases, i) { let _ = e.renew(&l, None, now); }
                }
                Op::Start(i) => {
                    if let Some(a) = pick(&by_state(&e, AgentState::Provisioning), i) { e.agent_started(&a, now); }
                }
                Op::Connect(i) => {
                    if let Some(a) = pick(&by_state(&e, AgentState::Connecting), i) {
                        // Half the agents take quiet releases (Idle at once after a lease in
                        // which nothing ran).
                        e.set_quiet_release(&a, i % 2 == 0);
                        e.agent_connected(&a, None, Health::default(), now).unwrap();
                    }
                }
                Op::FailProvision(i) => {
                    if let Some(a) = pick(&by_state(&e, AgentState::Provisioning), i) {
                        e.provision_failed(&a, "boom", now);
                    }
                }
                Op::Heartbeat { agent, sick } => {
                    if let Some(a) = pick(&live(&e), agent) {
                        let h = Health { workspace_bytes: 0, leftover_processes: sick as u32 };
                        e.agent_heartbeat(&a, h, now);
                    }
                }
                Op::Ready(i) => {
                    if let Some(a) = pick(&by_state(&e, AgentState::Cleaning), i) {
                        e.agent_ready(&a, Health::default(), now);
                    }
                }
                Op::Disconnect(i) => {
                    if let Some(a) = pick(&live(&e), i) { e.agent_disconnected(&a, "socket closed", now); }
                }
                Op::Exit(i) => {
                    if let Some(a) = pick(&by_state(&e, AgentState::Terminating), i) { e.agent_exited(&a, "reaped", now); }
                }
                Op::Advance(d) => {
                    now += ms(d);
                    e.tick(now);
                    // Every pool was sized at `now`: pool c's decision honours its floors.
                    let d = e.decision("c").unwrap();
                    let wall = e.wall_at(now).unwrap();
                    let open: Vec<_> = windows.iter().filter(|w| w.open_until(wall).is_some()).collect();
                    let floor = open.iter().map(|w| w.min_idle).max();
                    let cap = open.iter().filter_map(|w| w.max_total).max().unwrap_or(4);
                    prop_assert_eq!(d.cap, cap);
                    prop_assert!(d.desired_idle <= d.cap, "{:?}", d);
                    if let Some(f) = floor {
                        prop_assert!(d.desired_idle >= f.min(cap), "floor {} cap {}: {:?}", f, cap, d);
                    }
                    // Scale to zero only after the quiet time (and never below an open window).
                    if d.source == IdleSource::ScaleToZero {
                        prop_assert!(now.duration_since(last_own) >= quiet, "asleep after {:?}", now.duration_since(last_own));
                        prop_assert!(floor.is_none());
                    }
                    if floor.is_none() && now.duration_since(last_any) >= quiet {
                        prop_assert_eq!(d.source, IdleSource::ScaleToZero, "{:?}", d);
                        prop_assert_eq!(d.desired_idle, 0);
                    }
                }
                Op::Retire(i) => {
                    let mut all: Vec<AgentId> = e.agents().map(|a| a.id.clone()).collect();
                    all.sort();
                    if let Some(a) = pick(&all, i) { e.retire(&a, now); }
                }
                Op::Respec(short) => {
                    let mut s = spec(&["linux", "go"], 1, 3, 0);
                    if short {
                        s.max_age = crate::spec::Dur(ms(700));
                        s.connect_timeout = crate::spec::Dur(ms(200));
                    }
                    e.upsert_pool("a", s, now);
                }
            }
            let acts = e.take_actions();
            m.absorb(&e, acts)?;
            if let Err(msg) = e.check_invariants() { prop_assert!(false, "{}", msg); }
            // The counters sizing reads equal a recount from scratch at this instant.
            if let Err(msg) = e.check_counters(now) { prop_assert!(false, "{}", msg); }
            for s in e.pool_status() {
                prop_assert!(s.total <= s.max_total, "{} total {} > max {}", s.name, s.total, s.max_total);
            }
        }
        // Drain: stop leasing, end everything; every request and lease must have an outcome.
        e.begin_shutdown(now);
        e.terminate_all(now);
        let acts = e.take_actions();
        m.absorb(&e, acts)?;
        prop_assert!(m.queued.is_empty(), "requests left without an outcome: {:?}", m.queued);
        prop_assert_eq!(m.outcomes.len(), arrivals);
        for id in &m.leases {
            if let Some(l) = e.lease(id) {
                prop_assert!(l.state != LeaseState::Active, "lease {} still active", id);
                prop_assert!(l.end_reason.is_some(), "lease {} ended without a reason", id);
            }
        }
        // FIFO: among requests with the same selector, grants follow arrival order.
        for (sel, order) in &m.grants {
            let mut sorted = order.clone();
            sorted.sort();
            prop_assert_eq!(order, &sorted, "selector {}", SELECTORS[*sel]);
        }
    }
}
