//! The per-controller poll: every interval, the runner's live agents (processes or pods), then
//! ONE `computer/api/json` (with a `tree`) and ONE `queue/api/json`, never a request per node.
//! Each pool's share of the answer becomes engine events ([`feed`]): a node online and free is
//! connected or released, a busy one is leased by its build, an offline one is connecting; a
//! node of the pool without agent, or an agent without node, is an orphan; the queue is the
//! pool's demand. The engine decides what follows.
//!
//! A slow or failing Jenkins doubles the interval up to `maxPollInterval`; the first good poll
//! returns to `pollInterval` at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use super::model::{NodeObs, Wants};
use super::*;
use crate::engine::{AgentState, Engine, Reason};

/// The offline node warmpool keeps on a controller without agent nodes, so that Jenkins names
/// the label of queued builds (see `Connector::ensure_placeholder`). Its label is its name.
pub const PLACEHOLDER_NODE: &str = "warmpool-placeholder";
/// Its description.
const PLACEHOLDER_DESCRIPTION: &str = "warmpool placeholder: never online, takes no build; it makes Jenkins name the label of queued builds while there is no other agent node (managed: do not edit)";

/// How often connecting agents are looked for between full polls.
const CONNECT_CHECK: Duration = Duration::from_millis(500);

/// One pool's share of one poll.
#[derive(Debug, Clone, Default)]
pub(crate) struct PoolObs {
    /// Pool key.
    pub pool: String,
    /// The pool's nodes (by prefix, or by their agent's pool).
    pub nodes: Vec<NodeObs>,
    /// The pool's live agents (processes or pods) by node, with their age when known.
    pub agents: BTreeMap<String, Option<Duration>>,
    /// Queued builds waiting for the pool's labels.
    pub demand: u32,
    /// When the agent list was taken (before the node poll): an agent started after it is not
    /// missing from it.
    pub listed_at: Option<Instant>,
    /// `maxUses` (an adopted drained node has used them all).
    pub max_uses: u32,
}

/// Feeds one pool's observation to the engine; returns the nodes seen online (their
/// connecting permits go).
pub(crate) fn feed(e: &mut Engine, o: &PoolObs, now: Instant) -> Vec<String> {
    let listed_at = o.listed_at.unwrap_or(now);
    let seen: BTreeSet<&str> = o.nodes.iter().map(|n| n.name.as_str()).collect();
    let mut online = Vec::new();
    for n in &o.nodes {
        let has_agent = o.agents.contains_key(&n.name);
        match e.agent(&n.name).map(|a| (a.state, a.since)) {
            None if has_agent => {
                // Left by an earlier instance: adopted with its age and drained state.
                let age = o.agents[&n.name].unwrap_or_default();
                let d = n.drained;
                let uses = if d { o.max_uses } else { 0 };
                e.adopt_with(&n.name, &o.pool, AgentState::Connecting, age, uses, d, now);
            }
            // A build on a node without agent: Jenkins' business until it ends.
            None if n.busy => continue,
            None => {
                e.orphan(&n.name, &o.pool, Reason::OrphanNode, now);
                continue;
            }
            Some((AgentState::Provisioning | AgentState::Terminating, _)) => continue,
            Some((_, since)) if !has_agent && !n.busy && since < listed_at => {
                // Its process or pod is gone.
                e.external_gone(&n.name, Reason::OrphanNode, now);
                continue;
            }
            Some(_) => {}
        }
        if n.offline {
            if !n.busy {
                e.external_offline(&n.name, now);
            }
        } else if n.busy {
            let holder = n
                .build
                .clone()
                .unwrap_or_else(|| format!("a build on node {}", n.name));
            e.external_busy(&n.name, &holder, now);
            online.push(n.name.clone());
        } else {
            e.external_idle(&n.name, now);
            online.push(n.name.clone());
        }
    }
    // Agents whose node is gone (not one being created, nor one started after the poll).
    let gone: Vec<String> = e
        .agents()
        .filter(|a| a.pool == o.pool && !seen.contains(a.id.as_str()))
        .filter(|a| !matches!(a.state, AgentState::Provisioning | AgentState::Terminating))
        .filter(|a| a.since < listed_at)
        .map(|a| a.id.clone())
        .collect();
    for id in gone {
        e.external_gone(&id, Reason::OrphanAgent, now);
    }
    // Agents (processes or pods) without node that the engine does not know.
    for node in o.agents.keys() {
        if !seen.contains(node.as_str()) && e.agent(node).is_none() {
            e.orphan(node, &o.pool, Reason::OrphanAgent, now);
        }
    }
    e.set_external_demand(&o.pool, o.demand, now);
    e.set_held(&o.pool, false, now);
    online
}

