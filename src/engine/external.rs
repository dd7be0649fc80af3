//! Externally leased pools (a pool with a `jenkins` block): an outside scheduler (Jenkins'
//! queue) leases the agents, warmpool sizes, recycles and cleans up the pool by the same rules
//! as its own pools. The outside scheduler's view arrives as events:
//! - [`Engine::external_idle`]: the agent is connected and free (a first time: registered; after
//!   a build: the build's lease is released, counted against `maxUses`);
//! - [`Engine::external_busy`]: the agent runs a build: a lease whose holder is the build,
//!   ended by the scheduler (never by a TTL); the last allowed build (`maxUses`) drains it
//!   ([`Action::Drain`]);
//! - [`Engine::external_offline`]: the agent lost its connection (it has `connectTimeout` to
//!   come back, then it is a leak);
//! - [`Engine::set_external_demand`]: the scheduler's queue waiting for the pool;
//! - [`Engine::orphan`] and [`Engine::external_gone`]: garbage found by the scheduler's poll.
//!
//! Warmpool's own lease requests never match these pools, and their liveness is the scheduler's
//! word (no heartbeats). A new pool is held (nothing provisioned) until [`Engine::set_held`]
//! releases it after the first observation, so what exists is adopted, not duplicated.
//!
//! Pure like the rest of the engine: no I/O, time passed in.

use std::time::{Duration, Instant};

use super::*;

