//! The real node of `scripts/kube-node.sh`, shared by tests/node_*.rs: finding it (skip or
//! require), a client from its admin kubeconfig, the AgentPool CRD installed, the agent image
//! built from the test's own `warmpool` binary, polling, and reads of what the kubelet reports.
//!
//! The node is found through `WARMPOOL_NODE_KUBECONFIG` (and `DOCKER_HOST`), which
//! `eval "$(scripts/kube-node.sh env)"` exports. Without it a test says so and passes, unless
//! `WARMPOOL_NODE_REQUIRED=1` (CI sets it, after starting the node): then it fails.
//!
//! The including test crate names the other support modules `cluster` (support/cluster.rs) and
//! `support` (support/mod.rs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use warmpool::k8s::crd::AgentPool;

use crate::cluster::{phase, pools};
use crate::support::EXE;

/// The node's admin kubeconfig, or `None` (with a message) when no node is configured and
/// none is required.
pub fn node_kubeconfig() -> Option<PathBuf> {
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

pub async fn client_from(path: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", path.display()));
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

/// Installs the generated CRD, replacing an older one a previous run left, and waits until it
/// is Established.
pub async fn ensure_crd(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    // Tests running in parallel may install it at the same time: a conflict is retried.
    for attempt in 0.. {
        let mut want = AgentPool::crd();
        let name = want.metadata.name.clone().unwrap();
        let result = match crds.get_opt(&name).await.unwrap() {
            None => crds.create(&PostParams::default(), &want).await.map(|_| ()),
            Some(have) if have.spec != want.spec => {
                want.metadata.resource_version = have.metadata.resource_version;
                crds.replace(&name, &PostParams::default(), &want)
                    .await
                    .map(|_| ())
            }
            Some(_) => Ok(()),
        };
        match result {
            Ok(()) => break,
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < 20 => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("installing the AgentPool CRD: {e}"),
        }
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

/// Builds image `tag` from this test's binary with scripts/agent-image.sh on the node's dockerd.
pub fn build_agent_image(tag: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/agent-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(["--tag", tag, EXE])
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/agent-image.sh runs");
    assert!(out.status.success(), "scripts/agent-image.sh failed");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), tag);
}

/// Polls `f` every 100 ms until `limit`; returns how long it took.
pub async fn poll(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) -> Duration {
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
pub fn really_running(p: &Pod, node: &str) -> bool {
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

/// Deletes the AgentPools in `default` whose name starts with `prefix` that an earlier,
/// interrupted run left (their pods follow through the garbage collector).
pub async fn delete_leftovers(client: &kube::Client, prefix: &str) {
    for ap in pools(client)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
    {
        let name = ap.metadata.name.unwrap_or_default();
        if name.starts_with(prefix) {
            let _ = pools(client).delete(&name, &DeleteParams::default()).await;
        }
    }
}
