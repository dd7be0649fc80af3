//! Cleanup and health hooks over real agent processes: a health hook that finds what a job
//! left outside the workspace recycles the agent; a cleanup hook that removes it keeps the
//! agent reused; a hanging hook is killed at its timeout; a pool whose every agent fails its
//! health hook keeps serving, paced by its provisioning rate limit.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// A pool `p` (labels [linux], reused without limit, one agent at a time) with `hooks` (YAML
/// lines indented under `hooks:`).
fn pool(hooks: &str, max_total: u32, extra: &str) -> String {
    format!(
        "pools:\n  - name: p\n    labels: [linux]\n    minIdle: 1\n    maxTotal: {max_total}\n    maxUses: 0\n{extra}    hooks:\n{hooks}"
    )
}

/// A health hook that fails (exit 3, naming what it found on stderr) when `dir` is not empty.
fn empty_dir_check(dir: &str) -> String {
    format!(
        "      health:\n        command: [sh, -c, 'left=$(ls -A {dir}); test -z \"$left\" || {{ echo \"left outside the workspace: $left\" >&2; exit 3; }}']\n        timeout: 10s\n"
    )
}

/// A directory outside every agent's workspace, and its path.
fn scratch() -> (tempfile::TempDir, String) {
    let owned = tempfile::tempdir().unwrap();
    let dir = owned.path().display().to_string();
    (owned, dir)
}

/// Starts pool `p` with one agent at most and `hooks`, and waits for it to be idle.
async fn start_one(hooks: &str) -> Harness {
    let h = start_pools(&pool(hooks, 1, "")).await;
    h.wait_idle("p", 1).await;
    h
}

fn state_of(h: &Harness, agent: &str) -> Option<warmpool::engine::AgentState> {
    h.server.svc.read(|e| e.agent(agent).map(|a| a.state))
}

