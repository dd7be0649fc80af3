//! End to end through a real kube-apiserver: `warmpool serve --backend kubernetes` keeps agent
//! pods for `AgentPool`s; the process kubelet (tests/support/kubelet.rs, the only simulated
//! part) runs each pod's agent as a local process that dials the hub for real.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
mod support;

use std::time::Duration;

use cluster::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kubelet::ProcessKubelet;
use serde_json::json;
use support::*;
use warmpool::k8s::crd::AgentPool;
use warmpool::server::BackendChoice;

#[tokio::test]
async fn pool_reaches_min_idle_runs_a_job_and_replaces_the_pod_per_max_uses() {
    let c = cluster().await;
    c.pools()
        .create(
            &PostParams::default(),
            &agent_pool(
                "go",
                agent_cmd(),
                json!({"minIdle": 2, "maxTotal": 3, "maxUses": 1,
                // The pool's configured variables: its jobs get them too.
                "template": {"spec": {"containers": [{
                    "name": "agent", "image": "warmpool:dev", "command": agent_cmd(),
                    "env": [{"name": "CI_CACHE", "value": "/cache"}]
                }]}}}),
            ),
        )
        .await
        .unwrap();
    c.h.wait_idle("go", 2).await;
    c.until(
        "Ready condition and counts in the AgentPool status",
        async |c: &Cluster| {
            c.status("go").await.idle == 2 && c.has_condition("go", "Ready", "True", "", "").await
        },
    )
    .await;
    let pods = c.pod_names("go").await;
    assert_eq!(pods.len(), 2);
    // Pods carry what is needed to rebuild state, and are owned by their AgentPool.
    let pod = c.pods().get(&pods[0]).await.unwrap();
    let labels = pod.metadata.labels.clone().unwrap();
    assert_eq!(labels["warmpool.dev/pool"], "go");
    assert_eq!(labels["warmpool.dev/agent"], pods[0]);
    assert!(labels.contains_key("warmpool.dev/template-hash"));
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("AgentPool", "go")
    );
    let env: Vec<String> = pod.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    for want in ["WARMPOOL_HUB", "WARMPOOL_AGENT_ID", "WARMPOOL_TOKEN"] {
        assert!(env.contains(&want.to_string()), "{want} injected");
    }

    // A lease runs a job on a pod's agent; with maxUses 1 its pod is replaced afterwards.
    let l = c.h.lease("go", 10.0, 60.0).await;
    assert!(pods.contains(&l.agent));
    let out = exec(
        &c.h,
        &l.id,
        script("echo from-pod $CI_CACHE; env | grep -c '^WARMPOOL_TOKEN' || true"),
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from-pod /cache\n0\n",
        "the template's env reaches the job, the agent's token does not"
    );
    c.h.client.release(&l.id).await.unwrap();
    let used = l.agent.clone();
    c.until("used pod deleted and replaced", async |c: &Cluster| {
        let now = c.pod_names("go").await;
        !now.contains(&used) && now.len() == 2
    })
    .await;
    c.h.wait_idle("go", 2).await;
    drop(c.api);
}

/// A used agent is told to exit instead of having its pod deleted (docs/KUBERNETES.md, "Pods"):
/// a pod that ends by itself is reported and deleted by the watch; one whose container outlives
/// its agent (here the container's shell goes on sleeping) is deleted once the exit grace
/// (`EXIT_GRACE`, 10 s) has passed, not before.
#[tokio::test]
async fn a_pod_whose_container_outlives_its_retired_agent_is_deleted_after_the_exit_grace() {
    let c = cluster().await;
    let cmd = json!(["/bin/sh", "-c", format!("{EXE} agent; exec sleep 600")]);
    c.pools()
        .create(
            &PostParams::default(),
            &agent_pool(
                "outlive",
                cmd,
                // No idle agent is left behind: the process kubelet kills a pod's process, not
                // its group, so an agent below a killed shell would outlive the test.
                json!({"minIdle": 0, "maxTotal": 1, "maxUses": 1}),
            ),
        )
        .await
        .unwrap();
    c.until("pool outlive applied", async |c: &Cluster| {
        c.h.server.svc.pools().iter().any(|p| p.name == "outlive")
    })
    .await;
    let l = c.h.lease("outlive", 30.0, 60.0).await;
    c.h.client.release(&l.id).await.unwrap();
    let released = std::time::Instant::now();
    let used = l.agent.clone();
    c.until("the used pod deleted", async |c: &Cluster| {
        match c.pods().get_opt(&used).await.unwrap() {
            None => true,
            Some(p) => p.metadata.deletion_timestamp.is_some(),
        }
    })
    .await;
    let after = released.elapsed();
    assert!(
        after >= warmpool::backend::kubernetes::EXIT_GRACE - Duration::from_secs(2),
        "pod {used} deleted {after:?} after its release: before the exit grace"
    );
    c.until("the used pod gone", async |c: &Cluster| {
        c.pods().get_opt(&used).await.unwrap().is_none()
    })
    .await;
    drop(c.api);
}

