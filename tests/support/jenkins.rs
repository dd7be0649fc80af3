//! A Jenkins *double* for integration tests: a fake Jenkins controller speaking the small part of
//! the Jenkins HTTP and WebSocket surface that warmpool uses. Shapes, status codes and messages
//! follow Jenkins core (docs/JENKINS.md lists the endpoints and their sources); where the double is
//! stricter or simpler than Jenkins it says so below.
//!
//! Served (all paths relative to [`JenkinsDouble::url`], which ends with `/`):
//! - `GET  crumbIssuer/api/json`: a crumb bound to (user, `JSESSIONID.<id>` session); sets the
//!   session cookie when the request has none. 404 when [`CrumbMode::Off`].
//! - `POST computer/doCreateItem` (params `name`, `type`, `json`, from the query string and/or an
//!   `application/x-www-form-urlencoded` body, as python-jenkins `create_node` sends them):
//!   creates a permanent inbound agent (`hudson.slaves.DumbSlave` + `hudson.slaves.JNLPLauncher`),
//!   302 to `computer/`.
//! - `GET  computer/{name}/jenkins-agent.jnlp` and its old name `slave-agent.jnlp` (JNLP XML
//!   carrying the secret; `SlaveComputer.doJenkinsAgentJnlp`). Since 2.437 Jenkins logs a
//!   deprecation WARNING for every fetch of either name ([`JenkinsDouble::warnings`]); Jenkins
//!   core has no other API for the secret (`getJnlpMac` is not `@Exported`; an `agent-secret`
//!   endpoint was proposed in jenkinsci/jenkins#26017 and not merged), so the double has none.
//! - `POST computer/{name}/doDelete`: 302 to `computer/`, 404 for an unknown node.
//! - `GET  computer/api/json`, `GET computer/{name}/api/json` (`(built-in)` for the built-in
//!   node): the fields `displayName, offline, idle, numExecutors, assignedLabels[name],
//!   executors[idle, currentExecutable[url]]` and a few more, whatever `tree` says.
//! - `GET  queue/api/json`, `GET queue/item/{id}/api/json`.
//! - `GET  wsagents/` (WebSocket): checks `Node-Name`, `Secret-Key`, `X-Remoting-Capability`; the
//!   node is online while the socket is open. No HTTP auth, as in Jenkins (unprotected action).
//! - `GET  login`: 200 (agent.jar pings it before dialling `wsagents/`).
//! - `GET  api/json`, `GET job/A/job/B/api/json`, `GET job/A/job/B/config.xml`: jobs, folders
//!   and build history (`jenkins_jobs.rs`), set up with [`JenkinsDouble::add_job`] and
//!   [`JenkinsDouble::add_build`].
//!
//! Auth, as Jenkins: `Authorization: Basic` with the configured user and API token. A wrong or
//! malformed Basic header: 401 with `WWW-Authenticate: Basic realm="Jenkins"`. No header
//! (anonymous): 403 with `X-You-Are-Authenticated-As: anonymous`. A permission taken away with
//! [`JenkinsDouble::deny`]: 403 with `X-Required-Permission`. Crumbs: see [`CrumbMode`].
//!
//! Test controls: [`JenkinsDouble::enqueue`] puts a build in the queue; a dispatcher assigns
//! queue items (oldest first) to idle executors of online nodes whose labels match (Jenkins label
//! expressions, through `warmpool::labels`); [`JenkinsDouble::finish`] ends a build. Request
//! counters and timestamps per [`Endpoint`], the most WebSocket agents ever connected at once,
//! injected faults ([`Fault`]: status and/or delay), and credentials that can change mid-test.
//!
//! Where the double differs from Jenkins:
//! - `tree` and `depth` are ignored: a fixed field set is returned.
//! - Everything queued is a `BuildableItem` (no quiet period, no blocked items); dispatch is
//!   immediate and synchronous (on enqueue, agent connect, finish), oldest first, nodes in name
//!   order (Jenkins uses a consistent-hash load balancer). Builds never end on their own.
//! - Only inbound (`JNLPLauncher`) `DumbSlave`s; by default `webSocket` must be true.
//! - No remoting protocol on the agent socket: the node is online from the upgrade to the close.
//!   A second agent for a connected node gets 500 (Jenkins's status is unconfirmed).
//! - Crumbs are bound to user + session only (not the client IP). [`CrumbMode::Enforced`], the
//!   default, asks for a crumb even with an API token, which Jenkins >= 2.96 does only when the
//!   token exemption does not apply (see [`CrumbMode`]); [`CrumbMode::IssuedTokenExempt`] is
//!   Jenkins with an API token.
//! - Secrets are random 64-hex strings, not an HMAC of the node name.
//! - Deleting or disconnecting a node aborts its builds at once ([`JenkinsDouble::aborted`]).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

#[path = "jenkins_jobs.rs"]
mod jobs;

/// The crumb header and form field (`CrumbIssuer.DEFAULT_CRUMB_NAME`).
pub const CRUMB_FIELD: &str = "Jenkins-Crumb";
/// `hudson.remoting.Capability` of a current agent.jar, as sent in `X-Remoting-Capability`.
pub const REMOTING_CAPABILITY: &str =
    "rO0ABXNyABpodWRzb24ucmVtb3RpbmcuQ2FwYWJpbGl0eQAAAAAAAAABAgABSgAEbWFza3hwAAAAAAAAAf4=";
const DUMB_SLAVE_TYPES: [&str; 2] = [
    "hudson.slaves.DumbSlave",
    "hudson.slaves.DumbSlave$DescriptorImpl",
];
const JNLP_LAUNCHER: &str = "hudson.slaves.JNLPLauncher";
/// `Jenkins.checkGoodName`: characters not allowed in a node name.
const UNSAFE_CHARS: &str = "?*/\\%!@#$^&|<>[]:;";

/// How the crumb issuer behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrumbMode {
    /// No crumb issuer: `crumbIssuer/api/json` is 404 and POSTs need no crumb.
    Off,
    /// Jenkins >= 2.96 with API-token auth: crumbs are issued, but POSTs authenticated with an
    /// API token are exempt, so nothing is checked. (`jenkins.security.ApiCrumbExclusion`,
    /// JENKINS-22474: `CrumbFilter` runs every `CrumbExclusion` first, and this one passes a
    /// request `BasicHeaderApiTokenAuthenticator` authenticated.) Real Jenkins with a token.
    IssuedTokenExempt,
    /// Every POST needs `Jenkins-Crumb` (header or form field) equal to the crumb issued to the
    /// same user in the same `JSESSIONID.<id>` session; otherwise 403 "No valid crumb was
    /// included in the request" (`CrumbFilter.doFilter`). This is Jenkins when the exemption
    /// does not apply: the Basic password is the user's real password
    /// (`BasicHeaderRealPasswordAuthenticator`), a browser session, or `ApiCrumbExclusion`
    /// disabled; the strictest case for a client.
    Enforced,
}

/// Settings of a double.
#[derive(Debug, Clone)]
pub struct JenkinsConfig {
    /// The user name Basic auth must carry.
    pub user: String,
    /// The user's API token (the Basic auth password).
    pub token: String,
    /// How crumbs are issued and checked.
    pub crumb: CrumbMode,
    /// Sent as `X-Jenkins` on every answer.
    pub version: String,
    /// `Built-In Node` since Jenkins 2.307; `master` before.
    pub built_in_name: String,
    /// Executors of the built-in node (0: it never takes work).
    pub built_in_executors: u32,
    /// Reject `doCreateItem` unless `launcher.webSocket` is true (the double's strictness;
    /// Jenkins accepts either).
    pub require_websocket_launcher: bool,
    /// Serve `computer/NAME/jenkins-agent.jnlp`, the current name (Jenkins >= 2.264, where
    /// `slave-agent.jnlp` became an alias of it). False: 404 for it, as Jenkins before 2.264,
    /// which serves only `slave-agent.jnlp`.
    pub serve_jenkins_agent_jnlp: bool,
    /// Wait this long in every `wsagents/` handshake before answering (a slow controller): makes
    /// [`WsStats::max_handshaking`] meaningful.
    pub ws_handshake_delay: Duration,
}

