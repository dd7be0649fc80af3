//! Wiring: builds the service, the backend and the HTTP router, serves an already-bound
//! listener, and runs the shutdown sequence (stop leasing, let leases finish up to the grace
//! period, terminate and reap every agent, close connections, remove the work dir), the forced
//! exit ([`force_exit`]), and the removal of work dirs that killed instances left behind.
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

/// The file in a default work dir naming the instance that owns it: `<pid> <start time>`.
pub const PID_FILE: &str = "warmpool.pid";

/// Prefix of default work dirs (`$TMPDIR/warmpool-<pid>-<random>`).
const WORK_DIR_PREFIX: &str = "warmpool-";

/// Default work dirs of the instances running in this process, removed by [`force_exit`].
static OWNED_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Records this process as the owner of `dir` (atomically: a reader sees the whole file or
/// none).
fn write_pid_file(dir: &std::path::Path) -> std::io::Result<()> {
    let pid = std::process::id() as i32;
    let start = crate::procs::start_time(pid).unwrap_or(0);
    let tmp = dir.join(format!("{PID_FILE}.tmp"));
    std::fs::write(&tmp, format!("{pid} {start}\n"))?;
    std::fs::rename(&tmp, dir.join(PID_FILE))
}

/// True when the pid file in `dir` names a process that is gone (or whose pid now belongs to
/// another process). A dir without a readable pid file is never stale: it may be another
/// program's, or an instance's that is still starting.
fn owner_is_dead(dir: &std::path::Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(PID_FILE)) else {
        return false;
    };
    let mut f = text.split_whitespace();
    let (Some(Ok(pid)), Some(Ok(start))) = (
        f.next().map(str::parse::<i32>),
        f.next().map(str::parse::<u64>),
    ) else {
        return false;
    };
    crate::procs::start_time(pid) != Some(start)
}

/// Removes the default work dirs under `tmp` that instances killed before their shutdown (a
/// SIGKILL, a crash) left behind: ours (same user), with a pid file naming a dead process.
/// Returns the dirs removed.
pub fn remove_stale_work_dirs(tmp: &std::path::Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(tmp) else {
        return removed;
    };
    for ent in rd.flatten() {
        let path = ent.path();
        let ours = ent
            .file_name()
            .to_string_lossy()
            .starts_with(WORK_DIR_PREFIX)
            && path
                .symlink_metadata()
                .is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if !ours || !owner_is_dead(&path) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(dir = %path.display(), "removed the work dir of an instance that did not shut down");
                removed.push(path);
            }
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove a stale work dir")
            }
        }
    }
    removed
}

