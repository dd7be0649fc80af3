//! Agents that fail, on a real node (`scripts/kube-node.sh`): the kubelet, Docker and the kernel
//! produce the failures; nothing is simulated. tests/kube_faults.rs covers the same cases fast
//! with the simulated kubelet.
//! - a container that exits with code 7 before its agent registers: the pool backs off (pods
//!   created in 30 s are counted) and its status names the exit;
//! - a pool with a memory limit whose job allocates beyond it: the agent's container is
//!   OOM-killed, the lease ends naming the pod and `OOMKilled`, and a replacement pod comes;
//! - a pool whose image does not exist: Degraded naming the image (`ErrImageNeverPull`), and its
//!   pods do not pile up.
//!
//! Each test works in its own namespace `faults-<pid>-<case>`, deleted at the end (and by the
//! next run if this one was interrupted). The node is found as tests/support/node.rs says:
//! without one the tests say so and pass, unless `WARMPOOL_NODE_REQUIRED=1`.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
#[path = "support/node.rs"]
mod node;
mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use node::*;
use serde_json::json;
use support::*;
use warmpool::k8s::crd::{AgentPool, AgentPoolStatus};
use warmpool::server::BackendChoice;

/// The image of this test's pods: built from this test's `warmpool` binary.
const IMAGE: &str = "warmpool-agent:node-faults";

/// One test's corner of the node: its namespace, a client, and warmpool serving it.
struct Bench {
    ns: String,
    client: kube::Client,
    h: Harness,
}

impl Bench {
    async fn start(case: &str) -> Option<Bench> {
        let kubeconfig = node_kubeconfig()?;
        let client = node_client(&kubeconfig).await;
        static IMAGE_BUILT: OnceLock<()> = OnceLock::new();
        let _ =
            tokio::task::spawn_blocking(|| IMAGE_BUILT.get_or_init(|| build_agent_image(IMAGE)))
                .await;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let prefix = format!("faults-{}-", std::process::id());
        // What an interrupted earlier run left (its pods go with the namespace).
        for n in namespaces.list(&ListParams::default()).await.unwrap().items {
            let name = n.metadata.name.unwrap_or_default();
            if name.starts_with("faults-")
                && !name.starts_with(&prefix)
                && n.metadata.deletion_timestamp.is_none()
            {
                let _ = namespaces.delete(&name, &DeleteParams::default()).await;
            }
        }
        let ns = format!("{prefix}{case}");
        ensure_namespace(&client, &ns).await;
        let mut cfg = cluster::kube_config(&client);
        cfg.backend = BackendChoice::Kubernetes {
            client: client.clone(),
            namespace: Some(ns.clone()),
            leader: None,
        };
        let h = start_with(cfg).await;
        Some(Bench { ns, client, h })
    }

