//! The `kubernetes` backend: every agent is a pod built from its `AgentPool`'s template.
//!
//! Owns pod construction (env `WARMPOOL_HUB`, `WARMPOOL_AGENT_ID`, `WARMPOOL_TOKEN` injected into
//! the agent container; labels and annotations from which pool state can be rebuilt; an owner
//! reference to the `AgentPool`), pod creation and deletion, and the pod watcher: pod phases
//! become agent events (Running -> started, gone/Failed/Succeeded -> exited). Which template
//! each pool's pods are built from is set by the AgentPool controller (`k8s/agentpool/`), which
//! owns AgentPools, their routing, finalizer and status.
//!
//! What `maxTotal` caps (the ResourceQuota rule): every pod whose containers may still run, that
//! is every pod of the pool in a non-terminal phase (Pending, Running, Unknown), being deleted or
//! not, plus pods asked for and not yet seen. A pod counts until it is Succeeded, Failed or gone;
//! so an agent is reported exited only then.
//!
//! Layout: this file builds pods and implements [`Backend`]; `watch.rs` watches pods;
//! `repair.rs` re-issues deletes that did not take and holds unschedulable pods' deadlines;
//! `events.rs` publishes Events on AgentPools, every occurrence counted in a series;
//! `dry_run.rs` asks the apiserver (a server-side dry run) whether a pod built from a template
//! would be accepted.
//!
//! It never calls the engine: what it learns about agents goes out as [`BackendEvent`]s, and what
//! it must know of them (known? being terminated?) or report (an outdated template, a pod that
//! cannot be scheduled) goes through [`AgentView`], which the AgentPool controller implements.
//! It does not decide sizing: the engine does, and this backend executes. Pods are never patched
//! on the lease path. On shutdown pods are left running (`keeps_agents_on_shutdown`).

mod dry_run;
pub mod events;
mod repair;
mod watch;

pub use events::{Occurrence, event_note};
pub use repair::repair;
pub use watch::watch_pods;

use std::collections::BTreeMap;
use std::time::Duration;

use dashmap::DashMap;
use k8s_openapi::api::core::v1::{EnvVar, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Client, Resource, ResourceExt};
use sha2::{Digest, Sha256};

use super::{Backend, BackendEvent, BoxFuture, EventSink, PoolEvent, ProvisionRequest};
use crate::k8s::crd::AgentPool;

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

/// What the pod watcher and the repairs ask of, and report to, the owner of the agents (the
/// AgentPool controller, which holds the engine): the backend never calls the engine itself.
pub trait AgentView: Send + Sync + 'static {
    /// True when this instance has agent `agent`.
    fn knows(&self, agent: &str) -> bool;
    /// The agents being terminated, each with how long it has been.
    fn terminating(&self) -> Vec<(String, Duration)>;
    /// True when agent `agent` is being terminated (told to exit, or its pod deleted).
    fn is_terminating(&self, agent: &str) -> bool {
        self.terminating().iter().any(|(a, _)| a == agent)
    }
    /// Agent `agent`'s pod was built from an outdated template: it is to be replaced.
    fn retire(&self, agent: &str);
    /// Agent `agent`'s pod cannot be scheduled (kept, not recreated): its provisioning
    /// deadline is held.
    fn hold_pending(&self, agent: &str);
    /// Where agent events go.
    fn events(&self) -> EventSink;
}

/// Why a pod cannot be built from an AgentPool's template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The template has no pod spec.
    #[error("AgentPool {namespace}/{pool}: the pod template has no spec")]
    NoPodSpec {
        /// Namespace.
        namespace: String,
        /// AgentPool name.
        pool: String,
    },
    /// The template has no container.
    #[error("AgentPool {namespace}/{pool}: the pod template has no container")]
    NoContainer {
        /// Namespace.
        namespace: String,
        /// AgentPool name.
        pool: String,
    },
    /// `agentContainer` names no container of the template.
    #[error("AgentPool {namespace}/{pool}: no container named {container:?} in the pod template")]
    NoSuchContainer {
        /// Namespace.
        namespace: String,
        /// AgentPool name.
        pool: String,
        /// The `agentContainer`.
        container: String,
    },
}

