//! Agent and lease deadlines without scanning: `tick` visits only what can be due.
//!
//! - Agents: each agent with a deadline (connect or provision timeout, heartbeat, cleanup) has
//!   one entry in a min-heap at a time no later than its earliest deadline (`Agent::check_at`).
//!   A heartbeat only moves `last_seen` (O(1)); when the entry comes up, the agent is checked:
//!   past a deadline it is terminated, otherwise its entry is pushed to its next deadline. So
//!   an agent costs one heap entry per heartbeat timeout, not one per heartbeat. Any change
//!   that can bring a deadline forward (a state change, a lease ending, a spec change) calls
//!   [`Engine::schedule`]; entries superseded by an earlier one, or of agents gone, are dropped
//!   when they come up, or when the heap is rebuilt because they outnumber the live ones.
//! - Leases: active leases ordered by expiry, kept in step by grants, renewals and ends.
//!
//! Pure like the rest of the engine: no I/O, time passed in.

use std::cmp::Reverse;
use std::time::Instant;

use super::*;

impl Engine {
    /// The earliest deadline of an agent (connect or provision timeout, heartbeat, cleanup);
    /// `None` when it has none (Terminating, or serving a lease before it registered).
    fn deadline(&self, a: &Agent, spec: &PoolSpec) -> Option<Instant> {
        match a.state {
            _ if a.lease.is_some()
                && matches!(a.state, AgentState::Provisioning | AgentState::Connecting) =>
            {
                None
            }
            AgentState::Provisioning | AgentState::Connecting => {
                a.since.checked_add(self.connect_limit(a, spec))
            }
            AgentState::Idle | AgentState::Leased | AgentState::Cleaning => {
                let heartbeat = if externally_leased(spec) {
                    None
                } else {
                    a.last_seen.checked_add(self.cfg.heartbeat_timeout)
                };
                let cleanup = if a.state == AgentState::Cleaning {
                    a.since
                        .checked_add(self.cfg.cleanup_timeout + spec.hooks.budget())
                } else {
                    None
                };
                match (heartbeat, cleanup) {
                    (Some(h), Some(c)) => Some(h.min(c)),
                    (h, c) => h.or(c),
                }
            }
            AgentState::Terminating => None,
        }
    }

    /// How long an agent may take to register. An adopted agent is reconnecting after a
    /// restart or a takeover, not starting: it gets its own grace.
    fn connect_limit(&self, a: &Agent, spec: &PoolSpec) -> std::time::Duration {
        if a.adopted {
            spec.connect_timeout.0.max(self.cfg.adopt_grace)
        } else {
            spec.connect_timeout.0
        }
    }

    /// Why an agent is past a deadline at `now`, if it is.
    fn overdue(&self, a: &Agent, spec: &PoolSpec, now: Instant) -> Option<Reason> {
        let connect_limit = self.connect_limit(a, spec);
        match a.state {
            // An agent known to serve a lease is never a leak: its lease's TTL bounds how long
            // it is waited for.
            _ if a.lease.is_some()
                && matches!(a.state, AgentState::Provisioning | AgentState::Connecting) =>
            {
                None
            }
            AgentState::Provisioning if now.duration_since(a.since) >= connect_limit => {
                Some(Reason::ProvisionTimeout)
            }
            AgentState::Connecting if now.duration_since(a.since) >= connect_limit => {
                Some(Reason::ConnectTimeout)
            }
            // An externally leased agent's liveness is the outside scheduler's word.
            AgentState::Idle | AgentState::Leased | AgentState::Cleaning
                if !externally_leased(spec)
                    && now.duration_since(a.last_seen) >= self.cfg.heartbeat_timeout =>
            {
                Some(Reason::HeartbeatLost)
            }
            // The pool's hooks run while Cleaning: their timeouts extend the deadline.
            AgentState::Cleaning
                if now.duration_since(a.since)
                    >= self.cfg.cleanup_timeout + spec.hooks.budget() =>
            {
                Some(Reason::CleanupTimeout)
            }
            _ => None,
        }
    }

