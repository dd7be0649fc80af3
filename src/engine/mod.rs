//! The pool engine: a pure, synchronous state machine with time passed in.
//!
//! Owns agent states, leases, the FIFO wait queue, recycling decisions and pool sizing. Callers
//! feed it events (`request_lease`, `agent_connected`, `tick`, ...) with the current `Instant`;
//! it records [`Action`]s (provision, terminate, grant, release) that the async shell executes and
//! collects with [`Engine::take_actions`]. It never does I/O, never sleeps and never blocks.
//!
//! Sizing is level-triggered: [`Engine::reconcile`] compares desired with actual for the pools
//! an event touched (every pool on a tick), so a lost event is repaired on the next pass. It
//! reads per-pool counters kept in step by `index.rs`, so an event costs O(1) amortised in the
//! pool's size. The only external input to sizing is the [`Pacer`] (the provisioning rate
//! limiter).
//!
//! Layout: this file holds the state and the pool and lease events; `agents.rs` the agent
//! events (started, registered, heartbeats, ready, gone, adoption, termination); `index.rs`
//! the per-pool indexes and counters; `deadlines.rs` the agent deadline heap and the lease
//! expiry index; `reconcile.rs` the tick, waiter assignment and sizing; `policy.rs` the sizing
//! policy (schedules, forecast headroom, scale-to-zero, warm hits, idle cost) and the wall
//! clock; `forecast.rs` what it learns (arrival rate, refill time); `status.rs` read-only
//! views, invariants and shutdown; `types.rs` the value types; `tests.rs` scenarios and
//! `proptests.rs` the property tests, `quiet_release_tests.rs` the release without cleanup.

mod agents;
mod deadlines;
mod external;
mod forecast;
mod index;
mod policy;
mod reconcile;
mod status;
mod types;

#[cfg(test)]
mod external_tests;
#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod quiet_release_tests;
#[cfg(test)]
mod sizing_tests;
#[cfg(test)]
mod takeover_tests;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use forecast::headroom;
pub use policy::{Decision, IdleSource};
pub use types::*;

use crate::spec::PoolSpec;

/// Decides whether one more agent may be provisioned for a pool now (the rate limiter).
pub trait Pacer: Send {
    /// Called when a pool is added or its spec changes.
    fn configure(&mut self, pool: &str, spec: &PoolSpec);
    /// Takes one provisioning token for `pool`; false when throttled.
    fn try_acquire(&mut self, pool: &str) -> bool;
}

/// A pacer that never throttles (tests, benches).
#[derive(Debug, Default)]
pub struct Unpaced;

impl Pacer for Unpaced {
    fn configure(&mut self, _: &str, _: &PoolSpec) {}
    fn try_acquire(&mut self, _: &str) -> bool {
        true
    }
}

/// TTL of a lease restored from an agent's `hello` until its holder renews it.
pub const RESTORED_LEASE_TTL: Duration = Duration::from_secs(300);

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// An agent silent for this long is considered lost.
    pub heartbeat_timeout: Duration,
    /// An agent that has not reported ready this long after a release is terminated.
    pub cleanup_timeout: Duration,
    /// Maximum requests waiting at once.
    pub max_waiters: usize,
    /// Ended leases remembered for `GET /v1/leases/{id}`.
    pub lease_history: usize,
    /// Agent deadlines (connect, heartbeat, cleanup) are checked by a tick at most this often
    /// (zero: every tick). Waiters and leases are checked on every tick. The check visits only
    /// the agents whose deadline can be due (`deadlines.rs`).
    pub agent_scan_interval: Duration,
    /// How long an adopted agent (a pod left by a previous instance) may take to reconnect
    /// before it is treated as a leak, when this is longer than its pool's `connectTimeout`.
    /// Its agent is reconnecting after a restart or a crash takeover, not starting.
    pub adopt_grace: Duration,
    /// The cleaning grace: for this long after an agent begins cleaning after a lease (it will
    /// be reused: uses left, not retired), it counts toward its pool's supply like an agent
    /// being provisioned, so a request or the `minIdle` headroom it will cover within
    /// milliseconds provisions nothing. Past it, sizing provisions as if it were not there.
    pub cleaning_grace: Duration,
}

