//! Externally leased (Jenkins) pools in the engine: a build as a lease and its release, the
//! drain before the last allowed build, the scheduler's queue as demand, adoption keeping age
//! and uses, orphans, and the one backoff for leaks. (These replace the Jenkins planner's
//! tests: the rules are now the engine's.)

use std::time::{Duration, Instant};

use super::tests::{engine, ms, req, spec};
use super::*;
use crate::spec::Dur;

fn jspec(min_idle: u32, max_total: u32, max_uses: u32) -> PoolSpec {
    PoolSpec {
        jenkins: Some(crate::jenkins::JenkinsSpec::new("http://jenkins.test/")),
        ..spec(&[], min_idle, max_total, max_uses)
    }
}

fn provisions(acts: &[Action]) -> Vec<String> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Provision { agent, .. } => Some(agent.clone()),
            _ => None,
        })
        .collect()
}

fn terminated(acts: &[Action]) -> Vec<(String, &'static str)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Terminate { agent, reason, .. } => Some((agent.clone(), reason.as_str())),
            _ => None,
        })
        .collect()
}

/// A Jenkins pool with `n` idle agents (created, started, seen online).
fn warm(e: &mut Engine, pool: &str, s: PoolSpec, now: Instant) -> Vec<String> {
    e.upsert_pool(pool, s, now);
    assert!(
        provisions(&e.take_actions()).is_empty(),
        "held until observed"
    );
    e.set_held(pool, false, now);
    let ids = provisions(&e.take_actions());
    for id in &ids {
        e.agent_started(id, now);
        e.external_idle(id, now);
    }
    e.take_actions();
    ids
}

