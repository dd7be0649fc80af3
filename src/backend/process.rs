//! The `process` backend: every agent is a local child process (`warmpool agent` by default,
//! or the pool's `agentCommand`), in its own process group, with its own workspace directory
//! under the service's work dir.
//!
//! Termination is SIGTERM, then SIGKILL to the agent's process group after a grace period; the
//! child is always reaped and its directory removed before `Exited` is reported. Agents also get
//! `PR_SET_PDEATHSIG` so they hear of the service's death even when it is killed with SIGKILL:
//! `warmpool agent` gets SIGTERM (it then kills its jobs' trees, it is their subreaper, and
//! exits), a pool's own `agentCommand` gets SIGKILL.
//!
//! Creating this backend makes the service process a child subreaper: when an agent dies hard,
//! the jobs it ran (each in its own process group) are re-parented to the service instead of
//! init. A level-triggered sweep kills them with their whole subtrees and process groups, and
//! reaps them: after every agent exit, on every SIGCHLD, every [`SWEEP_INTERVAL`], and at
//! shutdown.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::process::Command;
use tokio::sync::{Notify, oneshot};

use super::{Backend, BackendEvent, BoxFuture, EventSink, ProvisionRequest};

/// Settings of the process backend.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// The `warmpool` executable agents run (`warmpool agent`).
    pub agent_exe: PathBuf,
    /// Hub URL agents dial (`ws://127.0.0.1:7420/v1/agents/connect`).
    pub hub_url: String,
    /// Directory for agents' workspaces (`<work_dir>/agents/<agent-id>`).
    pub work_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// A CA file agents trust besides the platform's roots (`WARMPOOL_CA_FILE`), for a
    /// `wss://` hub whose certificate a private CA signed.
    pub ca_file: Option<PathBuf>,
}

struct Child {
    pid: u32,
    kill: Option<oneshot::Sender<()>>,
}

/// The process backend.
pub struct ProcessBackend {
    cfg: ProcessConfig,
    children: Arc<DashMap<String, Child>>,
    gone: Arc<Notify>,
    spawner: Mutex<std::sync::mpsc::Sender<SpawnJob>>,
    /// Agents terminated before their queued spawn ran: the spawn is skipped.
    doomed: Arc<DashMap<String, ()>>,
    /// The sweep task runs while this lives.
    _sweeping: Arc<()>,
}

type SpawnJob = Box<dyn FnOnce() + Send>;

/// Pids of live agents started by every process backend in this process. Held while spawning
/// (until the pid is recorded) and while sweeping, so a sweep never takes an agent, of this
/// backend or another one in the same process, for an orphan.
static SPAWNED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// What an agent keeps of `serve`'s environment: the user's identity, the locale, temporary
/// files, TLS roots and logging. Everything else (an operator's secrets, cloud credentials,
/// serve's own settings) stays out of the agents and so out of reach of their jobs.
pub const AGENT_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LC_ALL",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "NO_COLOR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "WARMPOOL_LOG",
    "WARMPOOL_LOG_FORMAT",
    "WARMPOOL_MAX_BACKOFF",
];

fn inherited(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    AGENT_ENV.contains(&name) || name.starts_with("LC_")
}

/// Writes `text` to a new file of mode 0600.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// Pids of processes meant to outlive the service (Jenkins agents, adopted by the next
/// instance): a forced exit leaves them alone.
static OUTLIVE: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Longest time between two sweeps for orphans (SIGCHLD usually triggers one sooner).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Spawns a process the orphan sweep must leave alone and that outlives the service (a Jenkins
/// agent): recorded under the same lock the sweep holds. Call [`forget_spawned`] once it has
/// been reaped.
pub fn spawn_tracked(cmd: &mut Command) -> std::io::Result<tokio::process::Child> {
    let mut spawned = SPAWNED.lock().expect("lock");
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        spawned.insert(pid as i32);
        OUTLIVE.lock().expect("lock").insert(pid as i32);
    }
    Ok(child)
}

/// Forgets a pid recorded by [`spawn_tracked`].
pub fn forget_spawned(pid: u32) {
    SPAWNED.lock().expect("lock").remove(&(pid as i32));
    OUTLIVE.lock().expect("lock").remove(&(pid as i32));
}

