//! Command-line definitions (clap derive). Every flag has an `env` twin but `run --env` and
//! `bench`'s measurement flags (tests/cli.rs checks it, README.md names them); each
//! component's flags are a flattened struct. Parsing only: `main.rs` acts on the result.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::spec::Dur;

/// warmpool keeps CI build agents warm and leases them by label in milliseconds.
#[derive(Debug, Parser)]
#[command(name = "warmpool", version, about, propagate_version = true)]
pub struct Cli {
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: pool engine, agent hub, lease API, metrics.
    Serve(ServeArgs),
    /// Run one agent (started by the service, or by a pod).
    Agent(AgentArgs),
    /// Lease an agent, run a command on it, stream its output, exit with its code.
    Run(RunArgs),
    /// Show the pools.
    Status(StatusArgs),
    /// Print the AgentPool CustomResourceDefinition as YAML.
    Crd,
    /// Benchmark a warmpool: warm vs cold side by side, or thousands of simulated agents.
    Bench(BenchArgs),
    /// Replay a trace of lease requests through the pool engine with a virtual clock and a
    /// simulated provisioner, per policy side by side; or write a trace (synthetic, or from a
    /// Jenkins controller's build history). See docs/SIZING.md.
    Simulate(Box<SimulateArgs>),
    /// A *simulated* Jenkins inbound agent (tests, demos): reads the `JENKINS_*` variables of
    /// the official inbound-agent image and holds a `wsagents/` WebSocket open. No remoting.
    #[command(hide = true, disable_help_flag = true)]
    FakeJenkinsAgent {
        /// agent.jar-style flags (`-url`, `-name`, `-secret`, `-webSocket`, `-workDir`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging flags.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(
        long,
        env = "WARMPOOL_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info,warmpool=debug`.
    #[arg(long, env = "WARMPOOL_LOG", global = true)]
    pub log: Option<String>,
}

/// Backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Agents are local child processes.
    Process,
    /// Agents are pods; pools are `AgentPool` resources.
    Kubernetes,
}

fn dur(s: &str) -> Result<Dur, String> {
    Dur::parse(s)
}

/// A hub URL as agents dial it, from what a person writes: `ws://` or `wss://`; `http://` and
/// `https://` become `ws://` and `wss://`, no scheme means `ws://`; a URL without a path (or
/// with `/` only) gets the hub's path, [`crate::api::AGENT_CONNECT_PATH`]. Any other path is
/// kept (a proxy may mount the hub elsewhere).
pub fn hub_url(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    let (scheme, rest) = match raw.split_once("://") {
        Some((s, rest)) => (s.to_ascii_lowercase(), rest),
        None => ("ws".to_string(), raw),
    };
    let scheme = match scheme.as_str() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        other => {
            return Err(format!(
                "hub URL {raw:?}: scheme {other}:// is not a WebSocket one (use ws:// or wss://)"
            ));
        }
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(format!("hub URL {raw:?} names no host"));
    }
    let path = if path.is_empty() || path == "/" {
        crate::api::AGENT_CONNECT_PATH.to_string()
    } else if let Some(query) = path.strip_prefix("/?").or_else(|| path.strip_prefix('?')) {
        format!("{}?{query}", crate::api::AGENT_CONNECT_PATH)
    } else {
        path.to_string()
    };
    let url = format!("{scheme}://{authority}{path}");
    url.parse::<tokio_tungstenite::tungstenite::http::Uri>()
        .map_err(|e| format!("hub URL {raw:?}: {e}"))?;
    Ok(url)
}

