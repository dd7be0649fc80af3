//! Time and sizing for the engine: the tick (deadlines), the level-triggered pass
//! (`reconcile`), FIFO assignment of waiters to idle agents, and per-pool sizing (scale up under
//! the pacer and `maxConcurrent`, rotate stale agents replacement-first, scale idle agents down
//! after `idleTtl`). Sizing reads the pool's counters and idle indexes (`index.rs`): its cost
//! does not grow with the pool's size, beyond the agents it starts or stops.
//!
//! Pure like the rest of the engine: no I/O, time passed in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::*;

impl Engine {
    /// Applies every deadline due at `now`, then reconciles.
    pub fn tick(&mut self, now: Instant) {
        // Waiters whose wait ran out.
        let mut expired = Vec::new();
        self.waiters.retain(|w| {
            if w.deadline <= now {
                expired.push((w.id, w.req.clone(), now.duration_since(w.enqueued)));
                false
            } else {
                true
            }
        });
        for (request, req, waited) in expired {
            let pools = self.waited_on(&req);
            self.actions.push(Action::WaitFailed {
                request,
                error: LeaseError::WaitExpired {
                    selector: req.selector_text.clone(),
                    waited_ms: waited.as_millis() as u64,
                    pools,
                },
            });
        }
        // Leases not renewed, soonest first.
        for agent in self.expired_leases(now) {
            self.terminate(&agent, Reason::LeaseExpired, now);
        }
        // Agent deadlines, at most every `agent_scan_interval`.
        let scan = self
            .last_agent_scan
            .is_none_or(|t| now.saturating_duration_since(t) >= self.cfg.agent_scan_interval);
        if scan {
            self.last_agent_scan = Some(now);
            for (id, r) in self.agent_deadlines(now) {
                self.terminate(&id, r, now);
            }
        }
        // Time-based sizing (idleTtl, maxAge, the cleaning grace, backoff and rate-limit
        // refills) for every pool.
        self.all_dirty = true;
        self.reconcile(now);
    }

    /// Level-triggered pass: serve waiters FIFO, then size pools (desired against actual, from
    /// the pools' counters): every pool on a tick, while requests wait, or after a pool change;
    /// otherwise only the pools the last events touched (the others' inputs did not change).
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
            std::mem::take(&mut self.dirty).into_iter().collect()
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
                &mut self.pools,
                &self.agents,
                &mut self.matches,
                self.cfg.cleaning_grace,
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
        self.lease_started(&id);
        self.set_state(agent, AgentState::Leased, now);
        self.actions.push(Action::Bound {
            agent: agent.to_string(),
            pool: pool.clone(),
            lease: id.clone(),
        });
        // Warm: an idle agent was ready when the request came (granted without waiting).
        let warm = self.requesting == Some(w.id);
        if let Some(p) = self.pools.get_mut(&pool) {
            p.policy.granted(now, warm);
        }
        self.actions.push(Action::Observe(Observation::LeaseWait {
            pool: pool.clone(),
            seconds: now.duration_since(w.enqueued).as_secs_f64(),
        }));
        self.actions
            .push(Action::Observe(Observation::Leased { pool, warm }));
        (w.id, lease)
    }

    /// Waiting requests attributed to each pool: each waiter counts for the first pool (by
    /// name) that matches it and still has room below maxTotal.
    fn demand(&self) -> HashMap<String, u32> {
        let mut out: HashMap<String, u32> = HashMap::new();
        let mut room: HashMap<&str, i64> = self
            .pools
            .iter()
            .map(|(n, p)| {
                let cap = p.policy.decision.cap;
                (n.as_str(), i64::from(cap) - p.members.len() as i64)
            })
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

    /// Sizes one pool from its counters: starts what the policy's desired idle count needs
    /// (`policy.rs`: minIdle or an open schedule window, the forecast headroom, scale-to-zero,
    /// plus demand), rotates stale idle agents, stops idle agents past `idleTtl` above the want
    /// and idle agents above the policy's cap. O(1) plus the agents it starts or stops (and
    /// O(log n) per index lookup).
    fn size_pool(&mut self, name: &str, demand: u32, now: Instant) {
        let grace = self.cfg.cleaning_grace;
        let wall = self.wall_at(now);
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        // External agents join by themselves: nothing to start, scale down or rotate.
        if pool.removed || pool.spec.external {
            return;
        }
        index::promote(pool, &self.agents, grace, now);
        let spec = Arc::clone(&pool.spec);
        let mut total = pool.members.len() as u32;
        let mut in_flight = pool.counts[index::slot(AgentState::Provisioning)]
            + pool.counts[index::slot(AgentState::Connecting)];
        let fresh = pool.fresh.len() as u32;
        // Agents cleaning up after a lease, to be reused within milliseconds: supply for the
        // cleaning grace (a request they will serve provisions nothing).
        let cleaning = pool.cleaning.len() as u32;
        let decision = pool.policy.decide(
            &spec,
            now,
            wall,
            demand.saturating_add(pool.external_demand),
        );
        let want = decision.want;
        let cap = decision.cap;
        let held = pool.held;

        // Scale up: fresh idle + in-flight + cleaning (within the grace) must cover the want.
        let supply = fresh + in_flight + cleaning;
        let mut need = want.saturating_sub(supply);
        let backing_off = pool.backoff_until.is_some_and(|t| now < t);
        if self.shutting_down || self.paused || backing_off || held {
            need = 0;
        }
        need = need
            .min(cap.saturating_sub(total))
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
            self.insert_agent(Agent::new(&id, name, AgentState::Provisioning, now), now);
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

        // Rotate stale idle agents (oldest idle first) once their replacements are warm, or at
        // once when no replacement is on its way and none can be made (pool at its cap). Any
        // agent on its way is waited for: a stale agent retired while one comes (when not all
        // of the want can come at once under the cap) leaves the pool below it.
        let replacement_coming = in_flight > 0;
        while fresh >= want || (!replacement_coming && total >= cap) {
            let Some(id) = index::oldest(&self.pools[name].stale) else {
                break;
            };
            let reason = self.stale_reason(&id);
            self.terminate(&id, reason, now);
            total -= 1;
        }

        // Above the cap (an open schedule window's maxTotal is lower than the pool's agents):
        // idle agents stop at once, oldest idle first.
        let mut idle = fresh;
        while total > cap && idle > 0 {
            let Some(id) = index::oldest(&self.pools[name].fresh) else {
                break;
            };
            self.terminate(&id, Reason::OverCap, now);
            idle -= 1;
            total -= 1;
        }

        // Scale down: fresh idle agents above the want that sat idle past idleTtl, oldest
        // first (the first one not past it ends the pass: the rest are younger).
        while idle > want {
            let p = &self.pools[name];
            let Some(key) = p.fresh.first() else { break };
            if now.duration_since(key.0) < spec.idle_ttl.0 {
                break;
            }
            let id = index::oldest(&p.fresh).expect("not empty");
            self.terminate(&id, Reason::IdleTtl, now);
            idle -= 1;
        }
    }
}
