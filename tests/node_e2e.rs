//! End to end on a real node: `warmpool serve --backend kubernetes` (in process, as in
//! tests/kube_e2e.rs) against the apiserver of `scripts/kube-node.sh start`, whose kubelet runs
//! each agent pod as a Docker container built from this test's own `warmpool` binary
//! (`scripts/agent-image.sh`). Nothing is simulated.
//!
//! The node is found through `WARMPOOL_NODE_KUBECONFIG` (and `DOCKER_HOST`), which
//! `eval "$(scripts/kube-node.sh env)"` exports. Without it the test says so and passes, unless
//! `WARMPOOL_NODE_REQUIRED=1` (CI sets it, after starting the node): then it fails.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::*;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use support::*;
use warmpool::k8s::crd::AgentPool;

/// The image every agent pod of this test runs: built from this test's `warmpool` binary.
const IMAGE: &str = "warmpool-agent:node-e2e";

/// The node's admin kubeconfig, or `None` (with a message) when no node is configured and
/// none is required.
fn node_kubeconfig() -> Option<PathBuf> {
    match std::env::var_os("WARMPOOL_NODE_KUBECONFIG") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("WARMPOOL_NODE_REQUIRED").is_some() => panic!(
            "WARMPOOL_NODE_REQUIRED is set but WARMPOOL_NODE_KUBECONFIG is not: \
             scripts/kube-node.sh start, then eval \"$(scripts/kube-node.sh env)\""
        ),
        None => {
            eprintln!(
                "SKIPPED: no real node (WARMPOOL_NODE_KUBECONFIG unset); see docs/KUBERNETES.md, \
                 \"Testing on a real node\""
            );
            None
        }
    }
}

async fn client_from(path: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", path.display()));
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

/// Installs the generated CRD, replacing an older one a previous run left, and waits until it
/// is Established.
async fn ensure_crd(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut want = AgentPool::crd();
    match crds
        .get_opt(&want.metadata.name.clone().unwrap())
        .await
        .unwrap()
    {
        None => {
            crds.create(&PostParams::default(), &want).await.unwrap();
        }
        Some(have) if have.spec != want.spec => {
            want.metadata.resource_version = have.metadata.resource_version;
            crds.replace(
                &want.metadata.name.clone().unwrap(),
                &PostParams::default(),
                &want,
            )
            .await
            .unwrap();
        }
        Some(_) => {}
    }
    poll(
        "the AgentPool CRD Established",
        Duration::from_secs(30),
        async || {
            crds.get("agentpools.warmpool.dev")
                .await
                .unwrap()
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        },
    )
    .await;
}

/// Builds [`IMAGE`] from this test's binary with scripts/agent-image.sh on the node's dockerd.
fn build_agent_image() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/agent-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(["--tag", IMAGE, EXE])
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/agent-image.sh runs");
    assert!(out.status.success(), "scripts/agent-image.sh failed");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), IMAGE);
}

/// Polls `f` every 100 ms until `limit`; returns how long it took.
async fn poll(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

/// The pod's agent container runs in Docker on the node: Running, bound to the node, with a
/// docker container id and no restarts.
fn really_running(p: &Pod, node: &str) -> bool {
    let spec_node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let statuses = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    phase(p) == "Running"
        && spec_node == Some(node)
        && !statuses.is_empty()
        && statuses.iter().all(|c| {
            c.ready
                && c.container_id
                    .as_deref()
                    .is_some_and(|id| id.starts_with("docker://"))
        })
}

/// Deletes the AgentPools an earlier, interrupted run of this test left (their pods follow
/// through the garbage collector).
async fn delete_leftovers(client: &kube::Client) {
    for ap in pools(client)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
    {
        let name = ap.metadata.name.unwrap_or_default();
        if name.starts_with("node-e2e-") {
            let _ = pools(client).delete(&name, &DeleteParams::default()).await;
        }
    }
}

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
    delete_leftovers(&client).await;
    build_agent_image();

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
