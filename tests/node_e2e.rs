//! End to end on a real node: `warmpool serve --backend kubernetes` (in process, as in
//! tests/kube_e2e.rs) against the apiserver of `scripts/kube-node.sh start`, whose kubelet runs
//! each agent pod as a Docker container built from this test's own `warmpool` binary
//! (`scripts/agent-image.sh`). Nothing is simulated. Covered: minIdle, jobs, maxUses and the
//! garbage collector; the hard cap under churn counted from an apiserver watch; leaked pods; a
//! restart of the service with a job running (docs/KUBERNETES.md, "The real-node tests").
//!
//! The node is found through `WARMPOOL_NODE_KUBECONFIG` (and `DOCKER_HOST`), which
//! `eval "$(scripts/kube-node.sh env)"` exports. Without it each test says so and passes, unless
//! `WARMPOOL_NODE_REQUIRED=1` (CI sets it, after starting the node): then it fails.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
#[path = "support/node.rs"]
mod node;
#[path = "support/run.rs"]
mod run;
mod support;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::*;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use node::*;
use run::spawn_run;
use serde_json::json;
use support::*;
use warmpool::k8s::crd::AgentPool;
use warmpool::server::BackendChoice;

/// The image every agent pod of this test runs: built from this test's `warmpool` binary.
const IMAGE: &str = "warmpool-agent:node-e2e";

#[tokio::test]
async fn pool_of_real_pods_reaches_min_idle_and_runs_a_job() {
    let Some((client, node)) = node_setup("node-e2e-").await else {
        return;
    };
    build_agent_image_once();

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

// ---- Each test below runs in a namespace of its own, with its own service instance: the
// ---- other real-node tests (and other test binaries on the same node) use theirs.

/// [`node_namespace`] and a service instance that serves namespace `ns` only; `None` without a
/// node (see [`node_kubeconfig`]).
async fn in_namespace(ns: &str) -> Option<(kube::Client, Harness)> {
    let kubeconfig = node_kubeconfig()?;
    let client = node_namespace(&kubeconfig, ns).await;
    let h = start_with(ns_config(&client, ns)).await;
    Some((client, h))
}

/// The client of the node, the CRD installed, [`IMAGE`] built, and the namespace `ns` ready
/// for pods (its `default` service account has its token), without the AgentPools an earlier,
/// interrupted run left in it.
async fn node_namespace(kubeconfig: &Path, ns: &str) -> kube::Client {
    let client = node_client(kubeconfig).await;
    build_agent_image_once();
    ensure_namespace(&client, ns).await;
    let aps = pools_in(&client, ns);
    for ap in aps.list(&ListParams::default()).await.unwrap().items {
        let _ = aps
            .delete(
                &ap.metadata.name.unwrap_or_default(),
                &DeleteParams::default(),
            )
            .await;
    }
    client
}

/// Builds [`IMAGE`] from this test's binary, once per test binary (the tests run in parallel).
fn build_agent_image_once() {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        build_image(IMAGE, &[]);
    });
}

/// warmpool on the node, in namespace `ns` only.
fn ns_config(client: &kube::Client, ns: &str) -> warmpool::server::ServeConfig {
    let mut cfg = kube_config(client);
    cfg.backend = BackendChoice::Kubernetes {
        client: client.clone(),
        namespace: Some(ns.into()),
        leader: None,
    };
    cfg
}

fn pools_in(client: &kube::Client, ns: &str) -> Api<AgentPool> {
    Api::namespaced(client.clone(), ns)
}

/// The pods of `pool` in `ns`, being deleted or not.
async fn pods_in(client: &kube::Client, ns: &str, pool: &str) -> Vec<Pod> {
    let lp = ListParams::default().labels(&format!("warmpool.dev/pool={pool}"));
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    api.list(&lp).await.unwrap().items
}