/// `warmpool serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address for the lease API, the agent hub and /metrics.
    #[arg(long, env = "WARMPOOL_LISTEN", default_value = "127.0.0.1:7420")]
    pub listen: SocketAddr,
    /// Where agents come from.
    #[arg(long, env = "WARMPOOL_BACKEND", value_enum, default_value = "process")]
    pub backend: BackendKind,
    /// Namespace of the `AgentPool`s and their pods (kubernetes backend; default: the
    /// kubeconfig's or the pod's namespace).
    #[arg(long, env = "WARMPOOL_NAMESPACE")]
    pub namespace: Option<String>,
    /// Kubernetes backend: serve the `AgentPool`s of every namespace (pools are then named
    /// `namespace.name`; needs cluster-wide RBAC: overlays/all-namespaces).
    #[arg(long, env = "WARMPOOL_ALL_NAMESPACES")]
    pub all_namespaces: bool,
    /// Kubernetes backend: elect one leader among replicas with a coordination.k8s.io Lease
    /// (only the leader provisions and deletes; a standby is not ready).
    #[arg(long, env = "WARMPOOL_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "WARMPOOL_LEADER_LEASE_NAME",
        default_value = "warmpool-leader"
    )]
    pub leader_lease_name: String,
    /// How long the leader's lease holds without renewal.
    #[arg(long, env = "WARMPOOL_LEADER_LEASE_DURATION", value_parser = dur, default_value = "15s")]
    pub leader_lease_duration: Dur,
    /// The leader steps down when it could not renew for this long.
    #[arg(long, env = "WARMPOOL_LEADER_RENEW_DEADLINE", value_parser = dur, default_value = "10s")]
    pub leader_renew_deadline: Dur,
    /// Time between leader-election attempts and renewals.
    #[arg(long, env = "WARMPOOL_LEADER_RETRY_PERIOD", value_parser = dur, default_value = "2s")]
    pub leader_retry_period: Dur,
    /// Pools file (YAML `pools: [...]`). Without it, the built-in pool `default` is served.
    #[arg(long, env = "WARMPOOL_POOLS")]
    pub pools: Option<PathBuf>,
    /// File holding the API bearer token. Required to listen on a non-loopback address.
    #[arg(long, env = "WARMPOOL_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// File holding the key agent tokens derive from (default: a random key per start).
    #[arg(long, env = "WARMPOOL_AGENT_KEY_FILE")]
    pub agent_key_file: Option<PathBuf>,
    /// Directory for agents' workspaces (default: a fresh temporary directory).
    #[arg(long, env = "WARMPOOL_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// URL agents dial, e.g. ws://warmpool-hub.warmpool.svc:7420 (default: derived from
    /// --listen). Without a path the hub's, /v1/agents/connect, is added; http(s):// means
    /// ws(s)://.
    #[arg(long, env = "WARMPOOL_HUB_URL", value_parser = hub_url)]
    pub hub_url: Option<String>,
    /// Heartbeat period between hub and agents; 3 missed heartbeats lose the agent (a shorter
    /// period notices a half-open connection sooner and costs each idle agent more CPU; see
    /// docs/BENCHMARKS.md).
    #[arg(long, env = "WARMPOOL_HEARTBEAT_INTERVAL", value_parser = dur, default_value = "30s")]
    pub heartbeat_interval: Dur,
    /// Agent handshakes accepted per second (protects the service during reconnect storms).
    #[arg(long, env = "WARMPOOL_HANDSHAKES_PER_SECOND", default_value_t = 50)]
    pub handshakes_per_second: u32,
    /// Longest a write to an agent may wait while the agent does not read; then the agent is
    /// disconnected (4429) and its lease ends.
    #[arg(long, env = "WARMPOOL_AGENT_SEND_TIMEOUT", value_parser = dur, default_value = "10s")]
    pub agent_send_timeout: Dur,
    /// Time an HTTP client has to send a request's headers (also how long a keep-alive
    /// connection may stay idle between requests).
    #[arg(long, env = "WARMPOOL_HTTP_HEADER_TIMEOUT", value_parser = dur, default_value = "10s")]
    pub http_header_timeout: Dur,
    /// Open HTTP connections at most, agents' and exec WebSockets included; more are closed as
    /// they arrive (default: three quarters of the open-files limit).
    #[arg(long, env = "WARMPOOL_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Of --max-connections, the slots kept for agents' hub connections: once the others are
    /// taken, new connections may only be agents dialling the hub (default: an eighth of
    /// --max-connections, 8 to 4096).
    #[arg(long, env = "WARMPOOL_AGENT_RESERVED_CONNECTIONS")]
    pub agent_reserved_connections: Option<usize>,
    /// Largest WebSocket message accepted, in bytes.
    #[arg(long, env = "WARMPOOL_MAX_FRAME_BYTES", default_value_t = crate::protocol::DEFAULT_MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// Lease requests allowed to wait at once (more are answered 429).
    #[arg(long, env = "WARMPOOL_MAX_WAITERS", default_value_t = 1024)]
    pub max_waiters: usize,
    /// On shutdown, how long running leases may continue before their agents are stopped.
    #[arg(long, env = "WARMPOOL_SHUTDOWN_GRACE", value_parser = dur, default_value = "30s")]
    pub shutdown_grace: Dur,
    /// The executable agents run as `<exe> agent` (default: this executable).
    #[arg(long, env = "WARMPOOL_AGENT_EXE", hide = true)]
    pub agent_exe: Option<PathBuf>,
    /// On shutdown, delete the Jenkins nodes of Jenkins pools and stop their agents (default:
    /// leave them online; the next instance adopts them).
    #[arg(long, env = "WARMPOOL_JENKINS_DELETE_ON_SHUTDOWN")]
    pub jenkins_delete_on_shutdown: bool,
    /// Serve the API, /metrics and the agent hub over TLS with this PEM certificate chain
    /// (leaf first; re-read when the file changes). Needs --tls-key.
    #[arg(long, env = "WARMPOOL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (re-read when the file changes).
    #[arg(long, env = "WARMPOOL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM file of CA certificates trusted besides the platform's roots (a private CA).
    /// Used by Jenkins clients (unless a pool sets `caFile`) and handed to local agents.
    #[arg(long, env = "WARMPOOL_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