/// An outside scheduler's lease never expires by time: the scheduler ends it.
pub const EXTERNAL_LEASE_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl Engine {
    /// A new agent id for `pool`. A Jenkins pool's agents are named as their nodes must be:
    /// `nodeNamePrefix` + 8 hex digits (what the poll recognises as the pool's).
    pub(super) fn new_agent_id(&mut self, pool: &str, spec: &PoolSpec) -> AgentId {
        loop {
            let n = self.next_seq();
            let id = match &spec.jenkins {
                Some(j) => {
                    let mut h: u32 = 0x811c_9dc5;
                    for b in self.instance.bytes().chain(n.to_le_bytes()) {
                        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
                    }
                    format!("{}{h:08x}", j.prefix(pool))
                }
                None => format!("{pool}-{}-{n}", self.instance),
            };
            if !self.agents.contains_key(&id) {
                return id;
            }
        }
    }

    /// Holds (or releases) provisioning for an externally leased pool.
    pub fn set_held(&mut self, pool: &str, held: bool, now: Instant) {
        if let Some(p) = self.pools.get_mut(pool)
            && p.held != held
        {
            p.held = held;
            self.dirty.insert(pool.to_string());
            self.reconcile(now);
        }
    }

    /// The outside scheduler's queue for an externally leased pool: counted like waiting
    /// requests in its sizing (at most `maxTotal` agents in all).
    pub fn set_external_demand(&mut self, pool: &str, demand: u32, now: Instant) {
        if demand > 0
            && let Some(p) = self.pools.get_mut(pool)
        {
            p.policy.touched(now);
        }
        if let Some(p) = self.pools.get_mut(pool)
            && p.external_demand != demand
        {
            p.external_demand = demand;
            self.dirty.insert(pool.to_string());
            self.reconcile(now);
        }
    }

    /// The outside scheduler's queue last reported for `pool`.
    pub fn external_demand(&self, pool: &str) -> u32 {
        self.pools.get(pool).map_or(0, |p| p.external_demand)
    }

    /// Registers a Provisioning or Connecting agent (the scheduler sees it connected).
    fn external_register(&mut self, id: &str, now: Instant) {
        let uses = self.agents.get(id).map_or(0, |a| a.uses);
        let _ = self.agent_registered(id, None, Health::default(), None, uses, now);
    }

    /// The scheduler sees the agent connected and free. A first time it registers (and frees
    /// whatever held it back); after a build, the build's lease is released and the agent is
    /// recycled by the pool's rules (`maxUses`, `maxAge`, a retired template), else it is idle.
    pub fn external_idle(&mut self, id: &str, now: Instant) {
        let Some(a) = self.agents.get_mut(id) else {
            return;
        };
        a.last_seen = now;
        match a.state {
            AgentState::Provisioning | AgentState::Connecting => {
                self.external_register(id, now);
                // Adopted after its last allowed build (drained by an earlier instance).
                let a = &self.agents[id];
                let spec = &self.pools[&a.pool].spec;
                if a.state == AgentState::Idle
                    && (a.drained || (spec.max_uses > 0 && a.uses >= spec.max_uses))
                {
                    self.terminate(id, Reason::MaxUses, now);
                    self.reconcile(now);
                }
            }
            AgentState::Leased => {
                let lease = a.lease.clone();
                if let Some(lease) = lease
                    && self
                        .leases
                        .get(&lease)
                        .is_some_and(|l| l.state == LeaseState::Active)
                {
                    self.end_lease(&lease, LeaseState::Released, "build finished".into(), now);
                    self.recycle_after_lease(id, &lease, now);
                } else {
                    self.set_state(id, AgentState::Idle, now);
                }
                self.reconcile(now);
            }
            _ => {}
        }
    }

    /// The scheduler sees the agent running a build (`holder`: the build's URL). A build not
    /// seen before starts a lease (counted against `maxUses`; the last allowed one drains the
    /// agent); the same build again changes nothing.
    pub fn external_busy(&mut self, id: &str, holder: &str, now: Instant) {
        let Some(a) = self.agents.get_mut(id) else {
            return;
        };
        a.last_seen = now;
        match a.state {
            AgentState::Terminating => return,
            AgentState::Provisioning | AgentState::Connecting => {
                self.external_register(id, now);
            }
            _ => {}
        }
        let a = &self.agents[id];
        if a.state == AgentState::Leased {
            let same = a
                .lease
                .as_ref()
                .and_then(|l| self.leases.get(l))
                .is_some_and(|l| l.holder == holder);
            if same {
                return;
            }
            // Another build than the one seen last: that one ended unseen.
            if let Some(l) = a.lease.clone()
                && self
                    .leases
                    .get(&l)
                    .is_some_and(|l| l.state == LeaseState::Active)
            {
                self.end_lease(&l, LeaseState::Released, "build finished".into(), now);
            }
        } else if a.state != AgentState::Idle {
            return;
        }
        let lease_id = self.new_lease_id();
        // A build not seen before: one arrival for the pool's learner.
        let pool = self.agents[id].pool.clone();
        self.record_arrival(&pool, now);
        let a = self.agents.get_mut(id).expect("exists");
        a.uses += 1;
        a.lease = Some(lease_id.clone());
        let (pool, uses, drained) = (a.pool.clone(), a.uses, a.drained);
        let spec = &self.pools[&pool].spec;
        let last = spec.max_uses > 0 && uses >= spec.max_uses;
        let lease = Lease {
            id: lease_id.clone(),
            agent: id.to_string(),
            pool: pool.clone(),
            labels: spec.labels.clone(),
            holder: holder.to_string(),
            selector: String::new(),
            granted: now,
            expires: now + EXTERNAL_LEASE_TTL,
            ttl: EXTERNAL_LEASE_TTL,
            state: LeaseState::Active,
            end_reason: None,
            idempotency_key: None,
        };
        self.leases.insert(lease_id.clone(), lease);
        self.lease_started(&lease_id);
        self.set_state(id, AgentState::Leased, now);
        if last && !drained {
            self.agents.get_mut(id).expect("exists").drained = true;
            self.actions.push(Action::Drain {
                pool,
                agent: id.to_string(),
            });
        }
        self.reconcile(now);
    }

    /// The scheduler sees the agent disconnected. An idle one is connecting again (a leak
    /// after `connectTimeout`); a leased one keeps its lease (the scheduler decides about its
    /// build).
    pub fn external_offline(&mut self, id: &str, now: Instant) {
        let Some(a) = self.agents.get(id) else { return };
        if a.state == AgentState::Idle {
            self.set_state(id, AgentState::Connecting, now);
            self.reconcile(now);
        }
    }

    /// Something of `pool` the engine does not know (a node without agent, an agent without
    /// node): added and terminated at once with `reason`, so it is removed like any agent
    /// (counted toward `maxTotal` until the backend reports it gone). False when the id is
    /// known or the pool is not.
    pub fn orphan(&mut self, id: &str, pool: &str, reason: Reason, now: Instant) -> bool {
        if self.agents.contains_key(id) || !self.pools.contains_key(pool) {
            return false;
        }
        self.insert_agent(Agent::new(id, pool, AgentState::Connecting, now), now);
        self.terminate(id, reason, now);
        self.reconcile(now);
        true
    }

    /// The scheduler's poll shows a known agent has lost its other half (its node, or its
    /// process or pod): it is terminated with `reason`, its lease failed.
    pub fn external_gone(&mut self, id: &str, reason: Reason, now: Instant) {
        if self
            .agents
            .get(id)
            .is_some_and(|a| a.state != AgentState::Terminating)
        {
            self.terminate(id, reason, now);
            self.reconcile(now);
        }
    }
}
