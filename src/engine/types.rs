//! Value types of the pool engine: agents, leases, actions, reasons and errors.
//!
//! Plain data with no behaviour beyond naming; the state machine lives in `engine/mod.rs`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// An agent's identifier (`<pool>-<instance>-<n>`).
pub type AgentId = String;
/// A lease's identifier.
pub type LeaseId = String;
/// A waiting lease request's identifier (local to one engine).
pub type RequestId = u64;

/// Lifecycle state of one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Requested from the backend, not started yet.
    Provisioning,
    /// Started, not yet registered with the hub.
    Connecting,
    /// Connected and free.
    Idle,
    /// Bound to one lease.
    Leased,
    /// Lease released; the agent is cleaning its workspace.
    Cleaning,
    /// Being stopped; gone once the backend confirms.
    Terminating,
}

impl AgentState {
    /// All states, for metrics.
    pub const ALL: [AgentState; 6] = [
        AgentState::Provisioning,
        AgentState::Connecting,
        AgentState::Idle,
        AgentState::Leased,
        AgentState::Cleaning,
        AgentState::Terminating,
    ];

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Provisioning => "provisioning",
            AgentState::Connecting => "connecting",
            AgentState::Idle => "idle",
            AgentState::Leased => "leased",
            AgentState::Cleaning => "cleaning",
            AgentState::Terminating => "terminating",
        }
    }
}

/// Health an agent reports in heartbeats and after cleanup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Health {
    /// Bytes in the agent's workspace.
    pub workspace_bytes: u64,
    /// Processes left behind by jobs.
    pub leftover_processes: u32,
}

/// Why an agent is terminated. Every termination carries one; metrics count by [`Reason::as_str`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Served `maxUses` leases.
    MaxUses,
    /// Idle above `minIdle` for longer than `idleTtl`.
    IdleTtl,
    /// Older than `maxAge`.
    MaxAge,
    /// Built from an outdated template (rolled after a spec change).
    Rolled,
    /// Did not register within `connectTimeout` (a leak).
    ConnectTimeout,
    /// No heartbeat within the heartbeat timeout.
    HeartbeatLost,
    /// Reported health over the pool's limits.
    Unhealthy(String),
    /// Its lease expired without being renewed.
    LeaseExpired,
    /// Its WebSocket connection closed.
    Disconnected(String),
    /// The backend saw the agent exit by itself.
    Exited(String),
    /// The backend could not start it.
    ProvisionFailed(String),
    /// It was started but ended, or cannot run, before it registered (its container exited or
    /// was OOM-killed, its image is missing): a failed provision, with backoff. The backend
    /// reported it and stops what is left itself.
    StartFailed(String),
    /// The backend did not report it started within `connectTimeout`.
    ProvisionTimeout,
    /// Did not finish cleanup in time.
    CleanupTimeout,
    /// The pool's cleanup hook failed after a lease (exit code or timeout, stderr excerpt).
    CleanupFailed(String),
    /// The pool's health hook failed after a lease (exit code, timeout or output over its
    /// limit, with an excerpt).
    HealthCheckFailed(String),
    /// Idle while its pool had more agents than the cap in effect (an open schedule
    /// window's `maxTotal`).
    OverCap,
    /// Its pool was removed.
    PoolRemoved,
    /// An externally leased pool's node exists without its agent (process or pod).
    OrphanNode,
    /// An externally leased pool's agent (process or pod) runs without its node.
    OrphanAgent,
    /// The service is shutting down.
    Shutdown,
}

impl Reason {
    /// Short machine name, used as a metrics label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::MaxUses => "max-uses",
            Reason::IdleTtl => "idle-ttl",
            Reason::MaxAge => "max-age",
            Reason::Rolled => "rolled",
            Reason::ConnectTimeout => "connect-timeout",
            Reason::HeartbeatLost => "heartbeat-lost",
            Reason::Unhealthy(_) => "unhealthy",
            Reason::LeaseExpired => "lease-expired",
            Reason::Disconnected(_) => "disconnected",
            Reason::Exited(_) => "exited",
            Reason::ProvisionFailed(_) => "provision-failed",
            Reason::StartFailed(_) => "start-failed",
            Reason::ProvisionTimeout => "provision-timeout",
            Reason::CleanupTimeout => "cleanup-timeout",
            Reason::CleanupFailed(_) => "cleanup-failed",
            Reason::HealthCheckFailed(_) => "health-check-failed",
            Reason::OverCap => "over-cap",
            Reason::PoolRemoved => "pool-removed",
            Reason::OrphanNode => "orphan-node",
            Reason::OrphanAgent => "orphan-agent",
            Reason::Shutdown => "shutdown",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Unhealthy(d)
            | Reason::Disconnected(d)
            | Reason::Exited(d)
            | Reason::ProvisionFailed(d)
            | Reason::StartFailed(d)
            | Reason::CleanupFailed(d)
            | Reason::HealthCheckFailed(d) => write!(f, "{}: {d}", self.as_str()),
            other => f.write_str(other.as_str()),
        }
    }
}

