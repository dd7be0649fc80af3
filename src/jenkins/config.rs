//! The `jenkins` block of a pool spec: which Jenkins controller the pool's agents join, with
//! which credentials, node names, labels and workdir, and how hard warmpool may talk to that
//! controller (API rate, agents connecting at once, poll interval and its backoff).
//!
//! Pure: parsing, defaults and validation only. Reading the credentials is [`Credentials::load`].

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::Dur;

/// How a pool's agents join a Jenkins controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JenkinsSpec {
    /// Root URL of the controller (`https://ci.example.com/` or `https://host/jenkins/`).
    pub url: String,
    /// Kubernetes: name of a Secret in the pool's namespace with keys `username` and `token`
    /// (an API token; `password` is accepted in place of `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Process backend: a file holding `user:api-token` (one line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub credentials_file: Option<PathBuf>,
    /// A PEM file of CA certificates trusted for this controller's https URL besides the
    /// platform's roots (a private CA). A path where warmpool runs: on Kubernetes, in the
    /// warmpool pod (mount a ConfigMap there). Default: `serve --ca-file`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Node names are this prefix plus a random suffix; nodes with the prefix belong to the
    /// pool (default: the pool name and `-`). Lowercase letters, digits and `-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name_prefix: Option<String>,
    /// The node's remote root directory (`JENKINS_AGENT_WORKDIR`). The process backend appends
    /// the node name, since its agents share one machine.
    #[serde(rename = "remoteFS", default = "default_remote_fs")]
    pub remote_fs: String,
    /// The node's label string: labels separated by spaces (a list is accepted too).
    #[serde(deserialize_with = "labels_de")]
    #[schemars(with = "String")]
    pub labels: String,
    /// The command that starts one agent: the process backend runs it (default
    /// `jenkins-agent`, the official inbound-agent script); in Kubernetes it replaces the agent
    /// container's command. Either way it gets `JENKINS_URL`, `JENKINS_AGENT_NAME`,
    /// `JENKINS_SECRET`, `JENKINS_WEB_SOCKET=true` and `JENKINS_AGENT_WORKDIR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_command: Option<Vec<String>>,
    /// How often nodes and queue are read (one request each per controller).
    #[serde(default = "default_poll")]
    pub poll_interval: Dur,
    /// The poll interval backs off up to this when Jenkins is slow or failing.
    #[serde(default = "default_max_poll")]
    pub max_poll_interval: Dur,
    /// An answer slower than this counts as "Jenkins is struggling" and backs the poll off.
    #[serde(default = "default_slow")]
    pub slow_response: Dur,
    /// Sustained Jenkins API requests per second, all pools of this controller together.
    #[serde(default = "default_rps")]
    #[schemars(range(min = 0.001))]
    pub requests_per_second: f64,
    /// Requests allowed in a burst above the sustained rate.
    #[serde(default = "default_burst")]
    #[schemars(range(min = 1))]
    pub request_burst: u32,
    /// Agents started but not yet online at once, all pools of this controller together:
    /// the cap on the handshake storm.
    #[serde(default = "default_connecting")]
    #[schemars(range(min = 1))]
    pub max_connecting: u32,
}

fn default_remote_fs() -> String {
    "/home/jenkins/agent".into()
}
fn default_poll() -> Dur {
    Dur::secs(2)
}
fn default_max_poll() -> Dur {
    Dur::secs(60)
}
fn default_slow() -> Dur {
    Dur::secs(2)
}
fn default_rps() -> f64 {
    10.0
}
fn default_burst() -> u32 {
    20
}
fn default_connecting() -> u32 {
    10
}

/// A label string (`linux docker`) or a list of labels, normalised to single spaces.
fn labels_de<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct Labels;
    impl<'de> serde::de::Visitor<'de> for Labels {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a label string like \"linux docker\" or a list of labels")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<String, E> {
            Ok(s.split_whitespace().collect::<Vec<_>>().join(" "))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<String, A::Error> {
            let mut atoms = Vec::new();
            while let Some(l) = a.next_element::<String>()? {
                atoms.extend(l.split_whitespace().map(str::to_string));
            }
            Ok(atoms.join(" "))
        }
    }
    d.deserialize_any(Labels)
}

