//! One agent connection's incoming messages: what each does to the engine and to exec
//! clients, and the budget that keeps a flooding agent from costing honest ones.
//!
//! Heartbeats and pings each take the engine lock, so an agent sending them as fast as its
//! socket allows would slow every lease. An agent sends one per heartbeat interval; a
//! connection gets [`LIVENESS_PER_SECOND`] a second (bursts of [`LIVENESS_BURST`]) and is
//! closed (4429, `protocol_errors{message-rate}`) when it sends more.

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::ws::Message;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::mpsc;

use super::{Conn, ExecEvent, enqueue};
use crate::protocol::{self, AgentMessage, HubMessage};
use crate::service::Service;

/// Heartbeats and pings one connection may send per second, sustained.
pub const LIVENESS_PER_SECOND: u32 = 20;
/// ... and at once.
pub const LIVENESS_BURST: u32 = 50;

/// A connection's budget of heartbeats and pings.
pub(super) struct Liveness(DefaultDirectRateLimiter);

impl Liveness {
    pub(super) fn new() -> Liveness {
        let per_second = NonZeroU32::new(LIVENESS_PER_SECOND).expect("non-zero");
        let burst = NonZeroU32::new(LIVENESS_BURST).expect("non-zero");
        Liveness(RateLimiter::direct(
            Quota::per_second(per_second).allow_burst(burst),
        ))
    }

    /// Spends one message of the budget; an error (the metric reason and why) once it is spent.
    fn spend(&self, agent: &str) -> Result<(), (&'static str, String)> {
        self.0.check().map_err(|_| {
            (
                "message-rate",
                format!(
                    "agent {agent} sent more than {LIVENESS_PER_SECOND} heartbeats and pings a \
                     second"
                ),
            )
        })
    }
}

/// Hands an event to an exec socket, waiting for room (output is never dropped). While it
/// waits the agent is not silent, only its reader is: liveness is refreshed, and a close from
/// the hub still ends the wait.
pub(super) async fn forward(
    svc: &Service,
    agent: &str,
    conn: &Conn,
    tx: &mpsc::Sender<ExecEvent>,
    ev: ExecEvent,
) {
    let ev = match tx.try_send(ev) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
        Err(mpsc::error::TrySendError::Full(ev)) => ev,
    };
    let mut beat = tokio::time::interval(svc.cfg.heartbeat_interval);
    beat.tick().await;
    loop {
        tokio::select! {
            permit = tx.reserve() => {
                if let Ok(p) = permit {
                    p.send(ev);
                }
                return;
            }
            _ = beat.tick() => {
                svc.apply(|e, now| e.agent_seen(agent, now));
                // The agent's heartbeats wait behind this frame, so the hub answers none:
                // keep the agent hearing from the hub meanwhile.
                enqueue(svc, agent, conn, HubMessage::Heartbeat {});
            }
            _ = conn.kill.cancelled() => return,
        }
    }
}

/// Handles one message; Ok(false) when the agent closed, Err((metric, reason)) on a violation.
pub(super) async fn handle(
    svc: &Arc<Service>,
    agent: &str,
    conn: &Conn,
    msg: Message,
) -> Result<bool, (&'static str, String)> {
    match msg {
        Message::Text(t) => {
            let m: AgentMessage = serde_json::from_str(&t)
                .map_err(|e| ("malformed", format!("malformed message: {e}")))?;
            match m {
                AgentMessage::Heartbeat { health, answer } => {
                    conn.liveness.spend(agent)?;
                    svc.apply(|e, now| e.agent_heartbeat(agent, health, now));
                    // Answered only when asked: an idle agent asks on every second one.
                    // A full queue means the agent stopped reading: it is disconnected.
                    if answer {
                        enqueue(svc, agent, conn, HubMessage::Heartbeat {});
                    }
                }
                AgentMessage::Ready {
                    lease,
                    health,
                    hooks,
                } => {
                    let lease = lease.as_deref();
                    svc.apply(|e, now| e.agent_ready_for(agent, lease, health, &hooks, now));
                }
                AgentMessage::Exit { exec_id, status } => {
                    if let Some(tx) = svc.hub.routes.exit(agent, exec_id) {
                        forward(svc, agent, conn, &tx, ExecEvent::Exit(status)).await;
                    }
                }
                AgentMessage::Attached {
                    exec_id,
                    offset,
                    dropped,
                    error,
                } => {
                    if let Some((tx, ev)) = svc
                        .hub
                        .routes
                        .attached(agent, exec_id, offset, dropped, error)
                    {
                        forward(svc, agent, conn, &tx, ev).await;
                    }
                }
                AgentMessage::Hello { .. } => {
                    return Err(("protocol", "hello sent twice".into()));
                }
            }
        }
        Message::Binary(b) => {
            let (stream, exec_id, data) = protocol::decode_output(&b)
                .map_err(|e| ("malformed", format!("bad output frame: {e}")))?;
            if stream == protocol::Stream::Stdin {
                return Err(("malformed", "an agent sent a stdin frame".into()));
            }
            // Output of an exec that was cancelled or whose lease ended is dropped: nobody reads
            // it (the agent still holds it for a client that re-attaches).
            if let Some(tx) = svc.hub.routes.output(agent, exec_id, data.len()) {
                forward(svc, agent, conn, &tx, ExecEvent::Output(b)).await;
            }
        }
        Message::Close(_) => return Ok(false),
        Message::Ping(_) | Message::Pong(_) => {
            conn.liveness.spend(agent)?;
            svc.apply(|e, now| e.agent_seen(agent, now));
        }
    }
    Ok(true)
}
