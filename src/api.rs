//! The HTTP lease API (axum): leases, pools, the exec WebSocket, the hub endpoint, probes and
//! metrics. Documented in docs/API.md.
//!
//! Handlers translate HTTP to service calls and back; they hold no state of their own. Errors
//! are JSON `{"error":{"code","message"}}` with the matching status. Waiting lease requests are
//! withdrawn when their client disconnects (the handler future is dropped).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

pub use crate::api_error::{ApiError, ErrorBody, ErrorDetail};
use crate::engine::{Lease, LeaseError, LeaseRequest, PoolStatus};
use crate::hub::{self, ExecEvent, ExecStartError};
use crate::labels::Expr;
use crate::protocol::{ClientMessage, ServerMessage};
use crate::service::{Requested, Service};

/// Longest `waitSeconds` accepted.
pub const MAX_WAIT_SECONDS: f64 = 3600.0;
/// Longest `ttlSeconds` accepted.
pub const MAX_TTL_SECONDS: f64 = 86_400.0;
/// An exec client that takes no output for this long is disconnected and its command cancelled.
pub const CLIENT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Shared handler state.
#[derive(Clone)]
pub struct ApiState {
    /// The service.
    pub svc: Arc<Service>,
    /// Bearer token required on `/v1/leases` and `/v1/pools`, when set.
    pub api_token: Option<Arc<String>>,
}

/// `POST /v1/leases` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateLease {
    /// Label expression (Jenkins syntax); empty matches any agent.
    #[serde(default)]
    pub selector: String,
    /// How long to wait for an agent (default 60).
    #[serde(default)]
    pub wait_seconds: Option<f64>,
    /// Lease TTL; renew before it passes (default 300).
    #[serde(default)]
    pub ttl_seconds: Option<f64>,
    /// Who holds the lease (free text: CI job URL, user@host).
    #[serde(default)]
    pub holder: Option<String>,
    /// Same key, same active lease: retries do not take a second agent.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// `POST /v1/leases/{id}/renew` body (optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenewLease {
    /// New TTL; the lease then expires this long from now.
    #[serde(default)]
    pub ttl_seconds: Option<f64>,
}

/// A lease as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseView {
    /// Lease id.
    pub id: String,
    /// Agent id.
    pub agent: String,
    /// Pool.
    pub pool: String,
    /// The pool's labels.
    pub labels: Vec<String>,
    /// Holder.
    pub holder: String,
    /// Selector requested.
    pub selector: String,
    /// `active`, `released`, `expired` or `failed`.
    pub state: String,
    /// RFC 3339.
    pub granted_at: String,
    /// RFC 3339; renew before.
    pub expires_at: String,
    /// Renewal period.
    pub ttl_seconds: f64,
    /// Why it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn view(svc: &Service, l: &Lease) -> LeaseView {
    LeaseView {
        id: l.id.clone(),
        agent: l.agent.clone(),
        pool: l.pool.clone(),
        labels: l.labels.clone(),
        holder: l.holder.clone(),
        selector: l.selector.clone(),
        state: l.state.as_str().to_string(),
        granted_at: rfc3339(svc.wall(l.granted)),
        expires_at: rfc3339(svc.wall(l.expires)),
        ttl_seconds: l.ttl.as_secs_f64(),
        end_reason: l.end_reason.clone(),
    }
}

fn seconds(v: Option<f64>, default: f64, max: f64, field: &str) -> Result<Duration, ApiError> {
    let s = v.unwrap_or(default);
    if !s.is_finite() || s < 0.0 || s > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field} must be between 0 and {max}, got {s}"),
        ));
    }
    Ok(Duration::from_secs_f64(s))
}

/// Shortest `ttlSeconds` accepted (by create and renew alike): a shorter lease would expire
/// before its holder could use it, and recycle its agent for nothing.
pub const MIN_TTL_SECONDS: f64 = 0.001;

/// A lease TTL as create and renew both validate it.
fn lease_ttl(s: f64) -> Result<Duration, ApiError> {
    if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&s) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("ttlSeconds must be between {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS}, got {s}"),
        ));
    }
    Ok(Duration::from_secs_f64(s))
}

