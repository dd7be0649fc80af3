//! Adoption on start (or on becoming leader): with provisioning paused, the valid live
//! AgentPools become engine pools and their live pods are taken over from their labels, so pool
//! counts (and `maxTotal`) are rebuilt from the cluster before anything new is created. Their
//! agents reconnect and report the leases they still serve. An AgentPool being deleted is not
//! adopted: the controller's cleanup removes its pods.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use crate::backend::kubernetes::{KubeBackend, LABEL_MANAGED_BY, agent_of};
use crate::engine::AgentState;
use crate::k8s::crd::AgentPool;
use crate::service::Service;

/// Adopts what a previous instance left; returns how many pods were adopted. The caller holds
/// provisioning paused until this succeeds.
pub async fn adopt(svc: &Service, backend: &KubeBackend) -> Result<usize, kube::Error> {
    let pools: Api<AgentPool> = backend.scope();
    for ap in pools.list(&Default::default()).await?.items {
        if ap.spec.pool.jenkins.is_some() || ap.metadata.deletion_timestamp.is_some() {
            // A Jenkins pool is the connector's (routed by the controller); a pool being
            // deleted is cleaned up by the controller.
            continue;
        }
        let key = backend.key_of(&ap);
        // A template the apiserver refuses creates no pod: asked before anything is created.
        if super::problems_of(backend, &key, &ap).is_empty()
            && backend.check_template(&key, &ap).await.is_none()
        {
            backend.apply_pool(&key, ap.clone());
            svc.upsert_pool(&key, ap.spec.pool.clone());
        }
        // An invalid one: its pods are left alone; the status loop reports the problems.
    }
    let lp = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}=warmpool"));
    let mut adopted = 0;
    let pods: Api<Pod> = backend.scope();
    for pod in pods.list(&lp).await?.items {
        let (Some(agent), Some(pool)) = (agent_of(&pod), backend.key_of_pod(&pod)) else {
            continue;
        };
        backend.note_namespace(&agent, &pod.namespace().unwrap_or_default());
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
            AgentState::Terminating
        } else if phase == "Running" {
            AgentState::Connecting
        } else {
            AgentState::Provisioning
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
