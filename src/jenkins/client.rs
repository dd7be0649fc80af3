//! The Jenkins REST client of one pool: basic auth with a user and API token, redirects not
//! followed (Jenkins answers a successful POST with 302), cookies kept (reqwest's cookie store)
//! since a crumb is bound to its session.
//!
//! CSRF crumbs: none is sent at first, since Jenkins >= 2.96 exempts POSTs authenticated with an
//! API token (`jenkins.security.ApiCrumbExclusion`, JENKINS-22474). Only when a POST is refused
//! with `CrumbFilter`'s 403 "No valid crumb was included in the request" (an older controller,
//! the exemption off, a password instead of a token) is one crumb fetched from
//! `crumbIssuer/api/json`, single-flight: concurrent refused POSTs share that one fetch. Each
//! refused POST is retried once with it; later POSTs carry it from the start.
//!
//! Every request first takes a token from the controller's bucket (shared by all pools of
//! that controller), and is counted in `warmpool_jenkins_requests_total{endpoint,code}` and
//! timed in `warmpool_jenkins_request_seconds{endpoint}`. Errors carry the method, the full
//! URL, the HTTP status and an excerpt of the body (or Jenkins' `X-Error` header).

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode, header};

use super::config::Credentials;
use super::model::{self, NodeObs, QueuedObs};
use crate::metrics::Metrics;

/// The Jenkins endpoints warmpool calls (the `endpoint` label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET crumbIssuer/api/json`.
    Crumb,
    /// `GET computer/api/json?tree=...`.
    Computers,
    /// `GET queue/api/json?tree=...`.
    Queue,
    /// `POST computer/doCreateItem`.
    CreateNode,
    /// `GET computer/NAME/slave-agent.jnlp` (Jenkins before 2.264).
    SlaveAgentJnlp,
    /// `GET computer/NAME/jenkins-agent.jnlp`.
    JenkinsAgentJnlp,
    /// `POST computer/NAME/doDelete`.
    DeleteNode,
    /// `POST computer/NAME/config.xml`.
    ConfigXml,
    /// `GET api/json?tree=jobs[...]`, `GET job/NAME/api/json?tree=...` (build history).
    Jobs,
    /// `GET job/NAME/config.xml` (a job's label).
    JobConfig,
}

impl Endpoint {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Crumb => "crumbIssuer",
            Endpoint::Computers => "computer",
            Endpoint::Queue => "queue",
            Endpoint::CreateNode => "doCreateItem",
            Endpoint::SlaveAgentJnlp => "slave-agent.jnlp",
            Endpoint::JenkinsAgentJnlp => "jenkins-agent.jnlp",
            Endpoint::DeleteNode => "doDelete",
            Endpoint::ConfigXml => "config.xml",
            Endpoint::Jobs => "job",
            Endpoint::JobConfig => "job-config.xml",
        }
    }
}

/// A failed Jenkins request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JenkinsError {
    /// `GET` or `POST`.
    pub method: String,
    /// The full request URL.
    pub url: String,
    /// The HTTP status, when Jenkins answered.
    pub status: Option<u16>,
    /// `X-Error`, or the start of the body as text, or the transport error.
    pub excerpt: String,
}

impl std::fmt::Display for JenkinsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => {
                let reason = StatusCode::from_u16(s)
                    .ok()
                    .and_then(|c| c.canonical_reason())
                    .unwrap_or("");
                write!(f, "{} {}: HTTP {s} {reason}", self.method, self.url)?;
                if !self.excerpt.is_empty() {
                    write!(f, ": {}", self.excerpt)?;
                }
                Ok(())
            }
            None => write!(f, "{} {}: {}", self.method, self.url, self.excerpt),
        }
    }
}

impl std::error::Error for JenkinsError {}

impl JenkinsError {
    /// A machine reason for a `Degraded` condition.
    pub fn reason(&self) -> &'static str {
        match self.status {
            None => "JenkinsUnreachable",
            Some(401) => "JenkinsUnauthorized",
            Some(403) => "JenkinsForbidden",
            Some(404) => "JenkinsNotFound",
            Some(s) if s >= 500 => "JenkinsServerError",
            Some(_) => "JenkinsRequestFailed",
        }
    }

    /// True for answers that say Jenkins is struggling (5xx, 429, no answer).
    pub fn is_overload(&self) -> bool {
        matches!(self.status, None | Some(429)) || self.status.is_some_and(|s| s >= 500)
    }
}