/// One agent as the engine tracks it.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Identifier.
    pub id: AgentId,
    /// Owning pool.
    pub pool: String,
    /// Current state.
    pub state: AgentState,
    /// When the agent was requested.
    pub created: Instant,
    /// When it entered its current state.
    pub since: Instant,
    /// Last heartbeat or message.
    pub last_seen: Instant,
    /// Leases served so far.
    pub uses: u32,
    /// The lease it serves, when leased.
    pub lease: Option<LeaseId>,
    /// Last reported health.
    pub health: Health,
    /// Set when a heartbeat reported health over limits while leased: recycled on release.
    pub unhealthy: Option<String>,
    /// Why it is terminating.
    pub terminate_reason: Option<Reason>,
    /// Marked for replacement (outdated template): rotated like an agent past `maxAge`.
    pub retire: bool,
    /// Adopted from a previous instance and not registered since: it gets
    /// [`super::EngineConfig::adopt_grace`] to reconnect instead of `connectTimeout`.
    pub adopted: bool,
    /// Its connection dropped while leased, and it keeps its job across connections: it keeps
    /// its state and may register again until the heartbeat timeout.
    pub away: bool,
    /// Externally leased: told to take no other lease (its last allowed one runs).
    pub drained: bool,
    /// Its connection acts on a quiet `release` without answering `ready` (its `hello` had
    /// `quietRelease`; docs/PROTOCOL.md).
    pub quiet_release: bool,
    /// Something may have run on it since its last cleanup: an exec was sent for its lease
    /// ([`super::Engine::exec_starting`]), or the lease was restored from its `hello`. Its
    /// release then cleans up (never quiet).
    pub ran: bool,
    /// The lease whose cleanup it is doing (while Cleaning): a `ready` for another lease does
    /// not end it.
    pub cleaning_for: Option<LeaseId>,
    /// When its entry in the engine's deadline heap comes up (no later than its earliest
    /// deadline; `None`: no entry).
    pub(super) check_at: Option<Instant>,
}

impl Agent {
    /// A new agent in `state`, created now.
    pub fn new(id: &str, pool: &str, state: AgentState, now: Instant) -> Agent {
        Agent {
            id: id.to_string(),
            pool: pool.to_string(),
            state,
            created: now,
            since: now,
            last_seen: now,
            uses: 0,
            lease: None,
            health: Health::default(),
            unhealthy: None,
            terminate_reason: None,
            retire: false,
            adopted: false,
            away: false,
            drained: false,
            quiet_release: false,
            ran: false,
            cleaning_for: None,
            check_at: None,
        }
    }
}

/// How a lease ended, or that it is still active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Bound to an agent.
    Active,
    /// Released by its holder.
    Released,
    /// Not renewed in time.
    Expired,
    /// Ended because its agent failed.
    Failed,
}

impl LeaseState {
    /// Lowercase name.
    pub fn as_str(&self) -> &'static str {
        match self {
            LeaseState::Active => "active",
            LeaseState::Released => "released",
            LeaseState::Expired => "expired",
            LeaseState::Failed => "failed",
        }
    }
}

/// One lease.
#[derive(Debug, Clone)]
pub struct Lease {
    /// Identifier.
    pub id: LeaseId,
    /// The agent bound to it.
    pub agent: AgentId,
    /// The agent's pool.
    pub pool: String,
    /// The pool's labels.
    pub labels: Vec<String>,
    /// Who holds it (free text from the request).
    pub holder: String,
    /// The selector it was requested with.
    pub selector: String,
    /// Granted at.
    pub granted: Instant,
    /// Expires unless renewed.
    pub expires: Instant,
    /// Renewal period.
    pub ttl: Duration,
    /// Current state.
    pub state: LeaseState,
    /// Why it ended, when it did.
    pub end_reason: Option<String>,
    /// Idempotency key from the request.
    pub idempotency_key: Option<String>,
}

