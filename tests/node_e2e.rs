//! End to end on a real node: `warmpool serve --backend kubernetes` (in process, as in
//! tests/kube_e2e.rs) against the apiserver of `scripts/kube-node.sh start`, whose kubelet runs
//! each agent pod as a Docker container built from this test's own `warmpool` binary
//! (`scripts/agent-image.sh`). Nothing is simulated.
//!
//! The node is found as tests/support/node.rs says: without one the test says so and passes,
//! unless `WARMPOOL_NODE_REQUIRED=1`.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
#[path = "support/node.rs"]
mod node;
mod support;

use std::time::Duration;

use cluster::*;
use kube::api::{DeleteParams, PostParams};
use node::*;
use serde_json::json;
use support::*;

/// The image every agent pod of this test runs: built from this test's `warmpool` binary.
const IMAGE: &str = "warmpool-agent:node-e2e";

#[tokio::test]
async fn pool_of_real_pods_reaches_min_idle_and_runs_a_job() {
    let Some(kubeconfig) = node_kubeconfig() else {
        return;
    };
    let node = std::env::var("WARMPOOL_NODE_NAME").unwrap_or_else(|_| "localhost".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,warmpool=info")
        .with_test_writer()
        .try_init();
    let client = client_from(&kubeconfig).await;
    ensure_crd(&client).await;
    delete_leftovers(&client, "node-e2e-").await;
    build_agent_image(IMAGE);

    let h = start_with(kube_config(&client)).await;
    let name = format!("node-e2e-{}", std::process::id());
    let spec = json!({
        "labels": ["linux", name],
        "minIdle": 2, "maxTotal": 3, "maxUses": 1,
        "template": {"spec": {
            // Pods share the node's loopback, where the hub listens (docs/KUBERNETES.md).
            "hostNetwork": true,
            "containers": [{
                "name": "agent", "image": IMAGE, "imagePullPolicy": "Never",
                "command": ["/usr/local/bin/warmpool", "agent"]
            }]
        }}
    });
    pools(&client)
        .create(
            &PostParams::default(),
            &agent_pool_with(&name, spec, json!({})),
        )
        .await
        .unwrap();

    let took = poll(
        "minIdle 2: two agents connected from real pods",
        Duration::from_secs(120),
        async || {
            h.server
                .svc
                .pools()
                .iter()
                .any(|p| p.name == name && p.idle >= 2)
        },
    )
    .await;
    eprintln!("AgentPool created -> 2 idle agents in real pods: {took:?}");
    let pods = live_pods(&client, &name).await;
    assert_eq!(pods.len(), 2, "minIdle pods, no more: {:?}", names(&pods));
    // The kubelet reports the status after the agent may already have connected.
    let took = poll(
        "both pods Running in Docker on the node, containers ready",
        Duration::from_secs(60),
        async || {
            let now = live_pods(&client, &name).await;
            names(&now) == names(&pods) && now.iter().all(|p| really_running(p, &node))
        },
    )
    .await;
    eprintln!("agents connected -> kubelet reports both pods ready: {took:?}");

    // A job through a real pod: output and exit codes come back.
    let l = h.lease(&name, 30.0, 120.0).await;
    assert!(
        names(&pods).contains(&l.agent),
        "lease {} on a pod of the pool",
        l.id
    );
    let out = exec(&h, &l.id, script("echo hi")).await;
    assert_eq!(
        (out.stdout.as_slice(), out.status.code),
        (&b"hi\n"[..], Some(0)),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The job runs inside the agent's container, not on the host.
    let out = exec(
        &h,
        &l.id,
        script("test -f /.dockerenv && echo in-container; exit 3"),
    )
    .await;
    assert_eq!(out.stdout, b"in-container\n");
    assert_eq!(out.status.code, Some(3));
    h.client.release(&l.id).await.unwrap();

    // maxUses 1: the used pod goes and a fresh one takes its place.
    let used = l.agent.clone();
    let took = poll(
        "used pod gone, 2 others",
        Duration::from_secs(120),
        async || {
            let all = pods_of(&client, &name).await;
            !names(&all).contains(&used) && all.len() == 2
        },
    )
    .await;
    eprintln!("release -> used pod removed by the kubelet: {took:?}");
    h.wait_idle(&name, 2).await;

    // The service stops and leaves its pods for the next instance to adopt; deleting the
    // AgentPool then leaves them to the real garbage collector alone (owner references).
    h.server.shutdown().await;
    let left = live_pods(&client, &name).await;
    assert_eq!(
        left.len(),
        2,
        "pods outlive the service: {:?}",
        names(&left)
    );
    pools(&client)
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    let took = poll(
        "the garbage collector removes the pool's pods",
        Duration::from_secs(180),
        async || pods_of(&client, &name).await.is_empty(),
    )
    .await;
    eprintln!("AgentPool deleted -> its pods gone (garbage collector): {took:?}");
}
