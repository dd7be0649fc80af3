//! External pools: machines warmpool does not start join with the pool's join token, are
//! leased like any agent, are cleaned (not replaced) after a lease, and leave when their
//! connection closes. Real `warmpool agent` processes and raw WebSocket clients.

mod support;

use std::process::Stdio;
use std::time::Duration;

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use warmpool::protocol::close;

const POOLS: &str = "
pools:
  - name: macs
    labels: [macos, arm64]
    external: true
    minIdle: 0
    maxTotal: 2
  - name: local
    labels: [linux]
    minIdle: 0
    maxTotal: 1
";

fn join_hello(agent: &str, pool: &str, token: &str) -> Message {
    Message::Text(
        serde_json::json!({
            "type": "hello", "protocol": 1, "agentId": agent, "pool": pool, "token": token
        })
        .to_string()
        .into(),
    )
}

async fn join_token(h: &Harness, pool: &str) -> (u16, serde_json::Value) {
    let r = h
        .http()
        .await
        .post(h.url(&format!("/v1/pools/{pool}/join-token")))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn start_machine(
    h: &Harness,
    name: &str,
    token: &str,
    dir: &std::path::Path,
) -> tokio::process::Child {
    tokio::process::Command::new(EXE)
        .arg("agent")
        .env("WARMPOOL_HUB", h.hub_url())
        .env("WARMPOOL_AGENT_ID", name)
        .env("WARMPOOL_POOL", "macs")
        .env("WARMPOOL_TOKEN", token)
        .env("WARMPOOL_WORKSPACE", dir.join(name))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn machines_join_with_the_pool_token_and_are_reused_after_release() {
    let h = start_pools(POOLS).await;
    let (status, body) = join_token(&h, "local").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "pool_not_external", "{body}");
    assert_eq!(join_token(&h, "nope").await.0, 404);
    let (status, body) = join_token(&h, "macs").await;
    assert_eq!(status, 200);
    let token = body["token"].as_str().unwrap().to_string();

    let dir = tempfile::tempdir().unwrap();
    let mut m1 = start_machine(&h, "mini-1", &token, dir.path());
    let _m2 = start_machine(&h, "mini-2", &token, dir.path());
    h.wait_idle("macs", 2).await;

    // Full: a third machine is refused with a reason, and nothing is provisioned.
    let mut ws = raw_agent(&h.hub_url()).await;
    ws.send(join_hello("mini-3", "macs", &token)).await.unwrap();
    let (code, reason, _) = read_until_close(&mut ws).await;
    assert_eq!(code, close::POOL_FULL);
    assert!(reason.contains("maxTotal"), "{reason}");
    // A join token is per pool, and an id must be a plain name.
    let mut ws = raw_agent(&h.hub_url()).await;
    ws.send(join_hello("mini-3", "local", &token))
        .await
        .unwrap();
    assert_eq!(read_until_close(&mut ws).await.0, close::INVALID_TOKEN);
    let mut ws = raw_agent(&h.hub_url()).await;
    ws.send(join_hello("bad id/../", "macs", &token))
        .await
        .unwrap();
    assert_eq!(read_until_close(&mut ws).await.0, close::PROTOCOL_VIOLATION);

    // Leased, run, released: cleaned and idle again (maxUses does not replace a machine).
    for _ in 0..3 {
        let l = h.lease("macos && arm64", 5.0, 30.0).await;
        assert!(l.agent.starts_with("mini-"), "{}", l.agent);
        let out = exec(&h, &l.id, script("echo on $WARMPOOL_AGENT_ID")).await;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("on {}", l.agent)
        );
        h.client.release(&l.id).await.unwrap();
        h.wait_idle("macs", 2).await;
    }
    assert_eq!(h.pool("macs").total, 2);
    assert_eq!(h.recycles("max-uses"), 0);

    // A machine that goes away leaves the pool; it may join again.
    m1.kill().await.unwrap();
    wait_until("mini-1 gone", Duration::from_secs(10), || {
        h.pool("macs").total == 1
    })
    .await;
    let _m1 = start_machine(&h, "mini-1", &token, dir.path());
    h.wait_idle("macs", 2).await;
}
