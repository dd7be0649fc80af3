//! Lease API + exec + recycling over real HTTP, real WebSocket and real agent processes.

mod support;

use std::time::{Duration, Instant};

use support::*;
use warmpool::api::CreateLease;
use warmpool::client::Error as ClientError;
use warmpool::protocol::{ExecSpec, Stream};

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

#[tokio::test]
async fn unsatisfiable_selector_fails_at_once_and_wait_times_out() {
    let h = start_pools(
        "pools:\n  - name: one\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 1\n",
    )
    .await;
    let t = Instant::now();
    let (status, code, message) = lease_error(&h, "windows && msvc", 30.0).await;
    assert_eq!((status, code.as_str()), (422, "unsatisfiable"));
    assert!(
        message.contains("windows && msvc") && message.contains("one: [linux]"),
        "{message}"
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    let held = h.lease("linux", 10.0, 60.0).await;
    let t = Instant::now();
    let (status, code, _) = lease_error(&h, "linux", 0.3).await;
    assert_eq!((status, code.as_str()), (408, "wait_expired"));
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
    // A lease request that waits in the background; yields when it was answered.
    let waiter = |holder: &'static str| {
        let c = h.client.clone();
        tokio::spawn(async move {
            let r = c
                .lease(&CreateLease {
                    selector: "linux".into(),
                    wait_seconds: Some(20.0),
                    holder: Some(holder.into()),
                    ..Default::default()
                })
                .await;
            (Instant::now(), r)
        })
    };
    let first = waiter("first");
    wait_until("first waiting", Duration::from_secs(5), || {
        h.server.svc.read(|e| e.waiting()) == 1
    })
    .await;
    let second = waiter("second");
    wait_until("second waiting", Duration::from_secs(5), || {
        h.server.svc.read(|e| e.waiting()) == 2
    })
    .await;
    let (status, code, _) = lease_error(&h, "linux", 5.0).await;
    assert_eq!((status, code.as_str()), (429, "queue_full"));
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
    let pools = h.get_json("/v1/pools").await;
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
    let m = h.metrics_text().await;
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
                    _ => stderr.extend_from_slice(d),
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