/// Creates AgentPool `name` in `ns`: labels [linux, `name`], one container `agent` of
/// [`IMAGE`] on the host's network running `command`, the fields of `extra` over that.
async fn create_pool(
    client: &kube::Client,
    ns: &str,
    name: &str,
    command: serde_json::Value,
    extra: serde_json::Value,
) {
    let spec = json!({
        "labels": ["linux", name],
        "template": {"spec": {
            "hostNetwork": true,
            "containers": [{
                "name": "agent", "image": IMAGE, "imagePullPolicy": "Never",
                "command": command,
                "env": [{"name": "WARMPOOL_MAX_BACKOFF", "value": "300ms"}]
            }]
        }}
    });
    let mut ap = agent_pool_with(name, spec, extra);
    ap.metadata.namespace = Some(ns.into());
    pools_in(client, ns)
        .create(&PostParams::default(), &ap)
        .await
        .unwrap();
}

fn real_agent() -> serde_json::Value {
    json!(["/usr/local/bin/warmpool", "agent"])
}

/// The pool's pods that count toward `maxTotal` by the documented rule, keyed by name, kept up
/// to date from a watch on the apiserver: every change of every pod is an event, so the
/// count is checked at every moment the apiserver records.
#[derive(Default)]
struct CapWatch {
    pods: std::collections::BTreeMap<String, Pod>,
    events: usize,
    max: usize,
    deleting_counted: usize,
    /// Pods seen in a terminal phase before any delete: their agent exited by itself.
    ended_by_themselves: std::collections::BTreeSet<String>,
    violations: Vec<String>,
}

impl CapWatch {
    fn check(&mut self, cap: usize) {
        for p in self.pods.values() {
            if !may_run(p) && p.metadata.deletion_timestamp.is_none() {
                self.ended_by_themselves
                    .insert(p.metadata.name.clone().unwrap_or_default());
            }
        }
        let counted: Vec<String> = self
            .pods
            .values()
            .filter(|p| may_run(p))
            .map(|p| {
                let deleting = p.metadata.deletion_timestamp.is_some();
                self.deleting_counted += usize::from(deleting);
                format!(
                    "{}({}{})",
                    p.metadata.name.clone().unwrap_or_default(),
                    phase(p),
                    if deleting { "/deleting" } else { "" }
                )
            })
            .collect();
        self.max = self.max.max(counted.len());
        if counted.len() > cap {
            self.violations
                .push(format!("{} pods may run: {counted:?}", counted.len()));
        }
    }
}