impl Default for JenkinsConfig {
    fn default() -> Self {
        JenkinsConfig {
            user: "warmpool".into(),
            token: "11aa22bb33cc44dd55ee66ff77889900aa".into(),
            crumb: CrumbMode::Enforced,
            version: "2.479.3".into(),
            built_in_name: "Built-In Node".into(),
            built_in_executors: 0,
            require_websocket_launcher: true,
            serve_jenkins_agent_jnlp: true,
            ws_handshake_delay: Duration::ZERO,
        }
    }
}

/// What a request hit: for counters, faults and permission denials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    CrumbIssuer,
    CreateNode,
    ComputerSet,
    Computer,
    SlaveAgentJnlp,
    JenkinsAgentJnlp,
    DeleteNode,
    /// `POST computer/NAME/config.xml` (`Computer.doConfigDotXml`, updateByXml).
    ConfigXml,
    Queue,
    QueueItem,
    /// `GET api/json` (the root's jobs) and `GET job/.../api/json`.
    Jobs,
    /// `GET job/.../config.xml`.
    JobConfig,
    WsAgents,
    Login,
    Other,
}

impl Endpoint {
    pub fn classify(path: &str) -> Endpoint {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match segs.as_slice() {
            ["crumbIssuer", "api", _] => Endpoint::CrumbIssuer,
            ["computer", "doCreateItem"] => Endpoint::CreateNode,
            ["computer", "api", _] => Endpoint::ComputerSet,
            ["computer", _, "api", _] => Endpoint::Computer,
            ["computer", _, "slave-agent.jnlp"] => Endpoint::SlaveAgentJnlp,
            ["computer", _, "jenkins-agent.jnlp"] => Endpoint::JenkinsAgentJnlp,
            ["computer", _, "doDelete"] => Endpoint::DeleteNode,
            ["computer", _, "config.xml"] => Endpoint::ConfigXml,
            ["queue", "api", _] => Endpoint::Queue,
            ["queue", "item", _, "api", _] => Endpoint::QueueItem,
            ["wsagents"] => Endpoint::WsAgents,
            ["login"] => Endpoint::Login,
            ["api", _] => Endpoint::Jobs,
            ["job", .., "api", _] => Endpoint::Jobs,
            ["job", .., "config.xml"] => Endpoint::JobConfig,
            _ => Endpoint::Other,
        }
    }

    /// The permission Jenkins checks (reported in `X-Required-Permission` when denied).
    pub fn permission(self) -> &'static str {
        match self {
            Endpoint::CreateNode => "hudson.model.Computer.Create",
            Endpoint::DeleteNode => "hudson.model.Computer.Delete",
            Endpoint::ConfigXml => "hudson.model.Computer.Configure",
            Endpoint::SlaveAgentJnlp | Endpoint::JenkinsAgentJnlp => {
                "hudson.model.Computer.Connect"
            }
            Endpoint::JobConfig => "hudson.model.Item.ExtendedRead",
            _ => "hudson.model.Hudson.Read",
        }
    }

    fn protected(self) -> bool {
        !matches!(self, Endpoint::WsAgents | Endpoint::Login)
    }
}

/// An injected fault: answer `status` (if set) after `delay`, on `endpoints` (empty: every
/// endpoint but `WsAgents` and `Login`), `times` times (None: until cleared).
#[derive(Debug, Clone)]
pub struct Fault {
    pub status: Option<u16>,
    pub delay: Duration,
    pub endpoints: Vec<Endpoint>,
    pub times: Option<u32>,
}

impl Fault {
    /// Answer `code` (for example 500) instead of serving.
    pub fn status(code: u16) -> Fault {
        Fault {
            status: Some(code),
            delay: Duration::ZERO,
            endpoints: Vec::new(),
            times: None,
        }
    }
    /// Serve normally, but only after `delay`.
    pub fn slow(delay: Duration) -> Fault {
        Fault {
            status: None,
            delay,
            endpoints: Vec::new(),
            times: None,
        }
    }
    pub fn on(mut self, endpoints: &[Endpoint]) -> Fault {
        self.endpoints = endpoints.to_vec();
        self
    }
    pub fn times(mut self, n: u32) -> Fault {
        self.times = Some(n);
        self
    }
    fn applies(&self, ep: Endpoint) -> bool {
        if self.endpoints.is_empty() {
            !matches!(ep, Endpoint::WsAgents | Endpoint::Login)
        } else {
            self.endpoints.contains(&ep)
        }
    }
}

/// `NORMAL` or `EXCLUSIVE` (only jobs with a label expression).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeMode {
    Normal,
    Exclusive,
}

/// How a queued build looks in the queue API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// A freestyle job: `task` is `hudson.model.FreeStyleProject`, the build
    /// `hudson.model.FreeStyleBuild`; the build number is given when the build starts.
    Freestyle,
    /// A Pipeline `node(label) {}` block: `task` is `ExecutorStepExecution$PlaceholderTask`
    /// (`name` "part of JOB #N"), the executable `...$PlaceholderExecutable`; the run (and its
    /// number) exists before the task is queued.
    Pipeline,
}

/// A build that got (or had) an executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub queue_id: u64,
    pub job: String,
    pub number: u32,
    /// Absolute, `http://127.0.0.1:PORT/job/JOB/N/`, as `currentExecutable.url`.
    pub url: String,
    /// The node running it ("" for the built-in node).
    pub node: String,
    pub kind: TaskKind,
}

/// A snapshot of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub description: String,
    pub remote_fs: String,
    pub num_executors: u32,
    /// The `labelString` atoms (the self label, the node name, is not included).
    pub labels: Vec<String>,
    pub mode: NodeMode,
    pub web_socket: bool,
    pub secret: String,
    pub online: bool,
    /// Executors busy now.
    pub busy: u32,
    /// Builds this node has been given (started) since it was created.
    pub builds: u32,
}

/// A snapshot of a queue item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedInfo {
    pub id: u64,
    pub job: String,
    pub label: String,
    pub kind: TaskKind,
    pub why: String,
}

/// One served request.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub endpoint: Endpoint,
    pub method: String,
    pub path: String,
    /// When it arrived (before any injected delay).
    pub at: Instant,
    pub status: u16,
}

/// WebSocket agent connection counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WsStats {
    /// Sockets open now.
    pub open: usize,
    /// The most sockets ever open at once.
    pub max_open: usize,
    /// Upgrades accepted.
    pub accepted: u64,
    /// Attempts refused (missing headers, unknown node, bad secret, already connected, or not a
    /// WebSocket request).
    pub rejected: u64,
    /// `wsagents/` requests being handled now (arrived, not yet answered 101 or refused).
    pub handshaking: usize,
    /// The most `wsagents/` requests ever in progress at once. Without a handshake delay
    /// ([`JenkinsConfig::ws_handshake_delay`] or a [`Fault`] on [`Endpoint::WsAgents`]) a
    /// handshake takes microseconds, so this is mostly 1.
    pub max_handshaking: usize,
}

// ---------------------------------------------------------------------------------------------
// State

struct Conn {
    id: u64,
    cancel: CancellationToken,
}

struct Node {
    name: String,
    description: String,
    remote_fs: String,
    labels: Vec<String>,
    mode: NodeMode,
    web_socket: bool,
    secret: String,
    /// Set from the handshake until the socket ends (a second agent is refused meanwhile).
    conn: Option<Conn>,
    online: bool,
    executors: Vec<Option<Build>>,
    /// Builds started on this node.
    builds: u32,
}

impl Node {
    fn label_set(&self) -> BTreeSet<String> {
        let mut s: BTreeSet<String> = self.labels.iter().cloned().collect();
        s.insert(self.name.clone());
        s
    }
    fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            remote_fs: self.remote_fs.clone(),
            num_executors: self.executors.len() as u32,
            labels: self.labels.clone(),
            mode: self.mode,
            web_socket: self.web_socket,
            secret: self.secret.clone(),
            online: self.online,
            busy: self.executors.iter().filter(|e| e.is_some()).count() as u32,
            builds: self.builds,
        }
    }
}

struct QueueItem {
    id: u64,
    job: String,
    label: String,
    kind: TaskKind,
    /// Pipeline only: the run number, known at enqueue time.
    number: Option<u32>,
    since_ms: u64,
}

struct LeftItem {
    item: QueueItem,
    build: Option<Build>,
}

