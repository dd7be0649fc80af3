//! The one AgentPool controller, on `kube::runtime`.
//!
//! Owns what an `AgentPool` means to warmpool: it routes each pool, in one place
//! ([`apply`]), to the engine (a warmpool pool, its pods made by the Kubernetes backend) or to
//! the Jenkins connector (a pool with a `jenkins` block); on a Jenkins pool it keeps the
//! finalizer [`FINALIZER`] so a deleted AgentPool's Jenkins nodes and agent pods are removed
//! before the AgentPool goes, even when warmpool was down when it was deleted ([`cleanup`])
//! (other pools need none: the garbage collector follows their pods' owner references); and it
//! writes every AgentPool's status (`status.rs`, conditions from the one
//! builder in `conditions.rs`). On start, or on becoming leader, it first adopts what a
//! previous instance left (`adopt.rs`).
//!
//! The AgentPools come from a `reflector` store fed by one watch. Reconciles are triggered by
//! spec changes only (`predicate_filter` on the generation, and on the finalizers so the
//! finalizer's own patch is seen): warmpool's status writes do not come back as work. Nothing
//! depends on every event arriving: each AgentPool is reconciled again every [`RESYNC`], a
//! failed reconcile is retried after [`RETRY`], and the status loop compares the store with the
//! engine and the connector on every pass (a pool gone from the store is removed).
//!
//! It must not create or delete agent pods itself except in [`cleanup`] (pods of a deleted
//! AgentPool that no engine agent owns): the backend does, on the engine's actions.
//!
//! Events it publishes on the AgentPool (through the backend, which folds repeats into series):
//! `InvalidSpec` once per generation it refuses (the spec's own rules, or the apiserver refusing
//! a pod built from the template in a server-side dry run, asked once per template), `Scaled`
//! when `minIdle` changes, `TemplateChanged` when a new template rolls the pool's agents; the
//! status loop publishes `Ready` and `NotReady` when the Ready condition flips.

mod adopt;
pub mod conditions;
mod status;

pub use adopt::adopt;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, Event as Finalizer};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Resource, ResourceExt};
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use kube::runtime::events::EventType;

use crate::backend::kubernetes::{
    AgentView, KubeBackend, LABEL_MANAGED_BY, LABEL_POOL, LABEL_TEMPLATE_HASH, MAX_POOL_KEY,
    Occurrence, template_hash,
};
use crate::jenkins::runner::Runner;
use crate::k8s::crd::AgentPool;
use crate::service::Service;

/// The finalizer warmpool keeps on every Jenkins AgentPool (a pool with a `jenkins` block).
pub const FINALIZER: &str = "warmpool.dev/cleanup";
/// Every AgentPool is reconciled again after this, whether or not an event came.
pub const RESYNC: Duration = Duration::from_secs(60);
/// A failed reconcile (or a cleanup still waiting) is retried after this.
pub const RETRY: Duration = Duration::from_secs(2);

/// Why a reconcile or a cleanup did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Jenkins pool's nodes cannot be purged without its credentials.
    #[error("pool {pool}: cannot purge its Jenkins nodes on {controller}: {source}")]
    Credentials {
        /// Pool key.
        pool: String,
        /// The controller's root URL.
        controller: String,
        /// Why there are none.
        source: crate::jenkins::CredentialsError,
    },
    /// The Jenkins client cannot be built (the CA file).
    #[error("pool {pool}: cannot purge its Jenkins nodes on {controller}: {message}")]
    Tls {
        /// Pool key.
        pool: String,
        /// The controller's root URL.
        controller: String,
        /// The TLS error.
        message: String,
    },
    /// Purging the Jenkins pool failed.
    #[error(transparent)]
    Purge(#[from] crate::jenkins::purge::Error),
    /// The pool's pods could not be listed.
    #[error("pool {pool}: listing its pods in namespace {namespace} failed: {source}")]
    ListPods {
        /// Pool key.
        pool: String,
        /// Namespace.
        namespace: String,
        /// The apiserver's answer.
        #[source]
        source: kube::Error,
    },
    /// A pod of the pool could not be deleted.
    #[error("pool {pool}: deleting pod {namespace}/{pod} failed: {source}")]
    DeletePod {
        /// Pool key.
        pool: String,
        /// Namespace.
        namespace: String,
        /// Pod.
        pod: String,
        /// The apiserver's answer.
        #[source]
        source: kube::Error,
    },
    /// Pods of a deleted pool are still there (being deleted, or serving a lease: leased agents
    /// go at release).
    #[error("pool {pool}: waiting for {} pods to go: {}", pods.len(), pods.join(", "))]
    PodsRemain {
        /// Pool key.
        pool: String,
        /// The pods.
        pods: Vec<String>,
    },
}