#[test]
fn jenkins_agents_are_named_as_nodes_and_never_serve_warmpool_leases() {
    let mut e = engine();
    let now = Instant::now();
    let ids = warm(&mut e, "ci", jspec(2, 4, 0), now);
    assert_eq!(ids.len(), 2);
    for id in &ids {
        let hex = id.strip_prefix("ci-").expect("prefix");
        assert!(
            hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        assert_eq!(e.agent(id).unwrap().state, AgentState::Idle);
    }
    // A warmpool lease request never matches a Jenkins pool.
    let r = e.request_lease(req("", 0, 1000), now);
    assert!(matches!(r, Err(LeaseError::Unsatisfiable { .. })), "{r:?}");
}

#[test]
fn a_build_is_a_lease_held_by_its_url_and_released_when_jenkins_frees_the_node() {
    let mut e = engine();
    let t0 = Instant::now();
    let s = PoolSpec {
        max_age: Dur(Duration::from_secs(7200)),
        ..jspec(1, 4, 0)
    };
    let ids = warm(&mut e, "ci", s, t0);
    let a = &ids[0];
    let url = "http://jenkins.test/job/x/1/";
    e.external_busy(a, url, t0 + ms(10));
    let acts = e.take_actions();
    let lease = e.agent(a).unwrap().lease.clone().expect("leased");
    assert_eq!(e.lease(&lease).unwrap().holder, url);
    assert_eq!(e.agent(a).unwrap().uses, 1);
    // A replacement tops the pool up to minIdle while the build runs.
    assert_eq!(provisions(&acts).len(), 1);
    // The same build seen again: nothing new. Never expires by time, and no heartbeat needed.
    e.external_busy(a, url, t0 + ms(20));
    e.tick(t0 + Duration::from_secs(3600));
    assert_eq!(e.agent(a).unwrap().uses, 1);
    assert_eq!(e.agent(a).unwrap().state, AgentState::Leased);
    assert_eq!(
        e.active_leases(),
        0,
        "shutdown does not wait for Jenkins' builds"
    );
    // Jenkins frees the node: released, idle again (no cleanup round trip).
    let t1 = t0 + Duration::from_secs(3601);
    e.external_idle(a, t1);
    assert_eq!(e.lease(&lease).unwrap().state, LeaseState::Released);
    assert_eq!(e.agent(a).unwrap().state, AgentState::Idle);
}

#[test]
fn the_last_allowed_build_drains_the_agent_which_is_recycled_when_it_ends() {
    let mut e = engine();
    let now = Instant::now();
    let ids = warm(&mut e, "ci", jspec(1, 4, 2), now);
    let a = &ids[0];
    e.external_busy(a, "b1", now);
    assert!(
        !e.take_actions()
            .iter()
            .any(|x| matches!(x, Action::Drain { .. }))
    );
    e.external_idle(a, now);
    e.take_actions();
    e.external_busy(a, "b2", now);
    let acts = e.take_actions();
    let drains: Vec<_> = acts
        .iter()
        .filter(|x| matches!(x, Action::Drain { agent, .. } if agent == a))
        .collect();
    assert_eq!(drains.len(), 1, "drained before its last build: {acts:?}");
    assert!(e.agent(a).unwrap().drained);
    e.external_idle(a, now);
    assert_eq!(terminated(&e.take_actions()), vec![(a.clone(), "max-uses")]);
}

#[test]
fn queue_demand_sizes_the_pool_up_to_max_total() {
    let mut e = engine();
    let now = Instant::now();
    let ids = warm(&mut e, "ci", jspec(0, 3, 0), now);
    assert!(ids.is_empty(), "minIdle 0 and no demand: nothing");
    e.set_external_demand("ci", 5, now);
    assert_eq!(provisions(&e.take_actions()).len(), 3, "at most maxTotal");
    assert_eq!(e.external_demand("ci"), 5);
}

#[test]
fn adoption_keeps_age_uses_and_drained_state() {
    let mut e = engine();
    let now = Instant::now();
    let s = PoolSpec {
        max_age: Dur(Duration::from_secs(100)),
        ..jspec(1, 4, 3)
    };
    e.upsert_pool("ci", s, now);
    // An idle agent 90 s old with 2 builds behind it; a drained one running its last build.
    assert!(e.adopt_with(
        "ci-0000000a",
        "ci",
        AgentState::Connecting,
        Duration::from_secs(90),
        2,
        false,
        now
    ));
    assert!(e.adopt_with(
        "ci-0000000b",
        "ci",
        AgentState::Connecting,
        Duration::from_secs(5),
        3,
        true,
        now
    ));
    e.external_idle("ci-0000000a", now);
    e.external_busy("ci-0000000b", "b9", now);
    e.set_held("ci", false, now);
    let acts = e.take_actions();
    assert!(
        provisions(&acts).is_empty(),
        "adopted idle agent covers minIdle: {acts:?}"
    );
    assert!(
        !acts.iter().any(|x| matches!(x, Action::Drain { .. })),
        "already drained"
    );
    let a = e.agent("ci-0000000a").unwrap();
    assert_eq!(a.uses, 2);
    assert!(now.duration_since(a.created) >= Duration::from_secs(90));
    // Its age counts: at 100 s it is rotated, replacement first.
    let t = now + Duration::from_secs(11);
    e.tick(t);
    let acts = e.take_actions();
    assert!(
        terminated(&acts).is_empty(),
        "not before a replacement: {acts:?}"
    );
    let new = provisions(&acts);
    assert_eq!(new.len(), 1);
    e.agent_started(&new[0], t);
    e.external_idle(&new[0], t);
    assert_eq!(
        terminated(&e.take_actions()),
        vec![("ci-0000000a".to_string(), "max-age")]
    );
    // The drained one's build ends: recycled, not reused.
    e.external_idle("ci-0000000b", t);
    assert_eq!(
        terminated(&e.take_actions()),
        vec![("ci-0000000b".to_string(), "max-uses")]
    );
}

#[test]
fn idle_ttl_is_inclusive_for_jenkins_pools_too() {
    let mut e = engine();
    let now = Instant::now();
    let ids = warm(&mut e, "ci", jspec(0, 4, 0), now);
    assert!(ids.is_empty());
    e.set_external_demand("ci", 1, now);
    let id = provisions(&e.take_actions()).remove(0);
    e.agent_started(&id, now);
    e.external_idle(&id, now);
    e.set_external_demand("ci", 0, now);
    e.take_actions();
    // idleTtl is 1000 ms: stopped at exactly 1000 ms (the planner waited for more).
    e.tick(now + ms(999));
    assert!(terminated(&e.take_actions()).is_empty());
    e.tick(now + ms(1000));
    assert_eq!(terminated(&e.take_actions()), vec![(id, "idle-ttl")]);
}

#[test]
fn orphans_are_terminated_with_their_reason_and_counted_until_gone() {
    let mut e = engine();
    let now = Instant::now();
    warm(&mut e, "ci", jspec(0, 4, 0), now);
    assert!(e.orphan("ci-deadbeef", "ci", Reason::OrphanNode, now));
    assert!(
        !e.orphan("ci-deadbeef", "ci", Reason::OrphanNode, now),
        "once"
    );
    assert!(e.orphan("ci-0rphan00", "ci", Reason::OrphanAgent, now));
    let acts = e.take_actions();
    assert_eq!(
        terminated(&acts),
        vec![
            ("ci-deadbeef".to_string(), "orphan-node"),
            ("ci-0rphan00".to_string(), "orphan-agent")
        ]
    );
    assert_eq!(e.pool_status()[0].terminating, 2);
    e.agent_exited("ci-deadbeef", "deleted", now);
    assert_eq!(e.pool_status()[0].terminating, 1);
    assert_eq!(
        e.pool_status()[0].provision_failures_total,
        0,
        "not a failed provision"
    );
}

#[test]
fn a_leak_backs_the_pool_off_so_nodes_are_not_churned_every_connect_timeout() {
    let mut e = engine();
    let t0 = Instant::now();
    warm(&mut e, "ci", jspec(1, 4, 0), t0);
    // `warm` connected the first agent; make a pool whose agents never connect.
    let mut e = engine();
    e.upsert_pool("ci", jspec(1, 4, 0), t0);
    e.set_held("ci", false, t0);
    let first = provisions(&e.take_actions()).remove(0);
    e.agent_started(&first, t0);
    // connectTimeout is 500 ms: a leak, and a failure for the backoff.
    let t1 = t0 + ms(500);
    e.tick(t1);
    let acts = e.take_actions();
    assert_eq!(terminated(&acts), vec![(first.clone(), "connect-timeout")]);
    assert!(provisions(&acts).is_empty(), "backing off: {acts:?}");
    let st = &e.pool_status()[0];
    assert_eq!(st.leaks_total, 1);
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("next attempt in")
    );
    e.agent_exited(&first, "deleted", t1);
    e.tick(t1 + ms(1));
    assert!(
        provisions(&e.take_actions()).is_empty(),
        "still backing off"
    );
    e.tick(t1 + BACKOFF_BASE);
    assert_eq!(
        provisions(&e.take_actions()).len(),
        1,
        "tried again after the pause"
    );
}