#[tokio::test]
async fn max_total_holds_under_churn_and_used_pods_end_by_themselves_before_their_delete() {
    const NS: &str = "node-e2e-churn";
    const CAP: usize = 3;
    let Some((client, h)) = in_namespace(NS).await else {
        return;
    };
    let name = format!("churn-{}", std::process::id());
    create_pool(
        &client,
        NS,
        &name,
        real_agent(),
        json!({"minIdle": 1, "maxTotal": CAP, "maxUses": 1,
               "provisioning": {"perSecond": 50, "burst": 10, "maxConcurrent": 10}}),
    )
    .await;
    poll("one idle agent", Duration::from_secs(120), async || {
        h.server
            .svc
            .pools()
            .iter()
            .any(|p| p.name == name && p.idle >= 1)
    })
    .await;

    let watch: Arc<Mutex<CapWatch>> = Arc::default();
    let watcher_task = {
        let (watch, pods) = (watch.clone(), Api::<Pod>::namespaced(client.clone(), NS));
        let cfg =
            kube::runtime::watcher::Config::default().labels(&format!("warmpool.dev/pool={name}"));
        tokio::spawn(async move {
            use kube::runtime::watcher::Event;
            let mut events = std::pin::pin!(kube::runtime::watcher(pods, cfg));
            while let Some(e) = events.next().await {
                let mut w = watch.lock().unwrap();
                w.events += 1;
                match e {
                    Ok(Event::Init) => w.pods.clear(),
                    Ok(Event::Apply(p) | Event::InitApply(p)) => {
                        w.pods
                            .insert(p.metadata.name.clone().unwrap_or_default(), p);
                    }
                    Ok(Event::Delete(p)) => {
                        w.pods.remove(&p.metadata.name.clone().unwrap_or_default());
                    }
                    Ok(Event::InitDone) | Err(_) => {}
                }
                w.check(CAP);
            }
        })
    };

    // Churn: 3 clients, 4 leases each, every lease uses up its pod (maxUses 1), so each job
    // waits for pods being deleted to leave room under the cap.
    let clients = (0..3).map(|_| async {
        for _ in 0..4 {
            let l = h.lease(&name, 180.0, 120.0).await;
            let out = exec(&h, &l.id, script("true")).await;
            assert_eq!(out.status.code, Some(0), "lease {} on {}", l.id, l.agent);
            h.client.release(&l.id).await.unwrap();
        }
    });
    let t = Instant::now();
    futures_util::future::join_all(clients).await;
    eprintln!("12 leases, maxUses 1, maxTotal {CAP}: {:?}", t.elapsed());
    // The last pods end after their release: let the watch see them (or time out and say).
    let deadline = Instant::now() + Duration::from_secs(60);
    while watch.lock().unwrap().ended_by_themselves.len() < 12 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watcher_task.abort();
    let w = std::mem::take(&mut *watch.lock().unwrap());
    eprintln!(
        "{} watch events, at most {} pods that may run, {} terminating ones counted, {} pods ended by themselves",
        w.events,
        w.max,
        w.deleting_counted,
        w.ended_by_themselves.len()
    );
    assert!(
        w.violations.is_empty(),
        "maxTotal {CAP} exceeded at {} moments: {:?}",
        w.violations.len(),
        &w.violations[..w.violations.len().min(5)]
    );
    // The rule was exercised: the cap was reached. A used agent exits by itself when told
    // (close 4410), so its pod ends Succeeded before it is deleted and stops counting at once;
    // deleting it first would leave it counted until its object is gone (a v1.20 kubelet
    // writes no terminal phase for a pod being deleted). Every used pod (12 leases, maxUses 1)
    // ends that way.
    assert_eq!(w.max, CAP, "the churn reached the cap");
    assert!(
        w.ended_by_themselves.len() >= 12,
        "only {} of 12 used pods reached a terminal phase before their delete: {:?}",
        w.ended_by_themselves.len(),
        w.ended_by_themselves
    );
    h.server.shutdown().await;
    let _ = pools_in(&client, NS)
        .delete(&name, &DeleteParams::default())
        .await;
}

#[tokio::test]
async fn an_agent_that_never_connects_is_deleted_as_a_leak_and_replaced() {
    const NS: &str = "node-e2e-leak";
    let Some((client, h)) = in_namespace(NS).await else {
        return;
    };
    let name = format!("leak-{}", std::process::id());
    // The container runs, but nothing in it ever dials the hub.
    create_pool(
        &client,
        NS,
        &name,
        json!(["/bin/sh", "-c", "exec sleep 3600"]),
        json!({"minIdle": 1, "maxTotal": 2, "maxUses": 1, "connectTimeout": "3s"}),
    )
    .await;
    let mut first = String::new();
    poll(
        "the pool's first pod Running",
        Duration::from_secs(120),
        async || {
            let pods = pods_in(&client, NS, &name).await;
            match pods.iter().find(|p| phase(p) == "Running") {
                Some(p) => {
                    first = p.metadata.name.clone().unwrap();
                    true
                }
                None => false,
            }
        },
    )
    .await;
    let leaks = || {
        metric(
            &h.server.svc.render_metrics(),
            &format!("warmpool_leaks_total{{pool=\"{name}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let took = poll(
        "the pod that never connected deleted as a leak",
        Duration::from_secs(60),
        async || {
            let deleted = pods_in(&client, NS, &name)
                .await
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(first.as_str()))
                .is_none_or(|p| p.metadata.deletion_timestamp.is_some());
            deleted && leaks() >= 1.0
        },
    )
    .await;
    eprintln!("pod {first} Running -> deleted as a leak (connectTimeout 3s): {took:?}");
    poll(
        "a replacement pod for the leaked one",
        Duration::from_secs(60),
        async || {
            pods_in(&client, NS, &name).await.iter().any(|p| {
                p.metadata.name.as_deref() != Some(first.as_str())
                    && p.metadata.deletion_timestamp.is_none()
            })
        },
    )
    .await;
    assert!(
        !h.agents_in(warmpool::engine::AgentState::Idle)
            .iter()
            .any(|a| a == &first),
        "the leaked pod never became an agent"
    );
    h.server.shutdown().await;
    let _ = pools_in(&client, NS)
        .delete(&name, &DeleteParams::default())
        .await;
}

/// Kills a `warmpool run` child if the test ends before it does.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            let _ = Command::new("kill")
                .args(["-9", &self.0.to_string()])
                .status();
        }
    }
}