#[tokio::test]
async fn pod_that_never_connects_is_deleted_and_counted_as_a_leak() {
    let c = cluster().await;
    c.pools()
        .create(
            &PostParams::default(),
            &agent_pool(
                "stuck",
                json!(["sleep", "600"]),
                json!({"minIdle": 1, "maxTotal": 1, "connectTimeout": "1s"}),
            ),
        )
        .await
        .unwrap();
    c.until("a pod", async |c: &Cluster| {
        !c.pod_names("stuck").await.is_empty()
    })
    .await;
    let first = c.pod_names("stuck").await[0].clone();
    c.until(
        "leak counted in the AgentPool status",
        async |c: &Cluster| c.status("stuck").await.leaks_total >= 1,
    )
    .await;
    c.until("leaked pod deleted", async |c: &Cluster| {
        !c.pod_names("stuck").await.contains(&first)
    })
    .await;
    c.until(
        "Degraded/AgentsFailing naming the pod",
        async |c: &Cluster| {
            c.has_condition("stuck", "Degraded", "True", "AgentsFailing", "stuck-")
                .await
        },
    )
    .await;
    let m = c.h.server.svc.render_metrics();
    assert!(metric(&m, "warmpool_leaks_total{pool=\"stuck\"}").unwrap() >= 1.0);
    // A Warning Event on the AgentPool names the leaked pod; repeats are folded, not spammed.
    c.until("AgentLeaked event on the AgentPool", async |c: &Cluster| {
        warning_event(&c.client, "AgentLeaked", "stuck", &["stuck-"]).await
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(c.client.clone(), "default");
    let leaked = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("AgentLeaked"))
        .count();
    assert_eq!(leaked, 1, "repeats fold into one Event's series");
}

#[tokio::test]
async fn deleting_the_agentpool_removes_its_pods_and_scale_drives_min_idle() {
    let c = cluster().await;
    c.create_pool("py", json!({"minIdle": 1, "maxTotal": 4}))
        .await;
    c.h.wait_idle("py", 1).await;
    // `kubectl scale agentpool py --replicas=3`
    c.pools()
        .patch_scale(
            "py",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    c.h.wait_idle("py", 3).await;
    assert_eq!(c.pod_names("py").await.len(), 3);
    // No garbage collector runs here: warmpool deletes what it owns.
    c.pools()
        .delete("py", &DeleteParams::default())
        .await
        .unwrap();
    c.until("pods removed", async |c: &Cluster| {
        c.pod_names("py").await.is_empty()
    })
    .await;
    c.until("pool forgotten", async |c: &Cluster| {
        c.h.server.svc.pools().iter().all(|p| p.name != "py")
    })
    .await;
}

#[tokio::test]
async fn invalid_spec_is_reported_as_degraded_and_never_applied() {
    let c = cluster().await;
    // maxTotal >= minIdle cannot be expressed in a 1.20 schema: checked at reconcile.
    c.create_pool("bad", json!({"minIdle": 3, "maxTotal": 1}))
        .await;
    c.until(
        "Degraded/InvalidSpec naming the field",
        async |c: &Cluster| {
            c.has_condition(
                "bad",
                "Degraded",
                "True",
                "InvalidSpec",
                "spec.minIdle: 3 is above maxTotal 1",
            )
            .await
        },
    )
    .await;
    assert!(
        c.pod_names("bad").await.is_empty(),
        "an invalid pool starts no pod"
    );
    assert!(c.h.server.svc.pools().iter().all(|p| p.name != "bad"));
    // Fixing the spec applies it.
    c.pools()
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"maxTotal": 3}})),
        )
        .await
        .unwrap();
    c.h.wait_idle("bad", 3).await;
    c.until("Degraded cleared", async |c: &Cluster| {
        c.has_condition("bad", "Degraded", "False", "", "").await
    })
    .await;
}

