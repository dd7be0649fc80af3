//! The event-driven replay of one trace through the real [`Engine`] for one policy (a set of
//! pools): a virtual clock, a binary heap of timed events, and a simulated provisioner.
//!
//! The engine is fed exactly as the live service feeds it (`service.rs`, `hub/`): a lease
//! request per trace line ([`Engine::request_lease`]; granted at once = warm), each
//! `Provision` completes after a latency drawn uniformly in `provision` and the agent then
//! starts and registers ([`Engine::agent_started`] + [`Engine::agent_connected`]), a job ends
//! with [`Engine::release`], a `Release` (reuse) becomes [`Engine::agent_ready`] after the
//! simulated `cleanup`, a `Terminate` becomes [`Engine::agent_exited`] after `terminate` (the
//! agent or pod still counts toward `maxTotal` meanwhile), and [`Engine::tick`] runs every
//! `tick` of virtual time. Heartbeats are not simulated (the heartbeat timeout is set beyond
//! any trace), nor are provisioning failures.
//!
//! The replay starts a lead-in (`provision` MAX + 1 s) before the trace, so the pools' first
//! agents are idle at its start; the engine's wall clock is set so that the trace's start is
//! `start` (schedules and the time-of-week model read it). Nothing is counted in the lead-in.
//!
//! Must not: sleep, do I/O, or read the real clock except to report its own wall time.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtOrd};
use std::time::{Duration, Instant, SystemTime};

use crate::engine::{
    Action, AgentState, Engine, EngineConfig, Health, LeaseDecision, LeaseRequest, Observation,
    Pacer, Reason,
};
use crate::spec::{PoolDef, PoolSpec};

use super::generate::Rng;
use super::report::{PolicyResult, Recorder};
use super::trace::Trace;

/// Settings of a replay.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Provision latency, drawn uniformly in [min, max].
    pub provision: (Duration, Duration),
    /// From a release to the agent reporting ready (reused agents only).
    pub cleanup: Duration,
    /// From a terminate to the agent being gone.
    pub terminate: Duration,
    /// Virtual time between engine ticks.
    pub tick: Duration,
    /// Seed of the provision latencies.
    pub seed: u64,
    /// Wall time of the trace's start.
    pub start: SystemTime,
    /// Leases arriving before this are not counted, nor idle time before it.
    pub warmup: Duration,
    /// How long a request may wait for an agent.
    pub wait: Duration,
    /// A daily window (seconds of the day, UTC, from..to; may wrap midnight) whose idle
    /// agent-hours are reported apart.
    pub quiet: Option<(u32, u32)>,
}

/// One policy: a set of pools, replayed together.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Its name in the report.
    pub name: String,
    /// Its pools.
    pub pools: Vec<PoolDef>,
}

/// A token bucket per pool on the virtual clock (`provisioning.perSecond`, `burst`).
struct SimPacer {
    now: Arc<AtomicU64>,
    buckets: HashMap<String, (f64, f64, f64, u64)>,
}

impl Pacer for SimPacer {
    fn configure(&mut self, pool: &str, spec: &PoolSpec) {
        let p = &spec.provisioning;
        let burst = f64::from(p.burst.max(1));
        let now = self.now.load(AtOrd::Relaxed);
        self.buckets
            .insert(pool.to_string(), (p.per_second, burst, burst, now));
    }

