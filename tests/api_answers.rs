//! What the API and the hub answer to requests they refuse or end (issue 12): JSON 405/404,
//! renew body validation, the bearer scheme's case, Close replies, close codes at shutdown,
//! exec errors without a bogus HTTP status; and the `serve` binary's robustness (a public
//! address refused before binding, a closed stderr, logs without colours).

mod support;

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use warmpool::engine::AgentState;
use warmpool::protocol::close;

const POOLS: &str = "
pools:
  - name: main
    labels: [linux]
    minIdle: 1
    maxTotal: 2
  - name: manual
    labels: [manual]
    minIdle: 1
    maxTotal: 1
    connectTimeout: 60s
    agentCommand: [sleep, \"600\"]
  - name: outside
    labels: [outside]
    external: true
";

async fn error_of(r: reqwest::Response) -> (u16, Option<String>, String, String) {
    let status = r.status().as_u16();
    let allow = r
        .headers()
        .get("allow")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    let code = v["error"]["code"].as_str().unwrap_or("").to_string();
    let message = v["error"]["message"].as_str().unwrap_or("").to_string();
    (status, allow, code, message)
}

#[tokio::test]
async fn wrong_methods_and_unknown_paths_answer_json_errors() {
    let h = start_pools(POOLS).await;
    let http = h.http().await;
    for (method, path) in [
        ("PUT", "/v1/leases"),
        ("GET", "/v1/leases"),
        ("PATCH", "/v1/leases/x"),
        ("POST", "/v1/pools"),
        ("DELETE", "/v1/pools/main"),
        ("GET", "/v1/leases/x/renew"),
    ] {
        let r = http
            .request(method.parse().unwrap(), h.url(path))
            .send()
            .await
            .unwrap();
        let (status, allow, code, message) = error_of(r).await;
        assert_eq!(status, 405, "{method} {path}");
        assert_eq!(code, "method_not_allowed", "{method} {path}");
        let allow = allow.unwrap_or_else(|| panic!("{method} {path}: no Allow header"));
        assert!(!allow.is_empty(), "{method} {path}");
        assert!(message.contains(method), "{message}");
        assert!(message.contains(path), "{message}");
        assert!(message.contains(&allow), "{message} / {allow}");
    }
    let r = http.get(h.url("/v1/nothing")).send().await.unwrap();
    let (status, _, code, message) = error_of(r).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    assert!(message.contains("/v1/nothing"), "{message}");
    h.server.shutdown().await;
}

#[tokio::test]
async fn renew_bodies_are_validated_as_create_validates_them() {
    let h = start_pools(POOLS).await;
    h.wait_idle("main", 1).await;
    let l = h.lease("linux", 5.0, 60.0).await;
    let http = h.http().await;
    let renew = h.url(&format!("/v1/leases/{}/renew", l.id));
    for body in [
        "{bad",
        r#"{"ttlSeconds":"5"}"#,
        r#"{"ttl":5}"#,
        r#"{"ttlSeconds":1e-12}"#,
        r#"{"ttlSeconds":0}"#,
        r#"{"ttlSeconds":-1}"#,
    ] {
        let r = http
            .post(&renew)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, _, code, _) = error_of(r).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_request"),
            "renew {body}"
        );
        // Create refuses the same bodies the same way.
        let create = body.replacen("{\"", "{\"selector\":\"linux\",\"", 1);
        let r = http
            .post(h.url("/v1/leases"))
            .header("content-type", "application/json")
            .body(create.clone())
            .send()
            .await
            .unwrap();
        let (status, _, code, _) = error_of(r).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_request"),
            "create {create}"
        );
    }
    // A non-JSON body is 415, as on create.
    let r = http.post(&renew).body("ttlSeconds=5").send().await.unwrap();
    assert_eq!(error_of(r).await.0, 415);
    // `{}` and no body keep the lease's TTL.
    for body in ["{}", ""] {
        let r = http
            .post(&renew)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "renew {body:?}");
        let v: warmpool::api::LeaseView = r.json().await.unwrap();
        assert_eq!(v.ttl_seconds, 60.0);
        assert_eq!(v.state, "active");
    }
    let r = http
        .post(&renew)
        .json(&serde_json::json!({"ttlSeconds": 30}))
        .send()
        .await
        .unwrap();
    let v: warmpool::api::LeaseView = r.json().await.unwrap();
    assert_eq!(v.ttl_seconds, 30.0);
    h.server.shutdown().await;
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let mut cfg = test_config(POOLS);
    cfg.api_token = Some("s3cret".into());
    let h = start_with(cfg).await;
    let http = h.http().await;
    for (value, want) in [
        ("Bearer s3cret", 200),
        ("bearer s3cret", 200),
        ("BEARER s3cret", 200),
        ("bEaReR s3cret", 200),
        ("Basic s3cret", 401),
        ("bearer wrong", 401),
        ("s3cret", 401),
    ] {
        let r = http
            .get(h.url("/v1/pools"))
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{value}");
    }
    h.server.shutdown().await;
}

