//! The pod watcher of the Kubernetes backend: agent pods' phases become agent events (Running
//! -> started, image failures -> start failed, Failed/Succeeded/gone -> exited); pods whose
//! AgentPool is gone are deleted; lost deletes are repaired on relist. Level-triggered: every
//! (re)list repairs what a missed event left behind. Which AgentPools exist comes from the
//! AgentPool controller's reflector store (`k8s/agentpool/`).

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, Event};

use super::{
    AgentView, KubeBackend, LABEL_MANAGED_BY, LABEL_POOL, LABEL_TEMPLATE_HASH, agent_of,
    image_failure, pod_exit, template_hash, unschedulable,
};
use crate::backend::PoolEvent::PodFailed;
use crate::backend::{Backend, BackendEvent};
use crate::k8s::crd::AgentPool;

/// Pod phases become agent events; pods the engine does not know are deleted when their
/// AgentPool is not in `pools`.
pub async fn watch_pods(
    view: Arc<dyn AgentView>,
    backend: Arc<KubeBackend>,
    pools: Store<AgentPool>,
) {
    let cfg = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}=warmpool"));
    let pods: Api<Pod> = backend.scope();
    let mut stream = watcher::watcher(pods, cfg).default_backoff().boxed();
    let events = view.events();
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
                let known = view.knows(&agent);
                if !known {
                    // Only a pod whose AgentPool is gone is garbage. A pod of an existing pool
                    // (valid or not) that this instance does not know is left alone.
                    let pool_exists = pod.labels().get(LABEL_POOL).is_some_and(|name| {
                        let r = ObjectRef::<AgentPool>::new(name)
                            .within(&pod.namespace().unwrap_or_default());
                        pools.get(&r).is_some()
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
                    view.retire(&agent);
                }
                match (unschedulable(&pod), pool_key.as_ref()) {
                    (Some(why), Some(pool)) => {
                        tracing::warn!(pod = %agent, why = %why, "pod cannot be scheduled; keeping it");
                        backend.pending.insert(agent.clone(), (pool.clone(), why));
                        view.hold_pending(&agent);
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
                        // A pod whose agent was told to exit (a used or rolled agent, sizing)
                        // and that Succeeded is the normal recycle, not a failure.
                        let retired = phase == "Succeeded" && view.is_terminating(&agent);
                        if !deleting
                            && !retired
                            && let Some(pool) = pool_key.as_ref()
                        {
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
                let terminating = view.terminating();
                let gone = terminating.into_iter().filter(|(a, _)| !listed.contains(a));
                for (agent, _) in gone {
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
