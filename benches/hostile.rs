//! What hostile clients cost honest ones: warm lease latency (`POST /v1/leases` + `DELETE`, one
//! at a time, on two real `warmpool agent` processes) measured with no other traffic, then
//! while each kind of hostile client runs, then with all of them at once, in one run so the
//! ratios compare like with like.
//!
//! The hostile clients run on their own one-thread runtime (at most one core, as a client on
//! another machine would not share the service's CPU at all), each a loop bounded by the phase:
//! - `slowloris`: 300 connections that send half a request's headers, reopened when closed;
//! - `conn-churn`: connect and close as fast as possible;
//! - `bad-token`: hub handshakes with a `hello` whose token is wrong;
//! - `garbage`: hub handshakes followed by a 1 MiB frame of invalid UTF-8;
//! - `flood`: an authenticated agent of an external pool sending heartbeats and pings as fast
//!   as its socket takes them (it reads the answers, so it is never cut off as a slow reader).
//!
//! Run: `cargo bench --bench hostile` (about a minute). Prints one line per phase.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use warmpool::api::CreateLease;
use warmpool::client::Client;
use warmpool::server::{ServeConfig, start};
use warmpool::spec::parse_pools;

const POOLS: &str = "
pools:
  - name: honest
    labels: [honest]
    minIdle: 2
    maxTotal: 2
    maxUses: 0
  - name: ext
    labels: [ext]
    external: true
    minIdle: 0
    maxTotal: 4
";

const LEASES: usize = 400;
const KINDS: [&str; 5] = ["slowloris", "conn-churn", "bad-token", "garbage", "flood"];

struct Target {
    addr: std::net::SocketAddr,
    join_token: String,
}

impl Target {
    fn hub(&self) -> String {
        format!("ws://{}/v1/agents/connect", self.addr)
    }
}

/// Runs one kind of hostile client until `stop`; returns how many actions it completed.
async fn hostile(kind: &'static str, t: Arc<Target>, stop: Arc<AtomicBool>) -> u64 {
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let workers = if kind == "slowloris" { 300 } else { 4 };
    for w in 0..workers {
        let (t, stop, done) = (t.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = match kind {
                    "slowloris" => slowloris(&t, &stop).await,
                    "conn-churn" => tokio::net::TcpStream::connect(t.addr).await.is_ok(),
                    "bad-token" => bad_token(&t).await,
                    "garbage" => garbage(&t).await,
                    _ => flood(&t, w, &stop).await,
                };
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    done.load(Ordering::Relaxed)
}

async fn slowloris(t: &Target, stop: &AtomicBool) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(t.addr).await else {
        return false;
    };
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 256];
    // Held until the server closes it (the header deadline) or the phase ends.
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(200), s.readable()).await {
            Ok(_) => {
                if let Ok(0) = s.try_read(&mut buf) {
                    return true;
                }
            }
            Err(_) => continue,
        }
    }
    true
}

async fn bad_token(t: &Target) -> bool {
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(t.hub()).await else {
        return false;
    };
    let hello = serde_json::json!({
        "type": "hello", "protocol": 1, "agentId": "intruder", "token": "00", "labels": []
    });
    let _ = ws.send(Message::Text(hello.to_string().into())).await;
    while let Some(Ok(_)) = ws.next().await {}
    true
}

async fn garbage(t: &Target) -> bool {
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(t.hub()).await else {
        return false;
    };
    let _ = ws.send(Message::Binary(vec![0xff; 1 << 20].into())).await;
    while let Some(Ok(_)) = ws.next().await {}
    true
}

async fn flood(t: &Target, worker: usize, stop: &AtomicBool) -> bool {
    let Ok((ws, _)) = tokio_tungstenite::connect_async(t.hub()).await else {
        return false;
    };
    let (mut tx, mut rx) = ws.split();
    let hello = serde_json::json!({
        "type": "hello", "protocol": 1, "agentId": format!("flood-{worker}"), "pool": "ext",
        "token": t.join_token, "labels": ["ext"]
    });
    if tx
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return false;
    }
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
    let beat = Message::Text(r#"{"type":"heartbeat","health":{}}"#.into());
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && !reader.is_finished() {
        let m = if sent.is_multiple_of(2) {
            beat.clone()
        } else {
            Message::Ping(Vec::new().into())
        };
        if tx.send(m).await.is_err() {
            break;
        }
        sent += 1;
    }
    reader.abort();
    sent > 0
}

