//! Engine tests for the quiet release: after a lease in which nothing ran, an agent that takes
//! quiet releases is Idle at once (no Cleaning, no `ready` awaited); anything that may have left
//! something (an exec, a restored lease, hooks, an external pool, an unclean health report, an
//! agent away) keeps the cleanup; and a `ready` for an earlier lease never ends a later cleanup.

use std::time::{Duration, Instant};

use super::tests::{engine, req, spec};
use super::*;

/// An engine with pool `p` (`spec`, one agent at most) and its one agent connected and idle,
/// taking quiet releases or not. Returns the engine and the agent's id.
fn one_agent(s: PoolSpec, quiet: bool, t0: Instant) -> (Engine, AgentId) {
    let mut e = engine();
    e.upsert_pool("p", s, t0);
    let id = match e.take_actions().as_slice() {
        [Action::Provision { agent, .. }] => agent.clone(),
        other => panic!("expected one provision, got {other:?}"),
    };
    e.agent_started(&id, t0);
    e.set_quiet_release(&id, quiet);
    e.agent_connected(&id, Some("p"), Health::default(), t0)
        .unwrap();
    e.take_actions();
    (e, id)
}

fn pool(min_idle: u32) -> PoolSpec {
    spec(&["linux"], min_idle, 1, 0)
}

fn lease(e: &mut Engine, now: Instant) -> Lease {
    match e.request_lease(req("linux", 0, 60_000), now).unwrap() {
        LeaseDecision::Granted(l) => l,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// The `Release` actions recorded, as (lease, quiet).
fn releases(acts: &[Action]) -> Vec<(String, bool)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Release { lease, quiet, .. } => Some((lease.clone(), *quiet)),
            _ => None,
        })
        .collect()
}

fn state(e: &Engine, id: &str) -> AgentState {
    e.agent(id).unwrap().state
}

#[test]
fn a_lease_in_which_nothing_ran_ends_quietly_and_the_agent_is_idle_at_once() {
    let t0 = Instant::now();
    let (mut e, id) = one_agent(pool(1), true, t0);
    let a = lease(&mut e, t0);
    assert_eq!(a.agent, id);
    e.take_actions();
    // The next request waits for the pool's only agent.
    let LeaseDecision::Queued(next) = e.request_lease(req("linux", 5_000, 60_000), t0).unwrap()
    else {
        panic!("the only agent is leased")
    };
    e.release(&a.id, t0).unwrap();
    // Idle at once, and at once leased again: the quiet release goes out before the `leased`
    // of the next lease (the agent reads them in this order).
    let acts = e.take_actions();
    assert_eq!(releases(&acts), vec![(a.id.clone(), true)]);
    let order: Vec<&str> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Release { .. } => Some("release"),
            Action::Bound { .. } => Some("leased"),
            _ => None,
        })
        .collect();
    assert_eq!(order, ["release", "leased"]);
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Granted { request, .. } if *request == next))
    );
    assert_eq!(state(&e, &id), AgentState::Leased);
    // Without a waiter: Idle right after the release, nothing awaited.
    let b = e.agent(&id).unwrap().lease.clone().unwrap();
    e.release(&b, t0).unwrap();
    assert_eq!(releases(&e.take_actions()), vec![(b, true)]);
    assert_eq!(state(&e, &id), AgentState::Idle);
    assert!(e.check_invariants().is_ok());
    assert!(e.check_counters(t0).is_ok());
}

#[test]
fn an_exec_or_a_restored_lease_makes_the_release_clean_up() {
    let t0 = Instant::now();
    let (mut e, id) = one_agent(pool(1), true, t0);
    let a = lease(&mut e, t0);
    e.exec_starting(&a.id).unwrap();
    e.release(&a.id, t0).unwrap();
    assert_eq!(releases(&e.take_actions()), vec![(a.id.clone(), false)]);
    assert_eq!(state(&e, &id), AgentState::Cleaning);
    e.agent_ready_for(&id, Some(&a.id), Health::default(), &[], t0);
    assert_eq!(state(&e, &id), AgentState::Idle);
    // Cleaned: the next lease in which nothing runs is quiet again.
    let b = lease(&mut e, t0);
    e.release(&b.id, t0).unwrap();
    assert_eq!(releases(&e.take_actions()), vec![(b.id.clone(), true)]);
    // No exec for a lease that ended (a release that came first wins).
    assert_eq!(
        e.exec_starting(&b.id).unwrap_err().code(),
        "lease_ended",
        "an ended lease"
    );

    // A lease restored from a `hello` (a service restart): what ran is unknown.
    let mut e = engine();
    e.upsert_pool("p", pool(0), t0);
    assert!(e.adopt("p-old", "p", AgentState::Connecting, Duration::ZERO, t0));
    e.set_quiet_release("p-old", true);
    e.agent_registered("p-old", Some("p"), Health::default(), Some("l-old"), 1, t0)
        .unwrap();
    e.take_actions();
    e.release("l-old", t0).unwrap();
    assert_eq!(
        releases(&e.take_actions()),
        vec![("l-old".to_string(), false)]
    );
    assert_eq!(state(&e, "p-old"), AgentState::Cleaning);
    let _ = id;
}

