//! Jobs survive a lost connection (process backend, the service keeps running): the agent's
//! connection to the hub cut and restored mid-job, the `run` client's exec socket cut and
//! re-attached, and output past the agent's buffer reported as lost, never silently.

#[path = "support/run.rs"]
mod run;
mod support;
#[path = "support/tcp_proxy.rs"]
mod tcp_proxy;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use run::spawn_run;
use support::*;
use tcp_proxy::TcpProxy;
use warmpool::engine::AgentState;

const POOL: &str = "pools:\n  - name: linux\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 1\n    maxUses: 0\n";

/// A server whose agents reach the hub through a proxy that the test can cut.
async fn behind_proxy() -> (Harness, TcpProxy) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = TcpProxy::start(listener.local_addr().unwrap()).await;
    let mut cfg = test_config(POOL);
    cfg.hub_url = Some(format!("ws://{}/v1/agents/connect", proxy.addr));
    let server = warmpool::server::start(listener, cfg).await.unwrap();
    let client = warmpool::client::Client::new(&server.base_url(), None);
    (Harness { server, client }, proxy)
}

#[tokio::test]
async fn a_job_keeps_running_and_streaming_while_the_agents_connection_is_cut() {
    let (h, proxy) = behind_proxy().await;
    h.wait_idle("linux", 1).await;
    let agent = h.agents_in(AgentState::Idle)[0].clone();
    let pid = h.server.process().pid_of(&agent).unwrap();
    let run = spawn_run(
        &h.server.base_url(),
        "linux",
        "for i in $(seq 1 150); do echo line $i; sleep 0.02; done; echo finished >&2; exit 7",
    );
    wait_until("output flowing", Duration::from_secs(10), || {
        run.count() >= 10
    })
    .await;
    // The network between agent and hub fails, and stays down for a few reconnect attempts.
    proxy.cut(true);
    let seen = run.count();
    wait_until("agent retried twice", Duration::from_secs(10), || {
        proxy.refused.load(std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(
        h.agents_in(AgentState::Leased),
        vec![agent.clone()],
        "the agent keeps its lease while away"
    );
    proxy.restore();
    let (code, lines, stderr) = run.wait().await;
    let want: Vec<String> = (1..=150).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, want, "every line once, in order");
    assert!(
        seen < 150,
        "the cut happened mid-job ({seen} lines before it)"
    );
    assert_eq!(stderr, "finished\n");
    assert_eq!(code, 7, "the job's own exit code");
    // The same agent process served throughout: nothing was killed or replaced.
    assert_eq!(h.server.process().pid_of(&agent), Some(pid));
    assert_eq!(h.recycles("disconnected"), 0);
    assert_eq!(h.recycles("heartbeat-lost"), 0);
    wait_until("lease released", Duration::from_secs(5), || {
        h.pool("linux").idle == 1
    })
    .await;
    h.server.shutdown().await;
}

#[tokio::test]
async fn run_re_attaches_when_its_exec_socket_is_cut() {
    let h = start_pools(POOL).await;
    h.wait_idle("linux", 1).await;
    let front = TcpProxy::start(h.server.addr).await;
    let run = spawn_run(
        &format!("http://{}", front.addr),
        "linux",
        "for i in $(seq 1 150); do echo line $i; sleep 0.02; done; exit 5",
    );
    wait_until("output flowing", Duration::from_secs(10), || {
        run.count() >= 10
    })
    .await;
    front.cut(true);
    wait_until("client retried", Duration::from_secs(10), || {
        front.refused.load(std::sync::atomic::Ordering::SeqCst) >= 1
    })
    .await;
    front.restore();
    let (code, lines, stderr) = run.wait().await;
    let want: Vec<String> = (1..=150).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, want, "every line once, in order; stderr: {stderr}");
    assert_eq!(code, 5);
    assert_eq!(stderr, "");
    h.server.shutdown().await;
}

#[tokio::test]
async fn output_beyond_the_agents_buffer_is_reported_as_lost() {
    let (h, proxy) = behind_proxy().await;
    h.wait_idle("linux", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let done = dir.path().join("done");
    // 10 MB written while the agent is away: more than its 8 MiB buffer.
    let script = format!(
        "echo start; while [ ! -e {go} ]; do sleep 0.01; done; head -c 10000000 /dev/zero | tr '\\0' x; echo; touch {done}; echo end",
        go = go.display(),
        done = done.display()
    );
    let mut child = Command::new(EXE)
        .args(["run", "-s", "linux", "--", "sh", "-c", &script])
        .env("WARMPOOL_SERVER", h.server.base_url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 6];
    let mut out = tokio::task::spawn_blocking(move || {
        out.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"start\n");
        out
    })
    .await
    .unwrap();
    proxy.cut(true);
    std::fs::write(&go, "").unwrap();
    wait_until("job wrote its output", Duration::from_secs(20), || {
        done.exists()
    })
    .await;
    proxy.restore();
    let (status, rest, stderr) = tokio::task::spawn_blocking(move || {
        let mut rest = Vec::new();
        out.read_to_end(&mut rest).unwrap();
        let mut e = String::new();
        child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
        (child.wait().unwrap(), rest, e)
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(rest.ends_with(b"x\nend\n"));
    let lost: u64 = stderr
        .strip_prefix("warmpool: ")
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a lost-bytes notice on stderr: {stderr:?}"));
    assert!(stderr.contains("bytes of output were lost"), "{stderr:?}");
    // What arrived plus what was lost is exactly what the job wrote after "start\n".
    assert_eq!(rest.len() as u64 + lost, 10_000_000 + 1 + 4);
    assert!(rest[..rest.len() - 6].iter().all(|b| *b == b'x'));
    h.server.shutdown().await;
}

const MANUAL: &str = "pools:\n  - name: manual\n    labels: [manual]\n    minIdle: 2\n    maxTotal: 2\n    maxUses: 0\n    connectTimeout: 60s\n    agentCommand: [sleep, \"600\"]\n";

/// Plays an agent by hand: hello (with `execs` when `execs` is Some), then the welcome.
async fn hand_agent(h: &Harness, id: &str, execs: Option<serde_json::Value>) -> Ws {
    use futures_util::SinkExt;
    let mut hello = serde_json::json!({
        "type": "hello", "protocol": 1, "agentId": id,
        "token": h.server.svc.key.token(id), "labels": []
    });
    if let Some(e) = execs {
        hello["execs"] = e;
    }
    let mut ws = raw_agent(&h.hub_url()).await;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        hello.to_string().into(),
    ))
    .await
    .unwrap();
    let welcome = next_text(&mut ws).await;
    assert!(welcome.contains("welcome"), "{welcome}");
    ws
}

async fn next_text(ws: &mut Ws) -> String {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10s")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let t = t.to_string();
                if !t.contains("\"heartbeat\"") && !t.contains("\"leased\"") {
                    return t;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
}

#[tokio::test]
async fn agents_are_told_apart_by_execs_in_hello() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let h = start_pools(MANUAL).await;
    wait_until("two agents to play", Duration::from_secs(10), || {
        h.agents_in(AgentState::Connecting).len() == 2
    })
    .await;
    let ids = h.agents_in(AgentState::Connecting);

    // An agent of an earlier build (no `execs`): its connection drops mid-exec, the exec
    // client hears at once that the agent is lost, and the agent is replaced, as before.
    let mut old = hand_agent(&h, &ids[0], None).await;
    let l = h.lease("manual", 5.0, 60.0).await;
    assert_eq!(l.agent, ids[0]);
    let c = h.client.clone();
    let id = l.id.clone();
    let job = tokio::spawn(async move {
        c.exec(&id, script("sleep 1"), |_, _| {}, std::future::pending())
            .await
    });
    assert!(next_text(&mut old).await.contains("\"exec\""));
    drop(old);
    match job.await.unwrap() {
        Err(warmpool::client::Error::Exec { code, .. }) => assert_eq!(code, "agent_lost"),
        other => panic!("{other:?}"),
    }
    wait_until("old agent replaced", Duration::from_secs(5), || {
        h.recycles("disconnected") == 1
    })
    .await;

    // An agent that reports `execs`: it keeps its lease while away, and when it comes back
    // reporting the exec, the hub asks it to resume from the bytes already routed.
    let mut new = hand_agent(&h, &ids[1], Some(serde_json::json!([]))).await;
    let l = h.lease("manual", 5.0, 60.0).await;
    assert_eq!(l.agent, ids[1]);
    let c = h.client.clone();
    let id = l.id.clone();
    let job = tokio::spawn(async move {
        let mut out = Vec::new();
        let st = c
            .exec(
                &id,
                script("echo one; echo two"),
                |_, d| out.extend_from_slice(d),
                std::future::pending(),
            )
            .await;
        (st, out)
    });
    let exec: serde_json::Value = serde_json::from_str(&next_text(&mut new).await).unwrap();
    assert_eq!(exec["type"], "exec");
    let exec_id = exec["execId"].as_u64().unwrap();
    new.send(Message::Binary(
        warmpool::protocol::encode_output(warmpool::protocol::Stream::Stdout, exec_id, b"one\n")
            .into(),
    ))
    .await
    .unwrap();
    // Wait until the hub routed those 4 bytes, then the connection drops.
    wait_until("first bytes routed", Duration::from_secs(5), || {
        h.server.svc.hub.routed_offset(&ids[1]) == Some(4)
    })
    .await;
    drop(new);
    wait_until("agent away, still leased", Duration::from_secs(5), || {
        h.server
            .svc
            .read(|e| e.agent(&ids[1]).is_some_and(|a| a.away))
    })
    .await;
    assert_eq!(h.agents_in(AgentState::Leased), vec![ids[1].clone()]);
    let report = serde_json::json!([{"execId": exec_id, "running": true, "first": 0, "next": 8}]);
    let mut back = hand_agent(&h, &ids[1], Some(report)).await;
    let attach: serde_json::Value = serde_json::from_str(&next_text(&mut back).await).unwrap();
    assert_eq!(
        attach,
        serde_json::json!({"type": "attach", "execId": exec_id, "offset": 4})
    );
    let attached = serde_json::json!({"type": "attached", "execId": exec_id, "offset": 4});
    back.send(Message::Text(attached.to_string().into()))
        .await
        .unwrap();
    back.send(Message::Binary(
        warmpool::protocol::encode_output(warmpool::protocol::Stream::Stdout, exec_id, b"two\n")
            .into(),
    ))
    .await
    .unwrap();
    let exit = serde_json::json!({"type": "exit", "execId": exec_id, "code": 0});
    back.send(Message::Text(exit.to_string().into()))
        .await
        .unwrap();
    let (st, out) = job.await.unwrap();
    assert_eq!(st.unwrap().code, Some(0));
    assert_eq!(out, b"one\ntwo\n");
    assert_eq!(h.recycles("disconnected"), 1, "only the old-build agent");
    h.server.shutdown().await;
}