/// Reads the next frame; panics unless it is a Close (a dropped connection is not a Close).
async fn expect_close(ws: &mut Ws, what: &str) -> Option<CloseFrame> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Err(_) => panic!("{what}: no Close within 10s"),
            Ok(Some(Ok(Message::Close(f)))) => return f,
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("{what}: connection ended without a Close: {other:?}"),
        }
    }
}

fn close_1000() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
}

#[tokio::test]
async fn a_close_frame_is_answered_with_a_close() {
    let h = start_pools(POOLS).await;
    wait_until("manual agent started", Duration::from_secs(10), || {
        h.agents_in(AgentState::Connecting).len() == 1
    })
    .await;
    let id = h.agents_in(AgentState::Connecting)[0].clone();
    // A Close instead of a hello is answered with a Close, not a dropped connection.
    let mut ws = raw_agent(&h.hub_url()).await;
    ws.send(close_1000()).await.unwrap();
    expect_close(&mut ws, "hub before hello").await;
    let mut ws = raw_agent(&h.hub_url()).await;
    register(&mut ws, &id, &h.server.svc.key.token(&id)).await;
    ws.send(close_1000()).await.unwrap();
    expect_close(&mut ws, "hub").await;

    // The exec socket: a client that closes during a command hears a Close too.
    h.wait_idle("main", 1).await;
    let l = h.lease("linux", 5.0, 60.0).await;
    let url = format!("ws://{}/v1/leases/{}/exec", h.server.addr, l.id);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let spec = warmpool::protocol::ClientMessage::Exec(script("sleep 30"));
    ws.send(Message::Text(serde_json::to_string(&spec).unwrap().into()))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => assert!(t.contains("started"), "{t}"),
        other => panic!("{other:?}"),
    }
    ws.send(close_1000()).await.unwrap();
    expect_close(&mut ws, "exec").await;
    h.server.shutdown().await;
}

#[tokio::test]
async fn shutdown_tells_started_agents_to_exit_and_external_ones_to_come_back() {
    let h = start_pools(POOLS).await;
    wait_until("manual agent started", Duration::from_secs(10), || {
        h.agents_in(AgentState::Connecting).len() == 1
    })
    .await;
    let id = h.agents_in(AgentState::Connecting)[0].clone();
    let mut started = raw_agent(&h.hub_url()).await;
    register(&mut started, &id, &h.server.svc.key.token(&id)).await;
    let mut external = raw_agent(&h.hub_url()).await;
    let hello = serde_json::json!({
        "type": "hello", "protocol": 1, "agentId": "box-1", "pool": "outside",
        "token": h.server.svc.key.join_token("outside"), "labels": []
    });
    external
        .send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), external.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => assert!(t.contains("welcome"), "{t}"),
        other => panic!("{other:?}"),
    }
    let stop = tokio::spawn(h.server.shutdown());
    let (code, reason, _) = read_until_close(&mut started).await;
    assert_eq!(code, close::TERMINATED, "{reason}");
    let (code, reason, _) = read_until_close(&mut external).await;
    assert_eq!(code, close::GOING_AWAY, "{reason}");
    stop.await.unwrap();
}

