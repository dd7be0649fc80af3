//! Backends: where agents come from and how they are stopped.
//!
//! A backend receives `provision` and `terminate` requests from the service's action dispatcher
//! and must never block it: work is spawned, and outcomes come back as [`BackendEvent`]s on an
//! unbounded channel (bounded in practice by a few events per agent). Backends know nothing of
//! leases or sizing; that is the engine's job.

pub mod kubernetes;
pub mod process;

use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;

use crate::engine::AgentId;
use crate::spec::PoolSpec;

/// What the service asks a backend to start.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    /// Pool name.
    pub pool: String,
    /// The id the agent must register with.
    pub agent: AgentId,
    /// The agent's HMAC token.
    pub token: String,
    /// The pool's spec.
    pub spec: PoolSpec,
}

/// What a backend reports back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendEvent {
    /// The agent was started (process spawned, pod running).
    Started {
        /// Agent.
        agent: AgentId,
    },
    /// The agent could not be started.
    Failed {
        /// Pool.
        pool: String,
        /// Agent.
        agent: AgentId,
        /// Why, for people.
        error: String,
    },
    /// The agent was started but cannot run (its pod waits on a missing image): the backend
    /// stops what is left itself and reports `Exited` once it is gone.
    StartFailed {
        /// Agent.
        agent: AgentId,
        /// Why, for people (names the pod, the container, the image and the reason).
        error: String,
    },
    /// The agent is gone (process reaped, pod deleted).
    Exited {
        /// Agent.
        agent: AgentId,
        /// How it ended.
        detail: String,
    },
}

/// Something worth telling the people who own a pool (Kubernetes Events on the AgentPool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolEvent {
    /// An agent did not register within `connectTimeout`.
    Leak {
        /// Agent (pod) id.
        agent: AgentId,
    },
    /// An agent could not be started.
    ProvisionFailed {
        /// Agent (pod) id.
        agent: AgentId,
        /// Why.
        error: String,
    },
    /// An agent's pod failed by itself (its container exited or was OOM-killed), whether or not
    /// its agent had registered.
    PodFailed {
        /// Agent (pod) id.
        agent: AgentId,
        /// How its containers ended.
        detail: String,
    },
    /// The provisioning rate limit held agents back.
    Throttled,
    /// A cleanup or health hook failed after a lease; the agent is being recycled.
    HookFailed {
        /// Agent (pod) id.
        agent: AgentId,
        /// The recycle reason (`cleanup-failed`, `health-check-failed`).
        reason: &'static str,
        /// How the hook ended, with its output excerpt.
        detail: String,
    },
}

/// Where backend events go.
pub type EventSink = mpsc::UnboundedSender<BackendEvent>;

/// A boxed future, for the object-safe trait.
pub type BoxFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A source of agents.
pub trait Backend: Send + Sync + 'static {
    /// Short name (`process`, `kubernetes`).
    fn name(&self) -> &'static str;
    /// Starts one agent; must return at once.
    fn provision(&self, req: ProvisionRequest, events: EventSink);
    /// Stops one agent (idempotent); must return at once. Reports `Exited` when it is gone.
    fn terminate(&self, agent: &str, events: EventSink);
    /// Stops one agent that was just told to exit (its connection closed with 4410) and is
    /// expected to: a backend where that exit ends the agent by itself may give it time to,
    /// and stop it only if it has not. The default stops it at once.
    fn retire(&self, agent: &str, events: EventSink) {
        self.terminate(agent, events)
    }
    /// Stops every agent and resolves once all are gone.
    fn shutdown(&self) -> BoxFuture<'_>;
    /// True when agents outlive the service (pods): shutdown then leaves them for the next
    /// instance instead of terminating them.
    fn keeps_agents_on_shutdown(&self) -> bool {
        false
    }
    /// Records something about a pool where its owners look (must return at once).
    fn record(&self, _pool: &str, _event: PoolEvent) {}
}
