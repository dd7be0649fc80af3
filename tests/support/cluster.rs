//! The Kubernetes bench shared by tests/kube_*.rs: a real kube-apiserver with the CRD installed
//! (tests/support/kube.rs), warmpool's config for the Kubernetes backend, `AgentPool` builders,
//! and reads of what the apiserver holds (pods, AgentPool status and conditions, Events), with a
//! polling helper (50 ms, up to 30 s), and a stand-in for the Service in front of replicas.
//! Namespace `default` throughout.
//!
//! The including test crate names the other support modules `kube_api` (support/kube.rs),
//! `kubelet` (support/kubelet.rs) and `support` (support/mod.rs).
#![allow(dead_code)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;
use warmpool::k8s::crd::{AgentPool, AgentPoolStatus};
use warmpool::server::{BackendChoice, ServeConfig};

use crate::kube_api::{KubeApi, install_crd};
use crate::kubelet::ProcessKubelet;
use crate::support::{EXE, Harness, start_with, test_config};

/// A fixed agent key: agent tokens stay valid across service instances, as with
/// `--agent-key-file` in production.
pub const AGENT_KEY: &[u8] = b"test-agent-key-0123456789";

/// Starts a kube-apiserver and installs the CRD; warnings from warmpool show in a failing test's
/// output.
pub async fn apiserver() -> (KubeApi, kube::Client) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,warmpool=info")
        .with_test_writer()
        .try_init();
    let api = KubeApi::start().await;
    let client = api.client().await;
    install_crd(&client).await;
    (api, client)
}

/// warmpool on the Kubernetes backend in `default`, without leader election, with
/// [`AGENT_KEY`].
pub fn kube_config(client: &kube::Client) -> ServeConfig {
    let mut cfg = test_config("pools:\n  - name: unused\n");
    cfg.agent_key = warmpool::auth::AgentKey::from_bytes(AGENT_KEY);
    cfg.backend = BackendChoice::Kubernetes {
        client: client.clone(),
        namespace: Some("default".into()),
        leader: None,
    };
    cfg
}

/// [`kube_config`] for a replica that runs for leadership as `identity` (retry period 200 ms).
pub fn replica(
    client: &kube::Client,
    identity: &str,
    lease_duration: Duration,
    renew_deadline: Duration,
) -> ServeConfig {
    let mut l = warmpool::k8s::leader::LeaderConfig::new("default", identity);
    l.lease_duration = lease_duration;
    l.renew_deadline = renew_deadline;
    l.retry_period = Duration::from_millis(200);
    let mut cfg = kube_config(client);
    cfg.backend = BackendChoice::Kubernetes {
        client: client.clone(),
        namespace: Some("default".into()),
        leader: Some(Box::new(l)),
    };
    cfg
}

/// An `AgentPool` `name` in `default` with `spec`, the fields of `extra` set over it.
pub fn agent_pool_with(
    name: &str,
    mut spec: serde_json::Value,
    extra: serde_json::Value,
) -> AgentPool {
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "warmpool.dev/v1alpha1", "kind": "AgentPool",
        "metadata": {"name": name, "namespace": "default"}, "spec": spec
    }))
    .unwrap()
}

/// An `AgentPool` with labels [linux, `name`] and one container `agent` running `command`.
pub fn agent_pool(name: &str, command: serde_json::Value, extra: serde_json::Value) -> AgentPool {
    let spec = json!({
        "labels": ["linux", name],
        "template": {"spec": {"containers": [{"name": "agent", "image": "warmpool:dev", "command": command}]}}
    });
    agent_pool_with(name, spec, extra)
}

/// The command of a real agent: `warmpool agent`.
pub fn agent_cmd() -> serde_json::Value {
    json!([EXE, "agent"])
}

pub fn pools(client: &kube::Client) -> Api<AgentPool> {
    Api::namespaced(client.clone(), "default")
}

pub fn pods(client: &kube::Client) -> Api<Pod> {
    Api::namespaced(client.clone(), "default")
}

/// The pods of `pool` (by their `warmpool.dev/pool` label), being deleted or not.
pub async fn pods_of(client: &kube::Client, pool: &str) -> Vec<Pod> {
    let lp = ListParams::default().labels(&format!("warmpool.dev/pool={pool}"));
    pods(client).list(&lp).await.unwrap().items
}

/// The pods of `pool` not being deleted.
pub async fn live_pods(client: &kube::Client, pool: &str) -> Vec<Pod> {
    let mut v = pods_of(client, pool).await;
    v.retain(|p| p.metadata.deletion_timestamp.is_none());
    v
}

/// The names of `pods`, sorted.
pub fn names(pods: &[Pod]) -> Vec<String> {
    let mut v: Vec<String> = pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    v.sort();
    v
}

/// The sorted names of the pods of `pool` not being deleted.
pub async fn pod_names(client: &kube::Client, pool: &str) -> Vec<String> {
    names(&live_pods(client, pool).await)
}

