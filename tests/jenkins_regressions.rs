//! The Jenkins connector's defects of issue 14, each observed through the public surface only
//! (`GET /v1/jenkins/pools`, the metrics, the Jenkins double's request log and node state), so
//! the tests hold whatever planner runs the Jenkins pools:
//! - crumbs: none with an API token; one, shared, where Jenkins enforces them;
//! - the agent secret read from `jenkins-agent.jnlp` first;
//! - drained state explicit (a marker), never inferred from labels;
//! - a build's label found on a controller without agent nodes (`minIdle` 0), for jobs (their
//!   `labelExpression`) and Pipelines (a placeholder node makes Jenkins name it);
//! - node creation not paced by the poll interval;
//! - the poll back to normal on the first good poll; leaks back the pool's creation off.
//!
//! Setup as in `tests/jenkins.rs`: `warmpool serve` (process backend) against the Jenkins double,
//! agents are `warmpool fake-jenkins-agent` processes.

#[path = "support/jenkins.rs"]
mod jenkins;
#[path = "support/jenkins_pool.rs"]
mod jenkins_pool;
mod support;

use std::time::Duration;

use jenkins::{CrumbMode, Endpoint, Fault, JenkinsDouble, NodeMode, TaskKind};
use jenkins_pool::{WAIT, creds_of, jenkins, online, pool_yaml, serve, serve_keeping, wait_status};

/// A pool of 20 nodes created at once: every creation runs concurrently (no pacing, 20
/// connecting slots, a generous request budget).
async fn twenty_at_once(j: &JenkinsDouble) {
    let s = creds_of(j);
    let yaml = pool_yaml(
        "burst",
        j,
        &s,
        "    provisioning:\n      perSecond: 1000\n      burst: 1000\n      maxConcurrent: 20\n",
        "      requestsPerSecond: 1000\n      requestBurst: 200\n      maxConnecting: 20\n",
    )
    .replace("minIdle: 2", "minIdle: 20")
    .replace("maxTotal: 6", "maxTotal: 20");
    let h = serve(&yaml).await;
    assert!(
        j.wait_for(Duration::from_secs(60), |j| online(j, "burst-").len() == 20)
            .await,
        "20 nodes online"
    );
    assert_eq!(
        j.request_count(Endpoint::CreateNode) - j.refused(Endpoint::CreateNode),
        20
    );
    h.server.shutdown().await;
}

/// Jenkins >= 2.96 exempts POSTs authenticated with an API token from CSRF crumbs
/// (`jenkins.security.ApiCrumbExclusion`, JENKINS-22474): no crumb is ever requested.
#[tokio::test]
async fn concurrent_creations_with_an_api_token_fetch_no_crumb() {
    let j = jenkins(CrumbMode::IssuedTokenExempt).await;
    twenty_at_once(&j).await;
    assert_eq!(j.request_count(Endpoint::CrumbIssuer), 0, "crumb requests");
    assert_eq!(j.refused(Endpoint::CreateNode), 0);
}

/// Where Jenkins does ask for a crumb (the exemption does not apply), the POSTs refused for
/// "No valid crumb" share one crumb request, and are each retried once with it.
#[tokio::test]
async fn concurrent_creations_share_one_crumb_where_crumbs_are_enforced() {
    let j = jenkins(CrumbMode::Enforced).await;
    twenty_at_once(&j).await;
    assert_eq!(j.request_count(Endpoint::CrumbIssuer), 1, "crumb requests");
}

/// A current Jenkins (>= 2.264) serves the agent secret at `jenkins-agent.jnlp`;
/// `slave-agent.jnlp` is only its old alias and is never asked for. (Since 2.437 Jenkins logs its
/// JNLP deprecation WARNING for either name, once per node: core has no other API for the
/// secret, see docs/JENKINS.md.)
#[tokio::test]
async fn secret_is_read_from_jenkins_agent_jnlp_not_slave_agent_jnlp() {
    let j = jenkins(CrumbMode::IssuedTokenExempt).await;
    let s = creds_of(&j);
    let h = serve(&pool_yaml("linux", &j, &s, "", "")).await;
    assert!(j.wait_for(WAIT, |j| online(j, "linux-").len() == 2).await);
    assert_eq!(j.request_count(Endpoint::SlaveAgentJnlp), 0);
    assert_eq!(j.request_count(Endpoint::JenkinsAgentJnlp), 2);
    assert_eq!(j.warnings().len(), 2, "one JNLP file per node");
    h.server.shutdown().await;
}

