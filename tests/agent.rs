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
        agent_id: "fake-1".into(),
        heartbeat_interval_ms: 100,
        max_frame_bytes: 1 << 20,
    };
    ws.send(Message::Text(
        serde_json::to_string(&welcome).unwrap().into(),
    ))
    .await
    .unwrap();
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

/// Stops the agent under test whatever happens (SIGTERM: it stops its jobs; then SIGKILL), and
/// the test's marker processes with it.
struct AgentGuard(std::process::Child, &'static str);

impl Drop for AgentGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
        for pid in support::pids_matching(self.1) {
            // SAFETY: a marker process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// How many `sleep` processes have `marker` in their command line.
fn sleeps(marker: &str) -> usize {
    support::pids_matching(marker)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
        })
        .count()
}

/// A retired agent (no uses left, rolled, too old...) exits by itself at once, status 0, with
/// its job's process group and what the job left behind killed: the hub sends `retire` and
/// nothing else (no close, no signal from a backend).
#[tokio::test]
async fn retired_agent_stops_its_jobs_and_exits_0_by_itself() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ws_dir = tempfile::tempdir().unwrap();
    let marker = "sleep 9870";
    let mut guard = AgentGuard(
        Command::new(support::EXE)
            .arg("agent")
            .env("WARMPOOL_HUB", format!("ws://{addr}/"))
            .env("WARMPOOL_AGENT_ID", "fake-retire")
            .env("WARMPOOL_TOKEN", "t0k3n")
            .env("WARMPOOL_WORKSPACE", ws_dir.path())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        marker,
    );
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
        agent_id: "fake-retire".into(),
        // Long: this fake hub sends no heartbeats, and the agent must not give up on it.
        heartbeat_interval_ms: 10_000,
        max_frame_bytes: 1 << 20,
    };
    ws.send(Message::Text(
        serde_json::to_string(&welcome).unwrap().into(),
    ))
    .await
    .unwrap();
    // A job that runs on, and a daemon it left in another session.
    let script = format!("setsid {marker}1 >/dev/null 2>&1 & {marker}2");
    let exec = serde_json::json!({"type":"exec","execId":1,"script":script});
    ws.send(Message::Text(exec.to_string().into()))
        .await
        .unwrap();
    support::wait_until("job and daemon running", Duration::from_secs(10), || {
        sleeps(marker) >= 2
    })
    .await;
    // (Raw JSON: the message as it travels; an agent that does not know it ignores it.)
    let retire = r#"{"type":"retire","reason":"max-uses"}"#;
    ws.send(Message::Text(retire.into())).await.unwrap();
    // The hub keeps reading (a fake hub that only reads: no close from this side).
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = guard.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the retired agent is still running 10 s after `retire`"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    support::wait_until("job and daemon gone", Duration::from_secs(5), || {
        support::pids_matching(marker).is_empty()
    })
    .await;
    reader.abort();
}