/// What the client knows about crumbs.
#[derive(Debug, Clone)]
enum Crumb {
    /// None needed so far: POSTs go without.
    NotNeeded,
    /// A POST was refused for a crumb, and `crumbIssuer/api/json` answered 404.
    NoIssuer,
    /// Sent with every POST from now on.
    Issued { field: String, value: String },
}

/// The crumb and how many times it was fetched; a POST remembers the generation it was sent
/// with, so of many POSTs refused at once only the first fetches a new crumb.
struct CrumbSlot {
    crumb: Crumb,
    generation: u64,
}

impl CrumbSlot {
    fn header(&self) -> Option<(String, String)> {
        match &self.crumb {
            Crumb::Issued { field, value } => Some((field.clone(), value.clone())),
            Crumb::NotNeeded | Crumb::NoIssuer => None,
        }
    }
}

/// A client for one Jenkins controller and one user.
pub struct Client {
    http: reqwest::Client,
    root: String,
    creds: Credentials,
    limiter: super::SharedLimiter,
    metrics: Metrics,
    /// Held across a crumb fetch (single-flight).
    crumb: tokio::sync::Mutex<CrumbSlot>,
}

const EXCERPT: usize = 300;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Text of a Jenkins error page, shortened: tags stripped, whitespace collapsed.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    let mut in_tag = false;
    let mut skip = 0usize; // inside <script>/<style>
    let lower = text.to_ascii_lowercase();
    let mut i = 0;
    let bytes: Vec<char> = text.chars().collect();
    let lower: Vec<char> = lower.chars().collect();
    while i < bytes.len() {
        let c = bytes[i];
        if c == '<' {
            let rest: String = lower[i..(i + 8).min(lower.len())].iter().collect();
            if rest.starts_with("<script") || rest.starts_with("<style") {
                skip += 1;
            } else if rest.starts_with("</script") || rest.starts_with("</style") {
                skip = skip.saturating_sub(1);
            }
            in_tag = true;
        } else if c == '>' && in_tag {
            in_tag = false;
            out.push(' ');
        } else if !in_tag && skip == 0 {
            out.push(c);
        }
        i += 1;
    }
    let collapsed = out.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.chars().count() > EXCERPT {
        let cut: String = collapsed.chars().take(EXCERPT).collect();
        format!("{cut}...")
    } else {
        collapsed
    }
}

struct Answer {
    status: StatusCode,
    body: bytes::Bytes,
    x_error: Option<String>,
    took: Duration,
}