/// The forced exit (a second SIGINT/SIGTERM): kills every agent this process started, their
/// jobs and anything those left (whole process groups, bounded to about a second), then removes
/// the default work dirs. The caller exits right after.
pub fn force_exit() {
    let left = crate::backend::process::kill_all_for_exit(Duration::from_secs(1));
    if left > 0 {
        eprintln!("warmpool: {left} processes still alive at the forced exit");
    }
    let dirs = std::mem::take(&mut *OWNED_DIRS.lock().unwrap_or_else(|e| e.into_inner()));
    for d in dirs {
        let _ = std::fs::remove_dir_all(&d);
    }
}

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
            let tmp = std::env::temp_dir();
            remove_stale_work_dirs(&tmp);
            let n: u32 = rand::random();
            let d = tmp.join(format!("{WORK_DIR_PREFIX}{}-{n:08x}", std::process::id()));
            (d, true)
        }
    };
    std::fs::create_dir_all(&work_dir)
        .and_then(|()| {
            if owned_dir {
                OWNED_DIRS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(work_dir.clone());
                write_pid_file(&work_dir)?;
            }
            Ok(())
        })
        .map_err(|source| Error::WorkDir {
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
    let jenkins = crate::jenkins::Connector::new(&svc, runner, cfg.ca_file.clone());
    let _ = svc.jenkins.set(jenkins.clone());
    // The pools file (process backend) is applied before the API answers: a client that sees
    // the service up (`/healthz`) sees every pool of the file. Agents started meanwhile dial a
    // listener already bound; their connections wait in its backlog.
    if kube.is_none() {
        for p in &cfg.pools {
            match &p.spec.jenkins {
                Some(j) => jenkins.upsert(crate::jenkins::PoolCfg {
                    key: p.name.clone(),
                    spec: p.spec.clone(),
                    jenkins: j.clone(),
                    credentials: match &j.credentials_file {
                        Some(f) => crate::jenkins::Credentials::load(f),
                        None => Err(crate::jenkins::CredentialsError::Missing {
                            hint: "set jenkins.credentialsFile to a file holding `user:api-token`",
                        }),
                    },
                    agent_pool: None,
                }),
                None => svc.upsert_pool(&p.name, p.spec.clone()),
            }
        }
    }
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
        let refused = svc.metrics.http_refused.clone();
        let routers = crate::http_server::Routers {
            reserved: crate::api::agents_only(app.clone(), refused.clone()),
            app,
            refused: Some(refused),
        };
        tokio::spawn(async move {
            // No Nagle: leases, exec frames and agent messages are small and latency-bound
            // (with Nagle and delayed ACKs a reply can sit 40 ms in a buffer).
            use crate::http_server::serve;
            use axum::serve::ListenerExt;
            let r = match tls {
                None => {
                    let listener = listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    serve(listener, routers, limits, shutdown).await;
                    Ok(())
                }
                Some(tls) => {
                    match crate::tls::TlsListener::new(listener, tls, crate::tls::HANDSHAKE_TIMEOUT)
                    {
                        Ok(listener) => {
                            serve(listener, routers, limits, shutdown).await;
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
    let controller_cfg = crate::k8s::agentpool::ControllerConfig {
        ca_file: cfg.ca_file.clone(),
    };
    if kube.is_some() {
        // Not ready until this instance leads (if elected) and has adopted existing pods.
        svc.set_ready(false);
    }
    match kube {
        // The pools file was applied before the API started (above).
        None => {}
        Some(k) => {
            let leader = match &cfg.backend {
                BackendChoice::Kubernetes { client, leader, .. } => {
                    leader.clone().map(|l| (client.clone(), *l))
                }
                BackendChoice::Process => None,
            };
            match leader {
                None => {
                    tokio::spawn(crate::k8s::agentpool::run(
                        svc.clone(),
                        k,
                        controller_cfg.clone(),
                        watchers.clone(),
                    ));
                }
                Some((client, lcfg)) => {
                    leader_task = Some(tokio::spawn(lead(
                        svc.clone(),
                        (k, controller_cfg.clone()),
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
                OWNED_DIRS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|d| d != &work_dir);
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
    // The backend and the AgentPool controller's settings.
    (backend, controller_cfg): (Arc<KubeBackend>, crate::k8s::agentpool::ControllerConfig),
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
    tokio::spawn(crate::k8s::agentpool::run(
        svc.clone(),
        backend,
        controller_cfg,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with_pid_file(tmp: &std::path::Path, name: &str, text: Option<String>) -> PathBuf {
        let d = tmp.join(name);
        std::fs::create_dir_all(d.join("agents/a/workspace")).unwrap();
        if let Some(t) = text {
            std::fs::write(d.join(PID_FILE), t).unwrap();
        }
        d
    }

    #[test]
    fn only_work_dirs_of_dead_instances_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        let start = crate::procs::start_time(me).unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        gone.wait().unwrap();
        let live = with_pid_file(tmp.path(), "warmpool-live", Some(format!("{me} {start}\n")));
        let dead = with_pid_file(tmp.path(), "warmpool-dead", Some(format!("{gone_pid} 1\n")));
        // Our pid, another start time: the pid was reused, the owner is gone.
        let reused = with_pid_file(
            tmp.path(),
            "warmpool-reused",
            Some(format!("{me} {}\n", start + 1)),
        );
        let starting = with_pid_file(tmp.path(), "warmpool-starting", None);
        let garbled = with_pid_file(tmp.path(), "warmpool-garbled", Some("12".into()));
        let other = with_pid_file(tmp.path(), "other-dead", Some(format!("{gone_pid} 1\n")));
        let mut removed = remove_stale_work_dirs(tmp.path());
        removed.sort();
        assert_eq!(removed, vec![dead.clone(), reused.clone()]);
        assert!(!dead.exists() && !reused.exists());
        for keep in [live, starting, garbled, other] {
            assert!(keep.exists(), "{} kept", keep.display());
        }
    }

    #[test]
    fn the_pid_file_names_this_process() {
        let tmp = tempfile::tempdir().unwrap();
        write_pid_file(tmp.path()).unwrap();
        assert!(!owner_is_dead(tmp.path()));
        assert!(!tmp.path().join(format!("{PID_FILE}.tmp")).exists());
    }
}
