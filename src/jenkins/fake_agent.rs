//! A **simulated** Jenkins inbound agent: a stand-in for the `jenkins/inbound-agent` image (and
//! `agent.jar -webSocket`) so tests can start "Jenkins agents" without Java.
//!
//! It is not an agent: it does not speak the remoting protocol and never runs a build. It only
//! reproduces what a controller can observe of a real inbound agent's connection:
//!
//! 1. Configuration as the `jenkins-agent` script of `jenkinsci/docker-agent` takes it from the
//!    environment: `JENKINS_URL` (required; a trailing `/` is added), `JENKINS_AGENT_NAME`
//!    (fallback `JENKINS_NAME`), `JENKINS_SECRET`, `JENKINS_WEB_SOCKET` (must be `true`: the fake
//!    has no TCP transport), `JENKINS_AGENT_WORKDIR`. The agent.jar flags `-url X`, `-name X`,
//!    `-secret X` (or `-secret @FILE`), `-webSocket`, `-workDir X` override the environment, and
//!    two positional arguments are taken as `SECRET NAME`, as `hudson.remoting.jnlp.Main` does.
//!    Other agent.jar flags are accepted and ignored.
//! 2. The work directory and `<workDir>/remoting` are created (agent.jar's `-internalDir
//!    remoting`).
//! 3. It dials `ws://HOST/…/wsagents/` (`http` → `ws`, `https` → `wss`, verifying the
//!    certificate against the platform's roots plus `WARMPOOL_CA_FILE`, where a real agent
//!    uses its JVM's trust store) with the headers `Node-Name`, `Secret-Key` and
//!    `X-Remoting-Capability`, as remoting's `WebSocketConnector` does. It does not poll
//!    `login` first.
//! 4. On `101` it prints `INFO: Connected` to stderr and stays connected, dropping whatever the
//!    controller sends and answering pings. It exits 0 when the controller closes the socket or
//!    the connection drops (real agent.jar would try to reconnect unless `-noReconnect`).
//! 5. On SIGTERM or SIGINT it sends a close frame and exits 0.
//! 6. A refused handshake prints `Failed to connect: HTTP <status>` and exits 1; any other dial
//!    failure prints `Failed to connect to <url>: <error>` and exits 1. Bad configuration exits 2.
//!
//! Test knobs (not in the real image):
//! - `FAKE_JENKINS_AGENT_CONNECT_DELAY_MS=N`: wait N ms before dialling (a slow JVM start).
//! - `FAKE_JENKINS_AGENT_NEVER_CONNECT=1`: after checking the configuration, never dial; wait
//!   for SIGTERM/SIGINT (a pod whose agent never comes up).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// `hudson.remoting.Capability` of a current agent.jar, as sent in `X-Remoting-Capability`.
pub const REMOTING_CAPABILITY: &str =
    "rO0ABXNyABpodWRzb24ucmVtb3RpbmcuQ2FwYWJpbGl0eQAAAAAAAAABAgABSgAEbWFza3hwAAAAAAAAAf4=";

/// Env var: milliseconds to wait before dialling.
pub const CONNECT_DELAY_ENV: &str = "FAKE_JENKINS_AGENT_CONNECT_DELAY_MS";
/// Env var: `1` (or `true`) to never dial.
pub const NEVER_CONNECT_ENV: &str = "FAKE_JENKINS_AGENT_NEVER_CONNECT";
/// Env var: a PEM CA file trusted for a `wss://` controller besides the platform's roots.
pub const CA_FILE_ENV: &str = "WARMPOOL_CA_FILE";

/// Exit code for a bad configuration.
pub const EXIT_CONFIG: i32 = 2;
/// Exit code for a failed or refused connection.
pub const EXIT_CONNECT: i32 = 1;

/// The resolved configuration of one fake agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The controller's root URL, ending with `/`.
    pub url: String,
    /// The node name.
    pub name: String,
    /// The node's secret.
    pub secret: String,
    /// The work directory, if any.
    pub work_dir: Option<PathBuf>,
    /// Delay before dialling.
    pub connect_delay: Duration,
    /// Never dial.
    pub never_connect: bool,
    /// A CA file trusted besides the platform's roots ([`CA_FILE_ENV`]).
    pub ca_file: Option<PathBuf>,
}

