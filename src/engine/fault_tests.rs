//! Engine tests for agents that fail to start: one that exits before it registers (a container
//! that crashes at start), one the backend reports cannot run (an image that is missing) and one
//! not started within `connectTimeout` are failed provisions with exponential backoff, named in
//! the pool's last error; a registration resets the backoff.

use std::time::Instant;

use super::tests::{engine, ms, spec};
use super::*;

fn last_error(e: &Engine) -> String {
    e.pool_status()[0].last_error.clone().unwrap_or_default()
}

/// Provisions of pool `p` in `acts`.
fn provisions(acts: &[Action]) -> Vec<AgentId> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Provision { agent, .. } => Some(agent.clone()),
            _ => None,
        })
        .collect()
}

/// Plays 30 s in 50 ms ticks where every agent provisioned runs, then `fail`s 100 ms later;
/// returns when each was provisioned.
fn thirty_seconds_of(
    e: &mut Engine,
    mut now: Instant,
    fail: impl Fn(&mut Engine, &str, Instant),
) -> (Vec<Instant>, Instant) {
    let mut attempts = Vec::new();
    let mut running: Vec<(AgentId, Instant)> = Vec::new();
    for _ in 0..600 {
        for agent in provisions(&e.take_actions()) {
            attempts.push(now);
            e.agent_started(&agent, now);
            running.push((agent, now + ms(100)));
        }
        for (agent, _) in running.iter().filter(|(_, t)| *t <= now) {
            fail(e, agent, now);
        }
        running.retain(|(_, t)| *t > now);
        e.check_invariants().unwrap();
        now += ms(50);
        e.tick(now);
    }
    (attempts, now)
}

#[test]
fn an_agent_that_exits_before_it_registers_is_a_failed_provision_with_backoff() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 3, 0), t0);
    let (attempts, now) = thirty_seconds_of(&mut e, t0, |e, agent, now| {
        e.agent_exited(
            agent,
            "pod Failed, container agent: Error, exit code 7",
            now,
        )
    });
    // Replaced at once before the fix: about 200 pods in 30 s. With backoff: 1, 2, 4, 8, 16 s
    // pauses (halved at most by jitter).
    assert!(
        (4..=9).contains(&attempts.len()),
        "{} attempts in 30 s",
        attempts.len()
    );
    let s = &e.pool_status()[0];
    assert_eq!(s.provision_failures_total, attempts.len() as u64);
    assert!(
        s.last_error.as_deref().is_some_and(|m| m.contains(
            "exited before it registered: pod Failed, container agent: Error, exit code 7"
        ) && m.contains("in a row")),
        "{:?}",
        s.last_error
    );

    // An agent that registers resets the backoff and clears the error.
    let mut now = now;
    let agent = loop {
        now += ms(50);
        e.tick(now);
        if let Some(a) = provisions(&e.take_actions()).pop() {
            break a;
        }
    };
    e.agent_started(&agent, now);
    e.agent_connected(&agent, Some("p"), Health::default(), now)
        .unwrap();
    assert_eq!(last_error(&e), "");
    // The next crash waits the first pause again, not the sixth.
    e.upsert_pool("p", spec(&["linux"], 2, 3, 0), now);
    let second = provisions(&e.take_actions()).pop().expect("a second agent");
    e.agent_started(&second, now);
    e.agent_exited(&second, "exit code 7", now);
    assert!(
        last_error(&e).contains("failure 1 in a row"),
        "{}",
        last_error(&e)
    );
    e.tick(now + BACKOFF_BASE);
    assert_eq!(
        provisions(&e.take_actions()).len(),
        1,
        "retried after the first pause"
    );
}

