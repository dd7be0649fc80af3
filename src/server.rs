//! Wiring: builds the service, the backend and the HTTP router, serves an already-bound
//! listener, and runs the shutdown sequence (stop leasing, let leases finish up to the grace
//! period, terminate and reap every agent, close connections, remove the work dir).
//!
//! Tests and benches call [`start`] with a listener on `127.0.0.1:0`; `main` calls [`serve`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiState, router};
use crate::auth::AgentKey;
use crate::backend::Backend;
use crate::backend::kubernetes::{KubeBackend, KubeConfig};
use crate::backend::process::{ProcessBackend, ProcessConfig};
use crate::metrics::Metrics;
use crate::pacer::GovernorPacer;
use crate::service::{Service, ServiceConfig};
use crate::spec::{PoolDef, PoolSpec};

/// Start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Refusing to expose the API without a token.
    #[error(
        "refusing to listen on {0} without an API token: set --api-token-file, or listen on 127.0.0.1"
    )]
    NoTokenOnPublicAddress(SocketAddr),
    /// The work dir could not be created.
    #[error("cannot create work dir {path}: {source}")]
    WorkDir {
        /// The directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The listener has no address.
    #[error("listener has no local address: {0}")]
    Listener(std::io::Error),
    /// The TLS certificate, key or CA file does not load.
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where agents come from.
#[derive(Clone)]
pub enum BackendChoice {
    /// Local child processes; pools from [`ServeConfig::pools`].
    Process,
    /// Pods; pools from the `AgentPool`s in `namespace`.
    Kubernetes {
        /// The client (in-cluster config or a kubeconfig).
        client: kube::Client,
        /// Namespace of the `AgentPool`s and their pods; None serves all namespaces.
        namespace: Option<String>,
        /// Leader election; None runs as the only instance.
        leader: Option<Box<crate::k8s::leader::LeaderConfig>>,
    },
}

impl std::fmt::Debug for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendChoice::Process => f.write_str("Process"),
            BackendChoice::Kubernetes {
                namespace, leader, ..
            } => {
                write!(
                    f,
                    "Kubernetes {{ namespace: {namespace:?}, leader: {leader:?} }}"
                )
            }
        }
    }
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where agents come from.
    pub backend: BackendChoice,
    /// Pools to serve (process backend; the Kubernetes backend reads `AgentPool`s).
    pub pools: Vec<PoolDef>,
    /// API bearer token.
    pub api_token: Option<String>,
    /// Key agent tokens derive from.
    pub agent_key: AgentKey,
    /// Agents' work dir (default: a fresh temporary directory, removed at exit).
    pub work_dir: Option<PathBuf>,
    /// URL agents dial (default: derived from the listener's address).
    pub hub_url: Option<String>,
    /// The executable run as `<exe> agent`.
    pub agent_exe: PathBuf,
    /// Shell settings.
    pub service: ServiceConfig,
    /// Running leases may continue this long after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Agents get this long between SIGTERM and SIGKILL.
    pub agent_grace: Duration,
    /// At shutdown, delete every Jenkins node and stop its agent, instead of leaving them
    /// online for the next instance to adopt.
    pub jenkins_delete_on_shutdown: bool,
    /// Serve over TLS with these files (re-read when they change); agents then dial `wss://`.
    pub tls: Option<crate::tls::CertFiles>,
    /// A CA file trusted besides the platform's roots by Jenkins clients (unless a pool sets
    /// `caFile`) and by local agents (process backend).
    pub ca_file: Option<PathBuf>,
    /// Header deadline and connection cap of the HTTP server.
    pub http: crate::http_server::HttpLimits,
}

impl ServeConfig {
    /// Defaults with the built-in `default` pool.
    pub fn new(agent_exe: PathBuf) -> ServeConfig {
        ServeConfig {
            backend: BackendChoice::Process,
            pools: vec![PoolDef {
                name: "default".into(),
                spec: PoolSpec::builtin_default(),
            }],
            api_token: None,
            agent_key: AgentKey::random(),
            work_dir: None,
            hub_url: None,
            agent_exe,
            service: ServiceConfig::default(),
            shutdown_grace: Duration::from_secs(30),
            agent_grace: Duration::from_secs(3),
            jenkins_delete_on_shutdown: false,
            tls: None,
            ca_file: None,
            http: crate::http_server::HttpLimits::default(),
        }
    }
}

/// A running server.
pub struct Running {
    /// Bound address.
    pub addr: SocketAddr,
    /// The service (engine, hub, metrics).
    pub svc: Arc<Service>,
    /// The process backend, when it is the one in use (for inspecting agent pids).
    pub process: Option<Arc<ProcessBackend>>,
    tls: bool,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// The process backend; panics with another backend.
    pub fn process(&self) -> &ProcessBackend {
        self.process
            .as_deref()
            .expect("the process backend is in use")
    }

