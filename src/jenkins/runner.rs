//! Where Jenkins agents run: the [`Runner`] trait and its process implementation.
//!
//! A runner starts one agent with the inbound-agent environment (`JENKINS_URL`,
//! `JENKINS_AGENT_NAME`, `JENKINS_SECRET`, `JENKINS_WEB_SOCKET=true`, `JENKINS_AGENT_WORKDIR`),
//! stops one (idempotent), and lists the live agents of a controller, so the connector can
//! compare them with Jenkins' nodes every poll (level-triggered) and adopt them after a restart.
//!
//! [`ProcessRunner`]: agents are local processes, each the leader of its own process group,
//! without `PR_SET_PDEATHSIG`: like pods, they outlive a restart of the service and are found
//! again through marker variables in their environment (`WARMPOOL_JENKINS_URL`,
//! `WARMPOOL_JENKINS_POOL`, `WARMPOOL_JENKINS_NODE`). The Kubernetes runner is in `pods.rs`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::config::JenkinsSpec;

/// A boxed future with an output, for the object-safe trait.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Marker: the controller's root URL.
pub const ENV_URL: &str = "WARMPOOL_JENKINS_URL";
/// Marker: the pool.
pub const ENV_POOL: &str = "WARMPOOL_JENKINS_POOL";
/// Marker: the node.
pub const ENV_NODE: &str = "WARMPOOL_JENKINS_NODE";
/// Marker: when the agent was started (Unix seconds), so an adopted agent keeps its age.
pub const ENV_STARTED: &str = "WARMPOOL_JENKINS_STARTED";

/// Everything needed to start one agent.
#[derive(Clone)]
pub struct Launch {
    /// Pool key.
    pub pool: String,
    /// Node name.
    pub node: String,
    /// The controller's root URL (ends with `/`).
    pub url: String,
    /// The node's secret.
    pub secret: String,
    /// The node's remote FS (the agent's work dir).
    pub workdir: String,
    /// The pool's Jenkins block.
    pub spec: JenkinsSpec,
    /// Kubernetes: the AgentPool the pod is built from.
    pub agent_pool: Option<Box<crate::k8s::crd::AgentPool>>,
    /// The CA file warmpool trusts for this controller (the pool's `caFile`, or `serve
    /// --ca-file`): a local agent gets it as `WARMPOOL_CA_FILE` (the simulated agent reads it;
    /// a path in the warmpool pod means nothing to an agent pod, which gets none).
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("pool", &self.pool)
            .field("node", &self.node)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Launch {
    /// The inbound-agent environment plus warmpool's markers.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("JENKINS_URL", self.url.as_str()),
            ("JENKINS_AGENT_NAME", self.node.as_str()),
            ("JENKINS_NAME", self.node.as_str()),
            ("JENKINS_SECRET", self.secret.as_str()),
            ("JENKINS_WEB_SOCKET", "true"),
            ("JENKINS_AGENT_WORKDIR", self.workdir.as_str()),
            (ENV_URL, self.url.as_str()),
            (ENV_POOL, self.pool.as_str()),
            (ENV_NODE, self.node.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

/// A live agent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AgentRef {
    /// Pool key.
    pub pool: String,
    /// Node name.
    pub node: String,
    /// When it was started, when known (an adopted agent keeps counting toward `maxAge`).
    pub started: Option<std::time::SystemTime>,
}

/// Why a runner could not start, stop or list agents (each names the node, pod or path).
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The agent's work directory or log could not be made.
    #[error("cannot create {path}: {source}")]
    WorkDir {
        /// The directory or file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The agent command could not be started.
    #[error("cannot start {program} for node {node}: {source}")]
    Spawn {
        /// The program (`jenkins.agentCommand[0]`).
        program: String,
        /// The node.
        node: String,
        /// Why.
        source: std::io::Error,
    },
    /// Scanning /proc for agent processes failed.
    #[error("scanning processes failed: {0}")]
    Scan(String),
    /// The node's pod has no AgentPool to be built from.
    #[error("node {node}: no AgentPool to build its pod from")]
    NoAgentPool {
        /// The node.
        node: String,
    },
    /// The pod could not be built from the AgentPool's template.
    #[error("node {node}: {source}")]
    Template {
        /// The node.
        node: String,
        /// Why.
        source: Box<crate::backend::kubernetes::Error>,
    },
    /// The apiserver refused a pod request.
    #[error("{action} pod {namespace}/{name}: {source}")]
    Pod {
        /// `creating`, `deleting`.
        action: &'static str,
        /// Namespace.
        namespace: String,
        /// Pod (= node) name.
        name: String,
        /// Why.
        source: Box<kube::Error>,
    },
    /// Listing the agent pods failed.
    #[error("listing agent pods: {0}")]
    List(Box<kube::Error>),
}

/// Where agents run.
pub trait Runner: Send + Sync + 'static {
    /// Short name (`process`, `kubernetes`).
    fn name(&self) -> &'static str;
    /// The node's remote FS for a pool.
    fn workdir(&self, spec: &JenkinsSpec, node: &str) -> String;
    /// Starts one agent; resolves once it is started (process spawned, pod created).
    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<(), RunnerError>>;
    /// Stops one agent and resolves once it is gone (or, for pods, deleted).
    fn stop(&self, url: &str, pool: &str, node: &str) -> BoxFuture<'_, Result<(), RunnerError>>;
    /// The live agents started for the controller at `url`.
    fn list(&self, url: &str) -> BoxFuture<'_, Result<Vec<AgentRef>, RunnerError>>;
}

/// Agents as local processes, found (whoever started them) by their environment markers.
pub struct ProcessRunner {
    grace: Duration,
}

impl ProcessRunner {
    /// A runner giving agents `grace` between SIGTERM and SIGKILL.
    pub fn new(grace: Duration) -> ProcessRunner {
        ProcessRunner { grace }
    }
}

/// The command started when the pool names none: the official inbound-agent script.
pub const DEFAULT_AGENT_COMMAND: &str = "jenkins-agent";

/// (pid, work dir) of the live agent processes of one node.
fn find(url: &str, pool: &str, node: &str) -> Vec<(i32, Option<String>)> {
    crate::procs::group_leaders_with_env(ENV_NODE)
        .into_iter()
        .filter(|(_, env)| {
            env.get(ENV_URL).map(String::as_str) == Some(url)
                && env.get(ENV_POOL).map(String::as_str) == Some(pool)
                && env.get(ENV_NODE).map(String::as_str) == Some(node)
        })
        .map(|(pid, env)| (pid, env.get("JENKINS_AGENT_WORKDIR").cloned()))
        .collect()
}

impl Runner for ProcessRunner {
    fn name(&self) -> &'static str {
        "process"
    }

