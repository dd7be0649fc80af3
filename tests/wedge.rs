//! Clients that try to wedge the service, over real sockets: an agent that stops reading what
//! the hub sends is cut off within a bound, and its lease and exec client are told at once,
//! while honest agents keep serving.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use warmpool::client::ExecOptions;
use warmpool::engine::AgentState;
use warmpool::protocol::{ExecSpec, close};

const POOLS: &str = "
pools:
  - name: manual
    labels: [manual]
    minIdle: 1
    maxTotal: 1
    connectTimeout: 60s
    agentCommand: [sleep, \"600\"]
  - name: real
    labels: [linux]
    minIdle: 1
    maxTotal: 2
";

fn metric_of(h: &Harness, name: &str, label: &str) -> f64 {
    let text = h.server.svc.render_metrics();
    metric(&text, &format!("{name}{{reason=\"{label}\"}}")).unwrap_or(0.0)
}

/// A raw agent whose socket has a small receive buffer, so that a few hundred KiB the hub
/// sends fill its window once it stops reading.
async fn small_window_agent(hub: &str) -> Ws {
    let addr: std::net::SocketAddr = hub
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let (ws, _) =
        tokio_tungstenite::client_async(hub, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .expect("hub handshake");
    ws
}

async fn manual_agent(h: &Harness) -> (String, Ws) {
    wait_until("manual agent started", Duration::from_secs(10), || {
        h.agents_in(AgentState::Connecting).len() == 1
    })
    .await;
    let id = h.agents_in(AgentState::Connecting)[0].clone();
    let mut ws = small_window_agent(&h.hub_url()).await;
    register(&mut ws, &id, &h.server.svc.key.token(&id)).await;
    wait_until("manual agent idle", Duration::from_secs(5), || {
        h.pool("manual").idle == 1
    })
    .await;
    (id, ws)
}

async fn honest_agents_serve(h: &Harness) {
    let l = h.lease("linux", 10.0, 60.0).await;
    let out = exec(h, &l.id, script("echo fine")).await;
    assert_eq!(out.status.code, Some(0));
    assert_eq!(out.stdout, b"fine\n");
}

/// The agent takes an exec with stdin and then stops reading: the hub's write to it blocks.
/// Within the send deadline the hub drops the connection, the lease ends with a reason and the
/// exec client gets an error naming the agent.
#[tokio::test]
async fn agent_that_stops_reading_is_cut_off_within_the_send_deadline() {
    let mut cfg = test_config(POOLS);
    cfg.service.agent_send_timeout = Duration::from_secs(1);
    // The raw agent sends no heartbeats: only the send deadline may end its connection here.
    cfg.service.engine.heartbeat_timeout = Duration::from_secs(120);
    let h = start_with(cfg).await;
    let (id, _ws) = manual_agent(&h).await; // held open, never read again
    let lease = h.lease("manual", 5.0, 600.0).await;
    assert_eq!(lease.agent, id);

    let (stdin_tx, stdin_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let feeder = tokio::spawn(async move {
        // Ends when the exec socket is gone (the receiver dropped).
        while stdin_tx.send(vec![b'x'; 64 * 1024]).await.is_ok() {}
    });
    let client = h.client.clone();
    let lease_id = lease.id.clone();
    let exec = tokio::spawn(async move {
        let opts = ExecOptions {
            reattach: Duration::ZERO,
            stdin: Some(stdin_rx),
            resize: None,
        };
        let spec = ExecSpec {
            script: Some("cat".into()),
            ..Default::default()
        };
        client
            .exec_with(&lease_id, spec, opts, |_| {}, std::future::pending())
            .await
    });
    let err = tokio::time::timeout(Duration::from_secs(20), exec)
        .await
        .expect("the exec client hears within the bound")
        .unwrap()
        .expect_err("the exec fails");
    let msg = err.to_string();
    assert!(msg.contains(&id), "{msg}");
    feeder.abort();

    assert!(!h.server.svc.hub.is_connected(&id));
    let view = h.client.get_lease(&lease.id).await.unwrap();
    assert_ne!(view.state, "active", "{view:?}");
    let reason = view.end_reason.clone().unwrap_or_default();
    assert!(reason.contains("did not read"), "{view:?}");
    assert!(metric_of(&h, "warmpool_protocol_errors_total", "slow-consumer") >= 1.0);
    honest_agents_serve(&h).await;
    h.server.shutdown().await;
}

/// The agent keeps sending heartbeats and never reads the answers: once its queue is full it
/// is disconnected (4429), even with a send deadline far away.
#[tokio::test]
async fn agent_that_never_reads_heartbeat_answers_is_disconnected() {
    let mut cfg = test_config(POOLS);
    cfg.service.agent_send_timeout = Duration::from_secs(600);
    cfg.service.agent_queue = 16;
    cfg.service.engine.heartbeat_timeout = Duration::from_secs(120);
    let h = start_with(cfg).await;
    let (id, mut ws) = manual_agent(&h).await;
    let beat = Message::Text(
        r#"{"type":"heartbeat","health":{"workspaceBytes":0,"leftoverProcesses":0}}"#.into(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while h.server.svc.hub.is_connected(&id) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent {id} still connected after 30 s of unread heartbeat answers"
        );
        if ws.send(beat.clone()).await.is_err() {
            break;
        }
    }
    wait_until("agent disconnected", Duration::from_secs(10), || {
        !h.server.svc.hub.is_connected(&id)
    })
    .await;
    assert!(metric_of(&h, "warmpool_protocol_errors_total", "slow-consumer") >= 1.0);
    honest_agents_serve(&h).await;
    h.server.shutdown().await;
}

/// An agent that sends heartbeats and pings as fast as it can (each takes the engine lock) is
/// closed with 4429 once past its budget, and counted; the other agents keep serving.
#[tokio::test]
async fn agent_flooding_heartbeats_is_cut_off() {
    let mut cfg = test_config(POOLS);
    cfg.service.engine.heartbeat_timeout = Duration::from_secs(120);
    let h = start_with(cfg).await;
    h.wait_idle("real", 1).await;
    wait_until("manual agent started", Duration::from_secs(10), || {
        h.agents_in(AgentState::Connecting).len() == 1
    })
    .await;
    let id = h.agents_in(AgentState::Connecting)[0].clone();
    let mut ws = raw_agent(&h.hub_url()).await;
    register(&mut ws, &id, &h.server.svc.key.token(&id)).await;
    // Within the budget: a burst the size of the budget is fine.
    for _ in 0..warmpool::hub::LIVENESS_BURST / 2 {
        ws.send(Message::Text(r#"{"type":"heartbeat","health":{}}"#.into()))
            .await
            .unwrap();
    }
    assert_eq!(
        metric_of(&h, "warmpool_protocol_errors_total", "message-rate"),
        0.0
    );
    // A flood: the hub's answers are read (this is no slow reader), the heartbeats go on.
    let (mut tx, mut rx) = futures_util::StreamExt::split(ws);
    let reader = tokio::spawn(async move {
        while let Some(m) = futures_util::StreamExt::next(&mut rx).await {
            match m {
                Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
                Ok(_) => {}
                Err(e) => return (0, e.to_string()),
            }
        }
        (1005, String::new())
    });
    for i in 0..5000u32 {
        let m = if i % 2 == 0 {
            Message::Text(r#"{"type":"heartbeat","health":{}}"#.into())
        } else {
            Message::Ping(Vec::new().into())
        };
        if reader.is_finished() || tx.send(m).await.is_err() {
            break;
        }
    }
    let (code, reason) = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the flooding agent is closed")
        .unwrap();
    assert_eq!(code, close::SLOW_CONSUMER, "{reason}");
    assert!(
        reason.contains(&id) && reason.contains("heartbeats"),
        "{reason}"
    );
    assert_eq!(
        metric_of(&h, "warmpool_protocol_errors_total", "message-rate"),
        1.0
    );
    wait_until("flooding agent gone", Duration::from_secs(5), || {
        !h.server.svc.hub.is_connected(&id)
    })
    .await;
    honest_agents_serve(&h).await;
    h.server.shutdown().await;
}

/// Opens a connection that reads until the server closes it and then counts it in `closed`.
async fn watched_conn(
    addr: std::net::SocketAddr,
    first_bytes: &'static [u8],
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::spawn(async move {
        let _ = s.write_all(first_bytes).await;
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    })
}

/// Opens `n` connections that send nothing; returns how many the server closed so far (a
/// live count) and their tasks.
async fn idle_clients(
    h: &Harness,
    n: usize,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(watched_conn(h.server.addr, b"", closed.clone()).await);
    }
    (closed, conns)
}

async fn healthz_answers(h: &Harness) -> bool {
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        h.http().await.get(h.url("/healthz")).send(),
    )
    .await;
    matches!(r, Ok(Ok(resp)) if resp.status() == 200)
}

/// 300 clients send `GET /healthz HTTP/1.1\r\nHost: x\r\n` and never the blank line. The
/// service keeps answering meanwhile, and closes each of them after the header timeout.
#[tokio::test]
async fn half_sent_requests_are_closed_after_the_header_timeout() {
    let _ = warmpool::http_server::raise_fd_limit();
    let mut cfg = test_config(POOLS);
    cfg.http.header_timeout = Duration::from_secs(2);
    let h = start_with(cfg).await;
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut conns = Vec::new();
    for _ in 0..300 {
        conns.push(
            watched_conn(
                h.server.addr,
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
                closed.clone(),
            )
            .await,
        );
    }
    assert!(
        healthz_answers(&h).await,
        "/healthz with 300 half-sent requests open"
    );
    honest_agents_serve(&h).await;
    wait_until("half-sent requests closed", Duration::from_secs(20), || {
        closed.load(std::sync::atomic::Ordering::SeqCst) == 300
    })
    .await;
    assert!(healthz_answers(&h).await);
    h.server.shutdown().await;
}

/// Over the connection cap, new connections are closed as they arrive; once clients leave,
/// the service answers again.
#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let _ = warmpool::http_server::raise_fd_limit();
    let mut cfg = test_config(POOLS);
    cfg.http.header_timeout = Duration::from_secs(600);
    cfg.http.max_connections = 40;
    let h = start_with(cfg).await;
    h.wait_idle("real", 1).await;
    let (closed, conns) = idle_clients(&h, 60).await;
    // The real pool's agent holds one slot: 21 or more of the 60 are over the cap.
    wait_until(
        "connections over the cap closed",
        Duration::from_secs(10),
        || closed.load(std::sync::atomic::Ordering::SeqCst) >= 21,
    )
    .await;
    for c in &conns {
        c.abort();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !healthz_answers(&h).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer after the idle clients left"
        );
    }
    honest_agents_serve(&h).await;
    h.server.shutdown().await;
}

/// Sends one raw request and reads the answer until the server closes the connection.
async fn raw_request(addr: std::net::SocketAddr, req: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Clients holding every ordinary connection slot do not lock agents out: an agent still
/// connects on a slot reserved for agents, while anything else on such a slot is answered 503
/// at once and an idle connection there is closed after a short deadline.
#[tokio::test]
async fn agents_connect_while_clients_hold_every_other_slot() {
    let _ = warmpool::http_server::raise_fd_limit();
    let mut cfg = test_config(POOLS);
    cfg.http.header_timeout = Duration::from_secs(600);
    cfg.http.max_connections = 40;
    cfg.http.agent_reserve = Some(8);
    let h = start_with(cfg).await;
    h.wait_idle("real", 1).await;
    wait_until("manual agent started", Duration::from_secs(10), || {
        h.agents_in(AgentState::Connecting).len() == 1
    })
    .await;
    let id = h.agents_in(AgentState::Connecting)[0].clone();

    // The real pool's agent holds one of the 32 ordinary slots; 31 idle clients take the rest
    // for the whole (600 s) header deadline. Of the other 29, 21 are closed at once and 8 get
    // the reserved slots, which close them within the reserved header deadline.
    let (closed, conns) = idle_clients(&h, 60).await;
    wait_until(
        "idle clients beyond the ordinary slots closed",
        Duration::from_secs(15),
        || closed.load(std::sync::atomic::Ordering::SeqCst) == 29,
    )
    .await;

    let answer = raw_request(h.server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("connection_limit"), "{answer}");
    assert!(
        metric_of(
            &h,
            "warmpool_http_connections_refused_total",
            "reserved-for-agents"
        ) >= 1.0
    );

    let (mut ws, _) = tokio_tungstenite::connect_async(h.hub_url())
        .await
        .expect("an agent connects with every ordinary slot taken");
    register(&mut ws, &id, &h.server.svc.key.token(&id)).await;
    wait_until("manual agent idle", Duration::from_secs(5), || {
        h.pool("manual").idle == 1
    })
    .await;
    assert_eq!(
        closed.load(std::sync::atomic::Ordering::SeqCst),
        29,
        "the idle clients on ordinary slots are still open"
    );
    for c in &conns {
        c.abort();
    }
    h.server.shutdown().await;
}

/// A masked client frame with the given first byte, claimed length and payload (mask key 0,
/// so the payload goes as is).
fn raw_frame(first: u8, claimed: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    if claimed < 126 {
        f.push(0x80 | claimed as u8);
    } else if claimed <= u16::MAX as u64 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(claimed as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&claimed.to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

async fn refused_before_hello(h: &Harness, send: impl AsyncFnOnce(&mut Ws)) -> (u16, String) {
    let mut ws = raw_agent(&h.hub_url()).await;
    send(&mut ws).await;
    let (code, reason, _) = read_until_close(&mut ws).await;
    (code, reason)
}

async fn send_hello_with_labels(ws: &mut Ws, labels: Vec<String>) {
    let hello = serde_json::json!({
        "type": "hello", "protocol": 1, "agentId": "x", "token": "t", "labels": labels
    });
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
}

async fn write_raw(ws: &mut Ws, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    match ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s.write_all(bytes).await.unwrap(),
        _ => unreachable!("plain test hub"),
    }
}

/// Frames before `hello` that are not a hello close the connection with the documented code
/// and reason, and are counted.
#[tokio::test]
async fn bad_frames_before_hello_are_closed_with_a_code_and_counted() {
    let h = start_with(test_config(POOLS)).await;
    let limit = warmpool::protocol::DEFAULT_MAX_FRAME_BYTES;

    let (code, reason) = refused_before_hello(&h, async |ws: &mut Ws| {
        write_raw(ws, &raw_frame(0x81, 2, &[0xff, 0xfe])).await
    })
    .await;
    assert_eq!(code, close::PROTOCOL_VIOLATION, "invalid UTF-8: {reason}");
    assert!(reason.contains("before hello"), "{reason}");

    let (code, reason) = refused_before_hello(&h, async |ws: &mut Ws| {
        let _ = ws.send(Message::Binary(vec![0u8; 2 << 20].into())).await;
    })
    .await;
    assert_eq!(code, close::TOO_BIG, "2 MiB frame: {reason}");
    assert!(reason.contains(&limit.to_string()), "{reason}");

    let (code, reason) = refused_before_hello(&h, async |ws: &mut Ws| {
        let big = format!(
            r#"{{"type":"hello","protocol":1,"agentId":"x","token":"{}","labels":[]}}"#,
            "a".repeat(5_000_000)
        );
        let _ = ws.send(Message::Text(big.into())).await;
    })
    .await;
    assert_eq!(code, close::TOO_BIG, "5 MB hello: {reason}");

    let (code, reason) = refused_before_hello(&h, async |ws: &mut Ws| {
        write_raw(ws, &raw_frame(0x82, 1 << 62, b"")).await
    })
    .await;
    assert_eq!(code, close::TOO_BIG, "2^62-byte header: {reason}");

    let (code, reason) = refused_before_hello(&h, async |ws: &mut Ws| {
        write_raw(ws, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await
    })
    .await;
    assert_eq!(code, close::PROTOCOL_VIOLATION, "not WebSocket: {reason}");

    // Under the frame limit but far above what a hello needs.
    let (code, reason) = refused_before_hello(&h, async |ws: &mut Ws| {
        let labels = (0..20_000).map(|i| format!("label-{i:08}")).collect();
        send_hello_with_labels(ws, labels).await;
    })
    .await;
    assert_eq!(code, close::TOO_BIG, "960 KB hello: {reason}");
    assert!(reason.contains("65536"), "{reason}");

    let (code, reason) = refused_before_hello(&h, async |ws: &mut Ws| {
        let labels = (0..300).map(|i| format!("l{i}")).collect();
        send_hello_with_labels(ws, labels).await;
    })
    .await;
    assert_eq!(code, close::PROTOCOL_VIOLATION, "300 labels: {reason}");
    assert!(reason.contains("300 labels"), "{reason}");

    let errs = |l: &str| metric_of(&h, "warmpool_protocol_errors_total", l);
    let rejected = |l: &str| metric_of(&h, "warmpool_rejected_connections_total", l);
    assert_eq!(errs("frame-too-large"), 3.0);
    assert_eq!(rejected("frame-too-large"), 3.0);
    assert_eq!(errs("bad-frame"), 2.0);
    assert_eq!(rejected("bad-frame"), 2.0);
    assert_eq!(errs("hello-too-large"), 1.0);
    assert_eq!(rejected("hello-too-large"), 1.0);
    honest_agents_serve(&h).await;
    h.server.shutdown().await;
}
