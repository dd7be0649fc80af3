//! Monitoring: every metric family a fresh service exports exists from the first scrape (the
//! list in docs/API.md, "Metrics reference"), and the alert rules in `manifests/monitoring/`
//! are valid, in sync and pass their `promtool test rules` unit tests.

mod support;

use std::collections::BTreeSet;

use support::*;

/// One pool, nothing leased, no agent started: only the zero series can be there.
const FRESH_POOL: &str = "
pools:
  - name: quiet
    labels: [linux]
    minIdle: 0
    maxTotal: 2
";

/// The rows of docs/API.md's metrics reference: (family, present from the start).
fn documented() -> Vec<(String, bool)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/API.md"))
        .expect("docs/API.md");
    let start = doc
        .find("### Metrics reference")
        .expect("docs/API.md has a Metrics reference");
    doc[start..]
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells
                .get(1)?
                .strip_prefix("`warmpool_")?
                .strip_suffix('`')?;
            let from_start = cells.get(4)?.starts_with("yes");
            Some((format!("warmpool_{name}"), from_start))
        })
        .collect()
}

/// The family of a sample line (histogram suffixes removed).
fn family(line: &str) -> &str {
    let name = line.split(['{', ' ']).next().unwrap_or("");
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return base;
        }
    }
    name
}

#[tokio::test]
async fn every_documented_family_has_a_sample_on_a_fresh_service() {
    let h = start_pools(FRESH_POOL).await;
    let text = h
        .http()
        .await
        .get(h.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    h.server.shutdown().await;
    let sampled: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(family)
        .collect();
    let doc = documented();
    assert!(
        doc.len() > 20,
        "docs/API.md lists only {} families",
        doc.len()
    );
    let missing: Vec<&str> = doc
        .iter()
        .filter(|(name, from_start)| *from_start && !sampled.contains(name.as_str()))
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "documented as present from the start, but no sample on a fresh service: {missing:?}\n{text}"
    );
    let undocumented: Vec<&&str> = sampled
        .iter()
        .filter(|s| !doc.iter().any(|(d, _)| d == *s))
        .collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/API.md: {undocumented:?}"
    );
    // Every family src/metrics.rs registers is in the reference.
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics.rs"))
        .expect("src/metrics.rs");
    for name in src.split('"').filter(|s| {
        s.starts_with("warmpool_") && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
    }) {
        assert!(
            doc.iter().any(|(d, _)| d == name),
            "src/metrics.rs registers {name}, docs/API.md does not list it"
        );
    }
    // The families alerts are written on, at zero, with the pool's or a known reason's label.
    for sample in [
        "warmpool_leaks_total{pool=\"quiet\"} 0",
        "warmpool_provisions_throttled_total{pool=\"quiet\"} 0",
        "warmpool_rejected_connections_total{reason=\"invalid-token\"} 0",
        "warmpool_protocol_errors_total{reason=\"bad-frame\"} 0",
        "warmpool_recycles_total{pool=\"quiet\",reason=\"connect-timeout\"} 0",
        "warmpool_agents{pool=\"quiet\",state=\"idle\"} 0",
        "warmpool_leases_total{path=\"warm\",pool=\"quiet\"} 0",
        "warmpool_lease_requests_waiting{pool=\"quiet\"} 0",
        "warmpool_pool_degraded{pool=\"quiet\"} 0",
        "warmpool_ready 1",
    ] {
        assert!(
            text.lines().any(|l| l == sample),
            "no `{sample}` on a fresh service:\n{text}"
        );
    }
}
