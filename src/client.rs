//! The lease API client behind `warmpool run` and `warmpool status`.
//!
//! Speaks only the public HTTP API and the exec WebSocket, as any CI system would, and
//! re-attaches a broken exec socket. What `warmpool run` does with this process's terminal,
//! stdin and signals is in [`crate::run`] (`run_job`, re-exported here).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::api::{CreateLease, ErrorBody, LeaseView};
use crate::engine::PoolStatus;
use crate::protocol::{
    ClientMessage, ExecSpec, ExitStatus, ServerMessage, Stream, TtySize, decode_output,
    encode_output,
};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an API error.
    #[error("{server}: {message} ({code}, HTTP {status})")]
    Api {
        /// Server URL.
        server: String,
        /// HTTP status.
        status: u16,
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
    /// The server refused or ended a command on its exec WebSocket (after the upgrade, so
    /// there is no HTTP status to report).
    #[error("{server}: {message} ({code})")]
    Exec {
        /// Server URL.
        server: String,
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
    /// No connection could be made to the server: nothing listens there, the name does not
    /// resolve, or the connection timed out (a TLS failure is a [`Error::Transport`]).
    #[error(
        "cannot reach a warmpool server at {server} ({cause}): is `warmpool serve` running \
         there? Point elsewhere with --server or WARMPOOL_SERVER"
    )]
    Unreachable {
        /// Server URL.
        server: String,
        /// The innermost cause ("Connection refused (os error 111)").
        cause: String,
    },
    /// The server answered nonsense, or the connection broke after it was made.
    #[error("{server}: {message}")]
    Transport {
        /// Server URL.
        server: String,
        /// What happened.
        message: String,
    },
}

pub use crate::run::{RunOptions, run_job};

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A lease API client.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    tls: Arc<rustls::ClientConfig>,
}

impl Client {
    /// A client for `base` (`http://127.0.0.1:7420` or `https://...`; without a scheme,
    /// `127.0.0.1:7420`, it is `http://`), with an optional bearer token, trusting the
    /// platform's root certificates.
    pub fn new(base: &str, token: Option<String>) -> Client {
        Client::with_tls(base, token, crate::tls::default_client_config())
    }

    /// As [`Client::new`], with a TLS configuration (see [`crate::tls::client_config`]) for
    /// `https://` and the `wss://` exec socket.
    pub fn with_tls(base: &str, token: Option<String>, tls: Arc<rustls::ClientConfig>) -> Client {
        let base = base.trim_end_matches('/');
        let base = if base.contains("://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        Client {
            base,
            token,
            http: reqwest::Client::builder()
                .use_preconfigured_tls(crate::tls::for_reqwest(&tls))
                .pool_idle_timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
            tls,
        }
    }

    /// The server URL (with its scheme: `http://127.0.0.1:7420`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The TLS configuration of this client (for other connections to the same server).
    pub fn tls(&self) -> &Arc<rustls::ClientConfig> {
        &self.tls
    }

    fn transport(&self, message: impl std::fmt::Display) -> Error {
        Error::Transport {
            server: self.base.clone(),
            message: message.to_string(),
        }
    }

