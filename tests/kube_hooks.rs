//! Hooks on the Kubernetes backend, through a real kube-apiserver: the AgentPool's hooks reach
//! its agent pods with each release, and a failed health hook recycles the pod, shows as
//! `Degraded/HooksFailing` in the AgentPool status and as a Warning Event on the AgentPool.
//! The process kubelet (tests/support/kubelet.rs) is the only simulated part: it runs each
//! pod's agent as a local process that dials the hub for real.

#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube_api::{KubeApi, install_crd};
use kubelet::ProcessKubelet;
use serde_json::json;
use support::*;
use warmpool::k8s::crd::AgentPool;
use warmpool::server::BackendChoice;

/// Polls `f` every 50 ms for up to 30 s.
async fn until<F: AsyncFnMut() -> bool>(what: &str, mut f: F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn failed_health_hook_recycles_the_pod_with_a_condition_and_an_event() {
    // reqwest has no rustls crypto provider chosen on this base (see tests/hooks.rs).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,warmpool=info")
        .with_test_writer()
        .try_init();
    let api = KubeApi::start().await;
    let client = api.client().await;
    install_crd(&client).await;
    let _kubelet = ProcessKubelet::start(client.clone(), "default", Duration::from_millis(50));
    let mut cfg = test_config("pools:\n  - name: unused\n");
    cfg.backend = BackendChoice::Kubernetes {
        client: client.clone(),
        namespace: Some("default".into()),
        leader: None,
    };
    let h = start_with(cfg).await;

    let pool: AgentPool = serde_json::from_value(json!({
        "apiVersion": "warmpool.dev/v1alpha1", "kind": "AgentPool",
        "metadata": {"name": "dind", "namespace": "default"},
        "spec": {
            "labels": ["linux", "dind"], "minIdle": 1, "maxTotal": 2, "maxUses": 0,
            "hooks": {
                "cleanup": {"command": ["sh", "-c", "echo pruned > cleanup-ran"], "timeout": "10s"},
                "health": {
                    "command": ["sh", "-c", "echo 'sidecar holds 7 stopped containers' >&2; exit 1"],
                    "timeout": "10s"
                }
            },
            "template": {"spec": {"containers": [
                {"name": "agent", "image": "warmpool:dev", "command": [EXE, "agent"]}
            ]}}
        }
    }))
    .unwrap();
    let pools: Api<AgentPool> = Api::namespaced(client.clone(), "default");
    pools.create(&PostParams::default(), &pool).await.unwrap();
    h.wait_idle("dind", 1).await;

    let l = h.lease("dind", 20.0, 60.0).await;
    assert_eq!(exec(&h, &l.id, script("true")).await.status.code, Some(0));
    h.client.release(&l.id).await.unwrap();
    wait_until(
        "health-check-failed recycle",
        Duration::from_secs(20),
        || h.recycles("health-check-failed") == 1,
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    until("the failed pod deleted", async || {
        pods.get_opt(&l.agent)
            .await
            .unwrap()
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
    })
    .await;
    until(
        "Degraded/HooksFailing with the stderr excerpt",
        async || {
            let st = pools.get("dind").await.unwrap().status.unwrap_or_default();
            st.conditions.iter().any(|c| {
                c.type_ == "Degraded"
                    && c.status == "True"
                    && c.reason == "HooksFailing"
                    && c.message.contains(&l.agent)
                    && c.message
                        .contains("health hook exit code 1: sidecar holds 7 stopped containers")
            })
        },
    )
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    until("HealthCheckFailed event on the AgentPool", async || {
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("HealthCheckFailed")
                    && e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("dind")
                    && e.note.as_deref().is_some_and(|n| {
                        n.contains(&l.agent) && n.contains("sidecar holds 7 stopped containers")
                    })
            })
    })
    .await;
    // The pool keeps serving with a fresh pod.
    let next = h.lease("dind", 20.0, 60.0).await;
    assert_ne!(next.agent, l.agent);
    h.server.shutdown().await;
}
