//! Read-only views of the engine (pool status, per-state counts, invariants) and shutdown.

use std::collections::BTreeMap;
use std::time::Instant;

use super::*;

impl Engine {
    /// Stops leasing: waiting requests fail, no more provisioning. Running leases go on.
    pub fn begin_shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        for w in std::mem::take(&mut self.waiters) {
            self.actions.push(Action::WaitFailed {
                request: w.id,
                error: LeaseError::ShuttingDown,
            });
        }
        self.reconcile(now);
    }

    /// Active leases warmpool granted (an outside scheduler's leases are not waited for).
    pub fn active_leases(&self) -> usize {
        self.leases
            .values()
            .filter(|l| l.state == LeaseState::Active)
            .filter(|l| {
                !self
                    .pools
                    .get(&l.pool)
                    .is_some_and(|p| externally_leased(&p.spec))
            })
            .count()
    }

    /// Terminates every agent (end of shutdown).
    pub fn terminate_all(&mut self, now: Instant) {
        let mut ids: Vec<AgentId> = self.agents.keys().cloned().collect();
        ids.sort();
        for id in ids {
            self.terminate(&id, Reason::Shutdown, now);
        }
    }

    pub(super) fn describe_pools(&self) -> String {
        if self.pools.is_empty() {
            return "none configured".into();
        }
        self.pools
            .iter()
            .filter(|(_, p)| !p.removed)
            .map(|(n, p)| format!("{n}: [{}]", p.spec.labels.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Status of every pool.
    pub fn pool_status(&self) -> Vec<PoolStatus> {
        self.pools
            .iter()
            .map(|(name, p)| {
                let mut s = PoolStatus {
                    name: name.clone(),
                    labels: p.spec.labels.clone(),
                    idle: 0,
                    leased: 0,
                    cleaning: 0,
                    connecting: 0,
                    provisioning: 0,
                    terminating: 0,
                    total: 0,
                    min_idle: p.spec.min_idle,
                    max_total: p.spec.max_total,
                    waiting: self
                        .waiters
                        .iter()
                        .filter(|w| {
                            !externally_leased(&p.spec) && w.req.selector.matches(&p.labels)
                        })
                        .count() as u32,
                    throttled: p.throttled,
                    throttled_total: p.throttled_total,
                    leaks_total: p.leaks_total,
                    provision_failures_total: p.provision_failures_total,
                    last_error: p.last_error.clone(),
                    hook_failures_total: p.hook_failures_total,
                    last_hook_failure: p.last_hook_failure.clone(),
                    desired_idle: p.policy.decision.desired_idle,
                    desired_idle_source: p.policy.decision.source,
                    arrival_rate: p.policy.decision.rate * 60.0,
                    refill_seconds: p.policy.decision.refill.as_secs_f64(),
                    warm_hit_ratio: p.policy.warm_hit_ratio(p.policy.decided_at),
                    warm_leases_total: p.policy.warm_total,
                    cold_leases_total: p.policy.cold_total,
                    idle_agent_seconds: p.policy.idle_seconds(p.policy.decided_at),
                    spec: (*p.spec).clone(),
                };
                let n = |st| p.counts[index::slot(st)];
                s.provisioning = n(AgentState::Provisioning);
                s.connecting = n(AgentState::Connecting);
                s.idle = n(AgentState::Idle);
                s.leased = n(AgentState::Leased);
                s.cleaning = n(AgentState::Cleaning);
                s.terminating = n(AgentState::Terminating);
                s.total = p.members.len() as u32;
                s
            })
            .collect()
    }

    /// Where the pools `req` matches stand, for a person whose request waited in vain:
    /// "pool go: 0 idle, 2 leased, 3 connecting, 0 provisioning, 5 of maxTotal 6; last error:
    /// ...", one clause per pool, `; ` between them.
    pub(super) fn waited_on(&mut self, req: &LeaseRequest) -> String {
        let names = self.matching_pools(req);
        let mut parts = Vec::new();
        for name in names.iter() {
            let Some(p) = self.pools.get(name) else {
                continue;
            };
            let n = |st| p.counts[index::slot(st)];
            let mut part = format!(
                "pool {name}: {} idle, {} leased, {} connecting, {} provisioning, {} of maxTotal {}",
                n(AgentState::Idle),
                n(AgentState::Leased) + n(AgentState::Cleaning),
                n(AgentState::Connecting),
                n(AgentState::Provisioning),
                p.members.len(),
                p.spec.max_total,
            );
            if let Some(e) = &p.last_error {
                part.push_str(&format!("; last error: {e}"));
            }
            parts.push(part);
        }
        parts.join("; ")
    }

    /// Number of waiting requests.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// Checks internal invariants; used by tests (cheap enough for debug builds).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_index()?;
        let mut seen = std::collections::HashSet::new();
        for l in self
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Active)
        {
            if !seen.insert(&l.agent) {
                return Err(format!("agent {} is in two active leases", l.agent));
            }
            let a = self
                .agents
                .get(&l.agent)
                .ok_or_else(|| format!("lease {} names missing agent {}", l.id, l.agent))?;
            if a.state != AgentState::Leased || a.lease.as_deref() != Some(&l.id) {
                return Err(format!(
                    "lease {} active but agent {} is {:?}",
                    l.id, a.id, a.state
                ));
            }
        }
        for a in self.agents.values() {
            if a.state == AgentState::Leased && a.lease.is_none() {
                return Err(format!("agent {} leased without a lease", a.id));
            }
        }
        Ok(())
    }

    /// Agents of a pool by state (for metrics).
    pub fn counts(&self) -> BTreeMap<(String, AgentState), u32> {
        let mut out = BTreeMap::new();
        for (name, p) in &self.pools {
            for s in AgentState::ALL {
                out.insert((name.clone(), s), p.counts[index::slot(s)]);
            }
        }
        out
    }
}
