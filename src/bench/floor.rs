//! The floor of the lease API (`warmpool bench --floor`): a minimal axum server with the
//! lease routes and nothing behind them. `POST /v1/leases` reads the body and answers 201 with
//! a lease-shaped JSON of about 240 bytes, `DELETE /v1/leases/{id}` answers 204; TCP_NODELAY
//! as warmpool's listener. It runs on a runtime of its own whose threads are named
//! [`FLOOR_THREADS`], so its CPU is read apart from the load generator's (cpu.rs).
//!
//! Also [`OwnRuntime`]: a runtime with named threads that can be dropped from async code (the
//! embedded warmpool runs on one named [`super::cpu::SERVER_THREADS`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{delete, post};

pub use super::cpu::FLOOR_THREADS;

/// A multi-thread runtime whose worker and blocking threads carry `name`, and whose blocking
/// threads stay alive for the run (an exited thread's CPU time leaves /proc/self/task).
/// Dropping it shuts it down in the background, so it may be dropped inside another runtime.
pub struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    /// Builds it (worker threads: one per core, as `#[tokio::main]`).
    pub fn new(name: &str) -> std::io::Result<OwnRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name(name)
            .thread_keep_alive(Duration::from_secs(3600))
            .enable_all()
            .build()?;
        Ok(OwnRuntime(Some(rt)))
    }

    /// Its handle (to spawn on it).
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("runtime alive").handle()
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The running floor server; dropping it stops it.
pub struct Floor {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    _rt: OwnRuntime,
}

impl Floor {
    /// Binds 127.0.0.1:0 and serves on a runtime of its own.
    pub async fn start() -> std::io::Result<Floor> {
        let rt = OwnRuntime::new(FLOOR_THREADS)?;
        let listener = rt
            .handle()
            .spawn(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .await
            .map_err(std::io::Error::other)??;
        let addr = listener.local_addr()?;
        rt.handle().spawn(async move {
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            if let Err(e) = axum::serve(listener, router()).await {
                tracing::warn!(error = %e, "the floor server stopped");
            }
        });
        Ok(Floor { addr, _rt: rt })
    }

    /// `http://addr`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The floor's routes.
pub fn router() -> Router {
    Router::new()
        .route("/v1/leases", post(lease))
        .route("/v1/leases/{id}", delete(release))
}

static LEASES: AtomicU64 = AtomicU64::new(0);

/// A lease-shaped answer (the fields of warmpool's, about as long).
fn lease_json(n: u64) -> String {
    format!(
        concat!(
            r#"{{"id":"l-floor-{:08x}","agent":"floor-{:04}","pool":"floor","#,
            r#""labels":["bench","floor"],"holder":"warmpool bench","selector":"bench && floor","#,
            r#""state":"active","grantedAt":"2026-12-01T17:00:00.000Z","#,
            r#""expiresAt":"2026-12-01T17:02:00.000Z","ttlSeconds":120.0}}"#
        ),
        n,
        n % 1024
    )
}

/// Takes the body (as a real server must) and answers without looking at it.
async fn lease(_body: Bytes) -> impl IntoResponse {
    let n = LEASES.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        lease_json(n),
    )
}

async fn release(Path(_id): Path<String>) -> StatusCode {
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_reads_as_warmpools() {
        let j = lease_json(7);
        assert!((220..=260).contains(&j.len()), "{} bytes: {j}", j.len());
        let v: crate::api::LeaseView = serde_json::from_str(&j).unwrap();
        assert_eq!((v.pool.as_str(), v.state.as_str()), ("floor", "active"));
    }

    #[tokio::test]
    async fn serves_lease_and_release() {
        let f = Floor::start().await.unwrap();
        let c = crate::client::Client::new(&f.base_url(), None);
        let l = c.lease(&crate::api::CreateLease::default()).await.unwrap();
        c.release_unparsed(&l.id).await.unwrap();
        drop(f);
    }
}