/// Default [`EngineConfig::cleaning_grace`]: far above an agent's cleanup without hooks (1-4 ms
/// for a process agent), short enough that a slow cleanup delays a provision only a little.
pub const CLEANING_GRACE: Duration = Duration::from_millis(250);

/// Default [`EngineConfig::adopt_grace`]: well above the agent's longest reconnect pause (10 s
/// by default, `warmpool agent --max-backoff`) plus a leader takeover (15 s lease by default).
pub const ADOPT_GRACE: Duration = Duration::from_secs(60);

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            heartbeat_timeout: Duration::from_secs(30),
            cleanup_timeout: Duration::from_secs(120),
            max_waiters: 1024,
            lease_history: 4096,
            agent_scan_interval: Duration::ZERO,
            adopt_grace: ADOPT_GRACE,
            cleaning_grace: CLEANING_GRACE,
        }
    }
}

#[derive(Debug)]
struct Pool {
    /// Shared, so sizing holds it without cloning it per event.
    spec: Arc<PoolSpec>,
    labels: std::collections::BTreeSet<String>,
    removed: bool,
    throttled: bool,
    throttled_total: u64,
    leaks_total: u64,
    provision_failures_total: u64,
    last_error: Option<String>,
    /// Agents recycled for a failed hook.
    hook_failures_total: u64,
    /// The last hook failure, cleared when an agent passes its hooks.
    last_hook_failure: Option<String>,
    /// Provisioning failures in a row: the backend could not start an agent, or an agent ended
    /// or timed out before it registered (reset when an agent of the pool registers).
    failures_in_a_row: u32,
    /// No provisioning before this (exponential backoff after failures).
    backoff_until: Option<Instant>,
    /// Ids of the pool's agents in any state.
    members: HashSet<AgentId>,
    /// Agents by state, indexed by [`index::slot`] (see `index.rs`).
    counts: [u32; 6],
    /// Idle agents neither retired nor past `maxAge` (as of the last [`index::promote`]), by
    /// idle-since.
    fresh: BTreeSet<index::IdleKey>,
    /// Idle agents retired or past `maxAge`, by idle-since.
    stale: BTreeSet<index::IdleKey>,
    /// The fresh idle agents by creation time (the next to pass `maxAge` first).
    by_created: BTreeSet<(Instant, AgentId)>,
    /// Cleaning agents that will be reused, still within the cleaning grace, by cleaning-since.
    cleaning: BTreeSet<(Instant, AgentId)>,
    /// Externally leased pool (see `external.rs`): nothing is provisioned until the outside
    /// scheduler was observed once (so existing agents are adopted, not duplicated).
    held: bool,
    /// Externally leased pool: the outside scheduler's queue waiting for this pool.
    external_demand: u32,
    /// The sizing policy's state (schedules, learner, warm hits, idle cost).
    policy: policy::PoolPolicy,
}

/// True for a pool whose agents are leased by an outside scheduler (Jenkins), never by
/// warmpool's own lease requests.
pub fn externally_leased(spec: &PoolSpec) -> bool {
    spec.jenkins.is_some()
}

