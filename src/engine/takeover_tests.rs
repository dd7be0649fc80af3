//! Engine tests for a restart or a crash takeover: adopted agents get their own grace to
//! reconnect (independent of `connectTimeout`), and an agent known to serve a lease is never
//! deleted as a leak.

use std::time::{Duration, Instant};

use super::tests::{engine, ms, spec};
use super::*;

fn terminated(acts: &[Action]) -> Vec<(String, &'static str)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Terminate { agent, reason, .. } => Some((agent.clone(), reason.as_str())),
            _ => None,
        })
        .collect()
}

#[test]
fn adopted_agents_get_the_adopt_grace_not_the_connect_timeout() {
    let t0 = Instant::now();
    let mut e = engine();
    e.set_paused(true, t0);
    // connectTimeout 500 ms; the adopt grace is the default (60 s).
    e.upsert_pool("p", spec(&["linux"], 1, 3, 0), t0);
    assert!(e.adopt("p-old-1", "p", AgentState::Connecting, Duration::ZERO, t0));
    assert!(e.adopt("p-old-2", "p", AgentState::Provisioning, Duration::ZERO, t0));
    e.set_paused(false, t0);
    e.take_actions();
    // Far past connectTimeout, within the grace: nothing is deleted.
    let t1 = t0 + Duration::from_secs(30);
    e.tick(t1);
    assert!(terminated(&e.take_actions()).is_empty());
    // The agent reconnects late and is served normally.
    e.agent_connected("p-old-1", Some("p"), Health::default(), t1)
        .unwrap();
    assert_eq!(e.agent("p-old-1").unwrap().state, AgentState::Idle);
    // Past the grace, an agent that never came back is a leak after all.
    let t2 = t0 + ADOPT_GRACE;
    e.agent_heartbeat("p-old-1", Health::default(), t2);
    e.tick(t2);
    assert_eq!(
        terminated(&e.take_actions()),
        vec![("p-old-2".to_string(), "provision-timeout")]
    );
}

#[test]
fn a_fresh_agent_still_times_out_after_connect_timeout() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 1, 0), t0);
    let id = match e.take_actions().as_slice() {
        [Action::Provision { agent, .. }] => agent.clone(),
        other => panic!("expected one provision, got {other:?}"),
    };
    e.agent_started(&id, t0);
    e.tick(t0 + ms(500));
    assert_eq!(terminated(&e.take_actions()), vec![(id, "connect-timeout")]);
}

#[test]
fn the_adopt_grace_is_configurable_and_never_shorter_than_connect_timeout() {
    let t0 = Instant::now();
    let mut e = Engine::new(
        EngineConfig {
            adopt_grace: ms(100),
            ..EngineConfig::default()
        },
        "t",
        Box::new(Unpaced),
    );
    e.set_paused(true, t0);
    e.upsert_pool("p", spec(&["linux"], 0, 1, 0), t0);
    assert!(e.adopt("p-old-1", "p", AgentState::Connecting, Duration::ZERO, t0));
    e.set_paused(false, t0);
    e.tick(t0 + ms(400));
    assert!(
        terminated(&e.take_actions()).is_empty(),
        "connectTimeout (500 ms) is the floor"
    );
    e.tick(t0 + ms(500));
    assert_eq!(
        terminated(&e.take_actions()),
        vec![("p-old-1".to_string(), "connect-timeout")]
    );
}

#[test]
fn an_agent_known_to_serve_a_lease_is_never_a_leak() {
    let t0 = Instant::now();
    let mut e = engine();
    e.set_paused(true, t0);
    e.upsert_pool("p", spec(&["linux"], 0, 2, 0), t0);
    assert!(e.adopt("p-old-1", "p", AgentState::Connecting, Duration::ZERO, t0));
    e.set_paused(false, t0);
    // The agent reports its lease in hello, then its connection breaks before the engine
    // hears of it again: were it Connecting with the lease, no connect deadline applies.
    e.agent_registered(
        "p-old-1",
        Some("p"),
        Health::default(),
        Some("lease-x-1"),
        1,
        t0,
    )
    .unwrap();
    let a = e.agents.get_mut("p-old-1").unwrap();
    a.state = AgentState::Connecting;
    e.tick(t0 + ADOPT_GRACE + Duration::from_secs(1));
    let acts = e.take_actions();
    assert!(
        !terminated(&acts)
            .iter()
            .any(|(_, r)| *r == "connect-timeout" || *r == "provision-timeout"),
        "{acts:?}"
    );
}

#[test]
fn a_lease_id_is_never_issued_twice_even_when_a_restored_lease_holds_the_next_one() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 2, 2, 0), t0);
    let ids: Vec<String> = e.agents().map(|a| a.id.clone()).collect();
    for id in &ids {
        e.agent_started(id, t0);
    }
    // One agent restores a lease carrying the id the next grant would get (same instance
    // prefix: another instance that drew it, or a claim the hub let through).
    // (The request takes the next number, its grant the one after.)
    let next = format!("lease-t-{}", e.seq + 2);
    e.agent_registered(&ids[0], Some("p"), Health::default(), Some(&next), 1, t0)
        .unwrap();
    e.agent_connected(&ids[1], Some("p"), Health::default(), t0)
        .unwrap();
    let LeaseDecision::Granted(l) = e
        .request_lease(super::tests::req("linux", 0, 60_000), t0)
        .unwrap()
    else {
        panic!("granted")
    };
    assert_ne!(
        l.id, next,
        "the restored lease keeps its id; the grant gets a fresh one"
    );
    assert_eq!(l.agent, ids[1]);
    assert_eq!(e.active_lease(&next).unwrap().agent, ids[0]);
}