struct St {
    base: String,
    cfg: JenkinsConfig,
    cookie_name: String,
    salt: String,
    sessions: HashSet<String>,
    nodes: BTreeMap<String, Node>,
    built_in: Vec<Option<Build>>,
    queue: Vec<QueueItem>,
    left: HashMap<u64, LeftItem>,
    next_queue_id: u64,
    next_build: HashMap<String, u32>,
    denied: HashSet<Endpoint>,
    fault: Option<Fault>,
    requests: Vec<RequestRecord>,
    ws: WsStats,
    next_conn: u64,
    finished: Vec<Build>,
    aborted: Vec<Build>,
    /// Builds started per node name ("" for the built-in node), kept after a node is deleted.
    builds_by_node: BTreeMap<String, u32>,
    /// When each accepted agent socket opened.
    ws_connects: Vec<Instant>,
    /// WARNING lines Jenkins would log (see [`JenkinsDouble::warnings`]).
    warnings: Vec<String>,
    /// Jobs, folders and build history.
    jobs: jobs::Jobs,
}

#[derive(Clone)]
struct Shared(Arc<Mutex<St>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, St> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone)]
struct AuthUser(String);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    hex::encode(b)
}

fn label_matches(expr: &str, labels: &BTreeSet<String>) -> bool {
    match warmpool::labels::Expr::parse(expr) {
        Ok(e) => e.matches(labels),
        Err(_) => labels.contains(expr.trim()),
    }
}

/// `a.b.c` at least `min` (missing parts are 0; unparsable: true, a current core).
fn version_at_least(version: &str, min: (u32, u32)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>());
    match (parts.next(), parts.next().unwrap_or(Ok(0))) {
        (Some(Ok(major)), Ok(minor)) => (major, minor) >= min,
        _ => true,
    }
}

impl St {
    /// `SlaveComputer.doJenkinsAgentJnlp` since 2.437 (jenkinsci/jenkins#8773): one WARNING per
    /// JNLP file served, whichever name was asked for.
    fn jnlp_warning(&mut self, node: &str) {
        if version_at_least(&self.cfg.version, (2, 437)) {
            self.warnings.push(format!(
                "WARNING hudson.slaves.SlaveComputer#doJenkinsAgentJnlp: Agent \"{node}\" is connecting with the \"-jnlpUrl\" argument, which is deprecated. Use \"-url\" and \"-name\" instead, potentially also passing in \"-webSocket\", \"-tunnel\", and/or work directory options as needed."
            ));
        }
    }

    fn crumb_for(&self, user: &str, session: &str) -> String {
        let mut h = Sha256::new();
        h.update(format!("{user};{session}").as_bytes());
        h.update(self.salt.as_bytes());
        hex::encode(h.finalize())
    }

    fn build_url(&self, job: &str, number: u32) -> String {
        format!("{}job/{}/{}/", self.base, job, number)
    }

    fn next_number(&mut self, job: &str) -> u32 {
        let n = self.next_build.entry(job.to_string()).or_insert(0);
        *n += 1;
        *n
    }

    /// Assigns queue items, oldest first, to idle executors of online matching nodes.
    fn dispatch(&mut self) {
        let mut i = 0;
        while i < self.queue.len() {
            let label = self.queue[i].label.clone();
            let slot = self.find_executor(&label);
            let Some((node, exec)) = slot else {
                i += 1;
                continue;
            };
            let item = self.queue.remove(i);
            let number = match item.number {
                Some(n) => n,
                None => self.next_number(&item.job),
            };
            let build = Build {
                queue_id: item.id,
                job: item.job.clone(),
                number,
                url: self.build_url(&item.job, number),
                node: node.clone(),
                kind: item.kind,
            };
            match self.nodes.get_mut(&node) {
                Some(n) => {
                    n.executors[exec] = Some(build.clone());
                    n.builds += 1;
                }
                None => self.built_in[exec] = Some(build.clone()),
            }
            *self.builds_by_node.entry(node).or_insert(0) += 1;
            self.left.insert(
                item.id,
                LeftItem {
                    item,
                    build: Some(build),
                },
            );
        }
    }

    /// (node name, executor index); the built-in node is named "" here.
    fn find_executor(&self, label: &str) -> Option<(String, usize)> {
        let exclusive_ok = !label.trim().is_empty();
        for n in self.nodes.values() {
            if !n.online || (n.mode == NodeMode::Exclusive && !exclusive_ok) {
                continue;
            }
            if !label_matches(label, &n.label_set()) {
                continue;
            }
            if let Some(i) = n.executors.iter().position(|e| e.is_none()) {
                return Some((n.name.clone(), i));
            }
        }
        let built_in: BTreeSet<String> = ["built-in".to_string()].into();
        if !label_matches(label, &built_in) {
            return None;
        }
        let free = self.built_in.iter().position(|e| e.is_none());
        free.map(|i| (String::new(), i))
    }

    /// `Queue.BuildableItem.getCauseOfBlockage()` (messages as in recent Jenkins, with ‘ ’),
    /// and whether the item is `stuck` (label offline).
    fn why(&self, label: &str) -> (String, bool) {
        // `if (allNodes.isEmpty()) label = null; // no master/agent. pointless to talk about
        // nodes`: without agent nodes (the built-in is not one) the label is never named.
        if label.trim().is_empty() || self.nodes.is_empty() {
            return ("Waiting for next available executor".into(), false);
        }
        let mut matching: Vec<(&str, bool)> = self
            .nodes
            .values()
            .filter(|n| label_matches(label, &n.label_set()))
            .map(|n| (n.name.as_str(), n.online))
            .collect();
        let built_in: BTreeSet<String> = ["built-in".to_string()].into();
        if label_matches(label, &built_in) && !self.built_in.is_empty() {
            matching.push((self.cfg.built_in_name.as_str(), true));
        }
        if matching.is_empty() {
            return (format!("There are no nodes with the label ‘{label}’"), true);
        }
        if matching.iter().all(|(_, online)| !online) {
            if matching.len() == 1 {
                return (format!("‘{}’ is offline", matching[0].0), true);
            }
            return (format!("All nodes of label ‘{label}’ are offline"), true);
        }
        if matching.len() == 1 {
            return (
                format!("Waiting for next available executor on ‘{}’", matching[0].0),
                false,
            );
        }
        (
            format!("Waiting for next available executor on ‘{label}’"),
            false,
        )
    }

    /// Takes a node offline now: aborts its builds, forgets its connection (returned, so the
    /// caller can close the socket) and dispatches again.
    fn drop_conn(&mut self, name: &str) -> Option<Conn> {
        let conn = self.nodes.get_mut(name).and_then(|n| {
            n.online = false;
            n.conn.take()
        });
        self.abort_builds_on(name);
        self.dispatch();
        conn
    }

    fn abort_builds_on(&mut self, node: &str) {
        let mut gone = Vec::new();
        if let Some(n) = self.nodes.get_mut(node) {
            for e in n.executors.iter_mut() {
                if let Some(b) = e.take() {
                    gone.push(b);
                }
            }
        }
        self.aborted.extend(gone);
    }

    fn take_fault(&mut self, ep: Endpoint) -> Option<(Option<u16>, Duration)> {
        let f = self.fault.as_mut()?;
        if !f.applies(ep) {
            return None;
        }
        let out = (f.status, f.delay);
        if let Some(t) = f.times.as_mut() {
            *t = t.saturating_sub(1);
            if *t == 0 {
                self.fault = None;
            }
        }
        Some(out)
    }

    // --- JSON -----------------------------------------------------------------------------

    fn executable_json(b: &Build) -> Value {
        let class = match b.kind {
            TaskKind::Freestyle => "hudson.model.FreeStyleBuild",
            TaskKind::Pipeline => {
                "org.jenkinsci.plugins.workflow.support.steps.ExecutorStepExecution$PlaceholderTask$PlaceholderExecutable"
            }
        };
        json!({"_class": class, "number": b.number, "url": b.url})
    }

