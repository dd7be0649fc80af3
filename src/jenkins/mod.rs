//! The Jenkins connector: pools whose agents are Jenkins nodes, online on the controller over
//! Jenkins' own WebSocket remoting before any build asks for them, so Jenkins' queue dispatches
//! a build the moment it arrives.
//!
//! A Jenkins pool is an ordinary engine pool (sizing, `maxUses`, `idleTtl`, `maxAge`, leaks,
//! backoff, adoption: all the engine's rules). This module is only its Jenkins-specific I/O:
//! - the backend of those pools (`backend.rs`): provisioning an agent = create the node, read
//!   its secret, start the agent on a [`Runner`] (a process, `runner.rs`, or a pod, `pods.rs`);
//!   terminating = delete both; draining = take the node's labels before its last build;
//! - the per-controller poll (`poll.rs`): ONE `computer/api/json` and ONE `queue/api/json` per
//!   interval, turned into engine events (online, busy with a build, offline, orphans, queue
//!   demand), never a request per node;
//! - controller protection: one token bucket on all API calls per controller, a semaphore of
//!   `maxConnecting` agents connecting at once, a poll that backs off when Jenkins is slow or
//!   failing; a failing controller marks only its pools `Degraded`;
//! - what a pool shows (`status.rs`: nodes by state from the engine, Ready, Degraded);
//! - `config.rs` (the pool's `jenkins` block, credentials), `model.rs` (parsing Jenkins'
//!   answers), `client.rs` (HTTP, auth, crumbs, metrics), `fake_agent.rs` (a simulated inbound
//!   agent for tests and demos).
//!
//! - `purge.rs`: every node and agent of a deleted AgentPool (its finalizer).
//!
//! It never decides sizing or recycling: the engine does, from the events the poll feeds.

mod backend;
pub mod client;
pub mod config;
pub mod fake_agent;
pub mod history;
pub mod model;
pub mod pods;
mod poll;
pub mod purge;
pub mod runner;
mod status;

pub use config::{Credentials, CredentialsError, JenkinsSpec};
pub use status::{ConditionView, Counts, JenkinsPoolStatus};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, RateLimiter};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use client::{Client, JenkinsError};
use runner::Runner;

use crate::metrics::Metrics;
use crate::service::Service;
use crate::spec::PoolSpec;

/// The controller's token bucket, replaceable when its pools' limits change.
pub type SharedLimiter = Arc<RwLock<Arc<DefaultDirectRateLimiter>>>;

/// A problem shown as the pool's `Degraded` condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// CamelCase reason (`JenkinsUnauthorized`, `JenkinsUnreachable`, `CredentialsMissing`...).
    pub reason: String,
    /// Names the pool, the node (if any), the URL, the HTTP status and an excerpt of the body.
    pub message: String,
}

impl Problem {
    fn from_error(pool: &str, node: Option<&str>, what: &str, e: &JenkinsError) -> Problem {
        let node = node.map(|n| format!(" node {n}:")).unwrap_or_default();
        Problem {
            reason: e.reason().into(),
            message: format!("pool {pool}:{node} {what} failed: {e}"),
        }
    }
}

/// A pool's configuration as given.
pub struct PoolCfg {
    /// Pool key.
    pub key: String,
    /// The pool spec (sizing, recycling, pace); `jenkins` is set.
    pub spec: PoolSpec,
    /// The Jenkins block.
    pub jenkins: JenkinsSpec,
    /// Credentials, or why there are none.
    pub credentials: Result<Credentials, CredentialsError>,
    /// Kubernetes: the AgentPool (pod template, owner, status target).
    pub agent_pool: Option<Box<crate::k8s::crd::AgentPool>>,
}

/// Kinds of problem a pool can have at once; each clears on that kind's next success.
const PROBLEM_CREDENTIALS: &str = "credentials";
const PROBLEM_TLS: &str = "tls";
const PROBLEM_POLL: &str = "poll";
const PROBLEM_CREATE: &str = "create";
const PROBLEM_DELETE: &str = "delete";
const PROBLEM_DRAIN: &str = "drain";
const PROBLEM_CONNECT: &str = "connect";

