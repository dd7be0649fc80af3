//! A fault-injecting HTTP proxy between warmpool and the real apiserver. warmpool's client
//! talks plain HTTP to it; it forwards every request to the apiserver with an admin client and
//! injects, by request count:
//!   - 429 Too Many Requests (with Retry-After) on pod creation, before forwarding;
//!   - 500 on pod creation *after* forwarding (the pod exists, the answer is lost);
//!   - 409 Conflict on AgentPool status writes, before forwarding;
//!   - slow responses;
//!   - watch streams cut after a while.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body as AxumBody;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http_body_util::BodyExt;

#[derive(Clone)]
pub struct FaultPlan {
    /// Every nth pod creation is answered 429 without forwarding.
    pub create_429_every: u64,
    /// Every nth pod creation is forwarded, then answered 500.
    pub create_500_every: u64,
    /// Every nth AgentPool status write is answered 409.
    pub status_409_every: u64,
    /// Every nth request is delayed by `delay`.
    pub slow_every: u64,
    pub delay: Duration,
    /// Watch streams are cut after this long.
    pub cut_watch_after: Duration,
}

#[derive(Default)]
pub struct Counts {
    pub requests: AtomicU64,
    pub creates: AtomicU64,
    pub statuses: AtomicU64,
    pub injected: AtomicU64,
    pub cut_watches: AtomicU64,
}

#[derive(Clone)]
struct Proxy {
    upstream: kube::Client,
    plan: FaultPlan,
    counts: Arc<Counts>,
}

/// Starts the proxy; returns its URL and the counters.
pub async fn start(upstream: kube::Client, plan: FaultPlan) -> (String, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let state = Proxy {
        upstream,
        plan,
        counts: counts.clone(),
    };
    let app = axum::Router::new().fallback(forward).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, counts)
}

fn status(code: u16, reason: &str) -> Response {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("injected by the fault proxy: {reason}"), "reason": reason, "code": code
    });
    let mut r = (
        http::StatusCode::from_u16(code).unwrap(),
        [(http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if code == 429 {
        r.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
    }
    r
}

async fn forward(State(p): State<Proxy>, req: Request) -> Response {
    let n = p.counts.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let method = req.method().clone();
    let uri = req.uri().clone();
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("");
    let is_watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let is_create = method == http::Method::POST && path.ends_with("/pods");
    let is_status = path.ends_with("/status") && path.contains("/agentpools/");
    let mut create_n = 0;
    if is_create {
        create_n = p.counts.creates.fetch_add(1, Ordering::Relaxed) + 1;
        if create_n % p.plan.create_429_every == 0 {
            p.counts.injected.fetch_add(1, Ordering::Relaxed);
            return status(429, "TooManyRequests");
        }
    }
    if is_status {
        let k = p.counts.statuses.fetch_add(1, Ordering::Relaxed) + 1;
        if k % p.plan.status_409_every == 0 {
            p.counts.injected.fetch_add(1, Ordering::Relaxed);
            return status(409, "Conflict");
        }
    }
    if n % p.plan.slow_every == 0 {
        tokio::time::sleep(p.plan.delay).await;
    }
    let mut builder = http::Request::builder().method(method).uri(
        uri.path_and_query()
            .map(|pq| pq.as_str().to_string())
            .unwrap_or_default(),
    );
    for (k, v) in req.headers() {
        if k == http::header::CONTENT_TYPE || k == http::header::ACCEPT {
            builder = builder.header(k, v);
        }
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let upstream_req = builder
        .body(kube::client::Body::from(body.to_vec()))
        .unwrap();
    let resp = match p.upstream.send(upstream_req).await {
        Ok(r) => r,
        Err(e) => return status(502, &format!("BadGateway: {e}")),
    };
    if is_create && create_n % p.plan.create_500_every == 0 {
        // The pod was created; the client never learns it.
        p.counts.injected.fetch_add(1, Ordering::Relaxed);
        return status(500, "InternalError");
    }
    let (parts, body) = resp.into_parts();
    let mut out = Response::builder().status(parts.status);
    if let Some(ct) = parts.headers.get(http::header::CONTENT_TYPE) {
        out = out.header(http::header::CONTENT_TYPE, ct);
    }
    if is_watch {
        let cut = p.plan.cut_watch_after;
        let counts = p.counts.clone();
        let stream = body.into_data_stream().take_until(async move {
            tokio::time::sleep(cut).await;
            counts.cut_watches.fetch_add(1, Ordering::Relaxed);
        });
        return out.body(AxumBody::from_stream(stream)).unwrap();
    }
    out.body(AxumBody::new(body.map_err(axum::BoxError::from)))
        .unwrap()
}
