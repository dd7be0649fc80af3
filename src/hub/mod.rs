//! The remoting hub: one WebSocket connection per registered agent.
//!
//! Owns the connection registry (agent id -> bounded outbound queue), the handshake
//! (`hello` -> token check -> engine registration -> `welcome`), the per-connection reader and
//! writer tasks, and routing of exec output from an agent to the exec socket that started or
//! re-attached to it. Routes are kept by agent id across the agent's connections: when an agent
//! that keeps its execs reconnects, the hub asks it (`attach`) to resume from the last byte
//! routed.
//! A slow agent can only stall its own tasks: messages to it are `try_send` into its bounded
//! queue, and a full queue, or a socket write that does not complete within the send deadline,
//! closes that connection (close code 4429) and ends its lease at once. Protocol errors close the
//! connection with a reason and bump `warmpool_protocol_errors_total{reason}`. What each
//! incoming message does, and the budget that cuts off a flooding agent, are in `messages`.
//! `leased` and the quiet `release` are queued deferred ([`Hub::send_deferred`]): they travel
//! with the agent's next message, or after [`DEFER_AT_MOST`] (the service's flusher task).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures_util::StreamExt;
use governor::DefaultDirectRateLimiter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::{ConnectError, Lease};
pub use crate::exec_routes::ExecEvent;
use crate::exec_routes::{ExecRoute, ExecRoutes};
use crate::protocol::{AgentMessage, ExecReport, ExecSpec, HubMessage, PROTOCOL_VERSION, close};
use crate::service::Service;

/// After the hub's Close, how long it reads on for the agent's.
const CLOSE_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a deferred message (`leased`, a quiet `release`) may wait in its connection's
/// queue for the next message to travel with (docs/PROTOCOL.md, "Deferred messages").
pub const DEFER_AT_MOST: std::time::Duration = std::time::Duration::from_millis(20);

mod halves;
mod messages;
mod queue;
use halves::{read_messages, write_queue};
use messages::Liveness;
pub use messages::{LIVENESS_BURST, LIVENESS_PER_SECOND};
use queue::{Queue, SendError};

/// A frame queued for an agent, already encoded (the answer to a heartbeat is one buffer shared
/// by every connection).
enum Outbound {
    Text(Utf8Bytes),
    Binary(bytes::Bytes),
}

impl Outbound {
    fn msg(m: &HubMessage) -> Outbound {
        if matches!(m, HubMessage::Heartbeat {}) {
            // The common message: encoded once, shared by every connection.
            static HEARTBEAT: std::sync::LazyLock<Utf8Bytes> = std::sync::LazyLock::new(|| {
                serde_json::to_string(&HubMessage::Heartbeat {})
                    .expect("serialisable")
                    .into()
            });
            return Outbound::Text(HEARTBEAT.clone());
        }
        Outbound::Text(serde_json::to_string(m).expect("serialisable").into())
    }
}

struct Conn {
    id: u64,
    queue: Queue<Outbound>,
    kill: CancellationToken,
    close_reason: Mutex<Option<(u16, String)>>,
    /// The agent keeps its execs across connections and answers `attach` (its `hello` had
    /// `execs`).
    reattach: bool,
    /// Heartbeats and pings it may still send (a flood is cut off).
    liveness: Liveness,
    /// Closed because it does not read: nothing more is written to it, not even a close frame.
    unreadable: std::sync::atomic::AtomicBool,
}

impl Conn {
    fn close(&self, code: u16, reason: &str) {
        let mut r = self.close_reason.lock().expect("lock");
        if r.is_none() {
            *r = Some((code, reason.to_string()));
        }
        drop(r);
        self.kill.cancel();
    }
}

/// Why an exec could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExecStartError {
    /// The agent has no live connection.
    #[error("agent {0} is not connected")]
    NotConnected(String),
    /// Another exec is running on this agent.
    #[error("agent {0} is already running a command for this lease")]
    Busy(String),
    /// The agent's queue is full; it was disconnected.
    #[error("agent {0} is not reading its messages; disconnected")]
    Slow(String),
    /// The agent's build cannot re-attach to an exec.
    #[error(
        "agent {0} cannot re-attach to a command (it stops its commands when its connection drops)"
    )]
    NoReattach(String),
    /// The lease ended before the command could be sent.
    #[error(transparent)]
    LeaseEnded(crate::engine::LeaseError),
}