/// True when pod `name` is gone or being deleted.
pub async fn pod_gone(client: &kube::Client, name: &str) -> bool {
    pods(client)
        .get_opt(name)
        .await
        .unwrap()
        .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
}

pub fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// The documented rule (docs/KUBERNETES.md): a pod counts toward `maxTotal` while its
/// containers may still run, that is until its phase is Succeeded or Failed or it is gone.
pub fn may_run(p: &Pod) -> bool {
    !matches!(phase(p), "Succeeded" | "Failed")
}

pub async fn status(client: &kube::Client, pool: &str) -> AgentPoolStatus {
    pools(client)
        .get(pool)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

/// True when the pool's status has condition `type_` = `status` with `reason` (when not
/// empty) and a message containing each of `texts`.
pub async fn has_condition(
    client: &kube::Client,
    pool: &str,
    type_: &str,
    status_: &str,
    reason: &str,
    texts: &[&str],
) -> bool {
    condition(&status(client, pool).await, type_, status_, reason, texts)
}

/// [`has_condition`] on a status already read.
pub fn condition(
    st: &AgentPoolStatus,
    type_: &str,
    status: &str,
    reason: &str,
    texts: &[&str],
) -> bool {
    st.conditions.iter().any(|x| {
        x.type_ == type_
            && x.status == status
            && (reason.is_empty() || x.reason == reason)
            && texts.iter().all(|t| x.message.contains(t))
    })
}

/// True when a Warning Event with `reason` regards the AgentPool `pool` with a note containing
/// each of `texts`.
pub async fn warning_event(
    client: &kube::Client,
    reason: &str,
    pool: &str,
    texts: &[&str],
) -> bool {
    warning_event_in(client, "default", reason, pool, texts).await
}

/// [`warning_event`] in namespace `ns`.
pub async fn warning_event_in(
    client: &kube::Client,
    ns: &str,
    reason: &str,
    pool: &str,
    texts: &[&str],
) -> bool {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .any(|e| {
            e.reason.as_deref() == Some(reason)
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pool)
                && e.note
                    .as_deref()
                    .is_some_and(|n| texts.iter().all(|t| n.contains(t)))
        })
}

/// Polls `f` every 50 ms for up to 30 s.
pub async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An apiserver with the CRD, a process kubelet in `default` (pods start after 50 ms) and
/// warmpool on the Kubernetes backend ([`kube_config`]).
pub struct Cluster {
    pub api: KubeApi,
    pub client: kube::Client,
    pub _kubelet: ProcessKubelet,
    pub h: Harness,
}

pub async fn cluster() -> Cluster {
    let (api, client) = apiserver().await;
    let kubelet = ProcessKubelet::start(client.clone(), "default", Duration::from_millis(50));
    let h = start_with(kube_config(&client)).await;
    Cluster {
        api,
        client,
        _kubelet: kubelet,
        h,
    }
}

impl Cluster {
    pub fn pools(&self) -> Api<AgentPool> {
        pools(&self.client)
    }
    pub fn pods(&self) -> Api<Pod> {
        pods(&self.client)
    }
    /// See [`pod_names`].
    pub async fn pod_names(&self, pool: &str) -> Vec<String> {
        pod_names(&self.client, pool).await
    }
    pub async fn status(&self, pool: &str) -> AgentPoolStatus {
        status(&self.client, pool).await
    }
    /// See [`has_condition`] (one text; empty matches any message).
    pub async fn has_condition(
        &self,
        pool: &str,
        type_: &str,
        status: &str,
        reason: &str,
        text: &str,
    ) -> bool {
        has_condition(&self.client, pool, type_, status, reason, &[text]).await
    }
    /// Creates AgentPool `name` running `warmpool agent` ([`agent_pool`], [`agent_cmd`]) with
    /// the spec fields of `extra`.
    pub async fn create_pool(&self, name: &str, extra: serde_json::Value) {
        self.pools()
            .create(
                &kube::api::PostParams::default(),
                &agent_pool(name, agent_cmd(), extra),
            )
            .await
            .unwrap();
    }
    /// See [`until`].
    pub async fn until(&self, what: &str, mut f: impl AsyncFnMut(&Cluster) -> bool) {
        until(what, async || f(self).await).await
    }
}

/// What a Kubernetes Service does for the replicas: one stable address that forwards each
/// connection to a ready replica (only the leader is ready).
pub type Replicas = std::sync::Arc<
    std::sync::Mutex<
        Vec<(
            std::net::SocketAddr,
            std::sync::Arc<warmpool::service::Service>,
        )>,
    >,
>;

pub async fn service_proxy(replicas: Replicas) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = replicas
                .lock()
                .unwrap()
                .iter()
                .find(|(_, svc)| svc.is_ready())
                .map(|(a, _)| *a);
            let Some(target) = target else { continue };
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    addr
}