/// `warmpool agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Hub URL, e.g. ws://127.0.0.1:7420/v1/agents/connect (wss:// for a TLS hub; without a
    /// path, /v1/agents/connect is added).
    #[arg(long, env = "WARMPOOL_HUB", value_parser = hub_url)]
    pub hub: String,
    /// This agent's id (given by the service).
    #[arg(long, env = "WARMPOOL_AGENT_ID")]
    pub agent_id: String,
    /// This agent's token (given by the service; pods and external agents set it).
    #[arg(
        long,
        env = "WARMPOOL_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file"
    )]
    pub token: Option<String>,
    /// File holding this agent's token, read and deleted at start (the process backend's
    /// way: the token never sits in the agent's environment, where jobs could read it).
    #[arg(long, env = "WARMPOOL_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Pool name.
    #[arg(long, env = "WARMPOOL_POOL")]
    pub pool: Option<String>,
    /// Labels to report, comma-separated.
    #[arg(long, env = "WARMPOOL_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Workspace directory, wiped after every lease.
    #[arg(long, env = "WARMPOOL_WORKSPACE", default_value = "workspace")]
    pub workspace: PathBuf,
    /// Longest pause between reconnect attempts.
    #[arg(long, env = "WARMPOOL_MAX_BACKOFF", value_parser = dur, default_value = "10s")]
    pub max_backoff: Dur,
    /// PEM file of CA certificates trusted besides the platform's roots (a private CA).
    #[arg(long, env = "WARMPOOL_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

/// How to reach the service.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Service URL (`host:port` without a scheme is `http://host:port`).
    #[arg(long, env = "WARMPOOL_SERVER", default_value = "http://127.0.0.1:7420")]
    pub server: String,
    /// File holding the API bearer token.
    #[arg(long, env = "WARMPOOL_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// PEM file of CA certificates trusted besides the platform's roots (a private CA).
    #[arg(long, env = "WARMPOOL_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

/// `warmpool run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Service.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Label expression (Jenkins syntax), e.g. 'linux && (go || rust)'.
    #[arg(long, short = 's', env = "WARMPOOL_SELECTOR", default_value = "")]
    pub selector: String,
    /// How long to wait for an agent.
    #[arg(long, env = "WARMPOOL_WAIT", value_parser = dur, default_value = "60s")]
    pub wait: Dur,
    /// Lease TTL; renewed while the command runs.
    #[arg(long, env = "WARMPOOL_TTL", value_parser = dur, default_value = "60s")]
    pub ttl: Dur,
    /// Kill the command after this long.
    #[arg(long, env = "WARMPOOL_TIMEOUT", value_parser = dur)]
    pub timeout: Option<Dur>,
    /// Working directory on the agent, relative to its workspace and inside it (no absolute
    /// path, no `..` above it).
    #[arg(long, env = "WARMPOOL_CWD", value_parser = parse_cwd)]
    pub cwd: Option<String>,
    /// When the connection to the service breaks (a restart, a takeover), keep re-attaching to
    /// the running command for this long; the command keeps running meanwhile.
    #[arg(long, env = "WARMPOOL_REATTACH_TIMEOUT", value_parser = dur, default_value = "2m")]
    pub reattach_timeout: Dur,
    /// Forward stdin to the command even when it is a terminal (it is forwarded whenever it is
    /// not a terminal, EOF included, as ssh does).
    #[arg(long, short = 'i', env = "WARMPOOL_INTERACTIVE")]
    pub interactive: bool,
    /// Run the command on a pseudo-terminal (its size follows this terminal's; this terminal
    /// is put in raw mode meanwhile, so Ctrl-C goes to the command). Implies `-i`.
    #[arg(long, short = 't', env = "WARMPOOL_TTY")]
    pub tty: bool,
    /// Extra environment for the command, KEY=VALUE (repeatable; no env twin: a value may
    /// contain any character, so no delimiter is safe).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

