//! The `kubernetes` backend: every agent is a pod built from its `AgentPool`'s template.
//!
//! Owns pod construction (env `WARMPOOL_HUB`, `WARMPOOL_AGENT_ID`, `WARMPOOL_TOKEN` injected into
//! the agent container; labels and annotations from which pool state can be rebuilt; an owner
//! reference to the `AgentPool`), pod creation and deletion, and the watchers that feed the
//! service: `AgentPool`s become pools (invalid specs are reported, never applied), pod phases
//! become agent events (Running -> started, gone/Failed/Succeeded -> exited). It also writes each
//! pool's status through the status subresource.
//!
//! It does not decide sizing: the engine does, and this backend executes. Pods are never patched
//! on the lease path. On shutdown pods are left running (`keeps_agents_on_shutdown`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{EnvVar, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{Backend, BackendEvent, BoxFuture, EventSink, PoolEvent, ProvisionRequest};
use crate::k8s::crd::{AgentPool, AgentPoolStatus, Condition};
use crate::service::Service;
use kube::Resource;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};

/// Label: the pool a pod belongs to.
pub const LABEL_POOL: &str = "warmpool.dev/pool";
/// Label: the agent id (also the pod name).
pub const LABEL_AGENT: &str = "warmpool.dev/agent";
/// Label: hash of the pod template the pod was built from.
pub const LABEL_TEMPLATE_HASH: &str = "warmpool.dev/template-hash";
/// Label: marks pods this service manages (the pod watcher selects on it).
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Annotation: uid of the owning `AgentPool`.
pub const ANNOTATION_POOL_UID: &str = "warmpool.dev/pool-uid";
/// Annotation: when warmpool created the pod (RFC 3339).
pub const ANNOTATION_CREATED_AT: &str = "warmpool.dev/created-at";

/// Settings of the Kubernetes backend.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// Namespace of the `AgentPool`s and their pods; None serves every namespace (pools are
    /// then keyed `namespace.name` in the engine and the API).
    pub namespace: Option<String>,
    /// URL agents in pods dial.
    pub hub_url: String,
    /// How often pool statuses are written (only when they changed).
    pub status_interval: Duration,
}

/// The Kubernetes backend.
pub struct KubeBackend {
    client: Client,
    cfg: KubeConfig,
    /// The last valid version of every `AgentPool` (its template builds the pods).
    pools: DashMap<String, AgentPool>,
    /// `AgentPool`s whose latest spec is invalid (by key): the object and one message per
    /// problem.
    invalid: DashMap<String, (AgentPool, Vec<String>)>,
    /// Pods that cannot be scheduled (agent -> (pool, why)): kept and reported, not recreated.
    pending: DashMap<String, (String, String)>,
    /// Publishes Events on AgentPools (the recorder folds repeats into a series).
    recorder: Recorder,
    /// Last time each (pool, reason) was published: repeats within a minute are dropped.
    recorded: DashMap<(String, &'static str), std::time::Instant>,
    /// Namespace of every agent pod this instance knows.
    agent_ns: DashMap<String, String>,
}

/// Repeats of one event reason on one pool within this window are not published again.
const EVENT_WINDOW: Duration = Duration::from_secs(60);

impl KubeBackend {
    /// A backend for one namespace.
    pub fn new(client: Client, cfg: KubeConfig) -> KubeBackend {
        KubeBackend {
            client: client.clone(),
            cfg,
            pools: DashMap::new(),
            invalid: DashMap::new(),
            pending: DashMap::new(),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "warmpool".into(),
                    instance: None,
                },
            ),
            recorded: DashMap::new(),
            agent_ns: DashMap::new(),
        }
    }

    /// The engine's key for a pool: its name, or `namespace.name` across namespaces.
    pub fn pool_key(&self, namespace: &str, name: &str) -> String {
        match &self.cfg.namespace {
            Some(_) => name.to_string(),
            None => format!("{namespace}.{name}"),
        }
    }

    fn key_of(&self, ap: &AgentPool) -> String {
        self.pool_key(&ap.namespace().unwrap_or_default(), &ap.name_any())
    }

    fn key_of_pod(&self, pod: &Pod) -> Option<String> {
        let name = pod.labels().get(LABEL_POOL)?;
        Some(self.pool_key(&pod.namespace().unwrap_or_default(), name))
    }

    fn pods_in(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn scope<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match &self.cfg.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Forgets a pool that is gone.
    fn forget(&self, key: &str) {
        self.pools.remove(key);
        self.invalid.remove(key);
        self.recorded.retain(|(pool, _), _| pool != key);
    }

    fn namespace_of_agent(&self, agent: &str) -> String {
        self.agent_ns
            .get(agent)
            .map(|n| n.clone())
            .or_else(|| self.cfg.namespace.clone())
            .unwrap_or_else(|| "default".into())
    }
}

