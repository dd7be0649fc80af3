//! The Jenkins connector: pools whose agents are Jenkins nodes, online on the controller over
//! Jenkins' own WebSocket remoting before any build asks for them, so Jenkins' queue dispatches
//! a build the moment it arrives. warmpool keeps each pool at `minIdle` idle nodes (plus the
//! queue's demand for its labels), recycles nodes after `maxUses` builds, and protects the
//! controller: one token bucket on all API calls per controller, a cap on agents connecting at
//! once, a poll that backs off when Jenkins is slow or failing.
//!
//! Layout: `config.rs` (the pool's `jenkins` block, credentials), `model.rs` (parsing what
//! Jenkins answers), `client.rs` (HTTP, auth, crumbs, metrics), `plan.rs` (the pure planner),
//! `runner.rs` (agents as processes), `pods.rs` (agents as pods, AgentPool status),
//! `fake_agent.rs` (a simulated inbound agent for tests and demos).
//!
//! State comes from ONE poll of `computer/api/json` (with a `tree`) and one of `queue/api/json`
//! per controller per interval (and, while agents connect, one small online check per
//! controller every 0.5 s that frees their connecting slots), never a request per node; the planner compares it with the
//! runner's live agents and its memory of earlier polls (level-triggered), so a lost answer or
//! a crashed task is repaired by the next poll, and a restarted service adopts what is there.
//! A failing controller marks its pools `Degraded` and never stalls the other controllers or
//! the rest of warmpool: each controller has its own task, and every call is spawned.

pub mod client;
pub mod config;
pub mod fake_agent;
pub mod model;
pub mod plan;
pub mod pods;
pub mod purge;
pub mod runner;

pub use config::{Credentials, JenkinsSpec};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, RateLimiter};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use client::{Client, JenkinsError};
use model::{NodeObs, Wants};
use plan::{Inflight, NodeMem, Observation, PoolMem, Reason, Step};
use runner::{Launch, Runner};

use crate::metrics::Metrics;
use crate::spec::PoolSpec;

/// The controller's token bucket, replaceable when its pools' limits change.
pub type SharedLimiter = Arc<RwLock<Arc<DefaultDirectRateLimiter>>>;

/// A counting gate: agents started and not yet online, per controller.
pub struct Gate {
    cap: Mutex<(u32, u32)>,
    freed: Notify,
}

/// One slot of a [`Gate`]; dropping it frees the slot.
pub struct Slot(Arc<Gate>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.cap.lock().expect("lock").1 -= 1;
        // Reaches every waiter that created its `notified()` before checking the cap.
        self.0.freed.notify_waiters();
    }
}

impl Gate {
    fn new(cap: u32) -> Arc<Gate> {
        Arc::new(Gate {
            cap: Mutex::new((cap, 0)),
            freed: Notify::new(),
        })
    }

    fn set_cap(&self, cap: u32) {
        self.cap.lock().expect("lock").0 = cap;
        self.freed.notify_waiters();
    }

    /// Slots in use.
    pub fn used(&self) -> u32 {
        self.cap.lock().expect("lock").1
    }

    async fn acquire(self: &Arc<Gate>) -> Slot {
        loop {
            let notified = self.freed.notified();
            {
                let mut c = self.cap.lock().expect("lock");
                if c.1 < c.0 {
                    c.1 += 1;
                    return Slot(self.clone());
                }
            }
            notified.await;
        }
    }
}

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
    pub credentials: Result<Credentials, String>,
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

/// How often, while agents are connecting (slots held) and the poll is not backed off, the
/// controller is asked which nodes are online (one small request, `computer[displayName,
/// offline]`), so a slot is freed as soon as its agent connects rather than at the next poll.
const CONNECT_CHECK: Duration = Duration::from_millis(500);

struct PoolState {
    mem: PoolMem,
    counts: plan::Counts,
    demand: u32,
    problems: BTreeMap<&'static str, Problem>,
    slots: HashMap<String, Slot>,
    /// Fired when the pool is removed: its in-flight provisions undo themselves.
    cancel: CancellationToken,
    /// Consecutive failed provisions (a create, secret or start that failed, or an agent that
    /// never connected), and when creating may be tried again. Reset when a node of the pool
    /// comes online.
    failures: u32,
    retry_at: Option<Instant>,
    /// Nodes deleted recently, and when: a poll sent before a deletion still lists the node,
    /// which must not be deleted (and counted) again.
    deleted: HashMap<String, Instant>,
    pacer: DefaultDirectRateLimiter,
    pace_key: (u64, u32),
    generation: Option<i64>,
}

impl PoolState {
    /// One more failed provision: creating waits 1 s, doubling up to 60 s.
    fn provision_failed(&mut self, kind: &'static str, p: Problem) {
        self.failures += 1;
        let wait = Duration::from_millis(500) * 2u32.pow(self.failures.min(7));
        self.retry_at = Some(Instant::now() + wait.min(Duration::from_secs(60)));
        self.problems.insert(kind, p);
    }