/// True when `node` is named as the nodes of the pool with node name prefix `prefix`: the
/// prefix and 8 hex digits.
pub fn is_pool_node(prefix: &str, node: &str) -> bool {
    node.strip_prefix(prefix)
        .is_some_and(|rest| rest.len() == 8 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

struct PoolEntry {
    cfg: Arc<PoolCfg>,
    client: Option<Arc<Client>>,
    root: String,
    problems: BTreeMap<&'static str, Problem>,
    /// Fired when the pool is removed: its in-flight provisions undo themselves.
    cancel: CancellationToken,
    generation: Option<i64>,
    /// Its client got a good answer from Jenkins (its credentials and CA work).
    verified: bool,
}

/// One agent the connector handles (provisioned, adopted or found as an orphan).
struct AgentEntry {
    pool: String,
    root: String,
    client: Option<Arc<Client>>,
    remote_fs: String,
    /// Held from before its node is created until the poll sees it online.
    permit: Option<OwnedSemaphorePermit>,
}

struct Controller {
    root: String,
    limiter: SharedLimiter,
    limits: Mutex<(u64, u32)>,
    /// Agents started and not yet online (`maxConnecting`).
    gate: Arc<Semaphore>,
    cap: Mutex<u32>,
    interval: Mutex<Duration>,
    /// Notified when an agent is started: the poll loop checks for it to connect.
    started: tokio::sync::Notify,
    stop: CancellationToken,
}

impl Controller {
    /// Permits in use.
    fn connecting(&self) -> u32 {
        (*self.cap.lock().expect("lock")).saturating_sub(self.gate.available_permits() as u32)
    }

    /// Changes the number of permits: more at once; fewer as permits come back.
    fn set_cap(self: &Arc<Self>, cap: u32) {
        let mut c = self.cap.lock().expect("lock");
        if cap > *c {
            self.gate.add_permits((cap - *c) as usize);
        } else if cap < *c {
            let gate = self.gate.clone();
            let n = *c - cap;
            tokio::spawn(async move {
                if let Ok(p) = gate.acquire_many_owned(n).await {
                    p.forget();
                }
            });
        }
        *c = cap;
    }
}

/// The connector: the backend and the poll of every Jenkins pool of one service.
pub struct Connector {
    me: Weak<Connector>,
    svc: Weak<Service>,
    runner: Arc<dyn Runner>,
    metrics: Metrics,
    /// `serve --ca-file`: trusted by pools without their own `caFile`.
    ca_file: Option<std::path::PathBuf>,
    pools: Mutex<BTreeMap<String, PoolEntry>>,
    controllers: Mutex<HashMap<String, Arc<Controller>>>,
    agents: Mutex<HashMap<String, AgentEntry>>,
    /// Nodes deleted recently, and when: a poll sent before a deletion still lists the node
    /// (or its agent), which must not be taken for an orphan.
    deleted: Mutex<HashMap<String, Instant>>,
    stop: CancellationToken,
    /// Set by a shutdown that leaves nodes and agents to the next instance.
    keep: AtomicBool,
    tasks: tokio_util::task::TaskTracker,
}

fn limiter(rps: f64, burst: u32) -> DefaultDirectRateLimiter {
    RateLimiter::direct(crate::pacer::quota(rps, burst))
}

fn rate_key(rps: f64, burst: u32) -> (u64, u32) {
    (rps.to_bits(), burst)
}

impl Connector {
    /// A connector for `svc`, whose agents run on `runner`; Jenkins clients trust the
    /// platform's roots plus the pool's `caFile`, or else `ca_file`.
    pub fn new(
        svc: &Arc<Service>,
        runner: Arc<dyn Runner>,
        ca_file: Option<std::path::PathBuf>,
    ) -> Arc<Connector> {
        Arc::new_cyclic(|me| Connector {
            me: me.clone(),
            svc: Arc::downgrade(svc),
            runner,
            metrics: svc.metrics.clone(),
            ca_file,
            pools: Mutex::new(BTreeMap::new()),
            controllers: Mutex::new(HashMap::new()),
            agents: Mutex::new(HashMap::new()),
            deleted: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            keep: AtomicBool::new(false),
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

    fn this(&self) -> Arc<Connector> {
        self.me.upgrade().expect("connector alive while used")
    }

    /// True when `key` is a Jenkins pool of this connector.
    pub fn has_pool(&self, key: &str) -> bool {
        self.pools.lock().expect("lock").contains_key(key)
    }

    /// Keys of every pool.
    pub fn pool_keys(&self) -> Vec<String> {
        self.pools.lock().expect("lock").keys().cloned().collect()
    }

    fn set_problem(&self, pool: &str, kind: &'static str, p: Option<Problem>) {
        if let Some(e) = self.pools.lock().expect("lock").get_mut(pool) {
            match p {
                Some(p) => {
                    e.problems.insert(kind, p);
                }
                None => {
                    e.problems.remove(kind);
                }
            }
        }
    }

    /// Adds or updates a pool: the engine gets it as an ordinary pool (held until the first
    /// poll so existing nodes are adopted); its client and problems are kept across updates
    /// with the same controller and credentials.
    pub fn upsert(&self, cfg: PoolCfg) {
        let root = cfg.jenkins.root_url();
        let cfg = Arc::new(cfg);
        let Some(svc) = self.svc.upgrade() else {
            return;
        };
        // Lock order everywhere: pools, then controllers.
        let mut pools = self.pools.lock().expect("lock");
        let ctl = self.controller(&root, &cfg.jenkins);
        let old = pools.remove(&cfg.key);
        let moved = old.as_ref().is_some_and(|o| o.root != root);
        let (client, problems, cancel, verified) = match old {
            Some(old) if old.root == root => {
                let same_creds = matches!((&old.cfg.credentials, &cfg.credentials), (Ok(a), Ok(b)) if a == b)
                    && old.cfg.jenkins.ca_file == cfg.jenkins.ca_file;
                let client = if same_creds { old.client.clone() } else { None };
                let verified = same_creds && old.verified;
                (client, old.problems, old.cancel, verified)
            }
            old => {
                if let Some(old) = old {
                    old.cancel.cancel();
                }
                (None, BTreeMap::new(), CancellationToken::new(), false)
            }
        };
        // The pool's caFile, or else `serve --ca-file`, besides the platform's roots.
        let ca_file = cfg.jenkins.ca_file.as_ref().or(self.ca_file.as_ref());
        let tls = crate::tls::client_config(ca_file.map(|p| p.as_path()));
        let client = client.or_else(|| {
            let tls = tls.as_ref().ok()?;
            cfg.credentials.as_ref().ok().map(|c| {
                Arc::new(Client::new(
                    &root,
                    c.clone(),
                    ctl.limiter.clone(),
                    self.metrics.clone(),
                    tls,
                ))
            })
        });
        let mut entry = PoolEntry {
            cfg: cfg.clone(),
            client,
            root: root.clone(),
            problems,
            cancel,
            generation: cfg.agent_pool.as_ref().and_then(|a| a.metadata.generation),
            verified,
        };
        match &tls {
            Err(e) => {
                entry.problems.insert(
                    PROBLEM_TLS,
                    Problem {
                        reason: "CaFileInvalid".into(),
                        message: format!("pool {}: {e}", cfg.key),
                    },
                );
            }
            Ok(_) => {
                entry.problems.remove(PROBLEM_TLS);
            }
        }
        match &cfg.credentials {
            Err(e) => {
                entry.problems.insert(
                    PROBLEM_CREDENTIALS,
                    Problem {
                        reason: "CredentialsMissing".into(),
                        message: format!("pool {}: {e}", cfg.key),
                    },
                );
            }
            Ok(_) => {
                entry.problems.remove(PROBLEM_CREDENTIALS);
            }
        }
        pools.insert(cfg.key.clone(), entry);
        self.retune_locked(&pools, &root);
        drop(pools);
        if moved {
            // Moved to another controller: the old one's nodes go (their agents keep the
            // old client), and the pool starts over on the new one.
            svc.remove_pool(&cfg.key);
        }
        svc.upsert_pool(&cfg.key, cfg.spec.clone());
    }

    /// Removes a pool: its nodes are deleted and its agents stopped (running builds too).
    pub fn remove(&self, key: &str) {
        let mut pools = self.pools.lock().expect("lock");
        let Some(old) = pools.remove(key) else {
            return;
        };
        old.cancel.cancel();
        self.retune_locked(&pools, &old.root);
        drop(pools);
        if let Some(svc) = self.svc.upgrade() {
            svc.remove_pool(key);
        }
        self.sweep(old.root, old.cfg.clone(), old.client, false);
        self.metrics.jenkins_demand.remove_label_values(&[key]).ok();
        for state in ["creating", "connecting", "idle", "busy", "deleting"] {
            self.metrics
                .jenkins_nodes
                .remove_label_values(&[key, state])
                .ok();
        }
    }

    /// The AgentPool of a pool (Kubernetes).
    pub fn agent_pool(&self, key: &str) -> Option<Box<crate::k8s::crd::AgentPool>> {
        self.pools
            .lock()
            .expect("lock")
            .get(key)
            .and_then(|e| e.cfg.agent_pool.clone())
    }

    /// Stops polling. With `delete`, every node is deleted and every agent stopped first
    /// (bounded by `timeout`); without, they are left for the next instance to adopt.
    pub async fn shutdown(&self, delete: bool, timeout: Duration) {
        self.stop.cancel();
        self.keep.store(!delete, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        if delete {
            let entries: Vec<PoolEntry> = {
                let mut pools = self.pools.lock().expect("lock");
                std::mem::take(&mut *pools).into_values().collect()
            };
            for e in entries {
                e.cancel.cancel();
                if let Some(svc) = self.svc.upgrade() {
                    svc.remove_pool(&e.cfg.key);
                }
                self.sweep(e.root, e.cfg, e.client, true);
            }
        }
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("Jenkins connector: requests still running at shutdown; leaving them");
        }
        self.tasks.reopen();
    }

    /// Deletes the nodes and stops the agents of a pool that is gone: what the runner lists for
    /// it that the connector does not handle (`all`: everything it lists, and every agent the
    /// connector handles for it), once its in-flight provisions have undone themselves.
    fn sweep(&self, root: String, cfg: Arc<PoolCfg>, client: Option<Arc<Client>>, all: bool) {
        let me = self.this();
        self.tasks.spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline
                && me
                    .svc
                    .upgrade()
                    .is_some_and(|s| s.read(|e| e.agents().any(|a| a.pool == cfg.key && a.state == crate::engine::AgentState::Provisioning)))
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut nodes: std::collections::BTreeSet<String> = if all {
                me.agents
                    .lock()
                    .expect("lock")
                    .iter()
                    .filter(|(_, a)| a.pool == cfg.key)
                    .map(|(n, _)| n.clone())
                    .collect()
            } else {
                Default::default()
            };
            if let Ok(agents) = me.runner.list(&root).await {
                let known = me.agents.lock().expect("lock");
                nodes.extend(
                    agents
                        .into_iter()
                        .filter(|a| a.pool == cfg.key && (all || !known.contains_key(&a.node)))
                        .map(|a| a.node),
                );
            }
            for node in nodes {
                if let Some(c) = &client
                    && let Err(err) = c.delete_node(&node).await
                {
                    tracing::warn!(pool = %cfg.key, node = %node, error = %err, "deleting a node of a removed pool failed");
                }
                let _ = me.runner.stop(&root, &cfg.key, &node).await;
                me.agents.lock().expect("lock").remove(&node);
                me.metrics
                    .recycles
                    .with_label_values(&[&cfg.key, crate::engine::Reason::PoolRemoved.as_str()])
                    .inc();
            }
        });
    }

    fn controller(&self, root: &str, js: &JenkinsSpec) -> Arc<Controller> {
        let mut ctls = self.controllers.lock().expect("lock");
        if let Some(c) = ctls.get(root) {
            return c.clone();
        }
        let c = Arc::new(Controller {
            root: root.to_string(),
            limiter: Arc::new(RwLock::new(Arc::new(limiter(
                js.requests_per_second,
                js.request_burst,
            )))),
            limits: Mutex::new(rate_key(js.requests_per_second, js.request_burst)),
            gate: Arc::new(Semaphore::new(js.max_connecting as usize)),
            cap: Mutex::new(js.max_connecting),
            interval: Mutex::new(js.poll_interval.0),
            started: tokio::sync::Notify::new(),
            stop: self.stop.child_token(),
        });
        ctls.insert(root.to_string(), c.clone());
        let me = self.this();
        let task = c.clone();
        let span = tracing::info_span!("jenkins_poll", controller = %root);
        self.tasks
            .spawn(async move { me.run_controller(task).await }.instrument(span));
        c
    }

    /// Applies the strictest limits of the controller's pools (the caller holds `pools`).
    fn retune_locked(&self, pools: &BTreeMap<String, PoolEntry>, root: &str) {
        let mine: Vec<&JenkinsSpec> = pools
            .values()
            .filter(|e| e.root == root)
            .map(|e| &e.cfg.jenkins)
            .collect();
        let ctls = self.controllers.lock().expect("lock");
        let Some(c) = ctls.get(root) else { return };
        if mine.is_empty() {
            return;
        }
        let rps = mine
            .iter()
            .map(|j| j.requests_per_second)
            .fold(f64::INFINITY, f64::min);
        let burst = mine.iter().map(|j| j.request_burst).min().unwrap_or(1);
        let connecting = mine.iter().map(|j| j.max_connecting).min().unwrap_or(1);
        let key = rate_key(rps, burst);
        let mut limits = c.limits.lock().expect("lock");
        if *limits != key {
            *limits = key;
            *c.limiter.write().expect("lock") = Arc::new(limiter(rps, burst));
        }
        c.set_cap(connecting);
    }
}
