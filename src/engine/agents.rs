//! Agent events of the engine: the backend started or failed to start an agent, it
//! registered (possibly reporting a lease to restore), heartbeats and health, cleanup done,
//! disconnected, gone; adoption of existing agents; retirement; and the one place agents move
//! to Terminating, with a reason.
//!
//! Pure like the rest of the engine: no I/O, time passed in.

use std::time::Instant;

use super::*;

impl Engine {
    /// An agent by id.
    pub fn agent(&self, id: &str) -> Option<&Agent> {
        self.agents.get(id)
    }

    /// All agents.
    pub fn agents(&self) -> impl Iterator<Item = &Agent> {
        self.agents.values()
    }

    /// The backend started the agent (Provisioning -> Connecting).
    pub fn agent_started(&mut self, id: &str, now: Instant) {
        // Not a success yet: a container that starts and then exits before its agent registers
        // is a failure (see `agent_exited`); only a registration resets the backoff.
        if let Some(a) = self.agents.get(id)
            && a.state == AgentState::Provisioning
        {
            self.set_state(id, AgentState::Connecting, now);
        }
    }

    /// The backend reports the agent cannot start yet for a reason outside warmpool's control
    /// (pod unschedulable or scheduling-gated): it is kept, not timed out and recreated in a loop.
    pub fn hold_pending(&mut self, id: &str, now: Instant) {
        if let Some(a) = self.agents.get_mut(id)
            && a.state == AgentState::Provisioning
        {
            a.since = now;
        }
    }

    /// The backend could not start the agent.
    pub fn provision_failed(&mut self, id: &str, error: &str, now: Instant) {
        let Some(a) = self.agents.get(id) else { return };
        // One timed out already (provision-timeout) was counted then.
        if a.state != AgentState::Terminating {
            self.count_failure(id, error, now);
        }
        self.terminate(id, Reason::ProvisionFailed(error.to_string()), now);
        // It never started: nothing will report its exit, so it is gone now.
        self.remove_agent(id);
        self.reconcile(now);
    }

    /// The backend reports that a started agent cannot run (its pod waits on an image that is
    /// missing): a failed provision, with backoff. The agent moves to Terminating (the backend
    /// deletes what is left) and stays counted until the backend reports it gone.
    pub fn start_failed(&mut self, id: &str, error: &str, now: Instant) {
        let Some(a) = self.agents.get(id) else { return };
        if !matches!(a.state, AgentState::Provisioning | AgentState::Connecting) {
            return;
        }
        self.count_failure(id, error, now);
        self.terminate(id, Reason::StartFailed(error.to_string()), now);
        self.reconcile(now);
    }

    /// Records a failed provision of `id`: counted, the pool's last error, and exponential
    /// backoff before the pool's next provision ([`backoff`]); an agent registering resets it.
    pub(super) fn count_failure(&mut self, id: &str, error: &str, now: Instant) {
        let Some(a) = self.agents.get(id) else { return };
        let pool = a.pool.clone();
        if let Some(p) = self.pools.get_mut(&pool) {
            p.provision_failures_total += 1;
        }
        self.back_off(&pool, &format!("agent {id}: {error}"), now);
    }

    /// One more failure in a row for `pool` (`what` says which): its next provision waits
    /// ([`backoff`]), and its last error says why and until when.
    pub(super) fn back_off(&mut self, pool: &str, what: &str, now: Instant) {
        if let Some(p) = self.pools.get_mut(pool) {
            p.failures_in_a_row += 1;
            let pause = backoff(pool, p.failures_in_a_row);
            p.backoff_until = Some(now + pause);
            p.last_error = Some(format!(
                "{what} (failure {} in a row; next attempt in {} ms)",
                p.failures_in_a_row,
                pause.as_millis()
            ));
        }
    }

    /// Checks whether an agent may register (before the hub accepts its connection).
    pub fn check_connect(&self, id: &str, claimed_pool: Option<&str>) -> Result<(), ConnectError> {
        let a = self
            .agents
            .get(id)
            .ok_or_else(|| ConnectError::UnknownAgent(id.to_string()))?;
        if let Some(claimed) = claimed_pool
            && !claimed.is_empty()
            && claimed != a.pool
        {
            return Err(ConnectError::WrongPool {
                agent: id.to_string(),
                claimed: claimed.to_string(),
                actual: a.pool.clone(),
            });
        }
        match a.state {
            AgentState::Provisioning | AgentState::Connecting => Ok(()),
            AgentState::Terminating => Err(ConnectError::Terminating(id.to_string())),
            _ if a.away => Ok(()),
            _ => Err(ConnectError::AlreadyConnected(id.to_string())),
        }
    }