/// Results of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the controller.
#[derive(Debug, Clone, Default)]
pub struct ControllerConfig {
    /// `serve --ca-file`: trusted for Jenkins pools without their own `caFile` (purge).
    pub ca_file: Option<PathBuf>,
}

/// The controller's counters, in the service's registry.
#[derive(Clone)]
struct Counters {
    reconciles: IntCounterVec,
    status_writes: IntCounterVec,
}

impl Counters {
    fn new(registry: &prometheus::Registry) -> Counters {
        let make = |name: &str, help: &str| {
            let c = IntCounterVec::new(prometheus::Opts::new(name, help), &["pool"])
                .expect("valid metric");
            if let Err(e) = registry.register(Box::new(c.clone())) {
                tracing::warn!(metric = name, error = %e, "metric not registered");
            }
            c
        };
        Counters {
            reconciles: make(
                "warmpool_agentpool_reconciles_total",
                "AgentPool reconciles (spec changes, resyncs, retries; never status writes)",
            ),
            status_writes: make(
                "warmpool_agentpool_status_writes_total",
                "AgentPool status subresource writes",
            ),
        }
    }
}

/// Shared by the reconciler, the error policy and the status loop.
struct Ctx {
    svc: Arc<Service>,
    backend: Arc<KubeBackend>,
    store: Store<AgentPool>,
    client: kube::Client,
    runner: Arc<dyn Runner>,
    cfg: ControllerConfig,
    counters: Counters,
    /// Why the cleanup of a deleted pool has not finished (by key): (reason, message).
    cleanup: DashMap<String, (&'static str, String)>,
    /// The last generation told invalid (`InvalidSpec` Event), by key: (uid, generation).
    told_invalid: DashMap<String, (String, Option<i64>)>,
    /// The `minIdle` last applied, by key: (uid, minIdle), for `Scaled` Events.
    min_idle: DashMap<String, (String, u32)>,
}

/// Runs the controller until `stop` fires: adopts what a previous instance left (provisioning
/// paused meanwhile), then reconciles AgentPools, watches the agent pods (the backend), writes
/// statuses and repairs deletes.
pub async fn run(
    svc: Arc<Service>,
    backend: Arc<KubeBackend>,
    cfg: ControllerConfig,
    stop: CancellationToken,
) {
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
    let (store, writer) = reflector::store();
    let api: Api<AgentPool> = backend.scope();
    // Spec changes and finalizer changes only: a status write changes neither.
    let trigger = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation::<AgentPool>.combine(predicates::finalizers::<AgentPool>),
            Default::default(),
        );
    let client = backend.client().clone();
    let ctx = Arc::new(Ctx {
        runner: Arc::new(crate::jenkins::pods::KubeRunner::new(
            client.clone(),
            backend.namespace().map(str::to_string),
        )),
        counters: Counters::new(&svc.metrics.registry),
        svc: svc.clone(),
        backend: backend.clone(),
        store: store.clone(),
        client,
        cfg,
        cleanup: DashMap::new(),
        told_invalid: DashMap::new(),
        min_idle: DashMap::new(),
    });
    let controller = Controller::for_stream(trigger, store.clone())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "AgentPool controller");
            }
            std::future::ready(())
        });
    // The pod watch and the status loop judge pods and pools by the store: not before it
    // holds every AgentPool (a pod of a pool not yet seen is not an orphan).
    let rest = async {
        if store.wait_until_ready().await.is_err() {
            return;
        }
        let view: Arc<dyn AgentView> = Arc::new(EngineView(svc.clone()));
        tokio::join!(
            crate::backend::kubernetes::watch_pods(view.clone(), backend.clone(), store.clone()),
            crate::backend::kubernetes::repair(view, backend.clone()),
            status::write_statuses(ctx.clone()),
        );
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = controller => {}
        _ = rest => {}
    }
}

/// The engine as the backend's pod watcher and repairs see it.
struct EngineView(Arc<Service>);

impl AgentView for EngineView {
    fn knows(&self, agent: &str) -> bool {
        self.0.read(|e| e.agent(agent).is_some())
    }

    fn terminating(&self) -> Vec<(String, Duration)> {
        let now = std::time::Instant::now();
        self.0.read(|e| {
            e.agents()
                .filter(|a| a.state == crate::engine::AgentState::Terminating)
                .map(|a| (a.id.clone(), now.duration_since(a.since)))
                .collect()
        })
    }

