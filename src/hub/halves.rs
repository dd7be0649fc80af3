//! The two halves of one agent connection, polled together in its one task: the writer, the
//! only code that writes to the socket (it drains the connection's queue under the send
//! deadline, then sends the hub's Close), and the reader, which hands each incoming message to
//! [`super::messages`] until the agent closes, breaks the protocol or the hub kills the
//! connection. Neither decides anything about the agent: teardown is [`super::serve_agent`]'s.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};

use super::messages::handle;
use super::{CLOSE_DRAIN, Conn, Outbound, close_msg, is_too_big, slow_consumer};
use crate::protocol::close;
use crate::service::Service;

pub(super) type Sink = futures_util::stream::SplitSink<WebSocket, Message>;
pub(super) type Stream = futures_util::stream::SplitStream<WebSocket>;

/// The writing half of a connection: drains its queue; nothing else writes to the socket.
/// A send waits while the agent's TCP window is closed: it has `agent_send_timeout` to
/// complete and a kill ends it at once, so an agent that stops reading is cut off within that
/// bound and never holds the teardown. True when the hub's Close went out.
pub(super) async fn write_queue(svc: &Service, agent: &str, conn: &Conn, mut sink: Sink) -> bool {
    let deadline = svc.cfg.agent_send_timeout;
    let mut stuck = false;
    loop {
        let first = tokio::select! {
            _ = conn.kill.cancelled() => break,
            m = conn.queue.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        // Every frame queued by now goes in one write (a quiet `release` and the `leased`
        // behind it, a burst of stdin).
        let send = tokio::time::timeout(deadline, write_batch(&mut sink, conn, first));
        tokio::pin!(send);
        tokio::select! {
            r = &mut send => match r {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    stuck = true;
                    let r = format!("agent {agent} did not read for {deadline:?} (send deadline)");
                    slow_consumer(svc, conn, r);
                    break;
                }
            },
            _ = conn.kill.cancelled() => {
                // An agent that does not read is dropped at once; one closed for another
                // reason gets this write finished (briefly) and then the close frame.
                if !conn.unreadable.load(Ordering::Relaxed)
                    && matches!(tokio::time::timeout(CLOSE_DRAIN, &mut send).await, Ok(Ok(Ok(()))))
                {
                    break;
                }
                stuck = true;
                break;
            }
        }
    }
    if stuck || conn.unreadable.load(Ordering::Relaxed) {
        // A close frame cannot pass a closed window: dropping the socket closes it.
        conn.queue.close();
        return false;
    }
    let reason = conn.close_reason.lock().expect("lock").clone();
    let (code, reason) = reason.unwrap_or((close::GOING_AWAY, "closing".into()));
    let _ = tokio::time::timeout(CLOSE_DRAIN, async {
        // What was queued before the close goes first (a `release` the agent must hear before
        // it reconnects elsewhere, or it would report a lease that ended), then the Close.
        for _ in 0..svc.cfg.agent_queue {
            let Some(m) = conn.queue.try_recv() else {
                break;
            };
            if sink.feed(message(m)).await.is_err() {
                break;
            }
        }
        conn.queue.close();
        // After the agent's own Close no other may be sent; flushing sends the reply
        // queued when it arrived (the closing handshake, RFC 6455 5.5.1).
        if sink.send(close_msg(code, &reason)).await.is_err() {
            let _ = sink.flush().await;
        }
    })
    .await;
    conn.queue.close();
    true
}

fn message(m: Outbound) -> Message {
    match m {
        Outbound::Text(t) => Message::Text(t),
        Outbound::Binary(b) => Message::Binary(b),
    }
}

/// Frames written in one go at most: a sender that keeps the queue full still sees each
/// batch flushed, and a batch finishes well within the send deadline.
const BATCH: usize = 64;

/// Writes `first` and the frames queued behind it (up to [`BATCH`]), then flushes once.
async fn write_batch(sink: &mut Sink, conn: &Conn, first: Outbound) -> Result<(), axum::Error> {
    sink.feed(message(first)).await?;
    for _ in 1..BATCH {
        let Some(m) = conn.queue.try_recv() else {
            break;
        };
        sink.feed(message(m)).await?;
    }
    sink.flush().await
}

/// The reading half of a connection: handles the agent's messages until it closes, breaks
/// the protocol or the hub kills the connection (which then also ends the writing half).
/// Returns why it ended, whether the hub closed it for good (terminated or going away),
/// whether it dropped on its own, and the stream (for the closing handshake).
pub(super) async fn read_messages(
    svc: &Arc<Service>,
    agent: &str,
    conn: &Conn,
    mut stream: Stream,
) -> (String, bool, bool, Stream) {
    let why = loop {
        let msg = tokio::select! {
            _ = conn.kill.cancelled() => {
                let r = conn.close_reason.lock().expect("lock").clone();
                break r.map_or_else(|| "closed by hub".to_string(), |(_, r)| r);
            }
            m = stream.next() => m,
        };
        let msg = match msg {
            None => break "connection closed".to_string(),
            Some(Err(e)) => {
                let text = e.to_string();
                if is_too_big(&text) {
                    svc.metrics
                        .protocol_errors
                        .with_label_values(&["frame-too-large"])
                        .inc();
                    let r = format!("frame exceeds {} bytes", svc.cfg.max_frame_bytes);
                    conn.close(close::TOO_BIG, &r);
                    break r;
                }
                break format!("read error: {text}");
            }
            Some(Ok(m)) => m,
        };
        match Box::pin(handle(svc, agent, conn, msg)).await {
            Ok(true) => {}
            Ok(false) => break "agent closed the connection".to_string(),
            Err((metric, reason)) => {
                svc.metrics
                    .protocol_errors
                    .with_label_values(&[metric])
                    .inc();
                tracing::warn!(agent = %agent, reason = %reason, "protocol error; closing");
                let code = match metric {
                    "message-rate" => close::SLOW_CONSUMER,
                    _ => close::PROTOCOL_VIOLATION,
                };
                conn.close(code, &reason);
                break reason;
            }
        }
    };
    let closed_by_hub = conn.kill.is_cancelled()
        && conn
            .close_reason
            .lock()
            .expect("lock")
            .as_ref()
            .is_some_and(|(c, _)| *c == close::TERMINATED || *c == close::GOING_AWAY);
    // A connection that dropped on its own (not closed by the hub for a reason) may come back.
    let dropped = conn.close_reason.lock().expect("lock").is_none();
    conn.kill.cancel();
    (why, closed_by_hub, dropped, stream)
}