/// Waits until the double has answered `n` more node polls.
async fn polls(j: &JenkinsDouble, n: usize) {
    let start = j.request_count(Endpoint::ComputerSet);
    assert!(
        j.wait_for(WAIT, |j| j.request_count(Endpoint::ComputerSet)
            >= start + n)
            .await,
        "{n} more polls"
    );
}

/// A restart with one more label in the pool: the nodes made before lack it, which says
/// nothing about their use. None is deleted (it used to be read as "drained": every unused node
/// deleted at once as `max-uses`).
#[tokio::test]
async fn a_restart_with_one_more_label_deletes_no_unused_node() {
    let j = jenkins(CrumbMode::IssuedTokenExempt).await;
    let s = creds_of(&j);
    let yaml = pool_yaml("linux", &j, &s, "    maxUses: 1\n", "");
    let h = serve_keeping(&yaml, true).await;
    assert!(j.wait_for(WAIT, |j| online(j, "linux-").len() == 2).await);
    h.server.shutdown().await;
    let h = serve(&yaml.replace("labels: linux docker", "labels: linux docker extra")).await;
    wait_status(&h, "linux", "both nodes adopted", WAIT, |st| {
        st["nodes"]["idle"] == 2
    })
    .await;
    polls(&j, 5).await;
    assert_eq!(
        j.request_count(Endpoint::DeleteNode),
        0,
        "a node was deleted"
    );
    let text = h.server.svc.metrics.render();
    assert_eq!(
        support::metric(
            &text,
            "warmpool_recycles_total{pool=\"linux\",reason=\"max-uses\"}"
        ),
        Some(0.0),
        "no node recycled as max-uses (the series exists at zero from the start)"
    );
    assert_eq!(online(&j, "linux-").len(), 2);
    h.server.shutdown().await;
}

/// A node running its only allowed build (maxUses 1) while warmpool restarts, with one more label
/// in the pool: the new instance still drains it, so the queued build after it does not run
/// there (it used to be taken as already drained, kept its labels, and ran a second build).
#[tokio::test]
async fn a_node_busy_across_a_restart_with_one_more_label_runs_one_build() {
    let j = jenkins(CrumbMode::IssuedTokenExempt).await;
    let s = creds_of(&j);
    let yaml = pool_yaml("once", &j, &s, "    maxUses: 1\n", "")
        .replace("minIdle: 2", "minIdle: 1")
        .replace("maxTotal: 6", "maxTotal: 1");
    let h = serve_keeping(&yaml, true).await;
    assert!(j.wait_for(WAIT, |j| online(j, "once-").len() == 1).await);
    let node = online(&j, "once-")[0].clone();
    h.server.shutdown().await;
    // While warmpool is down: a build takes the node, a second one waits in the queue.
    let first = j.enqueue("linux");
    let b = j.build_of(first).expect("dispatched at once");
    assert_eq!(b.node, node);
    let second = j.enqueue("linux");
    let h = serve(&yaml.replace("labels: linux docker", "labels: linux docker extra")).await;
    wait_status(&h, "once", "busy node adopted", WAIT, |st| {
        st["nodes"]["busy"] == 1
    })
    .await;
    polls(&j, 3).await;
    assert!(j.finish(&b.url));
    assert!(
        j.wait_for(WAIT, |j| j.build_of(second).is_some()).await,
        "the second build runs"
    );
    assert_ne!(
        j.build_of(second).unwrap().node,
        node,
        "ran on the used node"
    );
    assert_eq!(j.builds_by_node().get(&node), Some(&1));
    h.server.shutdown().await;
}

