//! Jenkins pools follow the engine's rules (issue 14, "one engine"): `maxAge` rotates a Jenkins
//! pool replacement-first, so it never dips below `minIdle`, and an adopted node keeps its age
//! across a restart. `warmpool serve` (process backend) against the Jenkins double, with the
//! simulated inbound agent.

#[path = "support/jenkins.rs"]
mod jenkins;
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use jenkins::{CrumbMode, JenkinsConfig, JenkinsDouble};
use support::{EXE, Harness, start_with, test_config};

const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    _dir: tempfile::TempDir,
    creds: String,
    fs: String,
}

async fn double() -> (JenkinsDouble, Setup) {
    let j = JenkinsDouble::start(JenkinsConfig {
        crumb: CrumbMode::Off,
        ..JenkinsConfig::default()
    })
    .await;
    let (u, t) = j.credentials();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("jenkins-credentials");
    std::fs::write(&creds, format!("{u}:{t}\n")).unwrap();
    let fs = dir.path().join("agents");
    let s = Setup {
        creds: creds.display().to_string(),
        fs: fs.display().to_string(),
        _dir: dir,
    };
    (j, s)
}

fn yaml(j: &JenkinsDouble, s: &Setup, min_idle: u32, max_total: u32, max_age: &str) -> String {
    format!(
        r#"pools:
  - name: linux
    minIdle: {min_idle}
    maxTotal: {max_total}
    maxAge: {max_age}
    connectTimeout: 20s
    jenkins:
      url: {url}
      credentialsFile: {creds}
      remoteFS: {fs}
      labels: linux
      agentCommand: [{EXE}, fake-jenkins-agent]
      pollInterval: 100ms
      maxPollInterval: 1600ms
"#,
        url = j.url(),
        creds = s.creds,
        fs = s.fs,
    )
}

async fn serve(yaml: &str, delete: bool) -> Harness {
    let mut cfg = test_config(yaml);
    cfg.jenkins_delete_on_shutdown = delete;
    start_with(cfg).await
}

fn online(j: &JenkinsDouble) -> BTreeSet<String> {
    j.nodes()
        .into_iter()
        .filter(|n| n.name.starts_with("linux-") && n.online && n.busy == 0)
        .map(|n| n.name)
        .collect()
}

/// The planner deleted nodes past `maxAge` at once (the pool fell to zero online nodes on every
/// rotation); the engine starts the replacement first.
#[tokio::test]
async fn max_age_rotates_a_jenkins_pool_replacement_first_never_below_min_idle() {
    let (j, s) = double().await;
    // Room for both replacements at once (maxTotal 4).
    let h = serve(&yaml(&j, &s, 2, 4, "3s"), true).await;
    assert!(j.wait_for(WAIT, |j| online(j).len() == 2).await);
    let first = online(&j);
    let deadline = Instant::now() + WAIT;
    let mut fewest = usize::MAX;
    // Until both first nodes were rotated out, sampling as fast as the double answers.
    loop {
        let now = online(&j);
        fewest = fewest.min(now.len());
        if now.len() >= 2 && now.is_disjoint(&first) {
            break;
        }
        assert!(Instant::now() < deadline, "not rotated: {now:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        fewest >= 2,
        "the pool fell to {fewest} online idle nodes while rotating (minIdle 2)"
    );
    h.server.shutdown().await;
}

/// The planner gave an adopted node a new age at every restart; the engine keeps counting it
/// from the agent's start.
#[tokio::test]
async fn an_adopted_node_keeps_its_age_across_a_restart() {
    let (j, s) = double().await;
    let y = yaml(&j, &s, 1, 2, "4s");
    let h = serve(&y, false).await;
    assert!(j.wait_for(WAIT, |j| online(j).len() == 1).await);
    let node = online(&j).into_iter().next().unwrap();
    h.server.shutdown().await;
    // The node ages while no warmpool runs: 4 s is its whole maxAge.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        online(&j).contains(&node),
        "left running for the next instance"
    );
    let h = serve(&y, true).await;
    // Past maxAge at adoption: rotated as soon as its replacement is online (with a fresh age
    // it would stay 4 s more).
    assert!(
        j.wait_for(Duration::from_millis(2500), |j| j.node(&node).is_none())
            .await,
        "adopted node {node} kept past its maxAge"
    );
    assert!(j.wait_for(WAIT, |j| online(j).len() == 1).await);
    h.server.shutdown().await;
}
