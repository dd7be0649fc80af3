//! Agents that fail on the Kubernetes backend, through a real kube-apiserver with the simulated
//! kubelet of tests/support/kubelet.rs reporting container states as a real v1.20 kubelet does
//! (checked on the real node; tests/node_faults.rs runs the same cases there):
//! - a container that exits before its agent registers is a failed provision: the pool backs
//!   off instead of replacing pods in a loop, and its status and Events name the exit;
//! - a pod whose image is missing (`ErrImageNeverPull`) makes the pool Degraded naming the image,
//!   is deleted and replaced with backoff, and the condition clears once an agent registers;
//! - an agent OOM-killed during a job ends its lease with a reason naming the pod and
//!   `OOMKilled`, and a replacement pod comes.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster::*;
use futures_util::StreamExt;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kubelet::{KubeletOptions, ProcessKubelet};
use serde_json::json;
use support::*;

/// An image the simulated kubelet does not have.
const MISSING: &str = "warmpool:missing";

async fn bench() -> (kube_api::KubeApi, kube::Client, ProcessKubelet, Harness) {
    let (api, client) = apiserver().await;
    let kubelet = ProcessKubelet::start_with(
        client.clone(),
        "default",
        KubeletOptions {
            start_delay: Duration::from_millis(50),
            missing_images: vec![MISSING.into()],
            ..Default::default()
        },
    );
    let h = start_with(kube_config(&client)).await;
    (api, client, kubelet, h)
}

/// Records the name of every pod of `pool` ever created (a watch sees each one, however short
/// its life).
fn count_pods(client: &kube::Client, pool: &str) -> Arc<Mutex<BTreeSet<String>>> {
    let seen: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let cfg = watcher::Config::default().labels(&format!("warmpool.dev/pool={pool}"));
    let mut stream = watcher::watcher(pods(client), cfg).boxed();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = ev {
                s.lock()
                    .unwrap()
                    .insert(p.metadata.name.unwrap_or_default());
            }
        }
    });
    seen
}

/// Watches for `window` (an observation period, not a wait for a condition) and returns how
/// many pods were created, checking that no more than `max_live` ever exist at once.
async fn observe(client: &kube::Client, pool: &str, window: Duration, max_live: usize) -> usize {
    let seen = count_pods(client, pool);
    let end = std::time::Instant::now() + window;
    while std::time::Instant::now() < end {
        let live = pods_of(client, pool).await;
        assert!(live.len() <= max_live, "pods pile up: {:?}", names(&live));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen.lock().unwrap().len()
}

#[tokio::test]
async fn a_container_that_exits_before_its_agent_registers_backs_off_and_is_reported() {
    let (_api, client, _kubelet, _h) = bench().await;
    pools(&client)
        .create(
            &PostParams::default(),
            &agent_pool(
                "crash",
                json!(["/bin/sh", "-c", "echo bye >&2; exit 7"]),
                json!({"minIdle": 1, "maxTotal": 3}),
            ),
        )
        .await
        .unwrap();
    // Before the fix every exit was replaced at the provisioning rate (5 per second here).
    // With backoff (pauses of 1, 2, 4 s, halved at most by jitter): at most 5 in 8 s.
    let created = observe(&client, "crash", Duration::from_secs(8), 3).await;
    assert!((2..=6).contains(&created), "{created} pods created in 8 s");
    until("Degraded naming the exit", async || {
        has_condition(
            &client,
            "crash",
            "Degraded",
            "True",
            "AgentsFailing",
            &[
                "exited before it registered",
                "container agent: Error, exit code 7",
                "in a row",
            ],
        )
        .await
    })
    .await;
    until("Events naming a pod and the exit", async || {
        warning_event(
            &client,
            "ProvisioningFailed",
            "crash",
            &["crash-", "exit code 7"],
        )
        .await
            && warning_event(&client, "PodFailed", "crash", &["crash-", "exit code 7"]).await
    })
    .await;
}

#[tokio::test]
async fn a_pod_whose_image_is_missing_degrades_the_pool_and_is_replaced_with_backoff() {
    let (_api, client, _kubelet, h) = bench().await;
    let spec = json!({
        "labels": ["linux", "noimage"], "minIdle": 1, "maxTotal": 2,
        "template": {"spec": {"containers": [{
            "name": "agent", "image": MISSING, "imagePullPolicy": "Never", "command": agent_cmd()
        }]}}
    });
    pools(&client)
        .create(
            &PostParams::default(),
            &agent_pool_with("noimage", spec, json!({})),
        )
        .await
        .unwrap();
    until("Degraded naming the image and the reason", async || {
        has_condition(
            &client,
            "noimage",
            "Degraded",
            "True",
            "AgentsFailing",
            &[
                &format!("image {MISSING:?}"),
                "ErrImageNeverPull",
                "is not present",
            ],
        )
        .await
    })
    .await;
    // Deleted and replaced, paced by the backoff: no pile-up, no hot loop.
    let created = observe(&client, "noimage", Duration::from_secs(8), 2).await;
    assert!((1..=6).contains(&created), "{created} pods created in 8 s");
    assert!(
        warning_event(
            &client,
            "ProvisioningFailed",
            "noimage",
            &["ErrImageNeverPull"]
        )
        .await
    );

    // The image fixed: an agent registers and the condition clears.
    let patch = json!({"spec": {"template": {"spec": {"containers": [{
        "name": "agent", "image": "warmpool:dev", "imagePullPolicy": "Never", "command": agent_cmd()
    }]}}}});
    pools(&client)
        .patch("noimage", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    h.wait_idle("noimage", 1).await;
    until("Degraded cleared", async || {
        has_condition(&client, "noimage", "Degraded", "False", "Healthy", &[]).await
    })
    .await;
}

#[tokio::test]
async fn an_agent_oom_killed_during_a_job_ends_its_lease_naming_it_and_is_replaced() {
    let (_api, client, kubelet, h) = bench().await;
    pools(&client)
        .create(
            &PostParams::default(),
            &agent_pool("oom", agent_cmd(), json!({"minIdle": 1, "maxTotal": 3})),
        )
        .await
        .unwrap();
    h.wait_idle("oom", 1).await;
    let l = h.lease("oom", 30.0, 120.0).await;
    assert!(kubelet.oom_kill(&l.agent), "pod {} runs", l.agent);
    let mut view = None;
    until("the lease failed", async || {
        let v = h.client.get_lease(&l.id).await.unwrap();
        let done = v.state == "failed";
        view = Some(v);
        done
    })
    .await;
    let reason = view.unwrap().end_reason.unwrap_or_default();
    assert!(
        reason.contains(&l.agent) && reason.contains("OOMKilled") && reason.contains("137"),
        "lease {} ended: {reason}",
        l.id
    );
    until("a replacement agent idle", async || {
        let p = h.pool("oom");
        p.idle >= 1 && !pod_names(&client, "oom").await.contains(&l.agent)
    })
    .await;
    until("an Event naming the pod and OOMKilled", async || {
        warning_event(&client, "PodFailed", "oom", &[&l.agent, "OOMKilled"]).await
    })
    .await;
    // It had registered: not a failed provision, no backoff.
    assert_eq!(h.pool("oom").provision_failures_total, 0);
}