/// minIdle 0 on a controller without any agent node: Jenkins then writes only "Waiting for next
/// available executor" (no label) for every queued build. warmpool reads a job's label from the
/// queue item's task (`labelExpression`; model.rs's tests), and keeps one offline placeholder
/// node there so that Jenkins names the label again: the build gets a node and runs.
#[tokio::test]
async fn a_build_on_a_controller_without_nodes_gets_a_node_with_min_idle_0() {
    let j = jenkins(CrumbMode::IssuedTokenExempt).await;
    let s = creds_of(&j);
    let yaml = pool_yaml("linux", &j, &s, "", "").replace("minIdle: 2", "minIdle: 0");
    let h = serve(&yaml).await;
    assert!(
        j.wait_for(WAIT, |j| j.node("warmpool-placeholder").is_some())
            .await,
        "the placeholder node is created"
    );
    polls(&j, 2).await;
    assert_eq!(
        j.nodes()
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>(),
        ["warmpool-placeholder"],
        "no node of the pool, only the placeholder"
    );
    let id = j.enqueue("linux && docker");
    assert_eq!(
        j.queue()[0].why,
        "There are no nodes with the label ‘linux && docker’"
    );
    assert!(
        j.wait_for(WAIT, |j| j.build_of(id).is_some()).await,
        "the build runs"
    );
    assert!(j.build_of(id).unwrap().node.starts_with("linux-"));
    h.server.shutdown().await;
}

/// A Pipeline `node('linux && docker')` block exports no label (`PlaceholderTask`), and a
/// controller without agent nodes names none in `why`: warmpool creates its placeholder node so
/// Jenkins names the label, and the pool (minIdle 0) gets the build. The placeholder never takes
/// a build and belongs to no pool.
#[tokio::test]
async fn a_pipeline_build_on_a_controller_without_nodes_gets_a_node_with_min_idle_0() {
    let j = jenkins(CrumbMode::IssuedTokenExempt).await;
    let s = creds_of(&j);
    let yaml = pool_yaml("linux", &j, &s, "", "").replace("minIdle: 2", "minIdle: 0");
    let h = serve(&yaml).await;
    let id = j.enqueue_job("pipe", "linux && docker", TaskKind::Pipeline);
    assert!(
        j.wait_for(WAIT, |j| j.build_of(id).is_some()).await,
        "the Pipeline build runs; queue: {:?}, nodes: {:?}",
        j.queue(),
        j.nodes().iter().map(|n| &n.name).collect::<Vec<_>>()
    );
    assert!(j.build_of(id).unwrap().node.starts_with("linux-"));
    let ph = j
        .node("warmpool-placeholder")
        .expect("the placeholder node");
    assert!(!ph.online, "nothing runs for the placeholder");
    assert_eq!(ph.mode, NodeMode::Exclusive);
    assert_eq!(ph.labels, ["warmpool-placeholder"]);
    assert_eq!(ph.builds, 0);
    assert!(
        ph.description.contains("warmpool placeholder"),
        "{}",
        ph.description
    );
    // It is nobody's orphan: still there after more polls.
    polls(&j, 3).await;
    assert!(j.node("warmpool-placeholder").is_some());
    h.server.shutdown().await;
}

/// 20 nodes, 2 connecting slots, a long poll interval: a slot is freed as soon as its agent is
/// seen connected, not at the next poll, so creating the nodes is not paced by the poll (it used
/// to take one poll per 2 nodes: 10 polls of 5 s).
#[tokio::test]
async fn connecting_slots_are_freed_when_agents_connect_not_at_the_next_poll() {
    let j = jenkins(CrumbMode::IssuedTokenExempt).await;
    let s = creds_of(&j);
    let yaml = pool_yaml(
        "slots",
        &j,
        &s,
        "    provisioning:\n      perSecond: 1000\n      burst: 1000\n      maxConcurrent: 20\n",
        "      requestsPerSecond: 1000\n      requestBurst: 200\n      maxConnecting: 2\n",
    )
    .replace("minIdle: 2", "minIdle: 20")
    .replace("maxTotal: 6", "maxTotal: 20")
    .replace("pollInterval: 100ms", "pollInterval: 5s")
    .replace("maxPollInterval: 1600ms", "maxPollInterval: 60s");
    let h = serve(&yaml).await;
    assert!(
        j.wait_for(Duration::from_secs(90), |j| online(j, "slots-").len() == 20)
            .await,
        "20 nodes online"
    );
    // Full polls read the queue too; the connect checks read only the nodes.
    let polls = j.request_count(Endpoint::Queue);
    assert!(
        polls <= 4,
        "{polls} polls to bring 20 nodes online through 2 slots"
    );
    assert!(j.ws_stats().max_open >= 20);
    h.server.shutdown().await;
}