impl Client {
    /// A client for the controller at `root` (ending with `/`).
    pub fn new(
        root: &str,
        creds: Credentials,
        limiter: super::SharedLimiter,
        metrics: Metrics,
        tls: &std::sync::Arc<rustls::ClientConfig>,
    ) -> Client {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(crate::tls::for_reqwest(tls))
            .redirect(reqwest::redirect::Policy::none())
            // Jenkins binds a crumb to the session (`JSESSIONID.<id>`) it was issued in.
            .cookie_store(true)
            .timeout(TIMEOUT)
            .tcp_nodelay(true)
            .user_agent(concat!("warmpool/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("HTTP client builds");
        Client {
            http,
            root: root.to_string(),
            creds,
            limiter,
            metrics,
            crumb: tokio::sync::Mutex::new(CrumbSlot {
                crumb: Crumb::NotNeeded,
                generation: 0,
            }),
        }
    }

    /// The controller's root URL.
    pub fn root(&self) -> &str {
        &self.root
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.root)
    }

    /// A 200 whose body is not what Jenkins documents.
    fn bad_answer(&self, path: &str, why: impl std::fmt::Display) -> JenkinsError {
        JenkinsError {
            method: "GET".into(),
            url: self.url(path),
            status: Some(200),
            excerpt: why.to_string(),
        }
    }

    fn err(&self, method: &Method, path: &str, a: &Answer) -> JenkinsError {
        JenkinsError {
            method: method.to_string(),
            url: self.url(path),
            status: Some(a.status.as_u16()),
            excerpt: a.x_error.clone().unwrap_or_else(|| excerpt(&a.body)),
        }
    }

    async fn send(
        &self,
        method: Method,
        ep: Endpoint,
        path: &str,
        body: &Body<'_>,
        crumb: Option<(String, String)>,
    ) -> Result<Answer, JenkinsError> {
        let bucket = self.limiter.read().expect("lock").clone();
        bucket.until_ready().await;
        let url = self.url(path);
        let mut rb = self
            .http
            .request(method.clone(), &url)
            .basic_auth(&self.creds.user, Some(&self.creds.token));
        if let Some((field, value)) = crumb {
            rb = rb.header(field, value);
        }
        match body {
            Body::None => {}
            Body::Form(form) => rb = rb.form(form),
            Body::Xml(xml) => {
                rb = rb
                    .header(header::CONTENT_TYPE, "application/xml; charset=UTF-8")
                    .body(xml.to_string())
            }
        }
        let t0 = Instant::now();
        let r = async {
            let resp = rb.send().await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        }
        .await;
        let took = t0.elapsed();
        self.metrics
            .jenkins_request_seconds
            .with_label_values(&[ep.label()])
            .observe(took.as_secs_f64());
        match r {
            Ok((status, headers, body)) => {
                self.metrics
                    .jenkins_requests
                    .with_label_values(&[ep.label(), status.as_str()])
                    .inc();
                let mut x_error = headers
                    .get("x-error")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let location = headers
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if status.is_redirection()
                    && (location.contains("/login") || location.contains("securityRealm"))
                {
                    // A redirect to a login page (an SSO proxy, a lost session) is no success.
                    x_error = Some(format!("redirected to a login page: {location}"));
                }
                Ok(Answer {
                    status,
                    body,
                    x_error,
                    took,
                })
            }
            Err(e) => {
                self.metrics
                    .jenkins_requests
                    .with_label_values(&[ep.label(), "error"])
                    .inc();
                let detail = if e.is_timeout() {
                    format!("no answer within {}s", TIMEOUT.as_secs())
                } else if let Some(t) = crate::tls::failure(&e) {
                    // "TLS certificate verification failed: invalid peer certificate: ..."
                    t
                } else {
                    let mut s = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(c) = src {
                        s = format!("{s}: {c}");
                        src = c.source();
                    }
                    s
                };
                Err(JenkinsError {
                    method: method.to_string(),
                    url,
                    status: None,
                    excerpt: detail,
                })
            }
        }
    }

    /// A GET that must answer 200; returns the body and how long the exchange took.
    async fn get_ok(
        &self,
        ep: Endpoint,
        path: &str,
    ) -> Result<(bytes::Bytes, Duration), JenkinsError> {
        let a = self.send(Method::GET, ep, path, &Body::None, None).await?;
        if a.status == StatusCode::OK {
            Ok((a.body, a.took))
        } else {
            Err(self.err(&Method::GET, path, &a))
        }
    }

    /// A new crumb, unless another POST fetched one since `seen` (the generation the refused
    /// POST was sent with): then that one. Single-flight: the slot stays locked during the fetch.
    async fn refresh_crumb(&self, seen: u64) -> Result<Option<(String, String)>, JenkinsError> {
        let mut slot = self.crumb.lock().await;
        if slot.generation != seen {
            return Ok(slot.header());
        }
        let path = "crumbIssuer/api/json";
        let a = self
            .send(Method::GET, Endpoint::Crumb, path, &Body::None, None)
            .await?;
        slot.crumb = match a.status {
            StatusCode::OK => {
                #[derive(serde::Deserialize)]
                #[serde(rename_all = "camelCase")]
                struct Issued {
                    crumb: String,
                    crumb_request_field: String,
                }
                let i: Issued = serde_json::from_slice(&a.body)
                    .map_err(|e| self.bad_answer(path, format!("not a crumb: {e}")))?;
                Crumb::Issued {
                    field: i.crumb_request_field,
                    value: i.crumb,
                }
            }
            // No crumb issuer configured (CSRF protection off, or a plugin replaced it).
            StatusCode::NOT_FOUND => Crumb::NoIssuer,
            _ => return Err(self.err(&Method::GET, path, &a)),
        };
        slot.generation += 1;
        Ok(slot.header())
    }

    /// A form POST; 2xx and 3xx are success. Sent without a crumb until Jenkins asks for one
    /// (see the module header). Returns the status (so callers can tell a 404 from success).
    async fn post(
        &self,
        ep: Endpoint,
        path: &str,
        body: Body<'_>,
    ) -> Result<StatusCode, JenkinsError> {
        let (mut crumb, generation) = {
            let slot = self.crumb.lock().await;
            (slot.header(), slot.generation)
        };
        let mut retried = false;
        loop {
            let a = self.send(Method::POST, ep, path, &body, crumb).await?;
            let login = a
                .x_error
                .as_deref()
                .is_some_and(|x| x.starts_with("redirected to a login page"));
            if a.status.is_success() || (a.status.is_redirection() && !login) {
                return Ok(a.status);
            }
            if !retried && crumb_refused(&a) {
                // The crumb is missing, or expired with its session: once more with a new one.
                retried = true;
                crumb = self.refresh_crumb(generation).await?;
                continue;
            }
            return Err(self.err(&Method::POST, path, &a));
        }
    }

    /// A GET of a read-only path below the root that must answer 200: its body (the
    /// build-history reader, `history.rs`).
    pub async fn get(&self, ep: Endpoint, path: &str) -> Result<bytes::Bytes, JenkinsError> {
        self.get_ok(ep, path).await.map(|(body, _)| body)
    }

    /// The one batched node poll; returns the nodes and the exchange's duration.
    pub async fn computers(&self) -> Result<(Vec<NodeObs>, Duration), JenkinsError> {
        let path = format!("computer/api/json?tree={}", model::COMPUTER_TREE);
        let (body, took) = self.get_ok(Endpoint::Computers, &path).await?;
        let nodes = model::parse_computers(&body).map_err(|e| self.bad_answer(&path, e))?;
        Ok((nodes, took))
    }

    /// The nodes online now, by name: a small poll (`computer[displayName,offline]`) that frees
    /// connecting slots between full polls.
    pub async fn online_nodes(&self) -> Result<std::collections::BTreeSet<String>, JenkinsError> {
        let path = format!("computer/api/json?tree={}", model::ONLINE_TREE);
        let (body, _) = self.get_ok(Endpoint::Computers, &path).await?;
        let nodes = model::parse_computers(&body).map_err(|e| self.bad_answer(&path, e))?;
        Ok(nodes
            .into_iter()
            .filter(|n| !n.offline)
            .map(|n| n.name)
            .collect())
    }

    /// The queue: items waiting for a label or a node.
    pub async fn queue(&self) -> Result<(Vec<QueuedObs>, Duration), JenkinsError> {
        let path = format!("queue/api/json?tree={}", model::QUEUE_TREE);
        let (body, took) = self.get_ok(Endpoint::Queue, &path).await?;
        let q = model::parse_queue(&body).map_err(|e| self.bad_answer(&path, e))?;
        Ok((q, took))
    }

    /// Creates a permanent inbound WebSocket agent: one executor, EXCLUSIVE, `labels`.
    pub async fn create_node(
        &self,
        name: &str,
        remote_fs: &str,
        labels: &str,
        description: &str,
    ) -> Result<(), JenkinsError> {
        let json = serde_json::json!({
            "name": name,
            "nodeDescription": description,
            "numExecutors": 1,
            "remoteFS": remote_fs,
            "labelString": labels,
            "mode": "EXCLUSIVE",
            "retentionStrategy": {"stapler-class": "hudson.slaves.RetentionStrategy$Always"},
            "nodeProperties": {"stapler-class-bag": "true"},
            "launcher": {"stapler-class": "hudson.slaves.JNLPLauncher", "webSocket": true},
        })
        .to_string();
        self.post(
            Endpoint::CreateNode,
            "computer/doCreateItem",
            Body::Form(&[
                ("name", name),
                ("type", "hudson.slaves.DumbSlave"),
                ("json", &json),
            ]),
        )
        .await
        .map(|_| ())
    }

    /// The node's agent secret, from `jenkins-agent.jnlp` (Jenkins >= 2.264), or from its old
    /// name `slave-agent.jnlp` when a controller older than that answers 404.
    /// (`SlaveComputer.doJenkinsAgentJnlp`; Jenkins core has no other API for the secret.)
    pub async fn secret(&self, name: &str) -> Result<String, JenkinsError> {
        let enc = encode_segment(name);
        let mut last = None;
        for (ep, file) in [
            (Endpoint::JenkinsAgentJnlp, "jenkins-agent.jnlp"),
            (Endpoint::SlaveAgentJnlp, "slave-agent.jnlp"),
        ] {
            let path = format!("computer/{enc}/{file}");
            match self.get_ok(ep, &path).await {
                Ok((body, _)) => {
                    return model::jnlp_secret(&String::from_utf8_lossy(&body), name)
                        .map_err(|e| self.bad_answer(&path, e));
                }
                Err(e) if e.status == Some(404) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("two attempts"))
    }

    /// Takes a node's labels away and marks its description drained
    /// ([`model::DRAINED_MARKER`]) (`POST computer/NAME/config.xml`, Computer/Configure): it
    /// finishes its build and gets no other.
    pub async fn drain_node(
        &self,
        name: &str,
        remote_fs: &str,
        description: &str,
    ) -> Result<(), JenkinsError> {
        let path = format!("computer/{}/config.xml", encode_segment(name));
        let xml = drained_config_xml(name, remote_fs, &model::drained_description(description));
        self.post(Endpoint::ConfigXml, &path, Body::Xml(&xml))
            .await
            .map(|_| ())
    }

    /// Deletes a node; Ok(false) when it was already gone.
    pub async fn delete_node(&self, name: &str) -> Result<bool, JenkinsError> {
        let path = format!("computer/{}/doDelete", encode_segment(name));
        match self
            .post(Endpoint::DeleteNode, &path, Body::Form(&[]))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A node's configuration with no labels: EXCLUSIVE, so Jenkins gives it no build that asks
/// for a label (the shape `GET computer/NAME/config.xml` returns for an inbound agent).
pub fn drained_config_xml(name: &str, remote_fs: &str, description: &str) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    format!(
        "<?xml version='1.1' encoding='UTF-8'?>\n<slave>\n  <name>{}</name>\n  <description>{}</description>\n  <remoteFS>{}</remoteFS>\n  <numExecutors>1</numExecutors>\n  <mode>EXCLUSIVE</mode>\n  <retentionStrategy class=\"hudson.slaves.RetentionStrategy$Always\"/>\n  <launcher class=\"hudson.slaves.JNLPLauncher\">\n    <workDirSettings>\n      <disabled>false</disabled>\n      <internalDir>remoting</internalDir>\n      <failIfWorkDirIsMissing>false</failIfWorkDirIsMissing>\n    </workDirSettings>\n    <webSocket>true</webSocket>\n  </launcher>\n  <label></label>\n  <nodeProperties/>\n</slave>\n",
        esc(name),
        esc(description),
        esc(remote_fs)
    )
}

/// `CrumbFilter`'s refusal: 403 "No valid crumb was included in the request".
fn crumb_refused(a: &Answer) -> bool {
    a.status == StatusCode::FORBIDDEN
        && String::from_utf8_lossy(&a.body)
            .to_ascii_lowercase()
            .contains("no valid crumb")
}

/// Request bodies.
enum Body<'a> {
    None,
    Form(&'a [(&'a str, &'a str)]),
    Xml(&'a str),
}

/// Percent-encodes one path segment.
fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_and_errors() {
        let page = b"<html><head><style>p{}</style><script>x()</script><title>Error 403</title></head><body><h2>HTTP ERROR 403 No valid crumb was included in the request</h2></body></html>";
        let e = excerpt(page);
        assert_eq!(
            e,
            "Error 403 HTTP ERROR 403 No valid crumb was included in the request"
        );
        assert!(excerpt(&vec![b'a'; 1000]).ends_with("..."));
        let err = JenkinsError {
            method: "POST".into(),
            url: "http://j/computer/doCreateItem".into(),
            status: Some(403),
            excerpt: "bob is missing the Agent/Create permission".into(),
        };
        assert_eq!(
            err.to_string(),
            "POST http://j/computer/doCreateItem: HTTP 403 Forbidden: bob is missing the Agent/Create permission"
        );
        assert_eq!(err.reason(), "JenkinsForbidden");
        assert!(!err.is_overload());
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
    }
}
