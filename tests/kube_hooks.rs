//! Hooks on the Kubernetes backend, through a real kube-apiserver: the AgentPool's hooks reach
//! its agent pods with each release, and a failed health hook recycles the pod, shows as
//! `Degraded/HooksFailing` in the AgentPool status and as a Warning Event on the AgentPool.
//! The process kubelet (tests/support/kubelet.rs) is the only simulated part: it runs each
//! pod's agent as a local process that dials the hub for real.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
mod support;

use std::time::Duration;

use cluster::*;
use kube::api::PostParams;
use serde_json::json;
use support::*;

#[tokio::test]
async fn failed_health_hook_recycles_the_pod_with_a_condition_and_an_event() {
    let Cluster {
        api: _api,
        client,
        _kubelet,
        h,
    } = cluster().await;

    let pool = agent_pool(
        "dind",
        agent_cmd(),
        json!({
            "minIdle": 1, "maxTotal": 2, "maxUses": 0,
            "hooks": {
                "cleanup": {"command": ["sh", "-c", "echo pruned > cleanup-ran"], "timeout": "10s"},
                "health": {
                    "command": ["sh", "-c", "echo 'sidecar holds 7 stopped containers' >&2; exit 1"],
                    "timeout": "10s"
                }
            }
        }),
    );
    pools(&client)
        .create(&PostParams::default(), &pool)
        .await
        .unwrap();
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
    until("the failed pod deleted", async || {
        pod_gone(&client, &l.agent).await
    })
    .await;
    until(
        "Degraded/HooksFailing with the stderr excerpt",
        async || {
            let excerpt = "health hook exit code 1: sidecar holds 7 stopped containers";
            has_condition(
                &client,
                "dind",
                "Degraded",
                "True",
                "HooksFailing",
                &[&l.agent, excerpt],
            )
            .await
        },
    )
    .await;
    until("HealthCheckFailed event on the AgentPool", async || {
        let excerpt = "sidecar holds 7 stopped containers";
        warning_event(&client, "HealthCheckFailed", "dind", &[&l.agent, excerpt]).await
    })
    .await;
    // The pool keeps serving with a fresh pod.
    let next = h.lease("dind", 20.0, 60.0).await;
    assert_ne!(next.agent, l.agent);
    h.server.shutdown().await;
}