/// agent.jar flags that take a value and that the fake ignores.
const IGNORED_WITH_VALUE: &[&str] = &[
    "-internalDir",
    "-tunnel",
    "-jar-cache",
    "-credentials",
    "-proxyCredentials",
    "-cert",
    "-protocols",
    "-direct",
    "-instanceIdentity",
    "-noReconnectAfter",
    "-jnlpUrl",
    "-jnlpCredentials",
    "-agentLog",
    "-loggingConfig",
];

/// Builds the configuration from `env` (a lookup, for testability) and `args` (the arguments
/// after the command name). Err is the message to print before exiting with [`EXIT_CONFIG`].
pub fn config(env: impl Fn(&str) -> Option<String>, args: &[String]) -> Result<Config, String> {
    let env = |k: &str| env(k).filter(|v| !v.is_empty());
    let mut url = env("JENKINS_URL");
    let mut name = env("JENKINS_AGENT_NAME").or_else(|| env("JENKINS_NAME"));
    let mut secret = env("JENKINS_SECRET");
    let mut web_socket = env("JENKINS_WEB_SOCKET").is_some_and(|v| v == "true");
    let mut work_dir = env("JENKINS_AGENT_WORKDIR").map(PathBuf::from);
    let mut positional = Vec::new();

    let mut it = args.iter();
    while let Some(a) = it.next() {
        // args4j options take one dash; accept two as well.
        let flag = if a.starts_with("--") { &a[1..] } else { a };
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("option {a} needs a value"))
        };
        match flag {
            "-url" => url = Some(value()?),
            "-name" => name = Some(value()?),
            "-secret" => {
                let v = value()?;
                secret = Some(match v.strip_prefix('@') {
                    Some(path) => std::fs::read_to_string(path)
                        .map_err(|e| format!("cannot read secret file {path}: {e}"))?
                        .trim()
                        .to_string(),
                    None => v,
                });
            }
            "-workDir" => work_dir = Some(PathBuf::from(value()?)),
            "-webSocket" => web_socket = true,
            f if IGNORED_WITH_VALUE.contains(&f) => {
                value()?;
            }
            f if f.starts_with('-') && f.len() > 1 => {
                eprintln!("WARNING: fake agent ignores option {a}");
            }
            _ => positional.push(a.clone()),
        }
    }
    // hudson.remoting.jnlp.Main: `SECRET NAME` (the secret first).
    match positional.as_slice() {
        [] => {}
        [s, n] => {
            secret = Some(s.clone());
            name = Some(n.clone());
        }
        other => {
            return Err(format!(
                "expected the two arguments SECRET NAME, got {}",
                other.len()
            ));
        }
    }

    let Some(mut url) = url else {
        return Err("JENKINS_URL (or -url) is required".into());
    };
    if !url.ends_with('/') {
        url.push('/');
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("the Jenkins URL must be http(s)://…, got {url}"));
    }
    let Some(name) = name else {
        return Err("JENKINS_AGENT_NAME (or JENKINS_NAME, or -name) is required".into());
    };
    let Some(secret) = secret else {
        return Err("JENKINS_SECRET (or -secret) is required".into());
    };
    if !web_socket {
        return Err(
            "only WebSocket agents are simulated: set JENKINS_WEB_SOCKET=true or pass -webSocket"
                .into(),
        );
    }
    let connect_delay = match env(CONNECT_DELAY_ENV) {
        None => Duration::ZERO,
        Some(v) => Duration::from_millis(
            v.trim()
                .parse()
                .map_err(|_| format!("{CONNECT_DELAY_ENV} must be a number of ms, got {v:?}"))?,
        ),
    };
    let never_connect = env(NEVER_CONNECT_ENV).is_some_and(|v| v == "1" || v == "true");
    let ca_file = env(CA_FILE_ENV).map(PathBuf::from);
    Ok(Config {
        url,
        name,
        secret,
        work_dir,
        connect_delay,
        never_connect,
        ca_file,
    })
}