/// Read buffer of one agent connection: allocated (and zeroed) when it opens, so each idle agent
/// holds it. An idle agent sends a heartbeat of about 60 bytes per interval; a frame larger than
/// the buffer grows it, and it is read in pieces of this size (16 reads for a 32 KiB output
/// chunk, a few microseconds).
const AGENT_READ_BUFFER_BYTES: usize = 2 * 1024;
/// Bytes of frames the hub buffers before writing to an agent (each send flushes at once; the
/// buffer grows only to the largest frame written).
const AGENT_WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// Builds the router.
pub fn router(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/v1/leases", post(create_lease))
        .route("/v1/leases/{id}", get(get_lease).delete(delete_lease))
        .route("/v1/leases/{id}/renew", post(renew_lease))
        .route("/v1/leases/{id}/exec", get(exec_socket))
        .route("/v1/pools", get(list_pools))
        .route("/v1/pools/{name}", get(get_pool))
        .route("/v1/pools/{name}/join-token", post(join_token))
        .route("/v1/jenkins/pools", get(jenkins_pools))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let app = Router::new()
        .merge(protected)
        .route(AGENT_CONNECT_PATH, get(agent_connect))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(crate::api_error::not_found)
        .with_state(state);
    // Around the whole router, so the 405s reach it with their `Allow` header set.
    Router::new()
        .fallback_service(app)
        .layer(middleware::from_fn(crate::api_error::method_not_allowed))
}

/// The path agents dial (the hub endpoint).
pub const AGENT_CONNECT_PATH: &str = "/v1/agents/connect";

/// The router for connections on a slot reserved for agents (see
/// [`crate::http_server::HttpLimits::agent_reserve`]): an agent's handshake goes to `app`, any
/// other request is answered 503 and counted in
/// `warmpool_http_connections_refused_total{reason="reserved-for-agents"}`.
pub fn agents_only(app: Router, refused: prometheus::IntCounterVec) -> Router {
    Router::new()
        .fallback_service(app)
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let refused = refused.clone();
            async move {
                if req.uri().path() == AGENT_CONNECT_PATH {
                    return next.run(req).await;
                }
                refused.with_label_values(&["reserved-for-agents"]).inc();
                let mut resp = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "connection_limit",
                    "the service is at its connection limit (--max-connections); only agents' \
                     hub connections are taken now: retry later",
                )
                .into_response();
                let h = resp.headers_mut();
                h.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                // Frees the reserved slot as soon as the answer is written.
                h.insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
                resp
            }
        }))
}

/// The hub endpoint: handshake rate limit, then the WebSocket upgrade.
async fn agent_connect(
    State(st): State<ApiState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws?;
    if !st.svc.hub.admit_handshake() {
        st.svc
            .metrics
            .rejected_connections
            .with_label_values(&["handshake-rate"])
            .inc();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "handshake_rate_limited",
            "too many agent handshakes per second; retry with backoff",
        ));
    }
    let svc = st.svc.clone();
    let max = svc.cfg.max_frame_bytes;
    // Small buffers: thousands of mostly idle agents each hold one connection (tungstenite's
    // 128 KiB defaults would cost 256 KiB per agent); larger frames still grow them.
    Ok(ws
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(AGENT_READ_BUFFER_BYTES)
        .write_buffer_size(AGENT_WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| hub::serve_agent(svc, socket)))
}