    fn executors_json(execs: &[Option<Build>]) -> Vec<Value> {
        execs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                json!({
                    "_class": "hudson.model.Executor",
                    "currentExecutable": e.as_ref().map(St::executable_json),
                    "idle": e.is_none(),
                    "likelyStuck": false,
                    "number": i,
                    "progress": if e.is_some() { 0 } else { -1 },
                })
            })
            .collect()
    }

    fn labels_json<'a>(labels: impl IntoIterator<Item = &'a String>) -> Vec<Value> {
        labels
            .into_iter()
            .map(|l| json!({"_class": "hudson.model.labels.LabelAtom", "name": l}))
            .collect()
    }

    fn built_in_json(&self) -> Value {
        let labels = ["built-in".to_string()];
        json!({
            "_class": "hudson.model.Hudson$MasterComputer",
            "assignedLabels": St::labels_json(labels.iter()),
            "description": "the Jenkins controller's built-in node",
            "displayName": self.cfg.built_in_name,
            "executors": St::executors_json(&self.built_in),
            "idle": self.built_in.iter().all(|e| e.is_none()),
            "jnlpAgent": false,
            "launchSupported": true,
            "manualLaunchAllowed": true,
            "numExecutors": self.built_in.len(),
            "offline": false,
            "offlineCause": null,
            "offlineCauseReason": "",
            "temporarilyOffline": false,
        })
    }

    fn node_json(n: &Node) -> Value {
        json!({
            "_class": "hudson.slaves.SlaveComputer",
            "assignedLabels": St::labels_json(n.label_set().iter()),
            "description": n.description,
            "displayName": n.name,
            "executors": St::executors_json(&n.executors),
            "idle": n.executors.iter().all(|e| e.is_none()),
            "jnlpAgent": true,
            "launchSupported": false,
            "manualLaunchAllowed": true,
            "numExecutors": n.executors.len(),
            "offline": !n.online,
            "offlineCause": null,
            "offlineCauseReason": "",
            "temporarilyOffline": false,
        })
    }

    fn computer_set_json(&self) -> Value {
        let mut computers = vec![self.built_in_json()];
        computers.extend(self.nodes.values().map(St::node_json));
        fn busy_of(e: &[Option<Build>]) -> usize {
            e.iter().filter(|x| x.is_some()).count()
        }
        let total = self.built_in.len()
            + self
                .nodes
                .values()
                .filter(|n| n.online)
                .map(|n| n.executors.len())
                .sum::<usize>();
        let busy = busy_of(&self.built_in)
            + self
                .nodes
                .values()
                .filter(|n| n.online)
                .map(|n| busy_of(&n.executors))
                .sum::<usize>();
        json!({
            "_class": "hudson.model.ComputerSet",
            "busyExecutors": busy,
            "computer": computers,
            "displayName": "Nodes",
            "totalExecutors": total,
        })
    }

    fn task_json(&self, item: &QueueItem) -> Value {
        match item.kind {
            // `AbstractProject.getAssignedLabelString` is `@Exported(name = "labelExpression")`
            // (null without a label); Pipeline's `PlaceholderTask` exports no label.
            TaskKind::Freestyle => json!({
                "_class": "hudson.model.FreeStyleProject",
                "labelExpression": (!item.label.trim().is_empty()).then(|| item.label.clone()),
                "name": item.job,
                "url": format!("{}job/{}/", self.base, item.job),
                "color": "notbuilt",
            }),
            TaskKind::Pipeline => {
                let n = item.number.unwrap_or(0);
                let name = format!("part of {} #{}", item.job, n);
                json!({
                    "_class": "org.jenkinsci.plugins.workflow.support.steps.ExecutorStepExecution$PlaceholderTask",
                    "fullDisplayName": name,
                    "name": name,
                    "url": format!("job/{}/{}/", item.job, n),
                })
            }
        }
    }

    fn item_common(&self, item: &QueueItem, class: &str) -> serde_json::Map<String, Value> {
        let user = self.cfg.user.clone();
        let v = json!({
            "_class": class,
            "actions": [{
                "_class": "hudson.model.CauseAction",
                "causes": [{
                    "_class": "hudson.model.Cause$UserIdCause",
                    "shortDescription": format!("Started by user {user}"),
                    "userId": user,
                    "userName": user,
                }],
            }],
            "blocked": false,
            "buildable": class.ends_with("BuildableItem"),
            "id": item.id,
            "inQueueSince": item.since_ms,
            "params": "",
            "stuck": false,
            "task": self.task_json(item),
            "url": format!("queue/item/{}/", item.id),
            "why": null,
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn queue_item_json(&self, item: &QueueItem) -> Value {
        let mut m = self.item_common(item, "hudson.model.Queue$BuildableItem");
        let (why, stuck) = self.why(&item.label);
        m.insert("stuck".into(), json!(stuck));
        m.insert("why".into(), json!(why));
        m.insert(
            "buildableStartMilliseconds".into(),
            json!(item.since_ms + 1),
        );
        m.insert("pending".into(), json!(false));
        Value::Object(m)
    }

    fn left_item_json(&self, left: &LeftItem) -> Value {
        let mut m = self.item_common(&left.item, "hudson.model.Queue$LeftItem");
        m.insert("cancelled".into(), json!(left.build.is_none()));
        m.insert(
            "executable".into(),
            left.build
                .as_ref()
                .map(St::executable_json)
                .unwrap_or(Value::Null),
        );
        Value::Object(m)
    }

    fn queue_json(&self) -> Value {
        // Queue.getItems(): buildables newest first (reverse(buildables)).
        let items: Vec<Value> = self
            .queue
            .iter()
            .rev()
            .map(|i| self.queue_item_json(i))
            .collect();
        json!({"_class": "hudson.model.Queue", "discoverableItems": [], "items": items})
    }
}

// ---------------------------------------------------------------------------------------------
// The handle

/// A running Jenkins double. Cheap to clone; every clone controls the same server.
#[derive(Clone)]
pub struct JenkinsDouble {
    shared: Shared,
    url: String,
    stop: CancellationToken,
}

impl JenkinsDouble {
    /// Binds 127.0.0.1:0 and serves until [`JenkinsDouble::shutdown`] (or the runtime ends).
    pub async fn start(cfg: JenkinsConfig) -> JenkinsDouble {
        Self::start_on(cfg, None).await
    }

    /// As [`JenkinsDouble::start`], over TLS (`https://`, `wss://`) with `tls`, served by
    /// warmpool's own [`warmpool::tls::TlsListener`].
    pub async fn start_tls(cfg: JenkinsConfig, tls: Arc<rustls::ServerConfig>) -> JenkinsDouble {
        Self::start_on(cfg, Some(tls)).await
    }

    async fn start_on(cfg: JenkinsConfig, tls: Option<Arc<rustls::ServerConfig>>) -> JenkinsDouble {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{addr}/");
        let built_in = vec![None; cfg.built_in_executors as usize];
        let shared = Shared(Arc::new(Mutex::new(St {
            base: url.clone(),
            cfg,
            cookie_name: format!("JSESSIONID.{}", random_hex(4)),
            salt: random_hex(16),
            sessions: HashSet::new(),
            nodes: BTreeMap::new(),
            built_in,
            queue: Vec::new(),
            left: HashMap::new(),
            next_queue_id: 0,
            next_build: HashMap::new(),
            denied: HashSet::new(),
            fault: None,
            requests: Vec::new(),
            ws: WsStats::default(),
            next_conn: 0,
            finished: Vec::new(),
            aborted: Vec::new(),
            builds_by_node: BTreeMap::new(),
            ws_connects: Vec::new(),
            warnings: Vec::new(),
            jobs: jobs::Jobs::default(),
        })));
        let app = Router::new()
            .route("/crumbIssuer/api/json", get(crumb_issuer))
            .route("/computer/doCreateItem", post(create_node))
            .route("/computer/api/json", get(computer_set))
            .route("/computer/{name}/api/json", get(computer_one))
            .route("/computer/{name}/slave-agent.jnlp", get(slave_agent_jnlp))
            .route(
                "/computer/{name}/jenkins-agent.jnlp",
                get(jenkins_agent_jnlp),
            )
            .route("/computer/{name}/doDelete", post(delete_node))
            .route("/computer/{name}/config.xml", post(config_xml))
            .route("/queue/api/json", get(queue_api))
            .route("/queue/item/{id}/api/json", get(queue_item))
            .route("/wsagents", get(wsagents))
            .route("/wsagents/", get(wsagents))
            .route("/login", get(login))
            .route("/api/json", get(root_api))
            .route("/job/{*rest}", get(job_any))
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(shared.clone(), gate))
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let shutdown = async move { s.cancelled().await };
            let _ = match tls {
                None => {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(shutdown)
                        .await
                }
                Some(tls) => {
                    let l = warmpool::tls::TlsListener::new(
                        listener,
                        tls,
                        warmpool::tls::HANDSHAKE_TIMEOUT,
                    )
                    .unwrap();
                    axum::serve(l, app).with_graceful_shutdown(shutdown).await
                }
            };
        });
        JenkinsDouble { shared, url, stop }
    }

    /// `http://127.0.0.1:PORT/` or `https://...` (with the trailing slash, as a Jenkins root
    /// URL).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `ws://127.0.0.1:PORT/wsagents/`.
    pub fn ws_url(&self) -> String {
        format!("ws{}wsagents/", self.url.trim_start_matches("http"))
    }

    /// Stops serving and closes every agent socket.
    pub fn shutdown(&self) {
        let st = self.shared.lock();
        for n in st.nodes.values() {
            if let Some(c) = &n.conn {
                c.cancel.cancel();
            }
        }
        self.stop.cancel();
    }

    // --- credentials, crumbs, permissions, faults ----------------------------------------

    pub fn set_credentials(&self, user: &str, token: &str) {
        let mut st = self.shared.lock();
        st.cfg.user = user.into();
        st.cfg.token = token.into();
    }

    pub fn credentials(&self) -> (String, String) {
        let st = self.shared.lock();
        (st.cfg.user.clone(), st.cfg.token.clone())
    }

    pub fn set_crumb_mode(&self, mode: CrumbMode) {
        self.shared.lock().cfg.crumb = mode;
    }

    /// Forgets every web session (as a controller restart does): crumbs issued so far stop
    /// validating.
    pub fn expire_sessions(&self) {
        self.shared.lock().sessions.clear();
    }

    /// The session cookie name, `JSESSIONID.<8 hex>`.
    pub fn cookie_name(&self) -> String {
        self.shared.lock().cookie_name.clone()
    }

    /// Takes away the permission an endpoint needs: 403 for it from now on.
    pub fn deny(&self, ep: Endpoint) {
        self.shared.lock().denied.insert(ep);
    }

    pub fn allow_all(&self) {
        self.shared.lock().denied.clear();
    }

    pub fn set_fault(&self, fault: Fault) {
        self.shared.lock().fault = Some(fault);
    }

    pub fn clear_fault(&self) {
        self.shared.lock().fault = None;
    }

    // --- nodes ----------------------------------------------------------------------------

    /// Adds a node directly (not through the API, not counted): for nodes warmpool did not
    /// create. Returns its secret.
    pub fn add_node(&self, name: &str, labels: &str, executors: u32) -> String {
        let secret = random_hex(32);
        let mut st = self.shared.lock();
        st.nodes.insert(
            name.to_string(),
            Node {
                name: name.to_string(),
                description: String::new(),
                remote_fs: "/home/jenkins/agent".into(),
                labels: labels.split_whitespace().map(str::to_string).collect(),
                mode: NodeMode::Normal,
                web_socket: true,
                secret: secret.clone(),
                conn: None,
                online: false,
                executors: vec![None; executors as usize],
                builds: 0,
            },
        );
        secret
    }

    /// Adds a job (`folder/name` nests it in folders) with an optional label expression.
    pub fn add_job(&self, full_name: &str, label: Option<&str>) {
        self.shared.lock().jobs.add_job(full_name, label);
    }

    /// Adds a finished build to a job (`duration_ms` 0: still building); returns its number.
    pub fn add_build(&self, full_name: &str, timestamp_ms: u64, duration_ms: u64) -> u32 {
        self.shared
            .lock()
            .jobs
            .add_build(full_name, timestamp_ms, duration_ms)
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.shared.lock().nodes.values().map(Node::info).collect()
    }

    /// Online nodes whose name starts with `prefix`.
    pub fn online_with_prefix(&self, prefix: &str) -> usize {
        self.shared
            .lock()
            .nodes
            .values()
            .filter(|n| n.name.starts_with(prefix) && n.online)
            .count()
    }

    pub fn node(&self, name: &str) -> Option<NodeInfo> {
        self.shared.lock().nodes.get(name).map(Node::info)
    }

    pub fn secret(&self, name: &str) -> Option<String> {
        self.shared.lock().nodes.get(name).map(|n| n.secret.clone())
    }

    pub fn is_online(&self, name: &str) -> bool {
        self.shared.lock().nodes.get(name).is_some_and(|n| n.online)
    }

    pub fn online_count(&self) -> usize {
        self.shared
            .lock()
            .nodes
            .values()
            .filter(|n| n.online)
            .count()
    }

    /// Closes a node's agent socket from the controller side (the agent sees a close frame).
    /// The node is offline when this returns (its builds aborted); false if it had no agent.
    pub fn disconnect(&self, name: &str) -> bool {
        let mut st = self.shared.lock();
        match st.drop_conn(name) {
            Some(c) => {
                c.cancel.cancel();
                true
            }
            None => false,
        }
    }

    // --- queue and builds -----------------------------------------------------------------

    /// Queues a freestyle build of job `x` needing `label`; returns the queue id.
    pub fn enqueue(&self, label: &str) -> u64 {
        self.enqueue_job("x", label, TaskKind::Freestyle)
    }

    pub fn enqueue_job(&self, job: &str, label: &str, kind: TaskKind) -> u64 {
        let mut st = self.shared.lock();
        st.next_queue_id += 1;
        let id = st.next_queue_id;
        let number = match kind {
            TaskKind::Pipeline => Some(st.next_number(job)),
            TaskKind::Freestyle => None,
        };
        st.queue.push(QueueItem {
            id,
            job: job.to_string(),
            label: label.to_string(),
            kind,
            number,
            since_ms: now_ms(),
        });
        st.dispatch();
        id
    }

    /// Cancels a queued item (it becomes a cancelled `LeftItem`).
    pub fn cancel(&self, id: u64) -> bool {
        let mut st = self.shared.lock();
        let Some(pos) = st.queue.iter().position(|i| i.id == id) else {
            return false;
        };
        let item = st.queue.remove(pos);
        st.left.insert(id, LeftItem { item, build: None });
        true
    }

    pub fn queue(&self) -> Vec<QueuedInfo> {
        let st = self.shared.lock();
        st.queue
            .iter()
            .map(|i| QueuedInfo {
                id: i.id,
                job: i.job.clone(),
                label: i.label.clone(),
                kind: i.kind,
                why: st.why(&i.label).0,
            })
            .collect()
    }

    /// The build a queue item became, once it got an executor.
    pub fn build_of(&self, queue_id: u64) -> Option<Build> {
        self.shared
            .lock()
            .left
            .get(&queue_id)
            .and_then(|l| l.build.clone())
    }

    /// Builds holding an executor now.
    pub fn running(&self) -> Vec<Build> {
        let st = self.shared.lock();
        let mut out: Vec<Build> = st.built_in.iter().flatten().cloned().collect();
        for n in st.nodes.values() {
            out.extend(n.executors.iter().flatten().cloned());
        }
        out
    }

    /// Ends a running build (by its absolute URL); its executor becomes idle and the queue is
    /// dispatched again. False if no running build has that URL.
    pub fn finish(&self, build_url: &str) -> bool {
        let mut st = self.shared.lock();
        let mut done = None;
        for e in st.built_in.iter_mut() {
            if e.as_ref().is_some_and(|b| b.url == build_url) {
                done = e.take();
            }
        }
        for n in st.nodes.values_mut() {
            for e in n.executors.iter_mut() {
                if e.as_ref().is_some_and(|b| b.url == build_url) {
                    done = e.take();
                }
            }
        }
        match done {
            Some(b) => {
                st.finished.push(b);
                st.dispatch();
                true
            }
            None => false,
        }
    }

    pub fn finished(&self) -> Vec<Build> {
        self.shared.lock().finished.clone()
    }

    /// Builds cut short because their node went offline or was deleted.
    pub fn aborted(&self) -> Vec<Build> {
        self.shared.lock().aborted.clone()
    }

    // --- observations ---------------------------------------------------------------------

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    pub fn request_count(&self, ep: Endpoint) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.endpoint == ep)
            .count()
    }

    /// Requests to `ep` answered 403 (a crumb or a permission refused).
    pub fn refused(&self, ep: Endpoint) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.endpoint == ep && r.status == 403)
            .count()
    }

    pub fn request_times(&self, ep: Endpoint) -> Vec<Instant> {
        let st = self.shared.lock();
        st.requests
            .iter()
            .filter(|r| r.endpoint == ep)
            .map(|r| r.at)
            .collect()
    }

    /// The most requests to `ep` that arrived within any sliding `window`: checks a rate limit.
    pub fn max_in_window(&self, ep: Endpoint, window: Duration) -> usize {
        let mut t = self.request_times(ep);
        t.sort();
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..t.len() {
            while t[hi].duration_since(t[lo]) >= window {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    /// The WARNING lines Jenkins would have logged, in order (today: the JNLP file's
    /// deprecation warning, see [`St::jnlp_warning`]).
    pub fn warnings(&self) -> Vec<String> {
        self.shared.lock().warnings.clone()
    }

    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Agent WebSocket counters, including the most sockets open at once.
    pub fn ws_stats(&self) -> WsStats {
        self.shared.lock().ws
    }

    /// When each accepted agent socket opened, in order.
    pub fn ws_connect_times(&self) -> Vec<Instant> {
        self.shared.lock().ws_connects.clone()
    }

    /// Builds started per node name ("" for the built-in node), deleted nodes included.
    pub fn builds_by_node(&self) -> BTreeMap<String, u32> {
        self.shared.lock().builds_by_node.clone()
    }

    /// Polls `cond` every 10 ms until it holds (true) or `timeout` passes (false).
    pub async fn wait_for(&self, timeout: Duration, cond: impl Fn(&JenkinsDouble) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Middleware: record, faults, auth, crumbs, permissions

async fn gate(State(sh): State<Shared>, req: Request, next: Next) -> Response {
    let at = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let ep = Endpoint::classify(&path);
    let _handshake = (ep == Endpoint::WsAgents).then(|| Handshaking::begin(&sh));
    let fault = sh.lock().take_fault(ep);
    let resp = match fault {
        Some((status, delay)) => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            status.map(|code| error_page(code, "injected fault"))
        }
        None => None,
    };
    let mut resp = match resp {
        Some(r) => r,
        None => match admit(&sh, ep, req).await {
            Ok(req) => next.run(req).await,
            Err(r) => r,
        },
    };
    let mut st = sh.lock();
    if let Ok(v) = HeaderValue::from_str(&st.cfg.version) {
        resp.headers_mut().insert("x-jenkins", v);
    }
    st.requests.push(RequestRecord {
        endpoint: ep,
        method,
        path,
        at,
        status: resp.status().as_u16(),
    });
    resp
}

/// Counts a `wsagents/` request as in progress until it is answered (or its client goes away).
struct Handshaking(Shared);

impl Handshaking {
    fn begin(sh: &Shared) -> Handshaking {
        let mut st = sh.lock();
        st.ws.handshaking += 1;
        st.ws.max_handshaking = st.ws.max_handshaking.max(st.ws.handshaking);
        Handshaking(sh.clone())
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.ws.handshaking = st.ws.handshaking.saturating_sub(1);
    }
}

/// Authentication filter, then `CrumbFilter`, then the permission check, in Jenkins's order.
async fn admit(sh: &Shared, ep: Endpoint, mut req: Request) -> Result<Request, Response> {
    if !ep.protected() {
        return Ok(req);
    }
    let (user, token, mode, cookie_name) = {
        let st = sh.lock();
        (
            st.cfg.user.clone(),
            st.cfg.token.clone(),
            st.cfg.crumb,
            st.cookie_name.clone(),
        )
    };
    let auth = match req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(v) if v.len() >= 6 && v[..6].eq_ignore_ascii_case("basic ") => {
            match parse_basic(&v[6..]) {
                Some((u, t)) if u == user && t == token => Some(u),
                _ => return Err(unauthorized()),
            }
        }
        _ => None, // no (Basic) credentials: anonymous
    };
    if req.method() == Method::POST && mode == CrumbMode::Enforced {
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20)
            .await
            .map_err(|_| error_page(400, "request body too large"))?;
        let mut crumb = parts
            .headers
            .get(CRUMB_FIELD)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if crumb.is_none() {
            let mut params = parse_urlencoded(parts.uri.query().unwrap_or(""));
            if is_form(&parts.headers) {
                params.extend(parse_urlencoded(&String::from_utf8_lossy(&bytes)));
            }
            crumb = params
                .into_iter()
                .find(|(k, _)| k == CRUMB_FIELD)
                .map(|(_, v)| v);
        }
        let session = cookie(&parts.headers, &cookie_name);
        let who = auth.clone().unwrap_or_else(|| "anonymous".into());
        let ok = match (crumb, session) {
            (Some(c), Some(sid)) => {
                let st = sh.lock();
                st.sessions.contains(&sid) && c == st.crumb_for(&who, &sid)
            }
            _ => false,
        };
        if !ok {
            return Err(error_page(
                403,
                "No valid crumb was included in the request",
            ));
        }
        req = Request::from_parts(parts, Body::from(bytes));
    }
    let Some(user) = auth else {
        return Err(access_denied("anonymous", ep));
    };
    if sh.lock().denied.contains(&ep) {
        return Err(access_denied(&user, ep));
    }
    req.extensions_mut().insert(AuthUser(user));
    Ok(req)
}

fn unauthorized() -> Response {
    let mut r = error_page(401, "Unauthorized");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"Jenkins\""),
    );
    r
}