impl JenkinsSpec {
    /// A spec with defaults for `url`.
    pub fn new(url: &str) -> JenkinsSpec {
        JenkinsSpec {
            url: url.into(),
            credentials_secret: None,
            credentials_file: None,
            ca_file: None,
            node_name_prefix: None,
            remote_fs: default_remote_fs(),
            labels: String::new(),
            agent_command: None,
            poll_interval: default_poll(),
            max_poll_interval: default_max_poll(),
            slow_response: default_slow(),
            requests_per_second: default_rps(),
            request_burst: default_burst(),
            max_connecting: default_connecting(),
        }
    }

    /// The root URL with exactly one trailing `/`.
    pub fn root_url(&self) -> String {
        format!("{}/", self.url.trim().trim_end_matches('/'))
    }

    /// The node name prefix for pool `pool`.
    pub fn prefix(&self, pool: &str) -> String {
        self.node_name_prefix
            .clone()
            .unwrap_or_else(|| format!("{}-", pool.replace('.', "-")))
    }

    /// The node's labels as atoms.
    pub fn label_atoms(&self) -> std::collections::BTreeSet<String> {
        self.labels.split_whitespace().map(str::to_string).collect()
    }

    /// Semantic checks; one message per bad field, each prefixed with `prefix` (`spec.jenkins.`).
    pub fn validate(&self, prefix: &str) -> Vec<String> {
        let mut p = Vec::new();
        match reqwest::Url::parse(self.url.trim()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            Ok(u) => p.push(format!(
                "{prefix}url: {:?} must be an http or https URL with a host (scheme {:?})",
                self.url,
                u.scheme()
            )),
            Err(e) => p.push(format!("{prefix}url: {:?} is not a URL: {e}", self.url)),
        }
        if let Some(np) = &self.node_name_prefix {
            let ok = !np.is_empty()
                && np.len() <= 40
                && np
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && np.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
            if !ok {
                p.push(format!(
                    "{prefix}nodeNamePrefix: {np:?} must be 1-40 lowercase letters, digits or '-', starting with a letter or digit (node names are also pod names)"
                ));
            }
        }
        for l in self.labels.split_whitespace() {
            if !crate::labels::is_bare_atom(l) {
                p.push(format!(
                    "{prefix}labels: {l:?} is not a valid Jenkins label (no & | ! < > ( ) \" ' and no \"->\")"
                ));
            }
        }
        if self.labels.trim().is_empty() {
            p.push(format!(
                "{prefix}labels: must name at least one label (the nodes are EXCLUSIVE: builds reach them only by label)"
            ));
        }
        if self.remote_fs.trim().is_empty() {
            p.push(format!("{prefix}remoteFS: must not be empty"));
        }
        p.extend(crate::spec::command_problem(
            &format!("{prefix}agentCommand"),
            &self.agent_command,
        ));
        if self.poll_interval.0.is_zero() {
            p.push(format!("{prefix}pollInterval: must be longer than 0s"));
        }
        if self.max_poll_interval < self.poll_interval {
            p.push(format!(
                "{prefix}maxPollInterval: {} is below pollInterval {}",
                self.max_poll_interval, self.poll_interval
            ));
        }
        if self.slow_response.0.is_zero() {
            p.push(format!("{prefix}slowResponse: must be longer than 0s"));
        }
        if !(self.requests_per_second.is_finite()
            && self.requests_per_second > 0.0
            && self.requests_per_second <= 10_000.0)
        {
            p.push(format!(
                "{prefix}requestsPerSecond: must be a number above 0 and at most 10000, got {}",
                self.requests_per_second
            ));
        }
        if self.request_burst == 0 {
            p.push(format!("{prefix}requestBurst: must be at least 1"));
        }
        if self.max_connecting == 0 {
            p.push(format!("{prefix}maxConnecting: must be at least 1"));
        }
        p
    }
}

/// A Jenkins user and API token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub user: String,
    /// API token (or password).
    pub token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials {{ user: {:?}, token: <redacted> }}",
            self.user
        )
    }
}