#[tokio::test]
async fn template_change_rolls_idle_pods_replacement_first() {
    let c = cluster().await;
    c.create_pool("roll", json!({"minIdle": 2, "maxTotal": 4}))
        .await;
    c.h.wait_idle("roll", 2).await;
    let before = c.pod_names("roll").await;
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "agent", "image": "warmpool:dev", "command": agent_cmd(), "env": [{"name": "ROLLED", "value": "1"}]}
    ]}}}});
    c.pools()
        .patch("roll", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    // Until every old pod is gone, the warm count never dips below minIdle.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = c.pod_names("roll").await;
        if before.iter().all(|p| !now.contains(p)) && c.h.pool("roll").idle >= 2 {
            break;
        }
        assert!(
            c.h.pool("roll").idle >= 2,
            "warm count dipped during the roll"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "pods never rolled: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c.h.recycles("rolled") >= 2);
    let pod = c.pods().get(&c.pod_names("roll").await[0]).await.unwrap();
    let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
    assert!(
        env.iter().any(|e| e.name == "ROLLED"),
        "new pods use the new template"
    );
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_the_standby_takes_over() {
    let c = cluster().await;
    // The cluster() instance runs without election; stop it so only the two replicas act.
    let Cluster {
        api,
        client,
        _kubelet,
        h,
    } = c;
    h.server.shutdown().await;
    let replicas: Replicas = Default::default();
    let service = service_proxy(replicas.clone()).await;
    let hub = format!("ws://{service}/v1/agents/connect");
    let (mut ca, mut cb) = (
        replica(
            &client,
            "replica-a",
            Duration::from_secs(3),
            Duration::from_secs(2),
        ),
        replica(
            &client,
            "replica-b",
            Duration::from_secs(3),
            Duration::from_secs(2),
        ),
    );
    ca.hub_url = Some(hub.clone());
    cb.hub_url = Some(hub);
    let a = start_with(ca).await;
    let b = start_with(cb).await;
    for h in [&a, &b] {
        replicas
            .lock()
            .unwrap()
            .push((h.server.addr, h.server.svc.clone()));
    }
    let ready = |h: &Harness| h.server.svc.is_ready();
    wait_until("one leader", Duration::from_secs(10), || {
        ready(&a) ^ ready(&b)
    })
    .await;
    let (leader, standby, leader_id) = if ready(&a) {
        (a, b, "replica-a")
    } else {
        (b, a, "replica-b")
    };
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "default");
    let lease = leases.get("warmpool-leader").await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(leader_id)
    );
    // Only the leader provisions; the standby is not ready and starts nothing.
    let pools: Api<AgentPool> = Api::namespaced(client.clone(), "default");
    pools
        .create(
            &PostParams::default(),
            &agent_pool("ha", agent_cmd(), json!({"minIdle": 1, "maxTotal": 2})),
        )
        .await
        .unwrap();
    leader.wait_idle("ha", 1).await;
    assert!(
        standby.server.svc.pools().is_empty(),
        "the standby runs no watcher"
    );
    let r = reqwest::get(standby.url("/readyz")).await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    // A lease asked of the standby gets a retryable 503, not "unsatisfiable".
    let (status, code, _) = lease_error(&standby, "ha", 0.0).await;
    assert_eq!((status, code.as_str()), (503, "not_ready"));
    // The leader stops (releasing its lease): the standby takes over, adopts the pod (its agent
    // reconnects through the Service) and serves the pool without creating another.
    let pods_before = names(&pods_of(&client, "ha").await);
    leader.server.shutdown().await;
    wait_until("standby leads", Duration::from_secs(10), || {
        standby.server.svc.is_ready()
    })
    .await;
    standby.wait_idle("ha", 1).await;
    assert_eq!(
        names(&pods_of(&client, "ha").await),
        pods_before,
        "the pod was adopted, not replaced"
    );
    let lease = leases.get("warmpool-leader").await.unwrap();
    assert_ne!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(leader_id)
    );
    drop(api);
}