/// Results of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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
    /// The AgentPool each pool's pods are built from: the last valid version, set by the
    /// AgentPool controller when it applies a spec (by key).
    pools: DashMap<String, AgentPool>,
    /// Pods that cannot be scheduled (agent -> (pool, why)): kept and reported, not recreated.
    pending: DashMap<String, (String, String)>,
    /// Publishes Events on AgentPools, folding repeats into series.
    events: events::Events,
    /// What the apiserver said of a pod built from each pool's template (by key): the
    /// AgentPool's uid, the template hash, and why it refuses it (None: accepted).
    verdicts: DashMap<String, (String, String, Option<String>)>,
    /// Namespace of every agent pod this instance knows.
    agent_ns: DashMap<String, String>,
}

impl KubeBackend {
    /// A backend for one namespace.
    pub fn new(client: Client, cfg: KubeConfig) -> KubeBackend {
        KubeBackend {
            client: client.clone(),
            cfg,
            pools: DashMap::new(),
            pending: DashMap::new(),
            events: events::Events::new(client.clone()),
            verdicts: DashMap::new(),
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

    /// The engine's key for `ap`.
    pub fn key_of(&self, ap: &AgentPool) -> String {
        self.pool_key(&ap.namespace().unwrap_or_default(), &ap.name_any())
    }

    /// The engine's key for the pool of an agent pod.
    pub fn key_of_pod(&self, pod: &Pod) -> Option<String> {
        let name = pod.labels().get(LABEL_POOL)?;
        Some(self.pool_key(&pod.namespace().unwrap_or_default(), name))
    }

    fn pods_in(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The namespace served (None: all).
    pub fn namespace(&self) -> Option<&str> {
        self.cfg.namespace.as_deref()
    }

    /// How often pool statuses are written.
    pub fn status_interval(&self) -> Duration {
        self.cfg.status_interval
    }

    /// `K` in the namespace served, or in all.
    pub fn scope<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match &self.cfg.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Builds the pods of pool `key` from `ap` from now on (a valid spec the engine runs);
    /// returns the template hash of the AgentPool it replaces.
    pub fn apply_pool(&self, key: &str, ap: AgentPool) -> Option<String> {
        self.pools
            .insert(key.to_string(), ap)
            .map(|old| template_hash(&old))
    }

    /// The generation of the AgentPool pool `key`'s pods are built from.
    pub fn applied_generation(&self, key: &str) -> Option<i64> {
        self.pools.get(key).and_then(|ap| ap.metadata.generation)
    }

    /// Forgets a pool that is gone (or that the engine no longer runs); true when it had one.
    pub fn forget(&self, key: &str) -> bool {
        self.pools.remove(key).is_some()
    }

    /// Forgets the Event series and template verdicts of every pool `live` does not hold.
    pub fn forget_all_but(&self, live: &std::collections::HashSet<String>) {
        self.events.forget_all_but(live);
        self.verdicts.retain(|k, _| live.contains(k));
    }

    /// Remembers the namespace of an agent's pod (for deleting it).
    pub fn note_namespace(&self, agent: &str, namespace: &str) {
        self.agent_ns
            .insert(agent.to_string(), namespace.to_string());
    }

    /// The pods of pool `key` kept Pending because they cannot be scheduled: `pod: why`.
    pub fn unschedulable(&self, key: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .pending
            .iter()
            .filter(|e| e.value().0 == key)
            .map(|e| format!("{}: {}", e.key(), e.value().1))
            .collect();
        v.sort();
        v
    }

    fn namespace_of_agent(&self, agent: &str) -> String {
        self.agent_ns
            .get(agent)
            .map(|n| n.clone())
            .or_else(|| self.cfg.namespace.clone())
            .unwrap_or_else(|| "default".into())
    }
}

/// Deletes an agent's pod. Its `Exited` is reported when the watch sees the pod gone, or here
/// when it is gone already.
async fn delete_pod(api: &Api<Pod>, agent: String, ns: &str, events: &EventSink) {
    match api.delete(&agent, &DeleteParams::default()).await {
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
}

/// How long a pod whose agent was told to exit gets to end by itself before it is deleted.
pub const EXIT_GRACE: Duration = Duration::from_secs(10);

/// A pod still present this long after its delete is deleted again.
const REDELETE_AFTER: Duration = Duration::from_secs(30);

/// Longest pool key: agent ids (`{key}-{6 hex}-{n}`) must fit a 63-character label value.
pub const MAX_POOL_KEY: usize = 40;

/// Short hash of a pool's pod template (changes when the template does).
pub fn template_hash(ap: &AgentPool) -> String {
    let json = serde_json::to_vec(&ap.spec.template).unwrap_or_default();
    hex::encode(&Sha256::digest(&json)[..5])
}

/// Builds the pod for one agent of `ap`. The variables the template sets on the agent container
/// with `env` are the pool's configured variables: the agent passes them on to its jobs
/// (named in `WARMPOOL_JOB_ENV`).
pub fn build_pod(ap: &AgentPool, req: &ProvisionRequest, hub_url: &str) -> Result<Pod> {
    pod_from_template(
        ap,
        &req.agent,
        None,
        [
            (crate::agent::exec::JOB_ENV, configured_env(ap).join(",")),
            ("WARMPOOL_HUB", hub_url.to_string()),
            ("WARMPOOL_AGENT_ID", req.agent.clone()),
            ("WARMPOOL_TOKEN", req.token.clone()),
            ("WARMPOOL_POOL", req.pool.clone()),
            ("WARMPOOL_LABELS", req.spec.labels.join(",")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        [
            (LABEL_AGENT, req.agent.clone()),
            (LABEL_TEMPLATE_HASH, template_hash(ap)),
            (LABEL_MANAGED_BY, "warmpool".into()),
        ],
        [(
            ANNOTATION_CREATED_AT,
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        )],
    )
}

/// The names of the variables `ap`'s template sets on its agent container with `env` (not
/// warmpool's own `WARMPOOL_*`).
fn configured_env(ap: &AgentPool) -> Vec<String> {
    let Some(spec) = ap.spec.template.spec.as_ref() else {
        return Vec::new();
    };
    let container = match &ap.spec.agent_container {
        Some(name) => spec.containers.iter().find(|c| &c.name == name),
        None => spec.containers.first(),
    };
    container
        .and_then(|c| c.env.as_ref())
        .map(|env| {
            env.iter()
                .map(|e| e.name.clone())
                .filter(|n| !n.starts_with("WARMPOOL_"))
                .collect()
        })
        .unwrap_or_default()
}

/// A pod named `name` from `ap`'s template: `env` set (and `command`, when given) on the agent
/// container, restart policy Never, the template's labels and annotations plus the pool's and
/// `labels`/`annotations`, owned by `ap`. Shared by warmpool agents and Jenkins agents.
pub fn pod_from_template<const L: usize, const A: usize>(
    ap: &AgentPool,
    name: &str,
    command: Option<&[String]>,
    env: Vec<(String, String)>,
    labels: [(&str, String); L],
    annotations: [(&str, String); A],
) -> Result<Pod> {
    let (namespace, pool) = (ap.namespace().unwrap_or_default(), ap.name_any());
    let mut template = ap.spec.template.clone();
    let Some(mut spec) = template.spec.take() else {
        return Err(Error::NoPodSpec { namespace, pool });
    };
    let idx = match &ap.spec.agent_container {
        Some(name) => match spec.containers.iter().position(|c| &c.name == name) {
            Some(i) => i,
            None => {
                return Err(Error::NoSuchContainer {
                    namespace,
                    pool,
                    container: name.clone(),
                });
            }
        },
        None if spec.containers.is_empty() => {
            return Err(Error::NoContainer { namespace, pool });
        }
        None => 0,
    };
    let container = &mut spec.containers[idx];
    if let Some(cmd) = command {
        container.command = Some(cmd.to_vec());
        container.args = None;
    }
    let container_env = container.env.get_or_insert_with(Vec::new);
    for (k, v) in env {
        container_env.retain(|e| e.name != k);
        container_env.push(EnvVar {
            name: k,
            value: Some(v),
            value_from: None,
        });
    }
    // An agent pod runs once: recycling is warmpool's job, not the kubelet's.
    spec.restart_policy = Some("Never".into());
    let meta = template.metadata.unwrap_or_default();
    let mut all_labels: BTreeMap<String, String> = meta.labels.unwrap_or_default();
    all_labels.insert(LABEL_POOL.into(), ap.name_any());
    all_labels.extend(labels.map(|(k, v)| (k.to_string(), v)));
    let mut all_annotations = meta.annotations.unwrap_or_default();
    all_annotations.insert(ANNOTATION_POOL_UID.into(), ap.uid().unwrap_or_default());
    all_annotations.extend(annotations.map(|(k, v)| (k.to_string(), v)));
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: ap.namespace(),
            labels: Some(all_labels),
            annotations: Some(all_annotations),
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
                failed(e.to_string());
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
        tokio::spawn(async move { delete_pod(&api, agent, &ns, &events).await });
    }

    /// The agent was told to exit: its container ends and, with `restartPolicy: Never`, the
    /// pod reaches `Succeeded` (the watch then reports it and deletes the object), which ends
    /// its count toward maxTotal at once. Deleting it first would not: a kubelet (v1.20, and
    /// any before terminal phases for deleted pods) writes no terminal phase for a pod being
    /// deleted, so it counts until its object is gone, seconds later. A pod still running
    /// after [`EXIT_GRACE`] (a sidecar, an agent that did not exit) is deleted.
    fn retire(&self, agent: &str, events: EventSink) {
        let ns = self.namespace_of_agent(agent);
        let api = self.pods_in(&ns);
        let agent = agent.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(EXIT_GRACE).await;
            let ended = match api.get_opt(&agent).await {
                Ok(None) => true,
                Ok(Some(p)) => {
                    p.metadata.deletion_timestamp.is_some()
                        || p.status
                            .as_ref()
                            .and_then(|s| s.phase.as_deref())
                            .is_some_and(|ph| ph == "Succeeded" || ph == "Failed")
                }
                Err(e) => {
                    tracing::warn!(pod = %agent, namespace = %ns, error = %e, "reading a retired pod failed; deleting it");
                    false
                }
            };
            if ended {
                return;
            }
            tracing::info!(pod = %agent, namespace = %ns, grace_s = EXIT_GRACE.as_secs(), "agent pod still running after it was told to exit; deleting it");
            delete_pod(&api, agent, &ns, &events).await;
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
        // Notes name the pod of the first occurrence; the fold key leaves the pod out, so
        // repeats join one series (its count says how many).
        let fold = |text: &str, agent: &str| Some(text.replace(agent, "<pod>"));
        let occ = match event {
            PoolEvent::Leak { agent } => Occurrence {
                type_: EventType::Warning,
                reason: "AgentLeaked",
                action: "DeletePod",
                note: format!(
                    "pod {agent} did not register within connectTimeout; deleted (the series counts every leak)"
                ),
                fold: Some(String::new()),
            },
            PoolEvent::ProvisionFailed { agent, error } => Occurrence {
                type_: EventType::Warning,
                reason: "ProvisioningFailed",
                action: "CreatePod",
                fold: fold(&error, &agent),
                note: format!("pod {agent}: {error}"),
            },
            PoolEvent::PodFailed { agent, detail } => Occurrence {
                type_: EventType::Warning,
                reason: "PodFailed",
                action: "DeletePod",
                fold: fold(&detail, &agent),
                note: format!("pod {agent} ended by itself: {detail}; deleted"),
            },
            PoolEvent::Throttled => Occurrence {
                type_: EventType::Normal,
                reason: "Throttled",
                action: "CreatePod",
                note: "the provisioning rate limit is holding pod creation back".into(),
                fold: None,
            },
            PoolEvent::HookFailed {
                agent,
                reason,
                detail,
            } => Occurrence {
                type_: EventType::Warning,
                reason: if reason == "cleanup-failed" {
                    "CleanupHookFailed"
                } else {
                    "HealthCheckFailed"
                },
                action: "DeletePod",
                fold: fold(&detail, &agent),
                // An Event's note holds at most 1 KiB: the start (which hook, how it ended)
                // and the end of the excerpt are kept.
                note: format!("pod {agent} recycled: {detail}"),
            },
        };
        self.publish(pool, reference, occ);
    }
}

impl KubeBackend {
    /// Publishes an Event on the AgentPool `reference` (pool `pool`): counted at once in its
    /// series, written by a background task (events.rs); returns at once.
    pub fn publish(
        &self,
        pool: &str,
        reference: k8s_openapi::api::core::v1::ObjectReference,
        occ: Occurrence,
    ) {
        self.events.publish(pool, reference, occ);
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

/// Waiting reasons of a container whose image cannot be had: the pod would wait forever.
pub const IMAGE_FAILURES: [&str; 4] = [
    "ErrImageNeverPull",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
];

/// Why a pod cannot start because of a container image (its container waits with one of
/// [`IMAGE_FAILURES`]): names the pod, the container, the image, the kubelet's reason and message.
pub fn image_failure(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let statuses = status.init_container_statuses.iter().flatten();
    statuses
        .chain(status.container_statuses.iter().flatten())
        .find_map(|c| {
            let w = c.state.as_ref()?.waiting.as_ref()?;
            let reason = w.reason.as_deref()?;
            IMAGE_FAILURES.contains(&reason).then(|| {
                let message = w.message.as_deref().unwrap_or("no message");
                format!(
                    "pod {}/{}: container {} cannot start: image {:?}: {reason}: {message}",
                    pod.namespace().unwrap_or_default(),
                    pod.name_any(),
                    c.name,
                    c.image
                )
            })
        })
}

/// How a finished pod ended: its phase, the pod's reason and message (eviction), and each
/// container that terminated with an error, its reason (`OOMKilled`, `Error`...) and exit code.
pub fn pod_exit(pod: &Pod) -> String {
    let Some(status) = pod.status.as_ref() else {
        return "pod gone".into();
    };
    let mut out = format!("pod {}", status.phase.as_deref().unwrap_or("Unknown"));
    if let Some(r) = &status.reason {
        out.push_str(&format!(" ({r}"));
        if let Some(m) = &status.message {
            out.push_str(&format!(": {m}"));
        }
        out.push(')');
    }
    let statuses = status.init_container_statuses.iter().flatten();
    for c in statuses.chain(status.container_statuses.iter().flatten()) {
        let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref()) else {
            continue;
        };
        if t.exit_code == 0 && status.phase.as_deref() == Some("Failed") {
            continue;
        }
        out.push_str(&format!(
            ", container {}: {}, exit code {}",
            c.name,
            t.reason.as_deref().unwrap_or("terminated"),
            t.exit_code
        ));
        if let Some(sig) = t.signal.filter(|s| *s != 0) {
            out.push_str(&format!(", signal {sig}"));
        }
        if let Some(m) = t.message.as_deref().filter(|m| !m.is_empty()) {
            out.push_str(&format!(" ({})", m.trim()));
        }
    }
    out
}

/// The agent id of a pod warmpool made.
pub fn agent_of(pod: &Pod) -> Option<String> {
    pod.labels().get(LABEL_AGENT).cloned()
}