/// A pod still present this long after its delete is deleted again.
const REDELETE_AFTER: Duration = Duration::from_secs(30);

/// Longest pool key: agent ids (`{key}-{6 hex}-{n}`) must fit a 63-character label value.
pub const MAX_POOL_KEY: usize = 40;

/// Short hash of a pool's pod template (changes when the template does).
pub fn template_hash(ap: &AgentPool) -> String {
    let json = serde_json::to_vec(&ap.spec.template).unwrap_or_default();
    hex::encode(&Sha256::digest(&json)[..5])
}

/// Builds the pod for one agent of `ap`.
pub fn build_pod(ap: &AgentPool, req: &ProvisionRequest, hub_url: &str) -> Result<Pod, String> {
    let mut template = ap.spec.template.clone();
    let mut spec = template.spec.take().ok_or("the pod template has no spec")?;
    let idx = match &ap.spec.agent_container {
        Some(name) => spec
            .containers
            .iter()
            .position(|c| &c.name == name)
            .ok_or_else(|| format!("no container named {name:?} in the pod template"))?,
        None if spec.containers.is_empty() => {
            return Err("the pod template has no container".into());
        }
        None => 0,
    };
    let env = spec.containers[idx].env.get_or_insert_with(Vec::new);
    for (k, v) in [
        ("WARMPOOL_HUB", hub_url.to_string()),
        ("WARMPOOL_AGENT_ID", req.agent.clone()),
        ("WARMPOOL_TOKEN", req.token.clone()),
        ("WARMPOOL_POOL", req.pool.clone()),
        ("WARMPOOL_LABELS", req.spec.labels.join(",")),
    ] {
        env.retain(|e| e.name != k);
        env.push(EnvVar {
            name: k.into(),
            value: Some(v),
            value_from: None,
        });
    }
    // An agent pod runs once: recycling is warmpool's job, not the kubelet's.
    spec.restart_policy = Some("Never".into());
    let meta = template.metadata.unwrap_or_default();
    let mut labels: BTreeMap<String, String> = meta.labels.unwrap_or_default();
    labels.insert(LABEL_POOL.into(), ap.name_any());
    labels.insert(LABEL_AGENT.into(), req.agent.clone());
    labels.insert(LABEL_TEMPLATE_HASH.into(), template_hash(ap));
    labels.insert(LABEL_MANAGED_BY.into(), "warmpool".into());
    let mut annotations = meta.annotations.unwrap_or_default();
    annotations.insert(ANNOTATION_POOL_UID.into(), ap.uid().unwrap_or_default());
    annotations.insert(
        ANNOTATION_CREATED_AT.into(),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    );
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(req.agent.clone()),
            namespace: ap.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "warmpool.dev/v1alpha1".into(),
                kind: "AgentPool".into(),
                name: ap.name_any(),
                uid: ap.uid().unwrap_or_default(),
                controller: Some(true),
                // Not set: it would need update on agentpools/finalizers where the
                // OwnerReferencesPermissionEnforcement admission plugin runs.
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

impl Backend for KubeBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn provision(&self, req: ProvisionRequest, events: EventSink) {
        let failed = |error: String| {
            let _ = events.send(BackendEvent::Failed {
                pool: req.pool.clone(),
                agent: req.agent.clone(),
                error,
            });
        };
        let ns_display = self.cfg.namespace.clone().unwrap_or_else(|| "*".into());
        let Some(ap) = self.pools.get(&req.pool).map(|p| p.clone()) else {
            failed(format!("AgentPool {}/{} not found", ns_display, req.pool));
            return;
        };
        let pod = match build_pod(&ap, &req, &self.cfg.hub_url) {
            Ok(p) => p,
            Err(e) => {
                failed(format!("AgentPool {}/{}: {e}", ns_display, req.pool));
                return;
            }
        };
        let ns = ap.namespace().unwrap_or_default();
        self.agent_ns.insert(req.agent.clone(), ns.clone());
        let api = self.pods_in(&ns);
        tokio::spawn(async move {
            // Started is reported when the pod runs (pod watcher), not when it is created.
            let Err(e) = api.create(&PostParams::default(), &pod).await else {
                return;
            };
            let definite = matches!(&e, kube::Error::Api(s) if (400..500).contains(&s.code));
            match &e {
                // Our own earlier attempt got through: the pod is there.
                kube::Error::Api(s) if s.code == 409 => return,
                // 5xx, timeouts, cut connections: the pod may exist anyway. Read it back rather
                // than forget a pod that would then leak and be created twice.
                // A read-back could race the apiserver finishing the create, so the agent stays
                // Provisioning: the pod watch reports the pod when it runs, and the provisioning
                // timeout deletes it by name otherwise. A pod that may exist is never forgotten.
                _ if !definite => return,
                _ => {}
            }
            let _ = events.send(BackendEvent::Failed {
                pool: req.pool,
                error: format!("creating pod {ns}/{}: {e}", req.agent),
                agent: req.agent,
            });
        });
    }

    fn terminate(&self, agent: &str, events: EventSink) {
        let ns = self.namespace_of_agent(agent);
        let api = self.pods_in(&ns);
        let agent = agent.to_string();
        tokio::spawn(async move {
            match api.delete(&agent, &DeleteParams::default()).await {
                // Exited is reported when the watch sees the pod gone.
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    let _ = events.send(BackendEvent::Exited {
                        agent,
                        detail: "pod already gone".into(),
                    });
                }
                Err(e) => {
                    tracing::warn!(pod = %agent, namespace = %ns, error = %e, "deleting pod failed")
                }
            }
        });
    }

    fn shutdown(&self) -> BoxFuture<'_> {
        Box::pin(async {})
    }

    fn keeps_agents_on_shutdown(&self) -> bool {
        true
    }

    fn record(&self, pool: &str, event: PoolEvent) {
        let Some(reference) = self.pools.get(pool).map(|ap| ap.object_ref(&())) else {
            return;
        };
        let (reason, action, note) = match event {
            PoolEvent::Leak { agent } => (
                "AgentLeaked",
                "DeletePod",
                format!("pod {agent} did not register within connectTimeout; deleted"),
            ),
            PoolEvent::ProvisionFailed { agent, error } => (
                "ProvisioningFailed",
                "CreatePod",
                format!("pod {agent}: {error}"),
            ),
            PoolEvent::Throttled => (
                "Throttled",
                "CreatePod",
                "the provisioning rate limit is holding pod creation back".to_string(),
            ),
        };
        let key = (pool.to_string(), reason);
        let now = std::time::Instant::now();
        if self
            .recorded
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < EVENT_WINDOW)
        {
            return;
        }
        self.recorded.insert(key, now);
        let recorder = self.recorder.clone();
        let ev = KubeEvent {
            type_: if reason == "Throttled" {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::warn!(error = %e, "publishing an AgentPool event failed");
            }
        });
    }
}