    /// Frees the connecting slots of nodes now online; a node that came online ends the
    /// pool's provisioning backoff.
    fn connected(&mut self, online: &BTreeSet<String>) {
        let before = self.slots.len();
        self.slots.retain(|n, _| !online.contains(n));
        if self.slots.len() < before {
            self.failures = 0;
            self.retry_at = None;
            self.problems.remove(PROBLEM_CONNECT);
        }
    }
}

/// A pool as one poll pass sees it: configuration, client (None without credentials), state.
type PoolRef = (Arc<PoolCfg>, Option<Arc<Client>>, Arc<Mutex<PoolState>>);

struct PoolEntry {
    cfg: Arc<PoolCfg>,
    client: Option<Arc<Client>>,
    state: Arc<Mutex<PoolState>>,
    root: String,
}

struct Controller {
    root: String,
    limiter: SharedLimiter,
    limits: Mutex<(u64, u32)>,
    gate: Arc<Gate>,
    interval: Mutex<Duration>,
    stop: CancellationToken,
}

/// The condition view of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConditionView {
    /// `Ready` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// For people.
    pub message: String,
}

/// What `GET /v1/jenkins/pools` shows for one pool.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JenkinsPoolStatus {
    /// Pool key.
    pub name: String,
    /// Controller root URL.
    pub url: String,
    /// Node name prefix.
    pub node_name_prefix: String,
    /// Node label string.
    pub labels: String,
    /// Nodes by state, target and throttling.
    pub nodes: plan::Counts,
    /// Queued builds waiting for this pool's labels.
    pub demand: u32,
    /// Nodes deleted for `connectTimeout`.
    pub leaks_total: u64,
    /// Current poll interval of the controller (seconds).
    pub poll_interval_seconds: f64,
    /// `Ready` and `Degraded`.
    pub conditions: Vec<ConditionView>,
    /// Kubernetes: the AgentPool generation the status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The connector: every Jenkins pool of this service.