#[test]
fn a_removed_jenkins_pool_terminates_busy_agents_too() {
    let mut e = engine();
    let now = Instant::now();
    let ids = warm(&mut e, "ci", jspec(2, 4, 0), now);
    e.external_busy(&ids[0], "b1", now);
    e.take_actions();
    let mut all: Vec<String> = e.agents().map(|a| a.id.clone()).collect();
    all.sort();
    assert_eq!(
        all.len(),
        3,
        "two warm agents and the busy one's replacement"
    );
    e.remove_pool("ci", now);
    let mut got = terminated(&e.take_actions());
    got.sort();
    let want: Vec<_> = all.iter().map(|i| (i.clone(), "pool-removed")).collect();
    assert_eq!(got, want);
    assert!(ids.iter().all(|i| all.contains(i)));
}

#[test]
fn an_idle_agent_that_goes_offline_must_reconnect_within_connect_timeout() {
    let mut e = engine();
    let now = Instant::now();
    let ids = warm(&mut e, "ci", jspec(1, 4, 0), now);
    let a = &ids[0];
    e.external_offline(a, now + ms(100));
    assert_eq!(e.agent(a).unwrap().state, AgentState::Connecting);
    e.external_idle(a, now + ms(200));
    assert_eq!(e.agent(a).unwrap().state, AgentState::Idle);
    e.external_offline(a, now + ms(300));
    e.tick(now + ms(800));
    assert_eq!(
        terminated(&e.take_actions()),
        vec![(a.clone(), "connect-timeout")]
    );
    e.check_invariants().unwrap();
}