#[test]
fn an_agent_that_crashes_while_leased_ends_its_lease_naming_the_reason_and_is_replaced() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 3, 0), t0);
    let agent = provisions(&e.take_actions()).pop().unwrap();
    e.agent_started(&agent, t0);
    e.agent_connected(&agent, Some("p"), Health::default(), t0)
        .unwrap();
    let LeaseDecision::Granted(l) = e
        .request_lease(super::tests::req("linux", 0, 60_000), t0)
        .unwrap()
    else {
        panic!("granted")
    };
    e.take_actions();
    // The connection drops (the agent keeps jobs across connections), then the pod fails.
    e.agent_away(&agent, "connection reset", t0);
    e.agent_exited(
        &agent,
        "pod Failed, container agent: OOMKilled, exit code 137",
        t0,
    );
    let lease = e.lease(&l.id).unwrap();
    assert_eq!(lease.state, LeaseState::Failed);
    let reason = lease.end_reason.clone().unwrap();
    assert!(
        reason.contains(&agent) && reason.contains("OOMKilled"),
        "{reason}"
    );
    // Not a failed provision: it had registered. Its replacement is on its way (asked for when
    // the pool fell below minIdle), without backoff.
    let s = &e.pool_status()[0];
    assert_eq!(
        (s.provision_failures_total, s.last_error.clone()),
        (0, None)
    );
    assert_eq!((s.total, s.provisioning), (1, 1));
}

#[test]
fn an_agent_that_cannot_run_backs_off_and_stays_counted_until_gone() {
    let t0 = Instant::now();
    let mut e = engine();
    e.upsert_pool("p", spec(&["linux"], 1, 1, 0), t0);
    let agent = provisions(&e.take_actions()).pop().unwrap();
    let why = "pod default/x: container agent cannot start: image \"nope:1\": ErrImageNeverPull";
    e.start_failed(&agent, why, t0);
    let acts = e.take_actions();
    assert!(
        acts.iter().any(
            |a| matches!(a, Action::Terminate { agent: a2, reason: Reason::StartFailed(m), .. }
            if *a2 == agent && m == why)
        ),
        "{acts:?}"
    );
    assert!(
        last_error(&e).contains("ErrImageNeverPull"),
        "{}",
        last_error(&e)
    );
    // Its pod is being deleted: it holds maxTotal (1) until the backend reports it gone.
    assert_eq!(e.agent(&agent).unwrap().state, AgentState::Terminating);
    e.tick(t0 + BACKOFF_MAX);
    assert!(provisions(&e.take_actions()).is_empty());
    e.agent_exited(&agent, "pod deleted", t0 + BACKOFF_MAX);
    let next = provisions(&e.take_actions()).pop().expect("the next agent");
    // The same report again (a later pod event) changes nothing.
    e.start_failed(&agent, why, t0 + BACKOFF_MAX);
    assert_eq!(e.pool_status()[0].provision_failures_total, 1);
    e.start_failed(&next, why, t0 + BACKOFF_MAX);
    e.agent_exited(&next, "pod deleted", t0 + BACKOFF_MAX);

    // Failing again and again: paced by the backoff, not by the pod events.
    let (attempts, _) = thirty_seconds_of(&mut e, t0 + BACKOFF_MAX, |e, agent, now| {
        e.start_failed(agent, why, now);
        e.agent_exited(agent, "pod deleted", now);
    });
    assert!(
        (3..=9).contains(&attempts.len()),
        "{} attempts",
        attempts.len()
    );
}

#[test]
fn an_agent_not_started_within_the_connect_timeout_is_a_failed_provision() {
    let t0 = Instant::now();
    let mut e = engine();
    // connectTimeout 500 ms.
    e.upsert_pool("p", spec(&["linux"], 1, 3, 0), t0);
    let mut now = t0;
    let mut attempts = 0;
    let mut doomed = Vec::new();
    for _ in 0..600 {
        for a in e.take_actions() {
            match a {
                Action::Provision { .. } => attempts += 1,
                Action::Terminate { agent, reason, .. } => {
                    assert_eq!(reason, Reason::ProvisionTimeout);
                    doomed.push(agent);
                }
                _ => {}
            }
        }
        for agent in doomed.drain(..) {
            e.agent_exited(&agent, "pod deleted", now);
        }
        now += ms(50);
        e.tick(now);
    }
    // One attempt per 500 ms (60 in 30 s) before; now the pauses grow.
    assert!((4..=10).contains(&attempts), "{attempts} attempts in 30 s");
    assert!(
        last_error(&e).contains("not started within connectTimeout"),
        "{}",
        last_error(&e)
    );
}