/// Adopts what a previous instance left: with provisioning paused, loads the valid
/// `AgentPool`s and takes over their live pods from the labels, so pool counts (and `maxTotal`)
/// are rebuilt from the cluster before anything new is created. Their agents reconnect and
/// report the leases they still serve. Returns how many pods were adopted.
/// The caller holds provisioning paused until this succeeds.
pub async fn adopt(svc: &Service, backend: &KubeBackend) -> Result<usize, kube::Error> {
    let pools: Api<AgentPool> = backend.scope();
    for ap in pools.list(&Default::default()).await?.items {
        let key = backend.key_of(&ap);
        let problems = ap.spec.problems();
        if problems.is_empty() && key.len() <= MAX_POOL_KEY {
            backend.pools.insert(key.clone(), ap.clone());
            svc.upsert_pool(&key, ap.spec.pool.clone());
        } else {
            // Its pods are left alone; the watcher reports the problems.
            backend.invalid.insert(key, (ap.clone(), problems));
        }
    }
    let lp = kube::api::ListParams::default().labels(&format!("{LABEL_MANAGED_BY}=warmpool"));
    let mut adopted = 0;
    let pods: Api<Pod> = backend.scope();
    for pod in pods.list(&lp).await?.items {
        let (Some(agent), Some(pool)) = (agent_of(&pod), backend.key_of_pod(&pod)) else {
            continue;
        };
        backend
            .agent_ns
            .insert(agent.clone(), pod.namespace().unwrap_or_default());
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Failed" || phase == "Succeeded" {
            continue;
        }
        if svc.read(|e| e.agent(&agent).is_some()) {
            continue;
        }
        let state = if pod.metadata.deletion_timestamp.is_some() {
            // Still counts toward maxTotal until it is gone.
            crate::engine::AgentState::Terminating
        } else if phase == "Running" {
            crate::engine::AgentState::Connecting
        } else {
            crate::engine::AgentState::Provisioning
        };
        let age = pod
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| {
                std::time::Duration::try_from(
                    k8s_openapi::jiff::Timestamp::now().duration_since(t.0),
                )
                .ok()
            })
            .unwrap_or_default();
        if svc.apply(|e, now| e.adopt(&agent, &pool, state, age, now)) {
            adopted += 1;
        }
    }
    tracing::info!(adopted, "adopted existing agent pods");
    Ok(adopted)
}