async fn require_token(
    State(st): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(want) = &st.api_token {
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .unwrap_or("");
        if !crate::auth::secrets_equal(got.trim().as_bytes(), want.as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token (Authorization: Bearer <token>)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// The credentials of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

async fn create_lease(
    State(st): State<ApiState>,
    body: Result<Json<CreateLease>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    if !st.svc.is_ready() {
        // A standby, an instance still adopting its pods, or one shutting down: retry elsewhere
        // or later, rather than read "no pool can satisfy" into an empty engine.
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "warmpool is not ready to lease (a leader-election standby, adopting, or shutting down); retry",
        ));
    }
    let selector = Expr::parse(&body.selector)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_selector", e.to_string()))?;
    let wait = seconds(body.wait_seconds, 60.0, MAX_WAIT_SECONDS, "waitSeconds")?;
    let ttl = lease_ttl(body.ttl_seconds.unwrap_or(300.0))?;
    let req = LeaseRequest {
        selector,
        selector_text: body.selector.clone(),
        wait,
        ttl,
        holder: body.holder.unwrap_or_default(),
        idempotency_key: body.idempotency_key.filter(|k| !k.is_empty()),
    };
    let lease = match st.svc.request_lease(req)? {
        Requested::Now(l, existing) => {
            let status = if existing {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            return Ok((status, Json(view(&st.svc, &l))).into_response());
        }
        Requested::Waiting(p) => p.outcome().await?,
    };
    Ok((StatusCode::CREATED, Json(view(&st.svc, &lease))).into_response())
}

async fn get_lease(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<LeaseView>, ApiError> {
    let l = st
        .svc
        .read(|e| e.lease(&id).cloned())
        .ok_or(LeaseError::NotFound(id))?;
    Ok(Json(view(&st.svc, &l)))
}

async fn renew_lease(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<LeaseView>, ApiError> {
    // No body, or `{}`: the lease keeps its TTL. A body that is there must be a valid one, with
    // the JSON content type (as create's).
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        RenewLease::default()
    } else {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase())
            .is_some_and(|m| m == "application/json" || m.ends_with("+json"));
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request",
                "a renew body must be JSON (Content-Type: application/json)",
            ));
        }
        Json::<RenewLease>::from_bytes(&body)?.0
    };
    let ttl = match body.ttl_seconds {
        Some(s) => Some(lease_ttl(s)?),
        None => None,
    };
    let l = st.svc.apply(|e, now| e.renew(&id, ttl, now))?;
    Ok(Json(view(&st.svc, &l)))
}

async fn delete_lease(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<LeaseView>, ApiError> {
    let l = st.svc.apply(|e, now| e.release(&id, now))?;
    Ok(Json(view(&st.svc, &l)))
}

async fn jenkins_pools(State(st): State<ApiState>) -> Json<Vec<crate::jenkins::JenkinsPoolStatus>> {
    Json(
        st.svc
            .jenkins
            .get()
            .map(|c| c.statuses())
            .unwrap_or_default(),
    )
}

async fn list_pools(State(st): State<ApiState>) -> Json<Vec<PoolStatus>> {
    Json(st.svc.pools())
}

async fn get_pool(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<PoolStatus>, ApiError> {
    st.svc
        .pools()
        .into_iter()
        .find(|p| p.name == name)
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "pool_not_found",
                format!("pool {name} not found"),
            )
        })
}

/// The join token of an external pool (machines present it with `WARMPOOL_POOL` and an id of
/// their own; see docs/API.md).
async fn join_token(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(pool) = st.svc.pools().into_iter().find(|p| p.name == name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "pool_not_found",
            format!("pool {name} not found"),
        ));
    };
    if !pool.spec.external {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "pool_not_external",
            format!(
                "pool {name} is not external: warmpool starts its agents and gives each its own token"
            ),
        ));
    }
    Ok(Json(serde_json::json!({
        "pool": name,
        "token": st.svc.key.join_token(&name),
    })))
}

async fn metrics(State(st): State<ApiState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.svc.render_metrics(),
    )
}

async fn readyz(State(st): State<ApiState>) -> Response {
    if st.svc.is_ready() {
        "ready\n".into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "warmpool is not ready: a leader-election standby, or shutting down",
        )
        .into_response()
    }
}

async fn exec_socket(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let lease = st.svc.read(|e| e.active_lease(&id).cloned())?;
    let ws = ws?;
    let svc = st.svc.clone();
    let max = svc.cfg.max_frame_bytes;
    Ok(ws
        .max_message_size(max)
        .on_upgrade(move |socket| run_exec(svc, lease, socket)))
}

