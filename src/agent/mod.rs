//! `warmpool agent`: dials the hub, registers, heartbeats, runs execs, cleans up after leases.
//!
//! Owns the agent's side of the remoting protocol and its reconnect policy (jittered
//! exponential backoff). Each exec runs in its own process group in the workspace
//! ([`exec`]) and writes into a [`job::Job`] that outlives the connection: a lost connection
//! stops nothing; the next one reports the job in `hello` and the hub re-attaches to its output
//! (`attach`). On `release` the agent kills every leftover descendant and wipes the workspace
//! before reporting `ready` with its health ([`cleanup`]: nothing of that when provably nothing
//! is left). A quiet `release` (nothing ran, as far as the hub knows; it counts the agent idle
//! already) is answered by nothing, unless the agent finds something left: then it cleans before
//! reading on and reports `ready`. The agent is a child subreaper so jobs cannot escape cleanup
//! by daemonising.

pub mod cleanup;
pub mod exec;
pub mod hooks;
pub mod job;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use self::cleanup::Housekeeping;
use self::job::Job;
use crate::procs;
use crate::protocol::{
    AgentMessage, ExitStatus, HubMessage, PROTOCOL_VERSION, Stream, close, decode_output,
};

/// Errors of one agent session.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect or the connection broke.
    #[error("hub {hub}: {message}")]
    Transport {
        /// Hub URL.
        hub: String,
        /// What happened.
        message: String,
    },
    /// The hub refused the registration.
    #[error("hub refused agent {agent}: {reason} (close code {code})")]
    Refused {
        /// Agent id.
        agent: String,
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Hub URL (`ws://host:port/v1/agents/connect`).
    pub hub: String,
    /// Agent id.
    pub agent_id: String,
    /// HMAC token.
    pub token: String,
    /// Pool name, when known.
    pub pool: Option<String>,
    /// Labels to report.
    pub labels: Vec<String>,
    /// Workspace directory (wiped after each lease).
    pub workspace: PathBuf,
    /// Longest pause between reconnect attempts.
    pub max_backoff: Duration,
    /// TLS for a `wss://` hub ([`crate::tls::client_config`]).
    pub tls: Arc<rustls::ClientConfig>,
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Drained or terminated by the hub, or shutdown: exit.
    Exit(String),
    /// Connection lost: reconnect.
    Lost(String),
}

/// The lease this agent serves (with the hub's token for it) and how many it served.
#[derive(Debug, Clone, Default)]
struct Served {
    lease: Option<String>,
    lease_token: Option<String>,
    uses: u32,
}

/// The exec this agent runs, or ran last for its lease (its output and exit are kept for a
/// re-attach until the next exec or the release). Outlives hub connections.
struct Current {
    job: Arc<Job>,
    runner: JoinHandle<()>,
}

type Slot = Arc<Mutex<Option<Current>>>;

fn running(current: &Slot) -> bool {
    current
        .lock()
        .expect("lock")
        .as_ref()
        .is_some_and(|c| c.job.running())
}

/// Runs the agent until it is drained, terminated by the hub, or `shutdown` fires.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<()> {
    procs::become_subreaper();
    std::fs::create_dir_all(&cfg.workspace).map_err(|e| Error::Transport {
        hub: cfg.hub.clone(),
        message: format!("cannot create workspace {}: {e}", cfg.workspace.display()),
    })?;
    let hk = Arc::new(Housekeeping::new(cfg.workspace.clone()));
    // The lease this agent serves and how many it served, kept across reconnects and
    // reported in `hello`.
    let lease: Arc<Mutex<Served>> = Arc::default();
    let current: Slot = Arc::default();
    // Failed attempts in a row (the next pause is the backoff's `failures + 1`th).
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let end = session(&cfg, &shutdown, hk.clone(), lease.clone(), current.clone()).await;
        let retry_soon =
            matches!(&end, Err(Error::Refused { code, .. }) if *code == close::TRY_AGAIN_LATER);
        match &end {
            Ok(End::Exit(why)) => {
                tracing::info!(agent = %cfg.agent_id, why = %why, "agent exiting");
                break;
            }
            Ok(End::Lost(why)) => {
                tracing::warn!(agent = %cfg.agent_id, why = %why, "connection lost")
            }
            Err(e) if retry_soon => {
                tracing::info!(agent = %cfg.agent_id, reason = %e, "hub not leading yet; retrying soon")
            }
            Err(e) => tracing::warn!(agent = %cfg.agent_id, error = %e, "cannot register"),
        }
        if started.elapsed() > Duration::from_secs(10) {
            failures = 0;
        }
        let pause;
        (pause, failures) = next_pause(failures, cfg.max_backoff, retry_soon, rand::random());
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    if !hk.quiet() {
        procs::kill_leftovers(&HashSet::new(), Duration::from_secs(2)).await;
    }
    Ok(())
}