    /// `http://addr`, or `https://addr` when serving TLS.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Begins shutdown and waits for it to finish.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts serving on `listener`.
pub async fn start(listener: TcpListener, cfg: ServeConfig) -> Result<Running> {
    let addr = listener.local_addr().map_err(Error::Listener)?;
    if !addr.ip().is_loopback() && cfg.api_token.is_none() {
        return Err(Error::NoTokenOnPublicAddress(addr));
    }
    let tls = match &cfg.tls {
        Some(files) => Some(crate::tls::CertReloader::new(files.clone())?.server_config()?),
        None => None,
    };
    if let Some(ca) = &cfg.ca_file {
        crate::tls::client_config(Some(ca))?;
    }
    let (work_dir, owned_dir) = match &cfg.work_dir {
        Some(d) => (d.clone(), false),
        None => {
            let n: u32 = rand::random();
            let d = std::env::temp_dir().join(format!("warmpool-{}-{n:08x}", std::process::id()));
            (d, true)
        }
    };
    std::fs::create_dir_all(&work_dir).map_err(|source| Error::WorkDir {
        path: work_dir.display().to_string(),
        source,
    })?;
    let hub_url = cfg.hub_url.clone().unwrap_or_else(|| {
        let host = if addr.ip().is_unspecified() {
            SocketAddr::new([127, 0, 0, 1].into(), addr.port())
        } else {
            addr
        };
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{host}/v1/agents/connect")
    });
    let (backend, process, kube): (Arc<dyn Backend>, _, _) = match &cfg.backend {
        BackendChoice::Process => {
            let p = Arc::new(ProcessBackend::new(ProcessConfig {
                agent_exe: cfg.agent_exe.clone(),
                hub_url,
                work_dir: work_dir.clone(),
                grace: cfg.agent_grace,
                ca_file: cfg.ca_file.clone(),
            }));
            (p.clone(), Some(p), None)
        }
        BackendChoice::Kubernetes {
            client, namespace, ..
        } => {
            let k = Arc::new(KubeBackend::new(
                client.clone(),
                KubeConfig {
                    namespace: namespace.clone(),
                    hub_url,
                    status_interval: Duration::from_millis(500),
                },
            ));
            (k.clone(), None, Some(k))
        }
    };
    let svc = Service::start(
        cfg.service.clone(),
        cfg.agent_key.clone(),
        backend,
        Box::new(GovernorPacer::default()),
        Metrics::new(),
    );
    let runner: Arc<dyn crate::jenkins::runner::Runner> = match &cfg.backend {
        BackendChoice::Process => {
            Arc::new(crate::jenkins::runner::ProcessRunner::new(cfg.agent_grace))
        }
        BackendChoice::Kubernetes {
            client, namespace, ..
        } => Arc::new(crate::jenkins::pods::KubeRunner::new(
            client.clone(),
            namespace.clone(),
        )),
    };
    let jenkins = crate::jenkins::Connector::new(runner, svc.metrics.clone(), cfg.ca_file.clone());
    let _ = svc.jenkins.set(jenkins.clone());
    let app = router(ApiState {
        svc: svc.clone(),
        api_token: cfg.api_token.clone().map(Arc::new),
    });
    let http_stop = CancellationToken::new();
    let http = {
        let http_stop = http_stop.clone();
        let shutdown = async move { http_stop.cancelled().await };
        let tls_on = tls.is_some();
        let limits = cfg.http;
        tokio::spawn(async move {
            // No Nagle: leases, exec frames and agent messages are small and latency-bound
            // (with Nagle and delayed ACKs a reply can sit 40 ms in a buffer).
            use axum::serve::ListenerExt;
            let r = match tls {
                None => {
                    let listener = listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    crate::http_server::serve(listener, app, limits, shutdown).await;
                    Ok(())
                }
                Some(tls) => {
                    match crate::tls::TlsListener::new(listener, tls, crate::tls::HANDSHAKE_TIMEOUT)
                    {
                        Ok(listener) => {
                            crate::http_server::serve(listener, app, limits, shutdown).await;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = r {
                tracing::error!(error = %e, tls = tls_on, "HTTP server failed");
            }
        })
    };
    let stop = CancellationToken::new();
    let watchers = CancellationToken::new();
    let mut leader_task = None;
    // Set when this instance lost leadership: the new leader owns the Jenkins nodes now.
    let lost_leadership = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if kube.is_some() {
        // Not ready until this instance leads (if elected) and has adopted existing pods.
        svc.set_ready(false);
    }
    match kube {
        None => {
            for p in &cfg.pools {
                match &p.spec.jenkins {
                    Some(j) => jenkins.upsert(crate::jenkins::PoolCfg {
                        key: p.name.clone(),
                        spec: p.spec.clone(),
                        jenkins: j.clone(),
                        credentials: match &j.credentials_file {
                            Some(f) => crate::jenkins::Credentials::load(f),
                            None => Err(
                                "no credentials: set jenkins.credentialsFile to a file holding `user:api-token`"
                                    .into(),
                            ),
                        },
                        agent_pool: None,
                    }),
                    None => svc.upsert_pool(&p.name, p.spec.clone()),
                }
            }
        }
        Some(k) => {
            let leader = match &cfg.backend {
                BackendChoice::Kubernetes { client, leader, .. } => {
                    leader.clone().map(|l| (client.clone(), *l))
                }
                BackendChoice::Process => None,
            };
            match leader {
                None => {
                    tokio::spawn(crate::backend::kubernetes::run(
                        svc.clone(),
                        k,
                        watchers.clone(),
                    ));
                }
                Some((client, lcfg)) => {
                    leader_task = Some(tokio::spawn(lead(
                        svc.clone(),
                        k,
                        client,
                        lcfg,
                        watchers.clone(),
                        stop.clone(),
                        lost_leadership.clone(),
                    )));
                }
            }
        }
    }
    tracing::info!(
        %addr,
        backend = svc.backend_name(),
        tls = cfg.tls.is_some(),
        "warmpool serving"
    );
    let task = {
        let (svc, stop, grace) = (svc.clone(), stop.clone(), cfg.shutdown_grace);
        let delete_jenkins = cfg.jenkins_delete_on_shutdown;
        let lost = lost_leadership.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            tracing::info!("shutting down: no new leases; waiting for running leases");
            // Jenkins agents outlive the service unless asked otherwise (adopted on restart),
            // and never go with an instance that lost leadership (the new leader has them).
            let delete = delete_jenkins && !lost.load(std::sync::atomic::Ordering::SeqCst);
            jenkins
                .shutdown(delete, grace.max(Duration::from_secs(5)))
                .await;
            svc.shutdown(grace).await;
            watchers.cancel();
            // Let the leader release its Lease so a standby takes over at once.
            if let Some(t) = leader_task {
                let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
            }
            http_stop.cancel();
            if tokio::time::timeout(Duration::from_secs(5), http)
                .await
                .is_err()
            {
                tracing::warn!("HTTP connections still open after 5s; closing");
            }
            if owned_dir {
                let _ = std::fs::remove_dir_all(&work_dir);
            }
            tracing::info!("shutdown complete");
        })
    };
    Ok(Running {
        addr,
        svc,
        process,
        tls: cfg.tls.is_some(),
        stop,
        task,
    })
}

/// Leader-election driver: a standby is not ready and runs no watcher; the leader runs them and
/// renews its Lease. Losing the lease stops the whole service (the process exits and restarts as
/// a standby, as Kubernetes controllers do); a normal shutdown releases it.
async fn lead(
    svc: Arc<Service>,
    backend: Arc<KubeBackend>,
    client: kube::Client,
    cfg: crate::k8s::leader::LeaderConfig,
    watchers: CancellationToken,
    stop: CancellationToken,
    lost: Arc<std::sync::atomic::AtomicBool>,
) {
    use crate::k8s::leader;
    let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client, &cfg.namespace);
    if leader::acquire(&api, &cfg, &watchers).await.is_none() {
        return;
    }
    // Ready once the adoption in `run` is done, not before.
    tokio::spawn(crate::backend::kubernetes::run(
        svc.clone(),
        backend,
        watchers.clone(),
    ));
    leader::hold(&api, &cfg, &watchers).await;
    if !watchers.is_cancelled() {
        tracing::error!(identity = %cfg.identity, "lost leadership; stopping");
        lost.store(true, std::sync::atomic::Ordering::SeqCst);
        svc.set_ready(false);
        watchers.cancel();
        stop.cancel();
    }
}

/// Serves until `shutdown` resolves, then shuts down cleanly.
pub async fn serve(
    listener: TcpListener,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let running = start(listener, cfg).await?;
    // Either the caller's signal, or the service stopping by itself (lost leadership).
    tokio::select! {
        _ = shutdown => {}
        _ = running.stop.cancelled() => {
            tracing::error!("the service stopped itself; exiting");
        }
    }
    running.shutdown().await;
    Ok(())
}
