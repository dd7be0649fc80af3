//! Hub protocol tests with raw WebSocket clients: authentication, duplicates, bad frames.
//! A pool whose agent command never dials (`sleep`) gives agent ids the service knows, so a test
//! can play that agent by hand.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::Message;
use warmpool::engine::AgentState;
use warmpool::protocol::{HubMessage, Stream, close, encode_output};

const POOLS: &str = "
pools:
  - name: manual
    labels: [manual]
    minIdle: 2
    maxTotal: 2
    connectTimeout: 60s
    agentCommand: [sleep, \"600\"]
  - name: real
    labels: [linux]
    minIdle: 1
    maxTotal: 2
";

async fn setup() -> (Harness, Vec<String>) {
    let mut cfg = test_config(POOLS);
    cfg.service.max_frame_bytes = 64 * 1024;
    let h = start_with(cfg).await;
    wait_until("manual agents started", Duration::from_secs(10), || {
        h.agents_in(AgentState::Connecting).len() == 2
    })
    .await;
    let ids = h.agents_in(AgentState::Connecting);
    (h, ids)
}

fn metric_of(h: &Harness, name: &str, label: &str) -> f64 {
    let text = h.server.svc.render_metrics();
    metric(&text, &format!("{name}{{reason=\"{label}\"}}")).unwrap_or(0.0)
}

#[tokio::test]
async fn tokens_unknown_ids_duplicates_and_versions_are_refused_with_reasons() {
    let (h, ids) = setup().await;
    let id = &ids[0];
    let token = h.server.svc.key.token(id);

    let mut ws = raw_agent(&h.hub_url()).await;
    ws.send(hello(id, &h.server.svc.key.token("someone-else")))
        .await
        .unwrap();
    let (code, reason, _) = read_until_close(&mut ws).await;
    assert_eq!(code, close::INVALID_TOKEN);
    assert!(
        reason.contains("invalid token") && reason.contains(id),
        "{reason}"
    );

    let mut ws = raw_agent(&h.hub_url()).await;
    ws.send(hello("ghost-1", &h.server.svc.key.token("ghost-1")))
        .await
        .unwrap();
    let (code, reason, _) = read_until_close(&mut ws).await;
    assert_eq!(code, close::UNKNOWN_AGENT);
    assert!(reason.contains("ghost-1"), "{reason}");

    let mut ws = raw_agent(&h.hub_url()).await;
    let hello_v2 = serde_json::json!({"type":"hello","protocol":2,"agentId":id,"token":token});
    ws.send(Message::Text(hello_v2.to_string().into()))
        .await
        .unwrap();
    let (code, reason, _) = read_until_close(&mut ws).await;
    assert_eq!(code, close::UNSUPPORTED_VERSION);
    assert!(reason.contains("version 2"), "{reason}");

    let mut first = raw_agent(&h.hub_url()).await;
    let welcome = register(&mut first, id, &token).await;
    assert!(welcome.contains("\"welcome\""), "{welcome}");
    wait_until("registered agent idle", Duration::from_secs(5), || {
        h.pool("manual").idle == 1
    })
    .await;

    let mut second = raw_agent(&h.hub_url()).await;
    second.send(hello(id, &token)).await.unwrap();
    let (code, reason, _) = read_until_close(&mut second).await;
    assert_eq!(code, close::DUPLICATE_AGENT);
    assert!(
        reason.contains("already connected") && reason.contains(id),
        "{reason}"
    );
    // The first connection is untouched.
    assert_eq!(h.pool("manual").idle, 1);
    assert!(h.server.svc.hub.is_connected(id));

    assert_eq!(
        metric_of(&h, "warmpool_rejected_connections_total", "invalid-token"),
        1.0
    );
    assert_eq!(
        metric_of(&h, "warmpool_rejected_connections_total", "unknown-agent"),
        1.0
    );
    assert_eq!(
        metric_of(&h, "warmpool_rejected_connections_total", "duplicate-agent"),
        1.0
    );
    assert_eq!(
        metric_of(&h, "warmpool_rejected_connections_total", "version"),
        1.0
    );
    h.server.shutdown().await;
}

async fn registered(h: &Harness, id: &str) -> Ws {
    let mut ws = raw_agent(&h.hub_url()).await;
    register(&mut ws, id, &h.server.svc.key.token(id)).await;
    ws
}

#[tokio::test]
async fn bad_frames_close_only_the_offending_connection() {
    let (h, ids) = setup().await;
    h.wait_idle("real", 1).await;

    // Oversized frame: 1009, counted.
    let mut ws = registered(&h, &ids[0]).await;
    ws.send(Message::Binary(vec![1u8; 64 * 1024 + 10].into()))
        .await
        .unwrap();
    let (code, reason, _) = read_until_close(&mut ws).await;
    assert_eq!(code, close::TOO_BIG, "{reason}");
    assert!(reason.contains("exceeds 65536 bytes"), "{reason}");
    wait_until("frame-too-large counted", Duration::from_secs(5), || {
        metric_of(&h, "warmpool_protocol_errors_total", "frame-too-large") == 1.0
    })
    .await;

    // Malformed JSON: 4400 with a reason.
    let mut ws = registered(&h, &ids[1]).await;
    ws.send(Message::Text("{not json".into())).await.unwrap();
    let (code, reason, _) = read_until_close(&mut ws).await;
    assert_eq!(code, close::PROTOCOL_VIOLATION);
    assert!(reason.contains("malformed"), "{reason}");

    // Both offenders are recycled (disconnected), nothing else is.
    wait_until("offenders terminated", Duration::from_secs(5), || {
        h.recycles("disconnected") == 2
    })
    .await;

    // The real pool still leases and runs jobs.
    let l = h.lease("linux", 5.0, 60.0).await;
    let st = h
        .client
        .exec(
            &l.id,
            warmpool::protocol::ExecSpec {
                script: Some("echo fine".into()),
                ..Default::default()
            },
            |_, _| {},
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(st.code, Some(0));
    h.server.shutdown().await;
}

#[tokio::test]
async fn unknown_messages_short_frames_and_second_hello_are_violations() {
    let (h, ids) = setup().await;
    for (i, bad) in [
        Message::Text(r#"{"type":"launch","missiles":true}"#.into()),
        Message::Binary(vec![1u8, 2, 3].into()),
    ]
    .into_iter()
    .enumerate()
    {
        let mut ws = registered(&h, &ids[i]).await;
        ws.send(bad).await.unwrap();
        let (code, reason, _) = read_until_close(&mut ws).await;
        assert_eq!(code, close::PROTOCOL_VIOLATION, "{reason}");
    }
    // A later generation of agent ids to test the second hello.
    wait_until("replacements", Duration::from_secs(10), || {
        h.agents_in(AgentState::Connecting).len() == 2
    })
    .await;
    let id = h.agents_in(AgentState::Connecting)[0].clone();
    let mut ws = registered(&h, &id).await;
    ws.send(hello(&id, &h.server.svc.key.token(&id)))
        .await
        .unwrap();
    let (code, reason, _) = read_until_close(&mut ws).await;
    assert_eq!(code, close::PROTOCOL_VIOLATION);
    assert!(reason.contains("hello sent twice"), "{reason}");
    // Output for an exec nobody started is dropped, not an error.
    wait_until("more replacements", Duration::from_secs(10), || {
        !h.agents_in(AgentState::Connecting).is_empty()
    })
    .await;
    let id = h.agents_in(AgentState::Connecting)[0].clone();
    let mut ws = registered(&h, &id).await;
    ws.send(Message::Binary(
        encode_output(Stream::Stdout, 999, b"stray").into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Text(
        r#"{"type":"heartbeat","health":{"workspaceBytes":0,"leftoverProcesses":0}}"#.into(),
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(h.server.svc.hub.is_connected(&id));
    h.server.shutdown().await;
}

#[tokio::test]
async fn handshake_rate_limit_answers_429() {
    let mut cfg = test_config(POOLS);
    cfg.service.handshakes_per_second = 1;
    let h = start_with(cfg).await;
    let mut refused = 0;
    for _ in 0..5 {
        if let Err(tokio_tungstenite::tungstenite::Error::Http(resp)) =
            tokio_tungstenite::connect_async(h.hub_url()).await
        {
            assert_eq!(resp.status().as_u16(), 429);
            refused += 1;
        }
    }
    assert!(refused >= 3, "refused {refused}");
    assert!(metric_of(&h, "warmpool_rejected_connections_total", "handshake-rate") >= 3.0);
    h.server.shutdown().await;
}

#[tokio::test]
async fn silent_agent_is_lost_after_heartbeat_timeout() {
    let mut cfg = test_config(POOLS);
    cfg.service.engine.heartbeat_timeout = Duration::from_millis(600);
    let h = start_with(cfg).await;
    wait_until("manual agents", Duration::from_secs(10), || {
        h.agents_in(AgentState::Connecting).len() == 2
    })
    .await;
    let id = h.agents_in(AgentState::Connecting)[0].clone();
    let _ws = registered(&h, &id).await; // never sends a heartbeat
    wait_until("heartbeat loss", Duration::from_secs(5), || {
        h.recycles("heartbeat-lost") >= 1
    })
    .await;
    h.server.shutdown().await;
}

fn heartbeat(workspace_bytes: u64, answer: Option<bool>) -> Message {
    let mut m = serde_json::json!({
        "type": "heartbeat",
        "health": {"workspaceBytes": workspace_bytes, "leftoverProcesses": 0}
    });
    if let Some(a) = answer {
        m["answer"] = a.into();
    }
    Message::Text(m.to_string().into())
}

/// The next message from the hub, parsed.
async fn next_hub_message(ws: &mut Ws) -> HubMessage {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the hub talks within 10 s")
            .expect("open")
            .expect("ok");
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).expect("a hub message");
        }
    }
}

/// A heartbeat is answered only when it asks (`answer`; absent, as from agents before the
/// field: yes). An idle agent asks on every second one, so its heartbeats cost the hub one
/// message per interval instead of two (docs/PROTOCOL.md, "Heartbeats, both ways").
#[tokio::test]
async fn heartbeats_are_answered_only_when_asked() {
    let (h, ids) = setup().await;
    let id = ids[0].clone();
    let mut ws = registered(&h, &id).await;
    for bytes in 1..=3 {
        ws.send(heartbeat(bytes, Some(false))).await.unwrap();
    }
    // All three handled (the last one's health is in), and the liveness they carry counted.
    wait_until("heartbeats handled", Duration::from_secs(5), || {
        h.server
            .svc
            .read(|e| e.agent(&id).map(|a| a.health.workspace_bytes))
            == Some(3)
    })
    .await;
    // The lease's `leased` is queued after any answer to those heartbeats.
    let lease = h.lease("manual", 5.0, 60.0).await;
    assert_eq!(lease.agent, id);
    let mut answers = 0;
    loop {
        match next_hub_message(&mut ws).await {
            HubMessage::Heartbeat {} => answers += 1,
            HubMessage::Leased { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        answers, 0,
        "heartbeats that asked for nothing were answered"
    );

    // One that asks, and one without the field: both answered.
    ws.send(heartbeat(4, Some(true))).await.unwrap();
    ws.send(heartbeat(5, None)).await.unwrap();
    for _ in 0..2 {
        assert_eq!(next_hub_message(&mut ws).await, HubMessage::Heartbeat {});
    }
    h.server.shutdown().await;
}

/// A `hello` that offers quiet releases (`quietRelease`, docs/PROTOCOL.md).
fn hello_quiet(agent: &str, token: &str) -> Message {
    let m = serde_json::json!({
        "type": "hello", "protocol": 1, "agentId": agent, "token": token, "labels": [],
        "quietRelease": true
    });
    Message::Text(m.to_string().into())
}

fn state_of(h: &Harness, id: &str) -> AgentState {
    h.server.svc.read(|e| e.agent(id).map(|a| a.state)).unwrap()
}

fn ready(lease: &str) -> Message {
    let m = serde_json::json!({"type": "ready", "lease": lease, "health": {}});
    Message::Text(m.to_string().into())
}

/// A lease in which nothing ran ends with a quiet `release` to an agent that offered it: the
/// agent is Idle as soon as the DELETE is answered, no `ready` is awaited, and the next lease's
/// `leased` follows the release on the connection. An agent that did not offer it gets a plain
/// `release` and stays Cleaning until its `ready` for that lease (one for another lease does
/// not end it).
#[tokio::test]
async fn a_lease_in_which_nothing_ran_ends_with_a_quiet_release() {
    let (h, ids) = manual_agents(2).await;
    let (q, old) = (ids[0].clone(), ids[1].clone());
    let mut wq = registered_quiet(&h, &q).await;
    wait_until("quiet agent idle", Duration::from_secs(5), || {
        h.pool("manual").idle == 1
    })
    .await;
    for _ in 0..2 {
        let l = h.lease("manual", 5.0, 60.0).await;
        assert_eq!(l.agent, q);
        h.client.release(&l.id).await.unwrap();
        assert_eq!(state_of(&h, &q), AgentState::Idle, "idle once released");
        match next_hub_message(&mut wq).await {
            HubMessage::Leased { lease, .. } => assert_eq!(lease, l.id),
            other => panic!("expected leased, got {other:?}"),
        }
        match next_hub_message(&mut wq).await {
            HubMessage::Release { lease, quiet, .. } => {
                assert_eq!(lease, l.id);
                assert!(quiet, "a quiet release");
            }
            other => panic!("expected release, got {other:?}"),
        }
    }
    // Hold the quiet agent; the other one (no `quietRelease`) serves the next lease.
    let held = h.lease("manual", 5.0, 60.0).await;
    assert_eq!(held.agent, q);
    let mut wo = registered(&h, &old).await;
    wait_until("old agent idle", Duration::from_secs(5), || {
        h.pool("manual").idle == 1
    })
    .await;
    let l = h.lease("manual", 5.0, 60.0).await;
    assert_eq!(l.agent, old);
    h.client.release(&l.id).await.unwrap();
    assert_eq!(state_of(&h, &old), AgentState::Cleaning);
    assert!(matches!(
        next_hub_message(&mut wo).await,
        HubMessage::Leased { .. }
    ));
    match next_hub_message(&mut wo).await {
        HubMessage::Release { lease, quiet, .. } => {
            assert_eq!(lease, l.id);
            assert!(!quiet, "a plain release");
        }
        other => panic!("expected release, got {other:?}"),
    }
    // A `ready` for another lease leaves the cleanup running; the one for this lease ends it.
    wo.send(ready(&held.id)).await.unwrap();
    // Handled in order: once the heartbeat behind it is answered, that `ready` was too.
    wo.send(heartbeat(0, Some(true))).await.unwrap();
    assert_eq!(next_hub_message(&mut wo).await, HubMessage::Heartbeat {});
    assert_eq!(state_of(&h, &old), AgentState::Cleaning);
    wo.send(ready(&l.id)).await.unwrap();
    wait_until(
        "old agent idle after its ready",
        Duration::from_secs(5),
        || state_of(&h, &old) == AgentState::Idle,
    )
    .await;
    h.server.shutdown().await;
}

/// Registers agent `id` by hand with `quietRelease`; the socket is past its `welcome`.
async fn registered_quiet(h: &Harness, id: &str) -> Ws {
    let mut ws = raw_agent(&h.hub_url()).await;
    ws.send(hello_quiet(id, &h.server.svc.key.token(id)))
        .await
        .unwrap();
    assert!(matches!(
        next_hub_message(&mut ws).await,
        HubMessage::Welcome { .. }
    ));
    ws
}

/// A pool `manual` of one agent played by hand (reused without limit), registered with
/// `quietRelease` and idle: the server and the agent's socket (past its `welcome`).
async fn one_quiet_agent() -> (Harness, Ws) {
    let (h, ids) = manual_agents(1).await;
    let wq = registered_quiet(&h, &ids[0]).await;
    wait_until("quiet agent idle", Duration::from_secs(5), || {
        h.pool("manual").idle == 1
    })
    .await;
    (h, wq)
}

/// A pool `manual` of `n` agents played by hand (their command never dials), reused without
/// limit: the server and the agents' ids, all still to connect.
async fn manual_agents(n: usize) -> (Harness, Vec<String>) {
    let pools = format!(
        "
pools:
  - name: manual
    labels: [manual]
    minIdle: {n}
    maxTotal: {n}
    maxUses: 0
    connectTimeout: 60s
    agentCommand: [sleep, \"600\"]
"
    );
    let h = start_with(test_config(&pools)).await;
    wait_until("manual agents started", Duration::from_secs(10), || {
        h.agents_in(AgentState::Connecting).len() == n
    })
    .await;
    let ids = h.agents_in(AgentState::Connecting);
    (h, ids)
}

/// A quiet `release` waits in the queue for the next message to its agent (so the two cost one
/// write), at most `DEFER_AT_MOST`; when the hub closes the connection in that time (a restart
/// that leaves the agents to the next instance), the release still goes out before the Close:
/// an agent that missed it would report the ended lease to the next instance, which would
/// restore it.
#[tokio::test]
async fn a_deferred_quiet_release_goes_out_before_the_close() {
    let (h, mut wq) = one_quiet_agent().await;
    let l = h.lease("manual", 5.0, 60.0).await;
    match next_hub_message(&mut wq).await {
        HubMessage::Leased { lease, .. } => assert_eq!(lease, l.id),
        other => panic!("expected leased, got {other:?}"),
    }
    h.client.release(&l.id).await.unwrap();
    // The release is deferred: within DEFER_AT_MOST the hub closes the connection.
    h.server
        .svc
        .hub
        .close_all(close::GOING_AWAY, "warmpool is restarting; reconnect");
    match next_hub_message(&mut wq).await {
        HubMessage::Release { lease, quiet, .. } => {
            assert_eq!(lease, l.id);
            assert!(quiet);
        }
        other => panic!("expected the release before the close, got {other:?}"),
    }
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), wq.next()).await {
            Ok(Some(Ok(Message::Close(c)))) => break c,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a Close, got {other:?}"),
        }
    };
    assert_eq!(
        close.map(|c| u16::from(c.code)),
        Some(close::GOING_AWAY),
        "the Close follows the release"
    );
    h.server.shutdown().await;
}

/// `leased` is deferred (docs/PROTOCOL.md, "Deferred messages"): nothing is written to the agent
/// when the lease is granted; the next message to the agent carries it, in order (here the
/// answer to a heartbeat), and without one it goes out after `DEFER_AT_MOST`.
#[tokio::test]
async fn leased_travels_with_the_next_message_or_after_the_deferral() {
    let (h, mut wq) = one_quiet_agent().await;
    // Granted: nothing is written yet (the flusher waits DEFER_AT_MOST from the first deferred
    // message, so nothing can arrive sooner on its own).
    let t0 = tokio::time::Instant::now();
    let l = h.lease("manual", 5.0, 60.0).await;
    // Checked while the grant is surely younger than DEFER_AT_MOST (a slow machine skips it).
    if t0.elapsed() < warmpool::hub::DEFER_AT_MOST / 2 {
        let quiet_until = t0 + warmpool::hub::DEFER_AT_MOST - Duration::from_millis(1);
        let early = tokio::time::timeout_at(quiet_until, wq.next()).await;
        assert!(early.is_err(), "leased written at once: {early:?}");
    }
    // The next message to the agent carries it, ahead of itself.
    wq.send(heartbeat(0, Some(true))).await.unwrap();
    match next_hub_message(&mut wq).await {
        HubMessage::Leased { lease, .. } => assert_eq!(lease, l.id),
        other => panic!("expected leased, got {other:?}"),
    }
    assert_eq!(next_hub_message(&mut wq).await, HubMessage::Heartbeat {});
    // Without a message behind it, it goes out on its own (after DEFER_AT_MOST).
    h.client.release(&l.id).await.unwrap();
    let l2 = h.lease("manual", 5.0, 60.0).await;
    match next_hub_message(&mut wq).await {
        HubMessage::Release { lease, quiet, .. } => assert!(quiet && lease == l.id),
        other => panic!("expected the quiet release, got {other:?}"),
    }
    match next_hub_message(&mut wq).await {
        HubMessage::Leased { lease, .. } => assert_eq!(lease, l2.id),
        other => panic!("expected leased, got {other:?}"),
    }
    h.server.shutdown().await;
}
