//! The lease API client behind `warmpool run` and `warmpool status`.
//!
//! Speaks only the public HTTP API and the exec WebSocket, as any CI system would. `run_job`
//! leases an agent, streams the command's output to this process's stdout/stderr, renews the
//! lease while the command runs, cancels on Ctrl-C, releases the lease and returns the exit code.

use std::io::Write;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
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
}

impl Client {
    /// A client for `base` (`http://127.0.0.1:7420`), with an optional bearer token.
    pub fn new(base: &str, token: Option<String>) -> Client {
        // reqwest is built without a default TLS provider (stop-gap until the TLS work lands:
        // whichever installs it first wins; the call is idempotent).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
        }
    }

    fn transport(&self, message: impl std::fmt::Display) -> Error {
        Error::Transport {
            server: self.base.clone(),
            message: message.to_string(),
        }
    }

    /// A transport error with its whole cause chain ("... : connection refused").
    fn io(&self, e: impl std::error::Error) -> Error {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !message.contains(&text) {
                message = format!("{message}: {text}");
            }
            source = s.source();
        }
        self.transport(message)
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
        match tokio_tungstenite::connect_async_with_config(req, None, true).await {
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
fn retryable(e: &Error) -> bool {
    match e {
        Error::Transport { .. } => true,
        Error::Api { status, .. } => matches!(status, 404 | 502 | 503 | 504),
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

/// This process's terminal in raw mode until dropped (then restored as it was).
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        // SAFETY: tcgetattr/cfmakeraw/tcsetattr on fd 0 with a termios we own.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) < 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(0, libc::TCSANOW, &raw) < 0 {
                return None;
            }
            Some(RawMode { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// The size of this process's terminal (fd 0), or 24x80.
fn terminal_size() -> TtySize {
    // SAFETY: TIOCGWINSZ writes a winsize.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return TtySize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            };
        }
    }
    TtySize { rows: 24, cols: 80 }
}

/// Sizes of this terminal each time it changes (SIGWINCH).
fn follow_terminal_size() -> tokio::sync::mpsc::Receiver<TtySize> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut winch) = signal(SignalKind::window_change()) else {
            return;
        };
        while winch.recv().await.is_some() {
            if tx.send(terminal_size()).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads this process's stdin on a thread of its own (a blocked read never holds up exit)
/// into chunks for [`ExecOptions::stdin`]; the end of input is an empty chunk.
pub fn forward_stdin() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut input = std::io::stdin().lock();
        let mut buf = vec![0u8; crate::protocol::OUTPUT_CHUNK_BYTES];
        loop {
            let n = match input.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            if tx.blocking_send(buf[..n].to_vec()).is_err() || n == 0 {
                return;
            }
        }
    });
    rx
}

/// What [`Client::exec_with`] hands to its sink.
#[derive(Debug)]
pub enum ExecOutput<'a> {
    /// Bytes the command wrote.
    Data(Stream, &'a [u8]),
    /// This many bytes are lost here (the agent's buffer overflowed while nobody read it).
    Dropped(u64),
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
    /// How long to keep re-attaching when the exec socket breaks (service restart).
    pub reattach: Duration,
    /// Forward this process's stdin to the command (EOF included).
    pub stdin: bool,
    /// Run the command on a pseudo-terminal sized as this terminal, in raw mode meanwhile.
    pub tty: bool,
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
                match c.renew(&id).await {
                    Ok(_) => {}
                    // A restart or takeover in progress: the next renewal gets through.
                    Err(e) if retryable(&e) => {
                        tracing::debug!(lease = %id, error = %e, "renewal failed; retrying")
                    }
                    Err(e) => tracing::warn!(lease = %id, error = %e, "renewal failed"),
                }
            }
        })
    };
    // Set when this process is told to stop (a signal, or its stdout closed): the command is
    // cancelled, the lease released at once, and the exit code is what a shell reports for
    // the signal (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP, 141 closed pipe).
    let stdout_closed = tokio_util::sync::CancellationToken::new();
    let stopped_by = std::sync::Mutex::new(None::<i32>);
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let mut spec = opts.spec;
    let mut raw = None;
    let mut resize = None;
    if opts.tty {
        spec.tty = Some(terminal_size());
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            raw = RawMode::enter();
            resize = Some(follow_terminal_size());
        }
    }
    let exec_opts = ExecOptions {
        reattach: opts.reattach,
        stdin: opts.stdin.then(forward_stdin),
        resize,
    };
    let result = client
        .exec_with(
            &lease.id,
            spec,
            exec_opts,
            |o| match o {
                ExecOutput::Data(Stream::Stdout, data) => {
                    if !stdout_closed.is_cancelled()
                        && let Err(e) = stdout.write_all(data).and_then(|_| stdout.flush())
                        && e.kind() == std::io::ErrorKind::BrokenPipe
                    {
                        stdout_closed.cancel();
                    }
                }
                ExecOutput::Data(_, data) => {
                    let _ = stderr.write_all(data).and_then(|_| stderr.flush());
                }
                ExecOutput::Dropped(n) => {
                    let _ = writeln!(
                        stderr,
                        "warmpool: {n} bytes of output were lost (the agent's buffer overflowed while the service was unreachable)"
                    );
                }
            },
            async {
                let (code, what) = stop_signal(&stdout_closed).await;
                *stopped_by.lock().expect("lock") = Some(code);
                // A closed stdout is a normal end of a pipeline (`| head`): nothing to say.
                if code != 128 + libc::SIGPIPE {
                    eprintln!(
                        "warmpool: {what}; cancelling the command on {}",
                        lease.agent
                    );
                }
            },
        )
        .await;
    drop(raw);
    renewer.abort();
    if let Err(e) = client.release(&lease.id).await {
        // An already-ended lease (agent lost, expired) is not worth a second error.
        if !matches!(&e, Error::Api { code, .. } if code == "lease_ended") {
            tracing::warn!(lease = %lease.id, error = %e, "release failed");
        }
    }
    let status = result?;
    if let Some(code) = *stopped_by.lock().expect("lock") {
        return Ok(code);
    }
    if let Some(err) = &status.error {
        eprintln!("warmpool: {err} (agent {})", lease.agent);
    }
    if status.timed_out {
        eprintln!("warmpool: command timed out on {}", lease.agent);
    }
    Ok(status.shell_code())
}

/// Waits for a reason to stop: SIGINT, SIGTERM (how CI runners cancel), SIGHUP (the terminal
/// went away), or stdout closed. Returns the shell's exit code for it and a description.
async fn stop_signal(stdout_closed: &tokio_util::sync::CancellationToken) -> (i32, &'static str) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        std::future::pending::<()>().await;
        unreachable!("pending never resolves");
    };
    tokio::select! {
        _ = int.recv() => (128 + libc::SIGINT, "interrupted"),
        _ = term.recv() => (128 + libc::SIGTERM, "terminated"),
        _ = hup.recv() => (128 + libc::SIGHUP, "hung up"),
        _ = stdout_closed.cancelled() => (128 + libc::SIGPIPE, "stdout closed"),
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