fn parse_cwd(s: &str) -> Result<String, String> {
    crate::protocol::check_cwd(s).map(|_| s.to_string())
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Output formats of `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned table.
    Table,
    /// JSON.
    Json,
}

/// `warmpool status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Service.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Output format.
    #[arg(
        long,
        short = 'o',
        env = "WARMPOOL_OUTPUT",
        value_enum,
        default_value = "table"
    )]
    pub output: OutputFormat,
    /// Print again every interval (`--watch` alone: every 2s; `--watch 500ms`) until
    /// interrupted; on a terminal the screen is cleared before each refresh.
    #[arg(
        long,
        short = 'w',
        env = "WARMPOOL_WATCH",
        value_name = "INTERVAL",
        num_args = 0..=1,
        default_missing_value = "2s",
        value_parser = positive_dur
    )]
    pub watch: Option<Dur>,
}

fn positive_dur(s: &str) -> Result<Dur, String> {
    match Dur::parse(s)? {
        Dur(d) if d.is_zero() => Err(format!("{s:?}: the interval must be above zero")),
        d => Ok(d),
    }
}

/// `warmpool bench`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// `bench agents`: the scale test.
    #[command(subcommand)]
    pub sub: Option<BenchCommand>,
    /// The load generator (without a subcommand).
    #[command(flatten)]
    pub load: BenchLoadArgs,
}

/// Subcommands of `bench`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Open N simulated WebSocket agents against a server (external pools), then report the
    /// server's RSS and idle CPU per 1,000 agents and lease latency under that population.
    Agents(BenchAgentsArgs),
}

/// The load generator's flags.
#[derive(Debug, Args)]
pub struct BenchLoadArgs {
    /// Service URL (default http://127.0.0.1:7420; ignored with --embedded).
    #[arg(long, env = "WARMPOOL_SERVER")]
    pub server: Option<String>,
    /// File holding the API bearer token.
    #[arg(long, env = "WARMPOOL_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Start an in-process service (process backend) with two pools identical but for
    /// warmth, `warm` (minIdle = concurrency) and `cold` (minIdle 0), and alternate jobs
    /// between them.
    #[arg(long)]
    pub embedded: bool,
    /// A target: `name=selector` or a bare selector (repeatable; jobs alternate).
    #[arg(long, short = 's')]
    pub selector: Vec<String>,
    /// Selector of the warm pool (target `warm`), for side-by-side runs.
    #[arg(long)]
    pub warm_selector: Option<String>,
    /// Selector of the cold pool (target `cold`), for side-by-side runs.
    #[arg(long)]
    pub cold_selector: Option<String>,
    /// Jobs in all.
    #[arg(long, default_value_t = 200)]
    pub jobs: usize,
    /// Jobs in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Shell command every job runs; empty: lease and release only (measures the lease API).
    /// Default `true`; with --floor, empty (the only mode --floor takes).
    #[arg(long)]
    pub command: Option<String>,
    /// Also run the lease API's floor, an empty in-process server with the same lease routes,
    /// in alternating blocks with warmpool (lease-only), and report both side by side: lease
    /// and release percentiles, cycles/s, CPU per cycle from /proc, and warmpool/floor ratios.
    /// With --embedded the pool is the issue's: minIdle = concurrency, maxUses 0.
    #[arg(long)]
    pub floor: bool,
    /// --floor: rounds of one block per target, the order flipping each round (2: floor,
    /// warmpool, warmpool, floor).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Stop starting jobs after this long.
    #[arg(long, value_parser = dur)]
    pub duration: Option<Dur>,
    /// How long a lease request may wait for an agent.
    #[arg(long, value_parser = dur, default_value = "120s")]
    pub wait: Dur,
    /// `--embedded`: leases an agent serves before it is replaced (1 = a fresh agent per job,
    /// 0 = no limit). Default 1; with --floor, 0.
    #[arg(long)]
    pub max_uses: Option<u32>,
    /// Output format; `json` includes every sample.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// Write the latency CDFs as SVG to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Also write the JSON report (every sample included) to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// PEM file of CA certificates trusted besides the platform's roots (a private CA).
    #[arg(long, env = "WARMPOOL_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Kubernetes backend: watch the pools' pods in this namespace during the load (kubeconfig
    /// from KUBECONFIG, else in-cluster) and report the pods created, each pool's peak of pods
    /// against maxTotal, and the split of cold starts (pod created, Running, agent connected,
    /// first byte).
    #[arg(long, value_name = "NAMESPACE")]
    pub pods: Option<String>,
}

