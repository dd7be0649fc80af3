//! `warmpool bench agents`: thousands of real WebSocket agent connections from one process.
//!
//! Each simulated agent joins an external pool with the pool's join token, sends heartbeats at
//! the interval the hub asks for (asking for an answer after a silence, like `warmpool agent`),
//! answers every exec with a fixed reply (`ok` and exit 0) and
//! every release with `ready`. With the agents connected and idle, the scale test reads the
//! server's RSS and CPU from /proc (when the server is local), then measures lease latency
//! under that population through the public lease API. Without `--server` it starts a
//! `warmpool serve` child with `--label-sets` external pools and measures that.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use super::{LoadOptions, Summary, Target, sysinfo};
use crate::client::Client;
use crate::protocol::{self, AgentMessage, ExitStatus, HubMessage, PROTOCOL_VERSION, Stream};

/// One simulated agent's identity.
#[derive(Debug, Clone)]
pub struct SimAgent {
    /// Hub URL.
    pub hub: String,
    /// Agent id.
    pub id: String,
    /// External pool.
    pub pool: String,
    /// The pool's join token.
    pub token: String,
    /// TLS for a `wss://` hub.
    pub tls: Arc<rustls::ClientConfig>,
}

/// Counters of the simulated fleet.
#[derive(Debug, Default)]
pub struct Fleet {
    /// Refused or failed connection attempts.
    pub refused: AtomicUsize,
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .max_message_size(Some(protocol::DEFAULT_MAX_FRAME_BYTES))
}

fn text(m: &AgentMessage) -> Message {
    Message::Text(serde_json::to_string(m).expect("serialisable").into())
}