    /// A transport error with its whole cause chain ("... : connection refused"), or the TLS
    /// failure under it ("TLS certificate verification failed: ...").
    /// A failure to connect at all is [`Error::Unreachable`], with only its innermost cause.
    fn io(&self, e: impl std::error::Error + 'static) -> Error {
        let connect = (&e as &dyn std::error::Error)
            .downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.is_connect());
        if connect && crate::tls::failure(&e).is_none() {
            return self.unreachable(&e);
        }
        self.transport(crate::tls::describe(&e))
    }

    fn unreachable(&self, e: &(dyn std::error::Error + 'static)) -> Error {
        let mut cause = e;
        while let Some(s) = cause.source() {
            cause = s;
        }
        Error::Unreachable {
            server: self.base.clone(),
            cause: cause.to_string(),
        }
    }

    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(m, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn decode<T: serde::de::DeserializeOwned>(&self, resp: reqwest::Response) -> Result<T> {
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.io(e))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| self.transport(format!("unexpected response: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => Err(Error::Api {
                server: self.base.clone(),
                status: status.as_u16(),
                code: b.error.code,
                message: b.error.message,
            }),
            Err(_) => Err(Error::Api {
                server: self.base.clone(),
                status: status.as_u16(),
                code: "http_error".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            }),
        }
    }

    /// `POST /v1/leases`.
    pub async fn lease(&self, body: &CreateLease) -> Result<LeaseView> {
        let resp = self
            .req(reqwest::Method::POST, "/v1/leases")
            .json(body)
            .send()
            .await
            .map_err(|e| self.io(e))?;
        self.decode(resp).await
    }

    /// `POST /v1/leases/{id}/renew`.
    pub async fn renew(&self, id: &str) -> Result<LeaseView> {
        let resp = self
            .req(reqwest::Method::POST, &format!("/v1/leases/{id}/renew"))
            .send()
            .await
            .map_err(|e| self.io(e))?;
        self.decode(resp).await
    }

    /// `DELETE /v1/leases/{id}`.
    pub async fn release(&self, id: &str) -> Result<LeaseView> {
        let resp = self
            .req(reqwest::Method::DELETE, &format!("/v1/leases/{id}"))
            .send()
            .await
            .map_err(|e| self.io(e))?;
        self.decode(resp).await
    }

    /// `DELETE /v1/leases/{id}`, reading the answer without decoding a success (`warmpool
    /// bench`: the same work against warmpool's 200 with the lease and the floor's 204).
    pub async fn release_unparsed(&self, id: &str) -> Result<()> {
        let resp = self
            .req(reqwest::Method::DELETE, &format!("/v1/leases/{id}"))
            .send()
            .await
            .map_err(|e| self.io(e))?;
        if resp.status().is_success() {
            resp.bytes().await.map_err(|e| self.io(e))?;
            return Ok(());
        }
        self.decode::<serde::de::IgnoredAny>(resp).await.map(|_| ())
    }

    /// `GET /v1/leases/{id}`.
    pub async fn get_lease(&self, id: &str) -> Result<LeaseView> {
        let resp = self
            .req(reqwest::Method::GET, &format!("/v1/leases/{id}"))
            .send()
            .await
            .map_err(|e| self.io(e))?;
        self.decode(resp).await
    }

    /// `POST /v1/pools/{name}/join-token`: the join token of an external pool.
    pub async fn join_token(&self, pool: &str) -> Result<String> {
        #[derive(serde::Deserialize)]
        struct JoinToken {
            token: String,
        }
        let resp = self
            .req(
                reqwest::Method::POST,
                &format!("/v1/pools/{pool}/join-token"),
            )
            .send()
            .await
            .map_err(|e| self.io(e))?;
        Ok(self.decode::<JoinToken>(resp).await?.token)
    }

    /// `GET /v1/pools`.
    pub async fn pools(&self) -> Result<Vec<PoolStatus>> {
        let resp = self
            .req(reqwest::Method::GET, "/v1/pools")
            .send()
            .await
            .map_err(|e| self.io(e))?;
        self.decode(resp).await
    }

    /// Runs a command on a leased agent over the exec socket. Output is handed to `sink` as it
    /// arrives; `cancel` resolving sends a cancel (the agent still answers with an exit). A
    /// broken socket is re-attached within [`DEFAULT_REATTACH`] (see [`Client::exec_with`]);
    /// lost output is only logged.
    pub async fn exec<F, C>(
        &self,
        lease: &str,
        spec: ExecSpec,
        mut sink: F,
        cancel: C,
    ) -> Result<ExitStatus>
    where
        F: FnMut(Stream, &[u8]),
        C: std::future::Future<Output = ()>,
    {
        let opts = ExecOptions {
            reattach: DEFAULT_REATTACH,
            stdin: None,
            resize: None,
        };
        self.exec_with(
            lease,
            spec,
            opts,
            |o| match o {
                ExecOutput::Data(stream, data) => sink(stream, data),
                ExecOutput::Dropped(n) => {
                    tracing::warn!(lease, bytes = n, "output lost while the agent was away")
                }
            },
            cancel,
        )
        .await
    }

    /// Opens the exec socket of a lease.
    async fn exec_socket(&self, lease: &str) -> Result<ExecSocket> {
        let url = format!(
            "{}/v1/leases/{lease}/exec",
            self.base.replacen("http", "ws", 1)
        );
        let mut req = url.into_client_request().map_err(|e| self.transport(e))?;
        if let Some(t) = &self.token {
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {t}")
                    .parse()
                    .map_err(|e| self.transport(e))?,
            );
        }
        match crate::tls::connect_ws(req, None, &self.tls).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp.body().clone().unwrap_or_default();
                Err(match serde_json::from_slice::<ErrorBody>(&body) {
                    Ok(b) => Error::Api {
                        server: self.base.clone(),
                        status,
                        code: b.error.code,
                        message: b.error.message,
                    },
                    Err(_) => self.transport(format!("exec socket refused with HTTP {status}")),
                })
            }
            Err(tokio_tungstenite::tungstenite::Error::Io(e))
                if crate::tls::failure(&e).is_none() =>
            {
                Err(self.unreachable(&e))
            }
            Err(e) => Err(self.io(e)),
        }
    }

    /// Like [`Client::exec`], with options and every output event. When the socket breaks
    /// after the command started (the service restarts, a proxy drops the connection, a
    /// standby takes over), it re-attaches with the exec id and the count of bytes received,
    /// retrying with backoff for up to `opts.reattach`, so `sink` sees one uninterrupted
    /// stream (or an [`ExecOutput::Dropped`] where the agent's buffer overflowed).
    pub async fn exec_with<F, C>(
        &self,
        lease: &str,
        mut spec: ExecSpec,
        mut opts: ExecOptions,
        mut sink: F,
        cancel: C,
    ) -> Result<ExitStatus>
    where
        F: FnMut(ExecOutput<'_>),
        C: std::future::Future<Output = ()>,
    {
        tokio::pin!(cancel);
        spec.stdin = opts.stdin.is_some();
        let mut stdin = opts.stdin.take();
        let mut resize = opts.resize.take();
        let mut cancel_wanted = false;
        let mut exec_id: Option<u64> = None;
        let mut offset: u64 = 0;
        let mut lost: Option<(tokio::time::Instant, String)> = None;
        let mut pause = Duration::from_millis(100);
        loop {
            if let Some((since, why)) = &lost {
                if since.elapsed() >= opts.reattach {
                    return Err(self.transport(format!(
                        "lost the exec socket of lease {lease} and could not re-attach within {:?}: {why}",
                        opts.reattach
                    )));
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = &mut cancel, if !cancel_wanted => cancel_wanted = true,
                }
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            let mut ws = match self.exec_socket(lease).await {
                Ok(ws) => ws,
                Err(e) if exec_id.is_some() && retryable(&e) => {
                    tracing::debug!(lease, error = %e, "re-attach failed; retrying");
                    let why = e.to_string();
                    lost.get_or_insert((tokio::time::Instant::now(), why)).1 = e.to_string();
                    continue;
                }
                Err(e) => return Err(e),
            };
            let first = match exec_id {
                None => ClientMessage::Exec(spec.clone()),
                Some(exec_id) => ClientMessage::Attach { exec_id, offset },
            };
            let mut sent = ws.send(json_msg(&first)).await.map(|_| ());
            if sent.is_ok() && cancel_wanted && exec_id.is_some() {
                sent = ws.send(json_msg(&ClientMessage::Cancel)).await;
            }
            if let Err(e) = sent {
                if exec_id.is_none() {
                    return Err(self.io(e));
                }
                lost.get_or_insert((tokio::time::Instant::now(), e.to_string()));
                continue;
            }
            // Why this socket ended without an exit, when it may be re-attached.
            let why: String = loop {
                let m = tokio::select! {
                    _ = &mut cancel, if !cancel_wanted => {
                        cancel_wanted = true;
                        let _ = ws.send(json_msg(&ClientMessage::Cancel)).await;
                        continue;
                    }
                    size = async { resize.as_mut().expect("guarded").recv().await },
                        if resize.is_some() && exec_id.is_some() =>
                    {
                        match size {
                            Some(size) => {
                                let _ = ws.send(json_msg(&ClientMessage::Resize(size))).await;
                            }
                            None => resize = None,
                        }
                        continue;
                    }
                    // Stdin once the exec id is known; the end is an empty frame. (Bytes in
                    // flight when a socket breaks are not sent again.)
                    chunk = async { stdin.as_mut().expect("guarded").recv().await },
                        if stdin.is_some() && exec_id.is_some() =>
                    {
                        let data = chunk.unwrap_or_default();
                        if data.is_empty() {
                            stdin = None;
                        }
                        let id = exec_id.expect("guarded");
                        let frame = encode_output(Stream::Stdin, id, &data);
                        let _ = ws.send(Message::Binary(frame.into())).await;
                        continue;
                    }
                    m = ws.next() => m,
                };
                match m {
                    None => break "exec socket closed before the exit".into(),
                    Some(Err(e)) => break e.to_string(),
                    Some(Ok(Message::Binary(b))) => {
                        let (stream, _, data) = decode_output(&b).map_err(|e| self.transport(e))?;
                        if stream == Stream::Stdin {
                            continue;
                        }
                        offset += data.len() as u64;
                        sink(ExecOutput::Data(stream, data));
                    }
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMessage>(&t) {
                        Ok(ServerMessage::Started { exec_id: id, .. }) => exec_id = Some(id),
                        Ok(ServerMessage::Attached {
                            offset: at,
                            dropped,
                            ..
                        }) => {
                            lost = None;
                            pause = Duration::from_millis(100);
                            let gap = at.saturating_sub(offset).max(dropped);
                            if gap > 0 {
                                sink(ExecOutput::Dropped(gap));
                            }
                            offset = at;
                        }
                        Ok(ServerMessage::Dropped { bytes, .. }) => {
                            sink(ExecOutput::Dropped(bytes));
                            offset += bytes;
                        }
                        Ok(ServerMessage::Exit(st)) => return Ok(st),
                        Ok(ServerMessage::Error { code, message })
                            if code == "service_restarting" && exec_id.is_some() =>
                        {
                            break message;
                        }
                        Ok(ServerMessage::Error { code, message }) => {
                            return Err(Error::Exec {
                                server: self.base.clone(),
                                code,
                                message,
                            });
                        }
                        Err(e) => return Err(self.transport(format!("bad exec message: {e}"))),
                    },
                    Some(Ok(Message::Close(_))) => {
                        break "exec socket closed before the exit".into();
                    }
                    Some(Ok(_)) => {}
                }
            };
            if exec_id.is_none() {
                return Err(self.transport(why));
            }
            tracing::debug!(lease, why = %why, offset, "exec socket lost; re-attaching");
            lost.get_or_insert((tokio::time::Instant::now(), why));
        }
    }
}

type ExecSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn json_msg(m: &ClientMessage) -> Message {
    Message::Text(serde_json::to_string(m).expect("serialisable").into())
}

/// True for errors a restarting service or a takeover answers for a while: no connection,
/// 503 (a standby, or an instance still adopting), 404 (a new instance that has not yet
/// restored the lease from its agent), 502/504 (a proxy with no backend).
pub(crate) fn retryable(e: &Error) -> bool {
    match e {
        Error::Transport { .. } | Error::Unreachable { .. } => true,
        Error::Api { status, .. } => matches!(status, 404 | 502 | 503 | 504),
        Error::Exec { .. } => false,
    }
}

/// How long [`Client::exec`] tries to re-attach a broken exec socket.
pub const DEFAULT_REATTACH: Duration = Duration::from_secs(120);

/// Options of [`Client::exec_with`].
#[derive(Debug)]
pub struct ExecOptions {
    /// How long to keep trying to re-attach after the socket broke.
    pub reattach: Duration,
    /// Input for the command, chunk by chunk; an empty chunk or the sender's end closes it.
    /// Without it the command's stdin is empty.
    pub stdin: Option<tokio::sync::mpsc::Receiver<Vec<u8>>>,
    /// New terminal sizes to pass on (with `tty` in the spec).
    pub resize: Option<tokio::sync::mpsc::Receiver<TtySize>>,
}

/// What [`Client::exec_with`] hands to its sink.
#[derive(Debug)]
pub enum ExecOutput<'a> {
    /// Bytes the command wrote.
    Data(Stream, &'a [u8]),
    /// This many bytes are lost here (the agent's buffer overflowed while nobody read it).
    Dropped(u64),
}

/// A refill time for the `status` table: process agents register in milliseconds, pods in
/// seconds, so both stay readable (`16ms`, `2.4s`, `25s`).
fn refill_text(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:.0}ms", seconds * 1000.0)
    } else if seconds < 10.0 {
        format!("{seconds:.1}s")
    } else {
        format!("{seconds:.0}s")
    }
}