/// `warmpool bench agents`.
#[derive(Debug, Args)]
pub struct BenchAgentsArgs {
    /// A running server with external pools (default: start a local `warmpool serve`).
    #[arg(long, env = "WARMPOOL_SERVER")]
    pub server: Option<String>,
    /// File holding the API bearer token of that server.
    #[arg(long, env = "WARMPOOL_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// External pools of that server to join (repeatable; default: all external pools).
    #[arg(long)]
    pub pool: Vec<String>,
    /// Pid of that server when it is local (default: found by its port).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// External pools (label sets) of a started server.
    #[arg(long, default_value_t = 10)]
    pub label_sets: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    pub dial_concurrency: usize,
    /// Handshakes per second a started server accepts.
    #[arg(long, default_value_t = 1000)]
    pub handshakes_per_second: u32,
    /// Heartbeat interval of a started server (the default is `serve`'s).
    #[arg(long, value_parser = dur, default_value = "30s")]
    pub heartbeat_interval: Dur,
    /// How long idle CPU is measured.
    #[arg(long, value_parser = dur, default_value = "20s")]
    pub measure: Dur,
    /// Leases in the latency phase.
    #[arg(long, default_value_t = 2000)]
    pub jobs: usize,
    /// Leases in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// PEM file of CA certificates trusted besides the platform's roots (a private CA).
    #[arg(long, env = "WARMPOOL_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

fn range(s: &str) -> Result<(std::time::Duration, std::time::Duration), String> {
    crate::simulate::parse_range(s)
}

fn window(s: &str) -> Result<(u32, u32), String> {
    crate::simulate::parse_window(s)
}

fn rfc3339(s: &str) -> Result<std::time::SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time like 2026-01-05T00:00:00Z ({e})"))
}