/// First reconnect pause; it doubles per failure in a row up to `--max-backoff`.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest pause after a hub answered "try again later" (close code 1013: a standby, or an
/// instance still adopting). A takeover is under way: the agent must be back soon after it,
/// well within the new leader's adopt grace, so its pause does not grow.
pub const RETRY_SOON: Duration = Duration::from_millis(500);

/// The pause before the next reconnect attempt after `failures` failed ones in a row, and the
/// failure count after it: the shared [`Backoff`](crate::backoff::Backoff) from
/// [`BACKOFF_BASE`] up to `max`, with `jitter` in [0, 1) picking a pause in [d/2, d] so a fleet
/// reconnecting after a hub restart spreads out. After "try again later" the pause is at most
/// [`RETRY_SOON`] and the count starts over.
fn next_pause(failures: u32, max: Duration, retry_soon: bool, jitter: f64) -> (Duration, u32) {
    if retry_soon {
        return (
            crate::backoff::Backoff::new(RETRY_SOON, RETRY_SOON).pause(1, jitter),
            0,
        );
    }
    let n = failures.saturating_add(1);
    (
        crate::backoff::Backoff::new(BACKOFF_BASE, max).pause(n, jitter),
        n,
    )
}

/// Bytes tungstenite reads from the hub at a time. It zeroes that much of its buffer before
/// each read: its default (128 KiB) cost a 128 KiB memset per message received, most of an idle
/// or leased agent's CPU per message; the hub's messages are a few hundred bytes, and a larger
/// frame (stdin) is read in pieces of this size.
const READ_BUFFER_BYTES: usize = 16 * 1024;

fn json(m: &AgentMessage) -> Message {
    Message::Text(serde_json::to_string(m).expect("serialisable").into())
}

/// A failed dial in words; a 404 says where the hub listens (a hub URL given without its path
/// was the usual cause).
fn connect_failure(e: &tokio_tungstenite::tungstenite::Error) -> String {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(r)
            if r.status() == tokio_tungstenite::tungstenite::http::StatusCode::NOT_FOUND =>
        {
            format!(
                "HTTP 404 Not Found: no agent hub at this URL's path (warmpool's hub is at {})",
                crate::api::AGENT_CONNECT_PATH
            )
        }
        _ => crate::tls::describe(e),
    }
}