/// `ws(s)://…/wsagents/` for a root URL ending with `/` (remoting: `^http` → `ws`).
pub fn ws_url(root: &str) -> String {
    format!("ws{}wsagents/", root.strip_prefix("http").unwrap_or(root))
}

/// Runs the fake agent with the process environment and `args` (the arguments after the
/// command name) until the controller closes the socket, the connection drops, or SIGTERM /
/// SIGINT arrives. Returns the process exit code (0, [`EXIT_CONNECT`] or [`EXIT_CONFIG`]).
pub async fn run(args: Vec<String>) -> i32 {
    run_until(args, shutdown_signal()).await
}

/// As [`run`], but stops (sending a close frame, exit 0) when `shutdown` completes instead of
/// on a signal: for running several fake agents inside one test process.
pub async fn run_until(args: Vec<String>, shutdown: impl Future<Output = ()>) -> i32 {
    let cfg = match config(|k| std::env::var(k).ok(), &args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SEVERE: {e}");
            return EXIT_CONFIG;
        }
    };
    run_config(&cfg, shutdown).await
}

/// As [`run_until`], with a configuration built by [`config`].
pub async fn run_config(cfg: &Config, shutdown: impl Future<Output = ()>) -> i32 {
    tokio::pin!(shutdown);
    if let Some(dir) = &cfg.work_dir
        && let Err(e) = std::fs::create_dir_all(dir.join("remoting"))
    {
        eprintln!(
            "SEVERE: cannot create the work directory {}: {e}",
            dir.display()
        );
        return EXIT_CONFIG;
    }
    if cfg.never_connect {
        eprintln!("INFO: {NEVER_CONNECT_ENV} is set: not connecting");
        shutdown.await;
        return 0;
    }
    if !cfg.connect_delay.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(cfg.connect_delay) => {}
            _ = &mut shutdown => return 0,
        }
    }
    let ws_url = ws_url(&cfg.url);
    eprintln!("INFO: Agent {} connecting to {ws_url}", cfg.name);
    let mut req = match ws_url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("SEVERE: bad URL {ws_url}: {e}");
            return EXIT_CONFIG;
        }
    };
    for (k, v) in [
        ("Node-Name", cfg.name.as_str()),
        ("Secret-Key", cfg.secret.as_str()),
        ("X-Remoting-Capability", REMOTING_CAPABILITY),
    ] {
        match v.parse() {
            Ok(v) => {
                req.headers_mut().insert(k, v);
            }
            Err(_) => {
                eprintln!("SEVERE: the value of {k} is not a valid header value");
                return EXIT_CONFIG;
            }
        }
    }
    let tls = match crate::tls::client_config(cfg.ca_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("SEVERE: {e}");
            return EXIT_CONFIG;
        }
    };
    let dial = crate::tls::connect_ws(req, None, &tls);
    let mut ws = tokio::select! {
        r = dial => match r {
            Ok((ws, _)) => ws,
            Err(WsError::Http(resp)) => {
                eprintln!("Failed to connect: HTTP {}", resp.status().as_u16());
                return EXIT_CONNECT;
            }
            Err(e) => {
                eprintln!("Failed to connect to {ws_url}: {}", crate::tls::describe(&e));
                return EXIT_CONNECT;
            }
        },
        _ = &mut shutdown => return 0,
    };
    eprintln!("INFO: Connected");
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                // Close politely; wait a little for the controller's close frame.
                let _ = ws.send(Message::Close(None)).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                eprintln!("INFO: Terminated");
                return 0;
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(_))) | None => {
                    eprintln!("INFO: Connection closed by the controller");
                    return 0;
                }
                Some(Err(e)) => {
                    eprintln!("INFO: Connection lost: {e}");
                    return 0;
                }
                // tungstenite queues the pong; flushing sends it now.
                Some(Ok(Message::Ping(_))) => {
                    let _ = ws.flush().await;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
