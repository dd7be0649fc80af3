//! The AgentPool controller (src/k8s/agentpool/) against a real kube-apiserver v1.20:
//! - conditions are `metav1.Condition`s: each carries `lastTransitionTime` (and
//!   `observedGeneration`); the time stays when a status rewrite keeps the condition's status
//!   and moves when the status flips; the apiserver accepts the writes;
//! - the status loop writes `total`, `labelExpression` and `selector`; the scale subresource
//!   reads the selector, and it selects the pool's pods;
//! - warmpool's own status writes do not come back as reconciles (predicate on generation):
//!   `warmpool_agentpool_reconciles_total` does not follow `warmpool_agentpool_status_writes_total`;
//! - the finalizer `warmpool.dev/cleanup` is added to every AgentPool;
//! - an AgentPool deleted while warmpool was down is cleaned up when warmpool starts: its pods
//!   go, then the finalizer, then the AgentPool;
//! - a Jenkins AgentPool deleted while warmpool was down: its Jenkins nodes (in the Jenkins
//!   double) are purged; while the controller is unreachable the finalizer stays and the
//!   AgentPool's status and a Warning Event say why; once Jenkins answers, the nodes and the
//!   AgentPool are gone.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/jenkins.rs"]
mod jenkins;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
mod support;

use std::time::Duration;

use cluster::*;
use jenkins::{Fault, JenkinsConfig, JenkinsDouble};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kubelet::ProcessKubelet;
use serde_json::{Value, json};
use support::*;
use warmpool::k8s::crd::AgentPool;

const FINALIZER: &str = "warmpool.dev/cleanup";

/// The AgentPool as the apiserver holds it, whatever warmpool's types make of it.
async fn raw(client: &kube::Client, name: &str) -> Option<Value> {
    let ar = ApiResource::erase::<AgentPool>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    api.get_opt(name)
        .await
        .unwrap()
        .map(|o| serde_json::to_value(o).unwrap())
}

