//! Serves HTTP/1.1 connections (the API, `/metrics`, the agent hub and exec sockets) with the
//! limits that keep a client from wedging the service:
//!
//! - a deadline for a request's headers, which also closes a keep-alive connection that stays
//!   idle between requests (hyper's `header_read_timeout`): half-sent requests do not hold
//!   sockets for ever;
//! - a cap on open connections, WebSockets included: a connection over it is accepted and
//!   closed at once, so the process keeps file descriptors for agents' pipes and files and the
//!   accept loop never runs dry;
//! - headroom in that cap reserved for agents: once the other slots are taken, a new connection
//!   gets a reserved slot that serves only agents' hub handshakes (the `reserved` router) under a
//!   short header deadline, so clients holding many sockets cannot lock agents out;
//! - a graceful shutdown that stops accepting and lets requests in flight finish.
//!
//! It also raises the soft `RLIMIT_NOFILE` to the hard limit. It knows no routes: both routers (the
//! ordinary one and the reserved one) are handed in.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Limits on HTTP connections.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Time a client has to send a request's headers, counted from the connection's start or
    /// from the end of its previous response (so also the idle timeout of keep-alive).
    pub header_timeout: Duration,
    /// Open connections (WebSockets included) at most; more are closed as they arrive.
    pub max_connections: usize,
    /// Of `max_connections`, the slots kept for agents' hub connections: taken only when the
    /// others are full, and then serving nothing else (default: [`default_agent_reserve`]).
    pub agent_reserve: Option<usize>,
}

/// Time a connection on a reserved slot has to send its request's headers.
pub const RESERVED_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            max_connections: default_max_connections(),
            agent_reserve: None,
        }
    }
}

impl HttpLimits {
    /// The slots any connection may take, and the slots reserved for agents (their sum is
    /// `max_connections`; at least one of each).
    pub fn split(&self) -> (usize, usize) {
        let total = self.max_connections.max(2);
        let reserve = self
            .agent_reserve
            .unwrap_or_else(|| default_agent_reserve(total))
            .clamp(1, total - 1);
        (total - reserve, reserve)
    }
}

/// An eighth of the connection cap, at least 8 and at most 4096 slots.
pub fn default_agent_reserve(max_connections: usize) -> usize {
    (max_connections / 8).clamp(8, 4096)
}

/// Three quarters of the soft `RLIMIT_NOFILE` (after [`raise_fd_limit`]): the rest stays for
/// agents' pipes, work files and outgoing connections.
pub fn default_max_connections() -> usize {
    let (soft, _) = fd_limits();
    ((soft / 4) * 3).clamp(64, 1 << 20) as usize
}

fn fd_limits() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return (1024, 1024);
    }
    (r.rlim_cur, r.rlim_max)
}

/// Raises the soft limit on open files to the hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(r.rlim_cur)
}

/// What [`serve`] serves.
pub struct Routers {
    /// The routes, for connections on an ordinary slot.
    pub app: Router,
    /// For connections on a slot reserved for agents: a router that answers everything but an
    /// agent's handshake with an error.
    pub reserved: Router,
    /// Counts connections closed at accept (`reason="limit"`).
    pub refused: Option<prometheus::IntCounterVec>,
}

/// Serves `routers` on `listener` until `shutdown` resolves, then waits for the requests in
/// flight.
pub async fn serve<L>(
    mut listener: L,
    routers: Routers,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) where
    L: axum::serve::Listener,
    L::Io: Unpin,
{
    let Routers {
        app,
        reserved,
        refused: refused_total,
    } = routers;
    let (general, reserve) = limits.split();
    let slots = Arc::new(Semaphore::new(general));
    let reserve_slots = Arc::new(Semaphore::new(reserve));
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let mut refused: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        let (io, _peer) = tokio::select! {
            c = listener.accept() => c,
            _ = &mut shutdown => break,
        };
        let (slot, reserved_slot) = match slots.clone().try_acquire_owned() {
            Ok(slot) => (slot, false),
            Err(_) => match reserve_slots.clone().try_acquire_owned() {
                Ok(slot) => (slot, true),
                Err(_) => {
                    // Accept-and-close keeps the backlog from filling with connections nobody
                    // serves.
                    refused += 1;
                    if let Some(c) = &refused_total {
                        c.with_label_values(&["limit"]).inc();
                    }
                    if refused.is_power_of_two() {
                        tracing::warn!(
                            limit = limits.max_connections,
                            reserved_for_agents = reserve,
                            refused,
                            "connection limit reached; closing new connections"
                        );
                    }
                    drop(io);
                    continue;
                }
            },
        };
        let io = TokioIo::new(Counted { io, _slot: slot });
        let (svc, header_timeout) = if reserved_slot {
            (
                TowerToHyperService::new(reserved.clone()),
                limits.header_timeout.min(RESERVED_HEADER_TIMEOUT),
            )
        } else {
            (TowerToHyperService::new(app.clone()), limits.header_timeout)
        };
        let stop = stop.clone();
        tasks.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(io, svc)
                .with_upgrades();
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        });
    }
    drop(listener);
    stop.cancel();
    tasks.close();
    tasks.wait().await;
}

/// A connection's IO holding its slot: the slot is freed when the socket closes, also after an
/// upgrade to a WebSocket (which carries this IO along).
struct Counted<I> {
    io: I,
    _slot: OwnedSemaphorePermit,
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