/// `AccessDeniedException2.reportAsHeaders` plus the body of the "Authentication required" page.
fn access_denied(user: &str, ep: Endpoint) -> Response {
    let body = if user == "anonymous" {
        format!(
            "<html><head><meta http-equiv='refresh' content='1;url=/login'/></head><body>\n\nAuthentication required\n<!--\nYou are authenticated as: anonymous\nPermission you need to have (but didn't): {}\n-->\n</body></html>",
            ep.permission()
        )
    } else {
        format!("{user} is missing the {} permission", ep.permission())
    };
    let mut r = (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/html;charset=utf-8")],
        body,
    )
        .into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(user) {
        h.insert("x-you-are-authenticated-as", v);
    }
    h.insert(
        "x-required-permission",
        HeaderValue::from_static(ep.permission()),
    );
    h.insert(
        "x-permission-implied-by",
        HeaderValue::from_static("hudson.model.Hudson.Administer"),
    );
    r
}

/// Jetty's `sendError` page.
fn error_page(code: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = format!(
        "<html><head><title>Error {code} {message}</title></head><body><h2>HTTP ERROR {code} {message}</h2></body></html>"
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html;charset=iso-8859-1")],
        body,
    )
        .into_response()
}

/// `hudson.model.Failure` rendered by `AbstractModelObject/error.jelly`: 400 and `X-Error`.
fn failure(message: &str) -> Response {
    let body = format!("<html><body><h1>Error</h1><p>{message}</p></body></html>");
    let mut r = (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "text/html;charset=utf-8")],
        body,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_bytes(message.as_bytes()) {
        r.headers_mut().insert("x-error", v);
    }
    r
}