/// `warmpool simulate`: replay (`--trace`), generate (`--generate`) or import (`--jenkins`).
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Replay this trace (CSV `at_seconds,selector,duration_seconds`; docs/SIZING.md).
    #[arg(long, env = "WARMPOOL_SIMULATE_TRACE", conflicts_with_all = ["generate", "jenkins"],
        required_unless_present_any = ["generate", "jenkins"], requires = "provision")]
    pub trace: Option<PathBuf>,
    /// Provisioning latency MIN..MAX (uniform, e.g. `1.1s..3s`, `20s..30s`): from a provision
    /// to the agent registered and idle.
    #[arg(long, env = "WARMPOOL_SIMULATE_PROVISION", value_parser = range)]
    pub provision: Option<(std::time::Duration, std::time::Duration)>,
    /// A pools file (the format of `serve --pools`) = one policy, named by its file; repeat for
    /// policies side by side. Default: the built-in policies, one pool per selector of the trace.
    #[arg(long, env = "WARMPOOL_SIMULATE_POOLS", value_delimiter = ',')]
    pub pools: Vec<PathBuf>,
    /// Replay: the report's format, `text` or `json`. --generate and --jenkins: the trace file
    /// to write (default: standard output).
    #[arg(
        long,
        short = 'o',
        env = "WARMPOOL_SIMULATE_OUTPUT",
        alias = "write-trace"
    )]
    pub output: Option<String>,
    /// Also draw the wait CDF and idle agents over time per policy to this SVG file.
    #[arg(long, env = "WARMPOOL_SIMULATE_PLOT")]
    pub plot: Option<PathBuf>,
    /// Seed of the provisioning latencies and of --generate.
    #[arg(long, env = "WARMPOOL_SIMULATE_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Wall time of the trace's start, RFC 3339 (default: the trace's `# start:` comment, else
    /// Monday 2026-01-05T00:00:00Z). Schedules and the time-of-week model read it.
    #[arg(long, env = "WARMPOOL_SIMULATE_START", value_parser = rfc3339)]
    pub start: Option<std::time::SystemTime>,
    /// Not measured from the trace's start (leases arriving in it, idle time in it). Default:
    /// the first week when the trace is longer than 8 days, else nothing.
    #[arg(long, env = "WARMPOOL_SIMULATE_WARMUP", value_parser = dur)]
    pub warmup: Option<Dur>,
    /// Simulated cleanup of a reused agent after a release, until it reports ready.
    #[arg(long, env = "WARMPOOL_SIMULATE_CLEANUP", value_parser = dur, default_value = "2s")]
    pub cleanup: Dur,
    /// Simulated stop of an agent, until it is gone (it counts toward maxTotal meanwhile).
    #[arg(long, env = "WARMPOOL_SIMULATE_TERMINATE", value_parser = dur, default_value = "1s")]
    pub terminate: Dur,
    /// Virtual time between engine ticks.
    #[arg(long, env = "WARMPOOL_SIMULATE_TICK", value_parser = dur, default_value = "1s")]
    pub tick: Dur,
    /// How long a lease request may wait for an agent.
    #[arg(long, env = "WARMPOOL_SIMULATE_WAIT", value_parser = dur, default_value = "1h")]
    pub wait: Dur,
    /// minIdle of the built-in fixed baseline (the forecast policy has minIdle 0).
    #[arg(long, env = "WARMPOOL_SIMULATE_MIN_IDLE", default_value_t = 2)]
    pub min_idle: u32,
    /// maxTotal of the built-in policies' pools.
    #[arg(long, env = "WARMPOOL_SIMULATE_MAX_TOTAL", default_value_t = 500)]
    pub max_total: u32,
    /// A daily window HH:MM..HH:MM (UTC, may wrap midnight) whose idle agent-hours are
    /// reported apart (e.g. a nightly trace's quiet hours).
    #[arg(long, env = "WARMPOOL_SIMULATE_QUIET", value_parser = window)]
    pub quiet: Option<(u32, u32)>,
    /// Also find the smallest fixed minIdle reaching --target (the baseline's pools, or the
    /// first --pools file's, with every pool's minIdle set alike) and print the table.
    #[arg(long, env = "WARMPOOL_SIMULATE_SEARCH_MIN_IDLE")]
    pub search_min_idle: bool,
    /// The warm-hit ratio --search-min-idle looks for, and the built-in forecast policy's
    /// `warmHitTarget`.
    #[arg(long, env = "WARMPOOL_SIMULATE_TARGET", default_value_t = 0.95)]
    pub target: f64,
    /// Also replay the built-in forecast policy with this `scaleToZeroAfter` (as
    /// `forecast-stz`).
    #[arg(long, env = "WARMPOOL_SIMULATE_SCALE_TO_ZERO_AFTER", value_parser = dur)]
    pub scale_to_zero_after: Option<Dur>,
    /// The largest minIdle --search-min-idle tries.
    #[arg(long, env = "WARMPOOL_SIMULATE_SEARCH_LIMIT", default_value_t = 512)]
    pub search_limit: u32,
    /// Write a synthetic trace of this shape (to --output, default standard output).
    #[arg(
        long,
        env = "WARMPOOL_SIMULATE_GENERATE",
        value_enum,
        conflicts_with = "jenkins"
    )]
    pub generate: Option<crate::simulate::generate::Profile>,
    /// --generate: weeks of traffic.
    #[arg(long, env = "WARMPOOL_SIMULATE_WEEKS", default_value_t = 3)]
    pub weeks: u32,
    /// --generate: leases per minute at the shape's peak.
    #[arg(long, env = "WARMPOOL_SIMULATE_RATE", default_value_t = 10.0)]
    pub rate: f64,
    /// --generate: the selector of every lease (default `linux`). --jenkins: the selector of
    /// builds whose job names no label (default: empty, any pool).
    #[arg(long, short = 's', env = "WARMPOOL_SIMULATE_SELECTOR")]
    pub selector: Option<String>,
    /// Make a trace from this Jenkins controller's build history (root URL).
    #[arg(long, env = "WARMPOOL_SIMULATE_JENKINS")]
    pub jenkins: Option<String>,
    /// --jenkins: a job by full name (`folder/job`); repeatable. Default: every job.
    #[arg(long, env = "WARMPOOL_SIMULATE_JOB", value_delimiter = ',')]
    pub job: Vec<String>,
    /// --jenkins: a file holding `user:api-token` (as a pool's `jenkins.credentialsFile`).
    #[arg(long, env = "WARMPOOL_SIMULATE_JENKINS_CREDENTIALS_FILE")]
    pub jenkins_credentials_file: Option<PathBuf>,
    /// --jenkins: the user (with --jenkins-token, instead of a credentials file).
    #[arg(
        long,
        env = "WARMPOOL_SIMULATE_JENKINS_USER",
        requires = "jenkins_token"
    )]
    pub jenkins_user: Option<String>,
    /// --jenkins: the user's API token.
    #[arg(
        long,
        env = "WARMPOOL_SIMULATE_JENKINS_TOKEN",
        hide_env_values = true,
        requires = "jenkins_user"
    )]
    pub jenkins_token: Option<String>,
    /// PEM file of CA certificates trusted besides the platform's roots (a private CA).
    #[arg(long, env = "WARMPOOL_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_verbatim() {
        let c = Cli::try_parse_from([
            "warmpool",
            "run",
            "--selector",
            "linux",
            "--",
            "sh",
            "-c",
            "echo hi; exit 3",
        ])
        .unwrap();
        let Command::Run(r) = c.command else { panic!() };
        assert_eq!(r.command, ["sh", "-c", "echo hi; exit 3"]);
        assert_eq!(r.selector, "linux");
    }

    #[test]
    fn a_hub_url_gets_the_hub_path_and_a_websocket_scheme() {
        let ok = |raw: &str| hub_url(raw).unwrap();
        assert_eq!(ok("ws://h:7420"), "ws://h:7420/v1/agents/connect");
        assert_eq!(ok("ws://h:7420/"), "ws://h:7420/v1/agents/connect");
        assert_eq!(
            ok("127.0.0.1:7420"),
            "ws://127.0.0.1:7420/v1/agents/connect"
        );
        assert_eq!(
            ok("https://hub.example"),
            "wss://hub.example/v1/agents/connect"
        );
        assert_eq!(ok("HTTP://h:1"), "ws://h:1/v1/agents/connect");
        assert_eq!(ok("wss://h/?x=1"), "wss://h/v1/agents/connect?x=1");
        // A path is the user's: a proxy may mount the hub elsewhere.
        assert_eq!(ok("wss://h/ci/hub"), "wss://h/ci/hub");
        assert_eq!(
            ok("ws://h:7420/v1/agents/connect"),
            "ws://h:7420/v1/agents/connect"
        );
        let err = hub_url("ftp://h").unwrap_err();
        assert!(err.contains("ws:// or wss://"), "{err}");
        assert!(hub_url("ws://").unwrap_err().contains("no host"));
        assert!(hub_url("ws://a b:1").is_err());
        let c = Cli::try_parse_from(["warmpool", "serve", "--hub-url", "hub:7420"]).unwrap();
        let Command::Serve(s) = c.command else {
            panic!()
        };
        assert_eq!(
            s.hub_url.as_deref(),
            Some("ws://hub:7420/v1/agents/connect")
        );
    }

    /// The heartbeat default is a CPU-versus-detection trade-off measured in
    /// docs/BENCHMARKS.md (section 4); `bench agents` measures the same default.
    #[test]
    fn heartbeat_interval_defaults_to_30_seconds() {
        let thirty = std::time::Duration::from_secs(30);
        let c = Cli::try_parse_from(["warmpool", "serve"]).unwrap();
        let Command::Serve(s) = c.command else {
            panic!()
        };
        assert_eq!(s.heartbeat_interval.0, thirty);
        assert_eq!(
            crate::service::ServiceConfig::default().heartbeat_interval,
            thirty
        );
        let c = Cli::try_parse_from(["warmpool", "bench", "agents"]).unwrap();
        let Command::Bench(b) = c.command else {
            panic!()
        };
        let Some(BenchCommand::Agents(a)) = b.sub else {
            panic!()
        };
        assert_eq!(a.heartbeat_interval.0, thirty);
    }
}