/// Condition `type_` of the raw AgentPool.
async fn raw_condition(client: &kube::Client, name: &str, type_: &str) -> Option<Value> {
    let ap = raw(client, name).await?;
    ap["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

async fn finalizers(client: &kube::Client, name: &str) -> Vec<String> {
    raw(client, name)
        .await
        .and_then(|ap| serde_json::from_value(ap["metadata"]["finalizers"].clone()).ok())
        .unwrap_or_default()
}

/// Sum of a counter over its labels.
fn counter(h: &Harness, name: &str) -> f64 {
    h.server
        .svc
        .metrics
        .registry
        .gather()
        .iter()
        .filter(|mf| mf.name() == name)
        .flat_map(|mf| mf.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum()
}

#[tokio::test]
async fn conditions_keep_last_transition_time_and_status_writes_trigger_no_reconcile() {
    let c = cluster().await;
    c.pools()
        .create(
            &PostParams::default(),
            // One pod a second: Ready stays False for a while after the scale below.
            &agent_pool(
                "lt",
                agent_cmd(),
                json!({"minIdle": 1, "maxTotal": 4, "provisioning": {"perSecond": 1, "burst": 1}}),
            ),
        )
        .await
        .unwrap();
    c.h.wait_idle("lt", 1).await;
    c.until("Ready=True written", async |c: &Cluster| {
        c.has_condition("lt", "Ready", "True", "", "").await
    })
    .await;
    let ap = raw(&c.client, "lt").await.unwrap();
    let generation = ap["metadata"]["generation"].as_i64().unwrap();
    for cond in ap["status"]["conditions"].as_array().unwrap() {
        assert!(
            cond["lastTransitionTime"]
                .as_str()
                .is_some_and(|t| t.len() >= 20),
            "every condition carries lastTransitionTime: {cond}"
        );
        assert_eq!(cond["observedGeneration"], generation, "{cond}");
    }
    assert!(
        finalizers(&c.client, "lt").await.is_empty(),
        "a pool without a `jenkins` block needs no finalizer (its pods are owned by it)"
    );
    let ready_t0 =
        raw_condition(&c.client, "lt", "Ready").await.unwrap()["lastTransitionTime"].clone();
    let degraded_t0 =
        raw_condition(&c.client, "lt", "Degraded").await.unwrap()["lastTransitionTime"].clone();
    // lastTransitionTime has a resolution of one second: let the clock pass the first one.
    let later = std::time::SystemTime::now() + Duration::from_millis(1100);
    until("a second passes", async || {
        std::time::SystemTime::now() > later
    })
    .await;
    let reconciles = counter(&c.h, "warmpool_agentpool_reconciles_total");
    let writes = counter(&c.h, "warmpool_agentpool_status_writes_total");
    // `kubectl scale --replicas=3`: one spec change, then many status rewrites as two pods
    // are created (one a second), start and connect; Ready flips to False and back to True.
    c.pools()
        .patch_scale(
            "lt",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    c.h.wait_idle("lt", 3).await;
    c.until(
        "Ready=True again with a new lastTransitionTime",
        async |c: &Cluster| {
            let r = raw_condition(&c.client, "lt", "Ready").await.unwrap();
            r["status"] == "True" && r["lastTransitionTime"] != ready_t0
        },
    )
    .await;
    c.until("status counts 3 idle", async |c: &Cluster| {
        c.status("lt").await.idle == 3
    })
    .await;
    // What `kubectl get` and the scale subresource read, written by the status loop.
    c.until("status counts 3 in total", async |c: &Cluster| {
        c.status("lt").await.total == 3
    })
    .await;
    let st = c.status("lt").await;
    assert_eq!(st.label_expression, "linux && lt");
    assert_eq!(st.selector, "warmpool.dev/pool=lt");
    let scale = c.pools().get_scale("lt").await.unwrap();
    assert_eq!(
        scale.status.unwrap().selector.as_deref(),
        Some("warmpool.dev/pool=lt"),
        "the scale subresource reads status.selector"
    );
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let selected = pods
        .list(&ListParams::default().labels(&st.selector))
        .await
        .unwrap();
    assert_eq!(
        selected.items.len(),
        3,
        "the selector matches the pool's pods"
    );
    let degraded = raw_condition(&c.client, "lt", "Degraded").await.unwrap();
    assert_eq!(degraded["status"], "False");
    assert_eq!(
        degraded["lastTransitionTime"], degraded_t0,
        "rewrites that keep Degraded=False keep its lastTransitionTime"
    );
    let written = counter(&c.h, "warmpool_agentpool_status_writes_total") - writes;
    let reconciled = counter(&c.h, "warmpool_agentpool_reconciles_total") - reconciles;
    assert!(written >= 3.0, "status was rewritten ({written} writes)");
    assert!(
        reconciled <= 2.0,
        "{written} status writes caused {reconciled} reconciles: only the scale may"
    );
}

/// A pool without a `jenkins` block carries no finalizer: deleted while warmpool is down it
/// goes at once (in a cluster the garbage collector follows its pods' owner references; this
/// apiserver has none), and the next instance deletes the pods whose AgentPool is gone. A
/// finalizer left by an earlier `jenkins` block is removed.
#[tokio::test]
async fn an_agentpool_deleted_while_warmpool_was_down_goes_at_once_and_its_pods_on_start() {
    let c = cluster().await;
    c.create_pool("gone", json!({"minIdle": 2, "maxTotal": 4}))
        .await;
    c.h.wait_idle("gone", 2).await;
    // A finalizer an earlier `jenkins` block left: not this pool's any more.
    let patch = json!({"metadata": {"finalizers": [FINALIZER]}});
    c.pools()
        .patch(
            "gone",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    c.until("the stale finalizer is removed", async |c: &Cluster| {
        finalizers(&c.client, "gone").await.is_empty()
    })
    .await;
    let Cluster {
        api,
        client,
        _kubelet,
        h,
    } = c;
    let addr = h.server.addr;
    h.server.shutdown().await;
    assert_eq!(
        pod_names(&client, "gone").await.len(),
        2,
        "pods outlive warmpool"
    );
    pools(&client)
        .delete("gone", &Default::default())
        .await
        .unwrap();
    until("the AgentPool is gone at once", async || {
        raw(&client, "gone").await.is_none()
    })
    .await;
    let h2 = start_at(kube_config(&client), addr).await;
    until("its pods are gone", async || {
        pods_of(&client, "gone").await.is_empty()
    })
    .await;
    assert!(h2.server.svc.pools().iter().all(|p| p.name != "gone"));
    h2.server.shutdown().await;
    drop(api);
}

#[tokio::test]
async fn a_jenkins_agentpool_deleted_while_down_is_purged_and_waits_for_an_unreachable_jenkins() {
    let (api, client) = apiserver().await;
    let _kubelet = ProcessKubelet::start(client.clone(), "default", Duration::from_millis(50));
    let j = JenkinsDouble::start(JenkinsConfig::default()).await;
    let (user, token) = j.credentials();
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "jenkins-api"},
        "stringData": {"username": user, "token": token}
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let h = start_with(kube_config(&client)).await;
    let spec = json!({
        "minIdle": 2,
        "maxTotal": 4,
        "jenkins": {
            "url": j.url(),
            "credentialsSecret": "jenkins-api",
            "labels": "linux k8s",
            "remoteFS": "/tmp/warmpool-kube-controller",
            "agentCommand": [EXE, "fake-jenkins-agent"],
            "pollInterval": "100ms",
        },
        "template": {"spec": {"containers": [{"name": "jnlp", "image": "jenkins/inbound-agent:latest"}]}}
    });
    pools(&client)
        .create(
            &PostParams::default(),
            &agent_pool_with("ci", spec, json!({})),
        )
        .await
        .unwrap();
    let ci_nodes = |j: &JenkinsDouble| {
        j.nodes()
            .iter()
            .filter(|n| n.name.starts_with("ci-"))
            .count()
    };
    assert!(
        j.wait_for(Duration::from_secs(30), |j| j.online_with_prefix("ci-")
            == 2)
            .await
    );
    until("the finalizer is added", async || {
        finalizers(&client, "ci")
            .await
            .contains(&FINALIZER.to_string())
    })
    .await;
    let addr = h.server.addr;
    h.server.shutdown().await;
    pools(&client)
        .delete("ci", &Default::default())
        .await
        .unwrap();
    // Jenkins is down when warmpool comes back.
    j.set_fault(Fault::status(503));
    let h2 = start_at(kube_config(&client), addr).await;
    until(
        "Degraded/CleanupFailed naming the pool and the controller",
        async || {
            raw_condition(&client, "ci", "Degraded")
                .await
                .is_some_and(|c| {
                    let m = c["message"].as_str().unwrap_or("");
                    c["status"] == "True"
                        && c["reason"] == "CleanupFailed"
                        && m.contains("pool ci")
                        && m.contains(j.url())
                })
        },
    )
    .await;
    until("a CleanupFailed Event", async || {
        warning_event(&client, "CleanupFailed", "ci", &["pool ci"]).await
    })
    .await;
    assert!(
        finalizers(&client, "ci")
            .await
            .contains(&FINALIZER.to_string()),
        "the finalizer stays while cleanup cannot finish"
    );
    assert_eq!(ci_nodes(&j), 2, "nothing deleted while Jenkins is down");
    // Jenkins is back: the retry purges the nodes, stops the agents, and lets the pool go.
    j.clear_fault();
    assert!(
        j.wait_for(Duration::from_secs(30), |j| ci_nodes(j) == 0)
            .await,
        "the pool's nodes are purged"
    );
    until("the AgentPool is gone", async || {
        raw(&client, "ci").await.is_none()
    })
    .await;
    until("its agent pods are gone", async || {
        live_pods(&client, "ci").await.is_empty()
    })
    .await;
    h2.server.shutdown().await;
    drop(api);
}

/// The sizing policy reaches the AgentPool: an open schedule window raises the desired idle
/// count (status `desiredIdle` 2 from `schedule`, with the learned refill time), and a window
/// whose cron cannot be read is Degraded/InvalidSpec naming the field.
#[tokio::test]
async fn the_sizing_policy_is_in_the_agentpool_status_and_a_bad_window_is_invalid() {
    let c = cluster().await;
    c.create_pool(
        "sched",
        json!({"minIdle": 0, "maxTotal": 4, "warmHitTarget": 0.9,
               "schedules": [{"cron": "* * * * *", "duration": "100y", "minIdle": 2}]}),
    )
    .await;
    c.h.wait_idle("sched", 2).await;
    c.until(
        "status: desiredIdle 2 from the schedule",
        async |c: &Cluster| {
            let s = c.status("sched").await;
            s.desired_idle == Some(2)
                && s.desired_idle_source.as_deref() == Some("schedule")
                && s.refill_seconds.is_some_and(|r| r > 0.0)
                && s.warm_hit_ratio.is_none()
        },
    )
    .await;
    c.create_pool(
        "badcron",
        json!({"schedules": [{"cron": "0 25 * * *", "duration": "1h", "minIdle": 1}]}),
    )
    .await;
    c.until(
        "Degraded/InvalidSpec naming the window",
        async |c: &Cluster| {
            c.has_condition(
                "badcron",
                "Degraded",
                "True",
                "InvalidSpec",
                "spec.schedules[0].cron: \"0 25 * * *\" is not a valid cron expression",
            )
            .await
        },
    )
    .await;
}