#[tokio::test]
async fn health_hook_that_finds_files_left_outside_the_workspace_recycles_the_agent() {
    let (_owned, dir) = scratch();
    let h = start_one(&empty_dir_check(&dir)).await;

    // A clean job: the health hook passes and the agent is reused.
    let l1 = h.lease("linux", 10.0, 60.0).await;
    assert_eq!(exec(&h, &l1.id, script("true")).await.status.code, Some(0));
    h.client.release(&l1.id).await.unwrap();
    let l2 = h.lease("linux", 10.0, 60.0).await;
    assert_eq!(
        l2.agent, l1.agent,
        "an agent that passed its health hook is reused"
    );

    // A job that writes outside its workspace: the wipe cannot see it, the health hook does.
    let job = format!("echo cache > {dir}/left-by-job.txt");
    assert_eq!(exec(&h, &l2.id, script(&job)).await.status.code, Some(0));
    h.client.release(&l2.id).await.unwrap();
    wait_until(
        "health-check-failed recycle",
        Duration::from_secs(10),
        || h.recycles("health-check-failed") == 1,
    )
    .await;
    let l3 = h.lease("linux", 10.0, 60.0).await;
    assert_ne!(l3.agent, l1.agent, "the next lease gets a fresh agent");

    let p = h.pool("p");
    assert_eq!(p.hook_failures_total, 1);
    let why = p
        .last_hook_failure
        .expect("the failure is in the pool's status");
    for want in [
        l1.agent.as_str(),
        "health hook exit code 3",
        "left outside the workspace: left-by-job.txt",
    ] {
        assert!(why.contains(want), "missing {want:?} in {why:?}");
    }
    let m = h.server.svc.render_metrics();
    assert_eq!(
        metric(
            &m,
            "warmpool_recycles_total{pool=\"p\",reason=\"health-check-failed\"}"
        ),
        Some(1.0)
    );
    // The pools API shows it too.
    let pools: serde_json::Value = reqwest::get(h.url("/v1/pools"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(pools.to_string().contains("left-by-job.txt"), "{pools}");
    h.server.shutdown().await;
}

#[tokio::test]
async fn cleanup_hook_that_removes_the_leftovers_keeps_the_agent_reused() {
    let (owned, dir) = scratch();
    let hooks = format!(
        "      cleanup:\n        command: [find, {dir}, -mindepth, '1', -delete]\n        timeout: 10s\n{}",
        empty_dir_check(&dir)
    );
    let h = start_one(&hooks).await;
    let mut agents = Vec::new();
    for n in 0..3 {
        let l = h.lease("linux", 10.0, 60.0).await;
        let job = format!("mkdir -p {dir}/cache-{n} && echo x > {dir}/cache-{n}/f");
        assert_eq!(exec(&h, &l.id, script(&job)).await.status.code, Some(0));
        h.client.release(&l.id).await.unwrap();
        agents.push(l.agent);
    }
    // The last release's hooks have run once the agent is idle again.
    wait_until(
        "agent idle after its hooks",
        Duration::from_secs(10),
        || state_of(&h, &agents[0]) == Some(warmpool::engine::AgentState::Idle),
    )
    .await;
    assert!(
        agents.iter().all(|a| *a == agents[0]),
        "one agent served every lease: {agents:?}"
    );
    assert_eq!(h.recycles("health-check-failed"), 0);
    assert_eq!(h.recycles("cleanup-failed"), 0);
    assert_eq!(h.pool("p").hook_failures_total, 0);
    assert_eq!(std::fs::read_dir(owned.path()).unwrap().count(), 0);
    h.server.shutdown().await;
}

#[tokio::test]
async fn hanging_cleanup_hook_is_killed_at_its_timeout_and_the_agent_recycled() {
    let (owned, dir) = scratch();
    // The hook never ends, and starts a child that would outlive it.
    let hooks = format!(
        "      cleanup:\n        command: [sh, -c, 'sleep 9361 & sleep 9362']\n        timeout: 500ms\n      health:\n        command: [touch, {dir}/health-ran]\n"
    );
    let h = start_one(&hooks).await;
    let l = h.lease("linux", 10.0, 60.0).await;
    assert_eq!(exec(&h, &l.id, script("true")).await.status.code, Some(0));
    let released = Instant::now();
    h.client.release(&l.id).await.unwrap();
    wait_until("hook running", Duration::from_secs(5), || {
        !pids_matching("sleep 9362").is_empty() || h.recycles("cleanup-failed") == 1
    })
    .await;
    wait_until("cleanup-failed recycle", Duration::from_secs(10), || {
        h.recycles("cleanup-failed") == 1
    })
    .await;
    assert!(
        released.elapsed() >= Duration::from_millis(500),
        "recycled only once the timeout passed"
    );
    assert_eq!(
        h.recycles("cleanup-timeout"),
        0,
        "the hook's own timeout acted"
    );
    wait_until(
        "the hook's whole process group killed",
        Duration::from_secs(5),
        || pids_matching("sleep 9361").is_empty() && pids_matching("sleep 9362").is_empty(),
    )
    .await;
    assert!(
        !owned.path().join("health-ran").exists(),
        "no health check after a failed cleanup"
    );
    let why = h.pool("p").last_hook_failure.unwrap();
    assert!(
        why.contains("cleanup hook timed out after") && why.contains(&l.agent),
        "{why}"
    );
    // The pool keeps serving with a fresh agent.
    let next = h.lease("linux", 10.0, 60.0).await;
    assert_ne!(next.agent, l.agent);
    assert_eq!(exec(&h, &next.id, script("echo ok")).await.stdout, b"ok\n");
    h.server.shutdown().await;
}

#[tokio::test]
async fn pool_whose_health_hook_always_fails_keeps_serving_within_its_rate_limit() {
    // Exit 0, but more output than allowed: the check fails on every agent.
    let hooks = "      health:\n        command: [sh, -c, 'echo \"41 stopped containers\"; echo \"over the limit\" >&2']\n        maxOutputBytes: 4\n";
    let rate = "    provisioning: {perSecond: 4, burst: 1, maxConcurrent: 2}\n";
    let started = Instant::now();
    let h = start_pools(&pool(hooks, 2, rate)).await;
    let mut agents = Vec::new();
    for _ in 0..6 {
        let l = h.lease("linux", 20.0, 60.0).await;
        assert_eq!(exec(&h, &l.id, script("true")).await.status.code, Some(0));
        h.client.release(&l.id).await.unwrap();
        agents.push(l.agent);
    }
    wait_until("six recycles", Duration::from_secs(10), || {
        h.recycles("health-check-failed") == 6
    })
    .await;
    let mut distinct = agents.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        6,
        "every lease got a fresh agent: {agents:?}"
    );
    // Still serving.
    let l = h.lease("linux", 20.0, 60.0).await;
    assert_eq!(exec(&h, &l.id, script("echo ok")).await.stdout, b"ok\n");
    // Replacements came through the token bucket: at most burst + perSecond x elapsed.
    let m = h.server.svc.render_metrics();
    let provisions = metric(
        &m,
        "warmpool_provisions_total{pool=\"p\",result=\"requested\"}",
    )
    .unwrap();
    let allowed = 1.0 + 4.0 * started.elapsed().as_secs_f64();
    assert!(
        provisions <= allowed,
        "{provisions} provisions in {:?}: the rate limit allows {allowed}",
        started.elapsed()
    );
    assert!(provisions >= 7.0, "{provisions}");
    let p = h.pool("p");
    assert_eq!(p.hook_failures_total, 6);
    let why = p.last_hook_failure.unwrap();
    assert!(
        why.contains("health hook printed 22 bytes (maxOutputBytes 4): over the limit"),
        "{why}"
    );
    h.server.shutdown().await;
}
