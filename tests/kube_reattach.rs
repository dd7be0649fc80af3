//! Jobs survive a restart of the service on the Kubernetes backend (a real kube-apiserver; the
//! process kubelet, the one simulated part, runs agent pods as local processes that outlive
//! `serve`): a `warmpool run` streaming output across a graceful restart, and across a crash of
//! the leader with a standby taking over, sees its whole output in order and the job's own
//! exit code, and no pod is replaced.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
#[path = "support/run.rs"]
mod run;
mod support;

use std::sync::Arc;
use std::time::Duration;

use cluster::{Replicas, service_proxy};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube_api::KubeApi;
use kubelet::ProcessKubelet;
use run::spawn_run;
use serde_json::json;
use support::*;
use warmpool::k8s::crd::AgentPool;
use warmpool::server::BackendChoice;
use warmpool::service::Service;

/// A fixed agent key: agent tokens stay valid across service instances.
fn kube_config(client: &kube::Client) -> warmpool::server::ServeConfig {
    let mut cfg = test_config("pools:\n  - name: unused\n");
    cfg.agent_key = warmpool::auth::AgentKey::from_bytes(b"test-agent-key-0123456789");
    cfg.backend = BackendChoice::Kubernetes {
        client: client.clone(),
        namespace: Some("default".into()),
        leader: None,
    };
    cfg
}

async fn setup() -> (KubeApi, kube::Client, ProcessKubelet) {
    let (api, client) = cluster::apiserver().await;
    let kubelet = ProcessKubelet::start(client.clone(), "default", Duration::from_millis(50));
    (api, client, kubelet)
}

/// One agent pod whose agent retries its hub every 300 ms at most.
fn pool(name: &str) -> AgentPool {
    serde_json::from_value(json!({
        "apiVersion": "warmpool.dev/v1alpha1", "kind": "AgentPool",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "labels": ["linux", name], "minIdle": 1, "maxTotal": 2, "maxUses": 0,
            "template": {"spec": {"containers": [{
                "name": "agent", "image": "warmpool:dev", "command": [EXE, "agent"],
                "env": [{"name": "WARMPOOL_MAX_BACKOFF", "value": "300ms"}]
            }]}}
        }
    }))
    .unwrap()
}

async fn pod_names(client: &kube::Client, pool: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let lp = ListParams::default().labels(&format!("warmpool.dev/pool={pool}"));
    let mut v: Vec<String> = pods
        .list(&lp)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    v.sort();
    v
}

const JOB: &str = "for i in $(seq 1 200); do echo line $i; sleep 0.02; done; echo done >&2; exit 7";

fn all_lines() -> Vec<String> {
    (1..=200).map(|i| format!("line {i}")).collect()
}

#[tokio::test]
async fn a_run_streams_across_a_graceful_restart_of_serve() {
    let (api, client, _kubelet) = setup().await;
    let h = start_with(kube_config(&client)).await;
    let pools: Api<AgentPool> = Api::namespaced(client.clone(), "default");
    pools
        .create(&PostParams::default(), &pool("survive"))
        .await
        .unwrap();
    h.wait_idle("survive", 1).await;
    let pods = pod_names(&client, "survive").await;
    let addr = h.server.addr;
    let run = spawn_run(&h.server.base_url(), "survive", JOB);
    wait_until("output flowing", Duration::from_secs(10), || {
        run.count() >= 10
    })
    .await;
    // A graceful restart (as on SIGINT/SIGTERM of serve): pods stay, a new instance adopts them.
    h.server.shutdown().await;
    let seen = run.count();
    let h2 = start_at(kube_config(&client), addr).await;
    let (code, lines, stderr) = run.wait().await;
    assert!(
        seen < 200,
        "the restart happened mid-job ({seen} lines before it)"
    );
    assert_eq!(lines, all_lines(), "every line once, in order");
    assert_eq!(stderr, "done\n");
    assert_eq!(code, 7, "the job's own exit code");
    let after = pod_names(&client, "survive").await;
    assert!(
        pods.iter().all(|p| after.contains(p)) && after.len() <= 2,
        "the job's pod was kept and nothing beyond maxTotal was added: {pods:?} -> {after:?}"
    );
    h2.server.shutdown().await;
    drop(api);
}