    fn try_acquire(&mut self, pool: &str) -> bool {
        let now = self.now.load(AtOrd::Relaxed);
        let Some((rate, burst, tokens, at)) = self.buckets.get_mut(pool) else {
            return true;
        };
        let dt = now.saturating_sub(*at) as f64 / 1e9;
        *tokens = (*tokens + dt * *rate).min(*burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
enum Ev {
    Provisioned(String, String),
    JobEnd(String),
    Cleaned(String),
    Gone(String),
}

struct Item {
    at: Duration,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    // Reversed: the heap pops the earliest (then the first scheduled).
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    trace: &'a Trace,
    engine: Engine,
    clock: Arc<AtomicU64>,
    t0: Instant,
    now: Duration,
    heap: BinaryHeap<Item>,
    seq: u64,
    rng: Rng,
    /// Waiting request -> trace index.
    pending: HashMap<u64, usize>,
    /// Leases granted and not ended.
    active: usize,
    /// Virtual time of the trace's start (the lead-in before it warms the pools).
    offset: Duration,
    rec: Recorder,
}

/// The engine settings of a replay: heartbeats are not simulated, the queue is unbounded.
fn engine_config() -> EngineConfig {
    EngineConfig {
        heartbeat_timeout: Duration::from_secs(10 * 365 * 86_400),
        max_waiters: usize::MAX / 2,
        lease_history: 16,
        agent_scan_interval: Duration::ZERO,
        ..EngineConfig::default()
    }
}

impl Sim<'_> {
    fn push(&mut self, after: Duration, ev: Ev) {
        self.seq += 1;
        self.heap.push(Item {
            at: self.now + after,
            seq: self.seq,
            ev,
        });
    }

    fn instant(&self) -> Instant {
        self.t0 + self.now
    }

    fn set_now(&mut self, t: Duration) {
        if t > self.now {
            if t > self.offset {
                let (idle, total) = self.counts();
                let from = self.now.saturating_sub(self.offset);
                self.rec.interval(from, t - self.offset, idle, total);
            }
            self.now = t;
        }
        self.clock.store(self.now.as_nanos() as u64, AtOrd::Relaxed);
    }

    fn counts(&self) -> (u32, u32) {
        let mut idle = 0;
        let mut total = 0;
        for ((_, s), n) in self.engine.counts() {
            total += n;
            if s == AgentState::Idle {
                idle += n;
            }
        }
        (idle, total)
    }

    fn measured(&self) -> bool {
        self.now >= self.offset + self.cfg.warmup
    }

    fn actions(&mut self) {
        for a in self.engine.take_actions() {
            match a {
                Action::Provision { pool, agent } => {
                    if self.measured() {
                        self.rec.provisions += 1;
                    }
                    let (lo, hi) = self.cfg.provision;
                    let d = lo + (hi.saturating_sub(lo)).mul_f64(self.rng.unit());
                    self.push(d, Ev::Provisioned(agent, pool));
                }
                Action::Terminate { agent, reason, .. } => match reason {
                    // Gone already, or stopped by the backend that reported it.
                    Reason::Exited(_) | Reason::ProvisionFailed(_) | Reason::StartFailed(_) => {}
                    _ => self.push(self.cfg.terminate, Ev::Gone(agent)),
                },
                Action::Granted { request, lease } => {
                    if let Some(i) = self.pending.remove(&request) {
                        let l = &self.trace.leases[i];
                        let wait = self.now.saturating_sub(self.offset + l.at);
                        if l.at >= self.cfg.warmup {
                            self.rec.lease(false, Some(wait));
                        }
                        self.active += 1;
                        self.push(l.duration, Ev::JobEnd(lease.id));
                    }
                }
                Action::WaitFailed { request, .. } => {
                    if let Some(i) = self.pending.remove(&request)
                        && self.trace.leases[i].at >= self.cfg.warmup
                    {
                        self.rec.lease(false, None);
                    }
                }
                Action::Release { agent, .. } => self.push(self.cfg.cleanup, Ev::Cleaned(agent)),
                Action::Observe(Observation::Leased { warm: true, .. }) => {
                    self.rec.engine_warm += 1;
                }
                Action::Bound { .. }
                | Action::Drain { .. }
                | Action::LeaseEnded { .. }
                | Action::Observe(_) => {}
            }
        }
    }

    fn arrive(&mut self, i: usize, selectors: &HashMap<String, crate::labels::Expr>) {
        let l = &self.trace.leases[i];
        let req = LeaseRequest {
            selector: selectors[&l.selector].clone(),
            selector_text: l.selector.clone(),
            wait: self.cfg.wait,
            ttl: l.duration + Duration::from_secs(86_400),
            holder: "warmpool simulate".into(),
            idempotency_key: None,
        };
        let measured = l.at >= self.cfg.warmup;
        let duration = l.duration;
        let now = self.instant();
        match self.engine.request_lease(req, now) {
            Ok(LeaseDecision::Granted(lease)) => {
                if measured {
                    self.rec.lease(true, Some(Duration::ZERO));
                }
                self.active += 1;
                self.push(duration, Ev::JobEnd(lease.id));
            }
            Ok(LeaseDecision::Queued(id)) => {
                self.pending.insert(id, i);
            }
            Ok(LeaseDecision::Existing(_)) => {}
            Err(_) => {
                if measured {
                    self.rec.lease(false, None);
                }
            }
        }
    }

    fn handle(&mut self, ev: Ev) {
        let now = self.instant();
        match ev {
            Ev::Provisioned(agent, pool) => {
                self.engine.agent_started(&agent, now);
                // Refused when it was terminated meanwhile: its Gone event removes it.
                let _ = self
                    .engine
                    .agent_connected(&agent, Some(&pool), Health::default(), now);
            }
            Ev::JobEnd(lease) => {
                self.active -= 1;
                let _ = self.engine.release(&lease, now);
            }
            Ev::Cleaned(agent) => self.engine.agent_ready(&agent, Health::default(), now),
            Ev::Gone(agent) => self
                .engine
                .agent_exited(&agent, "terminated (simulated)", now),
        }
    }
}

/// Replays `trace` through a fresh engine holding `policy`'s pools.
pub fn run(trace: &Trace, policy: &Policy, cfg: &SimConfig) -> PolicyResult {
    let started = Instant::now();
    let clock = Arc::new(AtomicU64::new(0));
    let pacer = SimPacer {
        now: clock.clone(),
        buckets: HashMap::new(),
    };
    let t0 = Instant::now();
    let mut engine = Engine::new(engine_config(), "sim", Box::new(pacer));
    // The replay starts a lead-in before the trace, so the pools' first agents (minIdle, an
    // open schedule window) are provisioned with the simulated latency and idle at its start.
    let offset = cfg.provision.1 + Duration::from_secs(1);
    engine.set_wall_clock(t0 + offset, cfg.start);
    let selectors: HashMap<String, crate::labels::Expr> = trace
        .selectors()
        .into_iter()
        .map(|s| {
            let e = crate::labels::Expr::parse(&s).expect("trace selectors were parsed");
            (s, e)
        })
        .collect();
    let end = trace.end();
    let mut sim = Sim {
        cfg,
        trace,
        engine,
        clock,
        t0,
        now: Duration::ZERO,
        heap: BinaryHeap::new(),
        seq: 0,
        rng: Rng::new(cfg.seed),
        pending: HashMap::new(),
        active: 0,
        offset,
        rec: Recorder::new(cfg, end),
    };
    for def in &policy.pools {
        sim.engine
            .upsert_pool(&def.name, def.spec.clone(), sim.instant());
    }
    sim.actions();
    let mut next_arrival = 0usize;
    let mut next_tick = cfg.tick;
    loop {
        let arrivals_left = next_arrival < trace.leases.len();
        if !arrivals_left && sim.active == 0 && sim.pending.is_empty() {
            break;
        }
        // Completions first, then arrivals, then the tick, at one instant.
        let heap_at = sim.heap.peek().map(|i| i.at);
        let arrival_at = arrivals_left.then(|| offset + trace.leases[next_arrival].at);
        let t = [heap_at, arrival_at, Some(next_tick)]
            .into_iter()
            .flatten()
            .min()
            .expect("the tick is always due");
        sim.set_now(t);
        if heap_at == Some(t) {
            let item = sim.heap.pop().expect("peeked");
            sim.handle(item.ev);
        } else if arrival_at == Some(t) {
            sim.arrive(next_arrival, &selectors);
            next_arrival += 1;
        } else {
            let now = sim.instant();
            sim.engine.tick(now);
            next_tick = t + cfg.tick;
        }
        sim.actions();
    }
    let end = sim.now.saturating_sub(offset);
    sim.rec.finish(&policy.name, end, started.elapsed())
}