    /// An agent of an external pool joined with the pool's join token: it is added and
    /// registered at once (as Idle, or Leased when it reports a lease it still serves).
    pub fn agent_joined(
        &mut self,
        id: &str,
        pool: &str,
        health: Health,
        lease: Option<&str>,
        uses: u32,
        now: Instant,
    ) -> Result<(), ConnectError> {
        let p = match self.pools.get(pool) {
            Some(p) if p.spec.external && !p.removed => p,
            _ => return Err(ConnectError::NotJoinable(pool.to_string())),
        };
        if let Some(a) = self.agents.get(id) {
            if a.away && a.pool == pool {
                return self.agent_registered(id, Some(pool), health, lease, uses, now);
            }
            return Err(if a.state == AgentState::Terminating {
                ConnectError::Terminating(id.to_string())
            } else if a.pool != pool {
                ConnectError::WrongPool {
                    agent: id.to_string(),
                    claimed: pool.to_string(),
                    actual: a.pool.clone(),
                }
            } else {
                ConnectError::AlreadyConnected(id.to_string())
            });
        }
        if p.members.len() as u32 >= p.spec.max_total {
            return Err(ConnectError::PoolFull {
                pool: pool.to_string(),
                max: p.spec.max_total,
            });
        }
        self.insert_agent(Agent::new(id, pool, AgentState::Connecting, now), now);
        self.agent_registered(id, Some(pool), health, lease, uses, now)
    }

    /// The agent registered over the hub (Connecting -> Idle).
    pub fn agent_connected(
        &mut self,
        id: &str,
        pool: Option<&str>,
        health: Health,
        now: Instant,
    ) -> Result<(), ConnectError> {
        self.agent_registered(id, pool, health, None, 0, now)
    }

    /// Like [`Engine::agent_connected`], for an agent that reports a lease it still serves (it
    /// reconnected after a service restart): the lease is restored, with [`RESTORED_LEASE_TTL`]
    /// until its holder renews it.
    pub fn agent_registered(
        &mut self,
        id: &str,
        pool: Option<&str>,
        health: Health,
        lease: Option<&str>,
        uses: u32,
        now: Instant,
    ) -> Result<(), ConnectError> {
        self.check_connect(id, pool)?;
        let a = self.agents.get_mut(id).expect("checked");
        if a.away {
            // Back within the heartbeat timeout: it keeps its state and its lease.
            a.away = false;
            a.last_seen = now;
            a.health = health;
            tracing::info!(agent = id, state = a.state.as_str(), "agent reconnected");
            if a.state == AgentState::Cleaning {
                // Its lease ended while it was away: the release never reached it.
                let lease = a.cleaning_for.as_deref().or(lease).unwrap_or_default();
                let lease = lease.to_string();
                let hooks = self.pools[&a.pool].spec.hooks.clone();
                self.actions.push(Action::Release {
                    agent: id.to_string(),
                    lease,
                    hooks,
                    quiet: false,
                });
            }
            return Ok(());
        }
        // An adopted agent keeps counting toward maxUses from what it reports.
        a.uses = a.uses.max(uses);
        // An adopted agent's provision-to-idle time says nothing about this pool's refill.
        let adopted = std::mem::take(&mut a.adopted);
        a.health = health;
        a.last_seen = now;
        let pool_name = a.pool.clone();
        // Agents register again: the pool is no longer failing, and provisions go at full pace.
        if let Some(p) = self.pools.get_mut(&pool_name) {
            p.last_error = None;
            p.failures_in_a_row = 0;
            p.backoff_until = None;
        }
        let a = self.agents.get_mut(id).expect("checked");
        let seconds = now.duration_since(a.created).as_secs_f64();
        let pool = a.pool.clone();
        if let Some(lease_id) = lease
            && !self.leases.contains_key(lease_id)
        {
            let a = self.agents.get_mut(id).expect("checked");
            // The restored lease is among the uses the agent reported.
            a.uses = a.uses.max(1);
            // What ran for it under the previous instance is unknown: its release cleans up.
            a.ran = true;
            a.lease = Some(lease_id.to_string());
            let labels = self.pools[&pool].spec.labels.clone();
            self.leases.insert(
                lease_id.to_string(),
                Lease {
                    id: lease_id.to_string(),
                    agent: id.to_string(),
                    pool: pool.clone(),
                    labels,
                    holder: "restored after a service restart".into(),
                    selector: String::new(),
                    granted: now,
                    expires: now + RESTORED_LEASE_TTL,
                    ttl: RESTORED_LEASE_TTL,
                    state: LeaseState::Active,
                    end_reason: None,
                    idempotency_key: None,
                },
            );
            self.lease_started(lease_id);
            tracing::info!(
                agent = id,
                lease = lease_id,
                "restored lease reported by agent"
            );
            self.set_state(id, AgentState::Leased, now);
            self.reconcile(now);
            return Ok(());
        }
        if !self.pools[&pool].spec.external {
            if !adopted && let Some(p) = self.pools.get_mut(&pool) {
                p.policy.learner.refill_measured(seconds);
            }
            self.actions
                .push(Action::Observe(Observation::ProvisionToIdle {
                    pool,
                    seconds,
                }));
        }
        self.set_state(id, AgentState::Idle, now);
        self.check_health(id, now);
        self.reconcile(now);
        Ok(())
    }

