//! Events on AgentPools (`events.k8s.io/v1`, listed through the API) and `spec.template`
//! validation, against a real kube-apiserver v1.20 with the process kubelet
//! (tests/support/kubelet.rs, the only simulated part):
//! - every leak is counted: the `AgentLeaked` series (`series.count`, 1 without a series) sums to
//!   the pool's leaks, in one Event object, however fast the agents leak, written at most once
//!   per 10 s;
//! - a pool reaching Ready, a scale change (scale subresource), a template roll and Ready lost
//!   are each an Event (`Ready`, `Scaled`, `TemplateChanged`, `NotReady`);
//! - an invalid spec is a Warning `InvalidSpec` Event once per generation, not once per
//!   reconcile;
//! - a pod template the CRD schema can judge (a container without image, a CPU limit that is no
//!   quantity) is refused at apply; one only the apiserver's pod validation can judge is found
//!   by a server-side dry run: Degraded/InvalidSpec naming the field, the Event, and no pod.
//! - a used pod whose agent was told to exit and that Succeeded is no `PodFailed` Warning.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
mod support;

use cluster::*;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::*;

/// The Events on AgentPool `pool` with `reason`.
async fn events(client: &kube::Client, pool: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pool)
        })
        .collect()
}

/// How many occurrences an Event stands for: its series count, or 1.
fn occurrences(e: &Event) -> i32 {
    e.series.as_ref().map_or(1, |s| s.count)
}

/// True when AgentPool `pool` has an Event `reason` of `type_` whose note holds `text`.
async fn has_event(
    client: &kube::Client,
    pool: &str,
    reason: &str,
    type_: &str,
    text: &str,
) -> bool {
    events(client, pool, reason).await.iter().any(|e| {
        e.type_.as_deref() == Some(type_) && e.note.as_deref().is_some_and(|n| n.contains(text))
    })
}

fn leaks(c: &Cluster, pool: &str) -> u64 {
    let m = c.h.server.svc.render_metrics();
    metric(&m, &format!("warmpool_leaks_total{{pool=\"{pool}\"}}")).unwrap_or(0.0) as u64
}