fn redirect(location: String) -> Response {
    let mut r = StatusCode::FOUND.into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn json_response(v: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json;charset=utf-8")],
        v.to_string(),
    )
        .into_response()
}

fn not_found_page() -> Response {
    error_page(404, "Not Found")
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn not_found() -> Response {
    not_found_page()
}

async fn root_api(State(sh): State<Shared>) -> Response {
    let st = sh.lock();
    json_response(st.jobs.root_json(&st.base))
}

/// `job/A/job/B/api/json` and `job/A/job/B/config.xml`.
async fn job_any(State(sh): State<Shared>, uri: axum::http::Uri) -> Response {
    let st = sh.lock();
    let Some((full, rest)) = jobs::split_job_path(uri.path()) else {
        return not_found_page();
    };
    match rest.as_str() {
        "api/json" => match st.jobs.job_json(&st.base, &full) {
            Some(v) => json_response(v),
            None => not_found_page(),
        },
        "config.xml" => match st.jobs.config_xml(&full) {
            Some(x) => ([(header::CONTENT_TYPE, "application/xml")], x).into_response(),
            None => not_found_page(),
        },
        _ => not_found_page(),
    }
}

async fn login() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html;charset=utf-8")],
        "<html><head><title>Sign in [Jenkins]</title></head><body></body></html>",
    )
        .into_response()
}