#[tokio::test]
async fn a_restart_adopts_pods_and_keeps_a_running_lease() {
    let c = cluster().await;
    c.pools()
        .create(
            &PostParams::default(),
            &agent_pool(
                "keep",
                agent_cmd(),
                json!({"minIdle": 2, "maxTotal": 3, "maxUses": 0}),
            ),
        )
        .await
        .unwrap();
    c.h.wait_idle("keep", 2).await;
    let l = c.h.lease("keep", 10.0, 120.0).await;
    let out = exec(&c.h, &l.id, script("echo before")).await;
    assert_eq!(out.stdout, b"before\n");
    c.until("three pods (one leased, two idle)", async |c: &Cluster| {
        c.pod_names("keep").await.len() == 3
    })
    .await;
    let before = c.pod_names("keep").await;

    // Restart: the old instance goes away (pods stay), a new one starts with the same key.
    let Cluster {
        api,
        client,
        _kubelet,
        h,
    } = c;
    let addr = h.server.addr;
    h.server.shutdown().await;
    let h2 = start_at(kube_config(&client), addr).await;
    let c = Cluster {
        api,
        client,
        _kubelet,
        h: h2,
    };

    // The lease is restored from the agent's hello, on the same agent, and usable.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Never more pods than maxTotal, and none of the old ones deleted.
        let now = c.pod_names("keep").await;
        assert!(now.len() <= 3, "maxTotal exceeded after restart: {now:?}");
        assert_eq!(now, before, "a restart must not delete or add pods");
        if let Ok(v) = c.h.client.get_lease(&l.id).await {
            assert_eq!(v.agent, l.agent);
            assert_eq!(v.state, "active");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "lease never restored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.h.wait_idle("keep", 2).await;
    assert_eq!(c.pod_names("keep").await, before);
    let out = exec(&c.h, &l.id, script("echo after")).await;
    assert_eq!(out.stdout, b"after\n");
    c.h.client.renew(&l.id).await.unwrap();
    c.h.client.release(&l.id).await.unwrap();
}

#[tokio::test]
async fn unschedulable_pods_are_kept_and_reported_not_recreated() {
    let c = cluster().await;
    let mut ap = agent_pool(
        "nowhere",
        agent_cmd(),
        json!({"minIdle": 1, "maxTotal": 1, "connectTimeout": "1s"}),
    );
    ap.spec.template.spec.as_mut().unwrap().node_selector =
        Some([("disk".to_string(), "ssd".to_string())].into());
    c.pools().create(&PostParams::default(), &ap).await.unwrap();
    c.until(
        "Degraded/Unschedulable naming the pod",
        async |c: &Cluster| {
            c.has_condition("nowhere", "Degraded", "True", "Unschedulable", "nowhere-")
                .await
        },
    )
    .await;
    let first = c.pod_names("nowhere").await;
    assert_eq!(first.len(), 1);
    // Well past connectTimeout: the same pod is kept, nothing deleted or recreated.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(c.pod_names("nowhere").await, first);
    assert_eq!(c.h.recycles("provision-timeout"), 0);
    assert_eq!(c.h.pool("nowhere").leaks_total, 0);
}

#[path = "support/faults.rs"]
mod faults;

#[tokio::test]
async fn api_faults_never_push_pods_above_max_total() {
    let (api, admin) = apiserver().await;
    let _kubelet = ProcessKubelet::start(admin.clone(), "default", Duration::from_millis(50));
    let plan = faults::FaultPlan {
        create_429_every: 4,
        create_500_every: 3,
        status_409_every: 3,
        slow_every: 7,
        delay: Duration::from_millis(300),
        cut_watch_after: Duration::from_secs(2),
    };
    let (url, counts) = faults::start(admin.clone(), plan).await;
    // warmpool talks to the apiserver only through the proxy.
    let kc = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: faulty\n  cluster:\n    server: {url}\nusers:\n- name: u\n  user:\n    token: unused\ncontexts:\n- name: faulty\n  context:\n    cluster: faulty\n    user: u\n    namespace: default\ncurrent-context: faulty\n"
    );
    let kc = kube::config::Kubeconfig::from_yaml(&kc).unwrap();
    let faulty = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let h = start_with(kube_config(&faulty)).await;
    let pools: Api<AgentPool> = Api::namespaced(admin.clone(), "default");
    pools
        .create(
            &PostParams::default(),
            &agent_pool(
                "churn",
                agent_cmd(),
                json!({"minIdle": 3, "maxTotal": 3, "maxUses": 1}),
            ),
        )
        .await
        .unwrap();
    // Sample the pods of the pool that may still run (docs/KUBERNETES.md, Sizing: any phase but
    // Succeeded and Failed, terminating ones included), straight from the apiserver.
    let max_seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let (admin, max_seen) = (admin.clone(), max_seen.clone());
        tokio::spawn(async move {
            let pods: Api<Pod> = Api::namespaced(admin, "default");
            let lp = ListParams::default().labels("warmpool.dev/pool=churn");
            loop {
                if let Ok(list) = pods.list(&lp).await {
                    let may_run = list.items.iter().filter(|p| may_run(p)).count();
                    max_seen.fetch_max(may_run, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    h.wait_idle("churn", 1).await;
    // Churn: every lease uses up its pod (maxUses 1), so pods are deleted and created all along.
    for _ in 0..8 {
        let l = h.lease("churn", 30.0, 60.0).await;
        let out = exec(&h, &l.id, script("true")).await;
        assert_eq!(out.status.code, Some(0));
        h.client.release(&l.id).await.unwrap();
    }
    h.wait_idle("churn", 3).await;
    sampler.abort();
    let max = max_seen.load(std::sync::atomic::Ordering::Relaxed);
    assert!(max <= 3, "{max} pods seen for maxTotal 3");
    assert!(
        counts.injected.load(std::sync::atomic::Ordering::Relaxed) >= 3,
        "faults were injected"
    );
    assert!(
        counts
            .cut_watches
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1,
        "watches were cut"
    );
    drop(api);
}

#[tokio::test]
async fn all_namespaces_serves_same_named_pools_apart() {
    let (_api, admin) = apiserver().await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    for ns in ["team-a", "team-b"] {
        let obj = serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .unwrap();
        namespaces
            .create(&PostParams::default(), &obj)
            .await
            .unwrap();
    }
    let _ka = ProcessKubelet::start(admin.clone(), "team-a", Duration::from_millis(50));
    let _kb = ProcessKubelet::start(admin.clone(), "team-b", Duration::from_millis(50));
    let mut cfg = kube_config(&admin);
    cfg.backend = BackendChoice::Kubernetes {
        client: admin.clone(),
        namespace: None,
        leader: None,
    };
    let h = start_with(cfg).await;
    for (ns, label) in [("team-a", "a"), ("team-b", "b")] {
        let mut ap = agent_pool(
            "go",
            agent_cmd(),
            json!({"labels": ["linux", label], "minIdle": 1, "maxTotal": 2}),
        );
        ap.metadata.namespace = Some(ns.into());
        Api::<AgentPool>::namespaced(admin.clone(), ns)
            .create(&PostParams::default(), &ap)
            .await
            .unwrap();
    }
    h.wait_idle("team-a.go", 1).await;
    h.wait_idle("team-b.go", 1).await;
    for (ns, label) in [("team-a", "a"), ("team-b", "b")] {
        let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
        let list = pods
            .list(&ListParams::default().labels("warmpool.dev/pool=go"))
            .await
            .unwrap();
        assert_eq!(list.items.len(), 1, "one pod in {ns}");
        let l = h.lease(label, 10.0, 60.0).await;
        assert_eq!(l.pool, format!("{ns}.go"));
        assert_eq!(l.agent, list.items[0].metadata.name.clone().unwrap());
        h.client.release(&l.id).await.unwrap();
        let pools: Api<AgentPool> = Api::namespaced(admin.clone(), ns);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while pools
            .get("go")
            .await
            .unwrap()
            .status
            .unwrap_or_default()
            .idle
            < 1
        {
            assert!(std::time::Instant::now() < deadline, "status in {ns}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
