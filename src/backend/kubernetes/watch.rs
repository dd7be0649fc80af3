//! Adoption and watchers of the Kubernetes backend: on start (or on becoming leader) adopt
//! what a previous instance left with provisioning paused, then watch `AgentPool`s (they become
//! pools; invalid ones are reported, never applied) and agent pods (their phases become agent
//! events; lost deletes are repaired on relist). Level-triggered: every (re)list repairs what a
//! missed event left behind.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;

use super::status::write_statuses;
use super::{
    KubeBackend, LABEL_MANAGED_BY, LABEL_POOL, LABEL_TEMPLATE_HASH, MAX_POOL_KEY, agent_of,
    image_failure, pod_exit, template_hash, unschedulable,
};
use crate::backend::PoolEvent::PodFailed;
use crate::backend::{Backend, BackendEvent};
use crate::k8s::crd::AgentPool;
use crate::service::Service;

/// Adopts what a previous instance left: with provisioning paused, loads the valid
/// `AgentPool`s and takes over their live pods from the labels, so pool counts (and `maxTotal`)
/// are rebuilt from the cluster before anything new is created. Their agents reconnect and
/// report the leases they still serve. Returns how many pods were adopted.
/// The caller holds provisioning paused until this succeeds.
pub async fn adopt(svc: &Service, backend: &KubeBackend) -> Result<usize, kube::Error> {
    let pools: Api<AgentPool> = backend.scope();
    for ap in pools.list(&Default::default()).await?.items {
        if ap.spec.pool.jenkins.is_some() {
            // A Jenkins pool: the connector's, never the engine's (routed by the watcher).
            continue;
        }
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
                    remove_jenkins_pool(&svc, &name);
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
                    if let Some(j) = &ap.spec.pool.jenkins {
                        // A Jenkins pool: the connector runs it, not the engine.
                        if backend.pools.remove(&name).is_some() {
                            svc.remove_pool(&name);
                        }
                        let ns = ap.namespace().unwrap_or_default();
                        let credentials = match &j.credentials_secret {
                            Some(secret) => {
                                crate::jenkins::pods::read_credentials(&backend.client, &ns, secret)
                                    .await
                            }
                            None => Err("no credentials: set jenkins.credentialsSecret to a Secret with `username` and `token`".into()),
                        };
                        if let Some(c) = svc.jenkins.get() {
                            c.upsert(crate::jenkins::PoolCfg {
                                key: name.clone(),
                                spec: ap.spec.pool.clone(),
                                jenkins: j.clone(),
                                credentials,
                                agent_pool: Some(Box::new(ap.clone())),
                            });
                        }
                        continue;
                    }
                    remove_jenkins_pool(&svc, &name);
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
                remove_jenkins_pool(&svc, &name);
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
                if let Some(c) = svc.jenkins.get() {
                    for name in c.pool_keys() {
                        if !seen.contains(&name) {
                            c.remove(&name);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "AgentPool watch error; retrying"),
        }
    }
}

fn remove_jenkins_pool(svc: &Arc<Service>, name: &str) {
    if let Some(c) = svc.jenkins.get()
        && c.has_pool(name)
    {
        c.remove(name);
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
                // Only a terminal phase (or the pod gone) ends an agent's count toward
                // maxTotal: a pod being deleted, or Unknown (its node lost: its containers may
                // still run), counts until it is gone. An Unknown pod's agent is judged by its
                // own connection: heartbeats or the connect deadline end it if it is lost.
                let deleting = pod.metadata.deletion_timestamp.is_some();
                // A pod waiting on an image that cannot be had waits forever: it failed to
                // start; it is deleted and the engine backs off before the next.
                if let Some(error) = image_failure(&pod).filter(|_| !deleting) {
                    let _ = events.send(BackendEvent::StartFailed {
                        agent: agent.clone(),
                        error,
                    });
                    backend.terminate(&agent, events.clone());
                    continue;
                }
                match phase.as_str() {
                    "Running" if !deleting => {
                        let _ = events.send(BackendEvent::Started { agent });
                    }
                    "Failed" | "Succeeded" => {
                        let detail = pod_exit(&pod);
                        if !deleting && let Some(pool) = pool_key.as_ref() {
                            // It ended by itself (crashed, OOM-killed, evicted): say so where
                            // the pool's owners look, whether or not its agent had registered.
                            tracing::warn!(pod = %agent, detail = %detail, "agent pod failed");
                            backend.record(
                                pool,
                                PodFailed {
                                    agent: agent.clone(),
                                    detail: detail.clone(),
                                },
                            );
                        }
                        let _ = events.send(BackendEvent::Exited {
                            agent: agent.clone(),
                            detail,
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