    fn pools(&self) -> Api<AgentPool> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates AgentPool `name`: one container `agent` of `image` running `command` on the
    /// node's network, with `resources`, the fields of `extra` set over the spec.
    async fn create_pool(
        &self,
        name: &str,
        image: &str,
        command: serde_json::Value,
        resources: serde_json::Value,
        extra: serde_json::Value,
    ) {
        let mut spec = json!({
            "labels": ["linux", name],
            "template": {"spec": {
                // Pods share the node's loopback, where the hub listens (docs/KUBERNETES.md).
                "hostNetwork": true,
                "containers": [{
                    "name": "agent", "image": image, "imagePullPolicy": "Never",
                    "command": command, "resources": resources
                }]
            }}
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let ap: AgentPool = serde_json::from_value(json!({
            "apiVersion": "warmpool.dev/v1alpha1", "kind": "AgentPool",
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec
        }))
        .unwrap();
        self.pools()
            .create(&PostParams::default(), &ap)
            .await
            .unwrap();
    }

    async fn status(&self, pool: &str) -> AgentPoolStatus {
        self.pools()
            .get(pool)
            .await
            .unwrap()
            .status
            .unwrap_or_default()
    }

    /// True when a Warning Event with `reason` regards AgentPool `pool` with a note holding
    /// each of `texts`.
    async fn warning_event(&self, reason: &str, pool: &str, texts: &[&str]) -> bool {
        cluster::warning_event_in(&self.client, &self.ns, reason, pool, texts).await
    }

    /// Watches `window` (an observation period, not a wait for a condition): returns how many
    /// pods were created, checking that no more than `max` exist at once, being deleted or not.
    async fn observe(&self, window: Duration, max: usize) -> usize {
        let seen: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let mut stream = watcher::watcher(self.pods(), watcher::Config::default()).boxed();
        let s = seen.clone();
        let watch = tokio::spawn(async move {
            while let Some(ev) = stream.next().await {
                if let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = ev {
                    s.lock()
                        .unwrap()
                        .insert(p.metadata.name.unwrap_or_default());
                }
            }
        });
        let end = std::time::Instant::now() + window;
        while std::time::Instant::now() < end {
            let all = self
                .pods()
                .list(&ListParams::default())
                .await
                .unwrap()
                .items;
            assert!(all.len() <= max, "pods pile up: {:?}", cluster::names(&all));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        watch.abort();
        seen.lock().unwrap().len()
    }

    /// Stops warmpool and deletes the namespace (its pods go with it).
    async fn finish(self) {
        self.h.server.shutdown().await;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces.delete(&self.ns, &DeleteParams::default()).await;
    }
}

fn degraded(st: &AgentPoolStatus, reason: &str, texts: &[&str]) -> bool {
    cluster::condition(st, "Degraded", "True", reason, texts)
}

#[tokio::test]
async fn a_container_exiting_before_its_agent_registers_backs_off_on_a_real_node() {
    let Some(b) = Bench::start("crash").await else {
        return;
    };
    b.create_pool(
        "crash",
        IMAGE,
        json!(["/bin/sh", "-c", "echo bye >&2; exit 7"]),
        json!({}),
        json!({"minIdle": 1, "maxTotal": 2}),
    )
    .await;
    // Before the fix: 68 pods in 69 s. With backoff (1, 2, 4, 8, 16 s pauses, halved at most
    // by jitter, after pods that live 1-2 s): 5 or 6 in 30 s; 8 leaves room for a slow node.
    let created = b.observe(Duration::from_secs(30), 2 + 6).await;
    eprintln!("pods created in 30 s by a pool whose container exits 7: {created}");
    assert!((2..=8).contains(&created), "{created} pods created in 30 s");
    let st = b.status("crash").await;
    assert!(
        degraded(
            &st,
            "AgentsFailing",
            &[
                "exited before it registered",
                "container agent: Error, exit code 7"
            ]
        ),
        "{:?}",
        st.conditions
    );
    assert!(
        b.warning_event("PodFailed", "crash", &["crash-", "exit code 7"])
            .await
    );
    b.finish().await;
}

#[tokio::test]
async fn an_agent_oom_killed_during_a_job_ends_its_lease_naming_it_on_a_real_node() {
    let Some(b) = Bench::start("oom").await else {
        return;
    };
    // Requests equal to limits for memory and CPU: a Guaranteed pod. The kubelet gives its
    // container oom_score_adj -997 (the node's runc wrapper makes it 0), so its processes are
    // ranked by memory alone. (A Burstable pod's processes get about 997.)
    let memory = json!({
        "limits": {"memory": "96Mi", "cpu": "500m"},
        "requests": {"memory": "96Mi", "cpu": "500m"}
    });
    b.create_pool(
        "oom",
        IMAGE,
        json!(["/usr/local/bin/warmpool", "agent"]),
        memory,
        json!({"minIdle": 1, "maxTotal": 2}),
    )
    .await;
    poll("an idle agent", Duration::from_secs(120), async || {
        b.h.server
            .svc
            .pools()
            .iter()
            .any(|p| p.name == "oom" && p.idle >= 1)
    })
    .await;
    let l = b.h.lease("oom", 60.0, 300.0).await;
    // The kernel kills the process of the cgroup with the highest badness. A job's own
    // allocation would make the job the victim (its exec ends killed, the pod runs on); the
    // container dies when its agent is, as a large agent (a JVM) is: the job marks the agent,
    // PID 1 of the container, as the preferred victim, then allocates 300 MiB.
    let job =
        script("echo 1000 > /proc/1/oom_score_adj; head -c 314572800 /dev/zero | sort > /dev/null");
    let lease = l.id.clone();
    let client = b.h.client.clone();
    let exec = tokio::spawn(async move {
        let _ = client
            .exec(&lease, job, |_, _| {}, std::future::pending())
            .await;
    });
    let mut reason = String::new();
    poll("the lease failed", Duration::from_secs(120), async || {
        let v = b.h.client.get_lease(&l.id).await.unwrap();
        reason = v.end_reason.unwrap_or_default();
        v.state == "failed"
    })
    .await;
    exec.abort();
    eprintln!("lease {} ended: {reason}", l.id);
    assert!(
        reason.contains(&l.agent) && reason.contains("OOMKilled"),
        "lease {} ended: {reason}",
        l.id
    );
    poll(
        "a replacement agent idle",
        Duration::from_secs(120),
        async || {
            b.h.pool("oom").idle >= 1
                && b.pods()
                    .get_opt(&l.agent)
                    .await
                    .unwrap()
                    .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
        },
    )
    .await;
    assert!(
        b.warning_event("PodFailed", "oom", &[&l.agent, "OOMKilled"])
            .await
    );
    assert_eq!(b.h.pool("oom").provision_failures_total, 0);
    b.finish().await;
}

#[tokio::test]
async fn a_pool_whose_image_does_not_exist_is_degraded_on_a_real_node() {
    let Some(b) = Bench::start("noimage").await else {
        return;
    };
    let missing = "warmpool-agent:node-faults-missing";
    b.create_pool(
        "noimage",
        missing,
        json!(["/usr/local/bin/warmpool", "agent"]),
        json!({}),
        json!({"minIdle": 1, "maxTotal": 2}),
    )
    .await;
    let took = poll(
        "Degraded naming the image",
        Duration::from_secs(60),
        async || {
            degraded(
                &b.status("noimage").await,
                "AgentsFailing",
                &[missing, "ErrImageNeverPull"],
            )
        },
    )
    .await;
    eprintln!("AgentPool created -> Degraded naming the missing image: {took:?}");
    // Deleted and replaced with backoff; the pool's pods never exceed maxTotal, being deleted
    // or not.
    let created = b.observe(Duration::from_secs(30), 2).await;
    eprintln!("pods created in 30 s by a pool whose image is missing: {created}");
    assert!(created <= 7, "{created} pods created in 30 s");
    let st = b.status("noimage").await;
    assert!(
        degraded(&st, "AgentsFailing", &[missing]),
        "{:?}",
        st.conditions
    );
    assert!(
        b.warning_event(
            "ProvisioningFailed",
            "noimage",
            &["ErrImageNeverPull", missing]
        )
        .await
    );
    b.finish().await;
}
