//! The first message of an agent connection: `hello`, read under the hello deadline and size
//! bounds. Anything else (silence, a bad or oversized frame, bytes that are not WebSocket
//! frames, another message) is refused with the close code docs/PROTOCOL.md gives, a log line
//! and a counter. It checks no token and registers nothing: [`crate::hub`] does.

use axum::extract::ws::{Message, WebSocket};

use crate::engine::Health;
use crate::hub::{is_too_big, msg_type, refuse};
use crate::protocol::{AgentMessage, ExecReport, close};
use crate::service::Service;

/// Largest `hello` accepted: it carries an id, a token, labels and a few numbers.
pub const MAX_HELLO_BYTES: usize = 64 * 1024;
/// Labels a `hello` may report, and the length of each.
pub const MAX_HELLO_LABELS: usize = 256;
/// Longest label in a `hello`, in bytes.
pub const MAX_LABEL_BYTES: usize = 256;

/// The fields of a `hello` the hub uses: protocol, agent id, pool, token, health, the lease it
/// claims with its lease token, uses, execs, and whether it takes quiet releases.
pub(crate) type Hello = (
    u32,
    String,
    Option<String>,
    String,
    Health,
    Option<(String, Option<String>)>,
    u32,
    Option<Vec<ExecReport>>,
    bool,
);

/// Refuses the connection (see [`refuse`]); no hello.
async fn refused(
    svc: &Service,
    socket: WebSocket,
    code: u16,
    metric: &str,
    reason: String,
) -> Option<(WebSocket, Hello)> {
    refuse(svc, socket, code, metric, reason).await;
    None
}

/// Reads the connection's `hello`; None when the connection was refused (and closed).
pub(crate) async fn read(svc: &Service, mut socket: WebSocket) -> Option<(WebSocket, Hello)> {
    let first = tokio::time::timeout(svc.cfg.hello_timeout, socket.recv()).await;
    let hello = match first {
        Err(_) => {
            let r = format!("no hello within {:?}", svc.cfg.hello_timeout);
            return refused(svc, socket, close::HELLO_TIMEOUT, "hello-timeout", r).await;
        }
        Ok(None) => {
            svc.metrics
                .rejected_connections
                .with_label_values(&["closed-before-hello"])
                .inc();
            tracing::debug!("agent connection closed before its hello");
            return None;
        }
        Ok(Some(Err(e))) => {
            // Invalid UTF-8, an oversized frame or message (even one only claimed in a frame
            // header), bytes that are not WebSocket frames: closed with the documented code.
            let text = e.to_string();
            let (code, metric, r) = if is_too_big(&text) {
                let r = format!(
                    "frame before hello exceeds {} bytes",
                    svc.cfg.max_frame_bytes
                );
                (close::TOO_BIG, "frame-too-large", r)
            } else {
                (
                    close::PROTOCOL_VIOLATION,
                    "bad-frame",
                    format!("bad frame before hello: {text}"),
                )
            };
            svc.metrics
                .protocol_errors
                .with_label_values(&[metric])
                .inc();
            return refused(svc, socket, code, metric, r).await;
        }
        Ok(Some(Ok(Message::Text(t)))) if t.len() > MAX_HELLO_BYTES => {
            svc.metrics
                .protocol_errors
                .with_label_values(&["hello-too-large"])
                .inc();
            let r = format!("hello of {} bytes exceeds {MAX_HELLO_BYTES} bytes", t.len());
            return refused(svc, socket, close::TOO_BIG, "hello-too-large", r).await;
        }
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<AgentMessage>(&t) {
            Ok(AgentMessage::Hello { labels, .. })
                if labels.len() > MAX_HELLO_LABELS
                    || labels.iter().any(|l| l.len() > MAX_LABEL_BYTES) =>
            {
                let r = format!(
                    "hello reports {} labels; at most {MAX_HELLO_LABELS} of at most {MAX_LABEL_BYTES} bytes each",
                    labels.len()
                );
                return refused(svc, socket, close::PROTOCOL_VIOLATION, "protocol", r).await;
            }
            Ok(AgentMessage::Hello {
                protocol,
                agent_id,
                pool,
                token,
                health,
                lease,
                lease_token,
                uses,
                execs,
                quiet_release,
                ..
            }) => {
                let lease = lease.map(|l| (l, lease_token));
                let quiet = quiet_release;
                (
                    protocol, agent_id, pool, token, health, lease, uses, execs, quiet,
                )
            }
            Ok(other) => {
                let r = format!("expected hello, got {}", msg_type(&other));
                return refused(svc, socket, close::PROTOCOL_VIOLATION, "protocol", r).await;
            }
            Err(e) => {
                let r = format!("malformed hello: {e}");
                return refused(svc, socket, close::PROTOCOL_VIOLATION, "malformed", r).await;
            }
        },
        Ok(Some(Ok(_))) => {
            let r = "expected a hello text frame".to_string();
            return refused(svc, socket, close::PROTOCOL_VIOLATION, "protocol", r).await;
        }
    };
    Some((socket, hello))
}
