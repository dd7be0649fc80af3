//! Monitoring: every metric family a fresh service exports exists from the first scrape (the
//! list in docs/API.md, "Metrics reference"), and the alert rules in `manifests/monitoring/`
//! are valid, in sync and pass their `promtool test rules` unit tests; a real Prometheus with
//! those rules loaded fires the leak alert for a leaking pool. Every query of the Grafana
//! dashboard (`manifests/monitoring/grafana-dashboard.json`) reads only families a running
//! warmpool exports, and that Prometheus evaluates each without error.

#[path = "support/jenkins.rs"]
mod jenkins;
#[path = "support/jenkins_pool.rs"]
mod jenkins_pool;
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
    let text = h.metrics_text().await;
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

/// A real Prometheus (Debian's binary) scraping `target` every second with the alert rules
/// loaded, on a free loopback port; killed when dropped. None (with a loud message) when the
/// binary is missing outside CI; under `WARMPOOL_CI` a missing binary fails.
struct Prometheus {
    port: u16,
    dir: tempfile::TempDir,
    _child: KillOnDrop,
}

impl Prometheus {
    fn start(target: &str, what: &str) -> Option<Prometheus> {
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
                 {what} was NOT checked against a real Prometheus ***\n"
            );
            return None;
        }
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
        let child = KillOnDrop(
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
        Some(Prometheus {
            port,
            dir,
            _child: child,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

/// The `host:port` a Prometheus scrapes for this harness.
fn scrape_target(h: &Harness) -> String {
    h.server
        .base_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

#[tokio::test]
async fn a_real_prometheus_fires_the_leak_alert_for_a_leaking_pool() {
    // An agent that never connects: a leak every connectTimeout.
    let h = start_pools(
        "pools:\n  - name: stuck\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 1\n    connectTimeout: 400ms\n    agentCommand: [sleep, \"7778\"]\n",
    )
    .await;
    let Some(prometheus) = Prometheus::start(&scrape_target(&h), "the leak alert") else {
        h.server.shutdown().await;
        return;
    };
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(50);
    let mut last = String::new();
    let fired = loop {
        if let Ok(r) = http.get(prometheus.url("/api/v1/alerts")).send().await
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
    let alert = fired.unwrap_or_else(|| {
        panic!(
            "WarmpoolLeaksRising never fired within 50 s; last /api/v1/alerts: {last}\nprometheus log:\n{}",
            prometheus.log()
        )
    });
    eprintln!("fired: {alert}");
    assert_eq!(alert["labels"]["job"], "warmpool");
}

// ---- The Grafana dashboard (manifests/monitoring/grafana-dashboard.json) ----

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/manifests/monitoring/grafana-dashboard.json"
);

/// Every PromQL query of a Grafana dashboard: each `expr` at any depth (panel targets, and the
/// panels a collapsed row nests), and each query template variable's query, where
/// `label_values(selector, label)` (Grafana's, not PromQL) stands for its selector.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    exprs(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let q = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap_or_else(|| panic!("template variable {} has no query", var["name"]));
        let q = q.trim();
        out.push(match q.strip_prefix("label_values(") {
            Some(rest) => {
                let inner = rest.strip_suffix(')').expect("label_values(...) closes");
                inner
                    .rsplit_once(',')
                    .map_or(inner, |(sel, _label)| sel)
                    .trim()
                    .to_string()
            }
            None => q.to_string(),
        });
    }
    out
}

/// The metric families a PromQL expression reads (histogram `_bucket`/`_sum`/`_count` series
/// count as their family). A small tokenizer: strings, label matchers `{...}`, ranges `[...]`,
/// Grafana variables and numbers are skipped; an identifier before `(`, `by` or `without` is a
/// function or an aggregation; the parenthesised list after by/without/on/ignoring/group_left/group_right holds
/// label names; the binary-operator keywords are not metrics. Whatever identifier is left is a
/// metric name.
fn metric_families(expr: &str) -> BTreeSet<String> {
    const LABEL_LIST: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: &[&str] = &[
        "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
    ];
    let b: Vec<char> = expr.chars().collect();
    let skip_to = |mut i: usize, close: char| {
        while i < b.len() && b[i] != close {
            if b[i] == '"' || b[i] == '\'' || b[i] == '`' {
                let q = b[i];
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let (mut i, mut labels_next, mut out) = (0, false, BTreeSet::new());
    while i < b.len() {
        let c = b[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_to(i + 1, c);
        } else if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '(' && labels_next {
            labels_next = false;
            i = skip_to(i + 1, ')');
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            i += 1;
            while i < b.len() && (word(b[i]) || b[i] == '.' || b[i] == '{' || b[i] == '}') {
                i += 1;
            }
        } else if word(c) {
            let start = i;
            while i < b.len() && word(b[i]) {
                i += 1;
            }
            let name: String = b[start..i].iter().collect();
            let lower = name.to_ascii_lowercase();
            let rest: String = b[i..].iter().collect();
            let rest = rest.trim_start();
            let next_word: String = rest.chars().take_while(|c| word(*c)).collect();
            let next_word = next_word.to_ascii_lowercase();
            if LABEL_LIST.contains(&lower.as_str()) {
                labels_next = true;
            } else if KEYWORDS.contains(&lower.as_str())
                || rest.starts_with('(')
                || next_word == "by"
                || next_word == "without"
            {
                // A keyword, or a function or aggregation (`sum by (le) (...)`).
            } else {
                out.insert(family(&name).to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The (query, family) pairs whose family is not in `exported`.
fn unknown_families(queries: &[String], exported: &BTreeSet<String>) -> Vec<(String, String)> {
    queries
        .iter()
        .flat_map(|q| metric_families(q).into_iter().map(move |f| (q.clone(), f)))
        .filter(|(_, f)| !exported.contains(f))
        .collect()
}

/// A dashboard query as Prometheus evaluates it once Grafana has put in its variables (every
/// pool, a one-minute rate window).
fn as_grafana_sends(query: &str) -> String {
    let q = query
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
        .replace("${pool}", ".*")
        .replace("$pool", ".*");
    assert!(
        !q.contains('$'),
        "unknown variable in dashboard query {query}"
    );
    q
}

#[test]
fn the_query_tokenizer_finds_metric_families_only() {
    let f = |e: &str| metric_families(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        f(
            r#"histogram_quantile(0.9, sum by (le, pool) (rate(warmpool_lease_wait_seconds_bucket{pool=~"$pool",le!="+Inf"}[$__rate_interval])))"#
        ),
        ["warmpool_lease_wait_seconds"]
    );
    assert_eq!(
        f(
            r#"sum(rate(a_total{x="by (b)"}[5m] offset 1h)) without (le) / on (pool) group_left(state) max(b_count) > bool 0.5 unless c"#
        ),
        ["a_total", "b", "c"]
    );
    assert_eq!(f("warmpool_agents"), ["warmpool_agents"]);
    assert!(f("vector(1) + 2e3").is_empty());
}

#[tokio::test]
async fn every_dashboard_query_uses_exported_metrics_and_a_real_prometheus_evaluates_it() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("the dashboard"))
            .expect("the dashboard is JSON");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 39));
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "pool"]);
    // Every panel (rows' nested ones too) has its own id and reads the `datasource` variable.
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids missing or repeated");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().expect("targets");
        for ds in std::iter::once(&p["datasource"]).chain(targets.iter().map(|t| &t["datasource"]))
        {
            assert_eq!(ds["uid"], "${datasource}", "panel {}", p["title"]);
        }
    }
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    let families: BTreeSet<String> = queries.iter().flat_map(|q| metric_families(q)).collect();
    for wanted in [
        "warmpool_agents",
        "warmpool_lease_wait_seconds",
        "warmpool_exec_time_to_first_byte_seconds",
        "warmpool_warm_hit_ratio",
        "warmpool_warm_hit_target",
        "warmpool_provisions_total",
        "warmpool_leaks_total",
        "warmpool_recycles_total",
        "warmpool_jenkins_requests_total",
        "warmpool_jenkins_poll_interval_seconds",
        "warmpool_lease_requests_waiting",
        "warmpool_pool_degraded",
    ] {
        assert!(families.contains(wanted), "no panel shows {wanted}");
    }

    // A warmpool exporting every family the dashboard can show: a pool with a warm-hit target
    // and a lease (warm-hit ratio) and a Jenkins pool on the Jenkins double (poll interval,
    // Jenkins nodes).
    let j = jenkins_pool::jenkins(jenkins::CrumbMode::Enforced).await;
    let s = jenkins_pool::creds_of(&j);
    let yaml = format!(
        "  - name: warm\n    labels: [linux, warm]\n    minIdle: 1\n    maxTotal: 2\n    warmHitTarget: 0.9\n{}",
        jenkins_pool::pool_yaml("ci", &j, &s, "", "")
    );
    let h = jenkins_pool::serve(&yaml).await;
    h.wait_idle("warm", 1).await;
    let lease = h.lease("warm", 30.0, 60.0).await;
    h.client.release(&lease.id).await.expect("released");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (exported, text) = loop {
        let text = h.metrics_text().await;
        let exported: BTreeSet<String> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| family(l).to_string())
            .collect();
        if unknown_families(&queries, &exported).is_empty() || std::time::Instant::now() > deadline
        {
            break (exported, text);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let unknown = unknown_families(&queries, &exported);
    assert!(
        unknown.is_empty(),
        "dashboard queries use metrics this warmpool does not export (query, family): {unknown:#?}\n/metrics:\n{text}"
    );
    // The check sees a misspelled metric.
    let misspelled: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(DASHBOARD)
            .unwrap()
            .replace("warmpool_leaks_total", "warmpool_leak_total"),
    )
    .unwrap();
    let unknown = unknown_families(&dashboard_queries(&misspelled), &exported);
    assert!(
        !unknown.is_empty() && unknown.iter().all(|(_, f)| f == "warmpool_leak_total"),
        "{unknown:?}"
    );

    // A real Prometheus scraping that warmpool evaluates every query without error.
    let Some(prometheus) = Prometheus::start(&scrape_target(&h), "the dashboard's PromQL") else {
        h.server.shutdown().await;
        return;
    };
    let http = reqwest::Client::new();
    let query = |q: String| {
        let http = http.clone();
        let url = prometheus.url("/api/v1/query");
        async move {
            let r = http.get(url).query(&[("query", q)]).send().await;
            match r {
                Ok(r) => r.json::<serde_json::Value>().await.ok(),
                Err(_) => None,
            }
        }
    };
    // Scraped once: every family the dashboard uses has a series in Prometheus.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let probe = r#"count(warmpool_jenkins_poll_interval_seconds) + count(warmpool_warm_hit_ratio)"#;
    loop {
        let v = query(probe.to_string()).await;
        if v.as_ref().is_some_and(|v| {
            v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus never scraped warmpool: {v:?}\n{}",
            prometheus.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    for q in &queries {
        let sent = as_grafana_sends(q);
        let v = query(sent.clone()).await.expect("Prometheus answers");
        assert_eq!(
            v["status"], "success",
            "Prometheus rejects the dashboard query {q}\n(sent as {sent}): {v}"
        );
    }
    // And the evaluation catches what the metric check cannot: a misspelled function.
    let v =
        query("histogram_quantlie(0.9, rate(warmpool_lease_wait_seconds_bucket[1m]))".to_string())
            .await
            .expect("Prometheus answers");
    assert_eq!(v["status"], "error", "{v}");
    h.server.shutdown().await;
}