    /// Makes sure the agent's heap entry comes up no later than its earliest deadline: pushes
    /// a new entry when the deadline is earlier than the one scheduled (or none is).
    pub(super) fn schedule(&mut self, id: &str) {
        let Some(a) = self.agents.get(id) else {
            return;
        };
        let Some(spec) = self.pools.get(&a.pool).map(|p| &p.spec) else {
            return;
        };
        let Some(due) = self.deadline(a, spec) else {
            return;
        };
        if a.check_at.is_some_and(|c| c <= due) {
            return;
        }
        let a = self.agents.get_mut(id).expect("exists");
        a.check_at = Some(due);
        self.deadlines.push(Reverse((due, a.id.clone())));
        // Entries of agents gone or superseded wait in the heap until they come up: rebuilt
        // from the live ones when they outnumber them (after as many pushes: amortised O(1)).
        if self.deadlines.len() > 2 * self.agents.len() + 1024 {
            self.deadlines = self
                .agents
                .values()
                .filter_map(|a| a.check_at.map(|t| Reverse((t, a.id.clone()))))
                .collect();
        }
    }

    /// Agents past a deadline (connect, heartbeat, cleanup) at `now`, by id. Visits only the
    /// heap entries that came up; the others' agents get a new entry at their next deadline.
    pub(super) fn agent_deadlines(&mut self, now: Instant) -> Vec<(AgentId, Reason)> {
        let mut doomed: Vec<(AgentId, Reason)> = Vec::new();
        let mut again: Vec<AgentId> = Vec::new();
        while self
            .deadlines
            .peek()
            .is_some_and(|Reverse((due, _))| *due <= now)
        {
            let Reverse((due, id)) = self.deadlines.pop().expect("peeked");
            let Some(a) = self.agents.get_mut(&id) else {
                continue;
            };
            // Superseded by an earlier entry, which came up already.
            if a.check_at != Some(due) {
                continue;
            }
            a.check_at = None;
            let a = &self.agents[&id];
            let spec = &self.pools[&a.pool].spec;
            match self.overdue(a, spec, now) {
                Some(r) => doomed.push((id, r)),
                None => again.push(id),
            }
        }
        for id in again {
            self.schedule(&id);
        }
        doomed.sort_by(|a, b| a.0.cmp(&b.0));
        doomed
    }

    /// Active leases past their expiry at `now`, soonest first: their agents.
    pub(super) fn expired_leases(&self, now: Instant) -> Vec<AgentId> {
        self.expiry
            .iter()
            .take_while(|(t, _)| *t <= now)
            .filter_map(|(_, id)| self.leases.get(id).map(|l| l.agent.clone()))
            .collect()
    }

    /// Files an active lease under its expiry.
    pub(super) fn lease_started(&mut self, id: &str) {
        if let Some(l) = self.leases.get(id) {
            self.expiry.insert((l.expires, l.id.clone()));
        }
    }

    /// Takes a lease out of the expiry index (it ended, or its expiry moves).
    pub(super) fn lease_stopped(&mut self, id: &str) {
        if let Some(l) = self.leases.get(id) {
            self.expiry.remove(&(l.expires, l.id.clone()));
        }
    }

    /// Checks the deadline indexes (tests): every agent with a deadline has a heap entry no
    /// later than it; the expiry index holds exactly the active leases.
    pub(super) fn check_deadlines(&self) -> Result<(), String> {
        let entries: std::collections::HashSet<(Instant, &str)> = self
            .deadlines
            .iter()
            .map(|Reverse((t, id))| (*t, id.as_str()))
            .collect();
        for a in self.agents.values() {
            let spec = &self.pools[&a.pool].spec;
            if let Some(due) = self.deadline(a, spec) {
                match a.check_at {
                    Some(c) if c <= due && entries.contains(&(c, a.id.as_str())) => {}
                    other => {
                        return Err(format!(
                            "agent {} due at {due:?} is checked at {other:?} (in the heap: {})",
                            a.id,
                            other.is_some_and(|c| entries.contains(&(c, a.id.as_str())))
                        ));
                    }
                }
            }
        }
        let active: BTreeSet<(Instant, LeaseId)> = self
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Active)
            .map(|l| (l.expires, l.id.clone()))
            .collect();
        if active != self.expiry {
            return Err(format!(
                "expiry index {:?} differs from the active leases {active:?}",
                self.expiry
            ));
        }
        Ok(())
    }
}