fn sweep_orphans() -> usize {
    let spawned = SPAWNED.lock().expect("lock");
    let n = crate::procs::kill_orphans(&spawned);
    if n > 0 {
        tracing::warn!(killed = n, "killed processes left behind by dead agents");
    }
    n
}

/// For an exit that cannot wait (a second SIGINT): SIGKILLs every agent this process started,
/// their jobs and whatever those left, with all their process groups, and reaps them (waiting
/// up to `wait`). Processes meant to outlive the service ([`spawn_tracked`]) stay. Returns
/// how many were still alive afterwards.
pub fn kill_all_for_exit(wait: Duration) -> usize {
    let keep = OUTLIVE.lock().map(|k| k.clone()).unwrap_or_default();
    crate::procs::kill_all_descendants(&keep, wait)
}

/// The level-triggered sweep: on SIGCHLD (a child of ours died: an agent, or an orphan killed
/// before) and every [`SWEEP_INTERVAL`], until the backend is dropped.
async fn sweep_loop(alive: std::sync::Weak<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigchld = signal(SignalKind::child()).ok();
    loop {
        let chld = async {
            match sigchld.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = chld => {}
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
        if alive.upgrade().is_none() {
            return;
        }
        let _ = tokio::task::spawn_blocking(sweep_orphans).await;
    }
}

impl ProcessBackend {
    /// A backend with no agents yet.
    ///
    /// Must be called inside a Tokio runtime. Forks happen on a dedicated, long-lived spawner
    /// thread: the lease path never waits for a fork, and `PR_SET_PDEATHSIG` (which fires when
    /// the spawning *thread* exits) stays armed for as long as this backend lives.
    pub fn new(cfg: ProcessConfig) -> ProcessBackend {
        crate::procs::become_subreaper();
        let handle = tokio::runtime::Handle::current();
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("warmpool-spawner".into())
            .spawn(move || {
                let _rt = handle.enter();
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("spawner thread starts");
        let sweeping = Arc::new(());
        tokio::spawn(sweep_loop(Arc::downgrade(&sweeping)));
        ProcessBackend {
            cfg,
            children: Arc::new(DashMap::new()),
            gone: Arc::new(Notify::new()),
            spawner: Mutex::new(tx),
            doomed: Arc::new(DashMap::new()),
            _sweeping: sweeping,
        }
    }

    /// Pids of the live agent processes.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.pid).collect()
    }

    /// Pid of one agent's process.
    pub fn pid_of(&self, agent: &str) -> Option<u32> {
        self.children.get(agent).map(|c| c.pid)
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "exited".into(),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}

/// Spawns one agent; runs on the spawner thread.
fn spawn_agent(
    cfg: &ProcessConfig,
    children: &Arc<DashMap<String, Child>>,
    gone: &Arc<Notify>,
    req: ProvisionRequest,
    events: EventSink,
) {
    let dir = cfg.work_dir.join("agents").join(&req.agent);
    let workspace = dir.join("workspace");
    let failed = |error: String| {
        let _ = events.send(BackendEvent::Failed {
            pool: req.pool.clone(),
            agent: req.agent.clone(),
            error,
        });
    };
    if let Err(e) = std::fs::create_dir_all(&workspace) {
        failed(format!(
            "cannot create workspace {}: {e}",
            workspace.display()
        ));
        return;
    }
    let mut cmd = match &req.spec.agent_command {
        Some(argv) => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        None => {
            let mut c = Command::new(&cfg.agent_exe);
            c.arg("agent");
            c
        }
    };
    // The token goes on a file only this user can read, which the agent deletes at start:
    // never in its environment, where its jobs (same user) could read it in /proc.
    let token_file = dir.join("token");
    if let Err(e) = write_private(&token_file, &req.token) {
        failed(format!(
            "cannot write token file {}: {e}",
            token_file.display()
        ));
        return;
    }
    let token_file = std::path::absolute(&token_file).unwrap_or(token_file);
    // A clean environment: jobs run as the same user and could read whatever else of serve's
    // environment an agent held, in its /proc/PID/environ.
    cmd.env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| inherited(k)));
    cmd.env("WARMPOOL_HUB", &cfg.hub_url)
        .env("WARMPOOL_AGENT_ID", &req.agent)
        .env("WARMPOOL_TOKEN_FILE", &token_file)
        .env("WARMPOOL_POOL", &req.pool)
        .env("WARMPOOL_LABELS", req.spec.labels.join(","))
        .env("WARMPOOL_WORKSPACE", &workspace)
        .current_dir(&dir)
        .stdin(Stdio::null());
    if let Some(ca) = &cfg.ca_file {
        // The agent runs in its own directory: a relative path would miss.
        let ca = std::path::absolute(ca).unwrap_or_else(|_| ca.clone());
        cmd.env("WARMPOOL_CA_FILE", ca);
    }
    // `warmpool agent` handles SIGTERM by killing its jobs' trees; an unknown program may not.
    let death_signal = match req.spec.agent_command {
        None => libc::SIGTERM,
        Some(_) => libc::SIGKILL,
    };
    crate::procs::isolate(&mut cmd, death_signal);
    let mut spawned = SPAWNED.lock().expect("lock");
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let program = req
                .spec
                .agent_command
                .as_ref()
                .map(|a| a[0].clone())
                .unwrap_or_else(|| cfg.agent_exe.display().to_string());
            failed(format!("cannot start {program}: {e}"));
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    spawned.insert(pid as i32);
    drop(spawned);
    let (kill_tx, kill_rx) = oneshot::channel();
    children.insert(
        req.agent.clone(),
        Child {
            pid,
            kill: Some(kill_tx),
        },
    );
    let _ = events.send(BackendEvent::Started {
        agent: req.agent.clone(),
    });
    let children = children.clone();
    let gone = gone.clone();
    let grace = cfg.grace;
    let agent = req.agent;
    tokio::spawn(async move {
        let status = tokio::select! {
            s = child.wait() => s,
            _ = kill_rx => {
                // SAFETY: plain syscalls on our own child's pid / process group.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                match tokio::time::timeout(grace, child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
                        let _ = child.start_kill();
                        child.wait().await
                    }
                }
            }
        };
        // Anything left in the agent's own process group goes too.
        unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
        let detail = describe(status);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
        children.remove(&agent);
        SPAWNED.lock().expect("lock").remove(&(pid as i32));
        // A /proc scan: off the async threads.
        let _ = tokio::task::spawn_blocking(sweep_orphans).await;
        gone.notify_waiters();
        let _ = events.send(BackendEvent::Exited { agent, detail });
    });
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    fn provision(&self, req: ProvisionRequest, events: EventSink) {
        let (pool, agent) = (req.pool.clone(), req.agent.clone());
        let (cfg, children, gone, doomed, ev) = (
            self.cfg.clone(),
            self.children.clone(),
            self.gone.clone(),
            self.doomed.clone(),
            events.clone(),
        );
        let job: SpawnJob = Box::new(move || {
            if doomed.remove(&req.agent).is_some() {
                let _ = ev.send(BackendEvent::Exited {
                    agent: req.agent,
                    detail: "terminated before it was started".into(),
                });
                return;
            }
            spawn_agent(&cfg, &children, &gone, req, ev)
        });
        if self.spawner.lock().expect("lock").send(job).is_err() {
            let _ = events.send(BackendEvent::Failed {
                pool,
                agent,
                error: "the process backend's spawner thread is gone".into(),
            });
        }
    }

    fn terminate(&self, agent: &str, _events: EventSink) {
        // Under the spawn lock, so the agent is either spawned (and in `children`) or not yet.
        let _spawning = SPAWNED.lock().expect("lock");
        match self.children.get_mut(agent) {
            Some(mut c) => {
                if let Some(k) = c.kill.take() {
                    let _ = k.send(());
                }
            }
            None => {
                self.doomed.insert(agent.to_string(), ());
            }
        }
    }

    fn shutdown(&self) -> BoxFuture<'_> {
        Box::pin(async move {
            for mut c in self.children.iter_mut() {
                if let Some(k) = c.kill.take() {
                    let _ = k.send(());
                }
            }
            let deadline =
                tokio::time::Instant::now() + self.cfg.grace * 2 + Duration::from_secs(1);
            while !self.children.is_empty() {
                let notified = self.gone.notified();
                if self.children.is_empty() {
                    break;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    tracing::error!(
                        left = self.children.len(),
                        "agents still running after shutdown deadline"
                    );
                    break;
                }
            }
            // Killed orphans turn into zombies; sweep until nothing is left to signal or reap.
            for _ in 0..50 {
                if tokio::task::spawn_blocking(sweep_orphans)
                    .await
                    .unwrap_or(0)
                    == 0
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    }
}
