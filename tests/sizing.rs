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
