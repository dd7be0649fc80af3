//! Pool sizing over real agent processes: the cleaning grace keeps a reused warm pool from
//! growing under steady leases (issue 15).

mod support;

use std::time::Duration;

use support::*;

/// A warm pool of 3 (`maxUses: 0`) under 3 clients that lease and release as fast as they can:
/// each lease arrives while other agents clean up (a few ms). The pool holds its `minIdle`
/// headroom plus the leases running (3 + 3), never the agents caught cleaning on top.
#[tokio::test]
async fn a_reused_warm_pool_does_not_grow_under_steady_leases() {
    const N: usize = 3;
    let h = start_pools(
        "pools:\n  - name: p\n    labels: [linux]\n    minIdle: 3\n    maxTotal: 12\n    maxUses: 0\n",
    )
    .await;
    h.wait_idle("p", N as u32).await;
    let mut tasks = Vec::new();
    for _ in 0..N {
        let client = h.client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let l = client
                    .lease(&warmpool::api::CreateLease {
                        selector: "linux".into(),
                        wait_seconds: Some(10.0),
                        ttl_seconds: Some(60.0),
                        holder: Some("test".into()),
                        idempotency_key: None,
                    })
                    .await
                    .expect("lease granted");
                client.release(&l.id).await.expect("released");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every agent ever started is still there (idleTtl 10m, nothing recycled).
    wait_until("agents settle", Duration::from_secs(10), || {
        let s = h.pool("p");
        s.provisioning + s.connecting + s.cleaning == 0
    })
    .await;
    let s = h.pool("p");
    assert!(s.total as usize <= 2 * N, "the pool grew to {s:?}");
    assert_eq!(s.terminating, 0, "{s:?}");
    h.server.shutdown().await;
}

/// The sizing policy's measures over real agent processes: a lease that finds an idle agent is
/// warm, one that has to wait for a new agent is cold (`warmpool_leases_total{pool,path}`, the
/// pools' `warmHitRatio`); every pool's series exist at zero from the start; idle agents cost
/// `warmpool_idle_agent_seconds_total`.
#[tokio::test]
async fn warm_and_cold_leases_and_idle_cost_are_measured() {
    let h = start_pools(
        "pools:\n  - name: warm\n    labels: [linux, warm]\n    minIdle: 1\n    maxTotal: 3\n  - name: cold\n    labels: [linux, cold]\n    minIdle: 0\n    maxTotal: 3\n",
    )
    .await;
    h.wait_idle("warm", 1).await;
    let m = h.server.svc.render_metrics();
    for pool in ["warm", "cold"] {
        for path in ["warm", "cold"] {
            let series = format!("warmpool_leases_total{{path=\"{path}\",pool=\"{pool}\"}}");
            assert_eq!(metric(&m, &series), Some(0.0), "{series} in\n{m}");
        }
        let idle = format!("warmpool_idle_agent_seconds_total{{pool=\"{pool}\"}}");
        assert!(metric(&m, &idle).is_some(), "{idle} in\n{m}");
        assert!(h.pool(pool).warm_hit_ratio.is_none());
    }
    for (selector, pool) in [("warm", "warm"), ("cold", "cold")] {
        let l = h
            .client
            .lease(&warmpool::api::CreateLease {
                selector: selector.into(),
                wait_seconds: Some(30.0),
                ttl_seconds: Some(60.0),
                holder: Some("test".into()),
                idempotency_key: None,
            })
            .await
            .expect("lease granted");
        assert_eq!(l.pool, pool);
        h.client.release(&l.id).await.expect("released");
    }
    let m = h.server.svc.render_metrics();
    let count = |pool: &str, path: &str| {
        metric(
            &m,
            &format!("warmpool_leases_total{{path=\"{path}\",pool=\"{pool}\"}}"),
        )
    };
    assert_eq!(
        (count("warm", "warm"), count("warm", "cold")),
        (Some(1.0), Some(0.0))
    );
    assert_eq!(
        (count("cold", "warm"), count("cold", "cold")),
        (Some(0.0), Some(1.0))
    );
    assert_eq!(h.pool("warm").warm_hit_ratio, Some(1.0));
    assert_eq!(h.pool("cold").warm_hit_ratio, Some(0.0));
    let idle = metric(&m, "warmpool_idle_agent_seconds_total{pool=\"warm\"}").unwrap();
    assert!(
        idle > 0.0,
        "the warm pool's idle agent cost something: {idle}"
    );
    assert!(metric(&m, "warmpool_desired_idle_agents{pool=\"warm\"}").is_some());
    assert!(metric(&m, "warmpool_warm_hit_ratio{pool=\"warm\"}").is_some());
    h.server.shutdown().await;
}