async fn crumb_issuer(
    State(sh): State<Shared>,
    Extension(AuthUser(user)): Extension<AuthUser>,
    headers: HeaderMap,
) -> Response {
    let mut st = sh.lock();
    if st.cfg.crumb == CrumbMode::Off {
        return not_found_page();
    }
    let known = cookie(&headers, &st.cookie_name).filter(|id| st.sessions.contains(id));
    let (sid, fresh) = match known {
        Some(id) => (id, false),
        None => {
            let id = format!("node0{}", random_hex(12));
            st.sessions.insert(id.clone());
            (id, true)
        }
    };
    let crumb = st.crumb_for(&user, &sid);
    let mut r = json_response(json!({
        "_class": "hudson.security.csrf.DefaultCrumbIssuer",
        "crumb": crumb,
        "crumbRequestField": CRUMB_FIELD,
    }));
    if fresh {
        let c = format!("{}={}; Path=/; HttpOnly", st.cookie_name, sid);
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    r
}

async fn create_node(
    State(sh): State<Shared>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut params = parse_urlencoded(query.as_deref().unwrap_or(""));
    if is_form(&headers) {
        params.extend(parse_urlencoded(&String::from_utf8_lossy(&body)));
    }
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    // ComputerSet.doDoCreateItem: checkName, then the descriptor, then the submitted form.
    let Some(name) = param("name")
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
    else {
        return failure("Query parameter 'name' is required");
    };
    if let Some(c) = name.chars().find(|c| UNSAFE_CHARS.contains(*c)) {
        return failure(&format!("‘{c}’ is an unsafe character"));
    }
    let mut st = sh.lock();
    if st.nodes.contains_key(&name) {
        return failure(&format!("Agent called ‘{name}’ already exists"));
    }
    let ty = param("type").unwrap_or_default();
    if !DUMB_SLAVE_TYPES.contains(&ty.as_str()) {
        // NodeDescriptor.all().find(type) is null: a NullPointerException in Jenkins.
        return error_page(500, "java.lang.NullPointerException");
    }
    let Some(Ok(form)) = param("json").map(|j| serde_json::from_str::<Value>(&j)) else {
        return failure("This page expects a form submission");
    };
    let launcher = &form["launcher"];
    let class = launcher["stapler-class"]
        .as_str()
        .or(launcher["$class"].as_str());
    if class != Some(JNLP_LAUNCHER) {
        return failure("double: only hudson.slaves.JNLPLauncher (inbound) agents are supported");
    }
    let web_socket = as_bool(&launcher["webSocket"]);
    if st.cfg.require_websocket_launcher && !web_socket {
        return failure("double: launcher.webSocket must be true");
    }
    let executors = match &form["numExecutors"] {
        Value::Null => 1,
        v => as_i64(v).unwrap_or(0),
    };
    if executors < 1 {
        return failure(&format!(
            "Invalid agent configuration for {name}. Invalid # of executors."
        ));
    }
    let mode = match form["mode"].as_str().unwrap_or("NORMAL") {
        "NORMAL" => NodeMode::Normal,
        "EXCLUSIVE" => NodeMode::Exclusive,
        other => return failure(&format!("No enum constant hudson.model.Node.Mode.{other}")),
    };
    let labels = form["labelString"].as_str().unwrap_or("");
    let node = Node {
        name: name.clone(),
        description: form["nodeDescription"].as_str().unwrap_or("").to_string(),
        remote_fs: form["remoteFS"].as_str().unwrap_or("").to_string(),
        labels: labels.split_whitespace().map(str::to_string).collect(),
        mode,
        web_socket,
        secret: random_hex(32),
        conn: None,
        online: false,
        executors: vec![None; executors as usize],
        builds: 0,
    };
    st.nodes.insert(name, node);
    redirect(format!("{}computer/", st.base))
}

async fn delete_node(State(sh): State<Shared>, Path(name): Path<String>) -> Response {
    let mut st = sh.lock();
    if !st.nodes.contains_key(&name) {
        return not_found_page();
    }
    // Computer.doDoDelete: the node goes, its channel is closed.
    if let Some(c) = st.drop_conn(&name) {
        c.cancel.cancel();
    }
    st.nodes.remove(&name);
    st.dispatch();
    redirect(format!("{}computer/", st.base))
}

/// `Computer.doConfigDotXml` (POST, Computer/Configure): `updateByXml` replaces the node's
/// configuration; the double applies `<label>` and `<description>` (what warmpool changes) and
/// keeps the channel and running builds, as replacing a node of the same type does.
async fn config_xml(State(sh): State<Shared>, Path(name): Path<String>, body: Bytes) -> Response {
    let text = String::from_utf8_lossy(&body).to_string();
    let tag = |t: &str| -> Option<String> {
        let open = format!("<{t}>");
        let i = text.find(&open)? + open.len();
        let j = text[i..].find(&format!("</{t}>"))? + i;
        Some(text[i..j].to_string())
    };
    let mut st = sh.lock();
    if !st.nodes.contains_key(&name) {
        return not_found_page();
    }
    if tag("name").as_deref() != Some(name.as_str()) {
        return (StatusCode::BAD_REQUEST, "the node name cannot change").into_response();
    }
    let labels = if text.contains("<label/>") {
        String::new()
    } else {
        tag("label").unwrap_or_default()
    };
    let description = tag("description")
        .map(|d| xml_unescape(&d))
        .unwrap_or_default();
    if let Some(n) = st.nodes.get_mut(&name) {
        n.labels = labels.split_whitespace().map(str::to_string).collect();
        n.description = description;
    }
    st.dispatch();
    StatusCode::OK.into_response()
}

async fn computer_set(State(sh): State<Shared>) -> Response {
    json_response(sh.lock().computer_set_json())
}

async fn computer_one(State(sh): State<Shared>, Path(name): Path<String>) -> Response {
    let st = sh.lock();
    if name == "(built-in)" || name == "(master)" {
        return json_response(st.built_in_json());
    }
    match st.nodes.get(&name) {
        Some(n) => json_response(St::node_json(n)),
        None => not_found_page(),
    }
}

fn jnlp_args(st: &St, n: &Node) -> String {
    let mut args = vec![n.secret.clone(), n.name.clone()];
    if n.web_socket {
        args.push("-webSocket".into());
    }
    // RemotingWorkDirSettings.getEnabledDefaults(): -workDir <remoteFS> -internalDir remoting
    args.extend([
        "-workDir".into(),
        n.remote_fs.clone(),
        "-internalDir".into(),
        "remoting".into(),
    ]);
    args.extend(["-url".into(), st.base.clone()]);
    args.iter()
        .map(|a| format!("<argument>{}</argument>", xml_escape(a)))
        .collect()
}

fn jnlp_response(xml: String) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-java-jnlp-file")],
        xml,
    )
        .into_response()
}

/// `slave-agent.jnlp`: before 2.264 its own view (`slave-agent.jnlp.jelly`, a full JNLP file);
/// since 2.264 (commit 27a71f98) `doSlaveAgentJnlp` returns `doJenkinsAgentJnlp`, the same body
/// and the same deprecation WARNING.
async fn slave_agent_jnlp(State(sh): State<Shared>, Path(name): Path<String>) -> Response {
    let mut st = sh.lock();
    if st.cfg.serve_jenkins_agent_jnlp {
        return jenkins_agent_jnlp_file(&mut st, &name);
    }
    let Some(n) = st.nodes.get(&name) else {
        return not_found_page();
    };
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><jnlp codebase=\"{base}computer/{name}/\" spec=\"1.0+\"><information><title>Agent for {name}</title><vendor>Jenkins project</vendor><homepage href=\"https://jenkins-ci.org/\"/></information><security><all-permissions/></security><resources><j2se version=\"1.8+\"/><jar href=\"{base}jnlpJars/remoting.jar\"/></resources><application-desc main-class=\"hudson.remoting.jnlp.Main\">{args}</application-desc></jnlp>",
        base = st.base,
        name = xml_escape(&n.name),
        args = jnlp_args(&st, n),
    );
    let name = n.name.clone();
    st.jnlp_warning(&name);
    jnlp_response(xml)
}