#[tokio::test]
async fn a_restart_of_the_service_adopts_every_real_pod_and_the_job_survives() {
    const NS: &str = "node-e2e-restart";
    let Some((client, h)) = in_namespace(NS).await else {
        return;
    };
    let name = format!("restart-{}", std::process::id());
    create_pool(
        &client,
        NS,
        &name,
        real_agent(),
        // At the cap: the lease below leaves one idle agent and nothing to provision.
        json!({"minIdle": 2, "maxTotal": 2, "maxUses": 0}),
    )
    .await;
    poll("two idle agents", Duration::from_secs(120), async || {
        h.server
            .svc
            .pools()
            .iter()
            .any(|p| p.name == name && p.idle >= 2)
    })
    .await;
    let uids = |pods: Vec<Pod>| {
        let mut v: Vec<(String, String)> = pods
            .into_iter()
            .map(|p| (p.metadata.name.unwrap(), p.metadata.uid.unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = uids(pods_in(&client, NS, &name).await);
    assert_eq!(before.len(), 2, "minIdle pods: {before:?}");

    // About 10 s of output from a job in a real pod, across the restart.
    let job = "for i in $(seq 1 100); do echo line $i; sleep 0.1; done; echo done >&2; exit 7";
    let addr = h.server.addr;
    let run = spawn_run(&h.server.base_url(), &name, job);
    let _kill = KillOnDrop(run.pid());
    poll("output flowing", Duration::from_secs(30), async || {
        run.count() >= 10
    })
    .await;
    // A graceful restart (SIGTERM of serve): the pods stay, a new instance on the same address
    // adopts them.
    h.server.shutdown().await;
    let seen = run.count();
    let h2 = start_at(ns_config(&client, NS), addr).await;
    let (code, lines, stderr) = run.wait().await;
    assert!(
        seen < 100,
        "the restart happened mid-job ({seen} lines before)"
    );
    let want: Vec<String> = (1..=100).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, want, "every line once, in order");
    assert!(stderr.ends_with("done\n"), "stderr: {stderr}");
    assert_eq!(code, 7, "the job's own exit code");
    // Both agents are back, in the same pods: none deleted, none recreated.
    poll(
        "both adopted agents connected to the new instance",
        Duration::from_secs(60),
        async || {
            h2.server
                .svc
                .pools()
                .iter()
                .any(|p| p.name == name && p.idle >= 2 && p.total == 2)
        },
    )
    .await;
    let after = uids(pods_in(&client, NS, &name).await);
    assert_eq!(
        before, after,
        "the same pods (names and UIDs), nothing added"
    );
    h2.server.shutdown().await;
    let _ = pools_in(&client, NS)
        .delete(&name, &DeleteParams::default())
        .await;
}
