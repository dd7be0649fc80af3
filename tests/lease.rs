//! Lease API + exec + recycling over real HTTP, real WebSocket and real agent processes.

mod support;

use std::time::{Duration, Instant};

use support::*;
use warmpool::api::CreateLease;
use warmpool::client::Error as ClientError;
use warmpool::protocol::{ExecSpec, ExitStatus, Stream};

const ONE_POOL: &str = "
pools:
  - name: linux
    labels: [linux, go]
    minIdle: 2
    maxTotal: 4
    maxUses: 0
";

struct Out {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: ExitStatus,
}

async fn exec(h: &Harness, lease: &str, spec: ExecSpec) -> Out {
    exec_cancel(h, lease, spec, std::future::pending()).await
}

async fn exec_cancel(
    h: &Harness,
    lease: &str,
    spec: ExecSpec,
    cancel: impl std::future::Future<Output = ()>,
) -> Out {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let status = h
        .client
        .exec(
            lease,
            spec,
            |s, d| match s {
                Stream::Stdout => stdout.extend_from_slice(d),
                Stream::Stderr => stderr.extend_from_slice(d),
            },
            cancel,
        )
        .await
        .expect("exec completes");
    Out {
        stdout,
        stderr,
        status,
    }
}

fn script(s: &str) -> ExecSpec {
    ExecSpec {
        script: Some(s.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn lease_exec_streams_output_in_order_and_exit_codes() {
    let h = start_pools(ONE_POOL).await;
    h.wait_idle("linux", 2).await;
    let l = h.lease("linux && go", 5.0, 60.0).await;
    assert_eq!(l.pool, "linux");
    assert_eq!(l.state, "active");

    let out = exec(
        &h,
        &l.id,
        script("for i in $(seq 1 500); do echo line$i; done; echo oops >&2; exit 7"),
    )
    .await;
    let want: String = (1..=500).map(|i| format!("line{i}\n")).collect();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), want);
    assert_eq!(out.stderr, b"oops\n");
    assert_eq!(out.status.code, Some(7));

    // Large output crosses many frames without loss; argv form; env and cwd.
    let out = exec(
        &h,
        &l.id,
        ExecSpec {
            argv: Some(vec![
                "sh".into(),
                "-c".into(),
                "head -c 3000000 /dev/zero; echo $FOO; pwd".into(),
            ]),
            env: [("FOO".to_string(), "bar".to_string())].into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        out.stdout.len(),
        3_000_000 + 4 + out.stdout[3_000_004..].len()
    );
    let tail = String::from_utf8_lossy(&out.stdout[3_000_000..]).to_string();
    assert!(
        tail.starts_with("bar\n") && tail.trim_end().ends_with("/workspace"),
        "{tail}"
    );
    assert_eq!(out.status.code, Some(0));

    // A program that does not exist: 127 with an error naming it.
    let out = exec(
        &h,
        &l.id,
        ExecSpec {
            argv: Some(vec!["/no/such/program".into()]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(out.status.shell_code(), 127);
    assert!(out.status.error.unwrap().contains("/no/such/program"));

    // Killed by a signal.
    let out = exec(&h, &l.id, script("kill -9 $$")).await;
    assert_eq!(out.status.signal, Some(9));
    assert_eq!(out.status.shell_code(), 137);

    // Timeout kills the whole group.
    let t = Instant::now();
    let out = exec(
        &h,
        &l.id,
        ExecSpec {
            script: Some("sleep 30".into()),
            timeout_ms: Some(300),
            ..Default::default()
        },
    )
    .await;
    assert!(out.status.timed_out);
    assert!(t.elapsed() < Duration::from_secs(10));
    h.client.release(&l.id).await.unwrap();
    h.server.shutdown().await;
}

#[tokio::test]
async fn cancel_kills_the_process_group_and_the_lease_survives() {
    let h = start_pools(ONE_POOL).await;
    h.wait_idle("linux", 1).await;
    let l = h.lease("linux", 5.0, 60.0).await;
    let t = Instant::now();
    let out = exec_cancel(
        &h,
        &l.id,
        script("sleep 4321 & sleep 4321; echo never"),
        tokio::time::sleep(Duration::from_millis(300)),
    )
    .await;
    assert!(out.status.cancelled, "{:?}", out.status);
    assert!(out.stdout.is_empty());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        t.elapsed()
    );
    wait_until("group killed", Duration::from_secs(5), || {
        pids_matching("sleep 4321").is_empty()
    })
    .await;
    // The lease is still usable after a cancel.
    let out = exec(&h, &l.id, script("echo again")).await;
    assert_eq!(out.stdout, b"again\n");
    h.client.release(&l.id).await.unwrap();
    h.server.shutdown().await;
}

async fn agents_serving(h: &Harness, n: usize) -> Vec<String> {
    let mut agents = Vec::new();
    for _ in 0..n {
        let l = h.lease("linux", 10.0, 60.0).await;
        let out = exec(h, &l.id, script("true")).await;
        assert_eq!(out.status.code, Some(0));
        agents.push(l.agent.clone());
        h.client.release(&l.id).await.unwrap();
    }
    agents
}

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
async fn unsatisfiable_selector_fails_at_once_and_wait_times_out() {
    let h = start_pools(
        "pools:\n  - name: one\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 1\n",
    )
    .await;
    let t = Instant::now();
    match h
        .client
        .lease(&CreateLease {
            selector: "windows && msvc".into(),
            wait_seconds: Some(30.0),
            ..Default::default()
        })
        .await
    {
        Err(ClientError::Api {
            status: 422,
            code,
            message,
            ..
        }) => {
            assert_eq!(code, "unsatisfiable");
            assert!(
                message.contains("windows && msvc") && message.contains("one: [linux]"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(1));
    let held = h.lease("linux", 10.0, 60.0).await;
    let t = Instant::now();
    match h
        .client
        .lease(&CreateLease {
            selector: "linux".into(),
            wait_seconds: Some(0.3),
            ..Default::default()
        })
        .await
    {
        Err(ClientError::Api {
            status: 408, code, ..
        }) => assert_eq!(code, "wait_expired"),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(300));
    // The held lease is untouched.
    assert_eq!(h.client.get_lease(&held.id).await.unwrap().state, "active");
    h.server.shutdown().await;
}

#[tokio::test]
async fn waiters_are_served_in_order_and_queue_limit_answers_429() {
    let mut cfg = test_config(
        "pools:\n  - name: one\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 1\n    maxUses: 0\n",
    );
    cfg.service.engine.max_waiters = 2;
    let h = start_with(cfg).await;
    let held = h.lease("linux", 10.0, 60.0).await;
    let c1 = h.client.clone();
    let first = tokio::spawn(async move {
        let r = c1
            .lease(&CreateLease {
                selector: "linux".into(),
                wait_seconds: Some(20.0),
                holder: Some("first".into()),
                ..Default::default()
            })
            .await;
        (Instant::now(), r)
    });
    wait_until("first waiting", Duration::from_secs(5), || {
        h.server.svc.read(|e| e.waiting()) == 1
    })
    .await;
    let c2 = h.client.clone();
    let second = tokio::spawn(async move {
        let r = c2
            .lease(&CreateLease {
                selector: "linux".into(),
                wait_seconds: Some(20.0),
                holder: Some("second".into()),
                ..Default::default()
            })
            .await;
        (Instant::now(), r)
    });
    wait_until("second waiting", Duration::from_secs(5), || {
        h.server.svc.read(|e| e.waiting()) == 2
    })
    .await;
    match h
        .client
        .lease(&CreateLease {
            selector: "linux".into(),
            wait_seconds: Some(5.0),
            ..Default::default()
        })
        .await
    {
        Err(ClientError::Api {
            status: 429, code, ..
        }) => assert_eq!(code, "queue_full"),
        other => panic!("{other:?}"),
    }
    h.client.release(&held.id).await.unwrap();
    let (t1, r1) = first.await.unwrap();
    let l1 = r1.unwrap();
    assert_eq!(l1.holder, "first");
    h.client.release(&l1.id).await.unwrap();
    let (t2, r2) = second.await.unwrap();
    assert_eq!(r2.unwrap().holder, "second");
    assert!(t1 <= t2);
    h.server.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let h = start_pools(ONE_POOL).await;
    let http = reqwest::Client::new();
    let check = |resp: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(resp.status().as_u16(), status);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    };
    let r = http
        .post(h.url("/v1/leases"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    check(r, 400, "invalid_request").await;
    let r = http
        .post(h.url("/v1/leases"))
        .json(&serde_json::json!({"selector": "linux &&"}))
        .send()
        .await
        .unwrap();
    check(r, 400, "invalid_selector").await;
    let r = http
        .post(h.url("/v1/leases"))
        .json(&serde_json::json!({"selector": "linux", "colour": 1}))
        .send()
        .await
        .unwrap();
    check(r, 400, "invalid_request").await;
    let r = http
        .post(h.url("/v1/leases"))
        .json(&serde_json::json!({"selector": "linux", "ttlSeconds": -1}))
        .send()
        .await
        .unwrap();
    check(r, 400, "invalid_request").await;
    let r = http.get(h.url("/v1/leases/nope")).send().await.unwrap();
    check(r, 404, "lease_not_found").await;
    let r = http.delete(h.url("/v1/leases/nope")).send().await.unwrap();
    check(r, 404, "lease_not_found").await;
    let r = http.get(h.url("/v1/pools/nope")).send().await.unwrap();
    check(r, 404, "pool_not_found").await;
    let r = http.get(h.url("/v1/nothing")).send().await.unwrap();
    check(r, 404, "not_found").await;
    // Idempotency: the same key returns the same lease (200), not a second agent.
    h.wait_idle("linux", 2).await;
    let body = serde_json::json!({"selector": "linux", "idempotencyKey": "build-17"});
    let a = http
        .post(h.url("/v1/leases"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status().as_u16(), 201);
    let a: serde_json::Value = a.json().await.unwrap();
    let b = http
        .post(h.url("/v1/leases"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(b.status().as_u16(), 200);
    let b: serde_json::Value = b.json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    // Pools and probes.
    let pools: serde_json::Value = http
        .get(h.url("/v1/pools"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(pools[0]["name"], "linux");
    assert_eq!(pools[0]["leased"], 1);
    assert_eq!(
        http.get(h.url("/healthz")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        http.get(h.url("/readyz")).send().await.unwrap().status(),
        200
    );
    let m = http
        .get(h.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "warmpool_agents{pool=\"linux\",state=\"leased\"} 1",
        "warmpool_lease_wait_seconds_bucket",
        "warmpool_provision_to_idle_seconds_bucket",
        "warmpool_lease_requests_total",
    ] {
        assert!(m.contains(name), "metrics lack {name}");
    }
    h.server.shutdown().await;
}

#[tokio::test]
async fn api_token_is_required_when_configured() {
    let mut cfg = test_config(ONE_POOL);
    cfg.api_token = Some("s3cret-token".into());
    let h = start_with(cfg).await;
    let r = reqwest::get(h.url("/v1/pools")).await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthorized");
    let wrong = warmpool::client::Client::new(&h.server.base_url(), Some("nope".into()));
    assert!(matches!(
        wrong.pools().await,
        Err(ClientError::Api { status: 401, .. })
    ));
    let right = warmpool::client::Client::new(&h.server.base_url(), Some("s3cret-token".into()));
    assert_eq!(right.pools().await.unwrap().len(), 1);
    // Probes stay open for kubelets and scrapers.
    assert_eq!(reqwest::get(h.url("/healthz")).await.unwrap().status(), 200);
    h.server.shutdown().await;
}

#[tokio::test]
async fn refuses_public_address_without_token() {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = warmpool::server::start(listener, test_config(ONE_POOL))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("without an API token"), "{err}");
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
    let pids = h.server.backend.pids();
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
    let all = h.server.backend.pids();
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
    let pid = h.server.backend.pid_of(&l.agent).expect("agent pid");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    match job.await.unwrap() {
        Err(ClientError::Api { code, message, .. }) => {
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
    match h
        .client
        .lease(&CreateLease {
            selector: "linux".into(),
            wait_seconds: Some(0.3),
            ..Default::default()
        })
        .await
    {
        Err(ClientError::Api { status: 408, .. }) => {}
        other => panic!("{other:?}"),
    }
    h.server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_no_output_and_keeps_its_agent() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut cfg = test_config(ONE_POOL);
    cfg.service.engine.heartbeat_timeout = Duration::from_millis(800);
    let h = start_with(cfg).await;
    h.wait_idle("linux", 1).await;
    let l = h.lease("linux", 5.0, 60.0).await;
    let url = format!("ws://{}/v1/leases/{}/exec", h.server.addr, l.id);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let req =
        serde_json::json!({"type": "exec", "script": "head -c 8000000 /dev/zero; echo done >&2"});
    ws.send(Message::Text(req.to_string().into()))
        .await
        .unwrap();
    // Read nothing for well over the heartbeat timeout while the job floods its output.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (mut stdout, mut stderr, mut exit) = (0usize, Vec::new(), None);
    while let Some(m) = ws.next().await {
        match m.unwrap() {
            Message::Binary(b) => {
                let (s, _, d) = warmpool::protocol::decode_output(&b).unwrap();
                match s {
                    Stream::Stdout => stdout += d.len(),
                    Stream::Stderr => stderr.extend_from_slice(d),
                }
            }
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "exit" {
                    exit = Some(v["code"].as_i64().unwrap());
                    break;
                }
                assert_eq!(v["type"], "started", "{v}");
            }
            _ => {}
        }
    }
    assert_eq!(stdout, 8_000_000, "every byte arrives");
    assert_eq!(stderr, b"done\n");
    assert_eq!(exit, Some(0));
    assert_eq!(
        h.recycles("heartbeat-lost"),
        0,
        "a slow client must not cost the agent"
    );
    assert_eq!(h.client.get_lease(&l.id).await.unwrap().state, "active");
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
