//! Scenarios of the pure Jenkins planner.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::*;
use crate::spec::Dur;

fn spec(min_idle: u32, max_total: u32, max_uses: u32) -> PoolSpec {
    let mut s = PoolSpec {
        min_idle,
        max_total,
        max_uses,
        ..PoolSpec::default()
    };
    s.connect_timeout = Dur::secs(60);
    s.idle_ttl = Dur::secs(300);
    s
}

fn node(name: &str, offline: bool, build: Option<&str>) -> NodeObs {
    NodeObs {
        name: name.into(),
        offline,
        build: build.map(str::to_string),
        busy: build.is_some(),
        labels: vec!["linux".into(), name.into()],
        drained: false,
    }
}

fn obs(now: Instant, nodes: Vec<NodeObs>, agents: &[&str], demand: u32) -> Observation {
    Observation {
        now,
        agents_listed_at: now,
        polled_at: now,
        nodes,
        agents: agents.iter().map(|s| s.to_string()).collect(),
        demand,
    }
}

fn yes() -> impl FnMut() -> bool {
    || true
}

fn creates(steps: &[Step]) -> u32 {
    steps
        .iter()
        .map(|s| match s {
            Step::Create(n) => *n,
            _ => 0,
        })
        .sum()
}

fn deletes(steps: &[Step]) -> Vec<(String, Reason)> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Delete { node, reason, .. } => Some((node.clone(), *reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn fills_to_min_idle_then_holds() {
    let t = Instant::now();
    let mut mem = PoolMem::default();
    let (steps, c) = plan(
        &spec(3, 10, 1),
        &mut mem,
        &obs(t, vec![], &[], 0),
        &mut yes(),
    );
    assert_eq!(creates(&steps), 3);
    assert_eq!(c.creating, 3);
    // The caller records the three as in flight; the next pass creates nothing more.
    for i in 0..3 {
        mem.nodes.insert(format!("p-{i}"), NodeMem::creating(t));
    }
    let (steps, c) = plan(
        &spec(3, 10, 1),
        &mut mem,
        &obs(t, vec![], &[], 0),
        &mut yes(),
    );
    assert_eq!(creates(&steps), 0);
    assert_eq!(c.creating, 3);
}

#[test]
fn a_finished_build_recycles_at_max_uses_and_is_replaced() {
    let t = Instant::now();
    let mut mem = PoolMem::default();
    let s = spec(1, 5, 1);
    let idle = vec![node("p-1", false, None)];
    let (steps, c) = plan(&s, &mut mem, &obs(t, idle.clone(), &["p-1"], 0), &mut yes());
    assert!(steps.is_empty(), "{steps:?}");
    assert_eq!(c.idle, 1);
    let busy = vec![node("p-1", false, Some("http://j/job/x/1/"))];
    let (steps, c) = plan(&s, &mut mem, &obs(t, busy.clone(), &["p-1"], 0), &mut yes());
    // Busy: the pool wants one idle node again; the node runs its last build and is drained.
    assert_eq!((c.busy, creates(&steps)), (1, 1));
    assert!(steps.contains(&Step::Drain("p-1".into())));
    // Drained once only.
    mem.nodes.insert("p-2".into(), NodeMem::creating(t));
    let (steps, _) = plan(&s, &mut mem, &obs(t, busy, &["p-1"], 0), &mut yes());
    assert!(
        !steps.iter().any(|s| matches!(s, Step::Drain(_))),
        "{steps:?}"
    );
    let (steps, _) = plan(&s, &mut mem, &obs(t, idle, &["p-1"], 0), &mut yes());
    assert_eq!(deletes(&steps), [("p-1".to_string(), Reason::MaxUses)]);
    assert_eq!(mem.nodes["p-1"].uses, 1);
}

#[test]
fn never_connecting_node_is_a_leak_and_orphans_go() {
    let t = Instant::now();
    let mut mem = PoolMem::default();
    let s = spec(0, 5, 1);
    let n = vec![node("p-1", true, None), node("p-2", true, None)];
    // p-1 has an agent that never connects; p-2 has none (an orphan node); p-3 is an agent
    // whose node is gone.
    let (steps, c) = plan(
        &s,
        &mut mem,
        &obs(t, n.clone(), &["p-1", "p-3"], 0),
        &mut yes(),
    );
    let d = deletes(&steps);
    assert!(d.contains(&("p-2".into(), Reason::OrphanNode)), "{d:?}");
    assert!(d.contains(&("p-3".into(), Reason::OrphanAgent)), "{d:?}");
    assert_eq!(c.connecting, 1);
    let later = t + Duration::from_secs(61);
    let (steps, _) = plan(
        &s,
        &mut mem,
        &obs(later, n[..1].to_vec(), &["p-1"], 0),
        &mut yes(),
    );
    assert_eq!(
        deletes(&steps),
        [("p-1".to_string(), Reason::ConnectTimeout)]
    );
}

#[test]
fn queue_demand_raises_the_target_up_to_max_total_and_the_pacer_holds_back() {
    let t = Instant::now();
    let mut mem = PoolMem::default();
    let (steps, c) = plan(
        &spec(1, 4, 1),
        &mut mem,
        &obs(t, vec![], &[], 10),
        &mut yes(),
    );
    assert_eq!((creates(&steps), c.target), (4, 4));
    let mut mem = PoolMem::default();
    let mut n = 0;
    let mut two = || {
        n += 1;
        n <= 2
    };
    let (steps, c) = plan(&spec(1, 10, 1), &mut mem, &obs(t, vec![], &[], 5), &mut two);
    assert_eq!((creates(&steps), c.throttled), (2, 4));
}

#[test]
fn idle_above_target_scales_down_after_idle_ttl_and_adoption_keeps_nodes() {
    let t = Instant::now();
    let mut mem = PoolMem::default();
    let s = spec(1, 5, 0);
    let n = vec![node("p-1", false, None), node("p-2", false, None)];
    // A restarted service adopts both (agents alive): nothing deleted, nothing created.
    let (steps, c) = plan(
        &s,
        &mut mem,
        &obs(t, n.clone(), &["p-1", "p-2"], 0),
        &mut yes(),
    );
    assert!(steps.is_empty(), "{steps:?}");
    assert_eq!(c.idle, 2);
    let later = t + Duration::from_secs(301);
    let (steps, c) = plan(&s, &mut mem, &obs(later, n, &["p-1", "p-2"], 0), &mut yes());
    assert_eq!(deletes(&steps).len(), 1);
    assert_eq!(c.idle, 1);
}

#[test]
fn a_node_created_after_the_agent_list_is_not_an_orphan() {
    let t = Instant::now();
    let mut mem = PoolMem::default();
    let mut m = NodeMem::creating(t);
    m.inflight = None;
    m.agent_started = Some(t + Duration::from_millis(5));
    mem.nodes.insert("p-1".into(), m);
    let o = Observation {
        agents_listed_at: t,
        ..obs(
            t + Duration::from_millis(10),
            vec![node("p-1", true, None)],
            &[],
            0,
        )
    };
    let (steps, c) = plan(&spec(1, 5, 1), &mut mem, &o, &mut yes());
    assert!(deletes(&steps).is_empty());
    assert_eq!(c.connecting, 1);
    let _ = BTreeSet::<String>::new();
}

#[test]
fn an_adopted_drained_node_is_recycled_when_idle_and_labels_say_nothing() {
    let t = Instant::now();
    let mut mem = PoolMem::default();
    let mut drained = node("p-1", false, None);
    drained.drained = true;
    // Without a label the pool now has: not drained, kept.
    let mut other = node("p-2", false, None);
    other.labels = vec!["p-2".into(), "old".into()];
    let (steps, _) = plan(
        &spec(0, 5, 1),
        &mut mem,
        &obs(t, vec![drained, other], &["p-1", "p-2"], 0),
        &mut yes(),
    );
    assert_eq!(deletes(&steps), [("p-1".to_string(), Reason::MaxUses)]);
}

#[test]
fn a_node_provisioned_after_the_poll_was_sent_is_remembered() {
    let t = Instant::now();
    let mut mem = PoolMem::default();
    let mut m = NodeMem::creating(t);
    m.inflight = None;
    m.agent_started = Some(t + Duration::from_millis(5));
    mem.nodes.insert("p-1".into(), m);
    let (steps, c) = plan(
        &spec(1, 5, 1),
        &mut mem,
        &obs(t, vec![], &[], 0),
        &mut yes(),
    );
    assert!(mem.nodes.contains_key("p-1"));
    assert_eq!((c.creating, c.connecting, c.target), (0, 1, 1));
    assert_eq!(
        creates(&steps),
        0,
        "no duplicate for a node the poll could not see yet"
    );
}