/// A lease request handed to the engine (the selector already parsed).
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    /// Parsed selector.
    pub selector: crate::labels::Expr,
    /// Selector as written.
    pub selector_text: String,
    /// How long the request may wait for an agent.
    pub wait: Duration,
    /// Lease time-to-live; renewals extend by this.
    pub ttl: Duration,
    /// Holder description.
    pub holder: String,
    /// Optional idempotency key.
    pub idempotency_key: Option<String>,
}

/// The engine's answer to a lease request.
#[derive(Debug, Clone)]
pub enum LeaseDecision {
    /// An agent was free: here is the lease.
    Granted(Lease),
    /// An active lease already exists for this idempotency key.
    Existing(Lease),
    /// Queued; the outcome arrives as [`Action::Granted`] or [`Action::WaitFailed`].
    Queued(RequestId),
}

/// Lease errors; each names what a person needs to act.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// No pool's labels can ever satisfy the selector.
    #[error("no pool can satisfy selector {selector:?} (pools: {pools})")]
    Unsatisfiable {
        /// The selector.
        selector: String,
        /// The pools and their labels.
        pools: String,
    },
    /// The request waited its whole `wait` without an agent.
    #[error("no agent matching {selector:?} became free within {waited_ms} ms ({pools})")]
    WaitExpired {
        /// The selector.
        selector: String,
        /// How long it waited.
        waited_ms: u64,
        /// Where the pools it matches stood when the wait ended (agents by state, the last
        /// error): what a person needs to tell a busy pool from a broken one.
        pools: String,
    },
    /// Too many requests are waiting.
    #[error("lease queue is full ({limit} requests waiting); retry later")]
    QueueFull {
        /// The limit.
        limit: usize,
    },
    /// No such lease.
    #[error("lease {0} not found")]
    NotFound(LeaseId),
    /// The lease exists but has ended.
    #[error("lease {id} is {state}: {reason}")]
    Ended {
        /// Lease id.
        id: LeaseId,
        /// Its final state.
        state: String,
        /// Why it ended.
        reason: String,
    },
    /// A request with the same idempotency key is still waiting.
    #[error("a request with idempotencyKey {0:?} is already waiting")]
    DuplicateRequest(String),
    /// The service is shutting down and grants no leases.
    #[error("warmpool is shutting down; no new leases")]
    ShuttingDown,
}

impl LeaseError {
    /// Stable machine code for API error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            LeaseError::Unsatisfiable { .. } => "unsatisfiable",
            LeaseError::WaitExpired { .. } => "wait_expired",
            LeaseError::QueueFull { .. } => "queue_full",
            LeaseError::NotFound(_) => "lease_not_found",
            LeaseError::Ended { .. } => "lease_ended",
            LeaseError::DuplicateRequest(_) => "duplicate_request",
            LeaseError::ShuttingDown => "shutting_down",
        }
    }
}

/// Reasons the hub refuses an agent registration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The engine does not know this agent id.
    #[error("unknown agent id {0:?}")]
    UnknownAgent(AgentId),
    /// The agent belongs to another pool than it claims.
    #[error("agent {agent:?} belongs to pool {actual:?}, not {claimed:?}")]
    WrongPool {
        /// Agent id.
        agent: AgentId,
        /// Pool it claimed.
        claimed: String,
        /// Its real pool.
        actual: String,
    },
    /// The agent is already registered (a second connection for a live agent id).
    #[error("agent {0:?} is already connected")]
    AlreadyConnected(AgentId),
    /// The agent is being terminated.
    #[error("agent {0:?} is terminating")]
    Terminating(AgentId),
    /// A join token was presented for a pool that does not exist or is not external.
    #[error("pool {0:?} is not an external pool accepting joins")]
    NotJoinable(String),
    /// An external pool already has `maxTotal` agents.
    #[error("external pool {pool:?} is full ({max} agents, its maxTotal)")]
    PoolFull {
        /// Pool.
        pool: String,
        /// Its maxTotal.
        max: u32,
    },
}