/// Renders pools as the `status` table.
pub fn pools_table(pools: &[PoolStatus]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "LABELS".into(),
        "IDLE".into(),
        "LEASED".into(),
        "CONNECTING".into(),
        "PROVISIONING".into(),
        "WAITING".into(),
        "TOTAL".into(),
        "MIN".into(),
        "MAX".into(),
        "DESIRED".into(),
        "SOURCE".into(),
        "RATE/MIN".into(),
        "REFILL".into(),
        "WARM-HIT".into(),
        "LEAKS".into(),
        "ERROR".into(),
    ]];
    for p in pools {
        rows.push([
            p.name.clone(),
            p.labels.join(","),
            p.idle.to_string(),
            (p.leased + p.cleaning).to_string(),
            p.connecting.to_string(),
            p.provisioning.to_string(),
            p.waiting.to_string(),
            p.total.to_string(),
            p.min_idle.to_string(),
            p.max_total.to_string(),
            p.desired_idle.to_string(),
            p.desired_idle_source.as_str().to_string(),
            format!("{:.1}", p.arrival_rate),
            refill_text(p.refill_seconds),
            p.warm_hit_ratio
                .map_or("-".to_string(), |r| format!("{:.0}%", r * 100.0)),
            p.leaks_total.to_string(),
            p.last_error.as_deref().map_or("-".to_string(), short_error),
        ]);
    }
    table(&rows)
}

/// The longest `lastError` the status table shows (the JSON output has all of it).
const ERROR_CHARS: usize = 80;

/// `lastError` on one line of at most [`ERROR_CHARS`] characters, cut with `...`, without
/// its leading `agent <id>: ` (the agent is gone; what failed is the point).
fn short_error(e: &str) -> String {
    let e = match e.strip_prefix("agent ").and_then(|r| r.split_once(": ")) {
        Some((id, rest)) if !id.contains(' ') => rest,
        _ => e,
    };
    let line = e.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= ERROR_CHARS {
        return line;
    }
    let cut: String = line.chars().take(ERROR_CHARS - 3).collect();
    format!("{}...", cut.trim_end())
}

/// Renders rows as text columns padded to their widest cell, two spaces apart.
pub fn table<R: AsRef<[String]>>(rows: &[R]) -> String {
    let cols = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .map(|r| r.as_ref().get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
