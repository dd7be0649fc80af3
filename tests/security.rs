//! Security tests over real sockets: an agent cannot claim a lease the service did not grant
//! it (issue 12, "Impersonation and lease theft"), and jobs do not see agents' credentials.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use warmpool::engine::AgentState;

const POOLS: &str = "
pools:
  - name: main
    labels: [main]
    minIdle: 1
    maxTotal: 1
    maxUses: 0
  - name: other
    labels: [other]
    minIdle: 1
    maxTotal: 1
    connectTimeout: 60s
    agentCommand: [sleep, \"600\"]
";

fn unverified_claims(h: &Harness, pool: &str) -> f64 {
    let text = h.server.svc.render_metrics();
    metric(
        &text,
        &format!("warmpool_unverified_lease_claims_total{{pool=\"{pool}\"}}"),
    )
    .unwrap_or(0.0)
}

/// The scenario: an agent of another pool, with its own valid id and token, claims in
/// `hello` the id the next lease of `main` would get. The claim is not restored, the next
/// grant is `main`'s own, and the impostor leaving breaks nothing.
#[tokio::test]
async fn an_agent_cannot_claim_a_lease_it_was_not_granted() {
    let h = start_pools(POOLS).await;
    h.wait_idle("main", 1).await;
    wait_until(
        "the other pool's agent started",
        Duration::from_secs(10),
        || h.agents_in(AgentState::Connecting).len() == 1,
    )
    .await;
    let impostor = h.agents_in(AgentState::Connecting).remove(0);
    let mut last = String::new();
    for _ in 0..3 {
        let l = h.lease("main", 10.0, 60.0).await;
        h.client.release(&l.id).await.unwrap();
        last = l.id;
    }
    // lease-<instance>-<n>: every request takes a number and so does every grant.
    let (prefix, n) = last.rsplit_once('-').unwrap();
    let claimed = format!("{prefix}-{}", n.parse::<u64>().unwrap() + 2);
    let key = &h.server.svc.key;
    let mut ws = raw_agent(&h.hub_url()).await;
    let hello = serde_json::json!({
        "type": "hello", "protocol": 1, "agentId": impostor, "pool": "other",
        "token": key.token(&impostor), "labels": [], "lease": claimed, "uses": 1,
        // A token minted for another agent and pool does not vouch for this one.
        "leaseToken": key.lease_token(&claimed, "main-1", "main"),
    });
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    let mut first = String::new();
    while !first.contains("welcome") {
        let (code, reason, texts) = match tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::StreamExt::next(&mut ws),
        )
        .await
        .expect("an answer to hello")
        {
            Some(Ok(Message::Text(t))) => (0, String::new(), vec![t.to_string()]),
            other => (1, format!("{other:?}"), vec![]),
        };
        assert_eq!(code, 0, "refused: {reason}");
        first = texts.concat();
    }
    wait_until("impostor registered idle", Duration::from_secs(5), || {
        h.pool("other").idle == 1
    })
    .await;
    match h.client.get_lease(&claimed).await {
        Err(warmpool::client::Error::Api { status: 404, .. }) => {}
        other => panic!("the claimed lease {claimed} must not exist: {other:?}"),
    }
    assert_eq!(unverified_claims(&h, "other"), 1.0);

    let l = h.lease("main", 10.0, 60.0).await;
    assert_eq!(l.pool, "main");
    assert_ne!(l.agent, impostor);
    assert_eq!(h.pool("other").leased, 0);
    // The impostor leaves: main's lease is untouched and main keeps serving.
    drop(ws);
    wait_until("impostor gone", Duration::from_secs(10), || {
        !h.server.svc.hub.is_connected(&impostor)
    })
    .await;
    assert_eq!(h.client.get_lease(&l.id).await.unwrap().state, "active");
    h.client.release(&l.id).await.unwrap();
    let again = h.lease("main", 10.0, 60.0).await;
    assert_eq!(again.pool, "main");
    h.client.release(&again.id).await.unwrap();
    h.server.shutdown().await;
}

/// A job's environment holds none of the agent's credentials nor what only `serve` had, and
/// neither an agent's token nor serve's environment is readable in the agents'
/// `/proc/PID/environ` (process backend: agents and jobs run as the same user).
#[tokio::test]
async fn jobs_see_no_agent_token_nor_serve_environment() {
    // Only in serve's environment.
    // SAFETY: set before the service starts; no other thread of this test reads it.
    unsafe { std::env::set_var("WARMPOOL_TEST_SERVE_SECRET", "s3cr3t-of-serve") };
    let h = start_pools(
        "pools:\n  - name: main\n    labels: [main]\n    minIdle: 2\n    maxTotal: 2\n",
    )
    .await;
    h.wait_idle("main", 2).await;
    let agents = h.agents_in(AgentState::Idle);
    let prefix = agents[0].rsplit_once('-').unwrap().0.to_string() + "-";
    let l = h.lease("main", 10.0, 60.0).await;
    let mut spec = script(
        "env; echo '--- agents'; \
         for f in $(grep -la \"WARMPOOL_AGENT_ID=$AGENTS\" /proc/[0-9]*/environ 2>/dev/null); do \
           echo \"== $f\"; { tr '\\0' '\\n' < \"$f\"; } 2>/dev/null; done; true",
    );
    spec.env.insert("AGENTS".into(), prefix);
    let out = exec(&h, &l.id, spec).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code, Some(0), "{err}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (env, procs) = text.split_once("--- agents").expect("both parts");
    let vars: Vec<&str> = env.lines().collect();
    assert!(!env.contains("WARMPOOL_TOKEN"), "{env}");
    assert!(!env.contains("s3cr3t-of-serve"), "{env}");
    // The documented environment.
    assert!(vars.iter().any(|v| v.starts_with("PATH=")), "{env}");
    assert!(
        vars.contains(&format!("WARMPOOL_LEASE={}", l.id).as_str()),
        "{env}"
    );
    assert!(
        vars.iter().any(|v| v.starts_with("WARMPOOL_WORKSPACE=/")),
        "{env}"
    );
    assert!(env.contains("AGENTS="), "the user's --env: {env}");
    // Both agents' environments were found and hold no token.
    assert!(procs.matches("== /proc/").count() >= 2, "{procs}");
    let key = &h.server.svc.key;
    for a in &agents {
        let token = key.token(a);
        assert!(
            !text.contains(&token),
            "agent {a}'s token is visible to a job"
        );
    }
    assert!(!procs.contains("WARMPOOL_TOKEN="), "{procs}");
    // Agents do not inherit serve's environment either: a job cannot read it through them.
    assert!(!procs.contains("s3cr3t-of-serve"), "{procs}");
    assert!(procs.contains("PATH="), "{procs}");
    h.client.release(&l.id).await.unwrap();
    h.server.shutdown().await;
}