/// Runs the `AgentPool` and pod watchers and the status writer until `stop` fires, after
/// adopting what a previous instance left.
pub async fn run(svc: Arc<Service>, backend: Arc<KubeBackend>, stop: CancellationToken) {
    svc.set_ready(false);
    svc.apply(|e, now| e.set_paused(true, now));
    loop {
        match adopt(&svc, &backend).await {
            Ok(_) => {
                svc.apply(|e, now| e.set_paused(false, now));
                svc.set_ready(true);
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "adopting existing pods failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = watch_pools(svc.clone(), backend.clone()) => {}
        _ = watch_pods(svc.clone(), backend.clone()) => {}
        _ = write_statuses(svc, backend) => {}
    }
}

/// `AgentPool`s become pools. An invalid spec is reported (Degraded) and not applied.
async fn watch_pools(svc: Arc<Service>, backend: Arc<KubeBackend>) {
    let api: Api<AgentPool> = backend.scope();
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Apply(ap)) | Ok(Event::InitApply(ap)) => {
                let name = backend.key_of(&ap);
                seen.insert(name.clone());
                if ap.metadata.deletion_timestamp.is_some() {
                    // Being deleted (foreground deletion): as good as gone.
                    backend.forget(&name);
                    svc.remove_pool(&name);
                    continue;
                }
                let mut problems = ap.spec.problems();
                if name.len() > MAX_POOL_KEY {
                    problems.push(format!(
                        "metadata.name: pool {name:?} is longer than {MAX_POOL_KEY} characters (agent ids derive from it and must fit in a label value)"
                    ));
                }
                if problems.is_empty() {
                    backend.invalid.remove(&name);
                    let old_hash = backend.pools.get(&name).map(|p| template_hash(&p));
                    backend.pools.insert(name.clone(), ap.clone());
                    svc.upsert_pool(&name, ap.spec.pool.clone());
                    if old_hash.is_some_and(|h| h != template_hash(&ap)) {
                        retire_outdated(&svc, &backend, &ap).await;
                    }
                } else {
                    // Reported as Degraded/InvalidSpec; the last valid spec (if any) stays.
                    tracing::warn!(pool = %name, problems = ?problems, "invalid AgentPool spec; not applied");
                    backend.invalid.insert(name.clone(), (ap.clone(), problems));
                }
            }
            Ok(Event::Delete(ap)) => {
                let name = backend.key_of(&ap);
                backend.forget(&name);
                svc.remove_pool(&name);
            }
            Ok(Event::Init) => seen.clear(),
            Ok(Event::InitDone) => {
                // Level-triggered repair: pools deleted while the watch was down.
                let gone: Vec<String> = backend
                    .pools
                    .iter()
                    .map(|p| p.key().clone())
                    .filter(|n| !seen.contains(n))
                    .collect();
                for name in gone {
                    backend.forget(&name);
                    svc.remove_pool(&name);
                }
                // Invalid pools deleted while the watch was down, too.
                backend.invalid.retain(|k, _| seen.contains(k));
            }
            Err(e) => tracing::warn!(error = %e, "AgentPool watch error; retrying"),
        }
    }
}

