//! The async shell around the pure engine.
//!
//! Owns the engine behind a short-held mutex, the wall clock, the waiting lease requests'
//! one-shot senders, and the two background loops (the tick that applies deadlines, and the
//! backend-event loop). Every engine call goes through [`Service::apply`], which takes the
//! recorded actions and executes them after the lock is released. Executing an action never
//! blocks: grants complete one-shots, agent messages are `try_send` into bounded per-connection
//! queues (a full queue disconnects that agent), backend work is spawned.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::auth::AgentKey;
use crate::backend::{Backend, BackendEvent, EventSink, PoolEvent, ProvisionRequest};
use crate::engine::{
    Action, Engine, EngineConfig, Lease, LeaseDecision, LeaseError, LeaseRequest, Observation,
    Pacer, Reason, RequestId,
};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{HubMessage, close};
use crate::spec::PoolSpec;

/// Settings of the shell.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Engine settings.
    pub engine: EngineConfig,
    /// Heartbeat period both ways; agents silent for the engine's heartbeat timeout are lost.
    pub heartbeat_interval: Duration,
    /// How often deadlines are applied.
    pub tick: Duration,
    /// Largest WebSocket message accepted from agents and exec clients.
    pub max_frame_bytes: usize,
    /// Messages queued per agent connection before that agent is disconnected as too slow.
    pub agent_queue: usize,
    /// Agent handshakes accepted per second on the hub (burst = the same number).
    pub handshakes_per_second: u32,
    /// Time an agent has to send `hello` after connecting.
    pub hello_timeout: Duration,
    /// Longest a write to an agent's socket may wait (the agent stopped reading) before the
    /// agent is disconnected as too slow (4429).
    pub agent_send_timeout: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            engine: EngineConfig {
                agent_scan_interval: Duration::from_millis(200),
                heartbeat_timeout: Duration::from_secs(90),
                ..EngineConfig::default()
            },
            // Each idle agent costs the service two messages per interval, mostly kernel and
            // wake-up time: 30 s keeps 10,000 idle agents near 2 % of a core
            // (docs/BENCHMARKS.md); a half-open connection is noticed within 90 s.
            heartbeat_interval: Duration::from_secs(30),
            tick: Duration::from_millis(50),
            max_frame_bytes: crate::protocol::DEFAULT_MAX_FRAME_BYTES,
            agent_queue: 256,
            handshakes_per_second: 50,
            hello_timeout: Duration::from_secs(10),
            agent_send_timeout: Duration::from_secs(10),
        }
    }
}

type Waiter = oneshot::Sender<Result<Lease, LeaseError>>;

/// The running service state shared by the hub, the API and the loops.
pub struct Service {
    /// Settings.
    pub cfg: ServiceConfig,
    engine: Mutex<Engine>,
    epoch: (Instant, SystemTime),
    /// Metrics registry.
    pub metrics: Metrics,
    /// Key agents' tokens derive from.
    pub key: AgentKey,
    /// Agent connections.
    pub hub: Hub,
    backend: Arc<dyn Backend>,
    backend_tx: EventSink,
    specs: DashMap<String, PoolSpec>,
    waiters: DashMap<RequestId, Waiter>,
    /// Fired when shutdown begins.
    pub shutdown: CancellationToken,
    ready: AtomicBool,
    /// Set when a shutdown leaves the agents to the next instance: from then on nothing is
    /// provisioned or terminated, whatever the engine decides.
    detached: AtomicBool,
    /// The Jenkins connector: the backend of pools with a `jenkins` block (their agents are
    /// Jenkins nodes with a process or pod each) and the poll that feeds their events.
    pub jenkins: std::sync::OnceLock<Arc<crate::jenkins::Connector>>,
}

/// A lease request that is waiting; dropping it withdraws the request and releases a lease that
/// was granted too late for its client.
pub struct Pending {
    svc: Arc<Service>,
    id: RequestId,
    rx: Option<oneshot::Receiver<Result<Lease, LeaseError>>>,
}