fn replica(
    client: &kube::Client,
    identity: &str,
    hub: &std::net::SocketAddr,
) -> warmpool::server::ServeConfig {
    let mut l = warmpool::k8s::leader::LeaderConfig::new("default", identity);
    l.lease_duration = Duration::from_secs(3);
    l.renew_deadline = Duration::from_secs(2);
    l.retry_period = Duration::from_millis(200);
    let mut cfg = kube_config(client);
    cfg.backend = BackendChoice::Kubernetes {
        client: client.clone(),
        namespace: Some("default".into()),
        leader: Some(Box::new(l)),
    };
    cfg.hub_url = Some(format!("ws://{hub}/v1/agents/connect"));
    cfg
}

/// A replica on a runtime of its own: dropping that runtime ends every task and socket of the
/// instance at once, with no shutdown sequence, as SIGKILL does (its leader Lease is not
/// released, so the standby waits for it to expire).
struct Crashable {
    addr: std::net::SocketAddr,
    svc: Arc<Service>,
    crash: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Crashable {
    fn start(cfg: warmpool::server::ServeConfig) -> Crashable {
        let (tx, rx) = std::sync::mpsc::channel();
        let (crash_tx, crash_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let h = rt.block_on(start_with(cfg));
            tx.send((h.server.addr, h.server.svc.clone())).unwrap();
            let _ = crash_rx.recv();
            // Keep the server alive until the crash, then drop everything at once.
            std::mem::forget(h);
            rt.shutdown_background();
        });
        let (addr, svc) = rx.recv().unwrap();
        Crashable {
            addr,
            svc,
            crash: Some(crash_tx),
            thread: Some(thread),
        }
    }

    fn crash(&mut self) {
        drop(self.crash.take());
        self.thread.take().unwrap().join().unwrap();
    }
}

#[tokio::test]
async fn a_run_streams_across_a_crash_of_the_leader_and_a_takeover() {
    let (api, client, _kubelet) = setup().await;
    let replicas: Replicas = Default::default();
    let service = service_proxy(replicas.clone()).await;
    // The leader first (on its own runtime, to crash it), then the standby.
    let mut leader = Crashable::start(replica(&client, "replica-a", &service));
    replicas
        .lock()
        .unwrap()
        .push((leader.addr, leader.svc.clone()));
    wait_until("replica-a leads", Duration::from_secs(10), || {
        leader.svc.is_ready()
    })
    .await;
    let standby = start_with(replica(&client, "replica-b", &service)).await;
    replicas
        .lock()
        .unwrap()
        .push((standby.server.addr, standby.server.svc.clone()));
    let pools: Api<AgentPool> = Api::namespaced(client.clone(), "default");
    pools
        .create(&PostParams::default(), &pool("takeover"))
        .await
        .unwrap();
    wait_until(
        "an idle agent on the leader",
        Duration::from_secs(20),
        || {
            leader
                .svc
                .pools()
                .iter()
                .any(|p| p.name == "takeover" && p.idle >= 1)
        },
    )
    .await;
    assert!(!standby.server.svc.is_ready());
    let pods = pod_names(&client, "takeover").await;
    let run = spawn_run(&format!("http://{service}"), "takeover", JOB);
    wait_until("output flowing", Duration::from_secs(10), || {
        run.count() >= 10
    })
    .await;
    // SIGKILL of the leader: no shutdown sequence, its Lease is left to expire.
    replicas.lock().unwrap().retain(|(a, _)| *a != leader.addr);
    leader.crash();
    let seen = run.count();
    let (code, lines, stderr) = run.wait().await;
    assert!(standby.server.svc.is_ready(), "the standby took over");
    assert!(
        seen < 200,
        "the crash happened mid-job ({seen} lines before it)"
    );
    assert_eq!(lines, all_lines(), "every line once, in order");
    assert_eq!(stderr, "done\n");
    assert_eq!(code, 7, "the job's own exit code");
    let after = pod_names(&client, "takeover").await;
    assert!(
        pods.iter().all(|p| after.contains(p)) && after.len() <= 2,
        "the job's pod was adopted, not replaced: {pods:?} -> {after:?}"
    );
    standby.server.shutdown().await;
    drop(api);
}
