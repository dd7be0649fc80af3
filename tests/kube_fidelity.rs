//! Production fidelity on the Kubernetes backend, through a real kube-apiserver:
//! - the hard cap: `maxTotal` caps the pods whose containers may still run (every pod not in a
//!   terminal phase, being deleted or not, Unknown included), checked on pods read straight from
//!   the apiserver during churn, with a process kubelet that deletes gracefully and loses nodes
//!   (tests/support/kubelet.rs, the only simulated part);
//! - a crash takeover: the leader, a real `warmpool serve` process, is SIGKILLed; the standby
//!   takes over and deletes no live agent, and the running lease survives.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::*;
use kube::api::PostParams;
use kubelet::{KubeletOptions, ProcessKubelet};
use serde_json::json;
use support::*;
use warmpool::api::CreateLease;

#[derive(Default)]
struct Samples {
    n: usize,
    unknown: usize,
    deleting_running: usize,
    max: usize,
    violations: Vec<String>,
}

#[tokio::test]
async fn max_total_caps_pods_that_may_run_during_churn_with_graceful_deletion_and_lost_nodes() {
    let (api, client) = apiserver().await;
    let _kubelet = ProcessKubelet::start_with(
        client.clone(),
        "default",
        KubeletOptions {
            start_delay: Duration::from_millis(50),
            graceful: Some(Duration::from_millis(300)),
            lose_every: 3,
            lost_for: Duration::from_millis(1500),
            ..Default::default()
        },
    );
    let h = start_with(kube_config(&client)).await;
    pools(&client)
        .create(
            &PostParams::default(),
            &agent_pool(
                "churn",
                agent_cmd(),
                json!({"minIdle": 2, "maxTotal": 4, "maxUses": 1}),
            ),
        )
        .await
        .unwrap();
    h.wait_idle("churn", 1).await;

    // Sample the pods straight from the apiserver, and the engine's count, all along.
    let samples: Arc<Mutex<Samples>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (client, samples, stop, svc) = (
            client.clone(),
            samples.clone(),
            stop.clone(),
            h.server.svc.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let pods = pods_of(&client, "churn").await;
                let running: Vec<String> = pods
                    .iter()
                    .filter(|p| may_run(p))
                    .map(|p| {
                        let deleting = if p.metadata.deletion_timestamp.is_some() {
                            "/deleting"
                        } else {
                            ""
                        };
                        format!(
                            "{}({}{deleting})",
                            p.metadata.name.clone().unwrap(),
                            phase(p)
                        )
                    })
                    .collect();
                let total = svc
                    .pools()
                    .iter()
                    .find(|p| p.name == "churn")
                    .map(|p| p.total)
                    .unwrap_or(0);
                {
                    let mut s = samples.lock().unwrap();
                    s.n += 1;
                    s.max = s.max.max(running.len());
                    s.unknown += pods.iter().filter(|p| phase(p) == "Unknown").count();
                    s.deleting_running += pods
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_some() && may_run(p))
                        .count();
                    if running.len() > 4 {
                        s.violations
                            .push(format!("{} pods may run: {running:?}", running.len()));
                    }
                    if total > 4 {
                        s.violations.push(format!("engine counts {total}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Churn: 8 clients, 3 leases each; every lease uses up its pod (maxUses 1).
    let failed: Mutex<Vec<String>> = Mutex::default();
    let clients = (0..8).map(|_| async {
        for _ in 0..3 {
            let l = h.lease("churn", 60.0, 60.0).await;
            // Long enough for a pod's node to be lost while it serves.
            let r = h
                .client
                .exec(
                    &l.id,
                    script("sleep 0.4"),
                    |_, _| {},
                    std::future::pending::<()>(),
                )
                .await;
            match r {
                Ok(st) if st.code == Some(0) => {
                    h.client.release(&l.id).await.unwrap();
                }
                other => failed
                    .lock()
                    .unwrap()
                    .push(format!("lease {} on {}: {other:?}", l.id, l.agent)),
            }
        }
    });
    futures_util::future::join_all(clients).await;
    // A used agent exits by itself before its pod is deleted, so the churn leaves no pod being
    // deleted while it may run. A pod deleted by someone else still counts until its
    // container is gone: delete an idle one and sample it.
    let victim = pods_of(&client, "churn")
        .await
        .into_iter()
        .find(|p| phase(p) == "Running" && p.metadata.deletion_timestamp.is_none())
        .and_then(|p| p.metadata.name)
        .expect("a running pod of churn");
    kube::api::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), "default")
        .delete(&victim, &Default::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while samples.lock().unwrap().deleting_running == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    sampler.await.unwrap();
    let s = std::mem::take(&mut *samples.lock().unwrap());
    assert!(
        s.violations.is_empty(),
        "maxTotal 4 exceeded in {} of {} samples: {:?}",
        s.violations.len(),
        s.n,
        &s.violations[..s.violations.len().min(5)]
    );
    // The rule was exercised: lost nodes and graceful deletions were sampled.
    assert!(s.n >= 50, "{} samples", s.n);
    assert!(s.unknown > 0, "no Unknown pod sampled");
    assert!(s.deleting_running > 0, "no pod sampled while being deleted");
    assert!(s.max >= 3, "the churn reached the cap ({} at most)", s.max);
    // A node lost for a moment ends no lease: its pod's agent is still connected.
    let failed = failed.into_inner().unwrap();
    assert!(failed.is_empty(), "leases failed: {failed:?}");

    // Once the churn settles, the AgentPool status, the metrics and the engine count the
    // same pods as the rule does.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pods = pods_of(&client, "churn").await;
        let rule = pods.iter().filter(|p| may_run(p)).count() as u32;
        let st = status(&client, "churn").await;
        let status_total = st.provisioning + st.connecting + st.idle + st.leased + st.terminating;
        let engine_total = h.pool("churn").total;
        let m = h.server.svc.render_metrics();
        let metric_total: f64 = m
            .lines()
            .filter(|l| l.starts_with("warmpool_agents{pool=\"churn\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if rule == engine_total
            && status_total == engine_total
            && metric_total as u32 == engine_total
            && st.idle >= 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counts disagree: rule {rule}, status {status_total}, engine {engine_total}, metrics {metric_total}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(api);
}

/// What a Kubernetes Service for the hub does (manifests/service.yaml, `warmpool-hub`: not-ready
/// addresses published): each connection goes to one of the live replicas in turn, ready or not.
async fn hub_proxy(replicas: Arc<Mutex<Vec<std::net::SocketAddr>>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let targets = replicas.lock().unwrap().clone();
            let first = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                for i in 0..targets.len() {
                    let target = targets[(first + i) % targets.len()];
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Kills the child process (SIGKILL) when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_crash_takeover_deletes_no_live_agent_and_keeps_the_running_lease() {
    let (api, client) = apiserver().await;
    let _kubelet = ProcessKubelet::start(client.clone(), "default", Duration::from_millis(50));
    let replicas: Arc<Mutex<Vec<std::net::SocketAddr>>> = Arc::default();
    let proxy = hub_proxy(replicas.clone()).await;
    let hub = format!("ws://{proxy}/v1/agents/connect");

    // The leader: a real `warmpool serve` process, so that it can be SIGKILLed.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig()).unwrap();
    std::fs::write(dir.path().join("agent-key"), AGENT_KEY).unwrap();
    let leader_addr: std::net::SocketAddr = format!("127.0.0.1:{}", kube_api::free_port())
        .parse()
        .unwrap();
    let log = std::fs::File::create(dir.path().join("leader.log")).unwrap();
    let mut leader = Proc(
        std::process::Command::new(EXE)
            .args(["serve", "--backend", "kubernetes", "--namespace", "default"])
            .args(["--listen", &leader_addr.to_string(), "--hub-url", &hub])
            .arg("--agent-key-file")
            .arg(dir.path().join("agent-key"))
            .args([
                "--leader-lease-duration",
                "12s",
                "--leader-renew-deadline",
                "8s",
            ])
            .args([
                "--leader-retry-period",
                "200ms",
                "--heartbeat-interval",
                "1s",
            ])
            .env("KUBECONFIG", dir.path().join("kubeconfig"))
            .env("WARMPOOL_LOG", "warn,warmpool=info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("warmpool serve starts"),
    );
    let leader_api = warmpool::client::Client::new(&format!("http://{leader_addr}"), None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = reqwest::get(format!("http://{leader_addr}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "the leader never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The standby, in this process.
    let mut cfg = replica(
        &client,
        "standby",
        Duration::from_secs(12),
        Duration::from_secs(8),
    );
    cfg.hub_url = Some(hub.clone());
    let standby = start_with(cfg).await;
    replicas
        .lock()
        .unwrap()
        .extend([leader_addr, standby.server.addr]);
    assert!(!standby.server.svc.is_ready());

    // connectTimeout is short: an adopted agent must not be held to it.
    pools(&client)
        .create(
            &PostParams::default(),
            &agent_pool(
                "crash",
                agent_cmd(),
                json!({"minIdle": 2, "maxTotal": 3, "maxUses": 0, "connectTimeout": "2s"}),
            ),
        )
        .await
        .unwrap();
    let lease = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = leader_api
                .lease(&CreateLease {
                    selector: "crash".into(),
                    wait_seconds: Some(10.0),
                    ttl_seconds: Some(120.0),
                    holder: Some("test".into()),
                    idempotency_key: None,
                })
                .await;
            match r {
                Ok(l) => break l,
                Err(e) => assert!(Instant::now() < deadline, "no lease from the leader: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // Two idle agents besides the leased one (minIdle 2), all registered with the leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(&client, "crash").await;
        if st.idle == 2 && st.leased == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "pool never settled: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = pod_names(&client, "crash").await;
    assert_eq!(before.len(), 3);
    // The standby tells an agent to try again soon (1013), not that it is unknown (4404).
    {
        use futures_util::SinkExt;
        let key = warmpool::auth::AgentKey::from_bytes(AGENT_KEY);
        let mut ws = raw_agent(&standby.hub_url()).await;
        ws.send(hello(&before[0], &key.token(&before[0])))
            .await
            .unwrap();
        let (code, reason, _) = read_until_close(&mut ws).await;
        assert_eq!(code, warmpool::protocol::close::TRY_AGAIN_LATER, "{reason}");
        assert!(reason.contains(&before[0]), "{reason}");
    }

    // SIGKILL: no shutdown, the Lease is not released, connections just break. The standby
    // takes over once the Lease expires (12 s here, 15 s by default): meanwhile the agents retry.
    let _ = leader.0.kill();
    let _ = leader.0.wait();
    let crashed = Instant::now();
    wait_until("the standby leads", Duration::from_secs(20), || {
        standby.server.svc.is_ready()
    })
    .await;
    eprintln!("takeover after {:?}", crashed.elapsed());
    // Every agent reconnects to the new leader, the leased one restoring its lease; then, well
    // past connectTimeout, no pod has been deleted or added.
    let restored = Instant::now();
    let mut settled_at: Option<Instant> = None;
    loop {
        let now = pod_names(&client, "crash").await;
        assert_eq!(now, before, "a crash takeover deleted or added pods");
        let p = standby.pool("crash");
        assert_eq!(p.leaks_total, 0, "an adopted agent was treated as a leak");
        let lease_ok = standby
            .client
            .get_lease(&lease.id)
            .await
            .is_ok_and(|v| v.state == "active" && v.agent == lease.agent);
        if settled_at.is_none() && lease_ok && p.idle == 2 && p.leased == 1 {
            settled_at = Some(Instant::now());
            eprintln!(
                "all agents back {:?} after the takeover",
                restored.elapsed()
            );
        }
        if settled_at.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(30),
            "agents never all came back: {p:?}, lease restored: {lease_ok}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(standby.recycles("connect-timeout"), 0);
    assert_eq!(standby.recycles("provision-timeout"), 0);
    // The lease is usable and can be released.
    let out = exec(&standby, &lease.id, script("echo after")).await;
    assert_eq!(out.stdout, b"after\n");
    let v = standby.client.release(&lease.id).await.unwrap();
    assert_eq!(v.state, "released");
    drop(api);
}