/// What the engine asks its shell to do. Executing an action never blocks the engine.
#[derive(Debug, Clone)]
pub enum Action {
    /// Start a new agent.
    Provision {
        /// Pool.
        pool: String,
        /// The id the agent must register with.
        agent: AgentId,
    },
    /// Stop an agent (close its connection, kill it).
    Terminate {
        /// Pool.
        pool: String,
        /// Agent.
        agent: AgentId,
        /// Why.
        reason: Reason,
    },
    /// A queued request got a lease.
    Granted {
        /// The waiting request.
        request: RequestId,
        /// The lease.
        lease: Lease,
    },
    /// A queued request failed.
    WaitFailed {
        /// The waiting request.
        request: RequestId,
        /// Why.
        error: LeaseError,
    },
    /// An externally leased agent (a Jenkins node) runs its last allowed build (`maxUses`):
    /// the outside scheduler must give it no other.
    Drain {
        /// Pool.
        pool: String,
        /// Agent.
        agent: AgentId,
    },
    /// Tell an agent its lease ended: clean the workspace, kill leftovers, run the pool's
    /// hooks, report ready. Quiet: nothing ran during the lease and the agent counts as idle
    /// already; it drops the lease and answers nothing (docs/PROTOCOL.md).
    Release {
        /// Agent.
        agent: AgentId,
        /// The lease that ended.
        lease: LeaseId,
        /// The pool's current hooks (empty for a quiet release).
        hooks: crate::hooks::Hooks,
        /// The agent is Idle already: no `ready` is expected.
        quiet: bool,
    },
    /// An agent was bound to a lease: tell it (it reports the lease after a reconnect).
    Bound {
        /// Agent.
        agent: AgentId,
        /// Its pool.
        pool: String,
        /// The lease.
        lease: LeaseId,
    },
    /// A lease ended (any way); running execs on it must stop.
    LeaseEnded {
        /// The lease.
        lease: Lease,
    },
    /// A fact for metrics.
    Observe(Observation),
}

/// Facts the shell turns into metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A lease was granted after waiting this long.
    LeaseWait {
        /// Pool.
        pool: String,
        /// Seconds from request to grant.
        seconds: f64,
    },
    /// An agent became idle for the first time, this long after it was requested.
    ProvisionToIdle {
        /// Pool.
        pool: String,
        /// Seconds.
        seconds: f64,
    },
    /// A lease was granted: `warm` when an idle agent was ready at request time (granted
    /// without waiting), else cold.
    Leased {
        /// Pool.
        pool: String,
        /// Granted at once.
        warm: bool,
    },
    /// The rate limiter held back one provision.
    Throttled {
        /// Pool.
        pool: String,
    },
}

/// Status of one pool, as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// Labels.
    pub labels: Vec<String>,
    /// Idle agents.
    pub idle: u32,
    /// Leased agents.
    pub leased: u32,
    /// Agents cleaning after a lease.
    pub cleaning: u32,
    /// Agents started but not registered.
    pub connecting: u32,
    /// Agents requested from the backend.
    pub provisioning: u32,
    /// Agents being stopped.
    pub terminating: u32,
    /// All agents.
    pub total: u32,
    /// `minIdle`.
    pub min_idle: u32,
    /// `maxTotal`.
    pub max_total: u32,
    /// Requests waiting that this pool could serve.
    pub waiting: u32,
    /// True when the rate limiter held back provisioning on the last pass.
    pub throttled: bool,
    /// Provisions held back by the rate limiter since start.
    pub throttled_total: u64,
    /// Agents that never registered within `connectTimeout`.
    pub leaks_total: u64,
    /// Agents that failed to start.
    pub provision_failures_total: u64,
    /// The last provisioning error, if any.
    pub last_error: Option<String>,
    /// Agents recycled because a cleanup or health hook failed, since start.
    #[serde(default)]
    pub hook_failures_total: u64,
    /// The last hook failure (agent, hook, how it ended, output excerpt), until an agent of the
    /// pool passes its hooks again.
    #[serde(default)]
    pub last_hook_failure: Option<String>,
    /// Idle agents the sizing policy wants now (capped by the cap in effect).
    #[serde(default)]
    pub desired_idle: u32,
    /// What dominates `desiredIdle`: minIdle, schedule, forecast, demand or scaleToZero.
    #[serde(default)]
    pub desired_idle_source: super::IdleSource,
    /// Lease requests per minute the forecast expects now (the higher of the recent rate and
    /// the time-of-week rate over the next refill).
    #[serde(default)]
    pub arrival_rate: f64,
    /// Seconds from provisioning an agent to its registration, as learned (a default before
    /// the first measurement).
    #[serde(default)]
    pub refill_seconds: f64,
    /// Share of the last hour's leases that found an idle agent; null without a lease.
    #[serde(default)]
    pub warm_hit_ratio: Option<f64>,
    /// Leases granted at once (an idle agent was ready), since start.
    #[serde(default)]
    pub warm_leases_total: u64,
    /// Leases granted after waiting, since start.
    #[serde(default)]
    pub cold_leases_total: u64,
    /// Idle agent-seconds since start (the cost of keeping agents warm).
    #[serde(default)]
    pub idle_agent_seconds: f64,
    /// The pool's spec.
    pub spec: crate::spec::PoolSpec,
}