pub struct Connector {
    runner: Arc<dyn Runner>,
    metrics: Metrics,
    /// `serve --ca-file`: trusted by pools without their own `caFile`.
    ca_file: Option<std::path::PathBuf>,
    pools: Mutex<BTreeMap<String, PoolEntry>>,
    controllers: Mutex<HashMap<String, Arc<Controller>>>,
    stop: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

fn limiter(rps: f64, burst: u32) -> DefaultDirectRateLimiter {
    RateLimiter::direct(crate::pacer::quota(rps, burst))
}

fn rate_key(rps: f64, burst: u32) -> (u64, u32) {
    (rps.to_bits(), burst)
}

impl Connector {
    /// A connector whose agents run on `runner`; Jenkins clients trust the platform's roots
    /// plus the pool's `caFile`, or else `ca_file`.
    pub fn new(
        runner: Arc<dyn Runner>,
        metrics: Metrics,
        ca_file: Option<std::path::PathBuf>,
    ) -> Arc<Connector> {
        Arc::new(Connector {
            runner,
            metrics,
            ca_file,
            pools: Mutex::new(BTreeMap::new()),
            controllers: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

    /// True when `key` is a Jenkins pool of this connector.
    pub fn has_pool(&self, key: &str) -> bool {
        self.pools.lock().expect("lock").contains_key(key)
    }

    /// Keys of every pool.
    pub fn pool_keys(&self) -> Vec<String> {
        self.pools.lock().expect("lock").keys().cloned().collect()
    }

    /// Adds or updates a pool (its memory of nodes, its client and its problems are kept
    /// across updates with the same controller and credentials).
    pub fn upsert(self: &Arc<Self>, cfg: PoolCfg) {
        let root = cfg.jenkins.root_url();
        let cfg = Arc::new(cfg);
        let p = &cfg.spec.provisioning;
        let pace_key = rate_key(p.per_second, p.burst);
        // Lock order everywhere: pools, then controllers.
        let mut pools = self.pools.lock().expect("lock");
        let ctl = self.controller(&root, &cfg.jenkins);
        let old = pools.remove(&cfg.key);
        let (state, client) = match old {
            Some(old) if old.root == root => {
                let mut st = old.state.lock().expect("lock");
                if st.pace_key != pace_key {
                    st.pacer = limiter(p.per_second, p.burst);
                    st.pace_key = pace_key;
                }
                drop(st);
                let same_creds = matches!((&old.cfg.credentials, &cfg.credentials), (Ok(a), Ok(b)) if a == b)
                    && old.cfg.jenkins.ca_file == cfg.jenkins.ca_file;
                let client = if same_creds { old.client.clone() } else { None };
                (old.state, client)
            }
            old => {
                if let Some(old) = old {
                    // Moved to another controller: the old one's nodes go.
                    old.state.lock().expect("lock").cancel.cancel();
                    self.spawn_cleanup(old, Reason::PoolRemoved);
                }
                let st = Arc::new(Mutex::new(PoolState {
                    mem: PoolMem::default(),
                    counts: plan::Counts::default(),
                    demand: 0,
                    problems: BTreeMap::new(),
                    slots: HashMap::new(),
                    cancel: CancellationToken::new(),
                    failures: 0,
                    retry_at: None,
                    deleted: HashMap::new(),
                    pacer: limiter(p.per_second, p.burst),
                    pace_key,
                    generation: None,
                }));
                (st, None)
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
        {
            let mut st = state.lock().expect("lock");
            match &tls {
                Err(e) => {
                    st.problems.insert(
                        PROBLEM_TLS,
                        Problem {
                            reason: "CaFileInvalid".into(),
                            message: format!("pool {}: {e}", cfg.key),
                        },
                    );
                }
                Ok(_) => {
                    st.problems.remove(PROBLEM_TLS);
                }
            }
            st.generation = cfg.agent_pool.as_ref().and_then(|a| a.metadata.generation);
            match &cfg.credentials {
                Err(e) => {
                    st.problems.insert(
                        PROBLEM_CREDENTIALS,
                        Problem {
                            reason: "CredentialsMissing".into(),
                            message: format!("pool {}: {e}", cfg.key),
                        },
                    );
                }
                Ok(_) => {
                    st.problems.remove(PROBLEM_CREDENTIALS);
                }
            }
        }
        pools.insert(
            cfg.key.clone(),
            PoolEntry {
                cfg,
                client,
                state,
                root: root.clone(),
            },
        );
        self.retune_locked(&pools, &root);
    }

    /// Removes a pool: its nodes are deleted and its agents stopped.
    pub fn remove(self: &Arc<Self>, key: &str) {
        let mut pools = self.pools.lock().expect("lock");
        let old = pools.remove(key);
        if let Some(old) = old {
            let root = old.root.clone();
            old.state.lock().expect("lock").cancel.cancel();
            self.spawn_cleanup(old, Reason::PoolRemoved);
            self.retune_locked(&pools, &root);
        }
        drop(pools);
        self.metrics.jenkins_demand.remove_label_values(&[key]).ok();
        for state in ["creating", "connecting", "idle", "busy", "deleting"] {
            self.metrics
                .jenkins_nodes
                .remove_label_values(&[key, state])
                .ok();
        }
    }

    /// Statuses of every pool.
    pub fn statuses(&self) -> Vec<JenkinsPoolStatus> {
        let pools = self.pools.lock().expect("lock");
        let ctls = self.controllers.lock().expect("lock");
        pools
            .values()
            .map(|e| {
                let st = e.state.lock().expect("lock");
                let interval = ctls
                    .get(&e.root)
                    .map(|c| *c.interval.lock().expect("lock"))
                    .unwrap_or(e.cfg.jenkins.poll_interval.0);
                let problems: Vec<&Problem> = st.problems.values().collect();
                let degraded = match problems.as_slice() {
                    [] => ConditionView {
                        type_: "Degraded".into(),
                        status: "False".into(),
                        reason: "AsExpected".into(),
                        // Never empty: a 1.20 apiserver turns "" into null and rejects it.
                        message: "Jenkins answers; no provisioning errors".into(),
                    },
                    ps => ConditionView {
                        type_: "Degraded".into(),
                        status: "True".into(),
                        reason: ps[0].reason.clone(),
                        message: ps
                            .iter()
                            .map(|p| p.message.as_str())
                            .collect::<Vec<_>>()
                            .join("; "),
                    },
                };
                let ready = st.counts.idle >= e.cfg.spec.min_idle.min(e.cfg.spec.max_total);
                let ready = ConditionView {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    reason: if ready {
                        "MinIdleOnline"
                    } else {
                        "BelowMinIdle"
                    }
                    .into(),
                    message: format!(
                        "{} of minIdle {} nodes online and idle",
                        st.counts.idle, e.cfg.spec.min_idle
                    ),
                };
                JenkinsPoolStatus {
                    name: e.cfg.key.clone(),
                    url: e.root.clone(),
                    node_name_prefix: e.cfg.jenkins.prefix(&e.cfg.key),
                    labels: e.cfg.jenkins.labels.clone(),
                    nodes: st.counts,
                    demand: st.demand,
                    leaks_total: st.mem.leaks_total,
                    poll_interval_seconds: interval.as_secs_f64(),
                    conditions: vec![ready, degraded],
                    observed_generation: st.generation,
                }
            })
            .collect()
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
    pub async fn shutdown(self: &Arc<Self>, delete: bool, timeout: Duration) {
        self.stop.cancel();
        let deadline = tokio::time::Instant::now() + timeout;
        // In-flight provisions finish (or undo themselves) first, so none starts an agent
        // after the cleanup listed them.
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("Jenkins connector: requests still running at shutdown");
        }
        self.tasks.reopen();
        // The cleanup gets its own budget, whatever the first wait took.
        let deadline = tokio::time::Instant::now() + timeout;
        if delete {
            let entries: Vec<PoolEntry> = {
                let mut pools = self.pools.lock().expect("lock");
                std::mem::take(&mut *pools).into_values().collect()
            };
            for e in entries {
                self.spawn_cleanup(e, Reason::PoolRemoved);
            }
        }
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("Jenkins connector: cleanup still running at shutdown; leaving it");
        }
    }

    fn controller(self: &Arc<Self>, root: &str, js: &JenkinsSpec) -> Arc<Controller> {
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
            gate: Gate::new(js.max_connecting),
            interval: Mutex::new(js.poll_interval.0),
            stop: self.stop.child_token(),
        });
        ctls.insert(root.to_string(), c.clone());
        let me = self.clone();
        let task = c.clone();
        self.tasks
            .spawn(async move { me.run_controller(task).await });
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
        c.gate.set_cap(connecting);
    }

    fn pools_of(&self, root: &str) -> Vec<PoolRef> {
        self.pools
            .lock()
            .expect("lock")
            .values()
            .filter(|e| e.root == root)
            .map(|e| (e.cfg.clone(), e.client.clone(), e.state.clone()))
            .collect()
    }

    async fn run_controller(self: Arc<Self>, ctl: Arc<Controller>) {
        let label = ctl.root.clone();
        let mut first = true;
        loop {
            let wait = if first {
                Duration::ZERO
            } else {
                *ctl.interval.lock().expect("lock")
            };
            first = false;
            // Until the next poll: while agents are connecting, check every CONNECT_CHECK which
            // came online (not while backed off: Jenkins is struggling then).
            let until = tokio::time::Instant::now() + wait;
            let base = self
                .pools_of(&ctl.root)
                .iter()
                .map(|p| p.0.jenkins.poll_interval.0)
                .min()
                .unwrap_or(wait);
            let checks = wait > CONNECT_CHECK && wait <= base;
            loop {
                // (Woken every CONNECT_CHECK whether or not slots are held now: provisions
                // spawned by the last poll take their slots after this loop started.)
                let next = if checks {
                    (tokio::time::Instant::now() + CONNECT_CHECK).min(until)
                } else {
                    until
                };
                tokio::select! {
                    _ = ctl.stop.cancelled() => return,
                    _ = tokio::time::sleep_until(next) => {}
                }
                if next >= until {
                    break;
                }
                if ctl.gate.used() > 0 {
                    self.check_connected(&ctl).await;
                }
            }
            let pools = self.pools_of(&ctl.root);
            if pools.is_empty() {
                // Last pool gone: this controller is no longer ours to poll. Both locks, in
                // the one order (pools, then controllers), so an upsert either sees this
                // controller gone or is seen here.
                let pools = self.pools.lock().expect("lock");
                let mut ctls = self.controllers.lock().expect("lock");
                if !pools.values().any(|e| e.root == ctl.root) {
                    ctls.remove(&ctl.root);
                    self.metrics
                        .jenkins_poll_interval
                        .remove_label_values(&[&label])
                        .ok();
                    self.metrics
                        .jenkins_connecting
                        .remove_label_values(&[&label])
                        .ok();
                    break;
                }
                continue;
            }
            self.poll_once(&ctl, &pools).await;
            self.metrics
                .jenkins_poll_interval
                .with_label_values(&[&label])
                .set(ctl.interval.lock().expect("lock").as_secs_f64());
            self.metrics
                .jenkins_connecting
                .with_label_values(&[&label])
                .set(ctl.gate.used() as i64);
        }
    }

    fn backoff(&self, ctl: &Controller, pools: &[PoolRef], struggling: bool) {
        let base = pools
            .iter()
            .map(|p| p.0.jenkins.poll_interval.0)
            .min()
            .unwrap_or(Duration::from_secs(2));
        let max = pools
            .iter()
            .map(|p| p.0.jenkins.max_poll_interval.0)
            .max()
            .unwrap_or(Duration::from_secs(60))
            .max(base);
        let mut iv = ctl.interval.lock().expect("lock");
        // Doubling while Jenkins struggles; back to normal on the first good poll (an answer in
        // time, with no error): a controller that answers well again gets its normal poll
        // at once, and one still struggling backs off again after one poll.
        *iv = if struggling { (*iv * 2).min(max) } else { base };
    }

    /// Frees the connecting slots of agents that connected since the last poll: one small
    /// request for the whole controller (see [`CONNECT_CHECK`]); a failure is left to the poll.
    async fn check_connected(&self, ctl: &Controller) {
        let pools = self.pools_of(&ctl.root);
        let Some(client) = pools.iter().find_map(|p| p.1.clone()) else {
            return;
        };
        let Ok(online) = client.online_nodes().await else {
            return;
        };
        for (_, _, st) in &pools {
            st.lock().expect("lock").connected(&online);
        }
        self.metrics
            .jenkins_connecting
            .with_label_values(&[&ctl.root])
            .set(ctl.gate.used() as i64);
    }

    async fn poll_once(self: &Arc<Self>, ctl: &Arc<Controller>, pools: &[PoolRef]) {
        let listed_at = Instant::now();
        let agents = match self.runner.list(&ctl.root).await {
            Ok(a) => {
                for (_, _, st) in pools {
                    st.lock().expect("lock").problems.remove(PROBLEM_POLL);
                }
                a
            }
            Err(e) => {
                // Without the agent list nothing can be judged an orphan: skip this pass.
                tracing::warn!(controller = %ctl.root, error = %e, "listing Jenkins agents failed");
                for (cfg, _, st) in pools {
                    st.lock().expect("lock").problems.insert(
                        PROBLEM_POLL,
                        Problem {
                            reason: "AgentListFailed".into(),
                            message: format!(
                                "pool {}: listing its agents ({}) failed: {e}",
                                cfg.key,
                                self.runner.name()
                            ),
                        },
                    );
                }
                return;
            }
        };
        let slow = pools
            .iter()
            .map(|p| p.0.jenkins.slow_response.0)
            .min()
            .unwrap_or(Duration::from_secs(2));
        // Polled with the first pool's credentials that Jenkins accepts: one pool's revoked
        // token degrades that pool, not the controller's other pools.
        let polled_at = Instant::now();
        let mut polled = None;
        let mut auth_failed: HashMap<String, JenkinsError> = HashMap::new();
        for (cfg, client, _) in pools {
            let Some(client) = client else { continue };
            let r = async {
                let (nodes, t1) = client.computers().await?;
                let (queue, t2) = client.queue().await?;
                Ok::<_, JenkinsError>((nodes, queue, t1.max(t2)))
            }
            .await;
            match r {
                Err(e) if matches!(e.status, Some(401) | Some(403)) => {
                    auth_failed.insert(cfg.key.clone(), e.clone());
                    polled = Some(Err(e));
                }
                other => {
                    polled = Some(other);
                    break;
                }
            }
        }
        let Some(polled) = polled else {
            // No pool of this controller has credentials: their problems say so.
            return;
        };
        let (nodes, queue) = match polled {
            Ok((nodes, queue, took)) => {
                if took > slow {
                    tracing::warn!(controller = %ctl.root, took_ms = took.as_millis() as u64, "Jenkins answers slowly; polling less often");
                }
                self.backoff(ctl, pools, took > slow);
                (nodes, queue)
            }
            Err(e) => {
                self.backoff(ctl, pools, e.is_overload());
                tracing::warn!(controller = %ctl.root, error = %e, "polling Jenkins failed");
                for (cfg, _, st) in pools {
                    let e = auth_failed.get(&cfg.key).unwrap_or(&e);
                    st.lock().expect("lock").problems.insert(
                        PROBLEM_POLL,
                        Problem::from_error(&cfg.key, None, "polling Jenkins", e),
                    );
                }
                return;
            }
        };
        for (cfg, _, st) in pools {
            if let Some(e) = auth_failed.get(&cfg.key) {
                st.lock().expect("lock").problems.insert(
                    PROBLEM_POLL,
                    Problem::from_error(&cfg.key, None, "polling Jenkins", e),
                );
            }
        }
        // Node names are prefix + 8 hex digits; two pools with one prefix cannot both work.
        let prefixes: Vec<(String, String)> = pools
            .iter()
            .map(|p| (p.0.jenkins.prefix(&p.0.key), p.0.key.clone()))
            .collect();
        let mut clashing: BTreeSet<String> = BTreeSet::new();
        for (i, (p, k)) in prefixes.iter().enumerate() {
            for (q, l) in &prefixes[i + 1..] {
                if p == q {
                    clashing.insert(k.clone());
                    clashing.insert(l.clone());
                }
            }
        }
        let by_prefix = |node: &str| -> Option<&str> {
            prefixes
                .iter()
                .find(|(p, _)| {
                    node.strip_prefix(p.as_str()).is_some_and(|rest| {
                        rest.len() == 8 && rest.bytes().all(|b| b.is_ascii_hexdigit())
                    })
                })
                .map(|(_, k)| k.as_str())
        };
        // A node belongs to the pool whose agent runs it (even after a prefix change), else
        // to the pool whose prefix it has.
        let agent_pool: HashMap<&str, &str> = agents
            .iter()
            .map(|a| (a.node.as_str(), a.pool.as_str()))
            .collect();
        let configured: BTreeSet<&str> = pools.iter().map(|p| p.0.key.as_str()).collect();
        let mut by_pool: HashMap<String, Vec<NodeObs>> = HashMap::new();
        for n in nodes {
            let owner = agent_pool
                .get(n.name.as_str())
                .copied()
                .filter(|p| configured.contains(p))
                .or_else(|| by_prefix(&n.name));
            if let Some(k) = owner {
                by_pool.entry(k.to_string()).or_default().push(n);
            }
        }
        let mut agents_by_pool: HashMap<&str, BTreeSet<String>> = HashMap::new();
        for a in &agents {
            agents_by_pool
                .entry(a.pool.as_str())
                .or_default()
                .insert(a.node.clone());
        }
        // Demand: each waiting item counts for the first pool (by name) that serves it.
        let mut demand: HashMap<String, u32> = HashMap::new();
        for item in &queue {
            let by_labels = |l: &str| match crate::labels::Expr::parse(l) {
                Ok(expr) => pools
                    .iter()
                    .find(|p| expr.matches(&p.0.jenkins.label_atoms()))
                    .map(|p| p.0.key.clone()),
                Err(_) => None,
            };
            let pool = match &item.wants {
                // A label with a single node is named by that node in older cores' texts.
                Wants::Label(l) => by_labels(l).or_else(|| by_prefix(l).map(str::to_string)),
                Wants::Node(n) => by_prefix(n).map(str::to_string),
            };
            if let Some(p) = pool {
                *demand.entry(p).or_default() += 1;
            }
        }
        for (cfg, pclient, st) in pools {
            if clashing.contains(&cfg.key) {
                st.lock().expect("lock").problems.insert(
                    PROBLEM_POLL,
                    Problem {
                        reason: "PrefixConflict".into(),
                        message: format!(
                            "pool {}: nodeNamePrefix {:?} is also another pool's on {}; neither pool is managed until one changes",
                            cfg.key,
                            cfg.jenkins.prefix(&cfg.key),
                            ctl.root
                        ),
                    },
                );
                continue;
            }
            // Without credentials nothing could be done: nothing is planned.
            let Some(pclient) = pclient.clone() else {
                continue;
            };
            let mut obs = Observation {
                now: Instant::now(),
                agents_listed_at: listed_at,
                polled_at,
                nodes: by_pool.remove(cfg.key.as_str()).unwrap_or_default(),
                agents: agents_by_pool.remove(cfg.key.as_str()).unwrap_or_default(),
                demand: demand.get(&cfg.key).copied().unwrap_or(0),
            };
            {
                let mut s = st.lock().expect("lock");
                s.deleted
                    .retain(|_, t| t.elapsed() < Duration::from_secs(60));
                let stale: BTreeSet<String> = s
                    .deleted
                    .iter()
                    .filter(|(_, t)| **t >= listed_at)
                    .map(|(n, _)| n.clone())
                    .collect();
                obs.nodes.retain(|n| !stale.contains(&n.name));
                obs.agents.retain(|a| !stale.contains(a));
            }
            let online: BTreeSet<String> = obs
                .nodes
                .iter()
                .filter(|n| !n.offline)
                .map(|n| n.name.clone())
                .collect();
            let steps = {
                let mut s = st.lock().expect("lock");
                if s.cancel.is_cancelled() {
                    continue;
                }
                s.demand = obs.demand;
                let now = obs.now;
                let PoolState {
                    mem,
                    pacer,
                    retry_at,
                    ..
                } = &mut *s;
                // After failed provisions, creating waits (exponential backoff).
                let backing_off = retry_at.is_some_and(|t| t > now);
                let (steps, counts) = plan::plan(&cfg.spec, mem, &obs, &mut || {
                    !backing_off && pacer.check().is_ok()
                });
                s.counts = counts;
                // Online (or gone) nodes no longer hold a connecting slot.
                s.connected(&online);
                let keep: BTreeSet<String> = s
                    .mem
                    .nodes
                    .iter()
                    .filter(|(_, m)| m.inflight != Some(Inflight::Deleting))
                    .map(|(n, _)| n.clone())
                    .collect();
                s.slots.retain(|n, _| keep.contains(n));
                steps
            };
            self.export(cfg, st);
            for step in steps {
                let (me, cfg, c, st) = (self.clone(), cfg.clone(), pclient.clone(), st.clone());
                match step {
                    Step::Create(n) => {
                        for _ in 0..n {
                            let name = format!(
                                "{}{:08x}",
                                cfg.jenkins.prefix(&cfg.key),
                                rand::random::<u32>()
                            );
                            st.lock()
                                .expect("lock")
                                .mem
                                .nodes
                                .insert(name.clone(), NodeMem::creating(Instant::now()));
                            let (me, ctl, cfg, c, st) =
                                (me.clone(), ctl.clone(), cfg.clone(), c.clone(), st.clone());
                            self.tasks
                                .spawn(async move { me.provision(ctl, cfg, c, st, name).await });
                        }
                    }
                    Step::Drain(node) => {
                        self.tasks
                            .spawn(async move { me.drain(cfg, c, st, node).await });
                    }
                    Step::Delete {
                        node,
                        reason,
                        node_exists,
                        ..
                    } => {
                        self.tasks.spawn(async move {
                            me.delete(cfg, c, st, node, reason, node_exists).await
                        });
                    }
                }
            }
        }
    }

    fn export(&self, cfg: &PoolCfg, st: &Mutex<PoolState>) {
        let s = st.lock().expect("lock");
        let c = s.counts;
        for (state, v) in [
            ("creating", c.creating),
            ("connecting", c.connecting),
            ("idle", c.idle),
            ("busy", c.busy),
            ("deleting", c.deleting),
        ] {
            self.metrics
                .jenkins_nodes
                .with_label_values(&[&cfg.key, state])
                .set(v as i64);
        }
        self.metrics
            .jenkins_demand
            .with_label_values(&[&cfg.key])
            .set(s.demand as i64);
        if c.throttled > 0 {
            self.metrics.throttled.with_label_values(&[&cfg.key]).inc();
        }
    }

    /// Create the node, read its secret, start its agent (holding a connecting slot until the
    /// node is seen online).
    async fn provision(
        self: Arc<Self>,
        ctl: Arc<Controller>,
        cfg: Arc<PoolCfg>,
        client: Arc<Client>,
        st: Arc<Mutex<PoolState>>,
        node: String,
    ) {
        let cancel = st.lock().expect("lock").cancel.clone();
        let slot = tokio::select! {
            s = ctl.gate.acquire() => s,
            _ = ctl.stop.cancelled() => {
                st.lock().expect("lock").mem.nodes.remove(&node);
                return;
            }
            _ = cancel.cancelled() => {
                st.lock().expect("lock").mem.nodes.remove(&node);
                return;
            }
        };
        self.metrics
            .jenkins_connecting
            .with_label_values(&[&ctl.root])
            .set(ctl.gate.used() as i64);
        let workdir = self.runner.workdir(&cfg.jenkins, &node);
        let description = format!("warmpool pool {} (managed: do not edit)", cfg.key);
        let fail = |p: Problem| {
            tracing::warn!(pool = %cfg.key, node = %node, controller = %ctl.root, error = %p.message, "provisioning a Jenkins agent failed");
            self.metrics
                .provisions
                .with_label_values(&[&cfg.key, "failed"])
                .inc();
            st.lock().expect("lock").provision_failed(PROBLEM_CREATE, p);
        };
        if let Err(e) = client
            .create_node(&node, &workdir, &cfg.jenkins.labels, &description)
            .await
        {
            fail(Problem::from_error(
                &cfg.key,
                Some(&node),
                "creating the node",
                &e,
            ));
            st.lock().expect("lock").mem.nodes.remove(&node);
            return;
        }
        let secret = match client.secret(&node).await {
            Ok(s) => s,
            Err(e) => {
                fail(Problem::from_error(
                    &cfg.key,
                    Some(&node),
                    "reading the agent secret",
                    &e,
                ));
                self.undo(&cfg, &client, &st, &node).await;
                return;
            }
        };
        if ctl.stop.is_cancelled() || cancel.is_cancelled() {
            // Shutting down, or the pool is gone: no new agent; the node goes again.
            self.undo(&cfg, &client, &st, &node).await;
            return;
        }
        let launch = Launch {
            pool: cfg.key.clone(),
            node: node.clone(),
            url: ctl.root.clone(),
            secret,
            workdir,
            spec: cfg.jenkins.clone(),
            agent_pool: cfg.agent_pool.clone(),
            ca_file: cfg.jenkins.ca_file.clone().or_else(|| self.ca_file.clone()),
        };
        if let Err(e) = self.runner.start(launch).await {
            fail(Problem {
                reason: "AgentStartFailed".into(),
                message: format!(
                    "pool {}: node {node}: starting its agent ({}) failed: {e}",
                    cfg.key,
                    self.runner.name()
                ),
            });
            self.undo(&cfg, &client, &st, &node).await;
            return;
        }
        tracing::info!(pool = %cfg.key, node = %node, controller = %ctl.root, "Jenkins node created; agent started");
        self.metrics
            .provisions
            .with_label_values(&[&cfg.key, "started"])
            .inc();
        let mut s = st.lock().expect("lock");
        let now = Instant::now();
        if let Some(m) = s.mem.nodes.get_mut(&node) {
            m.inflight = None;
            m.agent_started = Some(now);
            m.offline_since = Some(now);
        }
        // The backoff ends when the node comes online, not here: an agent that never connects
        // is a failed provision too (see `delete`).
        s.problems.remove(PROBLEM_CREATE);
        s.slots.insert(node, slot);
    }

    /// Removes a half-provisioned node (best effort: a node left behind is an orphan the next
    /// poll deletes).
    async fn undo(&self, cfg: &PoolCfg, client: &Client, st: &Mutex<PoolState>, node: &str) {
        if let Err(e) = client.delete_node(node).await {
            tracing::warn!(pool = %cfg.key, node, error = %e, "deleting a half-provisioned node failed; the next poll retries");
        }
        let _ = self.runner.stop(client.root(), &cfg.key, node).await;
        st.lock().expect("lock").mem.nodes.remove(node);
        self.metrics
            .recycles
            .with_label_values(&[&cfg.key, Reason::ProvisionFailed.as_str()])
            .inc();
    }

    /// Takes the labels of a node running its last allowed build, so Jenkins gives it no other.
    async fn drain(
        self: Arc<Self>,
        cfg: Arc<PoolCfg>,
        client: Arc<Client>,
        st: Arc<Mutex<PoolState>>,
        node: String,
    ) {
        let workdir = self.runner.workdir(&cfg.jenkins, &node);
        let description = format!("warmpool pool {} (managed: do not edit)", cfg.key);
        match client.drain_node(&node, &workdir, &description).await {
            Ok(()) => {
                tracing::info!(pool = %cfg.key, node = %node, "Jenkins node drained: its last allowed build runs, then it is deleted");
                st.lock().expect("lock").problems.remove(PROBLEM_DRAIN);
            }
            Err(e) => {
                // Not fatal: the node is still deleted when the build ends, but Jenkins may give
                // it one more build first.
                tracing::warn!(pool = %cfg.key, node = %node, error = %e, "draining a Jenkins node failed");
                st.lock().expect("lock").problems.insert(
                    PROBLEM_DRAIN,
                    Problem::from_error(&cfg.key, Some(&node), "draining the node", &e),
                );
            }
        }
    }

    async fn delete(
        self: Arc<Self>,
        cfg: Arc<PoolCfg>,
        client: Arc<Client>,
        st: Arc<Mutex<PoolState>>,
        node: String,
        reason: Reason,
        node_exists: bool,
    ) {
        if node_exists && let Err(e) = client.delete_node(&node).await {
            let p = Problem::from_error(&cfg.key, Some(&node), "deleting the node", &e);
            tracing::warn!(pool = %cfg.key, node = %node, error = %e, "deleting a Jenkins node failed; the next poll retries");
            let mut s = st.lock().expect("lock");
            s.problems.insert(PROBLEM_DELETE, p);
            if let Some(m) = s.mem.nodes.get_mut(&node) {
                m.inflight = None;
            }
            return;
        }
        if let Err(e) = self.runner.stop(client.root(), &cfg.key, &node).await {
            tracing::warn!(pool = %cfg.key, node = %node, error = %e, "stopping an agent failed; the next poll retries");
        }
        let mut s = st.lock().expect("lock");
        if reason == Reason::ConnectTimeout {
            tracing::warn!(pool = %cfg.key, node = %node, connect_timeout = %cfg.spec.connect_timeout, "node never came online: deleted with its agent (a leak)");
            self.metrics.leaks.with_label_values(&[&cfg.key]).inc();
            s.mem.leaks_total += 1;
            // A pool whose agents never connect backs its creations off like failed ones.
            s.provision_failed(
                PROBLEM_CONNECT,
                Problem {
                    reason: "AgentNeverConnected".into(),
                    message: format!(
                        "pool {}: node {node}: its agent did not come online within connectTimeout {}; node and agent deleted (a leak)",
                        cfg.key, cfg.spec.connect_timeout
                    ),
                },
            );
        } else {
            tracing::info!(pool = %cfg.key, node = %node, reason = reason.as_str(), "Jenkins node recycled");
        }
        self.metrics
            .recycles
            .with_label_values(&[&cfg.key, reason.as_str()])
            .inc();
        s.problems.remove(PROBLEM_DELETE);
        s.deleted.insert(node.clone(), Instant::now());
        s.mem.nodes.remove(&node);
        s.slots.remove(&node);
    }

    /// Deletes every node and agent of a pool that is gone (or moved to another controller),
    /// once its in-flight provisions have seen the cancellation and undone themselves.
    fn spawn_cleanup(self: &Arc<Self>, e: PoolEntry, reason: Reason) {
        let me = self.clone();
        self.tasks.spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline
                && e.state
                    .lock()
                    .expect("lock")
                    .mem
                    .nodes
                    .values()
                    .any(|m| m.inflight == Some(Inflight::Creating))
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let nodes: Vec<String> = e
                .state
                .lock()
                .expect("lock")
                .mem
                .nodes
                .keys()
                .cloned()
                .collect();
            let mut all: BTreeSet<String> = nodes.into_iter().collect();
            if let Ok(agents) = me.runner.list(&e.root).await {
                all.extend(
                    agents
                        .into_iter()
                        .filter(|a| a.pool == e.cfg.key)
                        .map(|a| a.node),
                );
            }
            for node in all {
                if let Some(c) = &e.client
                    && let Err(err) = c.delete_node(&node).await
                {
                    tracing::warn!(pool = %e.cfg.key, node = %node, error = %err, "deleting a node of a removed pool failed");
                }
                let _ = me.runner.stop(&e.root, &e.cfg.key, &node).await;
                me.metrics
                    .recycles
                    .with_label_values(&[&e.cfg.key, reason.as_str()])
                    .inc();
            }
        });
    }
}