async fn session(
    cfg: &AgentConfig,
    shutdown: &CancellationToken,
    hk: Arc<Housekeeping>,
    current_lease: Arc<Mutex<Served>>,
    current: Slot,
) -> Result<End> {
    let transport = |message: String| Error::Transport {
        hub: cfg.hub.clone(),
        message,
    };
    let ws_cfg = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(crate::protocol::DEFAULT_MAX_FRAME_BYTES))
        .max_frame_size(Some(crate::protocol::DEFAULT_MAX_FRAME_BYTES));
    let (ws, _) = crate::tls::connect_ws(&cfg.hub, Some(ws_cfg), &cfg.tls)
        .await
        .map_err(|e| transport(connect_failure(&e)))?;
    let (mut sink, mut stream) = ws.split();
    let Served {
        lease,
        lease_token,
        uses,
    } = current_lease.lock().expect("lock").clone();
    let hello = AgentMessage::Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: cfg.agent_id.clone(),
        pool: cfg.pool.clone(),
        token: cfg.token.clone(),
        labels: cfg.labels.clone(),
        lease,
        lease_token,
        uses,
        health: hk.health().await,
        execs: Some(
            current
                .lock()
                .expect("lock")
                .as_ref()
                .map(|c| c.job.report())
                .into_iter()
                .collect(),
        ),
        quiet_release: true,
    };
    sink.send(json(&hello))
        .await
        .map_err(|e| transport(e.to_string()))?;
    let interval = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .map_err(|_| transport("no welcome within 10s".into()))?;
        match m {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<HubMessage>(&t) {
                Ok(HubMessage::Welcome {
                    heartbeat_interval_ms,
                    ..
                }) => break Duration::from_millis(heartbeat_interval_ms.max(100)),
                _ => return Err(transport(format!("expected welcome, got {t}"))),
            },
            Some(Ok(Message::Close(Some(f)))) => {
                let code = u16::from(f.code);
                if code == close::TERMINATED {
                    return Ok(End::Exit(f.reason.to_string()));
                }
                return Err(Error::Refused {
                    agent: cfg.agent_id.clone(),
                    code,
                    reason: f.reason.to_string(),
                });
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => return Err(transport(format!("expected welcome, got {other:?}"))),
            Some(Err(e)) => return Err(transport(e.to_string())),
            None => return Err(transport("closed before welcome".into())),
        }
    };
    tracing::info!(agent = %cfg.agent_id, hub = %cfg.hub, "registered");
    // When the hub was last heard, in ms since `base`: a heartbeat asks for an answer only
    // after a silence (see protocol::wants_answer).
    let base = Instant::now();
    let heard = Arc::new(AtomicU64::new(0));

    // Single writer; everything else sends through the bounded channel.
    let (tx, mut rx) = mpsc::channel::<Message>(256);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let closing = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || closing {
                break;
            }
        }
    });
    let heartbeat = {
        let (tx, hk, heard) = (tx.clone(), hk.clone(), heard.clone());
        tokio::spawn(async move {
            let mut iv = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            loop {
                iv.tick().await;
                let health = hk.health().await;
                let silence = base
                    .elapsed()
                    .saturating_sub(Duration::from_millis(heard.load(Ordering::Relaxed)));
                let answer = crate::protocol::wants_answer(silence, interval);
                if tx
                    .send(json(&AgentMessage::Heartbeat { health, answer }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    // The task streaming the current job's output over this connection.
    let mut sender: Option<JoinHandle<()>> = None;
    let mut cleanup: Option<JoinHandle<()>> = None;
    let mut draining = false;
    let hub_silence = interval * 3;
    let end = loop {
        if draining && !running(&current) {
            break End::Exit("drained".into());
        }
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break End::Exit("shutdown signal".into()),
            m = tokio::time::timeout(hub_silence, stream.next()) => match m {
                Err(_) => break End::Lost(format!("hub silent for {hub_silence:?}")),
                Ok(None) => break End::Lost("connection closed".into()),
                Ok(Some(Err(e))) => break End::Lost(e.to_string()),
                Ok(Some(Ok(m))) => {
                    heard.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
                    m
                }
            },
            // Wake up to re-check the drain condition when a job finishes.
            _ = tokio::time::sleep(Duration::from_millis(100)), if draining => continue,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(b) => {
                if let Ok((Stream::Stdin, exec_id, data)) = decode_output(&b)
                    && let Some(c) = current.lock().expect("lock").as_ref()
                    && c.job.id == exec_id
                {
                    c.job.stdin(data);
                }
                continue;
            }
            Message::Close(f) => {
                let (code, reason) = f
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                if code == close::TERMINATED {
                    break End::Exit(format!("terminated by hub: {reason}"));
                }
                break End::Lost(format!("closed by hub ({code}): {reason}"));
            }
            _ => continue,
        };
        let m = match serde_json::from_str::<HubMessage>(&text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a message this agent does not understand");
                continue;
            }
        };
        match m {
            HubMessage::Heartbeat {} | HubMessage::Welcome { .. } => {}
            HubMessage::Leased { lease, lease_token } => {
                let mut l = current_lease.lock().expect("lock");
                l.lease = Some(lease);
                l.lease_token = lease_token;
                l.uses += 1;
            }
            HubMessage::Exec { exec_id, spec } => {
                let cleaning = cleanup.as_ref().is_some_and(|c| !c.is_finished());
                if running(&current) || draining || cleaning {
                    let why = if cleaning {
                        "is cleaning up after a released lease"
                    } else if draining {
                        "is draining"
                    } else {
                        "is already running a command"
                    };
                    let status = ExitStatus {
                        error: Some(format!("agent {} {why}", cfg.agent_id)),
                        ..Default::default()
                    };
                    let _ = tx.try_send(json(&AgentMessage::Exit { exec_id, status }));
                    continue;
                }
                let lease = current_lease.lock().expect("lock").lease.clone();
                let job = Arc::new(Job::new(exec_id, lease, job::BUFFER_BYTES));
                let (ws, hk2, j) = (cfg.workspace.clone(), hk.clone(), job.clone());
                // Before the spawn and after the end: housekeeping never takes an agent that
                // ran something for one that provably has nothing below it.
                hk.changed();
                let runner = tokio::spawn(async move {
                    let status = exec::run(j.clone(), spec, &ws, hk2.pids.clone()).await;
                    hk2.changed();
                    j.finish(status);
                });
                *current.lock().expect("lock") = Some(Current {
                    job: job.clone(),
                    runner,
                });
                if let Some(s) = sender.take() {
                    s.abort();
                }
                let tx2 = tx.clone();
                sender = Some(tokio::spawn(async move { job.stream(0, tx2, false).await }));
            }
            HubMessage::Attach { exec_id, offset } => {
                let job = current
                    .lock()
                    .expect("lock")
                    .as_ref()
                    .filter(|c| c.job.id == exec_id)
                    .map(|c| c.job.clone());
                let Some(job) = job else {
                    let error = format!(
                        "agent {} has no exec {exec_id} (a later exec or a release replaced it)",
                        cfg.agent_id
                    );
                    let _ = tx.try_send(json(&AgentMessage::Attached {
                        exec_id,
                        offset: 0,
                        dropped: 0,
                        error: Some(error),
                    }));
                    continue;
                };
                // One sender per job: the previous one stops before the new one announces.
                if let Some(s) = sender.take() {
                    s.abort();
                    let _ = s.await;
                }
                let tx2 = tx.clone();
                sender = Some(tokio::spawn(
                    async move { job.stream(offset, tx2, true).await },
                ));
            }
            HubMessage::Resize { exec_id, size } => {
                if let Some(c) = current.lock().expect("lock").as_ref()
                    && c.job.id == exec_id
                {
                    c.job.resize(size);
                }
            }
            HubMessage::Cancel { exec_id } => {
                if let Some(c) = current.lock().expect("lock").as_ref()
                    && c.job.id == exec_id
                {
                    c.job.cancel.cancel();
                }
            }
            HubMessage::Release {
                lease,
                hooks: pool_hooks,
                quiet,
            } => {
                {
                    let mut l = current_lease.lock().expect("lock");
                    // Only that lease: never one granted after it.
                    if l.lease.as_deref() == Some(lease.as_str()) {
                        l.lease = None;
                        l.lease_token = None;
                    }
                }
                if quiet {
                    // The hub counts this agent idle already and may lease it in its next
                    // message: nothing is sent unless something is left after all.
                    if let Some(p) = cleanup.take() {
                        let _ = p.await;
                    }
                    let job = current.lock().expect("lock").take();
                    if job.is_none() && hk.nothing_left() {
                        continue;
                    }
                    if let Some(s) = sender.take() {
                        s.abort();
                    }
                    // Something the hub did not know of is left (files in the workspace,
                    // processes): it is cleaned before the next message is read, so the next
                    // lease starts clean, and reported in a `ready` for this lease (the hub
                    // checks its health; it ends no later cleanup).
                    tracing::info!(lease = %lease, "left over after a quiet release; cleaning up");
                    if let Some(c) = job {
                        c.job.cancel.cancel();
                        let _ = c.runner.await;
                    }
                    let (health, hooks) = hk.after_release(&pool_hooks, &lease).await;
                    let ready = AgentMessage::Ready {
                        lease: Some(lease),
                        health,
                        hooks,
                    };
                    let _ = tx.send(json(&ready)).await;
                    continue;
                }
                let running = current.lock().expect("lock").take();
                if let Some(s) = sender.take() {
                    s.abort();
                }
                let (tx2, hk2) = (tx.clone(), hk.clone());
                let previous = cleanup.take();
                cleanup = Some(tokio::spawn(async move {
                    if let Some(p) = previous {
                        let _ = p.await;
                    }
                    if let Some(c) = running {
                        c.job.cancel.cancel();
                        let _ = c.runner.await;
                    }
                    // Leftovers, workspace, then the pool's hooks (their results decide reuse).
                    let (health, hooks) = hk2.after_release(&pool_hooks, &lease).await;
                    let _ = tx2
                        .send(json(&AgentMessage::Ready {
                            lease: Some(lease),
                            health,
                            hooks,
                        }))
                        .await;
                }));
            }
            HubMessage::Drain { reason } => {
                tracing::info!(reason = %reason, "draining");
                draining = true;
            }
        }
    };
    if let Some(s) = sender.take() {
        s.abort();
    }
    // A lost connection stops nothing: the job keeps running and writing into its buffer, and
    // the next connection reports it. An agent that exits stops its job (the whole process
    // group, at once).
    if let End::Exit(_) = &end {
        let running = current.lock().expect("lock").take();
        if let Some(c) = running {
            for pgid in hk.pids.lock().expect("lock").iter() {
                // SAFETY: signalling a job's own process group.
                unsafe { libc::killpg(*pgid, libc::SIGKILL) };
            }
            c.job.cancel.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(3), c.runner).await;
        }
    }
    heartbeat.abort();
    if let End::Exit(why) = &end {
        let _ = tx
            .send(Message::Close(Some(
                tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code: CloseCode::Away,
                    reason: why.clone().into(),
                },
            )))
            .await;
    }
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_404_from_the_hub_url_names_the_hub_path() {
        let resp = http::Response::builder().status(404).body(None).unwrap();
        let m = connect_failure(&tokio_tungstenite::tungstenite::Error::Http(Box::new(resp)));
        assert!(m.contains("404") && m.contains("/v1/agents/connect"), "{m}");
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let max = Duration::from_secs(10);
        let mut n = 0;
        let mut pauses = Vec::new();
        for _ in 0..10 {
            let (p, next) = next_pause(n, max, false, 1.0);
            pauses.push(p);
            n = next;
        }
        assert_eq!(pauses[0], Duration::from_millis(100));
        assert_eq!(pauses[3], Duration::from_millis(800));
        assert_eq!(pauses[9], max);
        let (low, _) = next_pause(4, max, false, 0.0);
        assert_eq!(
            low,
            Duration::from_millis(800),
            "jitter keeps at least half"
        );
    }

    #[test]
    fn try_again_later_retries_soon_and_starts_the_backoff_over() {
        let max = Duration::from_secs(10);
        for jitter in [0.0, 0.5, 0.999] {
            let (p, next) = next_pause(9, max, true, jitter);
            assert!(p <= RETRY_SOON, "{p:?}");
            assert!(p >= RETRY_SOON / 2, "{p:?}");
            assert_eq!(next, 0);
        }
    }
}