/// `SlaveComputer.doJenkinsAgentJnlp` (`jenkins-agent.jnlp.jelly`: only
/// `<jnlp><application-desc>` with the arguments), 404 before 2.264.
async fn jenkins_agent_jnlp(State(sh): State<Shared>, Path(name): Path<String>) -> Response {
    let mut st = sh.lock();
    if !st.cfg.serve_jenkins_agent_jnlp {
        return not_found_page();
    }
    jenkins_agent_jnlp_file(&mut st, &name)
}

fn jenkins_agent_jnlp_file(st: &mut St, name: &str) -> Response {
    let Some(n) = st.nodes.get(name) else {
        return not_found_page();
    };
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><jnlp><application-desc>{}</application-desc></jnlp>",
        jnlp_args(st, n)
    );
    st.jnlp_warning(name);
    jnlp_response(xml)
}

async fn queue_api(State(sh): State<Shared>) -> Response {
    json_response(sh.lock().queue_json())
}

async fn queue_item(State(sh): State<Shared>, Path(id): Path<String>) -> Response {
    let st = sh.lock();
    let Ok(id) = id.parse::<u64>() else {
        return not_found_page();
    };
    if let Some(item) = st.queue.iter().find(|i| i.id == id) {
        return json_response(st.queue_item_json(item));
    }
    match st.left.get(&id) {
        Some(left) => json_response(st.left_item_json(left)),
        None => not_found_page(),
    }
}

/// `jenkins.agents.WebSocketAgents.doIndex`.
async fn wsagents(
    State(sh): State<Shared>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let delay = sh.lock().cfg.ws_handshake_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (Some(name), Some(secret), Some(_capability)) =
        (h("Node-Name"), h("Secret-Key"), h("X-Remoting-Capability"))
    else {
        sh.lock().ws.rejected += 1;
        return error_page(
            400,
            "This endpoint is only for use from agent.jar in WebSocket mode",
        );
    };
    // Check and reserve under one lock, so two agents cannot both get the node.
    let reserved = {
        let mut st = sh.lock();
        let refusal = match st.nodes.get(&name) {
            None => Some(error_page(400, "no such agent")),
            Some(n) if n.secret != secret => Some(error_page(403, "Forbidden")),
            // DefaultJnlpAgentReceiver refuses a second connection (HTTP status not confirmed).
            Some(n) if n.conn.is_some() => Some(error_page(
                500,
                &format!(
                    "{name} is already connected to this controller. Rejecting this connection."
                ),
            )),
            Some(_) => None,
        };
        if refusal.is_some() || ws.is_err() {
            st.ws.rejected += 1;
            refusal.map(Err)
        } else {
            st.next_conn += 1;
            let id = st.next_conn;
            let cancel = CancellationToken::new();
            if let Some(n) = st.nodes.get_mut(&name) {
                n.conn = Some(Conn {
                    id,
                    cancel: cancel.clone(),
                });
            }
            st.ws.accepted += 1;
            Some(Ok((id, cancel)))
        }
    };
    let (ws, id, cancel) = match (ws, reserved) {
        (_, Some(Err(refusal))) => return refusal,
        (Err(rejection), _) => return rejection.into_response(),
        (Ok(ws), Some(Ok((id, cancel)))) => (ws, id, cancel),
        (Ok(_), None) => return error_page(500, "unreachable"),
    };
    let (sh2, name2) = (sh.clone(), name.clone());
    let mut resp = ws
        .on_failed_upgrade(move |_| release(&sh, &name, id))
        .on_upgrade(move |socket| agent_session(socket, sh2, name2, id, cancel));
    let hs = resp.headers_mut();
    hs.insert(
        "x-remoting-capability",
        HeaderValue::from_static(REMOTING_CAPABILITY),
    );
    hs.insert(
        "x-remoting-minimum-version",
        HeaderValue::from_static("3107.v665000b_51092"),
    );
    if let Ok(v) = HeaderValue::from_str(&random_hex(16)) {
        hs.insert(HeaderName::from_static("connection-cookie"), v);
    }
    resp
}

/// Frees a reservation whose upgrade failed.
fn release(sh: &Shared, name: &str, id: u64) {
    let mut st = sh.lock();
    let mine = st.nodes.get_mut(name);
    if let Some(n) = mine.filter(|n| n.conn.as_ref().is_some_and(|c| c.id == id)) {
        n.conn = None;
        n.online = false;
    }
}

/// The node is online while this runs. The double does not speak the remoting protocol: it
/// reads (and drops) whatever the agent sends until the agent closes, the node is deleted, or
/// [`JenkinsDouble::disconnect`] is called.
async fn agent_session(
    mut socket: WebSocket,
    sh: Shared,
    name: String,
    id: u64,
    cancel: CancellationToken,
) {
    {
        let mut st = sh.lock();
        st.ws.open += 1;
        st.ws.max_open = st.ws.max_open.max(st.ws.open);
        st.ws_connects.push(Instant::now());
        let mine = st.nodes.get_mut(&name);
        if let Some(n) = mine.filter(|n| n.conn.as_ref().is_some_and(|c| c.id == id)) {
            n.online = true;
        }
        st.dispatch();
    }
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                break;
            }
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let mut st = sh.lock();
    st.ws.open = st.ws.open.saturating_sub(1);
    // Still this socket's node (not deleted or disconnected meanwhile): it goes offline.
    let mine = st
        .nodes
        .get(&name)
        .is_some_and(|n| n.conn.as_ref().is_some_and(|c| c.id == id));
    if mine {
        st.drop_conn(&name);
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny in-process inbound agent (the real one is agent.jar; `warmpool::jenkins::fake_agent` is
// the process-level stand-in for the jenkins/inbound-agent image)

/// Dials `wsagents/` with the agent headers and stays connected until closed or dropped.
pub struct FakeAgent {
    cancel: CancellationToken,
    connected: Arc<AtomicBool>,
}

impl FakeAgent {
    /// `jenkins_url` as in `JENKINS_URL` (`http://host:port/`, trailing slash optional).
    /// Err carries the HTTP status when the handshake is refused.
    pub async fn connect(jenkins_url: &str, name: &str, secret: &str) -> Result<FakeAgent, String> {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

        let base = if jenkins_url.ends_with('/') {
            jenkins_url.to_string()
        } else {
            format!("{jenkins_url}/")
        };
        // remoting's WebSocketConnector: url.replaceFirst("^http", "ws") + "wsagents/"
        let ws_url = format!("ws{}wsagents/", base.strip_prefix("http").unwrap_or(&base));
        let mut req = ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let hs = req.headers_mut();
        for (k, v) in [
            ("Node-Name", name),
            ("Secret-Key", secret),
            ("X-Remoting-Capability", REMOTING_CAPABILITY),
        ] {
            hs.insert(
                k,
                v.parse().map_err(|_| format!("bad header value for {k}"))?,
            );
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| match e {
                WsError::Http(resp) => format!("HTTP {}", resp.status().as_u16()),
                other => other.to_string(),
            })?;
        let cancel = CancellationToken::new();
        let connected = Arc::new(AtomicBool::new(true));
        let (c, flag) = (cancel.clone(), connected.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = c.cancelled() => {
                        let _ = ws.send(WsMessage::Close(None)).await;
                        break;
                    }
                    msg = ws.next() => match msg {
                        None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => break,
                        Some(Ok(_)) => {}
                    },
                }
            }
            flag.store(false, Ordering::SeqCst);
        });
        Ok(FakeAgent { cancel, connected })
    }

    /// False once the controller closed the socket (or it broke).
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    pub fn close(&self) {
        self.cancel.cancel();
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// Small parsers (base64 is not a dependency)

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn as_bool(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::String(s) => s == "true" || s == "on",
        _ => false,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `user:token` from the base64 part of a Basic header.
fn parse_basic(b64: &str) -> Option<(String, String)> {
    let raw = base64_decode(b64.trim())?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// Standard alphabet, padding optional.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = s.trim_end_matches('=').as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        out.push((acc >> 16) as u8);
        if chunk.len() > 2 {
            out.push((acc >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(acc as u8);
        }
    }
    Some(out)
}

/// `application/x-www-form-urlencoded` (also query strings).
pub fn parse_urlencoded(s: &str) -> Vec<(String, String)> {
    fn hexval(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => match (hexval(b[i + 1]), hexval(b[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                },
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    s.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(kv), String::new()),
        })
        .collect()
}
