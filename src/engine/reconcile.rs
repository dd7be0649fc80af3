//! Time and sizing for the engine: deadlines (`tick`), the level-triggered pass (`reconcile`),
//! FIFO assignment of waiters to idle agents, and per-pool sizing (scale up under the pacer and
//! `maxConcurrent`, rotate stale agents replacement-first, scale idle agents down after `idleTtl`).
//!
//! Pure like the rest of the engine: no I/O, time passed in.

use std::collections::HashMap;
use std::time::Instant;

use super::*;

impl Engine {
    /// Applies every deadline due at `now`, then reconciles.
    pub fn tick(&mut self, now: Instant) {
        // Waiters whose wait ran out.
        let mut expired = Vec::new();
        self.waiters.retain(|w| {
            if w.deadline <= now {
                expired.push((
                    w.id,
                    w.req.selector_text.clone(),
                    now.duration_since(w.enqueued),
                ));
                false
            } else {
                true
            }
        });
        for (request, selector, waited) in expired {
            self.actions.push(Action::WaitFailed {
                request,
                error: LeaseError::WaitExpired {
                    selector,
                    waited_ms: waited.as_millis() as u64,
                },
            });
        }
        // Leases not renewed.
        let mut due: Vec<(Instant, LeaseId, AgentId)> = self
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Active && l.expires <= now)
            .map(|l| (l.expires, l.id.clone(), l.agent.clone()))
            .collect();
        due.sort();
        for (_, _, agent) in due {
            self.terminate(&agent, Reason::LeaseExpired, now);
        }
        // Agent deadlines, at most every `agent_scan_interval` (the scan visits every agent).
        let scan = self
            .last_agent_scan
            .is_none_or(|t| now.saturating_duration_since(t) >= self.cfg.agent_scan_interval);
        if scan {
            self.last_agent_scan = Some(now);
            for (id, r) in self.agent_deadlines(now) {
                self.terminate(&id, r, now);
            }
        }
        // Time-based sizing (idleTtl, maxAge, backoff and rate-limit refills) for every pool.
        self.all_dirty = true;
        self.reconcile(now);
    }

    /// Agents past a deadline (connect, heartbeat, cleanup), by id. Visited by pool, so each
    /// agent costs one map lookup.
    fn agent_deadlines(&self, now: Instant) -> Vec<(AgentId, Reason)> {
        let mut doomed: Vec<(AgentId, Reason)> = Vec::new();
        for (a, spec) in self
            .pools
            .values()
            .flat_map(|p| p.members.iter().map(move |id| (id, &p.spec)))
            .map(|(id, spec)| (&self.agents[id], spec))
        {
            // An adopted agent is reconnecting after a restart or a takeover, not starting: it
            // gets its own grace. An agent known to serve a lease is never a leak: its lease's
            // TTL bounds how long it is waited for.
            let connect_limit = if a.adopted {
                spec.connect_timeout.0.max(self.cfg.adopt_grace)
            } else {
                spec.connect_timeout.0
            };
            match a.state {
                _ if a.lease.is_some()
                    && matches!(a.state, AgentState::Provisioning | AgentState::Connecting) => {}
                AgentState::Provisioning if now.duration_since(a.since) >= connect_limit => {
                    doomed.push((a.id.clone(), Reason::ProvisionTimeout));
                }
                AgentState::Connecting if now.duration_since(a.since) >= connect_limit => {
                    doomed.push((a.id.clone(), Reason::ConnectTimeout));
                }
                // An externally leased agent's liveness is the outside scheduler's word.
                AgentState::Idle | AgentState::Leased | AgentState::Cleaning
                    if !externally_leased(spec)
                        && now.duration_since(a.last_seen) >= self.cfg.heartbeat_timeout =>
                {
                    doomed.push((a.id.clone(), Reason::HeartbeatLost));
                }
                // The pool's hooks run while Cleaning: their timeouts extend the deadline.
                AgentState::Cleaning
                    if now.duration_since(a.since)
                        >= self.cfg.cleanup_timeout + spec.hooks.budget() =>
                {
                    doomed.push((a.id.clone(), Reason::CleanupTimeout));
                }
                _ => {}
            }
        }
        doomed.sort_by(|a, b| a.0.cmp(&b.0));
        doomed
    }

    /// Level-triggered pass: serve waiters FIFO, then size pools from scratch: every pool on a
    /// tick, while requests wait, or after a pool change; otherwise only the pools the last
    /// events touched (the others' inputs did not change).
    pub fn reconcile(&mut self, now: Instant) {
        self.assign_waiters(now);
        let demand = if self.waiters.is_empty() {
            HashMap::new()
        } else {
            self.demand()
        };
        let names: Vec<String> = if self.all_dirty || !self.waiters.is_empty() {
            self.pools.keys().cloned().collect()
        } else {
            self.dirty.iter().cloned().collect()
        };
        for name in names {
            if !self.pools.contains_key(&name) {
                continue;
            }
            let d = demand.get(&name).copied().unwrap_or(0);
            self.size_pool(&name, d, now);
        }
        // What sizing itself changed needs no second pass.
        self.dirty.clear();
        self.all_dirty = false;
    }

    pub(super) fn is_stale(&self, a: &Agent, now: Instant) -> bool {
        a.retire || now.duration_since(a.created) >= self.pools[&a.pool].spec.max_age.0
    }

    /// Why a stale agent is replaced.
    pub(super) fn stale_reason(&self, id: &str) -> Reason {
        match self.agents.get(id) {
            Some(a) if a.retire => Reason::Rolled,
            _ => Reason::MaxAge,
        }
    }

    /// Serves waiters in arrival order; each takes the best idle agent it matches.
    fn assign_waiters(&mut self, now: Instant) {
        if self.waiters.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.waiters.len() {
            let best = index::find(
                &self.pools,
                &self.agents,
                &mut self.matches,
                &self.waiters[i].req,
                now,
            );
            match best {
                Some(agent) => {
                    let w = self.waiters.remove(i).expect("index valid");
                    let lease = self.grant(w, &agent, now);
                    self.actions.push(Action::Granted {
                        request: lease.0,
                        lease: lease.1,
                    });
                }
                None => i += 1,
            }
        }
    }

    /// A lease id never issued before: never one that exists already (a lease restored from
    /// before a restart could carry one if two instances drew the same prefix).
    pub(super) fn new_lease_id(&mut self) -> LeaseId {
        loop {
            let n = self.next_seq();
            let id = format!("lease-{}-{n}", self.instance);
            if !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    fn grant(&mut self, w: Waiter, agent: &str, now: Instant) -> (RequestId, Lease) {
        let id = self.new_lease_id();
        let a = self.agents.get_mut(agent).expect("agent exists");
        a.uses += 1;
        a.lease = Some(id.clone());
        let pool = a.pool.clone();
        let lease = Lease {
            id: id.clone(),
            agent: agent.to_string(),
            pool: pool.clone(),
            labels: self.pools[&pool].spec.labels.clone(),
            holder: w.req.holder,
            selector: w.req.selector_text,
            granted: now,
            expires: now + w.req.ttl,
            ttl: w.req.ttl,
            state: LeaseState::Active,
            end_reason: None,
            idempotency_key: w.req.idempotency_key,
        };
        if let Some(k) = &lease.idempotency_key {
            self.keys.insert(k.clone(), id.clone());
        }
        self.leases.insert(id.clone(), lease.clone());
        self.set_state(agent, AgentState::Leased, now);
        self.actions.push(Action::Bound {
            agent: agent.to_string(),
            pool: pool.clone(),
            lease: id.clone(),
        });
        self.actions.push(Action::Observe(Observation::LeaseWait {
            pool,
            seconds: now.duration_since(w.enqueued).as_secs_f64(),
        }));
        (w.id, lease)
    }

    /// Waiting requests attributed to each pool: each waiter counts for the first pool (by
    /// name) that matches it and still has room below maxTotal.
    fn demand(&self) -> HashMap<String, u32> {
        let mut out: HashMap<String, u32> = HashMap::new();
        let mut room: HashMap<&str, i64> = self
            .pools
            .iter()
            .map(|(n, p)| (n.as_str(), p.spec.max_total as i64 - p.members.len() as i64))
            .collect();
        for w in &self.waiters {
            let pick = self
                .pools
                .iter()
                .filter(|(_, p)| {
                    !p.removed && !externally_leased(&p.spec) && w.req.selector.matches(&p.labels)
                })
                .find(|(n, _)| room.get(n.as_str()).copied().unwrap_or(0) > 0)
                .or_else(|| {
                    self.pools.iter().find(|(_, p)| {
                        !p.removed
                            && !externally_leased(&p.spec)
                            && w.req.selector.matches(&p.labels)
                    })
                });
            if let Some((n, _)) = pick {
                *room.entry(n.as_str()).or_default() -= 1;
                *out.entry(n.clone()).or_default() += 1;
            }
        }
        out
    }

    fn size_pool(&mut self, name: &str, demand: u32, now: Instant) {
        let pool = &self.pools[name];
        let spec = pool.spec.clone();
        // External agents join by themselves: nothing to start, scale down or rotate.
        if pool.removed || spec.external {
            return;
        }
        let mut total = 0u32;
        let mut in_flight = 0u32;
        let mut fresh_idle: Vec<(Instant, AgentId)> = Vec::new();
        let mut stale_idle: Vec<(Instant, AgentId)> = Vec::new();
        for a in pool.members.iter().map(|id| &self.agents[id]) {
            total += 1;
            match a.state {
                AgentState::Provisioning | AgentState::Connecting => in_flight += 1,
                AgentState::Idle if self.is_stale(a, now) => {
                    stale_idle.push((a.since, a.id.clone()))
                }
                AgentState::Idle => fresh_idle.push((a.since, a.id.clone())),
                _ => {}
            }
        }
        let want = spec.min_idle + demand + pool.external_demand;
        let held = pool.held;

        // Scale up: fresh idle + in-flight must cover minIdle + demand.
        let supply = fresh_idle.len() as u32 + in_flight;
        let mut need = want.saturating_sub(supply);
        let backing_off = self.pools[name].backoff_until.is_some_and(|t| now < t);
        if self.shutting_down || self.paused || backing_off || held {
            need = 0;
        }
        need = need
            .min(spec.max_total.saturating_sub(total))
            .min(spec.provisioning.max_concurrent.saturating_sub(in_flight));
        let mut throttled = false;
        for _ in 0..need {
            if !self.pacer.try_acquire(name) {
                throttled = true;
                self.actions.push(Action::Observe(Observation::Throttled {
                    pool: name.to_string(),
                }));
                break;
            }
            let id = self.new_agent_id(name, &spec);
            self.insert_agent(Agent::new(&id, name, AgentState::Provisioning, now));
            total += 1;
            in_flight += 1;
            self.actions.push(Action::Provision {
                pool: name.to_string(),
                agent: id,
            });
        }
        let p = self.pools.get_mut(name).expect("pool exists");
        if throttled {
            p.throttled_total += 1;
        }
        p.throttled = throttled;

        // Rotate stale idle agents once their replacements are warm, or at once when no
        // replacement is on its way and none can be made (pool at maxTotal).
        stale_idle.sort();
        let fresh = fresh_idle.len() as u32;
        for (_, id) in stale_idle {
            // Any agent on its way is waited for: a stale agent retired while one comes (when
            // not all of the want can come at once under maxTotal) leaves the pool below it.
            let replacement_coming = in_flight > 0;
            if fresh >= want || (!replacement_coming && total >= spec.max_total) {
                let reason = self.stale_reason(&id);
                self.terminate(&id, reason, now);
                total -= 1;
            }
        }

        // Scale down: idle agents above minIdle + demand that sat idle past idleTtl, oldest first.
        fresh_idle.sort();
        let mut idle = fresh_idle.len() as u32;
        for (since, id) in fresh_idle {
            if idle <= want {
                break;
            }
            if now.duration_since(since) >= spec.idle_ttl.0 {
                self.terminate(&id, Reason::IdleTtl, now);
                idle -= 1;
            }
        }
    }
}