impl Pending {
    /// Waits for the outcome.
    pub async fn outcome(mut self) -> Result<Lease, LeaseError> {
        let rx = self.rx.as_mut().expect("outcome awaited once");
        let r = rx.await;
        self.rx = None;
        match r {
            Ok(r) => r,
            Err(_) => Err(LeaseError::ShuttingDown),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        // Close first: a grant sent after this fails and is released by dispatch.
        rx.close();
        self.svc.waiters.remove(&self.id);
        self.svc.apply(|e, now| e.cancel_request(self.id, now));
        if let Ok(Ok(lease)) = rx.try_recv() {
            tracing::info!(lease = %lease.id, "client left before its grant arrived; releasing");
            let _ = self.svc.apply(|e, now| e.release(&lease.id, now));
        }
    }
}

/// What a lease request turned into.
pub enum Requested {
    /// Granted at once (or an existing lease for the idempotency key, `true`).
    Now(Box<Lease>, bool),
    /// Waiting.
    Waiting(Pending),
}

impl Service {
    /// Builds the service and starts its loops on the current runtime.
    pub fn start(
        cfg: ServiceConfig,
        key: AgentKey,
        backend: Arc<dyn Backend>,
        pacer: Box<dyn Pacer>,
        metrics: Metrics,
    ) -> Arc<Service> {
        let instance: String = {
            let n: u32 = rand::random();
            format!("{:06x}", n & 0xff_ffff)
        };
        let (backend_tx, backend_rx) = mpsc::unbounded_channel();
        let epoch = (Instant::now(), SystemTime::now());
        let mut engine = Engine::new(cfg.engine.clone(), &instance, pacer);
        engine.set_wall_clock(epoch.0, epoch.1);
        let svc = Arc::new(Service {
            engine: Mutex::new(engine),
            epoch,
            hub: Hub::new(cfg.handshakes_per_second),
            cfg,
            metrics,
            key,
            backend,
            backend_tx,
            specs: DashMap::new(),
            waiters: DashMap::new(),
            shutdown: CancellationToken::new(),
            ready: AtomicBool::new(true),
            detached: AtomicBool::new(false),
            jenkins: std::sync::OnceLock::new(),
        });
        tokio::spawn(tick_loop(Arc::downgrade(&svc), svc.cfg.tick));
        tokio::spawn(deferred_loop(Arc::downgrade(&svc)));
        tokio::spawn(backend_loop(Arc::downgrade(&svc), backend_rx));
        svc
    }

    /// Runs one engine call under the lock, then executes the actions it recorded.
    pub fn apply<R>(&self, f: impl FnOnce(&mut Engine, Instant) -> R) -> R {
        let now = Instant::now();
        let (r, actions) = {
            let mut e = self.engine.lock().expect("engine lock poisoned");
            let r = f(&mut e, now);
            // Messages to agents are queued before the lock is free, so each agent hears them
            // in the engine's order: a quiet `release` of one lease before the `leased` of the
            // next, which another request may grant the moment the lock is free.
            let actions: Vec<Action> = e
                .take_actions()
                .into_iter()
                .filter_map(|a| self.tell_agent(a))
                .collect();
            (r, actions)
        };
        self.dispatch(actions);
        r
    }

    /// Reads engine state under the lock.
    pub fn read<R>(&self, f: impl FnOnce(&Engine) -> R) -> R {
        f(&self.engine.lock().expect("engine lock poisoned"))
    }

    /// Wall-clock time of an engine instant.
    pub fn wall(&self, t: Instant) -> SystemTime {
        match t.checked_duration_since(self.epoch.0) {
            Some(d) => self.epoch.1 + d,
            None => self.epoch.1 - self.epoch.0.duration_since(t),
        }
    }

    /// Where backends and their watchers report agent events.
    pub fn backend_sink(&self) -> EventSink {
        self.backend_tx.clone()
    }

    /// Removes a pool (idle agents stop now, leased ones at release).
    pub fn remove_pool(&self, name: &str) {
        self.apply(|e, now| e.remove_pool(name, now));
        self.specs.remove(name);
    }