/// A pool as one poll pass sees it.
struct PoolRef {
    cfg: Arc<PoolCfg>,
    client: Option<Arc<Client>>,
    verified: bool,
}

impl Connector {
    fn pools_of(&self, root: &str) -> Vec<PoolRef> {
        self.pools
            .lock()
            .expect("lock")
            .values()
            .filter(|e| e.root == root)
            .map(|e| PoolRef {
                cfg: e.cfg.clone(),
                client: e.client.clone(),
                verified: e.verified,
            })
            .collect()
    }

    pub(super) async fn run_controller(self: Arc<Self>, ctl: Arc<Controller>) {
        let label = ctl.root.clone();
        let mut next = tokio::time::Instant::now();
        loop {
            // Until the next full poll: while agents connect, a node list every
            // CONNECT_CHECK frees their permits as soon as they are online.
            loop {
                let now = tokio::time::Instant::now();
                if now >= next {
                    break;
                }
                let connecting = ctl.connecting() > 0;
                let until = if connecting {
                    next.min(now + CONNECT_CHECK)
                } else {
                    next
                };
                tokio::select! {
                    _ = ctl.stop.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => {}
                    _ = ctl.started.notified(), if !connecting => continue,
                }
                if until < next && ctl.connecting() > 0 {
                    self.connect_check(&ctl).await;
                }
            }
            if ctl.stop.is_cancelled() {
                return;
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
                    return;
                }
                drop((pools, ctls));
                next = tokio::time::Instant::now() + *ctl.interval.lock().expect("lock");
                continue;
            }
            self.poll_once(&ctl, &pools).await;
            next = tokio::time::Instant::now() + *ctl.interval.lock().expect("lock");
            self.metrics
                .jenkins_poll_interval
                .with_label_values(&[&label])
                .set(ctl.interval.lock().expect("lock").as_secs_f64());
            self.metrics
                .jenkins_connecting
                .with_label_values(&[&label])
                .set(ctl.connecting() as i64);
        }
    }

    /// One list of the online nodes (no queue, no agent list) to see connecting agents online: each one seen
    /// is connected in the engine and gives its permit back. Skipped while the controller is
    /// backed off (the full poll's own pace then).
    async fn connect_check(&self, ctl: &Controller) {
        let pools = self.pools_of(&ctl.root);
        let base = pools
            .iter()
            .map(|p| p.cfg.jenkins.poll_interval.0)
            .min()
            .unwrap_or_default();
        if *ctl.interval.lock().expect("lock") > base {
            return;
        }
        let Some(client) = pools.iter().find_map(|p| p.client.clone()) else {
            return;
        };
        let Ok(online) = client.online_nodes().await else {
            return;
        };
        let up: Vec<String> = self
            .agents
            .lock()
            .expect("lock")
            .iter()
            .filter(|(n, a)| a.root == ctl.root && a.permit.is_some() && online.contains(*n))
            .map(|(n, _)| n.clone())
            .collect();
        if up.is_empty() {
            return;
        }
        let Some(svc) = self.svc.upgrade() else {
            return;
        };
        // Online: connected (a build it already runs is seen by the next full poll).
        svc.apply(|e, now| {
            for n in &up {
                e.external_idle(n, now);
            }
        });
        for n in &up {
            self.connected(n);
        }
        self.metrics
            .jenkins_connecting
            .with_label_values(&[&ctl.root])
            .set(ctl.connecting() as i64);
    }

    /// A struggling controller doubles the interval (up to the largest `maxPollInterval`);
    /// a good poll returns to the smallest `pollInterval` at once.
    fn backoff(&self, ctl: &Controller, pools: &[PoolRef], struggling: bool) {
        let base = pools
            .iter()
            .map(|p| p.cfg.jenkins.poll_interval.0)
            .min()
            .unwrap_or(Duration::from_secs(2));
        let max = pools
            .iter()
            .map(|p| p.cfg.jenkins.max_poll_interval.0)
            .max()
            .unwrap_or(Duration::from_secs(60))
            .max(base);
        let mut iv = ctl.interval.lock().expect("lock");
        *iv = if struggling { (*iv * 2).min(max) } else { base };
    }

    fn verified(&self, pool: &str) {
        if let Some(e) = self.pools.lock().expect("lock").get_mut(pool) {
            e.verified = true;
        }
    }

    fn poll_problem(&self, pools: &[PoolRef], f: impl Fn(&PoolCfg) -> Option<Problem>) {
        let mut all = self.pools.lock().expect("lock");
        for p in pools {
            if let Some(e) = all.get_mut(&p.cfg.key) {
                match f(&p.cfg) {
                    Some(pr) => {
                        e.problems.insert(PROBLEM_POLL, pr);
                    }
                    None => {
                        e.problems.remove(PROBLEM_POLL);
                    }
                }
            }
        }
    }

    /// Creates [`PLACEHOLDER_NODE`] on a controller without agent nodes when one of its pools
    /// may have no node (`minIdle` 0): with any agent node, `Queue.BuildableItem
    /// .getCauseOfBlockage` names a queued build's label ("There are no nodes with the label
    /// ‘linux’"), whatever the task (a Pipeline `node` block exports no label of its own).
    /// The placeholder never connects (no agent runs for it) and is EXCLUSIVE with a label no
    /// build asks for, so no build is ever given to it; no pool's prefix claims it. Made with
    /// `client`, the one Jenkins just answered. Best effort: a failure is logged and retried by
    /// the next poll.
    async fn ensure_placeholder(&self, pools: &[PoolRef], client: &Client) {
        let Some(p) = pools.iter().find(|p| p.cfg.spec.min_idle == 0) else {
            return;
        };
        match client
            .create_node(
                PLACEHOLDER_NODE,
                &p.cfg.jenkins.remote_fs,
                PLACEHOLDER_NODE,
                PLACEHOLDER_DESCRIPTION,
            )
            .await
        {
            Ok(()) => {
                tracing::info!(
                    node = PLACEHOLDER_NODE,
                    "controller without agent nodes: placeholder node created so Jenkins names the labels of queued builds"
                )
            }
            Err(e) => {
                tracing::warn!(node = PLACEHOLDER_NODE, error = %e, "creating the placeholder node failed; the next poll retries")
            }
        }
    }

    async fn poll_once(&self, ctl: &Arc<Controller>, pools: &[PoolRef]) {
        let listed_at = Instant::now();
        let agents = match self.runner.list(&ctl.root).await {
            Ok(a) => a,
            Err(e) => {
                // Without the agent list nothing can be judged an orphan: skip this pass.
                tracing::warn!(error = %e, "listing Jenkins agents failed");
                self.poll_problem(pools, |cfg| {
                    Some(Problem {
                        reason: "AgentListFailed".into(),
                        message: format!(
                            "pool {}: listing its agents ({}) failed: {e}",
                            cfg.key,
                            self.runner.name()
                        ),
                    })
                });
                return;
            }
        };
        let slow = pools
            .iter()
            .map(|p| p.cfg.jenkins.slow_response.0)
            .min()
            .unwrap_or(Duration::from_secs(2));
        // Polled with the first pool's credentials that Jenkins accepts: one pool's revoked
        // token degrades that pool, not the controller's other pools.
        let mut polled = None;
        // The client Jenkins answered.
        let mut answered: Option<Arc<Client>> = None;
        let mut auth_failed: HashMap<String, JenkinsError> = HashMap::new();
        for p in pools {
            let Some(client) = &p.client else { continue };
            let r = async {
                let (nodes, t1) = client.computers().await?;
                let (queue, t2) = client.queue().await?;
                Ok::<_, JenkinsError>((nodes, queue, t1.max(t2)))
            }
            .await;
            match r {
                Err(e) if matches!(e.status, Some(401) | Some(403)) => {
                    auth_failed.insert(p.cfg.key.clone(), e.clone());
                    polled = Some(Err(e));
                }
                other => {
                    if other.is_ok() {
                        self.verified(&p.cfg.key);
                        answered = Some(client.clone());
                    }
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
                // A pool whose own client never got a good answer (other credentials, another
                // CA file) is checked once, with one request: it is not managed until it works.
                for p in pools.iter().filter(|p| !p.verified) {
                    let Some(client) = &p.client else { continue };
                    if auth_failed.contains_key(&p.cfg.key) {
                        continue;
                    }
                    match client.online_nodes().await {
                        Ok(_) => self.verified(&p.cfg.key),
                        Err(e) => {
                            auth_failed.insert(p.cfg.key.clone(), e);
                        }
                    }
                }
                if took > slow {
                    tracing::warn!(
                        took_ms = took.as_millis() as u64,
                        "Jenkins answers slowly; polling less often"
                    );
                }
                self.backoff(ctl, pools, took > slow);
                (nodes, queue)
            }
            Err(e) => {
                self.backoff(ctl, pools, e.is_overload());
                tracing::warn!(error = %e, "polling Jenkins failed");
                self.poll_problem(pools, |cfg| {
                    let e = auth_failed.get(&cfg.key).unwrap_or(&e);
                    Some(Problem::from_error(&cfg.key, None, "polling Jenkins", e))
                });
                return;
            }
        };
        // Jenkins names no label in `why` while it has no agent node at all, and a Pipeline's
        // `node('label')` exports none either: a pool with minIdle 0 would never see its demand.
        if !nodes.iter().any(|n| !n.built_in)
            && let Some(client) = &answered
        {
            self.ensure_placeholder(pools, client).await;
        }
        // Node names are prefix + 8 hex digits; two pools with one prefix cannot both work.
        let prefixes: Vec<(String, String)> = pools
            .iter()
            .map(|p| (p.cfg.jenkins.prefix(&p.cfg.key), p.cfg.key.clone()))
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
        self.poll_problem(pools, |cfg| {
            if let Some(e) = auth_failed.get(&cfg.key) {
                return Some(Problem::from_error(&cfg.key, None, "polling Jenkins", e));
            }
            clashing.contains(&cfg.key).then(|| Problem {
                reason: "PrefixConflict".into(),
                message: format!(
                    "pool {}: nodeNamePrefix {:?} is also another pool's on {}; neither pool is managed until one changes",
                    cfg.key,
                    cfg.jenkins.prefix(&cfg.key),
                    ctl.root
                ),
            })
        });
        let by_prefix = |node: &str| -> Option<&str> {
            prefixes
                .iter()
                .find(|(p, _)| is_pool_node(p, node))
                .map(|(_, k)| k.as_str())
        };
        // Work finished after the agent list was taken is not judged on this poll.
        let stale: BTreeSet<String> = {
            let mut d = self.deleted.lock().expect("lock");
            d.retain(|_, t| t.elapsed() < Duration::from_secs(60));
            d.iter()
                .filter(|(_, t)| **t >= listed_at)
                .map(|(n, _)| n.clone())
                .collect()
        };
        // A node belongs to the pool whose agent runs it (even after a prefix change), else
        // to the pool whose prefix it has.
        let configured: BTreeSet<&str> = pools.iter().map(|p| p.cfg.key.as_str()).collect();
        let agent_pool: HashMap<&str, &str> = agents
            .iter()
            .map(|a| (a.node.as_str(), a.pool.as_str()))
            .collect();
        let mut obs: HashMap<String, PoolObs> = HashMap::new();
        for n in nodes.into_iter().filter(|n| !stale.contains(&n.name)) {
            let owner = agent_pool
                .get(n.name.as_str())
                .copied()
                .filter(|p| configured.contains(p))
                .or_else(|| by_prefix(&n.name));
            if let Some(k) = owner {
                obs.entry(k.to_string()).or_default().nodes.push(n);
            }
        }
        let now = SystemTime::now();
        for a in agents.iter().filter(|a| !stale.contains(&a.node)) {
            if configured.contains(a.pool.as_str()) {
                let age = a.started.and_then(|t| now.duration_since(t).ok());
                obs.entry(a.pool.clone())
                    .or_default()
                    .agents
                    .insert(a.node.clone(), age);
            }
        }
        // Demand: each waiting item counts for the first pool (by name) that serves it.
        for item in &queue {
            let by_labels = |l: &str| match crate::labels::Expr::parse(l) {
                Ok(expr) => pools
                    .iter()
                    .find(|p| expr.matches(&p.cfg.jenkins.label_atoms()))
                    .map(|p| p.cfg.key.clone()),
                Err(_) => None,
            };
            let pool = match &item.wants {
                // A label with a single node is named by that node in older cores' texts.
                Wants::Label(l) => by_labels(l).or_else(|| by_prefix(l).map(str::to_string)),
                Wants::Node(n) => by_prefix(n).map(str::to_string),
            };
            if let Some(p) = pool {
                obs.entry(p).or_default().demand += 1;
            }
        }
        let Some(svc) = self.svc.upgrade() else {
            return;
        };
        for p in pools {
            // Without credentials that work nothing can be done; with a clashing prefix nothing
            // is safe.
            if p.client.is_none()
                || clashing.contains(&p.cfg.key)
                || auth_failed.contains_key(&p.cfg.key)
            {
                continue;
            }
            let mut o = obs.remove(&p.cfg.key).unwrap_or_default();
            o.pool = p.cfg.key.clone();
            o.listed_at = Some(listed_at);
            o.max_uses = p.cfg.spec.max_uses;
            // Whatever the poll may adopt or find orphaned is terminated through this
            // connector: it must know the agent's controller first.
            for name in o.nodes.iter().map(|n| &n.name).chain(o.agents.keys()) {
                self.track(name, &o.pool);
            }
            let online = svc.apply(|e, now| feed(e, &o, now));
            for n in &online {
                self.connected(n);
            }
            self.export(&svc, &p.cfg.key);
        }
        // Forget what the engine did not take (busy nodes without agent, clashes).
        let known: BTreeSet<String> = svc.read(|e| e.agents().map(|a| a.id.clone()).collect());
        self.agents
            .lock()
            .expect("lock")
            .retain(|id, a| a.permit.is_some() || known.contains(id));
    }

    fn export(&self, svc: &Service, pool: &str) {
        let (counts, demand) = svc.read(|e| {
            let mut c = [0i64; 5];
            for a in e.agents().filter(|a| a.pool == pool) {
                let i = match a.state {
                    AgentState::Provisioning => 0,
                    AgentState::Connecting => 1,
                    AgentState::Idle | AgentState::Cleaning => 2,
                    AgentState::Leased => 3,
                    AgentState::Terminating => 4,
                };
                c[i] += 1;
            }
            (c, e.external_demand(pool))
        });
        for (state, v) in ["creating", "connecting", "idle", "busy", "deleting"]
            .into_iter()
            .zip(counts)
        {
            self.metrics
                .jenkins_nodes
                .with_label_values(&[pool, state])
                .set(v);
        }
        self.metrics
            .jenkins_demand
            .with_label_values(&[pool])
            .set(demand as i64);
    }
}

#[cfg(test)]
#[path = "poll_tests.rs"]
mod tests;