#[tokio::test]
async fn every_leak_is_counted_in_the_agent_leaked_series() {
    let c = cluster().await;
    // Every write of the AgentLeaked Event (its create and each patch), seen by a watch.
    let writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let api: Api<Event> = Api::namespaced(c.client.clone(), "default");
    let mut stream = Box::pin(
        api.watch(&kube::api::WatchParams::default(), "0")
            .await
            .unwrap(),
    );
    let counter = writes.clone();
    let watch = tokio::spawn(async move {
        use futures_util::StreamExt;
        use kube::api::WatchEvent;
        while let Some(Ok(ev)) = stream.next().await {
            if let WatchEvent::Added(e) | WatchEvent::Modified(e) = ev
                && e.reason.as_deref() == Some("AgentLeaked")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("leaky")
            {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let started = std::time::Instant::now();
    c.pools()
        .create(
            &PostParams::default(),
            &agent_pool(
                "leaky",
                json!(["sleep", "600"]),
                json!({"minIdle": 3, "maxTotal": 3, "connectTimeout": "1s"}),
            ),
        )
        .await
        .unwrap();
    c.until("6 leaks", async |c: &Cluster| leaks(c, "leaky") >= 6)
        .await;
    // Stop the leaking: no pods wanted any more.
    c.pools()
        .patch_scale(
            "leaky",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    c.until(
        "the AgentLeaked series sums to the leaks counted",
        async |c: &Cluster| {
            let n = leaks(c, "leaky");
            let evs = events(&c.client, "leaky", "AgentLeaked").await;
            let sum: i32 = evs.iter().map(occurrences).sum();
            sum as u64 == n && c.status("leaky").await.leaks_total == n
        },
    )
    .await;
    let evs = events(&c.client, "leaky", "AgentLeaked").await;
    assert_eq!(
        evs.len(),
        1,
        "repeats fold into one Event's series: {evs:?}"
    );
    let e = &evs[0];
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    let series = e.series.as_ref().expect("a series");
    assert!(series.count >= 6, "{series:?}");
    assert!(
        e.note.as_deref().is_some_and(|n| n.contains("leaky-")),
        "the note names the first leaked pod: {e:?}"
    );
    // A leak storm costs the apiserver one write per 10 s per series (docs/KUBERNETES.md,
    // Events): the create, then at most one patch per 10 s begun.
    watch.abort();
    let writes = writes.load(std::sync::atomic::Ordering::Relaxed);
    let cap = 1 + started.elapsed().as_secs() as usize / 10 + 1;
    assert!(
        writes <= cap && (writes as i32) < series.count,
        "{writes} writes of the AgentLeaked Event for {} leaks in {:?} (at most {cap})",
        series.count,
        started.elapsed()
    );
}

#[tokio::test]
async fn ready_scale_template_roll_and_ready_lost_are_events() {
    let c = cluster().await;
    c.create_pool("ev", json!({"minIdle": 1, "maxTotal": 4}))
        .await;
    c.until("Normal Ready event", async |c: &Cluster| {
        has_event(&c.client, "ev", "Ready", "Normal", "1 of 1 idle").await
    })
    .await;
    // `kubectl scale agentpool ev --replicas=2` (an HPA writes the same subresource).
    c.pools()
        .patch_scale(
            "ev",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    c.until("Normal Scaled event 1 -> 2", async |c: &Cluster| {
        has_event(&c.client, "ev", "Scaled", "Normal", "minIdle 1 -> 2").await
    })
    .await;
    c.h.wait_idle("ev", 2).await;
    // A new template whose agents never register: the idle agents roll.
    c.pools()
        .patch(
            "ev",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [
                {"name": "agent", "image": "warmpool:dev", "command": ["sleep", "600"]}
            ]}}}})),
        )
        .await
        .unwrap();
    c.until("Normal TemplateChanged event", async |c: &Cluster| {
        has_event(&c.client, "ev", "TemplateChanged", "Normal", "rolling").await
    })
    .await;
    // Rolling is replacement first: the old agents stay idle while the new ones never
    // register. One more wanted idle: Ready is lost.
    c.pools()
        .patch_scale(
            "ev",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    // Not Degraded yet (the new agents are within connectTimeout): a refill, Normal.
    c.until("Normal NotReady event", async |c: &Cluster| {
        has_event(&c.client, "ev", "NotReady", "Normal", "BelowMinIdle").await
    })
    .await;
}

#[tokio::test]
async fn an_invalid_spec_is_one_event_per_generation() {
    let c = cluster().await;
    c.create_pool("bad", json!({"minIdle": 5, "maxTotal": 2}))
        .await;
    c.until("Warning InvalidSpec event", async |c: &Cluster| {
        has_event(
            &c.client,
            "bad",
            "InvalidSpec",
            "Warning",
            "spec.minIdle: 5 is above maxTotal 2",
        )
        .await
    })
    .await;
    // Another reconcile of the same generation (a finalizer added by someone else).
    let reconciles = |c: &Cluster| {
        let m = c.h.server.svc.render_metrics();
        metric(&m, "warmpool_agentpool_reconciles_total{pool=\"bad\"}").unwrap_or(0.0)
    };
    let before = reconciles(&c);
    c.pools()
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["example.com/keep"]}})),
        )
        .await
        .unwrap();
    c.until("another reconcile", async |c: &Cluster| {
        reconciles(c) > before
    })
    .await;
    let evs = events(&c.client, "bad", "InvalidSpec").await;
    let total: i32 = evs.iter().map(occurrences).sum();
    assert_eq!(total, 1, "one InvalidSpec per generation: {evs:?}");
    // A new invalid generation is told again.
    c.pools()
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"minIdle": 6}})),
        )
        .await
        .unwrap();
    c.until("InvalidSpec for the new generation", async |c: &Cluster| {
        has_event(
            &c.client,
            "bad",
            "InvalidSpec",
            "Warning",
            "spec.minIdle: 6 is above maxTotal 2",
        )
        .await
    })
    .await;
    c.pools()
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_template_the_schema_can_judge_is_refused_at_apply() {
    let (_api, client) = apiserver().await;
    for (name, container, field) in [
        (
            "noimage",
            json!({"name": "agent"}),
            "spec.template.spec.containers.image: Required value",
        ),
        (
            "banana",
            json!({"name": "agent", "image": "warmpool:dev",
                   "resources": {"limits": {"cpu": "banana"}}}),
            r#"spec.template.spec.containers.resources.limits.cpu: Invalid value: "banana""#,
        ),
    ] {
        let ap = agent_pool_with(
            name,
            json!({"labels": ["linux"], "template": {"spec": {"containers": [container]}}}),
            json!({}),
        );
        let err = pools(&client)
            .create(&PostParams::default(), &ap)
            .await
            .expect_err(&format!("{name}: the apiserver must refuse the template"));
        let kube::Error::Api(s) = &err else {
            panic!("{name}: {err}");
        };
        assert_eq!(s.code, 422, "{name}: {s:?}");
        assert!(s.message.contains(field), "{name}: names {field}: {s:?}");
    }
    // An external pool has no template: still accepted.
    let ext = agent_pool_with(
        "ext",
        json!({"labels": ["linux"], "external": true}),
        json!({}),
    );
    pools(&client)
        .create(&PostParams::default(), &ext)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_template_the_pod_validation_refuses_is_invalid_spec_and_creates_no_pod() {
    let c = cluster().await;
    // An upper-case container name: only the apiserver's pod validation says no.
    c.pools()
        .create(
            &PostParams::default(),
            &agent_pool_with(
                "upper",
                json!({"labels": ["linux"], "minIdle": 1, "maxTotal": 2,
                "template": {"spec": {"containers": [
                    {"name": "Agent", "image": "warmpool:dev", "command": agent_cmd()}
                ]}}}),
                json!({}),
            ),
        )
        .await
        .unwrap();
    c.until(
        "Degraded/InvalidSpec naming the field",
        async |c: &Cluster| {
            c.has_condition(
                "upper",
                "Degraded",
                "True",
                "InvalidSpec",
                "spec.containers[0].name",
            )
            .await
        },
    )
    .await;
    c.until(
        "Warning InvalidSpec event naming the field",
        async |c: &Cluster| {
            has_event(
                &c.client,
                "upper",
                "InvalidSpec",
                "Warning",
                "spec.containers[0].name",
            )
            .await
        },
    )
    .await;
    assert!(
        c.pod_names("upper").await.is_empty(),
        "no pod for a rejected template"
    );
    let st = c.status("upper").await;
    let degraded = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert!(
        degraded.message.contains(
            r#"spec.template: the apiserver refuses a pod built from it (server-side dry run): Pod "upper-dry-run-"#
        ) && degraded.message.contains(r#"spec.containers[0].name: Invalid value: "Agent""#),
        "{degraded:?}"
    );
    let m = c.h.server.svc.render_metrics();
    assert!(
        !m.lines().any(
            |l| l.starts_with("warmpool_provisions_total{pool=\"upper\"") && !l.ends_with(" 0")
        ),
        "nothing provisioned for a rejected template:\n{m}"
    );
    // Fixed: pods come.
    c.pools()
        .patch(
            "upper",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [
                {"name": "agent", "image": "warmpool:dev", "command": agent_cmd()}
            ]}}}})),
        )
        .await
        .unwrap();
    c.h.wait_idle("upper", 1).await;
    c.until("Degraded cleared", async |c: &Cluster| {
        c.has_condition("upper", "Degraded", "False", "", "").await
    })
    .await;
}

/// A used pod (maxUses reached) whose agent was told to exit ends `Succeeded`, as designed:
/// that is the normal recycle, not a `PodFailed` Warning.
#[tokio::test]
async fn a_retired_pod_that_succeeds_is_no_pod_failed_warning() {
    let c = cluster().await;
    c.create_pool("used", json!({"minIdle": 1, "maxTotal": 2, "maxUses": 1}))
        .await;
    c.h.wait_idle("used", 1).await;
    let l = c.h.lease("used", 10.0, 60.0).await;
    c.h.client.release(&l.id).await.unwrap();
    let used = l.agent.clone();
    // The watch sees it Succeeded, records what it records, then deletes it.
    c.until("the used pod Succeeded and deleted", async |c: &Cluster| {
        !c.pod_names("used").await.contains(&used)
    })
    .await;
    c.h.wait_idle("used", 1).await;
    let failed = events(&c.client, "used", "PodFailed").await;
    assert!(
        failed.is_empty(),
        "a retired pod that Succeeded: {failed:?}"
    );
}
