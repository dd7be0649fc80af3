//! The Jenkins connector end to end: `warmpool serve` (process backend) against the Jenkins
//! double (`tests/support/jenkins.rs`), with real HTTP, real crumbs and basic auth, and real
//! agent processes: the simulated inbound agent (`warmpool fake-jenkins-agent`) dials the
//! double's `wsagents/` endpoint as the official image would.

#[path = "support/jenkins.rs"]
mod jenkins;
#[path = "support/jenkins_pool.rs"]
mod jenkins_pool;
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use jenkins::{CrumbMode, Endpoint, Fault, JenkinsConfig, JenkinsDouble, NodeMode};
use jenkins_pool::{WAIT, creds_of, jenkins, online, pool_status, pool_yaml, serve, setup};
use support::{EXE, Harness, metric, start_with, test_config, wait_until};
use warmpool::jenkins::JenkinsPoolStatus;

fn status(h: &Harness, pool: &str) -> JenkinsPoolStatus {
    h.server
        .svc
        .jenkins
        .get()
        .expect("connector")
        .statuses()
        .into_iter()
        .find(|p| p.name == pool)
        .expect("pool")
}

fn degraded(st: &JenkinsPoolStatus) -> Option<(String, String)> {
    st.conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True")
        .map(|c| (c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn pool_reaches_min_idle_online_nodes_shaped_as_jenkins_expects() {
    let j = jenkins(CrumbMode::Enforced).await;
    let s = creds_of(&j);
    let h = serve(&pool_yaml("linux", &j, &s, "", "")).await;
    assert!(j.wait_for(WAIT, |j| online(j, "linux-").len() == 2).await);
    for n in j
        .nodes()
        .into_iter()
        .filter(|n| n.name.starts_with("linux-"))
    {
        assert_eq!(n.num_executors, 1);
        assert_eq!(n.mode, NodeMode::Exclusive);
        assert!(n.web_socket);
        assert_eq!(n.labels, ["linux", "docker"]);
        // The process backend gives each agent its own directory under remoteFS.
        assert_eq!(n.remote_fs, format!("{}/{}", s.fs, n.name));
        assert!(
            std::path::Path::new(&n.remote_fs).join("remoting").is_dir(),
            "the agent got JENKINS_AGENT_WORKDIR"
        );
    }
    wait_until("status shows 2 idle", WAIT, || {
        status(&h, "linux").nodes.idle == 2
    })
    .await;
    let st = status(&h, "linux");
    assert!(degraded(&st).is_none(), "{st:?}");
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    // Held there: no more nodes than minIdle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        j.request_count(Endpoint::CreateNode) - j.refused(Endpoint::CreateNode),
        2
    );
    // Enforced mode: the first POSTs went without a crumb (an API token needs none on a current
    // Jenkins) and were refused; one crumb was fetched, and they were retried with it. Nothing
    // else was refused.
    assert_eq!(j.request_count(Endpoint::CrumbIssuer), 1);
    assert!(j.refused(Endpoint::CreateNode) <= 2);
    assert!(
        j.requests()
            .iter()
            .all(|r| r.status != 403 || r.endpoint == Endpoint::CreateNode),
        "a request was refused"
    );
    // The poll is batched: one node list and one queue read per interval, never per node.
    assert_eq!(j.request_count(Endpoint::Computer), 0);
    let text = h.server.svc.metrics.render();
    assert!(
        metric(
            &text,
            "warmpool_jenkins_requests_total{code=\"302\",endpoint=\"doCreateItem\"}"
        )
        .unwrap()
            >= 2.0
    );
    assert!(text.contains("warmpool_jenkins_request_seconds_bucket{endpoint=\"computer\""));
    assert!(text.contains("warmpool_jenkins_connecting_agents"));
    // The pools API shows it too.
    let body = pool_status(&h, "linux").await;
    assert_eq!(body["name"], "linux");
    assert_eq!(body["nodes"]["idle"], 2);
    h.server.shutdown().await;
    assert!(
        j.wait_for(WAIT, |j| j
            .nodes()
            .iter()
            .all(|n| !n.name.starts_with("linux-")))
            .await
    );
}

#[tokio::test]
async fn a_queued_build_runs_on_a_warm_node_which_is_then_recycled_and_replaced() {
    let j = jenkins(CrumbMode::Off).await;
    let s = creds_of(&j);
    let h = serve(&pool_yaml("linux", &j, &s, "    maxUses: 1\n", "")).await;
    assert!(j.wait_for(WAIT, |j| online(j, "linux-").len() == 2).await);
    let before: BTreeSet<String> = online(&j, "linux-").into_iter().collect();
    let id = j.enqueue("linux && docker");
    // Dispatched at once to a node that was already online: no provisioning on the build's path.
    assert!(j.wait_for(WAIT, |j| j.build_of(id).is_some()).await);
    let build = j.build_of(id).unwrap();
    assert!(before.contains(&build.node), "ran on a warm node");
    // warmpool sees the node busy (the build is the lease holder) and tops the pool up.
    wait_until("busy seen", WAIT, || status(&h, "linux").nodes.busy == 1).await;
    assert!(j.wait_for(WAIT, |j| online(j, "linux-").len() == 2).await);
    assert!(j.finish(&build.url));
    // Used once (maxUses 1): the node is deleted, and the pool holds two idle nodes.
    assert!(
        j.wait_for(WAIT, |j| j.node(&build.node).is_none()).await,
        "recycled"
    );
    assert!(
        j.wait_for(WAIT, |j| online(j, "linux-").len() == 2).await,
        "replaced"
    );
    assert_eq!(j.builds_by_node().get(&build.node), Some(&1));
    // Its agent process is gone too.
    wait_until("agent process gone", WAIT, || {
        let agents = warmpool::procs::group_leaders_with_env("WARMPOOL_JENKINS_NODE");
        !agents
            .iter()
            .any(|(_, env)| env.get("WARMPOOL_JENKINS_NODE") == Some(&build.node))
    })
    .await;
    wait_until("recycle counted", WAIT, || {
        let text = h.server.svc.metrics.render();
        metric(
            &text,
            "warmpool_recycles_total{pool=\"linux\",reason=\"max-uses\"}",
        ) == Some(1.0)
    })
    .await;
    h.server.shutdown().await;
}

#[tokio::test]
async fn queue_demand_scales_the_pool_above_min_idle_up_to_max_total() {
    let j = jenkins(CrumbMode::Off).await;
    let s = creds_of(&j);
    let h = serve(&pool_yaml("linux", &j, &s, "    maxUses: 0\n", "")).await;
    assert!(j.wait_for(WAIT, |j| online(j, "linux-").len() == 2).await);
    // Six builds for the label: two run at once, four wait in the queue.
    let ids: Vec<u64> = (0..6).map(|_| j.enqueue("docker")).collect();
    // The queue raises the target: every build gets a node, at most maxTotal (6) nodes.
    assert!(
        j.wait_for(WAIT, |j| ids.iter().all(|id| j.build_of(*id).is_some()))
            .await,
        "all queued builds dispatched"
    );
    let ours = j
        .nodes()
        .into_iter()
        .filter(|n| n.name.starts_with("linux-"))
        .count();
    assert!(ours <= 6, "{ours} nodes above maxTotal");
    assert!(ours > 2, "demand raised the pool above minIdle");
    // A label nobody serves raises nothing.
    let before = j.request_count(Endpoint::CreateNode);
    j.enqueue("windows");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(j.request_count(Endpoint::CreateNode), before);
    h.server.shutdown().await;
}

#[tokio::test]
async fn a_node_that_never_connects_is_deleted_with_its_process_and_counted_as_a_leak() {
    let j = jenkins(CrumbMode::Off).await;
    let s = creds_of(&j);
    let yaml = pool_yaml("stuck", &j, &s, "", "")
        .replace(
            &format!("agentCommand: [{EXE}, fake-jenkins-agent]"),
            &format!(
                "agentCommand: [env, FAKE_JENKINS_AGENT_NEVER_CONNECT=1, {EXE}, fake-jenkins-agent]"
            ),
        )
        .replace("connectTimeout: 20s", "connectTimeout: 1s")
        .replace("minIdle: 2", "minIdle: 1");
    let h = serve(&yaml).await;
    // A node is created, its agent runs but never dials.
    assert!(
        j.wait_for(WAIT, |j| j
            .nodes()
            .iter()
            .any(|n| n.name.starts_with("stuck-")))
            .await
    );
    let first = j
        .nodes()
        .into_iter()
        .find(|n| n.name.starts_with("stuck-"))
        .unwrap()
        .name;
    let pid_of = |node: &str| {
        warmpool::procs::group_leaders_with_env("WARMPOOL_JENKINS_NODE")
            .into_iter()
            .find(|(_, env)| env.get("WARMPOOL_JENKINS_NODE").map(String::as_str) == Some(node))
            .map(|(pid, _)| pid)
    };
    wait_until("agent process runs", WAIT, || pid_of(&first).is_some()).await;
    let pid = pid_of(&first).unwrap();
    // After connectTimeout: node and process gone, a leak counted, a new node tried.
    assert!(j.wait_for(WAIT, |j| j.node(&first).is_none()).await);
    wait_until("process killed", WAIT, || !warmpool::procs::alive(pid)).await;
    wait_until("leak counted", WAIT, || {
        status(&h, "stuck").leaks_total >= 1
    })
    .await;
    wait_until("leak metric", WAIT, || {
        let text = h.server.svc.metrics.render();
        metric(&text, "warmpool_leaks_total{pool=\"stuck\"}").is_some_and(|v| v >= 1.0)
    })
    .await;
    assert!(
        j.wait_for(WAIT, |j| j
            .nodes()
            .iter()
            .any(|n| n.name.starts_with("stuck-") && n.name != first))
            .await
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn orphan_nodes_and_agent_processes_are_cleaned_up() {
    let j = jenkins(CrumbMode::Off).await;
    let s = creds_of(&j);
    // Before warmpool starts: a node with the pool's prefix and no agent (left by a crash),
    // a node of someone else, and an agent process whose node does not exist.
    j.add_node("linux-deadbeef", "linux docker", 1);
    j.add_node("static-1", "linux", 1);
    // (Tracked like the agents warmpool starts, so the process backend's sweep of stray
    // children of this test process leaves it to the connector.)
    let mut orphan = tokio::process::Command::new(EXE);
    orphan
        .arg("fake-jenkins-agent")
        .env("JENKINS_URL", j.url())
        .env("JENKINS_AGENT_NAME", "linux-0a0a0a0a")
        .env("JENKINS_SECRET", "00")
        .env("JENKINS_WEB_SOCKET", "true")
        .env("JENKINS_AGENT_WORKDIR", format!("{}/orphan", s.fs))
        .env("FAKE_JENKINS_AGENT_NEVER_CONNECT", "1")
        .env("WARMPOOL_JENKINS_URL", j.url())
        .env("WARMPOOL_JENKINS_POOL", "linux")
        .env("WARMPOOL_JENKINS_NODE", "linux-0a0a0a0a")
        .process_group(0)
        .kill_on_drop(true);
    let mut orphan = warmpool::backend::process::spawn_tracked(&mut orphan).unwrap();
    let h = serve(&pool_yaml("linux", &j, &s, "", "")).await;
    assert!(
        j.wait_for(WAIT, |j| j.node("linux-deadbeef").is_none())
            .await,
        "orphan node deleted"
    );
    let status_of_orphan = tokio::time::timeout(WAIT, orphan.wait()).await;
    assert!(status_of_orphan.is_ok(), "orphan agent process stopped");
    assert!(j.wait_for(WAIT, |j| online(j, "linux-").len() == 2).await);
    // Not ours: untouched.
    assert!(j.node("static-1").is_some());
    wait_until("both counted", WAIT, || {
        let text = h.server.svc.metrics.render();
        let m = |r: &str| {
            metric(
                &text,
                &format!("warmpool_recycles_total{{pool=\"linux\",reason=\"{r}\"}}"),
            )
        };
        m("orphan-node") == Some(1.0) && m("orphan-agent") == Some(1.0)
    })
    .await;
    h.server.shutdown().await;
}

#[tokio::test]
async fn a_restarted_service_adopts_nodes_and_agents_instead_of_duplicating_them() {
    let j = jenkins(CrumbMode::Enforced).await;
    let s = creds_of(&j);
    let yaml = pool_yaml("linux", &j, &s, "", "");
    let mut cfg = test_config(&format!("pools:\n{yaml}"));
    cfg.jenkins_delete_on_shutdown = false;
    let h = start_with(cfg.clone()).await;
    assert!(j.wait_for(WAIT, |j| online(j, "linux-").len() == 2).await);
    let nodes: BTreeSet<String> = online(&j, "linux-").into_iter().collect();
    h.server.shutdown().await;
    // The agents outlive the service: still online in Jenkins.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        online(&j, "linux-").into_iter().collect::<BTreeSet<_>>(),
        nodes
    );
    let created = j.request_count(Endpoint::CreateNode);
    let h = start_with(cfg).await;
    wait_until("adopted", WAIT, || status(&h, "linux").nodes.idle == 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        j.request_count(Endpoint::CreateNode),
        created,
        "nothing duplicated"
    );
    assert_eq!(j.request_count(Endpoint::DeleteNode), 0, "nothing deleted");
    assert_eq!(
        online(&j, "linux-").into_iter().collect::<BTreeSet<_>>(),
        nodes
    );
    // The adopted nodes are managed as before: a build, then recycling.
    let id = j.enqueue("linux");
    assert!(j.wait_for(WAIT, |j| j.build_of(id).is_some()).await);
    let b = j.build_of(id).unwrap();
    // (A build shorter than the poll interval can finish unseen: docs/JENKINS.md.)
    wait_until("busy seen", WAIT, || status(&h, "linux").nodes.busy == 1).await;
    j.finish(&b.url);
    assert!(j.wait_for(WAIT, |j| j.node(&b.node).is_none()).await);
    // Clean up for the other tests: this instance deletes on shutdown.
    let conn = h.server.svc.jenkins.get().unwrap().clone();
    h.server.shutdown().await;
    conn.shutdown(true, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn fifty_agents_at_once_never_exceed_the_api_rate_or_the_handshake_cap() {
    let j = JenkinsDouble::start(JenkinsConfig {
        crumb: CrumbMode::Enforced,
        // A slow controller: every agent handshake takes 150 ms.
        ws_handshake_delay: Duration::from_millis(150),
        ..JenkinsConfig::default()
    })
    .await;
    let s = creds_of(&j);
    let yaml = pool_yaml(
        "burst",
        &j,
        &s,
        "    provisioning:\n      perSecond: 1000\n      burst: 1000\n      maxConcurrent: 50\n",
        "      requestsPerSecond: 40\n      requestBurst: 5\n      maxConnecting: 4\n",
    )
    .replace("minIdle: 2", "minIdle: 50")
    .replace("maxTotal: 6", "maxTotal: 50");
    let t0 = Instant::now();
    let h = serve(&yaml).await;
    assert!(
        j.wait_for(Duration::from_secs(60), |j| online(j, "burst-").len() == 50)
            .await,
        "50 online"
    );
    let took = t0.elapsed();
    // API rate: at most burst + rate x window in any window, all endpoints together.
    let times: Vec<Instant> = j
        .requests()
        .iter()
        .filter(|r| r.endpoint != Endpoint::WsAgents && r.endpoint != Endpoint::Login)
        .map(|r| r.at)
        .collect();
    let window = Duration::from_secs(1);
    let max_per_s = times
        .iter()
        .map(|t| {
            times
                .iter()
                .filter(|u| **u >= *t && **u < *t + window)
                .count()
        })
        .max()
        .unwrap();
    assert!(
        max_per_s <= 40 + 5,
        "{max_per_s} requests in one second (limit 40/s, burst 5)"
    );
    assert!(times.len() >= 100, "50 creates and 50 secrets at least");
    // Handshakes: never more than maxConnecting at once; and the cap was actually reached.
    let ws = j.ws_stats();
    assert!(
        ws.max_handshaking <= 4,
        "{} handshakes at once (cap 4)",
        ws.max_handshaking
    );
    assert!(
        ws.max_handshaking >= 2,
        "the test must be able to fail: {ws:?}"
    );
    let text = h.server.svc.metrics.render();
    assert!(metric(&text, "warmpool_jenkins_connecting_agents").is_some());
    eprintln!(
        "50 agents online in {took:?}; max {max_per_s} API requests/s; max {} handshakes at once",
        ws.max_handshaking
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn bad_credentials_and_missing_permissions_degrade_only_their_pool() {
    let bad = jenkins(CrumbMode::Off).await;
    let good = jenkins(CrumbMode::Off).await;
    let sb = setup("warmpool", "wrong-token");
    let sg = creds_of(&good);
    let denied = jenkins(CrumbMode::Off).await;
    denied.deny(Endpoint::CreateNode);
    let sd = creds_of(&denied);
    let yaml = format!(
        "{}{}{}  - name: plain\n    labels: [plain]\n    minIdle: 1\n",
        pool_yaml("badauth", &bad, &sb, "", ""),
        pool_yaml("good", &good, &sg, "", ""),
        pool_yaml("denied", &denied, &sd, "", ""),
    );
    let h = serve(&yaml).await;
    wait_until("badauth degraded", WAIT, || {
        degraded(&status(&h, "badauth")).is_some()
    })
    .await;
    let (reason, msg) = degraded(&status(&h, "badauth")).unwrap();
    assert_eq!(reason, "JenkinsUnauthorized");
    assert!(
        msg.contains("pool badauth") && msg.contains(bad.url()) && msg.contains("HTTP 401"),
        "{msg}"
    );
    wait_until("denied degraded", WAIT, || {
        degraded(&status(&h, "denied")).is_some()
    })
    .await;
    let (reason, msg) = degraded(&status(&h, "denied")).unwrap();
    assert_eq!(reason, "JenkinsForbidden");
    assert!(
        msg.contains("pool denied")
            && msg.contains("node denied-")
            && msg.contains("doCreateItem")
            && msg.contains("HTTP 403"),
        "{msg}"
    );
    assert!(
        msg.contains("Create"),
        "the body excerpt names the missing permission: {msg}"
    );
    // The other Jenkins pool and the plain warmpool pool keep working.
    assert!(good.wait_for(WAIT, |j| online(j, "good-").len() == 2).await);
    h.wait_idle("plain", 1).await;
    let l = h.lease("plain", 5.0, 30.0).await;
    assert!(!l.id.is_empty());
    // Fixing the credentials is picked up... by fixing Jenkins: grant the permission back.
    denied.allow_all();
    assert!(
        denied
            .wait_for(WAIT, |j| online(j, "denied-").len() == 2)
            .await
    );
    wait_until("denied recovered", WAIT, || {
        degraded(&status(&h, "denied")).is_none()
    })
    .await;
    h.server.shutdown().await;
}

#[tokio::test]
async fn slow_or_failing_jenkins_backs_the_poll_off_and_it_recovers() {
    let j = jenkins(CrumbMode::Off).await;
    let s = creds_of(&j);
    let h = serve(&pool_yaml("linux", &j, &s, "", "")).await;
    assert!(j.wait_for(WAIT, |j| online(j, "linux-").len() == 2).await);
    j.set_fault(Fault::status(503).on(&[Endpoint::ComputerSet]));
    wait_until("backed off to the max", WAIT, || {
        status(&h, "linux").poll_interval_seconds >= 1.6
    })
    .await;
    let (reason, msg) = degraded(&status(&h, "linux")).unwrap();
    assert_eq!(reason, "JenkinsServerError");
    assert!(msg.contains("HTTP 503"), "{msg}");
    // While backed off, polls are spaced: at most a few in 2 s.
    let n0 = j.request_count(Endpoint::ComputerSet);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let polls = j.request_count(Endpoint::ComputerSet) - n0;
    assert!(polls <= 3, "{polls} polls in 2 s while backed off to 1.6 s");
    j.clear_fault();
    wait_until("recovered", WAIT, || {
        let st = status(&h, "linux");
        st.poll_interval_seconds <= 0.1 + 1e-9 && degraded(&st).is_none()
    })
    .await;
    // Slow answers back off too.
    j.set_fault(Fault::slow(Duration::from_millis(2100)).on(&[Endpoint::Queue]));
    wait_until("slow backs off", WAIT, || {
        status(&h, "linux").poll_interval_seconds >= 0.2
    })
    .await;
    j.clear_fault();
    h.server.shutdown().await;
}

/// The secret comes from `jenkins-agent.jnlp` (Jenkins >= 2.264); a controller older than that
/// has only `slave-agent.jnlp`, which is then read.
#[tokio::test]
async fn secret_falls_back_to_slave_agent_jnlp_before_jenkins_2_264() {
    let j = JenkinsDouble::start(JenkinsConfig {
        crumb: CrumbMode::IssuedTokenExempt,
        version: "2.263.4".into(),
        serve_jenkins_agent_jnlp: false,
        ..JenkinsConfig::default()
    })
    .await;
    let s = creds_of(&j);
    let h = serve(&pool_yaml("linux", &j, &s, "", "")).await;
    assert!(j.wait_for(WAIT, |j| online(j, "linux-").len() == 2).await);
    // Each node: jenkins-agent.jnlp first (404 here), then slave-agent.jnlp.
    assert!(j.request_count(Endpoint::JenkinsAgentJnlp) >= 2);
    assert!(j.request_count(Endpoint::SlaveAgentJnlp) >= 2);
    let jnlp = |ep| {
        j.requests()
            .into_iter()
            .filter(move |r| r.endpoint == ep)
            .map(|r| r.status)
            .collect::<Vec<_>>()
    };
    assert!(jnlp(Endpoint::JenkinsAgentJnlp).iter().all(|s| *s == 404));
    assert!(jnlp(Endpoint::SlaveAgentJnlp).iter().all(|s| *s == 200));
    h.server.shutdown().await;
}

#[tokio::test]
async fn with_max_uses_1_a_backlog_never_reuses_a_node() {
    let j = jenkins(CrumbMode::Enforced).await;
    let s = creds_of(&j);
    let yaml = pool_yaml("once", &j, &s, "    maxUses: 1\n", "")
        .replace("minIdle: 2", "minIdle: 1")
        .replace("maxTotal: 6", "maxTotal: 2");
    let h = serve(&yaml).await;
    assert!(j.wait_for(WAIT, |j| online(j, "once-").len() == 1).await);
    let ids: Vec<u64> = (0..4).map(|_| j.enqueue("linux")).collect();
    let mut done = 0;
    while done < ids.len() {
        assert!(
            j.wait_for(WAIT, |j| !j.running().is_empty()).await,
            "a build runs"
        );
        let b = j.running()[0].clone();
        // warmpool sees its last allowed build and takes the node's labels (config.xml), so
        // Jenkins cannot give it the next queued build when this one ends.
        assert!(
            j.wait_for(WAIT, |j| j
                .node(&b.node)
                .is_some_and(|n| n.labels.is_empty()))
                .await,
            "{} drained",
            b.node
        );
        assert!(j.finish(&b.url));
        done += 1;
    }
    assert!(j.wait_for(WAIT, |j| j.finished().len() == 4).await);
    let by_node = j.builds_by_node();
    assert!(
        by_node.values().all(|n| *n == 1),
        "a node ran two builds: {by_node:?}"
    );
    assert!(j.request_count(Endpoint::ConfigXml) >= 4);
    h.server.shutdown().await;
}