/// After Jenkins recovers, the first good poll brings the interval back to `pollInterval` (it
/// used to halve once per good poll: 4 polls from 1.6 s to 0.1 s, about 2 minutes from 60 s).
#[tokio::test]
async fn the_first_good_poll_after_an_outage_restores_the_poll_interval() {
    let j = jenkins(CrumbMode::Off).await;
    let s = creds_of(&j);
    let h = serve(&pool_yaml("linux", &j, &s, "", "")).await;
    assert!(j.wait_for(WAIT, |j| online(j, "linux-").len() == 2).await);
    j.set_fault(Fault::status(503).on(&[Endpoint::ComputerSet]));
    wait_status(&h, "linux", "backed off to the max", WAIT, |st| {
        st["pollIntervalSeconds"].as_f64() >= Some(1.6)
    })
    .await;
    let good = |j: &JenkinsDouble| {
        j.requests()
            .iter()
            .filter(|r| r.endpoint == Endpoint::ComputerSet && r.status == 200)
            .count()
    };
    let before = good(&j);
    j.clear_fault();
    wait_status(&h, "linux", "back to pollInterval", WAIT, |st| {
        st["pollIntervalSeconds"].as_f64() <= Some(0.1 + 1e-9)
    })
    .await;
    let polls = good(&j) - before;
    assert!(
        polls <= 2,
        "{polls} good polls to return to the normal interval"
    );
    h.server.shutdown().await;
}

/// A pool whose agents never connect: each leak (a node deleted at `connectTimeout`) counts as a
/// failed provision, so creations back off (1 s, 2 s, 4 s...) and the pool is Degraded with the
/// reason; it used to create and delete a node every connectTimeout without pause.
#[tokio::test]
async fn leaks_back_the_pools_creations_off() {
    let j = jenkins(CrumbMode::Off).await;
    let s = creds_of(&j);
    let yaml = pool_yaml("stuck", &j, &s, "", "")
        .replace(
            &format!("agentCommand: [{}, fake-jenkins-agent]", support::EXE),
            &format!(
                "agentCommand: [env, FAKE_JENKINS_AGENT_NEVER_CONNECT=1, {}, fake-jenkins-agent]",
                support::EXE
            ),
        )
        .replace("connectTimeout: 20s", "connectTimeout: 1s")
        .replace("minIdle: 2", "minIdle: 1");
    let h = serve(&yaml).await;
    let st = wait_status(&h, "stuck", "3 leaks", Duration::from_secs(40), |st| {
        st["leaksTotal"].as_u64() >= Some(3)
    })
    .await;
    let degraded = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
        .clone();
    assert_eq!(degraded["status"], "True", "{st}");
    assert_eq!(degraded["reason"], "AgentNeverConnected", "{st}");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("connectTimeout 1s"),
        "{degraded}"
    );
    // The third leak set a 4 s backoff: no creation in the next 10 polls (about 1 s).
    let created = j.request_count(Endpoint::CreateNode);
    polls(&j, 10).await;
    assert_eq!(
        j.request_count(Endpoint::CreateNode),
        created,
        "a node was created right after a leak"
    );
    h.server.shutdown().await;
}

/// The leak backoff ends when a node of the pool comes online: the first two agent handshakes
/// hang past `connectTimeout` (two leaks, the pool Degraded), the third agent connects, and the
/// pool is healthy again at minIdle.
#[tokio::test]
async fn a_node_online_ends_the_leak_backoff_and_its_degraded_condition() {
    let j = jenkins(CrumbMode::Off).await;
    j.set_fault(
        Fault::slow(Duration::from_secs(3))
            .on(&[Endpoint::WsAgents])
            .times(2),
    );
    let s = creds_of(&j);
    let yaml = pool_yaml("late", &j, &s, "", "")
        .replace("connectTimeout: 20s", "connectTimeout: 1s")
        .replace("minIdle: 2", "minIdle: 1");
    let h = serve(&yaml).await;
    let reason = |st: &serde_json::Value| {
        st["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Degraded"))
            .map(|c| c["reason"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    wait_status(&h, "late", "a leak degrades the pool", WAIT, |st| {
        reason(st) == "AgentNeverConnected"
    })
    .await;
    let st = wait_status(&h, "late", "a node online", Duration::from_secs(40), |st| {
        st["nodes"]["idle"] == 1
    })
    .await;
    assert_eq!(reason(&st), "AsExpected", "{st}");
    assert!(st["leaksTotal"].as_u64() >= Some(1));
    h.server.shutdown().await;
}
