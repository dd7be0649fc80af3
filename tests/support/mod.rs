//! Test harness: starts warmpool in-process on 127.0.0.1:0 with the process backend and real
//! `warmpool agent` child processes, and offers polling helpers (no sleeps to wait for
//! conditions: every wait polls with a deadline).
#![allow(dead_code)]

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use warmpool::api::CreateLease;
use warmpool::client::Client;
use warmpool::engine::{AgentState, PoolStatus};
use warmpool::protocol::{ExecSpec, ExitStatus, Stream};
use warmpool::server::{Running, ServeConfig, start};
use warmpool::spec::parse_pools;

pub const EXE: &str = env!("CARGO_BIN_EXE_warmpool");

pub struct Harness {
    pub server: Running,
    pub client: Client,
}

/// Fast timings for tests.
pub fn test_config(pools_yaml: &str) -> ServeConfig {
    let mut cfg = ServeConfig::new(EXE.into());
    cfg.pools = parse_pools(pools_yaml, "test").expect("valid test pools");
    cfg.service.heartbeat_interval = Duration::from_millis(200);
    cfg.service.engine.heartbeat_timeout = Duration::from_secs(5);
    cfg.service.tick = Duration::from_millis(20);
    cfg.service.handshakes_per_second = 1000;
    cfg.shutdown_grace = Duration::from_millis(500);
    cfg.agent_grace = Duration::from_secs(1);
    cfg
}

pub async fn start_with(cfg: ServeConfig) -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = start(listener, cfg).await.expect("server starts");
    let client = Client::new(&server.base_url(), None);
    Harness { server, client }
}

/// Starts on a given address (a restarted instance reuses its predecessor's, as a Service
/// name stays the same in a cluster).
pub async fn start_at(cfg: ServeConfig, addr: std::net::SocketAddr) -> Harness {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = start(listener, cfg).await.expect("server starts");
    let client = Client::new(&server.base_url(), None);
    Harness { server, client }
}

pub async fn start_pools(pools_yaml: &str) -> Harness {
    start_with(test_config(pools_yaml)).await
}

impl Harness {
    pub fn pool(&self, name: &str) -> PoolStatus {
        self.server
            .svc
            .pools()
            .into_iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("pool {name} exists"))
    }

    pub async fn wait_idle(&self, name: &str, n: u32) {
        // The pool may not exist yet (an AgentPool still on its way through the watch).
        wait_until(
            &format!("{n} idle agents in {name}"),
            Duration::from_secs(20),
            || {
                self.server
                    .svc
                    .pools()
                    .iter()
                    .any(|p| p.name == name && p.idle >= n)
            },
        )
        .await;
    }

    pub fn agents_in(&self, state: AgentState) -> Vec<String> {
        let mut v: Vec<String> = self.server.svc.read(|e| {
            e.agents()
                .filter(|a| a.state == state)
                .map(|a| a.id.clone())
                .collect()
        });
        v.sort();
        v
    }

    pub fn recycles(&self, reason: &str) -> u64 {
        self.server
            .svc
            .recycle_counts()
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    pub fn hub_url(&self) -> String {
        format!("ws://{}/v1/agents/connect", self.server.addr)
    }

    pub async fn lease(&self, selector: &str, wait: f64, ttl: f64) -> warmpool::api::LeaseView {
        self.client
            .lease(&CreateLease {
                selector: selector.into(),
                wait_seconds: Some(wait),
                ttl_seconds: Some(ttl),
                holder: Some("test".into()),
                idempotency_key: None,
            })
            .await
            .expect("lease granted")
    }

    pub async fn http(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base_url())
    }

    /// `GET /metrics`, its text.
    pub async fn metrics_text(&self) -> String {
        self.http()
            .await
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET path`, its JSON body.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.http()
            .await
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// Polls `f` every 10 ms until it holds or `limit` passes (then panics naming `what`).
pub async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// True when a process with this pid exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|st| st != "Z"),
        Err(_) => false,
    }
}

/// Pids whose command line contains `needle`.
pub fn pids_matching(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) && alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw WebSocket to the hub, for protocol tests.
pub async fn raw_agent(hub: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(hub)
        .await
        .expect("hub reachable");
    ws
}

pub fn hello(agent: &str, token: &str) -> Message {
    Message::Text(
        serde_json::json!({
            "type": "hello", "protocol": 1, "agentId": agent, "token": token, "labels": []
        })
        .to_string()
        .into(),
    )
}

/// Reads until a close frame; returns (code, reason). Text frames before it are returned too.
pub async fn read_until_close(ws: &mut Ws) -> (u16, String, Vec<String>) {
    let mut texts = Vec::new();
    let deadline = Duration::from_secs(10);
    loop {
        let m = tokio::time::timeout(deadline, ws.next())
            .await
            .expect("close within 10s");
        match m {
            Some(Ok(Message::Close(Some(f)))) => {
                return (u16::from(f.code), f.reason.to_string(), texts);
            }
            Some(Ok(Message::Close(None))) | None => return (1005, String::new(), texts),
            Some(Ok(Message::Text(t))) => texts.push(t.to_string()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return (0, e.to_string(), texts),
        }
    }
}

/// Sends hello and returns the first text answer (welcome) or panics with the close reason.
pub async fn register(ws: &mut Ws, agent: &str, token: &str) -> String {
    ws.send(hello(agent, token)).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(Message::Close(f))) => panic!("refused: {f:?}"),
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Reads a metric sample's value from the exposition text (first line that starts with `prefix`).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// One pool `linux` ([linux, go]), minIdle 2, maxTotal 4, unlimited uses.
pub const ONE_POOL: &str = "
pools:
  - name: linux
    labels: [linux, go]
    minIdle: 2
    maxTotal: 4
    maxUses: 0
";

/// What an exec produced.
pub struct Out {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// Runs `spec` on a lease and collects its output.
pub async fn exec(h: &Harness, lease: &str, spec: ExecSpec) -> Out {
    exec_cancel(h, lease, spec, std::future::pending()).await
}

/// Like [`exec`], sending a cancel when `cancel` resolves.
pub async fn exec_cancel(
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
                _ => stderr.extend_from_slice(d),
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

/// A `sh -c` exec.
pub fn script(s: &str) -> ExecSpec {
    ExecSpec {
        script: Some(s.into()),
        ..Default::default()
    }
}

/// Leases, runs `true` and releases `n` times; returns the agents that served.
pub async fn agents_serving(h: &Harness, n: usize) -> Vec<String> {
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

/// Requests a lease that must fail; returns (HTTP status, code, message).
pub async fn lease_error(h: &Harness, selector: &str, wait: f64) -> (u16, String, String) {
    let r = h
        .client
        .lease(&CreateLease {
            selector: selector.into(),
            wait_seconds: Some(wait),
            ..Default::default()
        })
        .await;
    match r {
        Err(warmpool::client::Error::Api {
            status,
            code,
            message,
            ..
        }) => (status, code, message),
        other => panic!("expected an API error for {selector:?}, got {other:?}"),
    }
}