/// Runs one simulated agent until `stop`: connects, registers, serves, reconnects with
/// jittered backoff when refused or cut.
/// `dial` is held until the first attempt registered or failed (it paces a fleet's connects).
pub async fn run_sim_agent(
    a: SimAgent,
    fleet: Arc<Fleet>,
    stop: CancellationToken,
    mut dial: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let backoff = crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    // Attempts in a row that were refused or cut (a registered session starts over).
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match session(&a, &stop, &mut dial).await {
            Ok(()) => failures = 0,
            Err(_) => {
                fleet.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        failures = failures.saturating_add(1);
        let pause = backoff.pause(failures, rand::random::<f64>());
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
    }
}

async fn session(
    a: &SimAgent,
    stop: &CancellationToken,
    dial: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(), String> {
    let r = connect(a).await;
    dial.take();
    let (mut tx, mut rx, interval) = r?;
    let r = serve(&mut tx, &mut rx, interval, stop).await;
    if stop.is_cancelled() {
        let _ = tx.send(Message::Close(None)).await;
    }
    r
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type Split = (
    futures_util::stream::SplitSink<WsStream, Message>,
    futures_util::stream::SplitStream<WsStream>,
    Duration,
);

async fn connect(a: &SimAgent) -> Result<Split, String> {
    let (ws, _) = crate::tls::connect_ws(&a.hub, Some(ws_config()), &a.tls)
        .await
        .map_err(|e| crate::tls::describe(&e))?;
    let (mut tx, mut rx) = ws.split();
    tx.send(text(&AgentMessage::Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: a.id.clone(),
        pool: Some(a.pool.clone()),
        token: a.token.clone(),
        labels: Vec::new(),
        lease: None,
        lease_token: None,
        uses: 0,
        health: Default::default(),
        execs: None,
        quiet_release: false,
    }))
    .await
    .map_err(|e| e.to_string())?;
    let interval = match rx.next().await {
        Some(Ok(Message::Text(t))) => match serde_json::from_str::<HubMessage>(&t) {
            Ok(HubMessage::Welcome {
                heartbeat_interval_ms,
                ..
            }) => Duration::from_millis(heartbeat_interval_ms.max(100)),
            _ => return Err(format!("expected welcome, got {t}")),
        },
        other => return Err(format!("refused: {other:?}")),
    };
    Ok((tx, rx, interval))
}

async fn serve<S, R>(
    tx: &mut S,
    rx: &mut R,
    interval: Duration,
    stop: &CancellationToken,
) -> Result<(), String>
where
    S: futures_util::Sink<Message> + Unpin,
    R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    // Like `warmpool agent`: a heartbeat asks for the hub's answer only after a silence.
    let mut heard = Instant::now();
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = beat.tick() => {
                let answer = protocol::wants_answer(heard.elapsed(), interval);
                let hb = AgentMessage::Heartbeat { health: Default::default(), answer };
                tx.send(text(&hb)).await.map_err(|_| "send failed".to_string())?;
                continue;
            }
            m = rx.next() => m,
        };
        heard = Instant::now();
        let t = match m {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None => return Ok(()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
        };
        let reply = match serde_json::from_str::<HubMessage>(&t) {
            Ok(HubMessage::Exec { exec_id, .. }) => {
                let out = protocol::encode_output(Stream::Stdout, exec_id, b"ok\n");
                tx.send(Message::Binary(out.into()))
                    .await
                    .map_err(|_| "send failed".to_string())?;
                Some(AgentMessage::Exit {
                    exec_id,
                    status: ExitStatus {
                        code: Some(0),
                        ..Default::default()
                    },
                })
            }
            Ok(HubMessage::Release { lease, .. }) => Some(AgentMessage::Ready {
                lease: Some(lease),
                health: Default::default(),
                hooks: Vec::new(),
            }),
            Ok(HubMessage::Drain { .. }) => return Ok(()),
            _ => None,
        };
        if let Some(r) = reply {
            tx.send(text(&r))
                .await
                .map_err(|_| "send failed".to_string())?;
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct AgentsOptions {
    /// A running server; None starts a local `warmpool serve` child.
    pub server: Option<String>,
    /// API bearer token for a running server.
    pub api_token: Option<String>,
    /// External pools of a running server to join (default: every external pool).
    pub pools: Vec<String>,
    /// The server's pid, when it is local but not found by its port.
    pub server_pid: Option<u32>,
    /// Simulated agents.
    pub count: usize,
    /// External pools (label sets) a started server gets; agents spread over them.
    pub label_sets: usize,
    /// Connections being opened at once.
    pub dial_concurrency: usize,
    /// Agent handshakes per second the started server accepts.
    pub handshakes_per_second: u32,
    /// Heartbeat interval of the started server.
    pub heartbeat_interval: Duration,
    /// Window over which idle CPU is measured.
    pub measure: Duration,
    /// Leases in the latency phase.
    pub jobs: usize,
    /// Leases in flight at once.
    pub concurrency: usize,
    /// The `warmpool` executable (for the started server).
    pub exe: PathBuf,
    /// Progress on stderr.
    pub progress: bool,
    /// TLS for an `https://` server (platform roots plus `--ca-file`).
    pub tls: Arc<rustls::ClientConfig>,
}

/// What the scale test measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentsReport {
    /// Server URL.
    pub server: String,
    /// Local server's pid, when known.
    pub server_pid: Option<u32>,
    /// Agents connected and idle.
    pub agents: usize,
    /// Pools they joined.
    pub pools: usize,
    /// Heartbeat interval the hub asked for, ms.
    pub heartbeat_interval_ms: u64,
    /// Time until every agent was idle, seconds.
    pub connect_seconds: f64,
    /// Server RSS before any agent connected, MiB.
    pub rss_before_mib: Option<f64>,
    /// Server RSS with every agent idle, MiB.
    pub rss_mib: Option<f64>,
    /// (RSS with agents - RSS before) per 1,000 agents, MiB.
    pub rss_per_1000_agents_mib: Option<f64>,
    /// Server CPU while every agent was idle (heartbeats only), % of one core.
    pub idle_cpu_percent: Option<f64>,
    /// The same per 1,000 agents.
    pub idle_cpu_percent_per_1000_agents: Option<f64>,
    /// Window of the CPU measurement, seconds.
    pub measure_seconds: f64,
    /// Leases attempted in the latency phase.
    pub jobs: usize,
    /// Leases that failed.
    pub errors: usize,
    /// Lease request to 201, ms.
    pub lease: Summary,
    /// Lease request to the exec's exit, ms.
    pub exit: Summary,
    /// Connection attempts refused or failed along the way (retried).
    pub refused_attempts: usize,
}

struct Server {
    url: String,
    pid: Option<u32>,
    child: Option<tokio::process::Child>,
    _dir: Option<tempfile::TempDir>,
}

async fn start_server(o: &AgentsOptions) -> Result<Server, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let sets = o.label_sets.max(1);
    let per = o.count.div_ceil(sets).max(1);
    let mut yaml = String::from("pools:\n");
    for i in 0..sets {
        yaml.push_str(&format!(
            "  - name: sim-{i}\n    labels: [sim, set-{i}]\n    external: true\n    minIdle: 0\n    maxTotal: {per}\n"
        ));
    }
    let pools = dir.path().join("pools.yaml");
    std::fs::write(&pools, yaml).map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let log = std::fs::File::create(dir.path().join("serve.log")).map_err(|e| e.to_string())?;
    let child = tokio::process::Command::new(&o.exe)
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--pools")
        .arg(&pools)
        .arg("--handshakes-per-second")
        .arg(o.handshakes_per_second.to_string())
        .arg("--heartbeat-interval")
        .arg(format!("{}ms", o.heartbeat_interval.as_millis()))
        .env("WARMPOOL_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {} serve: {e}", o.exe.display()))?;
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(crate::tls::for_reqwest(&o.tls))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let t = Instant::now();
    while http.get(format!("{url}/healthz")).send().await.is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            return Err(format!("the started server did not answer on {url}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Server {
        url,
        pid: child.id(),
        child: Some(child),
        _dir: Some(dir),
    })
}