/// First pause after a provisioning failure; it doubles per failure in a row.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest pause between provisioning attempts of a failing pool.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The shared [`Backoff`](crate::backoff::Backoff) from [`BACKOFF_BASE`] to [`BACKOFF_MAX`] for
/// the `n`th failure in a row (n >= 1): a duration in [d/2, d] where
/// d = min(BACKOFF_MAX, BACKOFF_BASE * 2^(n-1)). The jitter is derived from the pool name and n,
/// so the engine stays deterministic while pools failing together spread out.
pub fn backoff(pool: &str, n: u32) -> Duration {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in pool.bytes().chain(n.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let frac = (h % 1000) as f64 / 1000.0;
    crate::backoff::Backoff::new(BACKOFF_BASE, BACKOFF_MAX).pause(n, frac)
}

#[derive(Debug)]
struct Waiter {
    id: RequestId,
    req: LeaseRequest,
    enqueued: Instant,
    deadline: Instant,
}

/// The pool engine. See the module docs.
pub struct Engine {
    cfg: EngineConfig,
    instance: String,
    pacer: Box<dyn Pacer>,
    pools: BTreeMap<String, Pool>,
    agents: HashMap<AgentId, Agent>,
    leases: HashMap<LeaseId, Lease>,
    ended: VecDeque<LeaseId>,
    waiters: VecDeque<Waiter>,
    keys: HashMap<String, LeaseId>,
    actions: Vec<Action>,
    seq: u64,
    shutting_down: bool,
    paused: bool,
    /// Pools touched since the last reconcile pass.
    dirty: BTreeSet<String>,
    /// Size every pool on the next pass (a tick, or a pool or engine-wide change).
    all_dirty: bool,
    /// Selector text -> live pools it matches.
    matches: HashMap<String, Arc<[String]>>,
    /// When the last agent deadline scan ran.
    last_agent_scan: Option<Instant>,
    /// Agent deadline checks, soonest first (see `deadlines.rs`).
    deadlines: BinaryHeap<Reverse<(Instant, AgentId)>>,
    /// Active leases by expiry (see `deadlines.rs`).
    expiry: BTreeSet<(Instant, LeaseId)>,
    /// The wall-clock time at an instant ([`Engine::set_wall_clock`]).
    wall: Option<(Instant, std::time::SystemTime)>,
    /// The request being decided by [`Engine::request_lease`]: granted now, it is warm.
    requesting: Option<RequestId>,
}

impl Engine {
    /// A new engine. `instance` is a short random string that makes ids unique across restarts.
    pub fn new(cfg: EngineConfig, instance: &str, pacer: Box<dyn Pacer>) -> Engine {
        Engine {
            cfg,
            instance: instance.to_string(),
            pacer,
            pools: BTreeMap::new(),
            agents: HashMap::new(),
            leases: HashMap::new(),
            ended: VecDeque::new(),
            waiters: VecDeque::new(),
            keys: HashMap::new(),
            actions: Vec::new(),
            seq: 0,
            shutting_down: false,
            paused: false,
            dirty: BTreeSet::new(),
            all_dirty: true,
            matches: HashMap::new(),
            last_agent_scan: None,
            deadlines: BinaryHeap::new(),
            expiry: BTreeSet::new(),
            wall: None,
            requesting: None,
        }
    }

    /// Actions recorded since the last call.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    // ---- pools -------------------------------------------------------------------------------

    /// Adds a pool or replaces its spec. The caller has validated the spec.
    pub fn upsert_pool(&mut self, name: &str, spec: PoolSpec, now: Instant) {
        self.pacer.configure(name, &spec);
        let labels = spec.label_set();
        let held = externally_leased(&spec);
        match self.pools.get_mut(name) {
            Some(p) => {
                let changed = *p.spec != spec;
                p.spec = Arc::new(spec);
                p.labels = labels;
                p.removed = false;
                if changed {
                    p.policy.respec(&p.spec);
                    self.reindex_pool(name, now);
                }
            }
            None => {
                self.pools.insert(
                    name.to_string(),
                    Pool {
                        policy: policy::PoolPolicy::new(&spec, now),
                        spec: Arc::new(spec),
                        labels,
                        removed: false,
                        throttled: false,
                        throttled_total: 0,
                        leaks_total: 0,
                        provision_failures_total: 0,
                        last_error: None,
                        hook_failures_total: 0,
                        last_hook_failure: None,
                        failures_in_a_row: 0,
                        backoff_until: None,
                        members: HashSet::new(),
                        counts: [0; 6],
                        fresh: BTreeSet::new(),
                        stale: BTreeSet::new(),
                        by_created: BTreeSet::new(),
                        cleaning: BTreeSet::new(),
                        held,
                        external_demand: 0,
                    },
                );
            }
        }
        self.pools_changed();
        self.reconcile(now);
    }

    /// Removes a pool: idle agents stop now, leased ones when released; the pool disappears once
    /// it has no agents.
    pub fn remove_pool(&mut self, name: &str, now: Instant) {
        let Some(p) = self.pools.get_mut(name) else {
            return;
        };
        p.removed = true;
        // An outside scheduler's lease is not warmpool's to wait for: its agents all go now.
        let all = externally_leased(&p.spec);
        let mut ids: Vec<AgentId> = p
            .members
            .iter()
            .filter(|id| all || self.agents[*id].state != AgentState::Leased)
            .cloned()
            .collect();
        ids.sort();
        if p.members.is_empty() {
            self.pools.remove(name);
        }
        self.pools_changed();
        for id in ids {
            self.terminate(&id, Reason::PoolRemoved, now);
        }
        self.reconcile(now);
    }

    /// Holds provisioning back (while a new instance adopts existing agents, so counts are
    /// rebuilt from what exists before anything new is created).
    pub fn set_paused(&mut self, paused: bool, now: Instant) {
        self.paused = paused;
        self.all_dirty = true;
        self.reconcile(now);
    }

    /// Adopts an agent that already exists (a pod left by a previous instance), `age` old. It
    /// counts toward `maxTotal` at once; `state` is Provisioning (not running yet), Connecting
    /// (running: it must register within the longer of `connectTimeout` and
    /// [`EngineConfig::adopt_grace`], counted from adoption) or Terminating (being deleted: gone
    /// when the backend reports it). False when the pool is unknown or the id is taken.
    pub fn adopt(
        &mut self,
        id: &str,
        pool: &str,
        state: AgentState,
        age: Duration,
        now: Instant,
    ) -> bool {
        self.adopt_with(id, pool, state, age, 0, false, now)
    }

    /// Like [`Engine::adopt`], keeping what the agent did before: `uses` leases served, and
    /// `drained` (an externally leased agent told to take no other lease).
    #[allow(clippy::too_many_arguments)]
    pub fn adopt_with(
        &mut self,
        id: &str,
        pool: &str,
        state: AgentState,
        age: Duration,
        uses: u32,
        drained: bool,
        now: Instant,
    ) -> bool {
        if self.agents.contains_key(id) || self.pools.get(pool).is_none_or(|p| p.removed) {
            return false;
        }
        let mut a = Agent::new(id, pool, state, now);
        // maxAge keeps counting across restarts.
        a.created = now.checked_sub(age).unwrap_or(now);
        a.adopted = true;
        a.uses = uses;
        a.drained = drained;
        if state == AgentState::Terminating {
            a.terminate_reason = Some(Reason::Shutdown);
        }
        self.insert_agent(a, now);
        tracing::info!(
            agent = id,
            pool,
            state = state.as_str(),
            "adopted existing agent"
        );
        true
    }

    // ---- leases ------------------------------------------------------------------------------

    /// Requests a lease. Grants at once when an agent is free, fails at once when no pool can
    /// ever satisfy the selector, otherwise queues FIFO until `wait` runs out.
    pub fn request_lease(
        &mut self,
        req: LeaseRequest,
        now: Instant,
    ) -> Result<LeaseDecision, LeaseError> {
        if self.shutting_down {
            return Err(LeaseError::ShuttingDown);
        }
        if let Some(key) = &req.idempotency_key {
            if let Some(l) = self.keys.get(key).and_then(|id| self.leases.get(id))
                && l.state == LeaseState::Active
            {
                return Ok(LeaseDecision::Existing(l.clone()));
            }
            if self
                .waiters
                .iter()
                .any(|w| w.req.idempotency_key.as_deref() == Some(key))
            {
                return Err(LeaseError::DuplicateRequest(key.clone()));
            }
        }
        if self.matching_pools(&req).is_empty() {
            return Err(LeaseError::Unsatisfiable {
                selector: req.selector_text.clone(),
                pools: self.describe_pools(),
            });
        }
        let id = self.next_seq();
        let deadline = now + req.wait;
        let wait_zero = req.wait.is_zero();
        let selector = req.selector_text.clone();
        self.waiters.push_back(Waiter {
            id,
            req,
            enqueued: now,
            deadline,
        });
        self.requesting = Some(id);
        self.reconcile(now);
        self.requesting = None;
        // Served at once? Take the grant out of the action list and answer directly.
        if let Some(pos) = self
            .actions
            .iter()
            .position(|a| matches!(a, Action::Granted { request, .. } if *request == id))
        {
            let Action::Granted { lease, .. } = self.actions.remove(pos) else {
                unreachable!()
            };
            self.record_arrival(&lease.pool, now);
            return Ok(LeaseDecision::Granted(lease));
        }
        // It waits (or fails at once): it counts for the pool that will provision for it.
        let waiting = self.waiters.iter().rev().find(|w| w.id == id);
        if let Some(pool) = waiting
            .map(|w| w.req.clone())
            .and_then(|r| self.attribute(&r))
        {
            self.record_arrival(&pool, now);
            index::mark_dirty(&mut self.dirty, &pool);
        }
        if wait_zero {
            let req = self
                .waiters
                .iter()
                .find(|w| w.id == id)
                .map(|w| w.req.clone());
            self.waiters.retain(|w| w.id != id);
            self.reconcile(now);
            let pools = req.map(|r| self.waited_on(&r)).unwrap_or_default();
            return Err(LeaseError::WaitExpired {
                selector,
                waited_ms: 0,
                pools,
            });
        }
        // Only a request that has to wait can find the queue full.
        if self.waiters.len() > self.cfg.max_waiters {
            self.waiters.retain(|w| w.id != id);
            self.reconcile(now);
            return Err(LeaseError::QueueFull {
                limit: self.cfg.max_waiters,
            });
        }
        Ok(LeaseDecision::Queued(id))
    }

    /// Withdraws a waiting request (its client went away). True when it was still waiting.
    pub fn cancel_request(&mut self, id: RequestId, now: Instant) -> bool {
        let before = self.waiters.len();
        self.waiters.retain(|w| w.id != id);
        let removed = self.waiters.len() != before;
        if removed {
            self.reconcile(now);
        }
        removed
    }

    /// A lease by id (active or recently ended).
    pub fn lease(&self, id: &str) -> Option<&Lease> {
        self.leases.get(id)
    }

    /// The active lease an agent serves.
    pub fn active_lease(&self, id: &str) -> Result<&Lease, LeaseError> {
        let l = self
            .leases
            .get(id)
            .ok_or_else(|| LeaseError::NotFound(id.to_string()))?;
        if l.state != LeaseState::Active {
            return Err(LeaseError::Ended {
                id: id.to_string(),
                state: l.state.as_str().to_string(),
                reason: l.end_reason.clone().unwrap_or_default(),
            });
        }
        Ok(l)
    }

    /// Extends an active lease by its TTL (or by `ttl` when given, which becomes the new TTL).
    pub fn renew(
        &mut self,
        id: &str,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<Lease, LeaseError> {
        self.active_lease(id)?;
        self.lease_stopped(id);
        let l = self.leases.get_mut(id).expect("checked above");
        if let Some(t) = ttl {
            l.ttl = t;
        }
        l.expires = now + l.ttl;
        let l = l.clone();
        self.lease_started(id);
        Ok(l)
    }

    /// Releases an active lease: the agent cleans up and returns to idle if it has uses left,
    /// otherwise it is replaced.
    pub fn release(&mut self, id: &str, now: Instant) -> Result<Lease, LeaseError> {
        self.active_lease(id)?;
        let lease = self.end_lease(id, LeaseState::Released, "released by holder".into(), now);
        self.recycle_after_lease(&lease.agent, &lease.id, now);
        self.reconcile(now);
        Ok(lease)
    }

    fn end_lease(&mut self, id: &str, state: LeaseState, reason: String, _now: Instant) -> Lease {
        self.lease_stopped(id);
        let l = self.leases.get_mut(id).expect("lease exists");
        debug_assert_eq!(l.state, LeaseState::Active);
        l.state = state;
        l.end_reason = Some(reason);
        let lease = l.clone();
        if let Some(k) = &lease.idempotency_key {
            self.keys.remove(k);
        }
        self.ended.push_back(lease.id.clone());
        while self.ended.len() > self.cfg.lease_history {
            if let Some(old) = self.ended.pop_front() {
                self.leases.remove(&old);
            }
        }
        if let Some(a) = self.agents.get_mut(&lease.agent)
            && a.lease.as_deref() == Some(id)
        {
            a.lease = None;
            // An agent that served a lease before it registered has a connect deadline again.
            self.schedule(&lease.agent);
        }
        self.actions.push(Action::LeaseEnded {
            lease: lease.clone(),
        });
        lease
    }

    /// After a lease ends normally: clean and reuse, or replace.
    fn recycle_after_lease(&mut self, agent: &str, lease: &str, now: Instant) {
        let Some(a) = self.agents.get(agent) else {
            return;
        };
        if a.state != AgentState::Leased {
            return;
        }
        let pool = &self.pools[&a.pool];
        let spec = &pool.spec;
        // An external machine is not replaced by warmpool: it is only cleaned between leases.
        let managed = !spec.external;
        let reason = if pool.removed {
            Some(Reason::PoolRemoved)
        } else if managed && spec.max_uses > 0 && a.uses >= spec.max_uses {
            Some(Reason::MaxUses)
        } else if managed && a.retire {
            Some(Reason::Rolled)
        } else if managed && now.duration_since(a.created) >= spec.max_age.0 {
            Some(Reason::MaxAge)
        } else {
            a.unhealthy.clone().map(Reason::Unhealthy)
        };
        let external = externally_leased(spec);
        // Nothing can be left to clean: the agent takes a quiet release (see `quiet_release`).
        let quiet = quiet_release(a, spec);
        let hooks = spec.hooks.clone();
        match reason {
            Some(r) => self.terminate(agent, r, now),
            // The outside scheduler's agent cleans up by itself: it is free again at once.
            None if external => self.set_state(agent, AgentState::Idle, now),
            None => {
                if quiet {
                    self.set_state(agent, AgentState::Idle, now);
                } else {
                    self.set_state(agent, AgentState::Cleaning, now);
                    let a = self.agents.get_mut(agent).expect("exists");
                    a.cleaning_for = Some(lease.to_string());
                }
                self.actions.push(Action::Release {
                    agent: agent.to_string(),
                    lease: lease.to_string(),
                    hooks,
                    quiet,
                });
            }
        }
    }

    /// An exec is about to be sent for `lease`: Ok when the lease is active, and its agent is
    /// marked as having run something, so its release cleans up (never quiet). Called under the
    /// same lock as the exec's sending, so a release either sees the mark or comes first (and
    /// the exec is refused).
    pub fn exec_starting(&mut self, lease: &str) -> Result<(), LeaseError> {
        self.active_lease(lease)?;
        let agent = &self.leases[lease].agent;
        if let Some(a) = self.agents.get_mut(agent) {
            a.ran = true;
        }
        Ok(())
    }

    /// Records whether an agent's connection takes quiet releases (its `hello` had
    /// `quietRelease`). Set on every registration: a reconnect with an older build clears it.
    pub fn set_quiet_release(&mut self, id: &str, quiet: bool) {
        if let Some(a) = self.agents.get_mut(id) {
            a.quiet_release = quiet;
        }
    }
}

/// Whether the release of an agent that will be reused can be quiet: the agent goes Idle at
/// once and is told to drop the lease without answering `ready`. Only when nothing can be left
/// to clean, as far as the service knows: the agent takes quiet releases, no exec was sent to
/// it since its last cleanup (nor a lease restored), its last health report is clean (no
/// workspace bytes, no leftover process), its pool has no hooks and is not external (machines
/// warmpool does not manage are cleaned between leases, always), and it is connected (one that
/// is away gets its release when it is back). The agent checks its own side too
/// (`agent::cleanup`): if it finds something left after all, it cleans before reading the
/// next message and reports `ready` for that lease.
fn quiet_release(a: &Agent, spec: &PoolSpec) -> bool {
    a.quiet_release
        && !a.ran
        && !a.away
        && a.health == Health::default()
        && spec.hooks.is_empty()
        && !spec.external
}
