//! Recycling and lifecycle over real agent processes: maxUses, idle TTL, max age, leaks,
//! lease expiry, health limits, rate limits, hard agent deaths and shutdown.

mod support;

use std::time::{Duration, Instant};

use support::*;
use warmpool::client::Error as ClientError;

#[tokio::test]
async fn release_recycles_after_max_uses_1() {
    let h = start_pools(
        "pools:\n  - name: p\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 1\n    maxUses: 1\n",
    )
    .await;
    let agents = agents_serving(&h, 3).await;
    assert_eq!(agents.len(), 3);
    assert!(
        agents[0] != agents[1] && agents[1] != agents[2],
        "{agents:?}"
    );
    wait_until("max-uses recycles", Duration::from_secs(5), || {
        h.recycles("max-uses") >= 3
    })
    .await;
    h.server.shutdown().await;
}

#[tokio::test]
async fn release_reuses_a_cleaned_agent_up_to_max_uses_3() {
    let h = start_pools(
        "pools:\n  - name: p\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 1\n    maxUses: 3\n",
    )
    .await;
    h.wait_idle("p", 1).await;
    // A job leaves a file and a daemonised process behind; release must clean both.
    let l = h.lease("linux", 10.0, 60.0).await;
    let out = exec(
        &h,
        &l.id,
        script("echo data > left.txt; nohup setsid sleep 9876 >/dev/null 2>&1 & echo started"),
    )
    .await;
    assert_eq!(out.stdout, b"started\n");
    wait_until("leftover running", Duration::from_secs(5), || {
        !pids_matching("sleep 9876").is_empty()
    })
    .await;
    h.client.release(&l.id).await.unwrap();
    wait_until(
        "leftover killed on release",
        Duration::from_secs(10),
        || pids_matching("sleep 9876").is_empty(),
    )
    .await;
    let l2 = h.lease("linux", 10.0, 60.0).await;
    assert_eq!(l2.agent, l.agent, "cleaned agent is reused");
    let out = exec(&h, &l2.id, script("ls -A")).await;
    assert!(
        out.stdout.is_empty(),
        "workspace wiped, found {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    h.client.release(&l2.id).await.unwrap();
    let mut agents = vec![l.agent.clone(), l2.agent.clone()];
    agents.extend(agents_serving(&h, 2).await);
    assert_eq!(agents[2], agents[0]);
    assert_ne!(
        agents[3], agents[0],
        "a fourth lease gets a new agent: {agents:?}"
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn idle_ttl_scales_down_to_min_idle() {
    let h = start_pools(
        "pools:\n  - name: p\n    labels: [linux]\n    minIdle: 0\n    maxTotal: 3\n    maxUses: 0\n    idleTtl: 300ms\n",
    )
    .await;
    // Two concurrent leases create two agents on demand (cold).
    let (a, b) = tokio::join!(h.lease("linux", 10.0, 60.0), h.lease("linux", 10.0, 60.0));
    assert_ne!(a.agent, b.agent);
    h.client.release(&a.id).await.unwrap();
    h.client.release(&b.id).await.unwrap();
    wait_until("both idle", Duration::from_secs(10), || {
        h.pool("p").idle == 2
    })
    .await;
    wait_until("scaled down to 0", Duration::from_secs(10), || {
        h.pool("p").total == 0
    })
    .await;
    assert_eq!(h.recycles("idle-ttl"), 2);
    h.server.shutdown().await;
}

#[tokio::test]
async fn max_age_rotates_without_dipping_below_min_idle() {
    let h = start_pools(
        "pools:\n  - name: p\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 2\n    maxAge: 1s\n",
    )
    .await;
    h.wait_idle("p", 1).await;
    let first = h.agents_in(warmpool::engine::AgentState::Idle);
    // Until the first rotation completes, there is always an idle agent.
    let deadline = Instant::now() + Duration::from_secs(15);
    while h.recycles("max-age") == 0 {
        assert!(Instant::now() < deadline, "no max-age rotation");
        assert!(h.pool("p").idle >= 1, "warm count dipped during rotation");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_until("rotated agent gone", Duration::from_secs(10), || {
        let now = h.agents_in(warmpool::engine::AgentState::Idle);
        !now.is_empty() && now.iter().all(|a| !first.contains(a))
    })
    .await;
    h.server.shutdown().await;
}

#[tokio::test]
async fn agent_that_never_connects_is_killed_and_counted_as_leak() {
    let h = start_pools(
        "pools:\n  - name: stuck\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 1\n    connectTimeout: 400ms\n    agentCommand: [sleep, \"7777\"]\n",
    )
    .await;
    wait_until("a leak", Duration::from_secs(10), || {
        h.pool("stuck").leaks_total >= 1
    })
    .await;
    // Its process is killed and reaped; a replacement is tried, never beyond maxTotal.
    wait_until("two leaks", Duration::from_secs(10), || {
        h.pool("stuck").leaks_total >= 2
    })
    .await;
    assert!(pids_matching("sleep 7777").len() <= 1);
    let text = reqwest::get(h.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let leaks = metric(&text, "warmpool_leaks_total{pool=\"stuck\"}").unwrap();
    assert!(leaks >= 2.0, "{leaks}");
    assert!(
        metric(
            &text,
            "warmpool_recycles_total{pool=\"stuck\",reason=\"connect-timeout\"}"
        )
        .unwrap()
            >= 2.0
    );
    h.server.shutdown().await;
    assert!(pids_matching("sleep 7777").is_empty(), "no orphan left");
}

#[tokio::test]
async fn lease_not_renewed_expires_and_agent_is_recycled() {
    let h = start_pools(ONE_POOL).await;
    h.wait_idle("linux", 1).await;
    let l = h.lease("linux", 5.0, 0.6).await;
    let renewed = h.client.renew(&l.id).await.unwrap();
    assert!(renewed.expires_at >= l.expires_at);
    let t = Instant::now();
    loop {
        let v = h.client.get_lease(&l.id).await.unwrap();
        if v.state == "expired" {
            assert!(v.end_reason.unwrap().contains(&l.agent));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "lease never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until("agent recycled", Duration::from_secs(5), || {
        h.recycles("lease-expired") == 1
    })
    .await;
    match h.client.renew(&l.id).await {
        Err(ClientError::Api {
            status: 409, code, ..
        }) => assert_eq!(code, "lease_ended"),
        other => panic!("{other:?}"),
    }
    h.server.shutdown().await;
}

#[tokio::test]
async fn unhealthy_agent_is_recycled_on_release_not_reused() {
    let mut cfg = test_config(
        "pools:\n  - name: p\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 2\n    maxUses: 0\n    health: {maxWorkspaceBytes: 1000}\n",
    );
    cfg.service.heartbeat_interval = Duration::from_millis(100);
    let h = start_with(cfg).await;
    h.wait_idle("p", 1).await;
    let l = h.lease("linux", 10.0, 60.0).await;
    // Fill the workspace past the limit and stay long enough for heartbeats to report it.
    let out = exec(&h, &l.id, script("head -c 5000 /dev/zero > big; sleep 0.5")).await;
    assert_eq!(out.status.code, Some(0));
    h.client.release(&l.id).await.unwrap();
    wait_until("unhealthy recycle", Duration::from_secs(5), || {
        h.recycles("unhealthy") == 1
    })
    .await;
    let next = h.lease("linux", 10.0, 60.0).await;
    assert_ne!(next.agent, l.agent);
    h.server.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_leases_finish_then_leaves_no_process_behind() {
    let h = start_pools(ONE_POOL).await;
    h.wait_idle("linux", 2).await;
    let pids = h.server.process().pids();
    assert!(pids.len() >= 2);
    let l = h.lease("linux", 5.0, 60.0).await;
    let c = h.client.clone();
    let id = l.id.clone();
    let job = tokio::spawn(async move {
        c.exec(&id, script("sleep 5555"), |_, _| {}, std::future::pending())
            .await
    });
    wait_until("job running", Duration::from_secs(5), || {
        !pids_matching("sleep 5555").is_empty()
    })
    .await;
    let all = h.server.process().pids();
    h.server.shutdown().await;
    for p in all {
        assert!(!alive(p), "agent {p} survived shutdown");
    }
    for p in pids_matching("sleep 5555") {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        eprintln!("DEBUG survivor {p}: {stat}");
    }
    assert!(
        pids_matching("sleep 5555").is_empty(),
        "job process survived shutdown"
    );
    assert!(
        job.await.unwrap().is_err(),
        "the job's client learns the agent is gone"
    );
}

#[tokio::test]
async fn agent_killed_mid_job_fails_the_lease_and_leaves_no_orphan() {
    let h = start_pools(ONE_POOL).await;
    h.wait_idle("linux", 2).await;
    let l = h.lease("linux", 5.0, 60.0).await;
    let c = h.client.clone();
    let id = l.id.clone();
    let job = tokio::spawn(async move {
        c.exec(
            &id,
            script("sleep 8642; true"),
            |_, _| {},
            std::future::pending(),
        )
        .await
    });
    wait_until("job running", Duration::from_secs(5), || {
        !pids_matching("sleep 8642").is_empty()
    })
    .await;
    let pid = h.server.process().pid_of(&l.agent).expect("agent pid");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    match job.await.unwrap() {
        Err(ClientError::Exec { code, message, .. }) => {
            assert_eq!(code, "agent_lost");
            assert!(message.contains(&l.agent), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let v = h.client.get_lease(&l.id).await.unwrap();
    assert_eq!(v.state, "failed");
    wait_until("orphaned job swept", Duration::from_secs(5), || {
        pids_matching("sleep 8642").is_empty()
    })
    .await;
    // The pool heals itself.
    h.wait_idle("linux", 2).await;
    h.server.shutdown().await;
}

#[tokio::test]
async fn unstartable_agent_command_does_not_wedge_the_pool() {
    let h = start_pools(
        "pools:\n  - name: broken\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 1\n    agentCommand: [/no/such/agent-binary]\n",
    )
    .await;
    wait_until(
        "repeated provision attempts",
        Duration::from_secs(10),
        || h.pool("broken").provision_failures_total >= 3,
    )
    .await;
    let p = h.pool("broken");
    assert!(p.total <= 1, "failed agents must not pile up: {p:?}");
    assert!(p.last_error.unwrap().contains("/no/such/agent-binary"));
    // Requests wait (the pool could serve them) and time out cleanly.
    let (status, _, _) = lease_error(&h, "linux", 0.3).await;
    assert_eq!(status, 408);
    h.server.shutdown().await;
}

#[tokio::test]
async fn provisioning_rate_limit_is_visible_in_status_and_metrics() {
    let h = start_pools(
        "pools:\n  - name: slow\n    labels: [linux]\n    minIdle: 4\n    maxTotal: 4\n    provisioning: {perSecond: 2, burst: 1, maxConcurrent: 4}\n",
    )
    .await;
    wait_until("throttled", Duration::from_secs(5), || {
        h.pool("slow").throttled_total >= 1
    })
    .await;
    let t = Instant::now();
    h.wait_idle("slow", 4).await;
    // 1 at once, then 2 per second: the last of 4 needs about 1.5 s.
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "not paced: {:?}",
        t.elapsed()
    );
    assert!(!h.pool("slow").throttled, "no longer throttled once full");
    let m = h.server.svc.render_metrics();
    assert!(metric(&m, "warmpool_provisions_throttled_total{pool=\"slow\"}").unwrap() >= 1.0);
    h.server.shutdown().await;
}