/// Runs the scale test.
pub async fn run(o: &AgentsOptions) -> Result<AgentsReport, String> {
    sysinfo::raise_nofile();
    let mut server = match &o.server {
        Some(url) => {
            let port = reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.port_or_known_default());
            Server {
                url: url.trim_end_matches('/').to_string(),
                pid: o
                    .server_pid
                    .or_else(|| port.and_then(sysinfo::listener_pid)),
                child: None,
                _dir: None,
            }
        }
        None => start_server(o).await?,
    };
    let client = Client::with_tls(&server.url, o.api_token.clone(), o.tls.clone());
    let pools: Vec<crate::engine::PoolStatus> = client
        .pools()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|p| p.spec.external && (o.pools.is_empty() || o.pools.contains(&p.name)))
        .collect();
    if pools.is_empty() {
        return Err(format!(
            "{} has no external pool to join{}",
            server.url,
            if o.pools.is_empty() {
                String::new()
            } else {
                format!(" among {}", o.pools.join(", "))
            }
        ));
    }
    let room: u32 = pools.iter().map(|p| p.max_total).sum();
    if (room as usize) < o.count {
        return Err(format!(
            "the external pools admit {room} agents in all (their maxTotal), fewer than --count {}",
            o.count
        ));
    }
    let mut tokens = Vec::new();
    for p in &pools {
        tokens.push(
            client
                .join_token(&p.name)
                .await
                .map_err(|e| format!("join token of pool {}: {e}", p.name))?,
        );
    }
    let rss_before = server.pid.and_then(sysinfo::rss_bytes);
    let hub = format!("{}/v1/agents/connect", server.url.replacen("http", "ws", 1));
    let fleet = Arc::new(Fleet::default());
    let stop = CancellationToken::new();
    let dial = Arc::new(tokio::sync::Semaphore::new(o.dial_concurrency.max(1)));
    let bar = super::progress_bar(o.count as u64, o.progress);
    bar.set_message("agents connecting");
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // Agents fill pools in turn, each pool up to its maxTotal.
    let mut left: Vec<u32> = pools.iter().map(|p| p.max_total).collect();
    let mut pick = 0usize;
    for n in 0..o.count {
        while left[pick % pools.len()] == 0 {
            pick += 1;
        }
        let i = pick % pools.len();
        left[i] -= 1;
        pick += 1;
        let a = SimAgent {
            hub: hub.clone(),
            id: format!("sim-{n}"),
            pool: pools[i].name.clone(),
            token: tokens[i].clone(),
            tls: o.tls.clone(),
        };
        let permit = dial.clone().acquire_owned().await.ok();
        tasks.spawn(run_sim_agent(a, fleet.clone(), stop.clone(), permit));
    }
    let limit = Duration::from_secs(60) + Duration::from_millis(20 * o.count as u64);
    let mut idle = 0u32;
    while t0.elapsed() < limit {
        let ps = client.pools().await.map_err(|e| e.to_string())?;
        idle = ps
            .iter()
            .filter(|p| pools.iter().any(|q| q.name == p.name))
            .map(|p| p.idle)
            .sum();
        bar.set_position(idle as u64);
        if idle as usize >= o.count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    let connect_seconds = t0.elapsed().as_secs_f64();
    if (idle as usize) < o.count {
        stop.cancel();
        return Err(format!(
            "only {idle} of {} agents idle after {limit:?} ({} attempts refused)",
            o.count,
            fleet.refused.load(Ordering::Relaxed)
        ));
    }
    // Idle: heartbeats only. Let connection setup settle, then measure CPU over the window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = server.pid.and_then(sysinfo::cpu_time);
    let w0 = Instant::now();
    tokio::time::sleep(o.measure).await;
    let cpu1 = server.pid.and_then(sysinfo::cpu_time);
    let window = w0.elapsed().as_secs_f64();
    let rss = server.pid.and_then(sysinfo::rss_bytes);
    let idle_cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a).as_secs_f64() / window * 100.0),
        _ => None,
    };
    // Lease latency under the population.
    let targets: Vec<Target> = pools
        .iter()
        .map(|p| Target {
            name: p.name.clone(),
            selector: p.labels.join(" && "),
        })
        .collect();
    let load = LoadOptions {
        targets,
        jobs: o.jobs,
        concurrency: o.concurrency,
        command: "true".into(),
        duration: None,
        wait: Duration::from_secs(30),
        progress: o.progress,
    };
    let (samples, _) = super::run_load(&client, &load).await;
    let ok: Vec<_> = samples.iter().filter(|s| s.error.is_none()).collect();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let heartbeat_interval_ms = o.heartbeat_interval.as_millis() as u64;
    let report = AgentsReport {
        server: server.url.clone(),
        server_pid: server.pid,
        agents: o.count,
        pools: pools.len(),
        heartbeat_interval_ms,
        connect_seconds,
        rss_before_mib: rss_before.map(mib),
        rss_mib: rss.map(mib),
        rss_per_1000_agents_mib: match (rss_before, rss) {
            (Some(a), Some(b)) => Some(mib(b.saturating_sub(a)) * 1000.0 / o.count as f64),
            _ => None,
        },
        idle_cpu_percent: idle_cpu,
        idle_cpu_percent_per_1000_agents: idle_cpu.map(|c| c * 1000.0 / o.count as f64),
        measure_seconds: window,
        jobs: samples.len(),
        errors: samples.len() - ok.len(),
        lease: Summary::of(&ok.iter().filter_map(|s| s.lease_ms).collect::<Vec<_>>()),
        exit: Summary::of(&ok.iter().filter_map(|s| s.exit_ms).collect::<Vec<_>>()),
        refused_attempts: fleet.refused.load(Ordering::Relaxed),
    };
    stop.cancel();
    tasks.shutdown().await;
    if let Some(mut c) = server.child.take() {
        let _ = c.kill().await;
    }
    Ok(report)
}