async fn send_json(socket: &mut WebSocket, m: &ServerMessage) -> bool {
    let text = serde_json::to_string(m).expect("serialisable");
    socket.send(Message::Text(text.into())).await.is_ok()
}

async fn fail(socket: &mut WebSocket, code: &str, message: String) {
    let _ = send_json(
        socket,
        &ServerMessage::Error {
            code: code.into(),
            message,
        },
    )
    .await;
    let _ = socket.send(Message::Close(None)).await;
}

/// One exec: read the request (`exec`, or `attach` to one started earlier), start or re-attach
/// it on the lease's agent, stream output, send the exit.
async fn run_exec(svc: Arc<Service>, lease: Lease, mut socket: WebSocket) {
    let first = tokio::time::timeout(Duration::from_secs(30), socket.recv()).await;
    let request = match first {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<ClientMessage>(&t) {
            Ok(ClientMessage::Cancel | ClientMessage::Resize(_)) => {
                return fail(
                    &mut socket,
                    "invalid_request",
                    "expected exec or attach first".into(),
                )
                .await;
            }
            Ok(m) => m,
            Err(e) => {
                return fail(
                    &mut socket,
                    "invalid_request",
                    format!("malformed exec request: {e}"),
                )
                .await;
            }
        },
        Ok(_) => {
            return fail(
                &mut socket,
                "invalid_request",
                "expected an exec request text frame".into(),
            )
            .await;
        }
        Err(_) => {
            return fail(
                &mut socket,
                "invalid_request",
                "no exec request within 30s".into(),
            )
            .await;
        }
    };
    if let ClientMessage::Exec(spec) = &request
        && let Err(e) = spec.validate()
    {
        return fail(
            &mut socket,
            "invalid_request",
            format!("invalid exec request: {e}"),
        )
        .await;
    }
    // The lease may have ended while the socket was being upgraded.
    if let Err(e) = svc.read(|e| e.active_lease(&lease.id).map(|_| ())) {
        return fail(&mut socket, e.code(), e.to_string()).await;
    }
    let started = std::time::Instant::now();
    let (exec_id, attach, mut rx) = match request {
        ClientMessage::Exec(spec) => {
            match svc.hub.start_exec(&svc, &lease.agent, &lease.id, spec) {
                Ok((id, rx)) => (id, None, rx),
                Err(ExecStartError::LeaseEnded(e)) => {
                    return fail(&mut socket, e.code(), e.to_string()).await;
                }
                Err(e) => {
                    let m = format!("lease {}: {e}", lease.id);
                    return fail(&mut socket, "agent_unavailable", m).await;
                }
            }
        }
        ClientMessage::Attach { exec_id, offset } => {
            match svc
                .hub
                .attach_exec(&svc, &lease.agent, &lease.id, exec_id, offset)
            {
                Ok(rx) => (exec_id, Some(offset), rx),
                Err(ExecStartError::LeaseEnded(e)) => {
                    return fail(&mut socket, e.code(), e.to_string()).await;
                }
                Err(e) => {
                    let m = format!("lease {}: {e}", lease.id);
                    return fail(&mut socket, "agent_unavailable", m).await;
                }
            }
        }
        ClientMessage::Cancel | ClientMessage::Resize(_) => unreachable!("refused above"),
    };
    // The lease may have ended between the check above and the route's registration; a lease
    // that ends from now on finds the route and stops it.
    if let Err(e) = svc.read(|e| e.active_lease(&lease.id).map(|_| ())) {
        svc.hub.cancel_exec(&svc, &lease.agent, exec_id);
        return fail(&mut socket, e.code(), e.to_string()).await;
    }
    tracing::debug!(lease = %lease.id, agent = %lease.agent, exec_id, attach, "exec started");
    if attach.is_none()
        && !send_json(
            &mut socket,
            &ServerMessage::Started {
                exec_id,
                agent: lease.agent.clone(),
            },
        )
        .await
    {
        svc.hub.cancel_exec(&svc, &lease.agent, exec_id);
        return;
    }
    // An attach is answered once the agent says where the output resumes.
    let mut announced = attach.is_none();
    let mut first_byte = attach.is_none();
    loop {
        tokio::select! {
            ev = rx.recv() => {
                if first_byte {
                    first_byte = false;
                    svc.metrics.exec_ttfb.with_label_values(&[&lease.pool]).observe(started.elapsed().as_secs_f64());
                }
                match ev {
                    Some(ExecEvent::Attached { offset, dropped }) => {
                        let m = if !announced {
                            announced = true;
                            let dropped = offset.saturating_sub(attach.unwrap_or(0)).max(dropped);
                            ServerMessage::Attached { exec_id, agent: lease.agent.clone(), offset, dropped }
                        } else if dropped > 0 {
                            ServerMessage::Dropped { exec_id, bytes: dropped }
                        } else {
                            continue;
                        };
                        if !send_json(&mut socket, &m).await {
                            svc.hub.detach_exec(&lease.agent, exec_id);
                            return;
                        }
                    }
                    Some(ExecEvent::Output(frame)) => {
                        match tokio::time::timeout(CLIENT_SEND_TIMEOUT, socket.send(Message::Binary(frame))).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => {
                                tracing::info!(lease = %lease.id, exec_id, "exec client connection lost; command kept for a re-attach");
                                svc.hub.detach_exec(&lease.agent, exec_id);
                                return;
                            }
                            Err(_) => {
                                tracing::warn!(lease = %lease.id, exec_id, "exec client not reading; cancelling");
                                svc.hub.cancel_exec(&svc, &lease.agent, exec_id);
                                return;
                            }
                        }
                    }
                    Some(ExecEvent::Exit(status)) => {
                        let _ = send_json(&mut socket, &ServerMessage::Exit(status)).await;
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                    Some(ExecEvent::NotFound(why)) => return fail(&mut socket, "exec_not_found", why).await,
                    Some(ExecEvent::Lost(why)) => return fail(&mut socket, "agent_lost", why).await,
                    None => return fail(&mut socket, "agent_lost", format!("agent {} went away", lease.agent)).await,
                }
            }
            m = socket.recv() => match m {
                Some(Ok(Message::Binary(b))) => {
                    // Stdin for the command: passed on as it is, for this exec only.
                    if let Ok((crate::protocol::Stream::Stdin, id, _)) = crate::protocol::decode_output(&b)
                        && id == exec_id
                    {
                        svc.hub.send_stdin(&lease.agent, b).await;
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    if let Ok(ClientMessage::Resize(size)) = serde_json::from_str::<ClientMessage>(&t) {
                        svc.hub.send(&svc, &lease.agent, crate::protocol::HubMessage::Resize { exec_id, size });
                    }
                    if let Ok(ClientMessage::Cancel) = serde_json::from_str::<ClientMessage>(&t) {
                        // Keep the route: the agent answers with an exit (cancelled).
                        svc.hub.send(
                            &svc,
                            &lease.agent,
                            crate::protocol::HubMessage::Cancel { exec_id },
                        );
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    tracing::info!(lease = %lease.id, exec_id, "exec client closed the socket; cancelling");
                    svc.hub.cancel_exec(&svc, &lease.agent, exec_id);
                    // Completes the closing handshake: sends the Close reply queued on receipt.
                    let _ = futures_util::SinkExt::flush(&mut socket).await;
                    return;
                }
                None | Some(Err(_)) => {
                    // A broken connection is not a decision: the command keeps running for a
                    // client that re-attaches (the lease's TTL bounds it).
                    tracing::info!(lease = %lease.id, exec_id, "exec client connection lost; command kept for a re-attach");
                    svc.hub.detach_exec(&lease.agent, exec_id);
                    return;
                }
                Some(Ok(_)) => {}
            },
            _ = svc.hub.restarting().cancelled() => {
                svc.hub.detach_exec(&lease.agent, exec_id);
                let m = format!(
                    "warmpool is restarting; the command keeps running on agent {}: re-attach to exec {exec_id} of lease {}",
                    lease.agent, lease.id
                );
                return fail(&mut socket, "service_restarting", m).await;
            }
        }
    }
}