    /// Marks an agent for replacement (its template is outdated). Idle agents are rotated once
    /// a fresh replacement is idle, paced by the rate limit; a leased one at release.
    pub fn retire(&mut self, id: &str, now: Instant) {
        if self.agents.get(id).is_some_and(|a| !a.retire) {
            self.mark_retired(id);
            self.reconcile(now);
        }
    }

    /// A heartbeat with health.
    pub fn agent_heartbeat(&mut self, id: &str, health: Health, now: Instant) {
        let Some(a) = self.agents.get_mut(id) else {
            return;
        };
        a.last_seen = now;
        a.health = health;
        // Only a health problem changes anything; a plain heartbeat costs no reconcile pass.
        let before = a.state;
        self.check_health(id, now);
        if self.agents.get(id).is_some_and(|a| a.state != before) {
            self.reconcile(now);
        }
    }

    /// Any frame from the agent proves it is alive.
    pub fn agent_seen(&mut self, id: &str, now: Instant) {
        if let Some(a) = self.agents.get_mut(id) {
            a.last_seen = now;
        }
    }

    /// The agent finished cleaning after a release (Cleaning -> Idle, or recycled if unhealthy).
    pub fn agent_ready(&mut self, id: &str, health: Health, now: Instant) {
        self.agent_ready_for(id, None, health, &[], now);
    }

    /// Like [`Engine::agent_ready`], with the results of the pool's hooks.
    pub fn agent_ready_after_hooks(
        &mut self,
        id: &str,
        health: Health,
        hooks: &[crate::hooks::HookResult],
        now: Instant,
    ) {
        self.agent_ready_for(id, None, health, hooks, now);
    }

    /// The agent's `ready` for the release of `lease` (None: it did not say), with its health
    /// and the results of the pool's hooks. It ends the agent's Cleaning only when it is for the
    /// lease being cleaned up after: a late `ready` for an earlier lease (an agent that cleaned
    /// after a quiet release, see `quiet_release`) leaves a later cleanup running, and its health
    /// is checked like a heartbeat's. An agent whose cleanup or health hook failed (see
    /// [`crate::hooks::verdict`]) is recycled instead of returning to idle; its replacement is
    /// provisioned under the pool's rate limit.
    pub fn agent_ready_for(
        &mut self,
        id: &str,
        lease: Option<&str>,
        health: Health,
        hooks: &[crate::hooks::HookResult],
        now: Instant,
    ) {
        let Some(a) = self.agents.get_mut(id) else {
            return;
        };
        a.last_seen = now;
        a.health = health;
        let other = lease.is_some_and(|l| a.cleaning_for.as_deref().is_some_and(|c| c != l));
        if a.state != AgentState::Cleaning || other {
            tracing::debug!(
                agent = id,
                lease,
                state = a.state.as_str(),
                "ready for no cleanup under way"
            );
            let before = a.state;
            if matches!(before, AgentState::Idle | AgentState::Leased) {
                self.check_health(id, now);
                if self.agents.get(id).is_some_and(|a| a.state != before) {
                    self.reconcile(now);
                }
            }
            return;
        }
        a.cleaning_for = None;
        // Cleaned: nothing it ran is left (its health, checked below, says what is).
        a.ran = false;
        let Some(pool) = self.pools.get_mut(&a.pool) else {
            return;
        };
        if let Some((kind, why)) = crate::hooks::verdict(&pool.spec.hooks, hooks) {
            pool.hook_failures_total += 1;
            pool.last_hook_failure = Some(format!("agent {id}: {why}"));
            let reason = match kind {
                crate::hooks::HookKind::Cleanup => Reason::CleanupFailed(why),
                crate::hooks::HookKind::Health => Reason::HealthCheckFailed(why),
            };
            self.terminate(id, reason, now);
            self.reconcile(now);
            return;
        }
        if !pool.spec.hooks.is_empty() {
            pool.last_hook_failure = None;
        }
        self.set_state(id, AgentState::Idle, now);
        self.check_health(id, now);
        self.reconcile(now);
    }