#[tokio::test]
async fn exec_errors_from_the_socket_name_no_http_status() {
    let h = start_pools(POOLS).await;
    h.wait_idle("main", 1).await;
    let l = h.lease("linux", 5.0, 60.0).await;
    let spec = warmpool::protocol::ExecSpec {
        argv: Some(vec!["ls".into()]),
        cwd: Some("../..".into()),
        ..Default::default()
    };
    let e = h
        .client
        .exec(&l.id, spec, |_, _| {}, std::future::pending())
        .await
        .expect_err("refused");
    let text = e.to_string();
    assert!(text.contains("invalid_request"), "{text}");
    assert!(!text.contains("HTTP"), "{text}");
    h.server.shutdown().await;
}

/// A `serve` child killed when the test ends, passed or not.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn serve_refuses_a_public_address_without_a_token_before_binding() {
    // The port is taken on loopback: binding 0.0.0.0 on it would fail with "address in use",
    // so the token refusal shows the address was never bound.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let out = Command::new(EXE)
        .args(["serve", "--listen", &format!("0.0.0.0:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without an API token"), "{err}");
}

/// Starts `serve` on a free port with `stderr` and a private TMPDIR; waits for 2 idle agents.
async fn serve_with(stderr: Stdio, tmp: &std::path::Path) -> (Serve, warmpool::client::Client) {
    let listen = format!("127.0.0.1:{}", free_port());
    let child = Command::new(EXE)
        .args(["serve", "--listen", &listen, "--shutdown-grace", "1s"])
        .env("TMPDIR", tmp)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let serve = Serve(child);
    let client = warmpool::client::Client::new(&format!("http://{listen}"), None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(p) = client.pools().await
            && p.len() == 1
            && p[0].idle == 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "serve never had 2 idle agents");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (serve, client)
}

async fn lease_and_release(client: &warmpool::client::Client) {
    let l = client
        .lease(&warmpool::api::CreateLease {
            selector: "linux".into(),
            wait_seconds: Some(10.0),
            ttl_seconds: Some(60.0),
            ..Default::default()
        })
        .await
        .expect("lease granted");
    client.release(&l.id).await.expect("released");
}

async fn sigterm_and_wait(mut serve: Serve) -> std::process::ExitStatus {
    unsafe { libc::kill(serve.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = serve.0.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn serve_keeps_serving_when_stderr_is_a_closed_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // The reader is gone before serve writes its first line, as with `serve 2>&1 | head -1`
    // once head has exited.
    drop(unsafe { OwnedFd::from_raw_fd(fds[0]) });
    let write_end = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    let (serve, client) = serve_with(Stdio::from(write_end), tmp.path()).await;
    for _ in 0..3 {
        lease_and_release(&client).await;
    }
    let status = sigterm_and_wait(serve).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "work dir left behind: {left:?}");
}

#[tokio::test]
async fn serve_logs_to_a_file_without_colours_and_stops_without_warnings() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("serve.log");
    let file = std::fs::File::create(&log).unwrap();
    let work = tmp.path().join("tmp");
    std::fs::create_dir(&work).unwrap();
    let (serve, client) = serve_with(Stdio::from(file), &work).await;
    lease_and_release(&client).await;
    let status = sigterm_and_wait(serve).await;
    assert_eq!(status.code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("INFO"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "escape codes in a log file:\n{text}"
    );
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        warnings.is_empty(),
        "a normal run and shutdown warned: {warnings:#?}"
    );
}