/// Why a pool has no usable credentials (shown as its `CredentialsMissing` problem).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// None configured; `hint` says which field to set.
    #[error("no credentials: {hint}")]
    Missing {
        /// What to set.
        hint: &'static str,
    },
    /// Not one `user:api-token` line.
    #[error("expected one line `user:api-token`")]
    Malformed,
    /// The credentials file cannot be read.
    #[error("cannot read credentials file {path}: {message}")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// The credentials file is not one `user:api-token` line.
    #[error("credentials file {path}: expected one line `user:api-token`")]
    MalformedFile {
        /// The file.
        path: String,
    },
    /// The credentials Secret cannot be read.
    #[error("cannot read Secret {secret}: {message}")]
    Secret {
        /// `namespace/name`.
        secret: String,
        /// Why.
        message: String,
    },
    /// The credentials Secret lacks a key.
    #[error("Secret {secret} has no {keys} key")]
    SecretKey {
        /// `namespace/name`.
        secret: String,
        /// The key(s) looked for.
        keys: &'static str,
    },
}

impl Credentials {
    /// Parses `user:token` (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Credentials, CredentialsError> {
        let t = text.trim();
        match t.split_once(':') {
            Some((u, k)) if !u.trim().is_empty() && !k.trim().is_empty() => Ok(Credentials {
                user: u.trim().into(),
                token: k.trim().into(),
            }),
            _ => Err(CredentialsError::Malformed),
        }
    }

    /// Reads a credentials file (`user:api-token`).
    pub fn load(path: &std::path::Path) -> Result<Credentials, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|e| CredentialsError::Unreadable {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Credentials::parse(&text).map_err(|_| CredentialsError::MalformedFile {
            path: path.display().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_labels_and_validation() {
        let s: JenkinsSpec =
            serde_saphyr::from_str("url: http://j:8080\nlabels: [linux, go]\n").unwrap();
        assert_eq!(s.labels, "linux go");
        assert_eq!(s.root_url(), "http://j:8080/");
        assert_eq!(s.prefix("go"), "go-");
        assert_eq!(s.remote_fs, "/home/jenkins/agent");
        assert!(s.validate("j.").is_empty());
        let mut bad = s.clone();
        bad.url = "ftp://x".into();
        bad.labels = "a&&b".into();
        bad.node_name_prefix = Some("Bad_".into());
        bad.max_connecting = 0;
        let p = bad.validate("spec.jenkins.");
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p.iter().any(|m| m.starts_with("spec.jenkins.url")));
        assert!(
            p.iter()
                .any(|m| m.starts_with("spec.jenkins.nodeNamePrefix"))
        );
        assert!(serde_saphyr::from_str::<JenkinsSpec>("url: x\nbogus: 1\n").is_err());
    }

    /// Found by the fuzz pass (tests/fuzz/pools.rs): a label list was joined as written, so
    /// `["\tc"]` kept its tab and `[a, "", b]` a double space, and the pool loaded differently
    /// once printed (a string is split on whitespace). Both forms now give the same labels.
    #[test]
    fn label_lists_are_normalised_like_label_strings() {
        let labels = |yaml: &str| {
            serde_saphyr::from_str::<JenkinsSpec>(&format!("url: http://j:8080\nlabels: {yaml}\n"))
                .unwrap()
                .labels
        };
        assert_eq!(labels("[\"\\tc\"]"), "c");
        assert_eq!(labels("[a, '', 'b  c', \" d\\n\"]"), "a b c d");
        assert_eq!(labels("\"a  b\\tc\""), labels("[a, b, c]"));
        let yaml = "pools:\n- name: a0-0\n  jenkins:\n    url: http://127.0.0.1:8080/\n    labels:\n    - \"\\tc\"\n";
        let pools = crate::spec::parse_pools(yaml, "f").unwrap();
        assert_eq!(pools[0].spec.jenkins.as_ref().unwrap().labels, "c");
    }

    #[test]
    fn credentials() {
        let c = Credentials::parse(" admin:11abc \n").unwrap();
        assert_eq!((c.user.as_str(), c.token.as_str()), ("admin", "11abc"));
        assert!(!format!("{c:?}").contains("11abc"));
        assert!(Credentials::parse("admin").is_err());
        assert!(Credentials::parse(":x").is_err());
    }
}
