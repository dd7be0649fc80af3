//! The real node of `scripts/kube-node.sh` for the real-node tests (`tests/node_*.rs`): finding
//! it (`WARMPOOL_NODE_KUBECONFIG`, else a skip, or a failure under `WARMPOOL_NODE_REQUIRED=1`),
//! the CRD, local images built from the test's own binary, and polling helpers.
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

/// A client for the node, with the CRD installed and the AgentPools named `prefix*` an earlier,
/// interrupted run left deleted; `None` when no node is configured (see [`node_kubeconfig`]).
/// Also returns the node's name.
pub async fn node_setup(prefix: &str) -> Option<(kube::Client, String)> {
    let kubeconfig = node_kubeconfig()?;
    let node = std::env::var("WARMPOOL_NODE_NAME").unwrap_or_else(|_| "localhost".into());
    let client = node_client(&kubeconfig).await;
    delete_leftovers(&client, prefix).await;
    Some((client, node))
}

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
    let mut want = AgentPool::crd();
    match crds
        .get_opt(&want.metadata.name.clone().unwrap())
        .await
        .unwrap()
    {
        // Another test may have created it meanwhile.
        None => match crds.create(&PostParams::default(), &want).await {
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            r => {
                r.unwrap();
            }
        },
        Some(have) if have.spec != want.spec => {
            want.metadata.resource_version = have.metadata.resource_version;
            // A conflict: another test replaced it meanwhile, with the same.
            match crds
                .replace(
                    &want.metadata.name.clone().unwrap(),
                    &PostParams::default(),
                    &want,
                )
                .await
            {
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                r => {
                    r.unwrap();
                }
            }
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

/// Builds a local image on the node's dockerd with scripts/agent-image.sh (`args` before the
/// binary, e.g. `--docker-cli`) from this test's own `warmpool` binary, and returns its name.
pub fn build_image(tag: &str, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/agent-image.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).args(args).args(["--tag", tag]);
    if !args.contains(&"--dind") {
        cmd.arg(crate::support::EXE);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/agent-image.sh runs");
    assert!(
        out.status.success(),
        "scripts/agent-image.sh {args:?} failed"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), tag);
    tag.to_string()
}

/// Deletes the AgentPools named `prefix*` an earlier, interrupted run left (their pods follow
/// through the garbage collector).
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

/// The agent image `tag` built from this test's own binary.
pub fn build_agent_image(tag: &str) {
    build_image(tag, &[]);
}

/// Creates namespace `ns` when missing and waits until its `default` service account has its
/// token: until then the apiserver refuses pods in it with a 500 (the ServiceAccount admission
/// plugin), which warmpool cannot tell from a create that may have gone through.
pub async fn ensure_namespace(client: &kube::Client, ns: &str) {
    use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
    let nss: Api<Namespace> = Api::all(client.clone());
    if nss.get_opt(ns).await.unwrap().is_none() {
        let want = serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
        nss.create(&PostParams::default(), &want).await.unwrap();
    }
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    poll(
        &format!("the default service account of {ns} with its token"),
        Duration::from_secs(60),
        async || {
            sas.get_opt("default")
                .await
                .unwrap()
                .is_some_and(|sa| !sa.secrets.unwrap_or_default().is_empty())
        },
    )
    .await;
}

/// Test logging (warmpool at info) and a client of the node's apiserver with the CRD installed.
pub async fn node_client(kubeconfig: &std::path::Path) -> kube::Client {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,warmpool=info")
        .with_test_writer()
        .try_init();
    let client = client_from(kubeconfig).await;
    ensure_crd(&client).await;
    client
}