    /// The connection of an agent that keeps its job across connections dropped. A leased one
    /// keeps its lease and state until the heartbeat timeout, within which it may register
    /// again; any other is handled as [`Engine::agent_disconnected`].
    pub fn agent_away(&mut self, id: &str, why: &str, now: Instant) {
        match self.agents.get_mut(id) {
            Some(a) if a.state == AgentState::Leased => {
                tracing::info!(agent = id, why, "leased agent disconnected; waiting for it");
                a.away = true;
            }
            _ => self.agent_disconnected(id, why, now),
        }
    }

    /// The agent's connection closed.
    pub fn agent_disconnected(&mut self, id: &str, why: &str, now: Instant) {
        let Some(a) = self.agents.get(id) else { return };
        if matches!(a.state, AgentState::Terminating) {
            return;
        }
        self.terminate(id, Reason::Disconnected(why.to_string()), now);
        self.reconcile(now);
    }

    /// The backend reports the agent is gone (process reaped, pod ended or deleted). An agent
    /// that had not registered yet (and serves no lease) failed to start: counted as a failed
    /// provision, with backoff, so a container that crashes at start is not replaced in a loop.
    pub fn agent_exited(&mut self, id: &str, detail: &str, now: Instant) {
        let Some(a) = self.agents.get(id) else { return };
        let unregistered = a.lease.is_none()
            && matches!(a.state, AgentState::Provisioning | AgentState::Connecting);
        if unregistered {
            let error = format!("exited before it registered: {detail}");
            self.count_failure(id, &error, now);
            self.terminate(id, Reason::StartFailed(error), now);
        } else if a.state != AgentState::Terminating {
            self.terminate(id, Reason::Exited(detail.to_string()), now);
        }
        // A removed pool disappears with its last agent.
        self.remove_agent(id);
        self.reconcile(now);
    }

    pub(super) fn check_health(&mut self, id: &str, now: Instant) {
        let a = &self.agents[id];
        let limits = &self.pools[&a.pool].spec.health;
        let mut problems = Vec::new();
        if a.health.workspace_bytes > limits.max_workspace_bytes {
            problems.push(format!(
                "workspace holds {} bytes (limit {})",
                a.health.workspace_bytes, limits.max_workspace_bytes
            ));
        }
        // While a job runs its processes are expected; leftovers count when the agent is idle
        // (after cleanup, and in idle heartbeats).
        if a.state == AgentState::Idle
            && a.health.leftover_processes > limits.max_leftover_processes
        {
            problems.push(format!(
                "{} leftover processes (limit {})",
                a.health.leftover_processes, limits.max_leftover_processes
            ));
        }
        if problems.is_empty() {
            return;
        }
        let why = problems.join(", ");
        match a.state {
            AgentState::Idle => self.terminate(id, Reason::Unhealthy(why), now),
            // A job that grew the workspace past the limit: recycle instead of reusing.
            // (Heartbeats while Cleaning describe the workspace before the wipe; `ready`
            // reports the state after it, checked once the agent is Idle again.)
            AgentState::Leased => {
                self.agents.get_mut(id).expect("exists").unhealthy = Some(why);
            }
            _ => {}
        }
    }

    /// Moves an agent to Terminating (once), failing its lease if it had one.
    pub(super) fn terminate(&mut self, id: &str, reason: Reason, now: Instant) {
        let Some(a) = self.agents.get(id) else { return };
        if a.state == AgentState::Terminating {
            return;
        }
        let pool = a.pool.clone();
        if let Some(lease) = a.lease.clone()
            && self
                .leases
                .get(&lease)
                .is_some_and(|l| l.state == LeaseState::Active)
        {
            let state = if reason == Reason::LeaseExpired {
                LeaseState::Expired
            } else {
                LeaseState::Failed
            };
            self.end_lease(&lease, state, format!("agent {id} {reason}"), now);
        }
        if reason == Reason::ConnectTimeout
            && let Some(p) = self.pools.get_mut(&pool)
        {
            // A leak is a failed provision too: a pool whose agents never register backs off
            // instead of starting (and, for Jenkins, creating a node) every connectTimeout.
            p.leaks_total += 1;
            self.back_off(
                &pool,
                &format!("agent {id} did not register within connectTimeout"),
                now,
            );
        }
        if reason == Reason::ProvisionTimeout {
            // Not running within connectTimeout of its creation (stuck creating, or waiting on
            // something that does not come): a failed provision, with backoff.
            self.count_failure(id, "not started within connectTimeout of its creation", now);
        }
        tracing::info!(agent = id, pool = %pool, reason = %reason, "terminating agent");
        self.set_state(id, AgentState::Terminating, now);
        let a = self.agents.get_mut(id).expect("exists");
        a.terminate_reason = Some(reason.clone());
        self.actions.push(Action::Terminate {
            pool,
            agent: id.to_string(),
            reason,
        });
    }
}