/// Marks the pool's pods built from an older template for replacement.
async fn retire_outdated(svc: &Service, backend: &KubeBackend, ap: &AgentPool) {
    let hash = template_hash(ap);
    let lp = kube::api::ListParams::default().labels(&format!("{LABEL_POOL}={}", ap.name_any()));
    let ns = ap.namespace().unwrap_or_default();
    match backend.pods_in(&ns).list(&lp).await {
        Ok(pods) => {
            for pod in pods.items {
                if pod.labels().get(LABEL_TEMPLATE_HASH) != Some(&hash)
                    && let Some(agent) = agent_of(&pod)
                {
                    svc.apply(|e, now| e.retire(&agent, now));
                }
            }
        }
        // The pod watch repairs this: every pod event checks its template hash.
        Err(e) => tracing::warn!(pool = %ap.name_any(), error = %e, "listing pods to roll failed"),
    }
}

/// Why a Pending pod cannot start: unschedulable or scheduling-gated (None otherwise).
pub fn unschedulable(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Pending") {
        return None;
    }
    if let Some(gates) = pod.spec.as_ref().and_then(|s| s.scheduling_gates.as_ref())
        && !gates.is_empty()
    {
        let names: Vec<&str> = gates.iter().map(|g| g.name.as_str()).collect();
        return Some(format!("scheduling-gated ({})", names.join(", ")));
    }
    status.conditions.as_ref()?.iter().find_map(|c| {
        (c.type_ == "PodScheduled"
            && c.status == "False"
            && matches!(
                c.reason.as_deref(),
                Some("Unschedulable" | "SchedulingGated")
            ))
        .then(|| c.message.clone().unwrap_or_else(|| "unschedulable".into()))
    })
}

fn agent_of(pod: &Pod) -> Option<String> {
    pod.labels().get(LABEL_AGENT).cloned()
}

