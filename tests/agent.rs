//! `warmpool agent` against a scripted fake hub (a plain tokio-tungstenite server in the test):
//! reconnect after refusals, welcome, heartbeats, exec output before exit, drain.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use warmpool::protocol::{AgentMessage, HubMessage, Stream, decode_output};

async fn next_json(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> AgentMessage {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("agent talks")
            .expect("open")
            .expect("ok");
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).expect("valid agent message");
        }
    }
}

/// Accepts the agent's connection as a fake hub: reads its `hello` and answers `welcome` with
/// this id and heartbeat interval.
async fn accept_and_welcome(
    listener: &TcpListener,
    agent_id: &str,
    heartbeat_interval_ms: u64,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    assert!(matches!(
        next_json(&mut ws).await,
        AgentMessage::Hello { .. }
    ));
    let welcome = HubMessage::Welcome {
        protocol: 1,
        agent_id: agent_id.into(),
        heartbeat_interval_ms,
        max_frame_bytes: 1 << 20,
    };
    ws.send(Message::Text(
        serde_json::to_string(&welcome).unwrap().into(),
    ))
    .await
    .unwrap();
    ws
}

#[tokio::test]
async fn agent_reconnects_runs_exec_and_drains() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ws_dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(support::EXE)
        .arg("agent")
        .env("WARMPOOL_HUB", format!("ws://{addr}/"))
        .env("WARMPOOL_AGENT_ID", "fake-1")
        .env("WARMPOOL_TOKEN", "t0k3n")
        .env("WARMPOOL_WORKSPACE", ws_dir.path())
        .env("WARMPOOL_MAX_BACKOFF", "300ms")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // Refuse the first two connections with a reason; the agent must come back each time.
    for _ in 0..2 {
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let AgentMessage::Hello {
            agent_id,
            token,
            protocol,
            ..
        } = next_json(&mut ws).await
        else {
            panic!("hello first")
        };
        assert_eq!(
            (agent_id.as_str(), token.as_str(), protocol),
            ("fake-1", "t0k3n", 1)
        );
        ws.send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(4429),
            reason: "busy".into(),
        })))
        .await
        .unwrap();
    }
    let mut ws = accept_and_welcome(&listener, "fake-1", 100).await;
    assert!(
        matches!(next_json(&mut ws).await, AgentMessage::Heartbeat { .. }),
        "heartbeats flow"
    );

    let exec = serde_json::json!({"type":"exec","execId":5,"script":"echo one; echo two >&2; echo three; exit 4"});
    ws.send(Message::Text(exec.to_string().into()))
        .await
        .unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Binary(b) => {
                let (s, id, d) = decode_output(&b).unwrap();
                assert_eq!(id, 5);
                match s {
                    Stream::Stdout => out.extend_from_slice(d),
                    _ => err.extend_from_slice(d),
                }
            }
            Message::Text(t) => match serde_json::from_str::<AgentMessage>(&t).unwrap() {
                AgentMessage::Exit { exec_id, status } => {
                    assert_eq!(exec_id, 5);
                    break status;
                }
                AgentMessage::Heartbeat { .. } => {}
                other => panic!("{other:?}"),
            },
            _ => {}
        }
    };
    assert_eq!(
        out, b"one\nthree\n",
        "stdout complete and in order before exit"
    );
    assert_eq!(err, b"two\n");
    assert_eq!(status.code, Some(4));

    // Release: workspace wiped, ready reported.
    std::fs::write(ws_dir.path().join("junk"), b"x").unwrap();
    ws.send(Message::Text(r#"{"type":"release","lease":"l-1"}"#.into()))
        .await
        .unwrap();
    loop {
        match next_json(&mut ws).await {
            AgentMessage::Ready { lease, health, .. } => {
                assert_eq!(lease.as_deref(), Some("l-1"));
                assert_eq!(health.workspace_bytes, 0);
                assert_eq!(health.leftover_processes, 0);
                break;
            }
            AgentMessage::Heartbeat { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(!ws_dir.path().join("junk").exists());

    // Drain: the agent closes and exits 0.
    ws.send(Message::Text(r#"{"type":"drain","reason":"test"}"#.into()))
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// A `warmpool agent` dialing the fake hub at `addr` as `id`, reaped when dropped.
fn spawn_agent(addr: std::net::SocketAddr, id: &str, workspace: &std::path::Path) -> Reap {
    Reap(
        Command::new(support::EXE)
            .arg("agent")
            .env("WARMPOOL_HUB", format!("ws://{addr}/"))
            .env("WARMPOOL_AGENT_ID", id)
            .env("WARMPOOL_TOKEN", "t0k3n")
            .env("WARMPOOL_WORKSPACE", workspace)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Kills the agent process when the test ends, also on a failure.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An idle agent asks the hub to answer its heartbeat only after 1.5 intervals of silence: the
/// second heartbeat after the welcome asks (2 intervals of silence), the next one, an interval
/// after that answer, does not. (A 1 s interval leaves each timer half a second of slack.)
#[tokio::test]
async fn idle_agent_asks_for_every_second_heartbeat_answer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ws_dir = tempfile::tempdir().unwrap();
    let _child = spawn_agent(addr, "fake-2", ws_dir.path());
    let mut ws = accept_and_welcome(&listener, "fake-2", 1000).await;
    let mut asks = Vec::new();
    while asks.len() < 3 {
        let AgentMessage::Heartbeat { answer, .. } = next_json(&mut ws).await else {
            panic!("an idle agent sends only heartbeats");
        };
        if answer {
            ws.send(Message::Text(r#"{"type":"heartbeat"}"#.into()))
                .await
                .unwrap();
        }
        asks.push(answer);
    }
    assert_eq!(
        &asks[1..],
        [true, false],
        "asks after two silent intervals, not one interval after an answer: {asks:?}"
    );
}

/// The agent's text messages and stdout until the exit of exec `id` (heartbeats skipped).
async fn until_exit(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    id: u64,
) -> (Vec<AgentMessage>, Vec<u8>, warmpool::protocol::ExitStatus) {
    let (mut texts, mut out) = (Vec::new(), Vec::new());
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("agent talks")
            .expect("open")
            .expect("ok")
        {
            Message::Binary(b) => {
                let (s, exec_id, d) = decode_output(&b).unwrap();
                if exec_id == id && s == Stream::Stdout {
                    out.extend_from_slice(d);
                }
            }
            Message::Text(t) => match serde_json::from_str::<AgentMessage>(&t).unwrap() {
                AgentMessage::Exit { exec_id, status } if exec_id == id => {
                    return (texts, out, status);
                }
                AgentMessage::Heartbeat { .. } => {}
                other => texts.push(other),
            },
            _ => {}
        }
    }
}

/// A quiet `release` (the hub counts the agent idle already) is answered by nothing when nothing
/// is left, and the agent serves the next lease at once. When something is left after all (here
/// a file the hub did not know of), the agent cleans before it reads the next message and
/// reports `ready` for that lease: the next lease's command finds the workspace clean.
#[tokio::test]
async fn a_quiet_release_is_answered_only_when_something_was_left() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ws_dir = tempfile::tempdir().unwrap();
    let _child = spawn_agent(addr, "fake-3", ws_dir.path());
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    let AgentMessage::Hello { quiet_release, .. } = next_json(&mut ws).await else {
        panic!("hello first")
    };
    assert!(quiet_release, "the agent offers quiet releases");
    let welcome = HubMessage::Welcome {
        protocol: 1,
        agent_id: "fake-3".into(),
        heartbeat_interval_ms: 60_000,
        max_frame_bytes: 1 << 20,
    };
    let send = |m: serde_json::Value| Message::Text(m.to_string().into());
    ws.send(Message::Text(
        serde_json::to_string(&welcome).unwrap().into(),
    ))
    .await
    .unwrap();
    let ls = |id: u64| serde_json::json!({"type": "exec", "execId": id, "argv": ["ls", "-A"]});

    // Nothing left: no answer. (An `attach` of an unknown exec is answered at once, with no
    // side effect. A `ready` for l-1, sent now or later, would show up below, before the exit
    // of l-3's command.)
    for m in [
        serde_json::json!({"type": "leased", "lease": "l-1"}),
        serde_json::json!({"type": "release", "lease": "l-1", "quiet": true}),
        serde_json::json!({"type": "attach", "execId": 99, "offset": 0}),
    ] {
        ws.send(send(m)).await.unwrap();
    }
    let first = loop {
        match next_json(&mut ws).await {
            AgentMessage::Heartbeat { .. } => {}
            other => break other,
        }
    };
    assert!(
        matches!(first, AgentMessage::Attached { exec_id: 99, .. }),
        "nothing answers the quiet release: {first:?}"
    );

    // Something left that the hub did not know of: cleaned, and reported, before the next
    // lease's command runs.
    std::fs::write(ws_dir.path().join("junk"), b"x").unwrap();
    for m in [
        serde_json::json!({"type": "leased", "lease": "l-2"}),
        serde_json::json!({"type": "release", "lease": "l-2", "quiet": true}),
        serde_json::json!({"type": "leased", "lease": "l-3"}),
        ls(8),
    ] {
        ws.send(send(m)).await.unwrap();
    }
    let (texts, out, status) = until_exit(&mut ws, 8).await;
    match texts.as_slice() {
        [AgentMessage::Ready { lease, health, .. }] => {
            assert_eq!(lease.as_deref(), Some("l-2"));
            assert_eq!((health.workspace_bytes, health.leftover_processes), (0, 0));
        }
        other => panic!("expected one ready for l-2, got {other:?}"),
    }
    assert_eq!(
        (String::from_utf8_lossy(&out).as_ref(), status.code),
        ("", Some(0)),
        "the workspace was wiped before the next command"
    );
}