    fn is_terminating(&self, agent: &str) -> bool {
        self.0.read(|e| {
            e.agent(agent)
                .is_some_and(|a| a.state == crate::engine::AgentState::Terminating)
        })
    }

    fn retire(&self, agent: &str) {
        self.0.apply(|e, now| e.retire(agent, now));
    }

    fn hold_pending(&self, agent: &str) {
        self.0.apply(|e, now| e.hold_pending(agent, now));
    }

    fn events(&self) -> crate::backend::EventSink {
        self.0.backend_sink()
    }
}

/// The pool key of `ap` and the span its work is logged in.
fn span_of(ctx: &Ctx, ap: &AgentPool) -> (String, tracing::Span) {
    let key = ctx.backend.key_of(ap);
    let span = tracing::info_span!("agentpool", pool = %key);
    (key, span)
}

async fn reconcile(ap: Arc<AgentPool>, ctx: Arc<Ctx>) -> Result<Action, finalizer::Error<Error>> {
    let (key, span) = span_of(&ctx, &ap);
    ctx.counters.reconciles.with_label_values(&[&key]).inc();
    let api: Api<AgentPool> =
        Api::namespaced(ctx.client.clone(), &ap.namespace().unwrap_or_default());
    let ours = ap.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = ap.metadata.deletion_timestamp.is_some();
    if ap.spec.pool.jenkins.is_some() || (ours && deleting) {
        // A Jenkins pool's nodes live outside the cluster: its finalizer lets warmpool delete
        // them before the AgentPool goes, even when warmpool was down at the time. (Also the
        // cleanup of any pool that carries the finalizer already.)
        return finalizer::finalizer(&api, FINALIZER, ap, |event| async {
            match event {
                Finalizer::Apply(ap) => apply(&ctx, &key, &ap).await,
                Finalizer::Cleanup(ap) => cleanup(&ctx, &key, &ap).await,
            }
        })
        .instrument(span)
        .await;
    }
    // Any other pool needs no finalizer: its pods are owned by the AgentPool, so the garbage
    // collector removes them once it is gone, warmpool running or not; a finalizer would only
    // keep a deleted AgentPool (and an uninstall) waiting for warmpool.
    async {
        if ours {
            // Left by a `jenkins` block the spec no longer has.
            let keep: Vec<String> = ap
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            let patch = serde_json::json!({
                "metadata": {"finalizers": keep, "resourceVersion": ap.resource_version()}
            });
            api.patch(
                &ap.name_any(),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .map_err(finalizer::Error::RemoveFinalizer)?;
        }
        if deleting {
            // Going: the status pass drops the pool once it is gone.
            return Ok(Action::await_change());
        }
        apply(&ctx, &key, &ap)
            .await
            .map_err(finalizer::Error::ApplyFailed)
    }
    .instrument(span)
    .await
}

fn error_policy(ap: Arc<AgentPool>, error: &finalizer::Error<Error>, ctx: Arc<Ctx>) -> Action {
    let (key, span) = span_of(&ctx, &ap);
    let _entered = span.enter();
    if let finalizer::Error::CleanupFailed(e) = error {
        let reason = match e {
            Error::PodsRemain { .. } => "CleanupPending",
            _ => "CleanupFailed",
        };
        if reason == "CleanupFailed" {
            tracing::warn!(error = %e, "cleaning up a deleted AgentPool failed; keeping its finalizer and retrying");
            ctx.backend.publish(
                &key,
                ap.object_ref(&()),
                Occurrence {
                    type_: EventType::Warning,
                    reason: "CleanupFailed",
                    action: "Cleanup",
                    note: format!(
                        "{e}; the finalizer {FINALIZER} stays until this succeeds (retried every {}s)",
                        RETRY.as_secs()
                    ),
                    fold: None,
                },
            );
        } else {
            tracing::info!(error = %e, "deleted AgentPool: waiting for its pods");
        }
        ctx.cleanup.insert(key, (reason, e.to_string()));
    } else {
        tracing::warn!(error = %error, "reconciling AgentPool failed; retrying");
    }
    Action::requeue(RETRY)
}

/// What is wrong with `ap`'s latest spec (empty: valid), the apiserver's verdict on its
/// template included once [`KubeBackend::check_template`] asked.
fn problems_of(backend: &KubeBackend, key: &str, ap: &AgentPool) -> Vec<String> {
    let mut problems = ap.spec.problems();
    problems.extend(backend.template_problem(key, ap));
    if key.len() > MAX_POOL_KEY {
        problems.push(format!(
            "metadata.name: pool {key:?} is longer than {MAX_POOL_KEY} characters (agent ids derive from it and must fit in a label value)"
        ));
    }
    problems
}

/// Routes a live AgentPool: a valid spec goes to the engine, or to the Jenkins connector when
/// it has a `jenkins` block (and leaves the other); an invalid one (its own rules, or a
/// template the apiserver refuses in a dry run) is not applied (an `InvalidSpec` Event once per
/// generation; the status loop reports it) and the last valid spec keeps running.
async fn apply(ctx: &Ctx, key: &str, ap: &AgentPool) -> Result<Action> {
    let mut problems = problems_of(&ctx.backend, key, ap);
    if problems.is_empty()
        && let Some(p) = ctx.backend.check_template(key, ap).await
    {
        problems.push(p);
    }
    if !problems.is_empty() {
        tracing::warn!(problems = ?problems, "invalid AgentPool spec; not applied");
        tell_invalid(ctx, key, ap, &problems);
        return Ok(Action::requeue(RESYNC));
    }
    tell_scaled(ctx, key, ap);
    let svc = &ctx.svc;
    match &ap.spec.pool.jenkins {
        Some(j) => {
            if ctx.backend.forget(key) {
                svc.remove_pool(key);
            }
            let ns = ap.namespace().unwrap_or_default();
            let credentials = match &j.credentials_secret {
                Some(secret) => {
                    crate::jenkins::pods::read_credentials(&ctx.client, &ns, secret).await
                }
                None => Err(crate::jenkins::CredentialsError::Missing {
                    hint: "set jenkins.credentialsSecret to a Secret with `username` and `token`",
                }),
            };
            if let Some(c) = svc.jenkins.get() {
                c.upsert(crate::jenkins::PoolCfg {
                    key: key.to_string(),
                    spec: ap.spec.pool.clone(),
                    jenkins: j.clone(),
                    credentials,
                    agent_pool: Some(Box::new(ap.clone())),
                });
            }
        }
        None => {
            remove_jenkins_pool(svc, key);
            let old_hash = ctx.backend.apply_pool(key, ap.clone());
            svc.upsert_pool(key, ap.spec.pool.clone());
            if let Some(old) = old_hash.filter(|h| *h != template_hash(ap)) {
                let rolled = retire_outdated(ctx, ap).await;
                ctx.backend.publish(
                    key,
                    ap.object_ref(&()),
                    Occurrence {
                        type_: EventType::Normal,
                        reason: "TemplateChanged",
                        action: "RollPods",
                        note: format!(
                            "pod template changed ({old} -> {}): rolling {rolled} agents built from the old one (idle ones once a replacement is idle, leased ones at release)",
                            template_hash(ap)
                        ),
                        fold: None,
                    },
                );
            }
        }
    }
    Ok(Action::requeue(RESYNC))
}

fn remove_jenkins_pool(svc: &Service, key: &str) {
    if let Some(c) = svc.jenkins.get()
        && c.has_pool(key)
    {
        c.remove(key);
    }
}

/// Publishes `InvalidSpec` for `ap`'s generation unless it was told already.
fn tell_invalid(ctx: &Ctx, key: &str, ap: &AgentPool, problems: &[String]) {
    let seen = (ap.uid().unwrap_or_default(), ap.metadata.generation);
    if ctx.told_invalid.get(key).is_some_and(|t| *t == seen) {
        return;
    }
    ctx.told_invalid.insert(key.to_string(), seen);
    ctx.backend.publish(
        key,
        ap.object_ref(&()),
        Occurrence {
            type_: EventType::Warning,
            reason: "InvalidSpec",
            action: "Reconcile",
            note: format!(
                "generation {} not applied (the last valid spec keeps running): {}",
                ap.metadata.generation.unwrap_or_default(),
                problems.join("; ")
            ),
            fold: Some(problems.join("; ")),
        },
    );
}

/// Publishes `Scaled` when `ap`'s `minIdle` differs from the one applied before (an edit, or
/// the scale subresource: `kubectl scale`, an HPA).
fn tell_scaled(ctx: &Ctx, key: &str, ap: &AgentPool) {
    let (uid, min) = (ap.uid().unwrap_or_default(), ap.spec.pool.min_idle);
    let Some((old_uid, old)) = ctx.min_idle.insert(key.to_string(), (uid.clone(), min)) else {
        return;
    };
    if old_uid == uid && old != min {
        ctx.backend.publish(
            key,
            ap.object_ref(&()),
            Occurrence {
                type_: EventType::Normal,
                reason: "Scaled",
                action: "Scale",
                note: format!("minIdle {old} -> {min}"),
                fold: None,
            },
        );
    }
}

/// Marks the pool's pods built from an older template for replacement; returns how many.
async fn retire_outdated(ctx: &Ctx, ap: &AgentPool) -> usize {
    let hash = template_hash(ap);
    let lp = ListParams::default().labels(&format!("{LABEL_POOL}={}", ap.name_any()));
    let ns = ap.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut rolled = 0;
    match pods.list(&lp).await {
        Ok(pods) => {
            for pod in pods.items {
                if pod.labels().get(LABEL_TEMPLATE_HASH) != Some(&hash)
                    && let Some(agent) = crate::backend::kubernetes::agent_of(&pod)
                {
                    ctx.svc.apply(|e, now| e.retire(&agent, now));
                    rolled += usize::from(pod.metadata.deletion_timestamp.is_none());
                }
            }
        }
        // The pod watch repairs this: every pod event checks its template hash.
        Err(e) => tracing::warn!(error = %e, "listing pods to roll failed"),
    }
    rolled
}

/// Removes what a deleted AgentPool had, then lets the finalizer go. A Jenkins pool: the
/// connector drops it, and its nodes on the controller and its agents are purged (the
/// credentials Secret must still be readable and the controller must answer, else this fails
/// and is retried). A warmpool pool: the engine drops it (idle agents stop now, leased ones at
/// release) and pods no agent of this instance owns are deleted; done once no pod is left.
async fn cleanup(ctx: &Ctx, key: &str, ap: &AgentPool) -> Result<Action> {
    let ns = ap.namespace().unwrap_or_default();
    match &ap.spec.pool.jenkins {
        Some(j) => {
            remove_jenkins_pool(&ctx.svc, key);
            let controller = j.root_url();
            let credentials = match &j.credentials_secret {
                Some(secret) => {
                    crate::jenkins::pods::read_credentials(&ctx.client, &ns, secret).await
                }
                None => Err(crate::jenkins::CredentialsError::Missing {
                    hint: "jenkins.credentialsSecret is not set",
                }),
            }
            .map_err(|source| Error::Credentials {
                pool: key.to_string(),
                controller: controller.clone(),
                source,
            })?;
            let ca_file = j.ca_file.as_ref().or(ctx.cfg.ca_file.as_ref());
            let tls = crate::tls::client_config(ca_file.map(|p| p.as_path())).map_err(|e| {
                Error::Tls {
                    pool: key.to_string(),
                    controller: controller.clone(),
                    message: e.to_string(),
                }
            })?;
            let limiter = Arc::new(RwLock::new(Arc::new(governor::RateLimiter::direct(
                crate::pacer::quota(j.requests_per_second, j.request_burst),
            ))));
            let client = crate::jenkins::client::Client::new(
                &controller,
                credentials,
                limiter,
                ctx.svc.metrics.clone(),
                &tls,
            );
            crate::jenkins::purge::purge(&client, &*ctx.runner, key, &j.prefix(key)).await?;
        }
        None => {
            if ctx.backend.forget(key) || ctx.svc.pools().iter().any(|p| p.name == key) {
                ctx.svc.remove_pool(key);
            }
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let lp = ListParams::default().labels(&format!(
                "{LABEL_POOL}={},{LABEL_MANAGED_BY}=warmpool",
                ap.name_any()
            ));
            let list = pods.list(&lp).await.map_err(|source| Error::ListPods {
                pool: key.to_string(),
                namespace: ns.clone(),
                source,
            })?;
            let mut remain = Vec::new();
            for pod in list.items {
                let name = pod.name_any();
                let known = crate::backend::kubernetes::agent_of(&pod)
                    .is_some_and(|a| ctx.svc.read(|e| e.agent(&a).is_some()));
                if pod.metadata.deletion_timestamp.is_none() && !known {
                    match pods.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 => continue,
                        Err(source) => {
                            return Err(Error::DeletePod {
                                pool: key.to_string(),
                                namespace: ns.clone(),
                                pod: name,
                                source,
                            });
                        }
                    }
                }
                remain.push(name);
            }
            if !remain.is_empty() {
                return Err(Error::PodsRemain {
                    pool: key.to_string(),
                    pods: remain,
                });
            }
        }
    }
    ctx.cleanup.remove(key);
    tracing::info!("deleted AgentPool cleaned up; removing the finalizer");
    Ok(Action::await_change())
}
