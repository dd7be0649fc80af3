//! Helpers for tests that run `warmpool serve` (process backend) with Jenkins pools against the
//! Jenkins double: credentials files, a pool's YAML, and the pool's status read through the
//! public HTTP API (`GET /v1/jenkins/pools`), so the tests do not depend on the connector's
//! internals. Include with `#[path = "support/jenkins_pool.rs"] mod jenkins_pool;` next to
//! `mod jenkins;` (the double) and `mod support;`.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;

use crate::jenkins::{CrumbMode, JenkinsConfig, JenkinsDouble};
use crate::support::{EXE, Harness, start_with, test_config};

pub const WAIT: Duration = Duration::from_secs(20);

/// A credentials file and an agents directory, removed with the value.
pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub creds: String,
    pub fs: String,
}

pub fn setup(user: &str, token: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("jenkins-credentials");
    std::fs::write(&creds, format!("{user}:{token}\n")).unwrap();
    let fs = dir.path().join("agents");
    Setup {
        creds: creds.display().to_string(),
        fs: fs.display().to_string(),
        _dir: dir,
    }
}

pub fn creds_of(j: &JenkinsDouble) -> Setup {
    let (u, t) = j.credentials();
    setup(&u, &t)
}

pub async fn jenkins(crumb: CrumbMode) -> JenkinsDouble {
    JenkinsDouble::start(JenkinsConfig {
        crumb,
        ..JenkinsConfig::default()
    })
    .await
}

/// One Jenkins pool's YAML (minIdle 2, maxTotal 6, labels `linux docker`, poll 100 ms); `extra`
/// adds lines to the `jenkins` block, `pool_extra` to the pool.
pub fn pool_yaml(
    name: &str,
    j: &JenkinsDouble,
    s: &Setup,
    pool_extra: &str,
    extra: &str,
) -> String {
    format!(
        r#"  - name: {name}
    minIdle: 2
    maxTotal: 6
    connectTimeout: 20s
{pool_extra}    jenkins:
      url: {url}
      credentialsFile: {creds}
      remoteFS: {fs}
      labels: linux docker
      agentCommand: [{EXE}, fake-jenkins-agent]
      pollInterval: 100ms
      maxPollInterval: 1600ms
{extra}"#,
        url = j.url(),
        creds = s.creds,
        fs = s.fs,
    )
}

/// Serves the pools; every node is deleted at shutdown.
pub async fn serve(yaml: &str) -> Harness {
    serve_keeping(yaml, false).await
}

/// Serves the pools; with `keep`, the nodes stay at shutdown (for the next instance to adopt).
pub async fn serve_keeping(yaml: &str, keep: bool) -> Harness {
    let mut cfg = test_config(&format!("pools:\n{yaml}"));
    cfg.jenkins_delete_on_shutdown = !keep;
    start_with(cfg).await
}

/// The pool's entry of `GET /v1/jenkins/pools`.
pub async fn pool_status(h: &Harness, pool: &str) -> Value {
    let body: Value = h.get_json("/v1/jenkins/pools").await;
    body.as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == pool).cloned())
        .unwrap_or_else(|| panic!("pool {pool} not in /v1/jenkins/pools: {body}"))
}

/// Polls the pool's status until `cond` holds; panics naming `what` after `limit`.
pub async fn wait_status(
    h: &Harness,
    pool: &str,
    what: &str,
    limit: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let st = pool_status(h, pool).await;
        if cond(&st) {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}; last status {st}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Names of the online, free nodes whose name starts with `prefix`.
pub fn online(j: &JenkinsDouble, prefix: &str) -> Vec<String> {
    j.nodes()
        .into_iter()
        .filter(|n| n.name.starts_with(prefix) && n.online && n.busy == 0)
        .map(|n| n.name)
        .collect()
}

/// Nodes (in any state) whose name starts with `prefix`.
pub fn ours(j: &JenkinsDouble, prefix: &str) -> usize {
    j.nodes()
        .iter()
        .filter(|n| n.name.starts_with(prefix))
        .count()
}
