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