#[test]
fn no_quiet_release_for_old_agents_hooks_external_pools_unclean_health_or_an_agent_away() {
    let t0 = Instant::now();
    let cleans = |e: &mut Engine, id: &str| {
        let l = e.agent(id).unwrap().lease.clone().unwrap();
        e.release(&l, t0).unwrap();
        let r = releases(&e.take_actions());
        assert_eq!(r, vec![(l, false)], "{id}");
        assert_eq!(state(e, id), AgentState::Cleaning, "{id}");
    };
    // An agent whose `hello` did not offer quiet releases.
    let (mut e, id) = one_agent(pool(1), false, t0);
    lease(&mut e, t0);
    cleans(&mut e, &id);

    // A pool with hooks: they run after every lease (and travel with the release).
    let mut s = pool(1);
    s.hooks.cleanup = Some(crate::hooks::CleanupHook {
        command: vec!["true".into()],
        timeout: crate::spec::Dur::secs(5),
    });
    let (mut e, id) = one_agent(s, true, t0);
    let l = lease(&mut e, t0);
    e.release(&l.id, t0).unwrap();
    let acts = e.take_actions();
    assert!(acts.iter().any(
        |a| matches!(a, Action::Release { quiet: false, hooks, .. } if hooks.cleanup.is_some())
    ));
    assert_eq!(state(&e, &id), AgentState::Cleaning);

    // Its last health report is not clean (a heartbeat during the lease saw workspace bytes).
    let (mut e, id) = one_agent(pool(1), true, t0);
    lease(&mut e, t0);
    let dirty = Health {
        workspace_bytes: 10,
        leftover_processes: 0,
    };
    e.agent_heartbeat(&id, dirty, t0);
    cleans(&mut e, &id);

    // Its connection dropped while leased (it keeps its job): the release reaches it later.
    let (mut e, id) = one_agent(pool(1), true, t0);
    lease(&mut e, t0);
    e.agent_away(&id, "connection reset", t0);
    cleans(&mut e, &id);

    // A machine of an external pool is cleaned between leases, always.
    let mut e = engine();
    let mut s = pool(0);
    s.external = true;
    e.upsert_pool("p", s, t0);
    e.agent_joined("m-1", "p", Health::default(), None, 0, t0)
        .unwrap();
    e.set_quiet_release("m-1", true);
    lease(&mut e, t0);
    e.take_actions();
    cleans(&mut e, "m-1");

    // maxUses reached: recycled as before.
    let (mut e, id) = one_agent(spec(&["linux"], 1, 2, 1), true, t0);
    let l = lease(&mut e, t0);
    e.take_actions();
    e.release(&l.id, t0).unwrap();
    assert!(releases(&e.take_actions()).is_empty());
    assert_eq!(state(&e, &id), AgentState::Terminating);
}

#[test]
fn a_ready_for_an_earlier_lease_does_not_end_a_later_cleanup() {
    let t0 = Instant::now();
    let (mut e, id) = one_agent(pool(1), true, t0);
    // Lease A ends quietly, but the agent found something left and will report `ready` for A.
    let a = lease(&mut e, t0);
    e.release(&a.id, t0).unwrap();
    assert_eq!(state(&e, &id), AgentState::Idle);
    // Before that `ready` arrives, lease B runs a command and is released: Cleaning for B.
    let b = lease(&mut e, t0);
    e.exec_starting(&b.id).unwrap();
    e.release(&b.id, t0).unwrap();
    e.take_actions();
    assert_eq!(state(&e, &id), AgentState::Cleaning);
    // The late `ready` for A leaves B's cleanup running.
    e.agent_ready_for(&id, Some(&a.id), Health::default(), &[], t0);
    assert_eq!(state(&e, &id), AgentState::Cleaning);
    let busy = e.request_lease(req("linux", 0, 60_000), t0);
    assert!(
        matches!(busy, Err(LeaseError::WaitExpired { .. })),
        "the agent is not free yet: {busy:?}"
    );
    // B's own `ready` ends it (as does one that names no lease, from an older agent).
    e.agent_ready_for(&id, Some(&b.id), Health::default(), &[], t0);
    assert_eq!(state(&e, &id), AgentState::Idle);
    let c = lease(&mut e, t0);
    e.exec_starting(&c.id).unwrap();
    e.release(&c.id, t0).unwrap();
    e.agent_ready_for(&id, None, Health::default(), &[], t0);
    assert_eq!(state(&e, &id), AgentState::Idle);

    // A late `ready` reporting leftovers while the agent is idle recycles it, like a heartbeat.
    let d = lease(&mut e, t0);
    e.release(&d.id, t0).unwrap();
    assert_eq!(state(&e, &id), AgentState::Idle);
    e.take_actions();
    let left = Health {
        workspace_bytes: 0,
        leftover_processes: 2,
    };
    e.agent_ready_for(&id, Some(&d.id), left, &[], t0);
    assert_eq!(state(&e, &id), AgentState::Terminating);
}
