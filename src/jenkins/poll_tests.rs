//! [`feed`]: one poll's view of a pool turned into engine events (adoption, orphans both ways,
//! builds as leases, a list taken before a start not taken for a loss).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::*;
use crate::engine::{Action, EngineConfig, Unpaced};

fn engine(min_idle: u32) -> Engine {
    let mut e = Engine::new(EngineConfig::default(), "t", Box::new(Unpaced));
    let spec = PoolSpec {
        min_idle,
        max_total: 4,
        max_uses: 1,
        jenkins: Some(JenkinsSpec::new("http://j/")),
        ..PoolSpec::default()
    };
    e.upsert_pool("ci", spec, Instant::now());
    e
}

fn node(name: &str, offline: bool, build: Option<&str>, drained: bool) -> NodeObs {
    NodeObs {
        built_in: false,
        name: name.into(),
        offline,
        build: build.map(str::to_string),
        busy: build.is_some(),
        labels: vec!["linux".into(), name.into()],
        drained,
    }
}

fn obs(nodes: Vec<NodeObs>, agents: &[(&str, u64)], at: Instant) -> PoolObs {
    PoolObs {
        pool: "ci".into(),
        nodes,
        agents: agents
            .iter()
            .map(|(n, s)| (n.to_string(), Some(Duration::from_secs(*s))))
            .collect::<BTreeMap<_, _>>(),
        demand: 0,
        listed_at: Some(at),
        max_uses: 1,
    }
}

fn terminated(acts: &[Action]) -> Vec<(String, &'static str)> {
    let mut v: Vec<_> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Terminate { agent, reason, .. } => Some((agent.clone(), reason.as_str())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

#[test]
fn first_poll_adopts_what_runs_and_removes_orphans_both_ways() {
    let mut e = engine(1);
    let now = Instant::now();
    let o = obs(
        vec![
            node("ci-0000000a", false, None, false),
            node("ci-deadbeef", true, None, false),
        ],
        &[("ci-0000000a", 90), ("ci-0rphan00", 5)],
        now,
    );
    let online = feed(&mut e, &o, now);
    assert_eq!(online, ["ci-0000000a"]);
    let acts = e.take_actions();
    assert_eq!(
        terminated(&acts),
        [
            ("ci-0rphan00".to_string(), "orphan-agent"),
            ("ci-deadbeef".to_string(), "orphan-node")
        ]
    );
    // The adopted agent covers minIdle 1 and keeps its age: nothing provisioned.
    assert!(
        !acts.iter().any(|a| matches!(a, Action::Provision { .. })),
        "{acts:?}"
    );
    let a = e.agent("ci-0000000a").unwrap();
    assert_eq!(a.state, AgentState::Idle);
    assert!(now.duration_since(a.created) >= Duration::from_secs(90));
}

#[test]
fn a_busy_node_is_a_lease_and_a_drained_one_is_not_drained_again() {
    let mut e = engine(0);
    let now = Instant::now();
    let o = obs(
        vec![
            node("ci-0000000a", false, Some("http://j/job/a/1/"), false),
            node("ci-0000000b", false, Some("http://j/job/b/1/"), true),
        ],
        &[("ci-0000000a", 1), ("ci-0000000b", 1)],
        now,
    );
    feed(&mut e, &o, now);
    let acts = e.take_actions();
    let drains: Vec<&str> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Drain { agent, .. } => Some(agent.as_str()),
            _ => None,
        })
        .collect();
    // maxUses 1: the undrained one is drained before its build ends; the other already was.
    assert_eq!(drains, ["ci-0000000a"]);
    let lease = e.agent("ci-0000000a").unwrap().lease.clone().unwrap();
    assert_eq!(e.lease(&lease).unwrap().holder, "http://j/job/a/1/");
}

#[test]
fn a_known_agent_losing_its_node_or_its_process_is_an_orphan_but_not_one_started_after_the_list() {
    let mut e = engine(0);
    let t0 = Instant::now();
    let o = obs(
        vec![
            node("ci-0000000a", false, None, false),
            node("ci-0000000b", false, None, false),
        ],
        &[("ci-0000000a", 1), ("ci-0000000b", 1)],
        t0,
    );
    feed(&mut e, &o, t0);
    e.take_actions();
    // Later: a's node is gone, b's process is gone; c was started after the list was taken.
    let t1 = t0 + Duration::from_secs(1);
    e.set_external_demand("ci", 3, t1);
    let c = e
        .take_actions()
        .into_iter()
        .find_map(|a| match a {
            Action::Provision { agent, .. } => Some(agent),
            _ => None,
        })
        .unwrap();
    let t2 = t1 + Duration::from_secs(1);
    let o = obs(
        vec![node("ci-0000000b", false, None, false)],
        &[("ci-0000000a", 1)],
        t2,
    );
    e.agent_started(&c, t2 + Duration::from_millis(1));
    feed(&mut e, &o, t2 + Duration::from_millis(2));
    assert_eq!(
        terminated(&e.take_actions()),
        [
            ("ci-0000000a".to_string(), "orphan-agent"),
            ("ci-0000000b".to_string(), "orphan-node")
        ]
    );
    assert_eq!(e.agent(&c).unwrap().state, AgentState::Connecting);
}