    fn workdir(&self, spec: &JenkinsSpec, node: &str) -> String {
        // Agents share this machine: one directory each.
        PathBuf::from(&spec.remote_fs)
            .join(node)
            .display()
            .to_string()
    }

    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<(), RunnerError>> {
        Box::pin(async move {
            let argv = launch
                .spec
                .agent_command
                .clone()
                .unwrap_or_else(|| vec![DEFAULT_AGENT_COMMAND.to_string()]);
            let dir = PathBuf::from(&launch.workdir);
            let io = |path: PathBuf| {
                move |source| RunnerError::WorkDir {
                    path: path.display().to_string(),
                    source,
                }
            };
            std::fs::create_dir_all(&dir).map_err(io(dir.clone()))?;
            let log_path = dir.join("agent.log");
            let log = std::fs::File::create(&log_path).map_err(io(log_path.clone()))?;
            let log2 = log.try_clone().map_err(io(log_path))?;
            let mut cmd = Command::new(&argv[0]);
            let started = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            cmd.args(&argv[1..])
                .envs(launch.env())
                .env(ENV_STARTED, started.to_string());
            if let Some(ca) = &launch.ca_file {
                // The agent runs in its own directory: a relative path would miss.
                let ca = std::path::absolute(ca).unwrap_or_else(|_| ca.clone());
                cmd.env(super::fake_agent::CA_FILE_ENV, ca);
            }
            cmd.current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                // Its own group (the handle to its whole tree), no PDEATHSIG: it outlives a
                // restart of the service, as a pod does.
                .process_group(0)
                .kill_on_drop(false);
            let mut child = crate::backend::process::spawn_tracked(&mut cmd).map_err(|source| {
                RunnerError::Spawn {
                    program: argv[0].clone(),
                    node: launch.node.clone(),
                    source,
                }
            })?;
            let pid = child.id().unwrap_or(0);
            // Reap it when it exits (it is our child until this service exits).
            tokio::spawn(async move {
                let _ = child.wait().await;
                crate::backend::process::forget_spawned(pid);
            });
            Ok(())
        })
    }

    fn stop(&self, url: &str, pool: &str, node: &str) -> BoxFuture<'_, Result<(), RunnerError>> {
        let (url, pool, node) = (url.to_string(), pool.to_string(), node.to_string());
        Box::pin(async move {
            let found = {
                let (u, p, n) = (url.clone(), pool.clone(), node.clone());
                tokio::task::spawn_blocking(move || find(&u, &p, &n))
                    .await
                    .unwrap_or_default()
            };
            let pids: Vec<i32> = found.iter().map(|(p, _)| *p).collect();
            for &pid in &pids {
                // SAFETY: a signal to a process group this runner created (pgid == pid).
                unsafe { libc::killpg(pid, libc::SIGTERM) };
            }
            let deadline = tokio::time::Instant::now() + self.grace;
            while pids.iter().any(|p| crate::procs::alive(*p))
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for &pid in &pids {
                // SAFETY: as above; whatever is left of the group goes.
                unsafe { libc::killpg(pid, libc::SIGKILL) };
            }
            // The per-node directory this runner created (`<remoteFS>/<node>`), nothing above.
            for dir in found.into_iter().filter_map(|(_, d)| d) {
                let dir = PathBuf::from(dir);
                if dir.file_name().and_then(|n| n.to_str()) == Some(node.as_str()) {
                    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
                }
            }
            Ok(())
        })
    }

    fn list(&self, url: &str) -> BoxFuture<'_, Result<Vec<AgentRef>, RunnerError>> {
        let url = url.to_string();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                crate::procs::group_leaders_with_env(ENV_NODE)
                    .into_iter()
                    .filter(|(_, env)| env.get(ENV_URL) == Some(&url))
                    .filter_map(|(_, env)| {
                        Some(AgentRef {
                            pool: env.get(ENV_POOL)?.clone(),
                            node: env.get(ENV_NODE)?.clone(),
                            started: env
                                .get(ENV_STARTED)
                                .and_then(|s| s.parse::<u64>().ok())
                                .map(|s| std::time::UNIX_EPOCH + Duration::from_secs(s)),
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| RunnerError::Scan(e.to_string()))
        })
    }
}
