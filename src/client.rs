//! The lease API client behind `warmpool run` and `warmpool status`.
//!
//! Speaks only the public HTTP API and the exec WebSocket, as any CI system would. `run_job`
//! leases an agent, streams the command's output to this process's stdout/stderr, renews the
//! lease while the command runs, cancels on Ctrl-C, releases the lease and returns the exit code.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::api::{CreateLease, ErrorBody, LeaseView};
use crate::engine::PoolStatus;
use crate::protocol::{ClientMessage, ExecSpec, ExitStatus, ServerMessage, Stream, decode_output};

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
    /// The server could not be reached or answered nonsense.
    #[error("{server}: {message}")]
    Transport {
        /// Server URL.
        server: String,
        /// What happened.
        message: String,
    },
}

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
    /// A client for `base` (`http://127.0.0.1:7420` or `https://...`), with an optional
    /// bearer token, trusting the platform's root certificates.
    pub fn new(base: &str, token: Option<String>) -> Client {
        Client::with_tls(base, token, crate::tls::default_client_config())
    }

    /// As [`Client::new`], with a TLS configuration (see [`crate::tls::client_config`]) for
    /// `https://` and the `wss://` exec socket.
    pub fn with_tls(base: &str, token: Option<String>, tls: Arc<rustls::ClientConfig>) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .use_preconfigured_tls(crate::tls::for_reqwest(&tls))
                .pool_idle_timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
            tls,
        }
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
    fn io(&self, e: impl std::error::Error + 'static) -> Error {
        self.transport(crate::tls::describe(&e))
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
    /// arrives; `cancel` resolving sends a cancel (the agent still answers with an exit).
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
        let (mut ws, _) = match crate::tls::connect_ws(req, None, &self.tls).await {
            Ok(x) => x,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp.body().clone().unwrap_or_default();
                return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                    Ok(b) => Error::Api {
                        server: self.base.clone(),
                        status,
                        code: b.error.code,
                        message: b.error.message,
                    },
                    Err(_) => self.transport(format!("exec socket refused with HTTP {status}")),
                });
            }
            Err(e) => return Err(self.io(e)),
        };
        let text = serde_json::to_string(&ClientMessage::Exec(spec)).expect("serialisable");
        ws.send(Message::Text(text.into()))
            .await
            .map_err(|e| self.io(e))?;
        tokio::pin!(cancel);
        let mut cancelled = false;
        loop {
            let m = tokio::select! {
                _ = &mut cancel, if !cancelled => {
                    cancelled = true;
                    let text = serde_json::to_string(&ClientMessage::Cancel).expect("serialisable");
                    let _ = ws.send(Message::Text(text.into())).await;
                    continue;
                }
                m = ws.next() => m,
            };
            match m {
                None => return Err(self.transport("exec socket closed before the exit")),
                Some(Err(e)) => return Err(self.transport(e)),
                Some(Ok(Message::Binary(b))) => {
                    let (stream, _, data) = decode_output(&b).map_err(|e| self.transport(e))?;
                    sink(stream, data);
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMessage>(&t) {
                    Ok(ServerMessage::Started { .. }) => {}
                    Ok(ServerMessage::Exit(st)) => return Ok(st),
                    Ok(ServerMessage::Error { code, message }) => {
                        return Err(Error::Api {
                            server: self.base.clone(),
                            status: StatusCode::OK.as_u16(),
                            code,
                            message,
                        });
                    }
                    Err(e) => return Err(self.transport(format!("bad exec message: {e}"))),
                },
                Some(Ok(Message::Close(_))) => {
                    return Err(self.transport("exec socket closed before the exit"));
                }
                Some(Ok(_)) => {}
            }
        }
    }
}

/// What `warmpool run` does.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Selector.
    pub selector: String,
    /// Wait for an agent up to this long.
    pub wait: Duration,
    /// Lease TTL (renewed every third of it while the command runs).
    pub ttl: Duration,
    /// Holder text.
    pub holder: String,
    /// The command.
    pub spec: ExecSpec,
}

/// Leases, runs, streams, releases; returns the job's exit code (128+signal when killed).
pub async fn run_job(client: &Client, opts: RunOptions) -> Result<i32> {
    let lease = client
        .lease(&CreateLease {
            selector: opts.selector.clone(),
            wait_seconds: Some(opts.wait.as_secs_f64()),
            ttl_seconds: Some(opts.ttl.as_secs_f64()),
            holder: Some(opts.holder.clone()),
            idempotency_key: None,
        })
        .await?;
    tracing::debug!(lease = %lease.id, agent = %lease.agent, "leased");
    let renewer = {
        let (c, id, every) = (client.clone(), lease.id.clone(), opts.ttl / 3);
        tokio::spawn(async move {
            let mut iv = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                iv.tick().await;
                if let Err(e) = c.renew(&id).await {
                    tracing::warn!(lease = %id, error = %e, "renewal failed");
                }
            }
        })
    };
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let result = client
        .exec(
            &lease.id,
            opts.spec,
            |stream, data| {
                let _ = match stream {
                    Stream::Stdout => stdout.write_all(data).and_then(|_| stdout.flush()),
                    Stream::Stderr => stderr.write_all(data).and_then(|_| stderr.flush()),
                };
            },
            async {
                let _ = tokio::signal::ctrl_c().await;
                eprintln!(
                    "warmpool: interrupted; cancelling the command on {}",
                    lease.agent
                );
            },
        )
        .await;
    renewer.abort();
    if let Err(e) = client.release(&lease.id).await {
        // An already-ended lease (agent lost, expired) is not worth a second error.
        if !matches!(&e, Error::Api { code, .. } if code == "lease_ended") {
            tracing::warn!(lease = %lease.id, error = %e, "release failed");
        }
    }
    let status = result?;
    if let Some(err) = &status.error {
        eprintln!("warmpool: {err}");
    }
    if status.timed_out {
        eprintln!("warmpool: command timed out on {}", lease.agent);
    }
    Ok(status.shell_code())
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
        "TOTAL".into(),
        "MIN".into(),
        "MAX".into(),
    ]];
    for p in pools {
        rows.push([
            p.name.clone(),
            p.labels.join(","),
            p.idle.to_string(),
            (p.leased + p.cleaning).to_string(),
            p.connecting.to_string(),
            p.provisioning.to_string(),
            p.total.to_string(),
            p.min_idle.to_string(),
            p.max_total.to_string(),
        ]);
    }
    table(&rows)
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