/// The table `warmpool bench agents` prints.
pub fn render(r: &AgentsReport) -> String {
    let opt = |v: Option<f64>, unit: &str| {
        v.map_or("n/a (server not local)".into(), |v| format!("{v:.2}{unit}"))
    };
    let rows = vec![
        vec![
            "server".into(),
            format!(
                "{} (pid {})",
                r.server,
                r.server_pid.map_or("unknown".into(), |p| p.to_string())
            ),
        ],
        vec![
            "agents idle".into(),
            format!(
                "{} in {} pools, heartbeat every {} ms",
                r.agents, r.pools, r.heartbeat_interval_ms
            ),
        ],
        vec![
            "time to connect all".into(),
            format!(
                "{:.1} s ({} attempts refused and retried)",
                r.connect_seconds, r.refused_attempts
            ),
        ],
        vec![
            "server RSS before / with agents".into(),
            format!(
                "{} / {}",
                opt(r.rss_before_mib, " MiB"),
                opt(r.rss_mib, " MiB")
            ),
        ],
        vec![
            "RSS per 1,000 agents".into(),
            opt(r.rss_per_1000_agents_mib, " MiB"),
        ],
        vec![
            "idle CPU (heartbeats)".into(),
            format!(
                "{} of one core over {:.0} s",
                opt(r.idle_cpu_percent, " %"),
                r.measure_seconds
            ),
        ],
        vec![
            "idle CPU per 1,000 agents".into(),
            opt(r.idle_cpu_percent_per_1000_agents, " %"),
        ],
        vec!["leases".into(), format!("{} ({} errors)", r.jobs, r.errors)],
    ];
    let mut out = super::report::table(&rows);
    let mut t = vec![
        ["FIGURE (ms)", "N", "P50", "P90", "P99", "MAX"]
            .map(String::from)
            .to_vec(),
    ];
    for (name, s) in [("lease (to 201)", &r.lease), ("exit", &r.exit)] {
        let mut c = vec![name.to_string()];
        c.extend(super::report::cells(s));
        t.push(c);
    }
    out.push('\n');
    out.push_str(&super::report::table(&t));
    out
}