/// The connection registry.
pub struct Hub {
    conns: DashMap<String, Arc<Conn>>,
    routes: ExecRoutes,
    next_conn: AtomicU64,
    next_exec: AtomicU64,
    handshakes: DefaultDirectRateLimiter,
    restarting: CancellationToken,
    /// Connections holding a deferred message, for the flusher ([`Hub::flush_deferred`]).
    deferred: Mutex<Vec<std::sync::Weak<Conn>>>,
    /// Wakes the flusher when `deferred` gets its first entry.
    deferred_wake: Arc<tokio::sync::Notify>,
}

impl Hub {
    /// An empty hub admitting `handshakes_per_second` new agent connections per second.
    pub fn new(handshakes_per_second: u32) -> Hub {
        let n = handshakes_per_second.max(1);
        Hub {
            conns: DashMap::new(),
            routes: ExecRoutes::default(),
            next_conn: AtomicU64::new(1),
            // Exec ids stay unique across service instances (an agent may still hold an exec
            // of the previous instance) and below 2^53 (exact in JSON numbers).
            next_exec: AtomicU64::new(rand::random::<u64>() % (1 << 52) + 1),
            handshakes: governor::RateLimiter::direct(crate::pacer::quota(n as f64, n)),
            restarting: CancellationToken::new(),
            deferred: Mutex::new(Vec::new()),
            deferred_wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// What the deferred-message flusher waits on: notified when a connection gets the first
    /// deferred message of an empty list (see [`Hub::send_deferred`]).
    pub fn deferred_wake(&self) -> Arc<tokio::sync::Notify> {
        self.deferred_wake.clone()
    }

    /// True while a connection may hold a deferred message.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.lock().expect("deferred lock").is_empty()
    }

    /// Wakes the connections that hold deferred messages, so they write them now. The flusher
    /// calls it [`DEFER_AT_MOST`] after the first of them was queued.
    pub fn flush_deferred(&self) {
        let due = std::mem::take(&mut *self.deferred.lock().expect("deferred lock"));
        for c in due.iter().filter_map(std::sync::Weak::upgrade) {
            c.queue.wake_deferred();
        }
    }

    /// Queues a message to an agent without waking its connection: it is written with the next
    /// message queued for that agent, or after [`DEFER_AT_MOST`]. Used for what the agent
    /// answers with nothing and need not act on at once: `leased` (the lease's `exec` usually
    /// follows within milliseconds) and the quiet `release` (the next lease's `leased` often
    /// follows within microseconds): they then travel in the write of the message behind them.
    /// A full queue disconnects the agent (as [`Hub::send`]).
    pub fn send_deferred(&self, svc: &Service, agent: &str, msg: HubMessage) -> bool {
        let Some(conn) = self.conns.get(agent).map(|c| c.clone()) else {
            return false;
        };
        match conn.queue.try_send_deferred(Outbound::msg(&msg)) {
            Ok(first) => {
                if first {
                    let mut d = self.deferred.lock().expect("deferred lock");
                    d.push(Arc::downgrade(&conn));
                    if d.len() == 1 {
                        self.deferred_wake.notify_one();
                    }
                }
                true
            }
            Err(SendError::Full(_)) => {
                slow_consumer(
                    svc,
                    &conn,
                    format!(
                        "agent {agent} send queue full ({} messages)",
                        svc.cfg.agent_queue
                    ),
                );
                false
            }
            Err(SendError::Closed(_)) => false,
        }
    }

    /// The service restarts and leaves its agents to the next instance: exec sockets tell
    /// their clients to re-attach there.
    pub fn detach_exec_clients(&self) {
        self.restarting.cancel();
    }

    /// Fires when exec sockets should send their clients to the next instance.
    pub fn restarting(&self) -> &CancellationToken {
        &self.restarting
    }

    /// Takes a handshake token; false when agents connect faster than allowed.
    pub fn admit_handshake(&self) -> bool {
        self.handshakes.check().is_ok()
    }

    /// True when the agent has a live connection.
    pub fn is_connected(&self, agent: &str) -> bool {
        self.conns.contains_key(agent)
    }

    /// Queues a message to an agent without waiting. A full queue disconnects the agent.
    pub fn send(&self, svc: &Service, agent: &str, msg: HubMessage) -> bool {
        let Some(conn) = self.conns.get(agent).map(|c| c.clone()) else {
            return false;
        };
        enqueue(svc, agent, &conn, msg)
    }

    /// Closes an agent's connection with `code`; false when it has none.
    pub fn close(&self, agent: &str, code: u16, reason: &str) -> bool {
        match self.conns.get(agent) {
            Some(c) => {
                c.close(code, reason);
                true
            }
            None => false,
        }
    }

    /// Closes every connection.
    pub fn close_all(&self, code: u16, reason: &str) {
        for c in self.conns.iter() {
            c.close(code, reason);
        }
    }

    /// Starts a command on a leased agent; output and exit arrive on the returned receiver.
    pub fn start_exec(
        &self,
        svc: &Service,
        agent: &str,
        lease: &str,
        spec: ExecSpec,
    ) -> Result<(u64, mpsc::Receiver<ExecEvent>), ExecStartError> {
        if !self.conns.contains_key(agent) {
            return Err(ExecStartError::NotConnected(agent.to_string()));
        }
        let exec_id = self.next_exec.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(64);
        match self.routes.map.entry(agent.to_string()) {
            Entry::Occupied(_) => return Err(ExecStartError::Busy(agent.to_string())),
            Entry::Vacant(v) => {
                v.insert(ExecRoute {
                    exec_id,
                    lease: lease.to_string(),
                    tx,
                    offset: 0,
                    pending: false,
                });
            }
        }
        // Under the engine lock: the lease is still active, its release will know a command
        // was sent (it cleans up: no quiet release), and the exec is queued before that
        // release's message.
        let sent = svc.apply(|e, _| {
            e.exec_starting(lease)?;
            Ok(self.send(svc, agent, HubMessage::Exec { exec_id, spec }))
        });
        if sent != Ok(true) {
            self.routes
                .map
                .remove_if(agent, |_, r| r.exec_id == exec_id);
            return Err(match sent {
                Err(e) => ExecStartError::LeaseEnded(e),
                Ok(_) => ExecStartError::Slow(agent.to_string()),
            });
        }
        Ok((exec_id, rx))
    }

    /// Re-attaches to an exec started earlier on this lease: its output from `offset`, then its
    /// exit, arrive on the returned receiver (first an [`ExecEvent::Attached`]). A client that
    /// re-attaches replaces the route of one that left. When the agent is not connected, the
    /// `attach` goes out when it registers again.
    pub fn attach_exec(
        &self,
        svc: &Service,
        agent: &str,
        lease: &str,
        exec_id: u64,
        offset: u64,
    ) -> Result<mpsc::Receiver<ExecEvent>, ExecStartError> {
        let conn = self.conns.get(agent).map(|c| c.clone());
        if conn.as_ref().is_some_and(|c| !c.reattach) {
            return Err(ExecStartError::NoReattach(agent.to_string()));
        }
        // An exec of this lease exists: its release cleans up (see `start_exec`).
        svc.apply(|e, _| e.exec_starting(lease))
            .map_err(ExecStartError::LeaseEnded)?;
        let (tx, rx) = mpsc::channel(64);
        let route = ExecRoute {
            exec_id,
            lease: lease.to_string(),
            tx,
            offset,
            pending: true,
        };
        match self.routes.map.entry(agent.to_string()) {
            Entry::Occupied(mut o) if o.get().exec_id == exec_id => {
                // The previous client of this exec is gone (or about to be): it hears nothing more.
                o.insert(route);
            }
            Entry::Occupied(_) => return Err(ExecStartError::Busy(agent.to_string())),
            Entry::Vacant(v) => {
                v.insert(route);
            }
        }
        if conn.is_some() && !self.send(svc, agent, HubMessage::Attach { exec_id, offset }) {
            self.routes
                .map
                .remove_if(agent, |_, r| r.exec_id == exec_id);
            return Err(ExecStartError::Slow(agent.to_string()));
        }
        Ok(rx)
    }

    /// Hands a stdin frame of an exec client to its agent, waiting for room in the agent's
    /// queue (the agent reads its socket at once, so this only paces a fast client). Dropped
    /// when the agent is not connected.
    pub async fn send_stdin(&self, agent: &str, frame: bytes::Bytes) {
        let Some(conn) = self.conns.get(agent).map(|c| c.clone()) else {
            return;
        };
        tokio::select! {
            _ = conn.queue.send(Outbound::Binary(frame)) => {}
            _ = conn.kill.cancelled() => {}
        }
    }

    /// Asks the agent to stop an exec and forgets its route.
    pub fn cancel_exec(&self, svc: &Service, agent: &str, exec_id: u64) {
        self.detach_exec(agent, exec_id);
        self.send(svc, agent, HubMessage::Cancel { exec_id });
    }

    /// Forgets an exec's route; the command keeps running (a client may re-attach).
    pub fn detach_exec(&self, agent: &str, exec_id: u64) {
        self.routes
            .map
            .remove_if(agent, |_, r| r.exec_id == exec_id);
    }

    /// A lease ended: stop a command still running for it.
    pub fn lease_ended(&self, svc: &Service, lease: &Lease) {
        let Some((_, r)) = self
            .routes
            .map
            .remove_if(&lease.agent, |_, r| r.lease == lease.id)
        else {
            return;
        };
        let _ = r.tx.try_send(ExecEvent::Lost(format!(
            "lease {} {} (agent {}): {}",
            lease.id,
            lease.state.as_str(),
            lease.agent,
            lease.end_reason.as_deref().unwrap_or("")
        )));
        self.send(svc, &lease.agent, HubMessage::Cancel { exec_id: r.exec_id });
    }

    /// Bytes of output routed so far for the agent's exec (for tests and diagnostics).
    pub fn routed_offset(&self, agent: &str) -> Option<u64> {
        self.routes.map.get(agent).map(|r| r.offset)
    }

    /// An agent registered: re-attach its route to the exec it reports, or tell the route's
    /// client the exec is gone.
    fn resume_route(&self, svc: &Service, agent: &str, execs: Option<&[ExecReport]>) {
        if let Some((exec_id, offset)) = self.routes.resume(agent, execs) {
            self.send(svc, agent, HubMessage::Attach { exec_id, offset });
        }
    }
}

/// Queues a message on a connection without waiting. A full queue means the agent stopped
/// reading: the connection is closed with 4429 (and its lease and exec client told).
fn enqueue(svc: &Service, agent: &str, conn: &Conn, msg: HubMessage) -> bool {
    match conn.queue.try_send(Outbound::msg(&msg)) {
        Ok(()) => true,
        Err(SendError::Full(_)) => {
            slow_consumer(
                svc,
                conn,
                format!(
                    "agent {agent} send queue full ({} messages)",
                    svc.cfg.agent_queue
                ),
            );
            false
        }
        Err(SendError::Closed(_)) => false,
    }
}

/// Closes the connection of an agent that does not read what the hub sends (4429).
fn slow_consumer(svc: &Service, conn: &Conn, reason: String) {
    if conn.kill.is_cancelled() {
        return;
    }
    svc.metrics
        .protocol_errors
        .with_label_values(&["slow-consumer"])
        .inc();
    tracing::warn!(reason = %reason, "agent is not reading; disconnecting it");
    conn.unreadable.store(true, Ordering::Relaxed);
    conn.close(close::SLOW_CONSUMER, &reason);
}

fn close_msg(code: u16, reason: &str) -> Message {
    // Close reasons are limited to 123 bytes by RFC 6455.
    let mut r = reason.to_string();
    while r.len() > 123 {
        r.pop();
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(r),
    }))
}