/// `LEASES` warm lease round trips one at a time; returns each `POST /v1/leases` latency.
async fn leases(client: &Client) -> Vec<Duration> {
    let body = CreateLease {
        selector: "honest".into(),
        wait_seconds: Some(10.0),
        ttl_seconds: Some(60.0),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(LEASES);
    for _ in 0..LEASES {
        let t0 = Instant::now();
        let l = client.lease(&body).await.expect("honest lease");
        out.push(t0.elapsed());
        client.release(&l.id).await.expect("release");
    }
    out
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

struct Row {
    p50: f64,
    p99: f64,
    max: f64,
}

fn row(mut v: Vec<Duration>) -> Row {
    v.sort();
    Row {
        p50: pct(&v, 0.5),
        p99: pct(&v, 0.99),
        max: v.last().unwrap().as_secs_f64() * 1e3,
    }
}

async fn phase(
    client: &Client,
    target: &Arc<Target>,
    kinds: &[&'static str],
) -> (Row, Vec<(&'static str, u64)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let attackers = if kinds.is_empty() {
        None
    } else {
        let (t, stop, kinds) = (target.clone(), stop.clone(), kinds.to_vec());
        Some(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let runs: Vec<_> = kinds
                    .iter()
                    .map(|k| (*k, tokio::spawn(hostile(k, t.clone(), stop.clone()))))
                    .collect();
                let mut counts = Vec::new();
                for (k, r) in runs {
                    counts.push((k, r.await.unwrap_or(0)));
                }
                counts
            })
        }))
    };
    // Let the hostile clients reach their steady state first.
    if attackers.is_some() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let lat = leases(client).await;
    stop.store(true, Ordering::Relaxed);
    let counts = attackers
        .map(|a| a.join().expect("attackers"))
        .unwrap_or_default();
    (row(lat), counts)
}

fn main() {
    let _ = warmpool::http_server::raise_fd_limit();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut cfg = ServeConfig::new(env!("CARGO_BIN_EXE_warmpool").into());
        cfg.pools = parse_pools(POOLS, "bench").expect("pools");
        cfg.http.header_timeout = Duration::from_secs(5);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = start(listener, cfg).await.expect("server starts");
        let client = Client::new(&server.base_url(), None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.svc.read(|e| {
            e.pool_status()
                .iter()
                .find(|p| p.name == "honest")
                .map(|p| p.idle)
        }) != Some(2)
        {
            assert!(Instant::now() < deadline, "honest agents did not connect");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let target = Arc::new(Target {
            addr: server.addr,
            join_token: server.svc.key.join_token("ext"),
        });
        println!(
            "{LEASES} warm leases per phase, one at a time; POST /v1/leases latency in ms \
             (hostile actions completed during the phase)"
        );
        println!(
            "{:<22} {:>7} {:>7} {:>7} {:>9}",
            "phase", "p50", "p99", "max", "p99/base"
        );
        let (base, _) = phase(&client, &target, &[]).await;
        let print = |name: &str, r: &Row, counts: &[(&str, u64)]| {
            let c: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
            println!(
                "{:<22} {:>7.2} {:>7.2} {:>7.2} {:>8.1}x  {}",
                name,
                r.p50,
                r.p99,
                r.max,
                r.p99 / base.p99,
                c.join(", ")
            );
        };
        print("none", &base, &[]);
        for k in KINDS {
            let (r, c) = phase(&client, &target, &[k]).await;
            print(k, &r, &c);
        }
        let (r, c) = phase(&client, &target, &KINDS).await;
        print("all at once", &r, &c);
        let (r, _) = phase(&client, &target, &[]).await;
        print("none, again", &r, &[]);
        server.shutdown().await;
    });
}
