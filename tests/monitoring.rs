//! Monitoring: every metric family a fresh service exports exists from the first scrape (the
//! list in docs/API.md, "Metrics reference"), and the alert rules in `manifests/monitoring/`
//! are valid, in sync and pass their `promtool test rules` unit tests; a real Prometheus with
//! those rules loaded fires the leak alert for a leaking pool.

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

const MONITORING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/monitoring");

fn yaml(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `promtool`, or None (with a loud message) when it is missing outside CI; under
/// `WARMPOOL_CI` (set by .ci/run, which installs Debian's `prometheus`) a missing promtool fails.
fn promtool() -> Option<&'static str> {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("promtool");
    }
    if std::env::var_os("WARMPOOL_CI").is_some() {
        panic!("WARMPOOL_CI is set but promtool is missing: apt-get install prometheus");
    }
    eprintln!(
        "\n*** SKIPPED: promtool is missing (Debian: apt-get install prometheus); \
         the alert rules were NOT checked ***\n"
    );
    None
}

fn run_promtool(args: &[&str], dir: &str) {
    let Some(bin) = promtool() else { return };
    let out = std::process::Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_prometheus_rule_and_the_rules_file_hold_the_same_rules() {
    let plain = yaml(&format!("{MONITORING}/warmpool-rules.yaml"));
    let operator = yaml(&format!("{MONITORING}/prometheusrule.yaml"));
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["apiVersion"], "monitoring.coreos.com/v1");
    assert!(plain["groups"].as_array().is_some_and(|g| !g.is_empty()));
    assert_eq!(
        plain["groups"], operator["spec"]["groups"],
        "manifests/monitoring: prometheusrule.yaml's spec.groups differ from warmpool-rules.yaml's groups"
    );
}

#[test]
fn alert_rules_use_only_documented_metrics() {
    let doc = documented();
    let rules = std::fs::read_to_string(format!("{MONITORING}/warmpool-rules.yaml")).unwrap();
    let mut used = BTreeSet::new();
    for (i, _) in rules.match_indices("warmpool_") {
        let name: String = rules[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        used.insert(name);
    }
    assert!(used.len() >= 6, "rules use {used:?}");
    for name in used {
        assert!(
            doc.iter().any(|(d, _)| *d == name),
            "warmpool-rules.yaml uses {name}, which docs/API.md does not list"
        );
    }
}

#[test]
fn promtool_checks_the_rules() {
    run_promtool(&["check", "rules", "warmpool-rules.yaml"], MONITORING);
}

#[test]
fn promtool_unit_tests_of_the_rules_pass() {
    let dir = format!("{MONITORING}/tests");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no unit tests in {dir}");
    let mut args = vec!["test", "rules"];
    args.extend(files.iter().map(String::as_str));
    run_promtool(&args, &dir);
}

/// Kills and reaps the Prometheus child when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_real_prometheus_fires_the_leak_alert_for_a_leaking_pool() {
    let available = std::process::Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            std::env::var_os("WARMPOOL_CI").is_none(),
            "WARMPOOL_CI is set but prometheus is missing: apt-get install prometheus"
        );
        eprintln!(
            "\n*** SKIPPED: prometheus is missing (Debian: apt-get install prometheus); \
             the leak alert was NOT checked against a real Prometheus ***\n"
        );
        return;
    }
    // An agent that never connects: a leak every connectTimeout.
    let h = start_pools(
        "pools:\n  - name: stuck\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 1\n    connectTimeout: 400ms\n    agentCommand: [sleep, \"7778\"]\n",
    )
    .await;
    let target = h
        .server
        .base_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {MONITORING}/warmpool-rules.yaml\nscrape_configs:\n  - job_name: warmpool\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prometheus = KillOnDrop(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts"),
    );
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(50);
    let mut last = String::new();
    let fired = loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/api/v1/alerts"))
            .send()
            .await
            && let Ok(v) = r.json::<serde_json::Value>().await
        {
            last = v.to_string();
            let firing = v["data"]["alerts"].as_array().and_then(|a| {
                a.iter()
                    .find(|a| {
                        a["labels"]["alertname"] == "WarmpoolLeaksRising"
                            && a["labels"]["pool"] == "stuck"
                            && a["state"] == "firing"
                    })
                    .cloned()
            });
            if let Some(a) = firing {
                break Some(a);
            }
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    h.server.shutdown().await;
    let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    let alert = fired.unwrap_or_else(|| {
        panic!("WarmpoolLeaksRising never fired within 50 s; last /api/v1/alerts: {last}\nprometheus log:\n{log}")
    });
    eprintln!("fired: {alert}");
    assert_eq!(alert["labels"]["job"], "warmpool");
}