pub(crate) async fn refuse(
    svc: &Service,
    mut socket: WebSocket,
    code: u16,
    metric: &str,
    reason: String,
) {
    svc.metrics
        .rejected_connections
        .with_label_values(&[metric])
        .inc();
    if code == close::TRY_AGAIN_LATER {
        // Routine on a standby: every agent that reaches it retries soon.
        tracing::debug!(reason = %reason, "agent asked to retry soon");
    } else {
        tracing::warn!(reason = %reason, "refused agent connection");
    }
    if socket.send(close_msg(code, &reason)).await.is_err() {
        // The peer closed first (a Close before or instead of its hello): no other Close may
        // be sent, but flushing sends the reply the WebSocket layer queued for it.
        let _ = futures_util::SinkExt::flush(&mut socket).await;
    }
}

/// Serves one agent connection from handshake to close.
pub async fn serve_agent(svc: Arc<Service>, socket: WebSocket) {
    // 1. hello
    // The handshake's futures are boxed: they live a moment, and inline they would size every
    // idle connection's task.
    let Some((mut socket, hello)) = Box::pin(crate::hello::read(&svc, socket)).await else {
        return;
    };
    let (version, agent, pool, token, health, lease, uses, execs, quiet) = hello;
    if version != PROTOCOL_VERSION {
        let r =
            format!("unsupported protocol version {version}; this hub speaks {PROTOCOL_VERSION}");
        return Box::pin(refuse(
            &svc,
            socket,
            close::UNSUPPORTED_VERSION,
            "version",
            r,
        ))
        .await;
    }
    // An agent the service started presents its own token; a machine joining an external pool
    // presents the pool's join token.
    let join = match pool.as_deref() {
        _ if svc.key.verify(&agent, &token) => None,
        Some(p) if !p.is_empty() && svc.key.verify_join(p, &token) => Some(p.to_string()),
        _ => {
            let r = format!("invalid token for agent {agent}");
            return Box::pin(refuse(
                &svc,
                socket,
                close::INVALID_TOKEN,
                "invalid-token",
                r,
            ))
            .await;
        }
    };
    if !svc.is_ready() {
        // A standby, or an instance still adopting what its predecessor left: it cannot know
        // the agent yet. The agent retries soon (the leader, or this instance once it leads).
        let r = format!(
            "agent {agent}: this warmpool instance is not leading yet (standby or adopting); retry soon"
        );
        return Box::pin(refuse(&svc, socket, close::TRY_AGAIN_LATER, "not-ready", r)).await;
    }
    if join.is_some() {
        if let Some(r) = invalid_join_id(&agent) {
            return Box::pin(refuse(
                &svc,
                socket,
                close::PROTOCOL_VIOLATION,
                "protocol",
                r,
            ))
            .await;
        }
    } else if let Err(e) = svc.read(|e| e.check_connect(&agent, pool.as_deref())) {
        return Box::pin(refuse_connect(&svc, socket, e)).await;
    }
    let lease = vouched_lease(&svc, &agent, join.as_deref(), lease);
    // 2. register: at most one live connection per agent id.
    let conn = Arc::new(Conn {
        id: svc.hub.next_conn.fetch_add(1, Ordering::Relaxed),
        queue: Queue::new(svc.cfg.agent_queue),
        kill: CancellationToken::new(),
        close_reason: Mutex::new(None),
        reattach: execs.is_some(),
        liveness: Liveness::new(),
        unreadable: std::sync::atomic::AtomicBool::new(false),
    });
    // The registry's entry is released before anything is awaited: messages to agents are
    // queued under the engine lock and must never wait for a connection's handshake.
    let duplicate = match svc.hub.conns.entry(agent.clone()) {
        Entry::Occupied(_) => true,
        Entry::Vacant(v) => {
            v.insert(conn.clone());
            false
        }
    };
    if duplicate {
        let e = ConnectError::AlreadyConnected(agent);
        return Box::pin(refuse_connect(&svc, socket, e)).await;
    }
    if let Err(e) = svc.apply(|e, now| match &join {
        Some(p) => e.agent_joined(&agent, p, health, lease.as_deref(), uses, now),
        None => {
            // Before it registers: a lease granted at registration may end quietly.
            e.set_quiet_release(&agent, quiet);
            e.agent_registered(&agent, pool.as_deref(), health, lease.as_deref(), uses, now)
        }
    }) {
        svc.hub.conns.remove_if(&agent, |_, c| c.id == conn.id);
        return Box::pin(refuse_connect(&svc, socket, e)).await;
    }
    let welcome = HubMessage::Welcome {
        protocol: PROTOCOL_VERSION,
        agent_id: agent.clone(),
        heartbeat_interval_ms: svc.cfg.heartbeat_interval.as_millis() as u64,
        max_frame_bytes: svc.cfg.max_frame_bytes,
    };
    let welcome = serde_json::to_string(&welcome).expect("serialisable");
    if socket.send(Message::Text(welcome.into())).await.is_err() {
        svc.hub.conns.remove_if(&agent, |_, c| c.id == conn.id);
        svc.apply(|e, now| e.agent_disconnected(&agent, "closed during handshake", now));
        return;
    }
    tracing::info!(agent = %agent, "agent connected");
    svc.hub.resume_route(&svc, &agent, execs.as_deref());

    // What the handshake needed is freed before the connection settles for hours.
    drop((token, pool, join, lease, execs));
    // 3. writer and 4. reader, two halves of this one task: an idle connection is one task,
    // and a heartbeat's answer (queued by the reader) is written without waking another.
    let (sink, stream) = socket.split();
    let writer = write_queue(&svc, &agent, &conn, sink);
    let reader = read_messages(&svc, &agent, &conn, stream);
    let ((why, closed_by_hub, dropped, mut stream), close_sent) = tokio::join!(reader, writer);
    // 5. teardown
    svc.hub.conns.remove_if(&agent, |_, c| c.id == conn.id);
    if !conn.reattach {
        // Such an agent stops its exec when its connection drops.
        if let Some((_, route)) = svc.hub.routes.map.remove(&agent) {
            let _ = route.tx.try_send(ExecEvent::Lost(format!(
                "agent {agent} disconnected: {why}"
            )));
        }
    }
    if !closed_by_hub {
        tracing::info!(agent = %agent, why = %why, "agent disconnected");
        if conn.reattach && dropped {
            svc.apply(|e, now| e.agent_away(&agent, &why, now));
        } else {
            svc.apply(|e, now| e.agent_disconnected(&agent, &why, now));
        }
    }
    if close_sent {
        // The hub sent its Close: read on until the agent's (or a short deadline), discarding
        // what still arrives. Dropping a socket with unread data resets it, and a reset can
        // overtake the close frame, losing the code and reason the agent should see.
        let _ = tokio::time::timeout(CLOSE_DRAIN, async {
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// The lease an agent reports in `hello`, if the service can vouch for it: its lease token
/// proves this service's key granted that lease to this agent in its pool. Anything else (no
/// token, a token for another lease, agent or pool) is ignored with a warning and a count:
/// the agent registers without it, and the claimed id is never restored.
fn vouched_lease(
    svc: &Service,
    agent: &str,
    join: Option<&str>,
    claim: Option<(String, Option<String>)>,
) -> Option<String> {
    let (lease, token) = claim?;
    let pool = match join {
        Some(p) => Some(p.to_string()),
        None => svc.read(|e| e.agent(agent).map(|a| a.pool.clone())),
    }
    .unwrap_or_default();
    if token
        .as_deref()
        .is_some_and(|t| svc.key.verify_lease(&lease, agent, &pool, t))
    {
        return Some(lease);
    }
    let why = if token.is_some() {
        "invalid lease token"
    } else {
        "no lease token"
    };
    tracing::warn!(
        agent,
        pool = %pool,
        lease = %lease,
        why,
        "agent claimed a lease the service cannot vouch for; registering it without the lease"
    );
    svc.metrics
        .unverified_lease_claims
        .with_label_values(&[&pool])
        .inc();
    None
}

/// Why an id chosen by a joining machine is refused: 1 to 128 characters of letters, digits,
/// '.', '_' and '-' (it names the agent in metrics, logs and leases).
fn invalid_join_id(id: &str) -> Option<String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    (!ok).then(|| {
        format!("agent id {id:?} is not valid (1 to 128 letters, digits, '.', '_' or '-')")
    })
}

pub(crate) fn is_too_big(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("too long") || t.contains("too big") || t.contains("space limit")
}

async fn refuse_connect(svc: &Service, socket: WebSocket, e: ConnectError) {
    let (code, metric) = match &e {
        ConnectError::UnknownAgent(_) => (close::UNKNOWN_AGENT, "unknown-agent"),
        ConnectError::WrongPool { .. } => (close::PROTOCOL_VIOLATION, "wrong-pool"),
        ConnectError::AlreadyConnected(_) => (close::DUPLICATE_AGENT, "duplicate-agent"),
        ConnectError::Terminating(_) => (close::TERMINATED, "terminating"),
        ConnectError::NotJoinable(_) => (close::POOL_FULL, "not-joinable"),
        ConnectError::PoolFull { .. } => (close::POOL_FULL, "pool-full"),
    };
    refuse(svc, socket, code, metric, e.to_string()).await
}

pub(crate) fn msg_type(m: &AgentMessage) -> &'static str {
    match m {
        AgentMessage::Hello { .. } => "hello",
        AgentMessage::Heartbeat { .. } => "heartbeat",
        AgentMessage::Exit { .. } => "exit",
        AgentMessage::Attached { .. } => "attached",
        AgentMessage::Ready { .. } => "ready",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of two arguments returns.
    fn future_size<A, B, F: Future>(_: impl Fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle agent's connection is one task holding this future for hours: ten thousand of
    /// them must fit in tens of megabytes (docs/BENCHMARKS.md, "10,000 idle agents"). The
    /// handshake's futures are boxed and the queue holds encoded frames, so neither sizes it.
    /// (2,152 bytes in a debug build of rustc 1.95, less in release.)
    #[test]
    fn an_idle_connection_costs_one_small_task() {
        let task = future_size(serve_agent);
        assert!(task <= 2560, "serve_agent's future is {task} bytes");
        let slot = std::mem::size_of::<Outbound>();
        assert!(slot <= 40, "a queued frame takes {slot} bytes");
    }
}