    /// The backend a pool's agents come from: the Jenkins connector for a pool with a
    /// `jenkins` block, else the service's backend.
    fn backend_of(&self, pool: &str) -> &dyn Backend {
        if self.specs.get(pool).is_some_and(|s| s.jenkins.is_some())
            && let Some(c) = self.jenkins.get()
        {
            return &**c;
        }
        &*self.backend
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Adds or updates a pool (the spec must be valid).
    pub fn upsert_pool(&self, name: &str, spec: PoolSpec) {
        self.specs.insert(name.to_string(), spec.clone());
        self.metrics.init_pool(name);
        self.apply(|e, now| e.upsert_pool(name, spec, now));
    }

    /// Requests a lease; see [`Engine::request_lease`].
    pub fn request_lease(self: &Arc<Self>, req: LeaseRequest) -> Result<Requested, LeaseError> {
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        let decision = self.apply(|e, now| {
            let d = e.request_lease(req, now);
            if let Ok(LeaseDecision::Queued(id)) = &d {
                // Registered under the engine lock, so no grant can be dispatched before it.
                self.waiters.insert(*id, tx.take().expect("once"));
            }
            d
        });
        let result = match decision {
            Ok(LeaseDecision::Granted(l)) => Ok(Requested::Now(Box::new(l), false)),
            Ok(LeaseDecision::Existing(l)) => Ok(Requested::Now(Box::new(l), true)),
            Ok(LeaseDecision::Queued(id)) => Ok(Requested::Waiting(Pending {
                svc: self.clone(),
                id,
                rx: Some(rx),
            })),
            Err(e) => Err(e),
        };
        let label = match &result {
            Ok(Requested::Now(_, _)) => "granted",
            Ok(Requested::Waiting(_)) => "queued",
            Err(e) => e.code(),
        };
        self.metrics
            .lease_requests
            .with_label_values(&[label])
            .inc();
        result
    }

    /// Marks the service ready or not (a leader-election standby is not ready).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// True while the service grants leases.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Queues an action that is a message to an agent (`leased`, `release`) on its connection,
    /// under the engine lock (see [`Service::apply`]); any other action is handed back. Queuing
    /// never waits and never takes the engine lock (a full queue closes the connection).
    fn tell_agent(&self, a: Action) -> Option<Action> {
        let (agent, m) = match a {
            Action::Bound { agent, pool, lease } => {
                let lease_token = Some(self.key.lease_token(&lease, &agent, &pool));
                (agent, HubMessage::Leased { lease, lease_token })
            }
            // The pool's current hooks travel with every release, so a spec change reaches
            // agents without a reconnect.
            Action::Release {
                agent,
                lease,
                hooks,
                quiet,
            } => (
                agent,
                HubMessage::Release {
                    lease,
                    hooks,
                    quiet,
                },
            ),
            other => return Some(other),
        };
        // `leased` and a quiet `release` wait for the next message to this agent (the lease's
        // `exec`, the next lease's `leased`), so they cost no write and no wake-up of the agent
        // of their own (at most `hub::DEFER_AT_MOST` late). A plain `release` goes at once: the
        // agent's cleanup is on the way back to idle.
        if matches!(
            m,
            HubMessage::Leased { .. } | HubMessage::Release { quiet: true, .. }
        ) {
            self.hub.send_deferred(self, &agent, m);
        } else {
            self.hub.send(self, &agent, m);
        }
        None
    }

    fn dispatch(&self, actions: Vec<Action>) {
        let detached = self.detached.load(Ordering::Relaxed);
        for a in actions {
            match a {
                Action::Provision { .. } | Action::Terminate { .. } if detached => {}
                a @ (Action::Bound { .. } | Action::Release { .. }) => {
                    // Sent under the engine lock by `apply`; here only if handed over otherwise.
                    let _ = self.tell_agent(a);
                }
                Action::Provision { pool, agent } => {
                    let Some(spec) = self.specs.get(&pool).map(|s| s.clone()) else {
                        let _ = self.backend_tx.send(BackendEvent::Failed {
                            error: format!("pool {pool} has no spec"),
                            pool,
                            agent,
                        });
                        continue;
                    };
                    self.metrics
                        .provisions
                        .with_label_values(&[&pool, "requested"])
                        .inc();
                    tracing::info!(pool = %pool, agent = %agent, "provisioning agent");
                    let token = self.key.token(&agent);
                    self.backend_of(&pool).provision(
                        ProvisionRequest {
                            pool,
                            agent,
                            token,
                            spec,
                        },
                        self.backend_tx.clone(),
                    );
                }
                Action::Terminate {
                    pool,
                    agent,
                    reason,
                } => {
                    self.metrics
                        .recycles
                        .with_label_values(&[&pool, reason.as_str()])
                        .inc();
                    let backend = self.backend_of(&pool);
                    if reason == Reason::ConnectTimeout {
                        tracing::warn!(pool = %pool, agent = %agent, "agent never connected: leak");
                        self.metrics.leaks.with_label_values(&[&pool]).inc();
                        backend.record(
                            &pool,
                            PoolEvent::Leak {
                                agent: agent.clone(),
                            },
                        );
                    }
                    if let Reason::CleanupFailed(detail) | Reason::HealthCheckFailed(detail) =
                        &reason
                    {
                        tracing::warn!(pool = %pool, agent = %agent, reason = reason.as_str(),
                            detail = %detail, "hook failed after a lease; recycling the agent");
                        backend.record(
                            &pool,
                            PoolEvent::HookFailed {
                                agent: agent.clone(),
                                reason: reason.as_str(),
                                detail: detail.clone(),
                            },
                        );
                    }
                    if reason == Reason::ProvisionTimeout {
                        backend.record(
                            &pool,
                            PoolEvent::ProvisionFailed {
                                agent: agent.clone(),
                                error: "not started within connectTimeout of its creation; deleted"
                                    .into(),
                            },
                        );
                    }
                    if let Reason::ProvisionFailed(error) | Reason::StartFailed(error) = &reason {
                        backend.record(
                            &pool,
                            PoolEvent::ProvisionFailed {
                                agent: agent.clone(),
                                error: error.clone(),
                            },
                        );
                    }
                    // The agents warmpool started exit (4410): the backend is stopping them.
                    // An external machine is not ours to stop: at shutdown it hears "going
                    // away" (1001) and reconnects to the next instance.
                    let external = self.specs.get(&pool).is_some_and(|s| s.external);
                    let code = match reason {
                        Reason::Shutdown if external => close::GOING_AWAY,
                        _ => close::TERMINATED,
                    };
                    let told = self.hub.close(
                        &agent,
                        code,
                        &format!("agent {agent} terminated: {reason}"),
                    );
                    // An external machine is not warmpool's to stop: once its connection is
                    // closed it is gone (it may join again).
                    if self.specs.get(&pool).is_some_and(|s| s.external) {
                        let _ = self.backend_tx.send(BackendEvent::Exited {
                            agent,
                            detail: "external agent disconnected".into(),
                        });
                        continue;
                    }
                    // An agent that exited or never started has nothing left to stop; one that
                    // failed to start is stopped by the backend that reported it.
                    if matches!(
                        reason,
                        Reason::Exited(_) | Reason::ProvisionFailed(_) | Reason::StartFailed(_)
                    ) {
                        continue;
                    }
                    // A connected agent told to exit ends by itself (a pod then reaches a
                    // terminal phase and stops counting toward maxTotal at once, instead of
                    // waiting for a graceful delete): the backend stops it only if it does not.
                    if told && exits_when_told(&reason) {
                        backend.retire(&agent, self.backend_tx.clone());
                    } else {
                        backend.terminate(&agent, self.backend_tx.clone());
                    }
                }
                Action::Drain { pool, agent } => {
                    if let Some(c) = self.jenkins.get() {
                        c.drain(&pool, &agent);
                    }
                }
                Action::Granted { request, lease } => {
                    let delivered = match self.waiters.remove(&request) {
                        Some((_, tx)) => tx.send(Ok(lease.clone())).is_ok(),
                        None => false,
                    };
                    if !delivered {
                        tracing::info!(lease = %lease.id, "grant had no waiting client; releasing");
                        let _ = self.apply(|e, now| e.release(&lease.id, now));
                    }
                }
                Action::WaitFailed { request, error } => {
                    if let Some((_, tx)) = self.waiters.remove(&request) {
                        let _ = tx.send(Err(error));
                    }
                }
                Action::LeaseEnded { lease } => {
                    self.metrics
                        .leases_ended
                        .with_label_values(&[&lease.pool, lease.state.as_str()])
                        .inc();
                    tracing::info!(lease = %lease.id, agent = %lease.agent, pool = %lease.pool,
                        state = lease.state.as_str(), reason = lease.end_reason.as_deref().unwrap_or(""), "lease ended");
                    self.hub.lease_ended(self, &lease);
                }
                Action::Observe(o) => match o {
                    Observation::LeaseWait { pool, seconds } => self
                        .metrics
                        .lease_wait
                        .with_label_values(&[&pool])
                        .observe(seconds),
                    Observation::ProvisionToIdle { pool, seconds } => self
                        .metrics
                        .provision_to_idle
                        .with_label_values(&[&pool])
                        .observe(seconds),
                    Observation::Leased { pool, warm } => self
                        .metrics
                        .leases
                        .with_label_values(&[pool.as_str(), if warm { "warm" } else { "cold" }])
                        .inc(),
                    Observation::Throttled { pool } => {
                        self.metrics.throttled.with_label_values(&[&pool]).inc();
                        self.backend_of(&pool).record(&pool, PoolEvent::Throttled);
                    }
                },
            }
        }
    }

    /// Refreshes the agent gauges from the engine and renders `/metrics`.
    pub fn render_metrics(&self) -> String {
        let (counts, pools) = self.read(|e| (e.counts(), e.pool_status()));
        self.metrics.desired_idle.reset();
        self.metrics.desired_idle_source.reset();
        self.metrics.arrival_rate.reset();
        self.metrics.refill_seconds.reset();
        self.metrics.warm_hit_ratio.reset();
        for p in &pools {
            self.metrics.pool_policy(p);
        }
        self.metrics.warm_hit_target.reset();
        for p in &pools {
            if let Some(t) = self.specs.get(&p.name).and_then(|s| s.warm_hit_target) {
                self.metrics
                    .warm_hit_target
                    .with_label_values(&[&p.name])
                    .set(t);
            }
        }
        self.metrics.ready.set(i64::from(self.is_ready()));
        self.metrics.agents.reset();
        // Every state of every pool, at zero unless the engine counts agents in it.
        for p in &pools {
            for state in crate::engine::AgentState::ALL {
                self.metrics
                    .agents
                    .with_label_values(&[&p.name, state.as_str()]);
            }
        }
        for ((pool, state), n) in counts {
            self.metrics
                .agents
                .with_label_values(&[&pool, state.as_str()])
                .set(n as i64);
        }
        self.metrics.render()
    }

    /// Graceful stop: no new leases, running leases finish (up to `grace`), every agent is
    /// terminated and the backend waits for all of them to be gone.
    pub async fn shutdown(&self, grace: Duration) {
        self.ready.store(false, Ordering::Relaxed);
        self.shutdown.cancel();
        if self.backend.keeps_agents_on_shutdown() {
            // Agents (pods) and their leases outlive this instance: the next one adopts them
            // and the agents report their leases when they reconnect.
            self.detached.store(true, Ordering::Relaxed);
            self.apply(|e, now| e.begin_shutdown(now));
            tracing::info!(
                backend = self.backend.name(),
                "leaving agents and leases to the next instance"
            );
            self.backend.shutdown().await;
            // Running commands too: their clients re-attach to the next instance.
            self.hub.detach_exec_clients();
            self.hub
                .close_all(close::GOING_AWAY, "warmpool is restarting; reconnect");
            return;
        }
        self.apply(|e, now| e.begin_shutdown(now));
        let deadline = Instant::now() + grace;
        loop {
            let active = self.read(|e| e.active_leases());
            if active == 0 || Instant::now() >= deadline {
                if active > 0 {
                    tracing::warn!(active, "grace period over; ending running leases");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.apply(|e, now| e.terminate_all(now));
        self.backend.shutdown().await;
        self.hub
            .close_all(close::GOING_AWAY, "warmpool is shutting down");
    }

    /// Pool statuses.
    pub fn pools(&self) -> Vec<crate::engine::PoolStatus> {
        self.read(|e| e.pool_status())
    }

    /// Counts of recycles by reason (for tests and status).
    pub fn recycle_counts(&self) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for mf in self.metrics.registry.gather() {
            if mf.name() == "warmpool_recycles_total" {
                for m in mf.get_metric() {
                    let reason = m
                        .get_label()
                        .iter()
                        .find(|l| l.name() == "reason")
                        .map(|l| l.value().to_string())
                        .unwrap_or_default();
                    *out.entry(reason).or_default() += m.get_counter().get_value() as u64;
                }
            }
        }
        out
    }
}

async fn tick_loop(svc: std::sync::Weak<Service>, period: Duration) {
    let mut iv = tokio::time::interval(period);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        let Some(svc) = svc.upgrade() else { return };
        // The wall clock follows the system clock (schedules are read against it).
        svc.apply(|e, now| {
            e.set_wall_clock(now, SystemTime::now());
            e.tick(now)
        });
    }
}

/// Writes out the hub's deferred messages (quiet releases), each at most
/// [`crate::hub::DEFER_AT_MOST`] after it was queued; sleeps while there are none.
async fn deferred_loop(svc: std::sync::Weak<Service>) {
    loop {
        let Some(s) = svc.upgrade() else { return };
        let wake = s.hub.deferred_wake();
        let woken = wake.notified();
        tokio::pin!(woken);
        // Registered before the check: a first deferred message queued in between wakes it.
        woken.as_mut().enable();
        let pending = s.hub.has_deferred();
        drop(s);
        if !pending {
            woken.await;
        }
        tokio::time::sleep(crate::hub::DEFER_AT_MOST).await;
        let Some(s) = svc.upgrade() else { return };
        s.hub.flush_deferred();
    }
}

async fn backend_loop(
    svc: std::sync::Weak<Service>,
    mut rx: mpsc::UnboundedReceiver<BackendEvent>,
) {
    while let Some(ev) = rx.recv().await {
        let Some(svc) = svc.upgrade() else { return };
        match ev {
            BackendEvent::Started { agent } => svc.apply(|e, now| e.agent_started(&agent, now)),
            BackendEvent::Failed { pool, agent, error } => {
                tracing::warn!(pool = %pool, agent = %agent, error = %error, "provisioning failed");
                svc.metrics
                    .provisions
                    .with_label_values(&[&pool, "failed"])
                    .inc();
                svc.apply(|e, now| e.provision_failed(&agent, &error, now))
            }
            BackendEvent::StartFailed { agent, error } => {
                tracing::warn!(agent = %agent, error = %error, "agent cannot start");
                svc.apply(|e, now| e.start_failed(&agent, &error, now))
            }
            BackendEvent::Exited { agent, detail } => {
                tracing::debug!(agent = %agent, detail = %detail, "agent gone");
                svc.hub.close(
                    &agent,
                    close::TERMINATED,
                    &format!("agent {agent} exited: {detail}"),
                );
                svc.apply(|e, now| e.agent_exited(&agent, &detail, now))
            }
        }
    }
}

/// True when an agent terminated for `reason` still runs its session and so hears the close
/// (4410) and exits by itself: it was recycled after its lease or by sizing. Not when it is
/// silent or stuck (heartbeat lost, a timeout), already gone, or at shutdown.
fn exits_when_told(reason: &Reason) -> bool {
    matches!(
        reason,
        Reason::MaxUses
            | Reason::IdleTtl
            | Reason::MaxAge
            | Reason::Rolled
            | Reason::Unhealthy(_)
            | Reason::LeaseExpired
            | Reason::CleanupFailed(_)
            | Reason::HealthCheckFailed(_)
            | Reason::PoolRemoved
            | Reason::OverCap
    )
}