/// Pod phases become agent events; pods the engine does not know are deleted.
async fn watch_pods(svc: Arc<Service>, backend: Arc<KubeBackend>) {
    let cfg = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}=warmpool"));
    let pods: Api<Pod> = backend.scope();
    let mut stream = watcher::watcher(pods, cfg).default_backoff().boxed();
    let events = svc.backend_sink();
    // Pods seen in the current (re)list: a Delete lost while the watch was down is repaired
    // at InitDone.
    let mut listed: HashSet<String> = HashSet::new();
    while let Some(ev) = stream.next().await {
        if let Ok(Event::InitApply(pod)) = &ev
            && let Some(agent) = agent_of(pod)
        {
            listed.insert(agent);
        }
        match ev {
            Ok(Event::Apply(pod)) | Ok(Event::InitApply(pod)) => {
                let Some(agent) = agent_of(&pod) else {
                    continue;
                };
                backend
                    .agent_ns
                    .insert(agent.clone(), pod.namespace().unwrap_or_default());
                let known = svc.read(|e| e.agent(&agent).is_some());
                if !known {
                    // Only a pod whose AgentPool is gone is garbage. A pod of an existing pool
                    // (valid or not) that this instance does not know is left alone.
                    let key = backend.key_of_pod(&pod);
                    let pool_exists = key.as_ref().is_some_and(|k| {
                        backend.pools.contains_key(k) || backend.invalid.contains_key(k)
                    });
                    if !pool_exists && pod.metadata.deletion_timestamp.is_none() {
                        tracing::warn!(pod = %agent, "pod of a deleted AgentPool; deleting it");
                        backend.terminate(&agent, events.clone());
                    }
                    continue;
                }
                let pool_key = backend.key_of_pod(&pod);
                let current = pool_key
                    .as_ref()
                    .and_then(|p| backend.pools.get(p))
                    .map(|ap| template_hash(&ap));
                if current.is_some() && pod.labels().get(LABEL_TEMPLATE_HASH) != current.as_ref() {
                    svc.apply(|e, now| e.retire(&agent, now));
                }
                match (unschedulable(&pod), pool_key.as_ref()) {
                    (Some(why), Some(pool)) => {
                        tracing::warn!(pod = %agent, why = %why, "pod cannot be scheduled; keeping it");
                        backend.pending.insert(agent.clone(), (pool.clone(), why));
                        svc.apply(|e, now| e.hold_pending(&agent, now));
                    }
                    _ => {
                        backend.pending.remove(&agent);
                    }
                }
                let phase = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_default();
                match phase.as_str() {
                    "Running" if pod.metadata.deletion_timestamp.is_none() => {
                        let _ = events.send(BackendEvent::Started { agent });
                    }
                    "Failed" | "Succeeded" | "Unknown" => {
                        let _ = events.send(BackendEvent::Exited {
                            agent: agent.clone(),
                            detail: format!("pod {phase}"),
                        });
                        backend.terminate(&agent, events.clone());
                    }
                    _ => {}
                }
            }
            Ok(Event::Delete(pod)) => {
                if let Some(agent) = agent_of(&pod) {
                    backend.pending.remove(&agent);
                    backend.agent_ns.remove(&agent);
                    let _ = events.send(BackendEvent::Exited {
                        agent,
                        detail: "pod deleted".into(),
                    });
                }
            }
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitDone) => {
                let gone: Vec<String> = svc.read(|e| {
                    e.agents()
                        .filter(|a| a.state == crate::engine::AgentState::Terminating)
                        .filter(|a| !listed.contains(&a.id))
                        .map(|a| a.id.clone())
                        .collect()
                });
                for agent in gone {
                    let _ = events.send(BackendEvent::Exited {
                        agent,
                        detail: "pod gone (seen on relist)".into(),
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "pod watch error; retrying"),
        }
    }
}

/// Writes each pool's status when it changed: counts by state, observedGeneration, conditions.
async fn write_statuses(svc: Arc<Service>, backend: Arc<KubeBackend>) {
    let api_for = |ap: &AgentPool| -> Api<AgentPool> {
        Api::namespaced(backend.client.clone(), &ap.namespace().unwrap_or_default())
    };
    let mut last: BTreeMap<String, AgentPoolStatus> = BTreeMap::new();
    let mut iv = tokio::time::interval(backend.cfg.status_interval);
    let mut redeleted: HashMap<String, std::time::Instant> = HashMap::new();
    loop {
        iv.tick().await;
        // Level-triggered: a pod still there long after its delete (a failed DELETE, a lost
        // event) is deleted again; a 404 reports it gone.
        let stuck: Vec<String> = svc.read(|e| {
            let now = std::time::Instant::now();
            e.agents()
                .filter(|a| a.state == crate::engine::AgentState::Terminating)
                .filter(|a| now.duration_since(a.since) > REDELETE_AFTER)
                .map(|a| a.id.clone())
                .collect()
        });
        redeleted.retain(|a, _| stuck.contains(a));
        for agent in stuck {
            let due = redeleted
                .get(&agent)
                .is_none_or(|t| t.elapsed() > REDELETE_AFTER);
            if due {
                redeleted.insert(agent.clone(), std::time::Instant::now());
                backend.terminate(&agent, svc.backend_sink());
            }
        }
        // Level-triggered: pods still unschedulable keep their provisioning deadline held.
        let pending: Vec<(String, String, String)> = backend
            .pending
            .iter()
            .map(|e| (e.key().clone(), e.value().0.clone(), e.value().1.clone()))
            .collect();
        for (agent, _, _) in &pending {
            let known = svc.read(|e| e.agent(agent).is_some());
            if known {
                svc.apply(|e, now| e.hold_pending(agent, now));
            } else {
                backend.pending.remove(agent);
            }
        }
        // Pools whose spec was never valid: only the Degraded condition to report.
        let invalid: Vec<(String, AgentPool, Vec<String>)> = backend
            .invalid
            .iter()
            .map(|e| (e.key().clone(), e.value().0.clone(), e.value().1.clone()))
            .collect();
        let engine_pools = svc.pools();
        for (name, ap, problems) in &invalid {
            let generation = &ap.metadata.generation;
            if engine_pools.iter().any(|p| &p.name == name) {
                continue;
            }
            let status = AgentPoolStatus {
                observed_generation: None,
                conditions: vec![Condition {
                    type_: "Degraded".into(),
                    status: "True".into(),
                    reason: "InvalidSpec".into(),
                    message: problems.join("; "),
                    last_transition_time: None,
                    observed_generation: *generation,
                }],
                ..Default::default()
            };
            let cache_key = format!("{name}/{}", ap.uid().unwrap_or_default());
            if last.get(&cache_key) != Some(&status) {
                let patch = Patch::Merge(serde_json::json!({ "status": status }));
                match api_for(ap)
                    .patch_status(&ap.name_any(), &PatchParams::default(), &patch)
                    .await
                {
                    Ok(_) => {
                        last.insert(cache_key, status);
                    }
                    Err(e) => {
                        tracing::warn!(pool = %name, error = %e, "writing AgentPool status failed")
                    }
                }
            }
        }
        for p in engine_pools {
            let Some(ap) = backend.pools.get(&p.name).map(|a| a.clone()) else {
                continue;
            };
            let invalid_spec = backend.invalid.get(&p.name).map(|e| e.value().1.join("; "));
            let stuck: Vec<String> = pending
                .iter()
                .filter(|(_, pool, _)| pool == &p.name)
                .map(|(agent, _, why)| format!("{agent}: {why}"))
                .collect();
            let ready = p.idle >= p.min_idle;
            let cond = |type_: &str, on: bool, reason: &str, message: String| Condition {
                type_: type_.into(),
                status: if on { "True" } else { "False" }.into(),
                reason: reason.into(),
                message,
                last_transition_time: None,
                observed_generation: ap.metadata.generation,
            };
            let status = AgentPoolStatus {
                provisioning: p.provisioning,
                connecting: p.connecting,
                idle: p.idle,
                leased: p.leased + p.cleaning,
                terminating: p.terminating,
                observed_generation: ap.metadata.generation,
                conditions: vec![
                    cond(
                        "Ready",
                        ready,
                        if ready {
                            "MinIdleReached"
                        } else {
                            "BelowMinIdle"
                        },
                        format!("{} of {} idle agents", p.idle, p.min_idle),
                    ),
                    cond(
                        "Throttled",
                        p.throttled,
                        if p.throttled {
                            "RateLimited"
                        } else {
                            "NotThrottled"
                        },
                        format!("{} provisioning passes held back", p.throttled_total),
                    ),
                    match &invalid_spec {
                        Some(problems) => cond(
                            "Degraded",
                            true,
                            "InvalidSpec",
                            format!("latest spec not applied: {problems}"),
                        ),
                        None if !stuck.is_empty() => cond(
                            "Degraded",
                            true,
                            "Unschedulable",
                            format!("pods pending, not deleted: {}", stuck.join("; ")),
                        ),
                        None => cond(
                            "Degraded",
                            p.last_error.is_some(),
                            if p.last_error.is_some() {
                                "AgentsFailing"
                            } else {
                                "Healthy"
                            },
                            // Never empty: a 1.20 apiserver turns "" into null and rejects it.
                            p.last_error
                                .clone()
                                .unwrap_or_else(|| "no provisioning errors".into()),
                        ),
                    },
                ],
                leaks_total: p.leaks_total,
            };
            let cache_key = format!("{}/{}", p.name, ap.uid().unwrap_or_default());
            if last.get(&cache_key) == Some(&status) {
                continue;
            }
            let patch = Patch::Merge(serde_json::json!({ "status": status }));
            match api_for(&ap)
                .patch_status(&ap.name_any(), &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => {
                    last.insert(cache_key, status);
                }
                Err(e) => {
                    tracing::warn!(pool = %p.name, error = %e, "writing AgentPool status failed")
                }
            }
        }
    }
}
